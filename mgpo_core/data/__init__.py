"""Datasets: the canonical sample schema, readers of the published formats, synthetic data and filters."""
