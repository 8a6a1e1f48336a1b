"""Which failures a retry can fix, and the retry condition every stage task uses.

A retry helps only when the cause is outside the inputs: a connection that failed, a timeout, a server answering
HTTP 5xx or 429, a training process that was killed (OOM killer, preemption) or stalled. It never helps a missing
model version, a validation or configuration error, or bad data: those fail at once, with their own message.
Unknown errors are not retried either (a retry of a bug only doubles the time to the report).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# Server-side answers that say "try again later".
RETRIABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# MLflow error codes of the same meaning (their HTTP status in mlflow.exceptions.ERROR_CODE_TO_HTTP_STATUS).
RETRIABLE_MLFLOW_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
)
# Exception class names (anywhere in the cause chain) that mean a transport failure, without importing the
# libraries that define them (requests, urllib3, httpx, sqlalchemy).
_TRANSPORT_NAMES = frozenset(
    {
        "ConnectionError",  # requests.exceptions / builtins
        "ConnectTimeout",
        "ReadTimeout",
        "Timeout",
        "NewConnectionError",
        "MaxRetryError",
        "ProtocolError",
        "RemoteDisconnected",
        "ConnectError",  # httpx
        "ReadError",
        "WriteError",
        "PoolTimeout",
        "TimeoutException",
        "RemoteProtocolError",
    }
)
# Words in a training log tail that mean a rank was killed from outside (torchrun / deepspeed launcher reports).
_KILLED = re.compile(r"Signal 9 \(SIGKILL\)|Signal 15 \(SIGTERM\)|exitcode\s*:\s*-(9|15)\b|return code = -(9|15)\b")
_HTTP_CODE_IN_TEXT = re.compile(r"(?:error code|status code|HTTP)\s*(\d{3})\b")


@dataclass(frozen=True)
class Verdict:
    retry: bool
    reason: str


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _http_status(exc: BaseException) -> int | None:
    for attr in ("status_code", "code", "status"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    response = getattr(exc, "response", None)
    v = getattr(response, "status_code", None)
    return v if isinstance(v, int) else None


def _one(exc: BaseException) -> Verdict | None:
    """The verdict this exception alone gives, or None when it says nothing either way."""
    name = type(exc).__name__
    if name in ("TrainingStalled",):
        return Verdict(True, "training made no progress for the configured stall timeout")
    if name == "TrainingFailed":
        rc = getattr(exc, "returncode", 0)
        if isinstance(rc, int) and (rc < 0 or rc in (137, 143)):
            return Verdict(True, f"the training process was killed (exit code {rc})")
        if _KILLED.search(getattr(exc, "log_tail", "") or ""):
            return Verdict(True, "a training rank was killed by a signal")
        return Verdict(False, f"training failed with exit code {rc} (an error in the run, not in the machine)")
    if name in ("ConfigError", "ModelPathError", "DataInputError", "StaleCacheError"):
        return Verdict(False, f"{name}: the configuration or the input must change first")
    if isinstance(exc, FileNotFoundError | NotADirectoryError | PermissionError | IsADirectoryError):
        return Verdict(False, f"{name}: a file is missing or unreadable")
    if isinstance(exc, ValueError | TypeError | KeyError | AttributeError | AssertionError):
        if not _is_mlflow(exc):  # MlflowException is not a ValueError, but be explicit
            return Verdict(False, f"{name}: a validation or programming error")
    if _is_mlflow(exc):
        code = str(getattr(exc, "error_code", "") or "")
        if code in RETRIABLE_MLFLOW_CODES:
            return Verdict(True, f"MLflow answered {code}")
        if type(exc).__name__ == "RestException":  # a real answer of the server
            status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
            if status in RETRIABLE_HTTP:
                return Verdict(True, f"MLflow server answered HTTP {status}")
            return Verdict(False, f"MLflow answered {code or status}: {str(exc)[:160]}")
        m = _HTTP_CODE_IN_TEXT.search(str(exc))
        if m and int(m.group(1)) in RETRIABLE_HTTP:
            return Verdict(True, f"MLflow server answered HTTP {m.group(1)}")
        if "failed with timeout exception" in str(exc):
            return Verdict(True, "MLflow request timed out")
        if code and code != "INTERNAL_ERROR":
            return Verdict(False, f"MLflow error {code}: {str(exc)[:160]}")
        return None  # INTERNAL_ERROR is MLflow's default code: look at the cause
    status = _http_status(exc)
    if status is not None and name in ("HTTPError", "HTTPStatusError", "PrefectHTTPStatusError"):
        return Verdict(status in RETRIABLE_HTTP, f"HTTP {status}")
    if isinstance(exc, ConnectionError | TimeoutError) or name in _TRANSPORT_NAMES:
        return Verdict(True, f"{name}: connection failure or timeout")
    if name == "URLError":
        return Verdict(True, f"URLError: {getattr(exc, 'reason', exc)}")
    if name == "OperationalError" and "database is locked" in str(exc):
        return Verdict(True, "the SQLite store was locked by another writer")
    return None


def _is_mlflow(exc: BaseException) -> bool:
    return any(c.__name__ == "MlflowException" for c in type(exc).__mro__)


def classify(exc: BaseException) -> Verdict:
    """Retry or not, and why. The outermost exception that says something decides; causes are looked at when
    the outer one is generic (e.g. MLflow's ``MlflowException`` wrapping a ``requests`` connection error)."""
    for e in _chain(exc):
        v = _one(e)
        if v is not None:
            return v
    return Verdict(False, f"{type(exc).__name__} is not a known transient failure")


def is_transient(exc: BaseException) -> bool:
    return classify(exc).retry


def retry_if_transient(task, task_run, state) -> bool:  # noqa: ANN001
    """Prefect ``retry_condition_fn``: retry only failures a retry can fix (see :func:`classify`)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001
        exc = e
    if not isinstance(exc, BaseException):
        return False
    verdict = classify(exc)
    try:
        from prefect.logging import get_run_logger

        get_run_logger().info(
            "%s: %s - %s", task.name, "will retry" if verdict.retry else "not retried", verdict.reason
        )
    except Exception:  # noqa: BLE001 - logging must not decide the retry
        pass
    return verdict.retry
