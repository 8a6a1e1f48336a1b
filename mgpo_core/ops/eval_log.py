"""Record evaluation results in MLflow: metrics `eval/<benchmark>/<metric>` (direct mode under
`eval/<benchmark>/direct/...`) and the output files on a run, and the same metrics as tags on the evaluated
registered model version, so the registry shows them and promotion can compare versions.

Only `MlflowClient` calls with explicit ids are used: no global active run is started or changed, so this is
safe to call from inside a training or pipeline run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from mgpo_core.evaluation.runner import EvalResult

__all__ = ["log_eval_results", "model_version_eval_tags"]

_BATCH = 500  # MLflow's limit of metrics per log_batch call is 1000


def _model_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(
            f"registered model {name!r} has no version {version!r} in {client.tracking_uri} ({exc.message}); "
            "pass the name and version of an existing model version (see the MLflow UI's Models page)"
        ) from None


def question_set_digest(records_path: Path | None) -> str | None:
    """Digest of the questions an evaluation scored (id, question, choices, answer of every record): two scores
    are comparable only when this matches (same benchmark data, same subsample/limit)."""
    import hashlib
    import json

    if records_path is None or not Path(records_path).is_file():
        return None
    items = []
    for line in Path(records_path).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        items.append([r.get("id"), r.get("question"), r.get("choices"), r.get("answer")])
    return hashlib.sha256(json.dumps(sorted(items, key=str)).encode()).hexdigest()[:16]


def log_eval_results(
    results: Sequence[EvalResult],
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment_name: str = "mgpo",
    run_name: str | None = None,
    model_name: str | None = None,
    model_version: str | int | None = None,
    log_artifacts: bool = True,
    step: int = 0,
    artifact_location: str | None = None,
) -> str:
    """Log ``results`` and return the MLflow run id.

    ``run_id`` None creates a run in ``experiment_name`` (created if missing, with ``artifact_location``) and
    marks it finished; an
    existing ``run_id`` is logged into and left as it is. With ``model_name`` and ``model_version`` every
    metric is also set as a tag (value as text) on that model version, plus ``eval/run_id``; the version must
    exist (checked before anything is logged).

    Raises:
        ValueError: only one of ``model_name``/``model_version`` given, or a version that does not exist.
    """
    if (model_name is None) != (model_version is None):
        raise ValueError(
            f"model_name={model_name!r}, model_version={model_version!r}: give both to attach the metrics "
            "to a registered model version, or neither"
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    version = _model_version(client, model_name, model_version) if model_name is not None else None
    created = run_id is None
    if run_id is None:
        exp = client.get_experiment_by_name(experiment_name)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(experiment_name, artifact_location=artifact_location)
        )
        tags = {"mgpo.stage": "evaluate"}
        if version is not None:
            tags["mgpo.eval.model"] = f"{model_name}/{model_version}"
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, step) for result in results for key, value in result.prefixed().items()
    ]
    run_tags = [RunTag(f"{r.prefix}/engine", r.engine) for r in results] + [
        RunTag(f"{r.prefix}/questions", str(r.n)) for r in results
    ]
    try:
        for start in range(0, len(metrics), _BATCH):
            client.log_batch(
                run_id, metrics=metrics[start : start + _BATCH], tags=run_tags if start == 0 else ()
            )
        if log_artifacts:
            for r in results:
                where = f"eval/{r.benchmark}-{r.mode}"
                for path in (r.summary_path, r.records_path, r.picture_path):
                    if path is not None and path.is_file():
                        client.log_artifact(run_id, str(path), artifact_path=where)
        if version is not None:
            for m in metrics:
                client.set_model_version_tag(model_name, str(model_version), m.key, repr(m.value))
            client.set_model_version_tag(model_name, str(model_version), "eval/run_id", run_id)
            for r in results:  # what the scores rest on: promotion compares only like with like
                client.set_model_version_tag(model_name, str(model_version), f"mgpo.questions:{r.prefix}", str(r.n))
                qs = question_set_digest(r.records_path)
                if qs:
                    client.set_model_version_tag(model_name, str(model_version), f"mgpo.question_set:{r.prefix}", qs)
    except Exception:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def model_version_eval_tags(
    name: str, version: str | int, tracking_uri: str | None = None
) -> dict[str, float]:
    """The ``eval/...`` metrics attached to a model version by :func:`log_eval_results`, as floats."""
    client = MlflowClient(tracking_uri=tracking_uri)
    tags = _model_version(client, name, version).tags
    return {k: float(v) for k, v in tags.items() if k.startswith("eval/") and k != "eval/run_id"}
