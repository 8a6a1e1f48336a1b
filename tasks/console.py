"""A clean console for ``mgpo run``: stage progress and the summary on the terminal, everything else in log files.

While the pipeline runs, the process's stdout and stderr (file descriptors 1 and 2, so C-level notices of
torch/vLLM, progress bars and Python warnings too) are redirected to the log file of the stage that is running,
``<state>/logs/<run stamp>/<stage>.log`` (``pipeline.log`` between stages). Only lines meant for the user reach
the terminal: ``progress(...)`` from the stage tasks, and Prefect's "finished in state" line of each stage. A
failed stage ends with one paragraph (which stage, what went wrong, where the log is, how to rerun); its
traceback is in the log.

Outside ``mgpo run`` (a worker, a served deployment, tests calling the flow) nothing is redirected and
``progress`` is an ordinary log line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_ACTIVE: Console | None = None
_STATE_LINE = re.compile(r"Finished in state (\w+)")


class Console:
    def __init__(self, state_dir: str | Path) -> None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = Path(state_dir).resolve() / "logs" / stamp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.term: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self._saved = (os.dup(1), os.dup(2))
        self.current: str | None = None
        self.failed_stage: str | None = None
        self.failed_log: Path | None = None
        self._file: TextIO | None = None
        self._point("pipeline")

    # -- where fd 1/2 go ---------------------------------------------------------------------------------------
    def log_path(self, stage: str) -> Path:
        return self.dir / f"{stage}.log"

    def _point(self, stage: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        f = open(self.log_path(stage), "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        if self._file is not None:
            self._file.close()
        self._file = f

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        previous = self.current
        self.current = name
        self._point(name)
        try:
            yield
            if self.failed_stage == name:  # a retry of it succeeded
                self.failed_stage = self.failed_log = None
        except BaseException:
            if self.failed_stage is None:
                self.failed_stage, self.failed_log = name, self.log_path(name)
                traceback.print_exc()  # into the stage's log
            raise
        finally:
            self.current = previous
            self._point(previous or "pipeline")

    def say(self, text: str) -> None:
        from mgpo_core.config.secrets import redact

        # A path or message may carry a secret (docs/SECURITY.md).
        self.term.write(redact(text) + "\n")
        self.term.flush()

    def close(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if self._file is not None:
            self._file.close()
        self.term.close()


class _StageStates(logging.Handler):
    """Prefect's task-run lines "Finished in state Completed()/Cached()/Failed()" become one console line."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        m = _STATE_LINE.search(record.getMessage())
        # The task's name is the stage ("evaluate"); its run name is for the UI ("evaluate v3").
        name = getattr(record, "task_name", None) or (getattr(record, "task_run_name", None) or "").rsplit("-", 1)[0]
        if not m or not name or name == "<unknown>":
            return
        stage = name
        if stage == "pipeline-run":
            return
        word = {"Completed": "done", "Cached": "from cache", "Failed": "FAILED"}.get(m.group(1), m.group(1))
        self.console.say(f"  {stage:<9} {word}")


_HANDLER: _StageStates | None = None


def attach() -> None:
    """(Re)attach the stage-state line handler: Prefect re-applies its logging config when its API starts."""
    logger = logging.getLogger("prefect.task_runs")
    if _HANDLER is not None and _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)


@contextlib.contextmanager
def clean_console(state_dir: str | Path) -> Iterator[Console]:
    """Redirect all output to the run's log files for the duration; ``console.say`` still reaches the terminal."""
    global _ACTIVE, _HANDLER
    console = Console(state_dir)
    _HANDLER = _StageStates(console)
    logging.captureWarnings(True)
    _ACTIVE = console
    attach()
    try:
        yield console
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(_HANDLER)
        _ACTIVE, _HANDLER = None, None
        console.close()


@contextlib.contextmanager
def stage_output(stage: str) -> Iterator[None]:
    """Inside a stage task: its output goes to its own log file when ``mgpo run`` owns the console."""
    if _ACTIVE is None:
        yield
        return
    attach()
    with _ACTIVE.stage(stage):
        yield


def progress(text: str) -> None:
    """A line for the user: on the terminal under ``mgpo run`` (and in the log); elsewhere a log line."""
    if _ACTIVE is not None:
        _ACTIVE.say(f"  {text}")
    try:
        from prefect.logging import get_run_logger

        get_run_logger().info(text)
    except Exception:  # noqa: BLE001
        logging.getLogger("mgpo").info(text)


def notice(text: str) -> None:
    """Like :func:`progress`, at warning level (e.g. a cached result found stale)."""
    if _ACTIVE is not None:
        _ACTIVE.say(f"  note      {text}")
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(text)
    except Exception:  # noqa: BLE001
        logging.getLogger("mgpo").warning(text)


def _cause_line(log_tail: str) -> str:
    """The last ``SomeError: message`` line of a child process's log (rank prefixes dropped), or ""."""
    for line in reversed(log_tail.splitlines()):
        text = re.sub(r"^\[rank\d+\]:\s*", "", line).strip()
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", text):
            return text if len(text) <= 300 else text[:300] + "…"
    return ""


def failure_paragraph(console: Console, exc: BaseException, rerun: str) -> str:
    """Which stage, what went wrong (one line), where the log is, how to rerun."""
    stage = console.failed_stage or "pipeline"
    log = console.failed_log or console.log_path("pipeline")
    first = (str(exc).strip().splitlines() or [""])[0].removesuffix(" Last log lines:")
    if len(first) > 300:
        first = first[:300] + "…"
    cause = _cause_line(getattr(exc, "log_tail", ""))
    return (
        f"\n✗ MGPO pipeline failed in stage '{stage}': {type(exc).__name__}: {first}\n"
        + (f"  cause: {cause}\n" if cause else "")
        + f"  full log and traceback: {log}\n"
        + f"  rerun: {rerun}  (finished stages come from the cache; add --refresh to run every stage again)"
    )


def park_output(log: Path) -> None:
    """After the summary: what libraries print at exit (Prefect stopping its temporary server) goes to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    f = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open until the process exits
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
