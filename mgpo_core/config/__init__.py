"""Typed MGPO configuration: `load_config` merges a YAML preset, its `base:` chain and dotted overrides into a
validated `MGPOConfig`, or raises `ConfigError` naming each bad field, the value it got and how to fix it.

The field names are a contract the rest of the pipeline codes against; every field carries its own docstring
(pydantic turns it into the description that `describe_config` prints). `config_hash` is a cache key and an
MLflow tag, so it covers exactly the fields that can change results.

What lives where (each module imports only the ones listed before it): `errors` (`ConfigError` and the
`path: what (got value); fix` lines made from pydantic's errors), `base` (`_Section`, the shared field
types and the template check), one module per section or closely related group (`model`, `data` with its
filters, `rollout` with grounding, `algorithm`, `training`: optimizer, DeepSpeed and checkpoints,
`tracking`, `evaluation`), `root` (`MGPOConfig` and the cross-section checks), `loading` (the presets in
`presets/`, `base:` chains, overrides, `${VAR}` expansion) and `output` (hash, YAML, flat params, the field
reference). Import from this package, not its modules: `from mgpo_core.config import load_config`.
"""

from __future__ import annotations

from mgpo_core.config.algorithm import AlgorithmConfig
from mgpo_core.config.base import PositiveInt, Resample, UnitFloat
from mgpo_core.config.data import DataConfig, DataFilterConfig
from mgpo_core.config.errors import ConfigError
from mgpo_core.config.evaluation import EvaluationConfig
from mgpo_core.config.loading import (
    DEFAULT_PRESET,
    PRESETS_DIR,
    available_presets,
    config_from_dict,
    load_config,
)
from mgpo_core.config.model import ModelConfig
from mgpo_core.config.output import (
    HASH_EXCLUDED_FIELDS,
    HASH_EXCLUDED_SUBFIELDS,
    config_hash,
    describe_config,
    flatten_config,
    save_config,
    to_yaml,
)
from mgpo_core.config.rollout import GroundingConfig, RolloutConfig
from mgpo_core.config.root import MGPOConfig
from mgpo_core.config.tracking import TrackingConfig
from mgpo_core.config.training import CheckpointConfig, DeepSpeedConfig, OptimizerConfig

__all__ = [
    "DEFAULT_PRESET",
    "HASH_EXCLUDED_FIELDS",
    "HASH_EXCLUDED_SUBFIELDS",
    "PRESETS_DIR",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataFilterConfig",
    "DeepSpeedConfig",
    "EvaluationConfig",
    "GroundingConfig",
    "MGPOConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PositiveInt",
    "Resample",
    "RolloutConfig",
    "TrackingConfig",
    "UnitFloat",
    "available_presets",
    "config_from_dict",
    "config_hash",
    "describe_config",
    "flatten_config",
    "load_config",
    "save_config",
    "to_yaml",
]
