"""The vLLM engine's sleep/wake bookkeeping on the path a GPU takes, against vLLM 0.32's documented contract.

No GPU exists here, and vLLM's CPU build has no sleep mode, so the real engine class
(:class:`~mgpo_core.rollout.vllm_engine.VLLMRolloutEngine`) drives a stand-in for ``vllm.LLM`` that keeps the
contract's state the way vLLM 0.32 keeps it (``vllm/entrypoints/llm.py``, ``vllm/v1/engine/core.py``,
``vllm/v1/executor/abstract.py``):

- ``sleep(level)`` with level ≥ 1 puts the tags ``{"weights", "kv_cache"}`` to sleep (level 1 offloads the
  weights, level 2 discards them); sleeping again while the weights sleep is a no-op with a warning;
- ``wake_up(tags)`` re-allocates the given tags (all when ``None``) and RETURNS whether the engine is fully awake;
  asking for a tag that is not asleep wakes nothing (the executor warns and returns early);
- the engine must be fully awake before it is used again; weights discarded at level 2 must be reloaded.

The stand-in raises where the real engine would compute on released memory, so a bookkeeping error (an asleep
flag that says awake, a generate on a half-woken engine, a reload into offloaded weights) fails a test here
instead of corrupting a GPU run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mgpo_core.episodes import PromptTemplates
from mgpo_core.rollout import GenerationRequest, SamplingSpec
from mgpo_core.rollout import vllm_available as _vllm_available
from mgpo_core.rollout.base import RolloutSettings
from mgpo_core.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine

SLEEP_TAGS = frozenset({"weights", "kv_cache"})  # vllm.v1.executor.abstract.SLEEP_TAGS in 0.32

# _generate builds vllm.SamplingParams; the sleep/wake/sync calls themselves need no vLLM.
needs_sampling_params = pytest.mark.skipif(not _vllm_available(), reason="vLLM is not importable")


class ContractLLM:
    """``vllm.LLM``'s sleep/wake/reload/generate as vLLM 0.32 keeps them, with a log of every call."""

    def __init__(self, token: int, im_end: int) -> None:
        self.sleeping: set[str] = set()
        self.weights_valid = True
        self.calls: list[tuple] = []
        self.reloaded: list[list[str]] = []
        self._reply = [token, im_end]
        self.llm_engine = SimpleNamespace(
            reset_encoder_cache=lambda: self.calls.append(("reset_encoder_cache",))
        )

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if level >= 1 and "weights" not in self.sleeping:  # the executor: "already sleeping" is a no-op
            self.sleeping |= SLEEP_TAGS
            self.weights_valid = level == 1  # level 1 offloads the weights, level 2 discards them

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))
        tags = None if tags is None else [t for t in tags if t != "scheduling"]
        if self.sleeping and (tags is None or all(t in self.sleeping for t in tags)):
            self.sleeping -= SLEEP_TAGS if tags is None else set(tags)
        return not self.sleeping

    def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):  # noqa: ANN001, ANN201
        self.calls.append(("collective_rpc", method))
        if method != "reload_weights":
            raise NotImplementedError(method)
        if "weights" in self.sleeping:
            raise RuntimeError("reload_weights into weights that are asleep (offloaded or discarded)")
        self.reloaded.append([name for name, _ in kwargs["weights_iterator"]])
        self.weights_valid = True
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def generate(self, prompts, params, use_tqdm=False):  # noqa: ANN001, ANN201
        self.calls.append(("generate", len(prompts)))
        if self.sleeping:
            raise RuntimeError(f"generate while {sorted(self.sleeping)} sleep: wake_up() with all tags first")
        if not self.weights_valid:
            raise RuntimeError("generate after a level-2 sleep without reloading the weights")
        outs = []
        for prompt, p in zip(prompts, params, strict=True):
            lps = [{t: SimpleNamespace(logprob=-0.5)} for t in self._reply]
            samples = [
                SimpleNamespace(index=j, token_ids=list(self._reply), logprobs=lps, finish_reason="stop")
                for j in range(p.n)
            ]
            outs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], num_cached_tokens=0,
                                        outputs=samples))  # fmt: skip
        return outs

    def names(self) -> list[str]:
        """The calls, without their arguments."""
        return [c[0] for c in self.calls]


@pytest.fixture()
def make_engine(tiny_dir, tiny_bundle, tiny_cfg, monkeypatch):
    """``make_engine(sleep_mode=True, level=1, on_gpu=True) -> (engine, llm)``: the real engine class around the
    stand-in, on a platform vLLM would report as a GPU (the CPU build's answer is patched: no GPU exists here)."""

    def make(*, sleep_mode: bool = True, level: int = 1, on_gpu: bool = True):
        monkeypatch.setattr("mgpo_core.rollout.vllm_engine.on_cpu_platform", lambda: not on_gpu)
        b, sp = tiny_bundle, tiny_bundle.special
        llm = ContractLLM(token=int(b.tokenizer.convert_tokens_to_ids("A")), im_end=sp.im_end)
        engine = VLLMRolloutEngine(
            tiny_dir, b.tokenizer, b.image_processor, sp, PromptTemplates.from_config(tiny_cfg.rollout),
            RolloutSettings.from_config(tiny_cfg), options=VLLMOptions(enable_sleep_mode=sleep_mode,
                                                                       sleep_level=level), llm=llm,
        )  # fmt: skip
        return engine, llm

    return make


def _rollout(engine) -> list:  # noqa: ANN001
    reqs = [GenerationRequest([1, 2, 3], [], [], 4), GenerationRequest([4, 5], [], [], 4)]
    return engine._generate(reqs, SamplingSpec(4, seed=0), 2)


def _weights(tiny_bundle) -> list[tuple[str, torch.Tensor]]:
    return list(tiny_bundle.model.named_parameters())


def test_sleep_releases_memory_once_and_wake_reports_the_engine_fully_awake(make_engine):
    engine, llm = make_engine(level=1)
    engine.sleep()
    assert llm.calls == [("sleep", 1)] and llm.sleeping == SLEEP_TAGS
    engine.sleep()  # the trainer may call it twice (validation, then the step): vLLM must not be asked again
    assert llm.calls == [("sleep", 1)]
    engine.wake()
    assert llm.calls[-1] == ("wake_up", None) and not llm.sleeping
    engine.wake()  # awake already: no call into vLLM
    assert llm.names().count("wake_up") == 1


def test_a_partial_wake_keeps_the_engine_asleep_until_every_tag_is_back(make_engine):
    engine, llm = make_engine()
    engine.sleep()
    engine.wake(tags=["weights"])
    assert llm.sleeping == {"kv_cache"}, "vLLM answered False (not fully awake)"
    engine.wake(tags=["kv_cache"])
    assert not llm.sleeping
    engine.wake()
    assert llm.names().count("wake_up") == 2, "after wake_up returned True the engine knows it is awake"


@needs_sampling_params
def test_generate_after_a_partial_wake_wakes_the_rest_first(make_engine):
    engine, llm = make_engine()
    engine.sleep()
    engine.wake(tags=["weights"])
    out = _rollout(engine)
    assert [len(r) for r in out] == [2, 2] and out[0][0].finish_reason == "stop"
    assert llm.names()[-2:] == ["wake_up", "generate"] and llm.calls[-2] == ("wake_up", None)


@pytest.mark.parametrize("level", [1, 2])
def test_weight_sync_while_asleep_loads_into_woken_weights_and_keeps_the_kv_cache_released(
    make_engine, tiny_bundle, level
):
    engine, llm = make_engine(level=level)
    engine.sleep()
    engine.sync_weights(_weights(tiny_bundle))
    assert llm.calls[:3] == [
        ("sleep", level),
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
    ]
    assert llm.sleeping == {"kv_cache"}, "the update's memory is only needed back at the next rollout"
    assert len(llm.reloaded) == 1 and len(llm.reloaded[0]) == len(_weights(tiny_bundle))
    # Vision embeddings and prefix KV blocks of the old weights are dropped after the reload.
    assert llm.names()[3:] == ["reset_encoder_cache", "reset_prefix_cache"]


@needs_sampling_params
def test_the_trainers_step_order_never_touches_released_memory(make_engine, tiny_bundle):
    """The trainer's order (``Trainer.train_step`` then ``validate``): wake → rollouts → sleep → (update) → sync →
    wake → validation rollouts → sleep, three times; the stand-in raises on any generate or reload that vLLM would
    run on released memory."""
    engine, llm = make_engine(level=1)
    for _ in range(3):
        engine.wake()
        _rollout(engine)
        engine.sleep()
        assert llm.sleeping == SLEEP_TAGS, "memory is released while the trainer updates"
        engine.sync_weights(_weights(tiny_bundle))
        engine.wake()
        _rollout(engine)
        engine.sleep()
    engine.wake()
    _rollout(engine)
    assert llm.names().count("generate") == 7 and len(llm.reloaded) == 3 and llm.names().count("sleep") == 6


@needs_sampling_params
def test_after_a_level_2_sleep_the_synced_weights_serve_the_next_rollout(make_engine, tiny_bundle):
    engine, llm = make_engine(level=2)
    engine.wake()
    _rollout(engine)
    engine.sleep()
    assert not llm.weights_valid, "level 2 discards the weights"
    engine.sync_weights(_weights(tiny_bundle))
    _rollout(engine)  # wakes the KV cache, then generates with the reloaded weights
    assert llm.names()[-2:] == ["wake_up", "generate"] and not llm.sleeping


@pytest.mark.parametrize(
    ("sleep_mode", "on_gpu"), [(False, True), (True, False)], ids=["mode-off", "cpu-build"]
)
def test_sleep_and_wake_never_reach_vllm_without_sleep_mode_or_on_the_cpu_build(
    make_engine, sleep_mode, on_gpu
):
    engine, llm = make_engine(sleep_mode=sleep_mode, on_gpu=on_gpu)
    engine.sleep()
    engine.wake()
    assert llm.calls == [] and not llm.sleeping
