"""Measuring models: first-token metrics, refusal markers, generation, the comparison report."""
