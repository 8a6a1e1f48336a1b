"""The pipeline's Prefect tasks: thin, retriable, cached shells over ``mgpo_core`` (small manifests in and out).

Cache keys come from each stage's inputs (config hash, dataset content hash, base-model reference, checkpoint
digest) plus the code version, and results are persisted, so rerunning the nightly flow returns the finished
stages from cache and executes only what failed. Training additionally resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from mgpo_core.ops.tracking import tracking_uri_for
from tasks.common import (
    digest,
    git_sha,
    load_cfg,
    stage_cache_policy,
)
from tasks.console import progress
from tasks.hooks import stage_body
from tasks.retry import retry_if_transient

# MGPO_TASK_RETRIES overrides the retry count (tests of failure handling set 0).
RETRY = dict(
    retries=int(os.environ.get("MGPO_TASK_RETRIES", "2")),
    retry_delay_seconds=[float(x) for x in os.environ.get("MGPO_TASK_RETRY_DELAYS", "5,30").split(",")],
    retry_condition_fn=retry_if_transient,
)


def _start_child_run(cfg, parent_run_id: str | None, name: str, stage: str) -> str:  # noqa: ANN001
    """An MLflow run nested under the pipeline run (so the lineage is browsable in the UI)."""
    from mlflow.tracking import MlflowClient

    from mgpo_core.ops.tracking import artifact_root, ensure_experiment, source_tags

    client = MlflowClient(tracking_uri_for(cfg))
    exp_id = ensure_experiment(  # tagged as model training: MLflow 3's UI opens it in that view
        client, cfg.tracking.experiment_name, artifact_root(cfg.state_dir, tracking_uri_for(cfg))
    )
    tags = {"mgpo.stage": stage, **source_tags(f"mgpo {stage}")}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


@task(
    name="pipeline-run",
    task_run_name="mlflow parent run",
    cache_policy=stage_cache_policy("pipeline-run"),
    persist_result=True,
)
def pipeline_run_task(preset: str, overrides: list[str], inputs: list[str]) -> str:
    """The MLflow parent run of one pipeline execution (cached: a rerun attaches to the same parent)."""
    cfg = load_cfg(preset, overrides)
    from mgpo_core.config import config_hash

    run_id = _start_child_run(cfg, None, f"pipeline-{cfg.run_name}", "pipeline")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri_for(cfg))
    client.set_tag(run_id, "mgpo.config_hash", config_hash(cfg))
    client.set_tag(run_id, "mgpo.git_sha", git_sha())
    return run_id


@task(
    name="filter",
    task_run_name="filter",
    cache_policy=stage_cache_policy("filter", ("evaluation", "optimizer", "deepspeed", "checkpoint")),
    persist_result=True,
    timeout_seconds=6 * 3600,
    **RETRY,
)
@stage_body("filter")
def filter_task(
    preset: str,
    overrides: list[str],
    inputs: list[str],
    parent_run_id: str | None,
    inputs_fingerprint: str = "",
) -> dict[str, Any]:
    """Filter the raw inputs (default: generate the synthetic set) into a content-addressed dataset directory.

    ``inputs_fingerprint`` (sizes and mtimes of the input files) is only there for the cache key.
    """
    from mgpo_core.data.stage import require_training_inputs, run_filter_stage

    log = get_run_logger()
    cfg = load_cfg(preset, overrides)
    state = Path(cfg.state_dir)
    eval_path = cfg.data.eval_path
    require_training_inputs(cfg, inputs)  # a real model never trains on the synthetic set by accident
    if not inputs:
        d = cfg.data
        train, ev = _synthetic_split(cfg, "train", log), _synthetic_split(cfg, "eval", log)
        inputs, eval_path = [str(train)], eval_path or str(ev)
        log.info(
            "no inputs given: generated the synthetic set (%d train, %d eval)",
            d.synthetic_train,
            d.synthetic_eval,
        )
    result = run_filter_stage(cfg, inputs, state / "datasets", progress=False)
    rep = result.report
    c = rep.get("counts", {})
    progress(
        f"filter    dataset {result.dataset_dir.name}: {c.get('in')} rows in, {c.get('kept')} kept, "
        f"{c.get('dropped')} dropped"
        + (f" {json.dumps(rep['dropped_by_reason'])}" if rep.get("dropped_by_reason") else "")
    )
    if parent_run_id:
        _log_filter_run(cfg, parent_run_id, result)
    return {
        "dataset_dir": str(result.dataset_dir),
        "dataset_hash": result.dataset_dir.name,
        "eval_path": eval_path,
        "report": {k: v for k, v in rep.items() if isinstance(v, int | float | str | dict)},
        "report_md": str(next(iter(result.dataset_dir.glob("report*.md")), "")),
    }


def _synthetic_split(cfg, split: str, log) -> Path:  # noqa: ANN001
    """The config's synthetic split, regenerated when the one on disk names images that are not there (a state
    folder moved since: the split's JSONL holds the absolute paths of the place it was written)."""
    import shutil

    from mgpo_core.data.synthetic import read_samples_jsonl, synthetic_split_for

    jsonl = synthetic_split_for(cfg, split)
    missing = [s.image_path for s in read_samples_jsonl(jsonl) if not Path(s.image_path).exists()]
    if missing:
        log.warning(
            "synthetic %s split %s names %d images that do not exist (e.g. %s; moved state folder?): regenerating",
            split,
            jsonl.parent,
            len(missing),
            missing[0],
        )
        shutil.rmtree(jsonl.parent)
        jsonl = synthetic_split_for(cfg, split)
    return jsonl


def _log_filter_run(cfg, parent_run_id: str, result) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    run_id = _start_child_run(cfg, parent_run_id, "filter", "filter")
    client = MlflowClient(tracking_uri_for(cfg))
    for k, v in result.report.get("counts", {}).items():
        client.log_metric(run_id, f"data/{k}", float(v))
    for k, v in result.report.get("dropped_by_reason", {}).items():
        client.log_metric(run_id, f"data/dropped/{k}", float(v))
    client.set_tag(run_id, "mgpo.dataset_hash", result.dataset_dir.name)
    from mgpo_core.ops.tracking import log_dataset_input

    log_dataset_input(tracking_uri_for(cfg), run_id, name="train", digest=result.dataset_dir.name,
                      source=str(result.dataset_dir), context="filter-output", profile=result.report.get("counts"))
    for f in result.dataset_dir.glob("report*"):
        client.log_artifact(run_id, str(f), "filter_report")
    client.set_terminated(run_id)


@task(
    name="train",
    task_run_name="train",
    cache_policy=stage_cache_policy("train", ("evaluation",)),
    persist_result=True,
    timeout_seconds=3 * 24 * 3600,
    **RETRY,
)
@stage_body("train")
def train_task(preset: str, overrides: list[str], dataset: dict[str, Any], parent_run_id: str | None) -> dict:
    """Launch the DeepSpeed process group on the filtered dataset; a retry resumes from the last checkpoint."""
    from mgpo_core.config import config_hash
    from mgpo_core.training.launch import launch_training

    log = get_run_logger()
    cfg = load_cfg(preset, [*overrides, f"data.train_path={dataset['dataset_dir']}"])
    # The run directory is a function of the stage inputs: a retry (or a rerun after a crash) resumes there.
    run_dir = (
        Path(cfg.state_dir) / "runs" / f"{cfg.run_name}-{digest(config_hash(cfg), dataset['dataset_hash'])}"
    )
    state_file = run_dir / "mlflow_run_id"
    mlflow_run_id = state_file.read_text().strip() if state_file.exists() else None
    if mlflow_run_id and not _run_exists(cfg, mlflow_run_id):
        log.warning(
            "the run directory's MLflow run %s is not in the tracking store %s: starting a new one",
            mlflow_run_id,
            tracking_uri_for(cfg),
        )
        mlflow_run_id = None
    if mlflow_run_id is None:
        mlflow_run_id = _start_child_run(cfg, parent_run_id, "train", "train")
        run_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(mlflow_run_id)
        from mgpo_core.ops.tracking import log_dataset_input

        log_dataset_input(tracking_uri_for(cfg), mlflow_run_id, name="train", digest=dataset["dataset_hash"],
                          source=dataset["dataset_dir"], context="training")
    total = cfg.algorithm.total_steps
    from tasks.artifacts import TrainingProgress

    ui_progress = TrainingProgress(total, f"RL steps done of {total} ({run_dir.name})")

    def on_step(step: int, metrics: dict[str, float]) -> None:
        names = {"reward/mean": "reward", "rollout/valid_box_ratio": "valid boxes", "timing/step_s": "s/step"}
        shown = ", ".join(f"{label} {metrics[k]:.3g}" for k, label in names.items() if k in metrics)
        progress(f"train     step {step}/{total}  {shown}")
        ui_progress.step(step)

    progress(f"train     {total} RL steps in {run_dir} (log: {run_dir / 'train.log'})")
    manifest = launch_training(
        cfg, run_dir, mlflow_run_id=mlflow_run_id, on_line=lambda line: log.debug(line), on_step=on_step
    )
    manifest["run_dir"] = str(run_dir)
    manifest["dataset_hash"] = dataset["dataset_hash"]
    if manifest.get("hf_export"):
        manifest.update(_export_identity(manifest["hf_export"]))
    return manifest


def _export_identity(hf_export: str) -> dict[str, str]:
    """The exported checkpoint's content digest (lineage, registration) and cheap fingerprint (cache checks)."""
    from mgpo_core.ops.registry import checkpoint_digest
    from tasks.validate import tree_fingerprint

    return {"hf_export_digest": checkpoint_digest(hf_export), "hf_export_fingerprint": tree_fingerprint(hf_export)}


def _keep_last(train: dict[str, Any]) -> dict[str, Any]:
    """No selection configured (``checkpoint.select_every = 0``): the last checkpoint is the one registered."""
    return {**train, "selected_step": train.get("steps_done")}


@task(
    name="select",
    task_run_name="select",
    # Without selection configured the stage only passes the last checkpoint on: evaluation settings and code
    # cannot change its result.
    cache_policy=stage_cache_policy(
        "select",
        lambda cfg: ("optimizer", "deepspeed", *(() if cfg.checkpoint.select_every else ("evaluation",))),
        code=lambda cfg: select_task if cfg.checkpoint.select_every else _keep_last,
    ),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
@stage_body("select")
def select_task(
    preset: str, overrides: list[str], train: dict[str, Any], eval_path: str | None, parent_run_id: str | None
) -> dict[str, Any]:
    """Choose the checkpoint to register: with ``checkpoint.select_every = k``, evaluate every k-th kept
    checkpoint and the last on the configured benchmarks and keep the best (the curve goes to the training run);
    otherwise the last. A stage of its own so that the UI shows training end when training ends, and a failed
    selection reruns selection only, never training. Returns the training manifest with ``hf_export`` (and its
    digest) set to the chosen checkpoint, plus ``selected_step``.
    """
    cfg = load_cfg(preset, overrides)
    if not cfg.checkpoint.select_every or not train.get("hf_export"):
        out = _keep_last(train)
        why = "no exported checkpoint" if cfg.checkpoint.select_every else "checkpoint.select_every = 0"
        progress(f"select    the last checkpoint (step {out['selected_step']}; {why})")
        return out
    sel = _select_checkpoint(cfg, Path(train["run_dir"]), train, eval_path)
    progress(f"select    the checkpoint of step {sel.best_step}: {sel.metric} = {sel.curve[sel.best_step]:.4f}")
    chosen = str(sel.best_dir)
    same = chosen == train["hf_export"]  # the last one won: its digest is known (hashing 15 GB again is minutes)
    return {**train, "hf_export": chosen, "selected_step": sel.best_step,
            "selection": {str(k): v for k, v in sel.curve.items()}, **({} if same else _export_identity(chosen))}  # fmt: skip


def _select_checkpoint(cfg, run_dir: Path, manifest: dict, eval_path: str | None):  # noqa: ANN001, ANN202
    """Evaluate every ``checkpoint.select_every``-th checkpoint greedily on the configured benchmarks, log the
    curve to the training run, return the best (``mgpo_core.training.select``)."""
    from mlflow.tracking import MlflowClient

    from mgpo_core.evaluation.runner import evaluate
    from mgpo_core.modeling.source import model_dir_for
    from mgpo_core.training.select import select_checkpoint

    def evaluate_dir(hf_dir: Path, out: Path) -> dict[str, float]:
        engine = make_engine(cfg, str(hf_dir))
        metrics: dict[str, float] = {}
        try:
            for bench in cfg.checkpoint.select_on or cfg.evaluation.benchmarks:
                data_path = cfg.evaluation.data_paths.get(bench) or (eval_path if bench == "synthetic" else None)
                if bench == "validation":  # the split the filter stage held out of this run's training data
                    data_path = str(Path(cfg.state_dir) / "datasets" / manifest["dataset_hash"] / "validation.jsonl")
                res = evaluate(cfg, bench, engine, out / bench, limit=cfg.evaluation.limit, mode=cfg.evaluation.mode,
                               data_path=data_path, progress=False)  # fmt: skip
                metrics.update(res.prefixed())
        finally:
            engine.close()
        return metrics

    client = MlflowClient(tracking_uri_for(cfg))
    run_id = manifest.get("mlflow_run_id")

    def log_point(key: str, value: float, step: int) -> None:
        progress(f"select    checkpoint of step {step}: {key.removeprefix('select/')} = {value:.4f}")
        if run_id:
            client.log_metric(run_id, key, value, step=step)

    return select_checkpoint(cfg, run_dir, Path(manifest["hf_export"]), base_dir=model_dir_for(cfg),
                             evaluate_dir=evaluate_dir, log_point=log_point)  # fmt: skip


def _run_exists(cfg, run_id: str) -> bool:  # noqa: ANN001
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri_for(cfg)).get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return False
        raise


@task(
    name="register",
    task_run_name="register",
    cache_policy=stage_cache_policy("register", ("evaluation",)),
    persist_result=True,
    timeout_seconds=3600,
    **RETRY,
)
@stage_body("register")
def register_task(
    preset: str, overrides: list[str], train: dict[str, Any], parent_run_id: str | None
) -> dict:
    """Register the exported checkpoint as a model version (alias ``challenger``) with lineage tags."""
    from mgpo_core.config import config_hash
    from mgpo_core.modeling.source import base_model_lineage
    from mgpo_core.ops.registry import register_checkpoint

    cfg = load_cfg(preset, overrides)
    v = register_checkpoint(
        train["hf_export"],
        tracking_uri=tracking_uri_for(cfg),
        model_name=cfg.tracking.registered_model_name,
        experiment=cfg.tracking.experiment_name,
        tags={
            "mgpo.git_sha": git_sha(),
            "mgpo.config_hash": config_hash(cfg),
            "mgpo.dataset_hash": train["dataset_hash"],
            "mgpo.train_run_id": train.get("mlflow_run_id") or "",
            **base_model_lineage(cfg),  # a registry URI as the version it resolved to (models:/NAME/VERSION)
            "mgpo.checkpoint_step": str(train.get("selected_step") or train.get("steps_done") or ""),
        },
        parent_run_id=parent_run_id,
    )
    progress(f"register  {v.name} v{v.version} ({'new version' if v.created else 'already registered'})")
    return {
        "model_name": v.name,
        "version": v.version,
        "run_id": v.run_id,
        "created": v.created,
        "hf_export": train["hf_export"],
        "digest": train.get("hf_export_digest") or "",
    }


@task(
    name="evaluate",
    task_run_name="evaluate v{registration[version]}",
    cache_policy=stage_cache_policy("evaluate"),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
@stage_body("evaluate")
def evaluate_task(
    preset: str,
    overrides: list[str],
    registration: dict[str, Any],
    eval_path: str | None,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """Evaluate the registered version on every configured benchmark; scores go to MLflow and onto the version."""
    cfg = load_cfg(preset, overrides)
    name = f"{registration['model_name']}-v{registration['version']}"
    return _evaluate_model(
        cfg, registration["hf_export"], name, eval_path, parent_run_id, f"evaluate-v{registration['version']}",
        model_name=registration["model_name"], model_version=registration["version"],
    )


@task(
    name="baseline",
    task_run_name="baseline",
    cache_policy=stage_cache_policy("baseline", ("optimizer", "deepspeed", "checkpoint", "algorithm")),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
@stage_body("baseline")
def baseline_task(preset: str, overrides: list[str], eval_path: str | None, parent_run_id: str | None) -> dict:
    """Evaluate the model training starts from, as the trained version will be (the bar it must clear).

    Cached on the starting model and the evaluation settings, so it runs once per base model, not per run.
    """
    from mgpo_core.modeling.source import model_dir_for

    cfg = load_cfg(preset, overrides)
    model_dir = model_dir_for(cfg)
    out = _evaluate_model(cfg, str(model_dir), f"base-{Path(model_dir).name}", eval_path, parent_run_id, "baseline",
                          label="base", stage="baseline")  # fmt: skip
    out["model_dir"] = str(model_dir)
    return out


def _evaluate_model(
    cfg,  # noqa: ANN001
    model_dir: str,
    name: str,
    eval_path: str | None,
    parent_run_id: str | None,
    run_name: str,
    *,
    model_name: str | None = None,
    model_version: str | None = None,
    label: str = "evaluate",
    stage: str = "evaluate",
) -> dict[str, Any]:
    """Run every configured benchmark on ``model_dir`` into ``<state>/eval/<name>``, log them to an MLflow run
    nested under the pipeline run (and onto the model version when given); returns metrics and where they are."""
    from mlflow.tracking import MlflowClient

    from mgpo_core.evaluation.runner import evaluate
    from mgpo_core.ops.eval_log import log_eval_results

    log = get_run_logger()
    out_root = Path(cfg.state_dir) / "eval" / name
    engine = make_engine(cfg, model_dir)
    results = []
    try:
        for bench in cfg.evaluation.benchmarks:
            data_path = cfg.evaluation.data_paths.get(bench) or (eval_path if bench == "synthetic" else None)
            res = evaluate(
                cfg, bench, engine, out_root / bench, limit=cfg.evaluation.limit, mode=cfg.evaluation.mode,
                data_path=data_path, progress=False,
            )  # fmt: skip
            log.info("%s %s: %s", label, bench, json.dumps(res.metrics))
            progress(f"{label:<9} {bench}: overall {res.metrics.get('overall', float('nan')):.4f}")
            results.append(res)
    finally:
        engine.close()
    run_id = _start_child_run(cfg, parent_run_id, run_name, stage)
    log_eval_results(
        results, tracking_uri=tracking_uri_for(cfg), run_id=run_id, model_name=model_name, model_version=model_version
    )
    MlflowClient(tracking_uri_for(cfg)).set_terminated(run_id)
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update(r.prefixed())
    return {
        "metrics": metrics,
        "run_id": run_id,
        "out_dir": str(out_root),
        "pictures": [str(r.picture_path) for r in results if r.picture_path],
    }


def make_engine(cfg, model_dir: str):  # noqa: ANN001, ANN201
    """The configured rollout engine on a checkpoint directory (``auto``: vLLM when importable)."""
    from mgpo_core.rollout.factory import build_rollout_engine

    return build_rollout_engine(cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model_dir})}))


@task(name="promote", task_run_name="promote v{registration[version]}", timeout_seconds=600, **RETRY)
@stage_body("promote")
def promote_task(
    preset: str, overrides: list[str], registration: dict[str, Any], evaluation: dict, baseline: dict | None = None
) -> dict:
    """Move ``champion`` to the new version only if it beats the current champion on the configured metric (with
    no champion yet: only if it beats the model training started from)."""
    from mgpo_core.ops.registry import promote_if_better

    cfg = load_cfg(preset, overrides)
    metric = cfg.evaluation.promotion_metric
    d = promote_if_better(
        tracking_uri_for(cfg),
        registration["model_name"],
        registration["version"],
        metric,
        min_improvement=cfg.evaluation.min_improvement,
        baseline_score=(baseline or {}).get("metrics", {}).get(metric),
        baseline_scores=(baseline or {}).get("metrics"),  # every benchmark's, for the model card
    )
    if d.promoted and d.champion_before == str(d.version):
        head = f"champion stays v{d.version}"  # a rerun of a night that already promoted it
    else:
        head = f"champion is now v{d.version}" if d.promoted else "champion unchanged"
    progress(f"promote   {head}: {d.reason}")
    return {
        "promoted": d.promoted,
        "version": d.version,
        "champion_before": d.champion_before,
        "metric": d.metric,
        "new_score": d.new_score,
        "champion_score": d.champion_score,
        "reason": d.reason,
    }
