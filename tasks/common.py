"""What every stage task shares: config from flow parameters, the code version, cache keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgpo_core.config import MGPOConfig, load_config
from mgpo_core.ops.tracking import tracking_uri_for
from tasks.stage_code import stage_code_digest

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def load_cfg(preset: str, overrides: list[str]) -> MGPOConfig:
    return load_config(preset, overrides)


def git_sha() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def input_fingerprint(paths: list[str]) -> str:
    """Fingerprint of raw inputs for the filter stage's cache key: every file's path, size and mtime.

    New or changed data at the same path gives a new key (and so a new filter run and a new dataset hash);
    unchanged inputs reuse the finished stage.
    """
    items = []
    for p in paths:
        root = Path(p)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
                items.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
            except OSError:
                items.append((str(f), None, None))  # missing: the filter stage reports it
    return digest(items)


Ignored = tuple[str, ...] | Callable[[MGPOConfig], tuple[str, ...]]


def stage_cache_key(stage: str, ignore_sections: Ignored = (), code: Callable[[MGPOConfig], Any] | None = None):  # noqa: ANN201
    """A Prefect ``cache_key_fn``: stage name + the task's (small, JSON) inputs + the digest of the code the stage
    runs + the identity of the tracking store and of the state folder — and a cached result is validated before
    it is used.

    The code digest (``tasks.stage_code``) covers the task's function, the helpers it calls and the project
    modules they import, transitively: an evaluation-only change leaves the keys of filtering and training alone.
    ``ignore_sections`` may be a function of the config. ``code(cfg)``, when given, names the function whose
    code counts under that config instead of the task's own (the select stage without selection configured runs
    only its pass-through).

    ``preset`` + ``overrides`` are replaced by the resolved config minus ``ignore_sections`` (those that cannot
    change the stage's result, e.g. ``evaluation`` for training), minus ``tracking`` and ``state_dir`` (where
    things go), plus the store identity (the state folder's own MLflow store is one store with or without the
    local server; any other URI is another store) and the state folder's id (its contents, not its path). The
    other inputs carry the dataset content hash and upstream manifests. When a result is stored under the key,
    ``tasks.validate`` checks what it names (dataset, checkpoint, MLflow runs, model version); a stale one sends
    the stage to another key, so it runs again and the log says why.
    """

    def key(ctx, params: dict[str, Any]) -> str:  # noqa: ANN001
        from tasks.validate import state_identity, store_identity, validated_key

        params = dict(params)
        # The pipeline's MLflow parent run only says where the stage's run is nested: a new parent (any config
        # change makes one) must not invalidate a finished upstream stage whose own inputs did not change.
        params.pop("parent_run_id", None)
        cfg_obj = None
        if "preset" in params and "overrides" in params:
            cfg_obj = load_cfg(params.pop("preset"), params.pop("overrides"))
            cfg = cfg_obj.model_dump(mode="json")
            ignored = ignore_sections(cfg_obj) if callable(ignore_sections) else ignore_sections
            for k in ("tracking", "run_name", "preset", "state_dir", *ignored):
                cfg.pop(k, None)
            params["config"] = cfg
            params["stores"] = {
                "tracking": store_identity(tracking_uri_for(cfg_obj), cfg_obj.state_dir),
                "state": state_identity(cfg_obj.state_dir),
            }
            if str(cfg_obj.model.path or "").startswith("models:/"):
                from mgpo_core.modeling.source import base_model_lineage

                # An alias moves: the key holds the version (and checkpoint digest) it names today.
                params["base_model"] = base_model_lineage(cfg_obj)
        fn = code(cfg_obj) if code is not None and cfg_obj is not None else ctx.task.fn
        base = f"mgpo-{stage}-{digest(stage, params, stage_code_digest(fn))}"
        return validated_key(stage, base, cfg_obj, ctx) if cfg_obj is not None else base

    return key


def stage_cache_policy(stage: str, ignore_sections: Ignored = (), code: Callable[[MGPOConfig], Any] | None = None):  # noqa: ANN201
    """The cache policy of a stage task: ``stage_cache_key``'s key, SERIALIZABLE with a lock per key
    (``tasks.locks``), so two overlapping runs with the same inputs execute the stage once."""
    from prefect.cache_policies import CachePolicy

    from tasks.locks import serializable

    return serializable(CachePolicy.from_cache_key_fn(stage_cache_key(stage, ignore_sections, code)))
