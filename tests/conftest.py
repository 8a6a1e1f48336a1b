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
