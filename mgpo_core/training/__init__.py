"""MGPO training on DeepSpeed: the RL loop, exact-resume checkpoints, resilient MLflow metrics."""
