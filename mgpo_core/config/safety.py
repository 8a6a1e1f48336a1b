"""Character-set checks for the config values that reach a path join or a command line (docs/SECURITY.md).

A config can arrive from people who are not the operator (Prefect flow parameters, ``--set`` in a script, a
YAML from elsewhere), and some of its values end up where a shell or the file system interprets them: the
run name and the state folder become the run directory, which DeepSpeed's multi-node runner puts on the pdsh
command line that every host's login shell reads; benchmark names become folder names; ``master_addr`` is
pasted into that same remote command. Each is checked here at config time against an allow-list, so ``;``,
``$(...)``, backticks, quotes or a ``../`` never reach them; the error names the field and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mgpo_core.config.errors import _FieldProblem

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A single path component: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit (so never
``.``, ``..`` or an option such as ``-x``)."""
NAME_FIX = "use letters, digits, '.', '_' and '-' only, starting with a letter or digit (e.g. nightly-2025-01)"

PATH_PATTERN = re.compile(r"[\w ./~@%+=:,-]+")
"""A path: word characters (any script), space and ``./~@%+=:,-``; no shell metacharacters (``;&|$`'"\\<>(){}*?!#``),
no control characters or newlines."""
PATH_FIX = "use a path made of letters, digits, spaces and ./~@%+=:,_- only (no shell characters such as ; $ ` ' \")"

HOST_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,253}")
"""A host name or an IPv4/IPv6 address (no leading ``-``: it would read as an option)."""
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
"""An MLflow run id (32 hex digits for MLflow's own stores)."""

_CHARS = {
    NAME_PATTERN: re.compile(r"[A-Za-z0-9._-]"),
    PATH_PATTERN: re.compile(r"[\w ./~@%+=:,-]"),
    HOST_PATTERN: re.compile(r"[A-Za-z0-9.:-]"),
    RUN_ID_PATTERN: re.compile(r"[A-Za-z0-9-]"),
}
"""The single characters each pattern allows (to name the offending ones in the error)."""

PATH_FIELDS = (
    "state_dir",
    "model.path",
    "data.train_path",
    "data.eval_path",
    "data.root",
    "data.image_root",
    "data.image_cache_dir",
    "deepspeed.hostfile",
    "deepspeed.config_file",
)
"""Values that are paths by design: any folder the operator names is allowed, but only written plainly."""


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _values(cfg: Any) -> Iterator[tuple[str, Any, re.Pattern[str], str]]:
    """(field path, value, pattern, fix) for every checked value of ``cfg`` that is set."""
    yield "run_name", cfg.run_name, NAME_PATTERN, NAME_FIX + "; the run name becomes a folder name"
    for dotted in PATH_FIELDS:
        yield dotted, _get(cfg, dotted), PATH_PATTERN, PATH_FIX
    ev = cfg.evaluation
    for i, name in enumerate(ev.benchmarks):
        yield f"evaluation.benchmarks.{i}", name, NAME_PATTERN, NAME_FIX
    for section in ("data_paths", "image_roots"):
        for key, value in getattr(ev, section).items():
            yield f"evaluation.{section}", key, NAME_PATTERN, NAME_FIX + " for the benchmark name"
            yield f"evaluation.{section}.{key}", value, PATH_PATTERN, PATH_FIX
    yield "deepspeed.master_addr", cfg.deepspeed.master_addr, HOST_PATTERN, (
        "give a host name or an IP address (letters, digits, '.', ':' and '-', not starting with '-')"
    )
    yield "tracking.run_id", cfg.tracking.run_id, RUN_ID_PATTERN, (
        "give the MLflow run id (hex digits, as `mlflow runs list` prints it) or null"
    )


def check_safe_values(cfg: Any) -> None:
    """Raise ``_FieldProblem`` (naming the field and the fix) for the first value outside its character set."""
    for field, value, pattern, fix in _values(cfg):
        if value is None:
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value):
            allowed = _CHARS[pattern]
            bad = "".join(sorted({c for c in str(value) if not allowed.fullmatch(c)}))
            what = (f"holds characters a shell or a path join would interpret ({bad!r})" if bad
                    else "must start with a letter or digit (and stay within the length limit)")
            raise _FieldProblem(what, value, fix, field)
