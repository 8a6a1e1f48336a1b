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
import time
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str | None, state_dir: str | Path) -> str:
    """``None`` → a local SQLite store under the state directory (the embedded default)."""
    if uri:
        return uri
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
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(experiment, artifact_location=artifact_root(state_dir, uri))
    )
    del mlflow
    return client.create_run(exp_id, run_name=run_name).info.run_id


class MetricsSink:
    """Log metrics to MLflow run ``run_id`` at ``uri`` with a local journal and a pending queue."""

    def __init__(self, uri: str, run_id: str | None, run_dir: str | Path, *, enabled: bool = True) -> None:
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


def deliver(uri: str, run_id: str, records: list[dict[str, Any]], batch: int = 900) -> None:
    """Send journal records to an MLflow run (MLflow accepts at most 1000 metrics per batch call)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    metrics = [Metric(k, v, r["ts"], r["step"]) for r in records for k, v in r["metrics"].items()]
    for i in range(0, len(metrics), batch):
        client.log_batch(run_id, metrics=metrics[i : i + batch], synchronous=True)


def replay_pending(run_dir: str | Path, uri: str, run_id: str) -> int:
    """Deliver a run directory's pending metrics to ``run_id``; returns how many records were sent."""
    sink = MetricsSink(uri, run_id, run_dir)
    n = len(sink._pending())
    if not sink.flush():
        raise RuntimeError(
            f"could not deliver {n} pending metric records to {uri}; they are kept in {sink.pending_path}"
        )
    return n
