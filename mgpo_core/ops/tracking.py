"""MLflow metrics that are never lost: delivered when the tracking server answers, buffered on disk when it does not.

Every metric goes through ``MetricsSink.log``: it is appended to a local JSONL journal first (the run directory's
``metrics.jsonl``, the durable record) and then delivered to MLflow together with anything still pending. If the
server is unreachable, training goes on, one warning is shown, and the pending records are delivered on a later
call or by ``replay_pending`` after the run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str | None, state_dir: str | Path) -> str:
    """``None`` → a local SQLite store under the state directory (the embedded default). An HTTP(S) URI's
    user-info moves to MLflow's credential variables (``config/secrets.py: credentials_to_env``), so no caller
    holds, prints or records a URI with a password in it."""
    if uri:
        from mgpo_core.config.secrets import credentials_to_env

        return credentials_to_env(uri)
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


def tracking_uri_for(cfg: Any) -> str:
    """The tracking store a config names: ``tracking.mlflow_tracking_uri``, else ``<state_dir>/mlflow.db``."""
    return resolve_tracking_uri(cfg.tracking.mlflow_tracking_uri, cfg.state_dir)


def artifact_root(state_dir: str | Path, uri: str | None = None) -> str | None:
    """Artifact location of a new experiment: a local folder for local stores; for an HTTP tracking server,
    None (the server's own artifact store, e.g. object storage)."""
    if uri and uri.startswith(("http://", "https://")):
        return None
    return (Path(state_dir).resolve() / "mlartifacts").as_uri()


def server_reachable(uri: str, timeout: float = 2.0) -> bool:
    """HTTP stores: does ``/health`` answer quickly? Local stores (sqlite, file) are always reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310
            return r.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not now"
        return False


def ensure_run(
    uri: str, experiment: str, run_name: str, state_dir: str | Path, run_id: str | None = None
) -> str | None:
    """Reattach to ``run_id`` or create a run; ``None`` when the server cannot be reached (metrics stay local)."""
    if not server_reachable(uri):
        return run_id
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run_id:
        client.get_run(run_id)  # fails loudly on a wrong id
        return run_id
    exp_id = ensure_experiment(client, experiment, artifact_root(state_dir, uri))
    del mlflow
    return client.create_run(exp_id, run_name=run_name, tags=source_tags("mgpo train")).info.run_id


class MetricsSink:
    """Log metrics to MLflow run ``run_id`` at ``uri`` with a local journal and a pending queue."""

    def __init__(
        self, uri: str, run_id: str | None, run_dir: str | Path, *, enabled: bool = True, system_metrics: bool = True
    ) -> None:
        self.uri, self.run_id, self.enabled = uri, run_id, enabled
        self.run_dir = Path(run_dir)
        self.journal = self.run_dir / "metrics.jsonl"
        self.pending_path = self.run_dir / "metrics-pending.jsonl"
        self._warned = False
        self._client = None
        self._delivered = self._delivered_steps()
        # Limit MLflow's own HTTP retries: an unreachable server must not stall a training step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # CPU, memory, disk, network (and GPU) of this node beside the training metrics, sampled in the background.
        self.system_monitor = start_system_metrics(uri, run_id, node_id=system_metrics_node()) if enabled and system_metrics else None

    def _pending(self) -> list[dict[str, Any]]:
        if not self.pending_path.exists():
            return []
        out = []
        for line in self.pending_path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a crash: the journal still has it
                    continue
        return out

    def _delivered_steps(self) -> set[int]:
        """Steps of this MLflow run already delivered by an earlier process (journaled and not pending).

        A run resumed from a checkpoint older than its last logged step trains those steps again (with the same
        values: resume is exact); they are journaled again but not sent twice, so MLflow has one point a step.
        """
        if not self.journal.exists():
            return set()
        pending = {r.get("step") for r in self._pending()}
        done: set[int] = set()
        for line in self.journal.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("run_id", self.run_id) == self.run_id and rec.get("step") not in pending:
                done.add(int(rec["step"]))
        return done

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        rec = {
            "step": step,
            "ts": int(time.time() * 1000),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "run_id": self.run_id,
        }
        redone = step in self._delivered
        if redone:
            rec["redone"] = True  # trained again after a resume; MLflow already has this step
        line = json.dumps(rec) + "\n"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a") as f:
            f.write(line)
        if redone:
            log.info("step %d was already delivered to MLflow run %s before the resume: not sent again", step,
                     self.run_id)
            return
        with self.pending_path.open("a") as f:
            f.write(line)
        self.flush()

    def flush(self) -> bool:
        """Deliver everything pending; True when nothing is left pending."""
        pending = self._pending()
        if not pending:
            return True
        if self.run_id is None or not server_reachable(self.uri):
            self._warn("the MLflow tracking server is unreachable")
            return False
        try:
            deliver(self.uri, self.run_id, pending)
        except Exception as e:  # noqa: BLE001 - keep training; the records stay pending
            self._warn(f"delivering metrics to MLflow failed ({type(e).__name__}: {e})")
            return False
        self.pending_path.unlink(missing_ok=True)
        return True

    def _warn(self, why: str) -> None:
        if not self._warned:
            warnings.warn(
                f"{why}; training continues and metrics are kept in {self.pending_path} for later delivery "
                f"(`mgpo replay-metrics --run-dir {self.run_dir} --tracking-uri URI --run-id ID`)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True


OVERVIEW = {
    "reward/mean": "0_overview/reward",
    "rollout/valid_box_ratio": "0_overview/valid_box_ratio",
    "rollout/box_contains_target": "0_overview/crop_holds_target",
    "val/accuracy": "0_overview/val_accuracy",
}
"""The metrics a user looks at first, copied into a section the run page shows first. MLflow 3's UI groups a run's
charts into sections named by the key up to its last ``/``, sorts the sections by name (the unprefixed and
``system/`` sections last) and the charts in a section by key: so ``actor/...`` came first, and a ``0_`` prefix
(digits sort before letters) puts these four above it. The original keys stay where they were."""


def deliver(uri: str, run_id: str, records: list[dict[str, Any]], batch: int = 900) -> None:
    """Send journal records to an MLflow run (MLflow accepts at most 1000 metrics per batch call), with the
    :data:`OVERVIEW` copies."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    metrics = [Metric(k, v, r["ts"], r["step"]) for r in records for k, v in r["metrics"].items()]
    metrics += [Metric(OVERVIEW[k], v, r["ts"], r["step"]) for r in records for k, v in r["metrics"].items()
                if k in OVERVIEW]
    for i in range(0, len(metrics), batch):
        client.log_batch(run_id, metrics=metrics[i : i + batch], synchronous=True)


def replay_pending(run_dir: str | Path, uri: str, run_id: str) -> int:
    """Deliver a run directory's pending metrics to ``run_id``; returns how many records were sent."""
    sink = MetricsSink(uri, run_id, run_dir, system_metrics=False)
    n = len(sink._pending())
    if not sink.flush():
        raise RuntimeError(
            f"could not deliver {n} pending metric records to {uri}; they are kept in {sink.pending_path}"
        )
    return n


# -- what MLflow 3's UI reads: the experiment's kind, the runs' source, their dataset inputs, system metrics ---------

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment kind that opens MLflow 3's UI on model training (runs, charts, models), not the GenAI view."""


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` (created with ``artifact_location`` if missing), tagged as model training.

    The tag is also added to an experiment an older version created without it, so existing stores open in the
    right view too.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=artifact_location,
                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def source_tags(name: str) -> dict[str, str]:
    """MLflow's standard source tags for a run this project starts: the code's git commit (when it runs from a
    checkout), the source name (``mgpo <stage>``) and type ``JOB``, as the UI's run header shows them."""
    tags = {"mlflow.source.name": name, "mlflow.source.type": "JOB"}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_dataset_input(
    uri: str, run_id: str, *, name: str, digest: str, source: str, context: str, profile: dict | None = None
) -> None:
    """Record a dataset as an ``mlflow.data`` input of ``run_id`` (the run page's Datasets column): ``digest`` is
    the project's content hash of it, ``source`` where it lives, ``context`` its role (``train``, ``eval``, ...)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    ds = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=str(digest)[:36])
    entity = ds._to_mlflow_entity()
    if profile:
        entity = type(entity)(entity.name, entity.digest, entity.source_type, entity.source, entity.schema,
                              json.dumps(profile))
    MlflowClient(uri).log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", context)])])


def start_system_metrics(uri: str, run_id: str | None, node_id: str | None = None) -> Any | None:
    """MLflow's system-metrics monitor (CPU, memory, disk, network, GPU when present) on ``run_id``, sampling in a
    background thread, ``system/...`` metrics under ``node_id``; None when it cannot run (no psutil, no run, an
    unreachable server). Stop it with ``.finish()``."""
    if run_id is None or os.environ.get("MGPO_SYSTEM_METRICS", "1") == "0" or not server_reachable(uri):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=uri, resume_logging=True)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - a monitor must never cost the run
        log.warning("system metrics are not logged (%s: %s)", type(exc).__name__, exc)
        return None
    import atexit

    atexit.register(_finish_quietly, monitor)  # log the last samples when the process ends
    return monitor


def _finish_quietly(monitor: Any) -> None:
    """Stop the monitor and log one closing sample (with whatever the loop had collected but not yet logged):
    MLflow's ``finish`` drops an unlogged sample, so a process shorter than the sampling interval (10 s), such as
    one rank of a short run, would otherwise leave no system metrics of its node at all."""
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # noqa: BLE001 - at exit, nothing left to tell
        pass


def node_position(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(this node's rank, number of nodes) from the launcher's variables: DeepSpeed's ``CROSS_RANK``/``CROSS_SIZE``,
    torchrun's ``GROUP_RANK``/``GROUP_WORLD_SIZE``, else ``RANK // LOCAL_SIZE`` (``LOCAL_WORLD_SIZE``); (0, 1) for
    one plain process."""
    env = os.environ if env is None else env

    def first(*names: str) -> int | None:
        for n in names:
            if env.get(n, "").strip().isdigit():
                return int(env[n])
        return None

    node, nodes = first("CROSS_RANK", "GROUP_RANK"), first("CROSS_SIZE", "GROUP_WORLD_SIZE")
    local_size, rank, world = first("LOCAL_SIZE", "LOCAL_WORLD_SIZE"), first("RANK"), first("WORLD_SIZE")
    if local_size:
        node = node if node is not None else (rank or 0) // local_size
        nodes = nodes if nodes is not None else max(1, (world or local_size) // local_size)
    return node or 0, nodes or 1


def system_metrics_node(env: Mapping[str, str] | None = None, host: str | None = None) -> str | None:
    """The node id under which this process logs system metrics (``system/<node id>/...``), or None when it must
    not start a monitor: one process per node does, its local rank 0. On one node the id is the host name; on
    several it is ``node<k>-<host>`` (k: the node's rank), so that nodes sharing a host name stay apart and the
    run page lists them in node order."""
    env = os.environ if env is None else env
    if int(env.get("LOCAL_RANK", "0") or 0) != 0:
        return None
    if host is None:
        import socket

        host = socket.gethostname()
    node, nodes = node_position(env)
    return host if nodes <= 1 else f"node{node}-{host}"


def start_node_system_metrics(uri: str, run_id: str | None) -> Any | None:
    """On a node other than global rank 0's: its local rank 0 samples the node into the same training run (rank 0's
    node has the sink's monitor). A SQLite store that is not on this node's disk (no shared file system) is left
    alone rather than created empty here."""
    node = system_metrics_node()
    if node is None or run_id is None:
        return None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        log.info("system metrics of node %s are not logged: the tracking store %s is not on this node", node, uri)
        return None
    monitor = start_system_metrics(uri, run_id, node_id=node)
    print(  # noqa: T201 - the node's line in the training log
        f"mgpo: system metrics of node {node}: {'system/' + node + '/... in the training run' if monitor else 'off'}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    return monitor

