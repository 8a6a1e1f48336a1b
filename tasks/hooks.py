"""What runs around every stage body that executes (a cached stage runs none of it): the stage's log output, one
line in the execution record, and the stage hooks selected by the environment.

Stage hooks are the seam through which tests (or an operator) act on a stage without code in its body:
``MGPO_STAGE_HOOKS=module:function[,module:function...]`` names callables ``hook(stage, params)`` that run, in
order, before the body with the stage name and its bound arguments (``preset``, ``overrides``, upstream
manifests). A hook that raises fails the stage exactly as an error in its body would; the pipeline's failure
tests inject their failure this way (``tests/stage_hooks.py``).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.console import stage_output

HOOKS_ENV = "MGPO_STAGE_HOOKS"
StageHook = Callable[[str, dict[str, Any]], None]


class StageHookError(ValueError):
    """``MGPO_STAGE_HOOKS`` names something that cannot be imported or called; the message says how to fix it."""


def selected_hooks(spec: str | None = None) -> list[StageHook]:
    """The hooks ``MGPO_STAGE_HOOKS`` (or ``spec``) names, imported; [] when it is unset or empty."""
    spec = os.environ.get(HOOKS_ENV, "") if spec is None else spec
    hooks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        module, _, name = item.partition(":")
        if not module or not name:
            raise StageHookError(f"{HOOKS_ENV}: {item!r} is not 'module:function' (e.g. 'my_hooks:fail_stage')")
        try:
            hook = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise StageHookError(
                f"{HOOKS_ENV}: cannot load {item!r} ({e}); put the module on PYTHONPATH or unset {HOOKS_ENV}"
            ) from e
        if not callable(hook):
            raise StageHookError(f"{HOOKS_ENV}: {item!r} is not callable")
        hooks.append(hook)
    return hooks


def record_execution(state_dir: str | Path, stage: str, **info: Any) -> None:
    """Append one line per executed (not cached) stage body to ``<state_dir>/pipeline/executions.jsonl``."""
    path = Path(state_dir) / "pipeline" / "executions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "time": dt.datetime.now(dt.UTC).isoformat(), "pid": os.getpid(), **info}
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def stage_body(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a stage task's body (under ``@task``): output to the stage's log under ``mgpo run``, the
    execution record (with the model version when the stage works on a registration), then the stage hooks."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            with stage_output(name):
                from mgpo_core.config import load_config

                cfg = load_config(params["preset"], params["overrides"])
                info = {"version": params["registration"]["version"]} if "registration" in params else {}
                record_execution(cfg.state_dir, name, **info)
                for hook in selected_hooks():
                    hook(name, params)
                return fn(*args, **kwargs)

        return wrapper

    return deco
