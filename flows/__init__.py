"""Prefect flows: the nightly MGPO pipeline and one flow per stage (they only wire tasks)."""
