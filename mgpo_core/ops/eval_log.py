"""Record evaluation results in MLflow: metrics `eval/<benchmark>/<metric>` (direct mode under
`eval/<benchmark>/direct/...`), the questions as a dataset input and the output files on a run, and the same
metrics on the evaluated model version's LoggedModel, linked to that dataset (MLflow 3), so the registry shows
them per dataset and promotion compares versions like with like. The version's own tags keep only each
benchmark's overall score (older versions without a LoggedModel get every metric as a tag, as before).

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

from mgpo_core.ops.tracking import ensure_experiment, log_dataset_input, source_tags

if TYPE_CHECKING:
    from mgpo_core.evaluation.runner import EvalResult

__all__ = ["log_eval_results", "model_version_eval_tags", "version_scores"]

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
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log ``results`` and return the MLflow run id.

    ``run_id`` None creates a run in ``experiment_name`` (created if missing, with ``artifact_location``) and
    marks it finished; an
    existing ``run_id`` is logged into and left as it is. With ``model_name`` and ``model_version`` every
    metric is also set as a tag (value as text) on that model version, plus ``eval/run_id``; the version must
    exist (checked before anything is logged). ``extra_tags`` (e.g. which model was evaluated, as resolved from a
    registry URI) are set on the run.

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
        exp_id = ensure_experiment(client, experiment_name, artifact_location)
        tags = {"mgpo.stage": "evaluate", **source_tags("mgpo eval")}
        if version is not None:
            tags["mgpo.eval.model"] = f"{model_name}/{model_version}"
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    # MLflow 3: scores are metrics of the version's LoggedModel, each linked to the questions it was scored on (a
    # dataset named after the benchmark whose digest is the question set), so the Models page lists them per
    # dataset and promotion compares like with like. Versions without a LoggedModel keep the older tags.
    model_id = logged_model_id(version) if version is not None else None
    digests = {r.prefix: question_set_digest(r.records_path) for r in results}
    metrics = []
    for r in results:
        linked = {"model_id": model_id} if model_id else {}
        if model_id and digests[r.prefix]:
            linked.update(dataset_name=_dataset_name(r), dataset_digest=digests[r.prefix])
        metrics += [Metric(key, float(value), now, step, **linked) for key, value in r.prefixed().items()]
    run_tags = [RunTag(f"{r.prefix}/engine", r.engine) for r in results] + [
        RunTag(f"{r.prefix}/questions", str(r.n)) for r in results
    ] + [RunTag(k, str(v)) for k, v in (extra_tags or {}).items()]
    try:
        for start in range(0, len(metrics), _BATCH):
            client.log_batch(
                run_id, metrics=metrics[start : start + _BATCH], tags=run_tags if start == 0 else ()
            )
        for r in results:
            if digests[r.prefix]:
                log_dataset_input(client.tracking_uri, run_id, name=_dataset_name(r), digest=digests[r.prefix],
                                  source=str(r.records_path), context="eval",
                                  profile={"questions": r.n, "benchmark": r.benchmark, "mode": r.mode})
        if log_artifacts:
            for r in results:
                where = f"eval/{r.benchmark}-{r.mode}"
                for path in (r.summary_path, r.records_path, r.picture_path):
                    if path is not None and path.is_file():
                        client.log_artifact(run_id, str(path), artifact_path=where)
        if version is not None:
            name, ver = model_name, str(model_version)
            # On the version itself only what its table should show: each benchmark's overall score and the run.
            shown = metrics if not model_id else [m for m in metrics if m.key.endswith("/overall")]
            for m in shown:
                client.set_model_version_tag(name, ver, m.key, repr(m.value))
            client.set_model_version_tag(name, ver, "eval/run_id", run_id)
            for r in results:  # what the scores rest on: promotion compares only like with like
                if not model_id:
                    client.set_model_version_tag(name, ver, f"mgpo.questions:{r.prefix}", str(r.n))
                    if digests[r.prefix]:
                        client.set_model_version_tag(name, ver, f"mgpo.question_set:{r.prefix}", digests[r.prefix])
    except Exception:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def _dataset_name(result: EvalResult) -> str:
    return result.benchmark if result.mode == "mgpo" else f"{result.benchmark}-{result.mode}"


def logged_model_id(mv: ModelVersion) -> str | None:
    """The LoggedModel behind a version (MLflow 3): ``model_id``, which some stores leave empty, else the
    ``models:/m-...`` source the version was registered from; None for versions older than LoggedModels."""
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return model_id
    source = mv.source or ""
    tail = source.removeprefix("models:/")
    return tail if source.startswith("models:/m-") and "/" not in tail else None


def version_scores(client: MlflowClient, mv: ModelVersion) -> dict[str, tuple[float, str | None]]:
    """``metric -> (value, question-set digest)`` of a model version: its LoggedModel's latest metrics (MLflow 3),
    over the ``eval/...`` tags older versions carry; the digest is the metric's dataset digest, else the version's
    ``mgpo.question_set:<prefix>`` tag."""
    out: dict[str, tuple[float, str | None]] = {}

    def digest_tag(key: str) -> str | None:
        return mv.tags.get(f"mgpo.question_set:{key.rsplit('/', 1)[0]}")

    for k, v in mv.tags.items():
        if k.startswith("eval/") and k != "eval/run_id":
            try:
                out[k] = (float(v), digest_tag(k))
            except ValueError:
                continue
    model_id = logged_model_id(mv)
    if model_id:
        for m in sorted(client.get_logged_model(model_id).metrics or [], key=lambda m: (m.timestamp, m.step)):
            out[m.key] = (float(m.value), m.dataset_digest or digest_tag(m.key))
    return out


def model_version_eval_tags(
    name: str, version: str | int, tracking_uri: str | None = None
) -> dict[str, float]:
    """The ``eval/...`` scores attached to a model version by :func:`log_eval_results` (LoggedModel metrics, or
    the tags of older versions), as floats."""
    client = MlflowClient(tracking_uri=tracking_uri)
    return {k: v for k, (v, _) in version_scores(client, _model_version(client, name, version)).items()}
