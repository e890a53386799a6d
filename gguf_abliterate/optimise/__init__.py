"""The search for the edit: space, per-trial adapters, scorer, study and pick."""
