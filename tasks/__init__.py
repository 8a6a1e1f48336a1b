"""Prefect tasks: thin, retriable, cached wrappers over mgpo_core (small manifests in, small manifests out)."""
