"""A cheap flow for testing schedules, deployments and workers: one task appends a marker line naming its run.

The marker file is the ``marker`` parameter, else ``$MGPO_SMOKE_MARKER``, else ``mgpo-smoke-marker.jsonl`` in
the temp folder. Each line is ``{"flow_run_id", "deployment_id", "message"}``, so a test can tell which run wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

MARKER_ENV = "MGPO_SMOKE_MARKER"


@task(name="write-marker", cache_policy=NO_CACHE)
def write_marker(path: str, message: str) -> str:
    """Append one JSON line for the current flow run to ``path``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "flow_run_id": flow_run.get_id(),
        "deployment_id": deployment.id,
        "message": message,
    }
    with target.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return str(target)


@flow(name="mgpo-smoke", log_prints=True)
def smoke(message: str = "hi", marker: str | None = None) -> str:
    """Write the marker line and return the marker path."""
    path = (
        marker or os.environ.get(MARKER_ENV) or str(Path(tempfile.gettempdir()) / "mgpo-smoke-marker.jsonl")
    )
    written = write_marker(path, message)
    print(f"smoke: wrote {message!r} to {written}")
    return written
