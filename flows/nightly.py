"""The nightly MGPO pipeline (filter → train → select → register → evaluate → promote) and one flow per stage.

Flows only wire tasks. Parameters are a preset plus ``key=value`` overrides (and optional raw inputs for the
filter stage); every task is cached on its inputs, so rerunning a failed nightly run executes only what failed.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mgpo_core.config import DEFAULT_PRESET
from tasks.common import input_fingerprint, load_cfg
from tasks.console import attach as console_attach
from tasks.stages import (
    baseline_task,
    evaluate_task,
    filter_task,
    pipeline_run_task,
    promote_task,
    register_task,
    select_task,
    train_task,
)


def _report_markdown(dataset: dict[str, Any]) -> str:
    path = dataset.get("report_md")
    if path:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    rep = dataset.get("report", {})
    return "# Filter report\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in rep.items())


def run_name(kind: str):  # noqa: ANN201
    """A readable flow run name: ``nightly tiny-base-cpu 2026-12-06 02:00`` (kind, preset, scheduled start, UTC)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        when = flow_run.scheduled_start_time
        stamp = when.strftime("%Y-%m-%d %H:%M") if when else ""
        return " ".join(filter(None, [kind, params.get("preset") or DEFAULT_PRESET, stamp]))

    return name


def _publish(summary: dict, preset: str, overrides: list[str]) -> None:
    """The summary and link artifacts; a failure to publish them is logged, not fatal (the night's work is done)."""
    from mgpo_core.ops.tracking import tracking_uri_for
    from tasks.artifacts import publish

    try:
        publish(summary, tracking_uri_for(load_cfg(preset, overrides)))
    except Exception as e:  # noqa: BLE001 - reported; the pipeline's result stands
        get_run_logger().warning("the summary artifacts were not published: %s: %s", type(e).__name__, e)


@flow(name="mgpo-nightly", flow_run_name=run_name("nightly"), log_prints=True)
def nightly(
    preset: str = DEFAULT_PRESET, overrides: list[str] | None = None, inputs: list[str] | None = None
) -> dict:
    """Run the whole pipeline; returns a summary (dataset, training, model version, scores, promotion)."""
    overrides, inputs = list(overrides or []), list(inputs or [])
    log = get_run_logger()
    console_attach()  # under `mgpo run`: one console line per finished stage
    parent = pipeline_run_task(preset, overrides, inputs)
    dataset = filter_task(preset, overrides, inputs, parent, input_fingerprint(inputs))
    create_markdown_artifact(
        _report_markdown(dataset), key="filter-report", description="Dataset filter report"
    )
    train = train_task(preset, overrides, dataset, parent)
    chosen = select_task(preset, overrides, train, dataset.get("eval_path"), parent)
    reg = register_task(preset, overrides, chosen, parent)
    ev = evaluate_task(preset, overrides, reg, dataset.get("eval_path"), parent)
    create_table_artifact(
        [{"metric": k, "value": round(v, 4)} for k, v in sorted(ev["metrics"].items())],
        key="evaluation",
        description=f"Evaluation of {reg['model_name']} v{reg['version']}",
    )
    base = baseline_task(preset, overrides, dataset.get("eval_path"), parent)
    promo = promote_task(preset, overrides, reg, ev, base)
    summary = {
        "pipeline_run_id": parent,
        "dataset": dataset,
        "train": {k: train.get(k) for k in ("run_dir", "steps_done", "mlflow_run_id", "hf_export")},
        "selection": {k: chosen.get(k) for k in ("selected_step", "hf_export", "selection")},
        "registration": reg,
        "evaluation": ev,
        "baseline": base,
        "promotion": promo,
    }
    _publish(summary, preset, overrides)
    log.info("pipeline done: %s v%s, promoted=%s", reg["model_name"], reg["version"], promo["promoted"])
    return summary


@flow(name="mgpo-filter", flow_run_name=run_name("filter"))
def filter_flow(
    preset: str = DEFAULT_PRESET, overrides: list[str] | None = None, inputs: list[str] | None = None
) -> dict:
    inputs = list(inputs or [])
    return filter_task(preset, list(overrides or []), inputs, None, input_fingerprint(inputs))


@flow(name="mgpo-train", flow_run_name=run_name("train"))
def train_flow(dataset_dir: str, preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> dict:
    from pathlib import Path

    return train_task(
        preset,
        list(overrides or []),
        {"dataset_dir": dataset_dir, "dataset_hash": Path(dataset_dir).name},
        None,
    )


@flow(name="mgpo-select", flow_run_name=run_name("select"))
def select_flow(
    run_dir: str, eval_path: str | None = None, preset: str = DEFAULT_PRESET, overrides: list[str] | None = None
) -> dict:
    """Checkpoint selection alone, on a finished training run directory (its ``manifest.json``)."""
    import json
    from pathlib import Path

    run = Path(run_dir)
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"select: {run / 'manifest.json'} cannot be read ({e}); pass the run directory of a finished training "
            "(the train stage's run_dir, under <state>/runs/)"
        ) from e
    from tasks.stages import _export_identity

    train = {**manifest, "run_dir": str(run), "dataset_hash": manifest.get("dataset_hash") or _dataset_hash_of(run)}
    if train.get("hf_export"):
        train.update(_export_identity(train["hf_export"]))
    return select_task(preset, list(overrides or []), train, eval_path, None)


def _dataset_hash_of(run) -> str:  # noqa: ANN001
    """The content hash of the dataset a run trained on: the name of ``data.train_path`` in its ``config.yaml``
    (selection on ``validation`` reads that dataset's held-out split)."""
    from pathlib import Path

    import yaml

    try:
        path = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data", {}).get("train_path")
    except (OSError, yaml.YAMLError):
        path = None
    return Path(path).name if path else ""


@flow(name="mgpo-register", flow_run_name=run_name("register"))
def register_flow(
    hf_export: str, dataset_hash: str = "", preset: str = DEFAULT_PRESET, overrides: list[str] | None = None
) -> dict:
    return register_task(
        preset, list(overrides or []), {"hf_export": hf_export, "dataset_hash": dataset_hash}, None
    )


@flow(name="mgpo-evaluate", flow_run_name=run_name("evaluate"))
def evaluate_flow(
    model_name: str,
    version: str,
    hf_export: str,
    eval_path: str | None = None,
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | None = None,
) -> dict:
    reg = {"model_name": model_name, "version": version, "hf_export": hf_export}
    return evaluate_task(preset, list(overrides or []), reg, eval_path, None)


@flow(name="mgpo-promote", flow_run_name=run_name("promote"))
def promote_flow(
    model_name: str,
    version: str,
    base_score: float | None = None,
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | None = None,
) -> dict:
    """Promotion alone: ``champion`` moves to the version if it beats the current champion on its evaluation
    scores in MLflow (with no champion yet: if it beats ``base_score``, the base model's promotion metric)."""
    overrides = list(overrides or [])
    metric = load_cfg(preset, overrides).evaluation.promotion_metric
    baseline = {"metrics": {metric: base_score}} if base_score is not None else None
    return promote_task(preset, overrides, {"model_name": model_name, "version": version}, {}, baseline)
