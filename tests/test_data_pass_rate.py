"""The pass-rate filter: n rollouts per prompt through a rollout engine; prompts whose pass rate lies outside the
configured range (all-right and all-wrong ones give zero GRPO advantage) are dropped with their reason.

A scripted engine fixes every rollout's reward exactly; the real Hugging Face engine on the tiny model checks the
same path end to end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from scripted import ScriptedEngine

from mgpo_core.config import load_config
from mgpo_core.data.schema import LETTERS, Sample
from mgpo_core.data.stage import run_filter_stage
from mgpo_core.data.synthetic import read_samples_jsonl, write_synthetic_split


class RewardScriptEngine(ScriptedEngine):
    """Turn 2 of prompt ``id`` replies ``\\boxed{<letter>}`` for each letter of ``script[id]`` (one per rollout;
    the reward scores turn 2 only); turn 1 gives no box. Prompts in ``fail_ids`` make the call raise."""

    def __init__(self, bundle, cfg, script: dict[str, str], fail_ids: Sequence[str] = ()) -> None:  # noqa: ANN001
        super().__init__(bundle, cfg, [], "I cannot tell from the crop.")
        self.script, self.fail_ids = script, set(fail_ids)
        self.batches: list[list[str]] = []
        self._current: list[Sample] = []

    def generate_episodes(self, samples, n=None, **kw):  # noqa: ANN001, ANN003, ANN201
        ids = [s.id for s in samples]
        self.batches.append(ids)
        if self.fail_ids & set(ids):
            raise RuntimeError(f"engine cannot handle {sorted(self.fail_ids & set(ids))}")
        self._current = list(samples)
        return super().generate_episodes(samples, n, **kw)

    def _generate(self, requests, spec, n):  # noqa: ANN001, ANN202
        if all(len(r.images) == 1 for r in requests):  # turn 1: n rollouts per prompt, none boxes an area
            return [[self._encode(self.turn2, True) for _ in range(n)] for _ in requests]
        # turn 2: one request per episode, in prompt order, rollouts in order
        letters = [x for sample in self._current for x in self.script[sample.id]]
        assert len(letters) == len(requests) and n == 1, "script one letter per rollout"
        return [[self._encode(f"\\boxed{{{x}}}", True)] for x in letters]


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory):
    return write_synthetic_split(tmp_path_factory.mktemp("pr"), 5, seed=11, width=448, height=336)


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory):
    """A 2-prompt file for the tests that roll out the real tiny model (each prompt costs seconds on CPU)."""
    return write_synthetic_split(tmp_path_factory.mktemp("pr2"), 2, seed=12, width=448, height=336)


def _cfg(tmp_path, *overrides: str):  # noqa: ANN001, ANN202
    base = ["rollout.max_new_tokens_turn1=24", "rollout.max_new_tokens_turn2=12", f"state_dir={tmp_path}"]
    return load_config("tiny-cpu", [*base, "data.filters.pass_rate=true", *overrides])


def _script(samples: list[Sample], right_counts: list[int], n: int) -> dict[str, str]:
    """Per prompt: ``right`` rollouts answer correctly, the rest give another letter."""
    script = {}
    for s, right in zip(samples, right_counts, strict=True):
        wrong = next(x for x in LETTERS[: len(s.choices)] if x != s.answer)
        script[s.id] = s.answer * right + wrong * (n - right)
    return script


def test_all_right_and_all_wrong_prompts_are_dropped_and_the_rest_kept(tmp_path, tiny_bundle, samples_file):
    samples = read_samples_jsonl(samples_file)
    cfg = _cfg(tmp_path, "data.filters.pass_rate_n=4", "data.filters.pass_rate_batch=2")
    engine = RewardScriptEngine(tiny_bundle, cfg, _script(samples, [4, 0, 2, 1, 3], 4))
    result = run_filter_stage(cfg, [samples_file], tmp_path / "out", engine=engine, progress=False)
    assert result.report["counts"] == {"in": 5, "kept": 3, "dropped": 2}
    assert result.report["dropped_by_reason"] == {"pass_rate_high": 1, "pass_rate_low": 1}
    kept = [json.loads(x)["id"] for x in result.samples_path.read_text().splitlines()]
    assert kept == [samples[i].id for i in (2, 3, 4)]
    pr = result.report["pass_rate"]
    assert pr["histogram"] == {"0/4": 1, "1/4": 1, "2/4": 1, "3/4": 1, "4/4": 1}
    assert pr["prompts"] == 5 and pr["kept"] == 3
    assert engine.batches == [[s.id for s in samples[:2]], [s.id for s in samples[2:4]], [samples[4].id]]
    high = result.report["examples"]["pass_rate_high"][0]
    assert "4 of 4 rollouts right" in high["detail"] and samples[0].id in high["excerpt"]


def test_pass_rate_bounds_are_inclusive(tmp_path, tiny_bundle, samples_file):
    samples = read_samples_jsonl(samples_file)
    cfg = _cfg(
        tmp_path,
        "data.filters.pass_rate_n=4",
        "data.filters.pass_rate_min=0.5",
        "data.filters.pass_rate_max=0.75",
    )
    engine = RewardScriptEngine(tiny_bundle, cfg, _script(samples, [1, 2, 3, 4, 0], 4))
    result = run_filter_stage(cfg, [samples_file], tmp_path / "out", engine=engine, progress=False)
    kept = [json.loads(x)["id"] for x in result.samples_path.read_text().splitlines()]
    assert kept == [samples[1].id, samples[2].id]  # 2/4 = min and 3/4 = max are kept
    assert result.report["dropped_by_reason"] == {"pass_rate_low": 2, "pass_rate_high": 1}


def test_engine_failure_on_one_prompt_drops_only_that_prompt(tmp_path, tiny_bundle, samples_file):
    samples = read_samples_jsonl(samples_file)
    cfg = _cfg(tmp_path, "data.filters.pass_rate_n=2", "data.filters.pass_rate_batch=8")
    engine = RewardScriptEngine(
        tiny_bundle, cfg, _script(samples, [1, 1, 1, 1, 1], 2), fail_ids=[samples[3].id]
    )
    result = run_filter_stage(cfg, [samples_file], tmp_path / "out", engine=engine, progress=False)
    assert result.report["dropped_by_reason"] == {"pass_rate_error": 1}
    assert "engine cannot handle" in result.report["examples"]["pass_rate_error"][0]["detail"]
    assert result.report["counts"] == {"in": 5, "kept": 4, "dropped": 1}
    assert engine.batches[0] == [s.id for s in samples] and len(engine.batches) == 6  # 1 batch + 5 retries


def test_pass_rate_runs_after_the_cheap_filters_only_on_survivors(tmp_path, tiny_bundle, samples_file):
    samples = read_samples_jsonl(samples_file)
    rows = [s.to_dict() for s in samples[:2]] + [dict(samples[0].to_dict(), id="dup")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, "data.filters.pass_rate_n=2", f"data.root={samples_file.parent}")
    engine = RewardScriptEngine(tiny_bundle, cfg, _script(samples[:2], [1, 1], 2))
    result = run_filter_stage(cfg, [path], tmp_path / "out", engine=engine, progress=False)
    assert result.report["dropped_by_reason"] == {"duplicate": 1}
    assert [i for b in engine.batches for i in b] == [
        samples[0].id,
        samples[1].id,
    ]  # the duplicate never rolled out


@pytest.mark.slow
def test_pass_rate_filter_with_the_real_hf_engine_on_the_tiny_model(tmp_path, hf_engine, two_prompts):
    cfg = _cfg(
        tmp_path,
        "data.filters.pass_rate_n=2",
        "data.filters.pass_rate_min=0.0",
        "data.filters.pass_rate_max=0.5",
    )
    result = run_filter_stage(cfg, [two_prompts], tmp_path / "out", engine=hf_engine, progress=False)
    pr = result.report["pass_rate"]
    assert sum(pr["histogram"].values()) == pr["prompts"] == 2
    assert set(pr["histogram"]) <= {"0/2", "1/2", "2/2"}
    all_right = pr["histogram"].get("2/2", 0)
    assert result.report["dropped_by_reason"] == ({"pass_rate_high": all_right} if all_right else {})
    assert result.report["counts"]["kept"] == 2 - all_right
    # Same seed, same engine: the filter's outcome is reproducible.
    again = run_filter_stage(cfg, [two_prompts], tmp_path / "out2", engine=hf_engine, progress=False)
    assert again.report["pass_rate"]["histogram"] == pr["histogram"]
    assert again.dataset_dir.name == result.dataset_dir.name


@pytest.mark.slow
def test_without_an_engine_the_stage_builds_one_from_the_config(tmp_path, tiny_dir, two_prompts):
    cfg = _cfg(
        tmp_path,
        f"model.path={tiny_dir}",
        "rollout.engine=hf",
        "data.filters.pass_rate_n=2",
        "data.filters.pass_rate_min=0.0",
        "data.filters.pass_rate_max=1.0",
    )
    result = run_filter_stage(cfg, [two_prompts], tmp_path / "out", progress=False)
    assert result.report["counts"] == {"in": 2, "kept": 2, "dropped": 0}
    assert (
        result.report["pass_rate"]["histogram"] and sum(result.report["pass_rate"]["histogram"].values()) == 2
    )
    assert result.manifest["config"]["model"]["path"] == str(tiny_dir)


def test_unreachable_pass_rate_range_is_a_config_error():
    from mgpo_core.config import ConfigError

    with pytest.raises(ConfigError, match="keeps no pass rate k/2"):
        load_config(
            "tiny-cpu",
            [
                "data.filters.pass_rate=true",
                "data.filters.pass_rate_n=2",
                "data.filters.pass_rate_min=0.6",
                "data.filters.pass_rate_max=0.9",
            ],
        )
