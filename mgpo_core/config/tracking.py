"""`TrackingConfig`: where MLflow metrics and models go (outside `config_hash`: it never changes results)."""

from __future__ import annotations

from pydantic import Field

from mgpo_core.config.base import PositiveInt, _Section


class TrackingConfig(_Section):
    """MLflow tracking; none of these change results, so they are outside `config_hash`."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None means a local SQLite store under `state_dir`."""
    experiment_name: str = "mgpo"
    """MLflow experiment the runs go to."""
    registered_model_name: str = "mgpo-policy"
    """MLflow registered model the trained checkpoints become versions of."""
    run_id: str | None = None
    """Existing MLflow run to log into (set by the pipeline for the launched trainer)."""
    log_every_steps: PositiveInt = 1
    """Log training metrics every this many RL steps."""
    log_episodes_every: int = Field(0, ge=0)
    """Every this many RL steps, log `log_episodes` sampled episodes (a table and a picture with the boxes) to
    the run and to `<run_dir>/episodes/`; 0 = off."""
    log_episodes: PositiveInt = 8
    """Episodes per sampled-episode log (spread over the step's prompts)."""
