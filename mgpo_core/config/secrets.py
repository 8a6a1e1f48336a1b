"""Redaction of secrets in what a run records about its config (MLflow parameters, ``config.yaml``, logs).

Two kinds of secret reach a config: values expanded from environment variables whose names look secret
(``${MLFLOW_DB_PASSWORD}``, ``${HF_TOKEN}``; ``loading.py`` calls ``remember_secret`` for each), and the user-info
part of a URI (``postgresql://user:password@db/mlflow``, ``http://user:token@mlflow:5000``). Both are replaced by
``***`` wherever the config is written for people to read; the config the training process itself loads keeps
them (a file written 0600, see ``training/launch.py``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|PWD|PRIVATE", re.IGNORECASE)
"""Environment variable names whose values are treated as secrets when a config expands them."""
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")

_SECRETS: set[str] = set()
"""Values expanded from secret-looking variables in this process (the longest are replaced first)."""


def looks_secret(name: str) -> bool:
    """Whether an environment variable name looks like it holds a secret (``DB_PASSWORD``, ``HF_TOKEN``...)."""
    return bool(SECRET_NAME.search(name))


def remember_secret(value: str) -> None:
    """Record ``value`` (expanded from a secret-looking variable) so that ``redact`` masks it from now on, in
    every log record of this process too (``install_log_redaction``)."""
    if len(value) >= 4:  # a 1-3 character "secret" would mask unrelated text everywhere
        _SECRETS.add(value)
        install_log_redaction()


_FACTORY_INSTALLED = False


def install_log_redaction() -> None:
    """Mask secrets in every Python log record of this process, whichever library logs it (Prefect, MLflow,
    ours): the record's message is formatted and redacted once, where it is created, so no handler, file or
    console sees the secret. Idempotent."""
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string stays the handler's problem, as without us
            return record
        masked = redact(text)
        if masked != text:
            record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(factory)
    _FACTORY_INSTALLED = True


HTTP_SCHEMES = ("http", "https")


def credentials_to_env(uri: str, environ: Any = None) -> str:
    """An HTTP(S) tracking URI without its user-info; the user and password move to ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` (which MLflow's client reads on every request, and child processes inherit).

    Everything downstream — MLflow's own "View run at" lines, links in Prefect artifacts, run manifests, cache
    keys — then sees a URI with nothing secret in it. The password is also remembered for ``redact``. Other
    schemes (``postgresql://user:pw@...``) cannot take credentials from the environment and are returned as they
    are (``redact`` masks their user-info wherever the project writes them).
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() not in HTTP_SCHEMES or "@" not in parts.netloc:
        return uri
    env = os.environ if environ is None else environ
    if parts.username is not None:
        env["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
        remember_secret(unquote(parts.password))
        remember_secret(parts.password)
    install_log_redaction()
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(text: str) -> str:
    """``text`` with every remembered secret and every URI user-info (``scheme://user:pw@``) masked."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact_tree(node: Any) -> Any:
    """A copy of a nested mapping/list with ``redact`` applied to every string."""
    if isinstance(node, Mapping):
        return {k: redact_tree(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v) for v in node]
    return redact(node) if isinstance(node, str) else node


def redacted_params(flat: Mapping[str, str]) -> dict[str, str]:
    """MLflow parameters (``flatten_config``'s output) with secrets masked."""
    return {k: redact(v) for k, v in flat.items()}
