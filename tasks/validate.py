"""Cached stage results are checked before they are used; and what a cache key knows about the stores.

A persisted stage result names things outside Prefect: a dataset directory, a run directory and its exported
checkpoint, an MLflow run, a model version. Any of them can disappear or change after the result was written (a
version deleted in the UI, a state folder moved or copied, another tracking store). Before a cached result is
returned, its stage's validator looks at each of them; when one is gone or does not match its digest, the cache
key function returns a different key, the stage runs again, and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgpo_core.config import MGPOConfig


class StaleCacheError(RuntimeError):
    """A cached stage result names something that no longer exists or no longer matches (internal signal)."""


# ---------------------------------------------------------------------------------------------- identities
def state_identity(state_dir: str | Path) -> str:
    """A random id written once into the state folder (``<state>/state_id``): cache keys name the folder's
    contents, not its absolute path, so a moved folder keeps its keys and its results are validated instead."""
    state = Path(state_dir).resolve()
    f = state / "state_id"
    if not f.exists():
        state.mkdir(parents=True, exist_ok=True)
        tmp = state / f".state_id.{uuid.uuid4().hex[:8]}"
        tmp.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, f)  # the first writer wins; concurrent callers read its id
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return f.read_text().strip()


def store_identity(uri: str, state_dir: str | Path) -> str:
    """Which MLflow store ``uri`` is: ``state-folder`` for the state folder's own store (SQLite directly, or the
    local MLflow server that serves it), else the URI without credentials."""
    from mgpo_core.ops.servers import mlflow_store_paths, read_records

    db, _ = mlflow_store_paths(state_dir)
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).resolve() == db:
        return "state-folder"
    rec = read_records(state_dir).get("mlflow")
    if rec is not None and uri.rstrip("/") == rec.url.rstrip("/"):
        return "state-folder"
    if "@" in uri.split("//", 1)[-1].split("/", 1)[0]:  # user:password@host
        scheme, rest = uri.split("//", 1)
        uri = f"{scheme}//{rest.split('@', 1)[1]}"
    return uri


# ---------------------------------------------------------------------------------------------- digests
def tree_fingerprint(root: str | Path) -> str:
    """Cheap fingerprint of a directory (relative names, sizes, mtimes): equal means unchanged in practice."""
    root = Path(root)
    items = sorted(
        (f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:20]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checks
def _inside_state(cfg: MGPOConfig, path: str | None, what: str) -> Path:
    if not path:
        raise StaleCacheError(f"the cached result names no {what}")
    p = Path(path)
    state = Path(cfg.state_dir).resolve()
    if not p.resolve().is_relative_to(state):
        raise StaleCacheError(f"its {what} {p} is outside the state folder {state} (moved or copied folder)")
    if not p.exists():
        raise StaleCacheError(f"its {what} {p} no longer exists")
    return p


def _client(cfg: MGPOConfig):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    from mgpo_core.ops.tracking import tracking_uri_for

    return MlflowClient(tracking_uri_for(cfg))


def _mlflow_run_exists(cfg: MGPOConfig, run_id: str | None, what: str) -> None:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    try:
        run = _client(cfg).get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise StaleCacheError(f"its {what} {run_id} is not in the tracking store") from e
        raise
    if run.info.lifecycle_stage == "deleted":
        raise StaleCacheError(f"its {what} {run_id} was deleted in MLflow")


def check_pipeline_run(cfg: MGPOConfig, value: Any) -> None:
    _mlflow_run_exists(cfg, value, "MLflow pipeline run")


def check_filter(cfg: MGPOConfig, value: dict[str, Any]) -> None:
    d = _inside_state(cfg, value.get("dataset_dir"), "dataset directory")
    samples = d / "samples.jsonl"
    if not samples.is_file():
        raise StaleCacheError(f"its dataset {d} has no samples.jsonl")
    try:
        want = json.loads((d / "manifest.json").read_text())["samples_sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise StaleCacheError(f"its dataset {d} has no readable manifest.json") from e
    if file_sha256(samples) != want:
        raise StaleCacheError(f"its dataset {d}/samples.jsonl does not match the digest in its manifest")
    if value.get("eval_path") and not Path(value["eval_path"]).exists():
        raise StaleCacheError(f"its evaluation split {value['eval_path']} no longer exists")


def check_train(cfg: MGPOConfig, value: dict[str, Any]) -> None:
    _inside_state(cfg, value.get("run_dir"), "run directory")
    export = _inside_state(cfg, value.get("hf_export"), "exported checkpoint")
    if not (export / "config.json").is_file():
        raise StaleCacheError(f"its exported checkpoint {export} has no config.json")
    if value.get("hf_export_fingerprint") != tree_fingerprint(export):
        from mgpo_core.ops.registry import checkpoint_digest

        if checkpoint_digest(export) != value.get("hf_export_digest"):
            raise StaleCacheError(f"its exported checkpoint {export} no longer matches its digest")
    _mlflow_run_exists(cfg, value.get("mlflow_run_id"), "MLflow training run")


def check_register(cfg: MGPOConfig, value: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    from mgpo_core.ops.registry import DIGEST_TAG

    name, version = value.get("model_name"), value.get("version")
    try:
        v = _client(cfg).get_model_version(name, str(version))
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise StaleCacheError(f"model version {name} v{version} is not in the tracking store") from e
        raise
    want = value.get("digest")
    if want and v.tags.get(DIGEST_TAG) != want:
        raise StaleCacheError(f"model version {name} v{version} holds another checkpoint (digest tag differs)")


def check_evaluate(cfg: MGPOConfig, value: dict[str, Any]) -> None:
    _inside_state(cfg, value.get("out_dir"), "evaluation folder")
    _mlflow_run_exists(cfg, value.get("run_id"), "MLflow evaluation run")


VALIDATORS: dict[str, Callable[[MGPOConfig, Any], None]] = {
    "pipeline-run": check_pipeline_run,
    "filter": check_filter,
    "train": check_train,
    "select": check_train,  # the training manifest with the chosen checkpoint: the same things to check
    "register": check_register,
    "evaluate": check_evaluate,
    "baseline": check_evaluate,
}


def validated_key(stage: str, base_key: str, cfg: MGPOConfig, task_ctx: Any) -> str:
    """``base_key`` when no result is stored under it or the stored one is still valid; otherwise a key derived
    from the stale record (so the stage runs again, and a later rerun finds the fresh result under that key)."""
    check = VALIDATORS.get(stage)
    store = getattr(task_ctx, "result_store", None)
    if check is None or store is None:
        return base_key
    key = base_key
    for _ in range(20):  # each stale record leads to the key its replacement was stored under
        try:
            if not store.exists(key):
                return key
            value = store.read(key).result
        except Exception:  # noqa: BLE001 - an unreadable record is as good as none: Prefect recomputes it
            return key
        try:
            check(cfg, value)
            return key
        except StaleCacheError as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - a store that cannot answer now: keep the cached result
            _log(f"cached result of stage {stage!r} could not be checked ({type(e).__name__}: {e}); using it")
            return key
        stale = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]
        _log(f"cached result of stage {stage!r} is stale: {why}; running the stage again")
        key = f"{base_key}-after-{stale}"
    return key


def _log(msg: str) -> None:
    """On the console under ``mgpo run`` (a user wants to know why a stage runs again) and in the log."""
    from tasks.console import notice

    notice(msg)
