"""Each stage's cache key covers the code that stage runs (``tasks.stage_code``), not every file; and two overlapping
runs with the same key execute a stage once (``tasks.locks``).

The digest tests edit a copy of the sources (the real modules, the real stage functions) and compare the digests
of every stage task before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import stages
from tasks.stage_code import SOURCE_ROOT, stage_code_digest, stage_modules

STAGES = {
    "pipeline-run": stages.pipeline_run_task,
    "filter": stages.filter_task,
    "train": stages.train_task,
    "select (selection on)": stages.select_task,
    "select (selection off)": stages._keep_last,
    "register": stages.register_task,
    "evaluate": stages.evaluate_task,
    "baseline": stages.baseline_task,
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's Python sources to edit."""

    def not_source(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or (not n.endswith(".py") and not Path(folder, n).is_dir())]

    for pkg in ("mgpo_core", "tasks", "flows"):
        shutil.copytree(SOURCE_ROOT / pkg, tmp_path / pkg, ignore=not_source)
    return tmp_path


def digests(root: Path) -> dict[str, str]:
    stage_code_digest.cache_clear()
    return {name: stage_code_digest(fn, root) for name, fn in STAGES.items()}


def changed_after(root: Path, edit) -> set[str]:  # noqa: ANN001
    before = digests(root)
    edit()
    after = digests(root)
    return {name for name in STAGES if before[name] != after[name]}


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_copy_digests_like_the_checkout(tree: Path) -> None:
    assert digests(tree) == digests(SOURCE_ROOT), "the digest names modules by name, not by where they are"


def test_an_evaluation_only_change_leaves_filter_train_and_register_alone(tree: Path) -> None:
    changed = changed_after(tree, lambda: append(tree / "mgpo_core/evaluation/runner.py", "\nFLAG = 1\n"))
    assert changed == {"evaluate", "baseline", "select (selection on)"}, changed


def test_a_training_change_leaves_evaluation_alone(tree: Path) -> None:
    changed = changed_after(tree, lambda: append(tree / "mgpo_core/training/update.py", "\nFLAG = 1\n"))
    assert changed == {"train"}, changed


def test_the_trainer_started_by_module_name_counts_for_training(tree: Path) -> None:
    """``python -m mgpo_core.training.entry`` is named in a string: the closure follows it."""
    assert "mgpo_core.training.entry" in stage_modules(stages.train_task)
    changed = changed_after(tree, lambda: append(tree / "mgpo_core/training/entry.py", "\nFLAG = 1\n"))
    assert changed == {"train"}, changed


def test_imports_for_annotations_only_do_not_count() -> None:
    import ast

    from tasks.stage_code import imported_names

    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mgpo_core.evaluation import runner\n" \
          "else:\n    import mgpo_core.reward\nimport mgpo_core.grounding\n"  # fmt: skip
    assert imported_names(ast.parse(src), "mgpo_core.x") == {"mgpo_core.reward", "mgpo_core.grounding"}


def test_editing_one_stage_body_changes_that_stage_only(tree: Path) -> None:
    path = tree / "tasks/stages.py"
    src = path.read_text()
    old = '    name = f"{registration[\'model_name\']}-v{registration[\'version\']}"\n'
    assert src.count(old) == 1, "evaluate_task changed shape: update this test's edit"
    edit = lambda: path.write_text(src.replace(old, old + "    name = name + ''\n"))  # noqa: E731
    assert changed_after(tree, edit) == {"evaluate"}


def test_comments_and_line_numbers_in_the_stage_module_do_not_count(tree: Path) -> None:
    path = tree / "tasks/stages.py"
    edit = lambda: path.write_text("# a comment moves every line down\n\n" + path.read_text())  # noqa: E731
    assert changed_after(tree, edit) == set()


def test_a_shared_helper_counts_for_every_stage_that_calls_it(tree: Path) -> None:
    path = tree / "tasks/stages.py"
    src = path.read_text()
    old = '    out_root = Path(cfg.state_dir) / "eval" / name\n'
    assert src.count(old) == 1, "_evaluate_model changed shape: update this test's edit"
    edit = lambda: path.write_text(src.replace(old, old + "    out_root = out_root / ''\n"))  # noqa: E731
    assert changed_after(tree, edit) == {"evaluate", "baseline"}


# ---------------------------------------------------------------------------------------------- overlapping runs
HOOK = '''
import os, time
from pathlib import Path

def hold_first(stage, params):
    """The first run signals that it is inside the stage, then holds it until the test releases it."""
    if stage != "filter" or os.environ.get("ROLE") != "first":
        return
    box = Path(os.environ["BOX"])
    (box / "inside").write_text(str(os.getpid()))
    for _ in range(6000):
        if (box / "release").exists():
            return
        time.sleep(0.1)
    raise RuntimeError("the test never released the first run")
'''

RUN = """
import json, sys
from mgpo_cli.pipeline import _prepare_environment
_prepare_environment(sys.argv[1])
from flows.nightly import filter_flow
out = filter_flow(preset="tiny-cpu", overrides=sys.argv[2:])
print("RESULT " + json.dumps(out["dataset_dir"]))
import tasks
print("CODE " + tasks.__file__)
"""


def _snapshot(box: Path) -> Path:
    """A copy of the code the runs import (so that they compute their keys from the same sources, and a test can
    edit them)."""
    src = box / "src"
    for pkg in ("mgpo_core", "tasks", "flows", "mgpo_cli"):
        shutil.copytree(SOURCE_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _start(box: Path, state: Path, role: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(box), str(box / "src"), env.get("PYTHONPATH")])),
        MGPO_STAGE_HOOKS="overlap_hooks:hold_first", ROLE=role, BOX=str(box), MGPO_TASK_RETRIES="0",
    )
    sets = [f"state_dir={state}", "data.synthetic_train=4", "data.synthetic_eval=4", "data.synthetic_width=448",
            "data.synthetic_height=336"]  # fmt: skip
    out = (box / f"{role}.log").open("w")
    return subprocess.Popen([sys.executable, "-c", RUN, str(state), *sets], env=env, stdout=out,
                            stderr=subprocess.STDOUT, cwd=box / "src", text=True)  # fmt: skip


def _wait_for(what: str, cond, procs: list[subprocess.Popen], box: Path, limit: int = 6000) -> None:  # noqa: ANN001
    """Poll ``cond`` (a safety bound only: the test waits for events, not for time)."""
    for _ in range(limit):
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                logs = {f.name: f.read_text()[-2000:] for f in box.glob("*.log")}
                pytest.fail(f"a run ended while waiting for {what}: {logs}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_overlapping_runs_execute_the_stage_once(tmp_path: Path) -> None:
    box, state = tmp_path / "box", tmp_path / "state"
    box.mkdir()
    (box / "overlap_hooks.py").write_text(HOOK)
    _snapshot(box)
    first = _start(box, state, "first")
    procs = [first]
    try:
        _wait_for("the first run to enter the filter stage", (box / "inside").exists, procs, box)
        second = _start(box, state, "second")
        procs.append(second)
        _wait_for(
            "the second run to wait for the first one's lock",
            lambda: "is executing this stage with the same inputs; waiting" in (box / "second.log").read_text(),
            procs, box,
        )  # fmt: skip
        (box / "release").write_text("")
        for p in procs:
            assert p.wait(timeout=900) == 0, (box / "first.log").read_text()[-3000:] + (box / "second.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [
        next(line for line in (box / f"{r}.log").read_text().splitlines() if line.startswith("RESULT "))
        for r in ("first", "second")
    ]
    assert results[0] == results[1], results
    ran = [json.loads(line)["stage"] for line in (state / "pipeline" / "executions.jsonl").read_text().splitlines()]
    assert ran == ["filter"], f"the filter stage ran {len(ran)} times: {ran}"
    assert not list((state / "prefect" / "locks").glob("*.lock")), "the lock is released"


# ---------------------------------------------------------------------------------------------- the pipeline
SMALL = [
    "algorithm.total_steps=2", "algorithm.prompts_per_step=2", "algorithm.mini_batch_prompts=2",
    "algorithm.micro_batch_size=4", "rollout.n=2", "rollout.engine=hf", "rollout.max_new_tokens_turn1=8",
    "rollout.max_new_tokens_turn2=4", "rollout.min_pixels=3136", "rollout.max_pixels=12544",
    "data.synthetic_train=4", "data.synthetic_eval=4", "data.synthetic_width=448", "data.synthetic_height=336",
    "evaluation.max_new_tokens=8", "evaluation.limit=4", "checkpoint.every_steps=1", "evaluation.min_improvement=-1",
]  # fmt: skip


def _mgpo_run(src: Path, state: Path, fail: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", "--set", f"state_dir={state}"]
    for s in SMALL:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    tests_dir = str(Path(__file__).resolve().parent)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(src), tests_dir, env.get("PYTHONPATH")])),
               MGPO_TASK_RETRIES="0", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    if fail:
        env.update(MGPO_STAGE_HOOKS="stage_hooks:fail_stage", MGPO_FAIL_STAGE=fail)
    return subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True, timeout=1800)


def _ran(state: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (state / "pipeline" / "executions.jsonl").read_text().splitlines():
        stage = json.loads(line)["stage"]
        counts[stage] = counts.get(stage, 0) + 1
    return counts


@pytest.mark.slow
def test_a_failed_selection_and_an_evaluation_only_change_rerun_only_what_they_must(tmp_path: Path) -> None:
    """Selection fails: the rerun selects again without training again. Then the evaluation code changes (in a
    copy of the sources the runs import): the rerun evaluates, scores the base model and promotes, nothing else."""
    src, state = _snapshot(tmp_path), tmp_path / "state"
    p = _mgpo_run(src, state, fail="select")
    assert p.returncode != 0 and "failed in stage 'select'" in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    assert _ran(state) == {"filter": 1, "train": 1, "select": 1}
    p = _mgpo_run(src, state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = {"filter": 1, "train": 1, "select": 2, "register": 1, "evaluate": 1, "baseline": 1, "promote": 1}
    assert _ran(state) == done, "the failed selection ran again, training did not"
    runner = src / "mgpo_core" / "evaluation" / "runner.py"
    runner.write_text(runner.read_text() + "\n\ndef _an_evaluation_only_change() -> None:\n    pass\n")
    p = _mgpo_run(src, state)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    again = _ran(state)
    assert {k: again[k] - done.get(k, 0) for k in again} == {
        "filter": 0, "train": 0, "select": 0, "register": 0, "evaluate": 1, "baseline": 1, "promote": 1
    }, again  # fmt: skip


# ---------------------------------------------------------------------------------------------- the lock itself
TAKE_AND_DIE = """
import os, sys
from pathlib import Path
from tasks.locks import StageLockManager
assert StageLockManager(Path(sys.argv[1])).acquire_lock("mgpo-train-k", holder="run-a")
os._exit(0)  # killed while holding it: nothing releases the lock
"""


def test_a_lock_left_by_a_dead_run_is_broken_a_live_ones_holds(tmp_path: Path) -> None:
    from tasks.locks import StageLockManager

    locks = tmp_path / "locks"
    p = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, str(locks)], cwd=SOURCE_ROOT, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (locks / "mgpo-train-k.lock").exists() and (locks / "mgpo-train-k.owner").exists()
    mine = StageLockManager(locks)
    assert not mine.is_locked("mgpo-train-k"), "the holder is gone: its lock must not block every later run"
    assert not (locks / "mgpo-train-k.lock").exists()
    assert mine.acquire_lock("mgpo-train-k", holder="run-b")
    other = StageLockManager(locks)  # another run in this live process sees it held
    assert other.is_locked("mgpo-train-k") and not other.is_lock_holder("mgpo-train-k", "run-c")
    assert not other.acquire_lock("mgpo-train-k", holder="run-c", acquire_timeout=0.5)
    mine.release_lock("mgpo-train-k", holder="run-b")
    assert not other.is_locked("mgpo-train-k") and not (locks / "mgpo-train-k.owner").exists()


def test_the_select_flow_finds_the_dataset_a_run_trained_on(tmp_path: Path) -> None:
    """Selection alone (the ``mgpo-select`` deployment) gets a run directory; selection on ``validation`` needs
    that run's dataset: its ``config.yaml`` names it."""
    from flows.nightly import _dataset_hash_of

    (tmp_path / "config.yaml").write_text("data:\n  train_path: /state/datasets/0123abcd\n")
    assert _dataset_hash_of(tmp_path) == "0123abcd"
    assert _dataset_hash_of(tmp_path / "missing") == ""
