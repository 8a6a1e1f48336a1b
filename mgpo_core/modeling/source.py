"""The local checkpoint directory a config's ``model`` section names, building the offline tiny models on first use.

Above both builders (``tiny``, ``base``) and the loader, so that loading never reaches up into the base model's
pre-training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mgpo_core.modeling.loading import resolve_model_path


def model_dir_for(cfg: Any) -> Path:
    """The local checkpoint directory a config's ``model`` section names (building an offline one if needed).

    ``model.path`` set -> that directory; otherwise the offline tiny model ``model.tiny`` (``random`` or the
    pre-trained ``base``) for ``model.tiny_seed``, cached under ``<state_dir>/models``.
    """
    m = cfg.model
    cache = Path(cfg.state_dir) / "models"
    if m.path is None and m.tiny == "base":
        from mgpo_core.modeling.base import base_model_for  # pre-training imports stay lazy

        return base_model_for(cache, seed=m.tiny_seed)
    return resolve_model_path(m.path, cache_root=cache, tiny_seed=m.tiny_seed)
