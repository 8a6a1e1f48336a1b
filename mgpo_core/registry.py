"""Kept only for model versions registered before ``mgpo_core.ops.registry`` existed: their pickled pyfunc
(``python_model.pkl``) names ``mgpo_core.registry.HFCheckpointModel``, and loading one imports this path. New
code imports :mod:`mgpo_core.ops.registry`."""

from mgpo_core.ops.registry import HFCheckpointModel

__all__ = ["HFCheckpointModel"]
