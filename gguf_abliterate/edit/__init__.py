"""The edit: options, plan, projection, execution in pieces, provenance, verification."""
