"""`MGPOConfig`, the whole run: one field per section, the cross-section checks, the tree's registration."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from mgpo_core.config.algorithm import AlgorithmConfig
from mgpo_core.config.base import _Section
from mgpo_core.config.data import DataConfig, DataFilterConfig
from mgpo_core.config.errors import _FieldProblem, _register_tree
from mgpo_core.config.evaluation import EvaluationConfig
from mgpo_core.config.model import ModelConfig
from mgpo_core.config.rollout import GroundingConfig, RolloutConfig
from mgpo_core.config.safety import check_safe_values
from mgpo_core.config.tracking import TrackingConfig
from mgpo_core.config.training import CheckpointConfig, DeepSpeedConfig, OptimizerConfig


class MGPOConfig(_Section):
    """The whole run: one section per concern plus the names that locate the run."""

    preset: str | None = None
    """Preset name or YAML path the config was loaded from (informational)."""
    run_name: str = "mgpo"
    """Human-readable run name (MLflow run name, run-directory prefix): letters, digits, '.', '_', '-' only, since
    it becomes a folder name and reaches the multi-node launch command (config/safety.py)."""
    state_dir: str = ".mgpo"
    """Local state folder: run directories, checkpoints, the MLflow store, Prefect results. A path by design (any
    folder the operator names), written without shell characters (config/safety.py)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and evaluation data."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout generation."""
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    """Box parsing and validation."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """RL algorithm."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimiser."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed and launcher."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation and promotion."""

    @model_validator(mode="after")
    def _sections_agree(self) -> MGPOConfig:
        if self.deepspeed.bf16 and self.model.dtype == "float16":
            raise _FieldProblem("bf16 training cannot run a float16 model", self.model.dtype,
                                "set model.dtype=bfloat16 (or float32), or deepspeed.bf16=false", "model.dtype")
        if self.algorithm.shared_prompt and self.model.attn_implementation == "eager":
            raise _FieldProblem("algorithm.shared_prompt runs through transformers' registered attention "
                                "functions, which 'eager' is not", self.model.attn_implementation,
                                "set model.attn_implementation=sdpa, or algorithm.shared_prompt=false",
                                "model.attn_implementation")
        if "validation" in self.checkpoint.select_on and not self.data.validation_rows:
            raise _FieldProblem("selects on the validation split, which data.validation_rows=0 never holds out",
                                self.checkpoint.select_on,
                                "set data.validation_rows (e.g. 500) or name benchmarks with data instead",
                                "checkpoint.select_on")  # fmt: skip
        check_safe_values(self)
        return self


_register_tree(
    MGPOConfig,
    {
        **{
            field.annotation: name
            for name, field in MGPOConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        },
        DataFilterConfig: "data.filters",
    },
)
