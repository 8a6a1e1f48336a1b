"""The seam around every executed stage body (``tasks.hooks.stage_body``): the execution record and the stage
hooks ``MGPO_STAGE_HOOKS`` selects, which run before the body and fail the stage when they raise."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tasks.hooks import HOOKS_ENV, StageHookError, selected_hooks, stage_body

CALLS: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def hook_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``probe_hooks`` with a recording hook and a failing one."""
    mod = types.ModuleType("probe_hooks")

    def record(stage: str, params: dict[str, Any]) -> None:
        CALLS.append((stage, params))

    def fail(stage: str, params: dict[str, Any]) -> None:
        raise RuntimeError(f"stop {stage}")

    mod.record, mod.fail, mod.not_callable = record, fail, 3
    monkeypatch.setitem(sys.modules, "probe_hooks", mod)
    CALLS.clear()
    return "probe_hooks"


def _body(state: Path, ran: list[str]):  # noqa: ANN202
    @stage_body("evaluate")
    def evaluate(preset: str, overrides: list[str], registration: dict, limit: int = 4) -> str:
        ran.append("evaluate")
        return "done"

    return lambda: evaluate("tiny-cpu", [f"state_dir={state}"], {"version": "7"})


def test_executed_body_is_recorded_and_hooks_see_its_arguments(tmp_path, monkeypatch, hook_module) -> None:
    monkeypatch.setenv(HOOKS_ENV, f"{hook_module}:record")
    ran: list[str] = []
    assert _body(tmp_path, ran)() == "done" and ran == ["evaluate"]
    (stage, params), = CALLS
    assert stage == "evaluate" and params["limit"] == 4 and params["registration"] == {"version": "7"}
    record = json.loads((tmp_path / "pipeline" / "executions.jsonl").read_text())
    assert record["stage"] == "evaluate" and record["version"] == "7"


def test_a_raising_hook_fails_the_stage_before_its_body_runs(tmp_path, monkeypatch, hook_module) -> None:
    monkeypatch.setenv(HOOKS_ENV, f"{hook_module}:record, {hook_module}:fail")
    ran: list[str] = []
    with pytest.raises(RuntimeError, match="stop evaluate"):
        _body(tmp_path, ran)()
    assert ran == [] and [s for s, _ in CALLS] == ["evaluate"]


def test_without_hooks_the_body_just_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(HOOKS_ENV, raising=False)
    assert selected_hooks() == []
    ran: list[str] = []
    assert _body(tmp_path, ran)() == "done" and ran == ["evaluate"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("probe_hooks", "is not 'module:function'"),
        ("no_such_module_xyz:fail", "cannot load"),
        ("probe_hooks:missing", "cannot load"),
        ("probe_hooks:not_callable", "is not callable"),
    ],
)
def test_a_bad_hook_spec_says_what_to_fix(spec, message, hook_module) -> None:
    with pytest.raises(StageHookError, match=message):
        selected_hooks(spec)
