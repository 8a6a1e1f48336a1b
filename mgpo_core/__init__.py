"""MGPO core library: the method as plain functions and small classes (never imports Prefect)."""
