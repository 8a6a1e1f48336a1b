"""Shared fixtures: the tiny offline Qwen2.5-VL (built once per session), the tiny-cpu config, synthetic samples."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


REQUIRE_ALL = "MGPO_REQUIRE_ALL"
"""Set to 1 by ``infra/test.sh``: every component the suite names (vLLM, DeepSpeed, Prefect, MLflow, chromium,
PostgreSQL, sshd/pdsh, trl, ...) is installed there, so a test skipped for a missing one FAILS instead of passing
silently. Only CUDA tests (``gpu`` marker) may still skip: the CI machine has no GPU."""


def _skip_is_an_error(item, report) -> bool:  # noqa: ANN001
    if os.environ.get(REQUIRE_ALL) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return False
    return item is None or "gpu" not in item.keywords


def _required_message(report) -> str:  # noqa: ANN001
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return (
        f"{REQUIRE_ALL}=1 (infra/test.sh): skipped, but every component is required here: {reason}\n"
        "Install what is missing (bash infra/setup_env.sh; bash infra/system_deps.sh), or unset "
        f"{REQUIRE_ALL} to allow skips on a partial machine."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201
    """Under ``MGPO_REQUIRE_ALL=1`` a skipped test (skipif, importorskip, pytest.skip) is reported as failed."""
    outcome = yield
    report = outcome.get_result()
    if _skip_is_an_error(item, report):
        report.outcome, report.longrepr = "failed", _required_message(report)


_SKIPPED_MODULES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # noqa: ANN001, ANN201
    """A module skipped at import (``allow_module_level``, importorskip) under ``MGPO_REQUIRE_ALL=1`` is noted and
    fails the session at its end: a collection error would stop every other test from running."""
    outcome = yield
    report = outcome.get_result()
    if _skip_is_an_error(None, report):
        _SKIPPED_MODULES.append(f"{report.nodeid}: {_required_message(report)}")


def pytest_terminal_summary(terminalreporter):  # noqa: ANN001, ANN201
    for line in _SKIPPED_MODULES:
        terminalreporter.write_line(f"FAILED (module skipped) {line}", red=True)


def pytest_sessionfinish(session, exitstatus):  # noqa: ANN001, ANN201
    if _SKIPPED_MODULES and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mgpo_core.modeling.tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dir):
    from mgpo_core.modeling.loading import load_bundle

    return load_bundle(tiny_dir)


@pytest.fixture(scope="session")
def tiny_cfg():
    from mgpo_core.config import load_config

    return load_config("tiny-cpu", ["rollout.max_new_tokens_turn1=24", "rollout.max_new_tokens_turn2=12"])


@pytest.fixture(scope="session")
def synthetic_samples(tmp_path_factory):
    from mgpo_core.data.synthetic import iter_synthetic_samples

    return list(iter_synthetic_samples(tmp_path_factory.mktemp("synth"), 3, seed=0, width=900, height=600))


@pytest.fixture()
def hf_engine(tiny_bundle, tiny_cfg):
    from mgpo_core.rollout.hf import HFRolloutEngine

    b = tiny_bundle
    return HFRolloutEngine.for_bundle(b, tiny_cfg)
