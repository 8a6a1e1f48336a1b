"""What the pipeline shows in the Prefect UI: training progress while it runs; after it, the same summary as the
console's, the decision and the links.

``mgpo run`` prints the summary on its terminal; a run started by a worker or from the UI has no terminal, so the
nightly flow also publishes it as Prefect artifacts: a markdown summary (dataset, training, the metric table base
vs trained, the promotion decision, where things are) and link artifacts to the MLflow model version and runs.
``metric_rows`` is the one definition of the table both show. The train stage keeps a progress artifact at the
share of RL steps done (``TrainingProgress``).
"""

from __future__ import annotations

from typing import Any

#: Per-benchmark grounding metrics the summary shows next to the scores (docs/USER_GUIDE.md explains them).
HEADLINE_GROUNDING = ("/grounding/valid_box_ratio", "/grounding/crop_contains_gt")
#: Where ``mgpo servers up`` serves the state folder's MLflow store by default.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, float | None, float]]:
    """(metric, base model's value or None, trained value) for the headline metrics, sorted by name."""
    base = (summary.get("baseline") or {}).get("metrics", {})
    return [
        (k, base.get(k), v)
        for k, v in sorted(summary["evaluation"]["metrics"].items())
        if k.count("/") <= 2 or k.endswith(HEADLINE_GROUNDING)
    ]


def champion_line(summary: dict[str, Any]) -> str:
    reg, promo = summary["registration"], summary["promotion"]
    if promo["promoted"]:
        champ = "this version"
    else:
        champ = f"v{promo['champion_before']} (unchanged)" if promo["champion_before"] else "none yet"
    return f"{reg['model_name']} v{reg['version']} (alias challenger); champion: {champ}"


def mlflow_ui_base(tracking_uri: str) -> tuple[str, bool]:
    """(UI address, whether it serves now): an http(s) tracking URI is its own UI; a local store (SQLite) is
    served by ``mgpo servers up`` at the default address."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/"), True
    return LOCAL_MLFLOW_UI, False


def mlflow_links(summary: dict[str, Any], tracking_uri: str) -> dict[str, str]:
    """MLflow UI links of the night: the model version, and the pipeline, training and evaluation runs."""
    from mlflow.tracking import MlflowClient

    base, _ = mlflow_ui_base(tracking_uri)
    reg = summary["registration"]
    links = {"model version": f"{base}/#/models/{reg['model_name']}/versions/{reg['version']}"}
    client = MlflowClient(tracking_uri)
    runs = {
        "pipeline run": summary.get("pipeline_run_id"),
        "training run": summary["train"].get("mlflow_run_id"),
        "evaluation run": summary["evaluation"].get("run_id"),
        "base model evaluation run": (summary.get("baseline") or {}).get("run_id"),
    }
    for label, run_id in runs.items():
        if run_id:
            exp = client.get_run(run_id).info.experiment_id
            links[label] = f"{base}/#/experiments/{exp}/runs/{run_id}"
    return links


def summary_markdown(summary: dict[str, Any], links: dict[str, str], served: bool) -> str:
    """The nightly's summary as markdown (the Prefect UI renders it on the flow run's Artifacts tab)."""
    ds, train, promo = summary["dataset"], summary["train"], summary["promotion"]
    counts = ds.get("report", {}).get("counts", {})
    sel = summary.get("selection") or {}
    lines = [
        "# MGPO nightly",
        "",
        f"**Decision:** {'promoted' if promo['promoted'] else 'not promoted'}: {promo['reason']}",
        "",
        f"- **model**: {champion_line(summary)}",
        f"- **dataset**: `{ds['dataset_hash']}`: rows in {counts.get('in')}, kept {counts.get('kept')}, "
        f"dropped {counts.get('dropped')}",
        f"- **training**: {train.get('steps_done')} RL steps, registered the checkpoint of step "
        f"{sel.get('selected_step', train.get('steps_done'))}; run dir `{train.get('run_dir')}`",
        "",
        "| metric | base | trained |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{k}` | {'' if b is None else f'{b:.4f}'} | {v:.4f} |" for k, b, v in metric_rows(summary)]
    lines += ["", "## MLflow", ""]
    if not served:
        lines += ["The store is local (SQLite): these links open after `mgpo servers up`.", ""]
    lines += [f"- [{label}]({url})" for label, url in links.items()]
    return "\n".join(lines) + "\n"


def publish(summary: dict[str, Any], tracking_uri: str) -> None:
    """The summary and link artifacts of a nightly flow run (call inside the flow)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    _, served = mlflow_ui_base(tracking_uri)
    links = mlflow_links(summary, tracking_uri)
    reg = summary["registration"]
    create_markdown_artifact(
        summary_markdown(summary, links, served), key="nightly-summary",
        description=f"{reg['model_name']} v{reg['version']}: base vs trained, the promotion decision, links",
    )  # fmt: skip
    keys = {"model version": "mlflow-model-version", "pipeline run": "mlflow-pipeline-run",
            "training run": "mlflow-training-run", "evaluation run": "mlflow-evaluation-run",
            "base model evaluation run": "mlflow-baseline-run"}  # fmt: skip
    for label, url in links.items():
        create_link_artifact(url, link_text=f"MLflow {label}", key=keys[label], description=f"MLflow {label}")


class TrainingProgress:
    """A Prefect progress artifact of the train stage, updated per finished RL step (0-100 %).

    The UI's view of a multi-day training; the artifact is a convenience, so a Prefect API that does not answer
    costs a warning (once), never the training.
    """

    def __init__(self, total_steps: int, description: str) -> None:
        self.total = max(int(total_steps), 1)
        self.id = None
        self._warned = False
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, key="training-progress", description=description)
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    def step(self, step: int) -> None:
        if self.id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(100.0, 100.0 * step / self.total))
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            import logging

            logging.getLogger("mgpo").warning("training progress artifact not updated: %s: %s", type(e).__name__, e)
            self._warned = True
