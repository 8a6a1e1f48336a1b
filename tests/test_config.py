"""Tests of the typed config tree: presets, overrides, error messages, hash, YAML round trip and references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from mgpo_core.config import (
    ConfigError,
    MGPOConfig,
    available_presets,
    config_from_dict,
    config_hash,
    describe_config,
    flatten_config,
    load_config,
    save_config,
    to_yaml,
)

PAPER = "qwen2.5-vl-7b-8gpu"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MGPO_MODEL_DIR", str(tmp_path / "qwen"))
    return tmp_path / "qwen"


def _leaf_paths(cls: type[BaseModel] = MGPOConfig, prefix: str = "") -> list[str]:
    paths = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _leaf_paths(ann, path)
        else:
            paths.append(path)
    return paths


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- presets


def test_both_presets_are_packaged_and_load(model_dir_env: Path) -> None:
    assert {"tiny-cpu", PAPER} <= set(available_presets())
    assert load_config("tiny-cpu").preset == "tiny-cpu"
    assert load_config(PAPER).preset == PAPER


def test_no_argument_loads_the_embedded_default_the_base_model_run() -> None:
    cfg = load_config()
    assert cfg == load_config("tiny-base-cpu") and cfg.model.tiny == "base"


QUESTION_BYTES = 2000
"""Room for one benchmark question with its options (MME-RealWorld's longest are well under 1,000 characters)."""
CHAT_MARKUP_TOKENS = 64
"""<|im_start|>/<|im_end|>, role names, vision markers of a two-turn conversation, with room to spare."""


def _worst_tokens(r) -> int:  # noqa: ANN001 - the rollout section
    """The most visual tokens an overview or an enlarged crop takes under the section's pixel budget, over image
    sizes from 28 px to 9,000 px a side and aspect ratios up to 10:1 (panoramas included)."""
    from mgpo_core.imaging import overview_size

    aspects = (1, 4 / 3, 1.5, 2, 3, 4, 6, 8, 10)
    sizes = [(w, max(28, int(w / a))) for w in range(100, 9000, 97) for a in aspects]
    return max(
        (w_in // 28) * (h_in // 28)
        for w, h in sizes
        for w_in, h_in in [overview_size(a, b, min_pixels=r.min_pixels, max_pixels=r.max_pixels) for a, b in
                           ((w, h), (h, w))]
    )  # fmt: skip


def _text_tokens(*texts: str) -> int:
    """An upper bound on the tokens of ``texts``: a byte-level BPE token covers at least one UTF-8 byte."""
    return sum(len(t.encode("utf-8")) for t in texts)


def _optimiser_steps_per_rl_step(cfg: MGPOConfig, world: int) -> int:
    """Optimiser steps DeepSpeed takes in one RL step: the step's episodes over its global batch per step."""
    from mgpo_core.training.ds_config import build_ds_config

    ds = build_ds_config(cfg, world)
    per_step = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    episodes = cfg.algorithm.prompts_per_step * cfg.rollout.n
    assert episodes % per_step == 0, "an RL step must end on an optimiser step"
    return episodes // per_step


def test_tiny_cpu_preset_is_sized_for_a_cpu() -> None:
    """What a CPU run needs: the offline tiny model in float32 under one python process (no bf16 on DeepSpeed's CPU
    accelerator), a response cap holding both turns plus the largest crop, images larger than the overview budget
    (else the crop shows nothing new), and several optimiser steps per RL step as in the paper."""
    from mgpo_core.imaging import overview_size
    from mgpo_core.training.ds_config import build_ds_config

    cfg = load_config("tiny-cpu")
    r = cfg.rollout
    assert cfg.model.path is None and cfg.model.tiny, "the tiny model is built offline, nothing downloaded"
    assert cfg.model.dtype == "float32" and build_ds_config(cfg, 1)["bf16"] == {"enabled": False}
    assert cfg.deepspeed.launcher == "python" and cfg.deepspeed.num_gpus <= 1
    from mgpo_core.data.synthetic import QUESTIONS, VOCABULARY

    # The synthetic questions: the longest one, with every option of the largest vocabulary listed as "(X) value".
    options = "".join(f"(X) {v}\n" for v in max(VOCABULARY.values(), key=len))
    question = max(QUESTIONS.values(), key=len) + options
    turn2 = _text_tokens(r.turn2_valid_template, r.choices_header, question)
    assert r.max_response_tokens >= r.max_new_tokens_turn1 + r.max_new_tokens_turn2 + _worst_tokens(r) + turn2
    w, h = cfg.data.synthetic_width, cfg.data.synthetic_height
    w_in, h_in = overview_size(w, h, min_pixels=r.min_pixels, max_pixels=r.max_pixels)
    assert w_in < w and h_in < h, "the synthetic images are downscaled for the overview: the crop adds detail"
    assert _optimiser_steps_per_rl_step(cfg, world=1) >= 2


@pytest.mark.parametrize(("width", "height"), [(2246, 1582), (3840, 2160), (7680, 4320), (4000, 1000)])
def test_paper_preset_shows_a_high_resolution_image_in_about_1280_visual_tokens(
    model_dir_env: Path, width: int, height: int
) -> None:
    """M§1.1/M§3: V* (~2246x1582), HR-Bench 4K and 8K, a wide panorama: downscaled to ~1280 tokens of 28x28 pixels
    (the reference's rounding may add or take off a few); a small image is enlarged to about the 256-token floor."""
    from mgpo_core.imaging import overview_size

    r = load_config(PAPER).rollout
    w, h = overview_size(width, height, min_pixels=r.min_pixels, max_pixels=r.max_pixels)
    assert 0.95 * 1280 <= (w // 28) * (h // 28) <= 1.02 * 1280
    w, h = overview_size(320, 240, min_pixels=r.min_pixels, max_pixels=r.max_pixels)
    assert 0.98 * 256 <= (w // 28) * (h // 28) <= 1.02 * 256, "a small image is enlarged to about 256 tokens"


def test_paper_preset_sequences_fit_the_vllm_context(model_dir_env: Path) -> None:
    """The longest episode fits vLLM's max_model_len: system prompt + the largest overview + a long question, then
    the capped response (both turns and the crop inside it); and after a full-length turn 1 and the largest crop,
    turn 2 still has room for a short reasoned answer."""
    from mgpo_core.rollout.base import RolloutSettings
    from mgpo_core.rollout.vllm_engine import VLLMOptions, build_llm_kwargs

    cfg = load_config(PAPER)
    r = cfg.rollout
    text = _text_tokens(r.system_prompt, r.turn1_template) + QUESTION_BYTES + CHAT_MARKUP_TOKENS
    prompt = _worst_tokens(r) + text
    assert prompt + r.max_response_tokens <= r.max_model_len
    turn2_prompt = _worst_tokens(r) + _text_tokens(r.turn2_valid_template, r.choices_header) + QUESTION_BYTES
    # Bytes overcount English text about 4x, so this is a floor: a boxed letter with a few sentences before it.
    assert r.max_response_tokens - r.max_new_tokens_turn1 - turn2_prompt >= 256
    settings = RolloutSettings.from_config(cfg)
    kwargs = build_llm_kwargs("unused", VLLMOptions.from_config(cfg), settings, on_cpu=False)
    assert kwargs["max_model_len"] == r.max_model_len and kwargs["enable_sleep_mode"] is True


def test_paper_preset_trains_on_512x8_trajectories_in_4_optimiser_steps_with_the_kl_loss(
    model_dir_env: Path,
) -> None:
    """M§2: 512 prompts x n=8 per RL step, 4 optimiser steps over them on 8 GPUs (ZeRO-3, bf16), a constant lr,
    and the loss the trainer builds has the KL-to-reference term (0.01, k3) and the entropy bonus (0.001)."""
    import torch

    from mgpo_core.algorithms import LossCoefficients, mgpo_loss
    from mgpo_core.training.ds_config import build_ds_config
    from mgpo_core.training.trainer import lr_lambda

    cfg = load_config(PAPER)
    world = cfg.deepspeed.num_gpus
    assert world == 8 and cfg.algorithm.prompts_per_step * cfg.rollout.n == 512 * 8
    assert _optimiser_steps_per_rl_step(cfg, world) == 4
    ds = build_ds_config(cfg, world)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert cfg.model.dtype == "bfloat16" and ds["gradient_clipping"] == pytest.approx(1.0)
    f = lr_lambda(cfg)
    assert {f(i) for i in range(4 * cfg.algorithm.total_steps)} == {1.0}, "constant lr, no warm-up"
    # The loss on fixed tensors equals METHOD §2's (clip 0.2, KL 0.01 low-var k3 clamped at 10, entropy 0.001).
    g = torch.Generator().manual_seed(0)
    logp, ref, ent = (torch.randn(4, 6, generator=g) * 0.3 for _ in range(3))
    old, adv, mask = logp + 0.1, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, 6)
    paper = LossCoefficients(kl_coef=0.01, entropy_coef=0.001, clip_low=0.2, clip_high=0.2,
                             kl_estimator="low_var_kl", kl_clamp=10.0)  # fmt: skip
    built = LossCoefficients.from_algorithm(cfg.algorithm)
    got, metrics = mgpo_loss(logp, old, ref, adv, mask, ent, built)
    want, _ = mgpo_loss(logp, old, ref, adv, mask, ent, paper)
    assert float(got) == pytest.approx(float(want), abs=1e-7) and metrics["loss/kl"] > 0
    no_kl, _ = mgpo_loss(logp, old, ref, adv, mask, ent, LossCoefficients(kl_coef=0.0, entropy_coef=0.001))
    assert float(got - no_kl) == pytest.approx(0.01 * metrics["loss/kl"], rel=1e-5), "the KL term is on"


def test_every_value_line_of_paper_preset_cites_its_source() -> None:
    text = (REPO_ROOT / "mgpo_core" / "config" / "presets" / f"{PAPER}.yaml").read_text(encoding="utf-8")
    value_lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("  ") and not ln.lstrip().startswith("#") and ":" in ln
    ]
    assert value_lines
    uncited = [
        ln
        for ln in value_lines
        if "#" not in ln or not any(s in ln for s in ("M§", "ours", "DESIGN", "preset name"))
    ]
    assert uncited == []


def test_unknown_preset_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tiny-cpu'"):
        load_config("tiny-cp")


# ---------------------------------------------------------------- overrides


def test_nested_override_changes_only_that_value() -> None:
    base = load_config()
    cfg = load_config(overrides=["algorithm.kl_coef=0.02", "rollout.engine=hf"])
    assert cfg.algorithm.kl_coef == pytest.approx(0.02) and cfg.rollout.engine == "hf"
    assert cfg.algorithm.model_copy(update={"kl_coef": base.algorithm.kl_coef}) == base.algorithm
    assert cfg.model == base.model


def test_list_and_null_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        overrides=[
            "evaluation.benchmarks=[vstar, synthetic]",
            "model.path=null",
            "optimizer.betas=[0.8, 0.95]",
        ]
    )
    assert cfg.evaluation.benchmarks == ["vstar", "synthetic"]
    assert cfg.model.path is None
    assert cfg.optimizer.betas == (0.8, 0.95)


def test_numeric_looking_override_of_a_text_field_stays_text() -> None:
    cfg = load_config(overrides=["run_name=2024", "tracking.run_id=123"])
    assert cfg.run_name == "2024" and cfg.tracking.run_id == "123"


def test_unquoted_template_override_is_taken_verbatim() -> None:
    cfg = load_config(overrides=["rollout.turn1_template={question} Where is it?"])
    assert cfg.rollout.turn1_template == "{question} Where is it?"


def test_mapping_override_merges_into_the_section() -> None:
    cfg = load_config("tiny-cpu", ["checkpoint={keep_last: 5}"])
    assert cfg.checkpoint.keep_last == 5 and cfg.checkpoint.every_steps == 2


def test_override_without_equals_sign_is_rejected_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["algorithm.kl_coef"])
    assert "algorithm.kl_coef" in str(info.value) and "dotted.key=value" in str(info.value)


def test_unknown_override_key_names_it_and_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["algorithm.kl_coeff=0.02"])
    assert info.value.problems[0].startswith("algorithm.kl_coeff: unknown field")
    assert "did you mean 'algorithm.kl_coef'" in str(info.value)


def test_override_below_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="model.path: is a value, not a section"):
        load_config(overrides=["model.path.x=1"])


def test_overrides_given_as_one_string_are_rejected() -> None:
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(overrides="rollout.n=4")  # type: ignore[arg-type]


# ---------------------------------------------------------------- error messages


def test_unknown_yaml_key_names_the_field_and_suggests_the_closest(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "base: tiny-cpu\nrollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith("rollout.temprature: unknown field")
    assert "did you mean 'rollout.temperature'" in str(info.value)


def test_wrong_type_error_names_the_dotted_path_the_value_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["algorithm.ppo_epochs=abc"])
    (problem,) = info.value.problems
    assert problem.startswith("algorithm.ppo_epochs: ")
    assert "(got 'abc')" in problem and "expected int" in problem


def test_wrong_choice_error_lists_the_valid_options() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.dtype=fp8"])
    assert "model.dtype" in str(info.value) and "'bfloat16'" in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["rollout.n=1", "optimizer.lr=-1", "grounding.clamp_tolerance=0.9"])
    paths = sorted(p.split(":")[0] for p in info.value.problems)
    assert paths == ["grounding.clamp_tolerance", "optimizer.lr", "rollout.n"]


def test_mini_batch_that_does_not_divide_the_step_lists_valid_sizes() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["algorithm.prompts_per_step=12", "algorithm.mini_batch_prompts=5"])
    (problem,) = info.value.problems
    assert problem.startswith("algorithm.mini_batch_prompts: must divide algorithm.prompts_per_step=12")
    assert "[2, 3, 4, 6, 12]" in problem or "[1, 2, 3, 4, 6, 12]" in problem


def test_rejected_assignment_raises_config_error_and_keeps_the_old_value() -> None:
    cfg = load_config("tiny-cpu")
    with pytest.raises(ConfigError, match="algorithm.mini_batch_prompts"):
        cfg.algorithm.mini_batch_prompts = 3
    assert cfg.algorithm.mini_batch_prompts == 2
    with pytest.raises(ConfigError, match="did you mean 'rollout.top_p'"):
        cfg.rollout.topp = 0.5  # type: ignore[attr-defined]


def test_cross_section_conflicts_are_rejected_with_a_fix() -> None:
    with pytest.raises(
        ConfigError, match=r"model.dtype: bf16 training cannot run a float16 model.*set model"
    ):
        load_config(overrides=["deepspeed.bf16=true", "model.dtype=float16"])
    with pytest.raises(ConfigError, match=r"deepspeed.offload_params: needs ZeRO stage 3"):
        load_config(overrides=["deepspeed.offload_params=true"])
    with pytest.raises(ConfigError, match=r"deepspeed.num_gpus: .*launcher=deepspeed"):
        load_config(overrides=["deepspeed.num_gpus=8"])
    with pytest.raises(ConfigError, match=r"model.attn_implementation: algorithm.shared_prompt .*set model"):
        load_config(overrides=["model.attn_implementation=eager"])
    assert load_config(overrides=["model.attn_implementation=eager", "algorithm.shared_prompt=false"])


def test_multinode_connection_settings_need_the_deepspeed_launcher_and_a_hostfile() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed.ssh_port: is only used to reach the hosts of a hostfile"):
        load_config(overrides=["deepspeed.launcher=deepspeed", "deepspeed.ssh_port=2222"])
    with pytest.raises(ConfigError, match=r"deepspeed.master_port: is only read by the deepspeed launcher"):
        load_config(overrides=["deepspeed.master_port=29600"])
    with pytest.raises(ConfigError, match=r"deepspeed.env_forward: is only used for the ranks of a hostfile"):
        load_config(overrides=["deepspeed.env_forward=[NCCL_SOCKET_IFNAME]"])
    multi = ["deepspeed.launcher=deepspeed", "deepspeed.hostfile=/etc/mgpo/hostfile"]
    with pytest.raises(ConfigError, match=r"deepspeed.env_forward: holds names that are not environment"):
        load_config(overrides=[*multi, "deepspeed.env_forward=['A B']"])
    d = load_config(overrides=[*multi, "deepspeed.ssh_port=2222", "deepspeed.master_addr=10.0.0.1"]).deepspeed
    assert (d.ssh_port, d.master_addr, d.master_port, d.env_forward) == (2222, "10.0.0.1", None, [])


def test_hash_ignores_how_the_ranks_reach_each_other() -> None:
    multi = ["deepspeed.launcher=deepspeed", "deepspeed.hostfile=/etc/mgpo/hostfile"]
    base = config_hash(load_config(overrides=multi))
    changed = load_config(
        overrides=[
            *multi,
            "deepspeed.ssh_port=2222",
            "deepspeed.master_addr=10.0.0.1",
            "deepspeed.master_port=29600",
            "deepspeed.env_forward=[NCCL_SOCKET_IFNAME]",
        ]
    )
    assert config_hash(changed) == base


def test_promotion_metric_must_name_an_evaluated_benchmark() -> None:
    with pytest.raises(ConfigError, match="evaluation.promotion_metric: names benchmark 'vstar'"):
        load_config(overrides=["evaluation.promotion_metric=eval/vstar/overall"])
    ok = load_config(
        overrides=["evaluation.benchmarks=[vstar]", "evaluation.promotion_metric=eval/vstar/overall"]
    )
    assert ok.evaluation.promotion_metric == "eval/vstar/overall"


# ---------------------------------------------------------------- templates


def test_default_templates_render_with_question_and_choices() -> None:
    r = load_config().rollout
    turn1 = r.turn1_template.format(question="What colour is the cup?")
    assert "What colour is the cup?" in turn1 and "(A)" not in turn1
    choices = f"{r.choices_header}\n(A) red\n(B) blue"
    for template in (r.turn2_valid_template, r.turn2_fallback_template):
        text = template.format(question="What colour is the cup?", choices=choices)
        assert "(B) blue" in text and "\\boxed{}" in text and "{question}" not in text
    assert r.turn2_valid_template != r.turn2_fallback_template


def test_template_with_unknown_placeholder_is_rejected_naming_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["rollout.turn1_template='{question} {answer}'"])
    assert info.value.problems[0].startswith("rollout.turn1_template: unknown placeholder(s) {answer}")


def test_template_with_single_braces_gets_the_doubling_hint() -> None:
    bad = "rollout.turn2_valid_template={question} {choices} Answer in \\boxed{}."
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[bad])
    assert "rollout.turn2_valid_template" in str(info.value) and "doubled" in str(info.value)


def test_turn2_template_without_choices_is_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"rollout.turn2_fallback_template: missing placeholder\(s\) \{choices\}"
    ):
        load_config(overrides=["rollout.turn2_fallback_template='Try again: {question}'"])


# ---------------------------------------------------------------- hash


def test_hash_is_sixteen_hex_chars_and_repeatable() -> None:
    digest = config_hash(load_config())
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert config_hash(load_config()) == digest


def test_hash_ignores_key_order_of_the_source() -> None:
    data = load_config().model_dump()
    reordered = {
        k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
        for k, v in reversed(list(data.items()))
    }
    assert config_hash(config_from_dict(reordered)) == config_hash(config_from_dict(data))


def test_hash_is_the_same_in_another_process() -> None:
    code = "from mgpo_core.config import config_hash, load_config; print(config_hash(load_config()))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert out.stdout.strip() == config_hash(load_config())


def test_hash_changes_with_a_result_relevant_field() -> None:
    base = config_hash(load_config())
    assert config_hash(load_config(overrides=["algorithm.kl_coef=0.02"])) != base
    assert config_hash(load_config(overrides=["rollout.turn1_template='Q: {question}'"])) != base


def test_hash_ignores_tracking_names_and_locations() -> None:
    base = config_hash(load_config())
    changed = load_config(
        overrides=[
            "tracking.experiment_name=other",
            "tracking.run_id=abc",
            "run_name=x",
            "state_dir=/tmp/elsewhere",
            "preset=custom",
        ]
    )
    assert config_hash(changed) == base


# ---------------------------------------------------------------- YAML, base, env


@pytest.mark.parametrize("preset", ["tiny-cpu", PAPER])
def test_yaml_round_trip_gives_an_equal_config(preset: str, tmp_path: Path, model_dir_env: Path) -> None:
    cfg = load_config(preset, overrides=["rollout.choices_header='costs $${HOME} and: colons'"])
    path = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.rollout.choices_header == "costs ${HOME} and: colons"
    assert to_yaml(again) == path.read_text(encoding="utf-8")


def test_base_inherits_a_preset_and_overrides_some_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.yaml", "base: tiny-cpu\nalgorithm:\n  kl_coef: 0.05\n")
    cfg = load_config(path)
    assert cfg.algorithm.kl_coef == pytest.approx(0.05)
    assert cfg.algorithm.prompts_per_step == 4 and cfg.rollout.n == 4  # from tiny-cpu
    assert cfg.preset == str(path)


def test_base_chains_through_a_relative_path_and_overrides_apply_last(tmp_path: Path) -> None:
    _write(tmp_path / "mid.yaml", "base: tiny-cpu\nrollout:\n  n: 6\n  temperature: 0.9\n")
    top = _write(tmp_path / "top.yaml", "base: mid.yaml\nrollout:\n  n: 5\n")
    cfg = load_config(top, overrides=["rollout.n=3"])
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_pixels) == (3, 0.9, 64 * 28 * 28)


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_file_is_reported_where_it_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"base \(in .*c.yaml\): no packaged preset or YAML file"):
        load_config(path)


def test_env_var_expands_into_the_model_path(model_dir_env: Path) -> None:
    assert load_config(PAPER).model.path == str(model_dir_env)


def test_unset_env_var_error_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MGPO_MODEL_DIR", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(PAPER)
    (problem,) = info.value.problems
    assert problem.startswith("model.path: environment variable MGPO_MODEL_DIR is not set")
    assert "model.path=" in problem


def test_override_replaces_an_unset_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MGPO_MODEL_DIR", raising=False)
    assert load_config(PAPER, overrides=["model.path=/models/qwen"]).model.path == "/models/qwen"


def test_env_fallback_and_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MGPO_TEST_UNSET", raising=False)
    cfg = load_config(overrides=["data.root=${MGPO_TEST_UNSET:-/srv/data}", "rollout.choices_header=$${MGPO_TEST_UNSET}"])
    assert cfg.data.root == "/srv/data" and cfg.rollout.choices_header == "${MGPO_TEST_UNSET}"


def test_non_mapping_yaml_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


# ---------------------------------------------------------------- flatten and describe


def test_flatten_config_has_one_string_per_leaf_field() -> None:
    flat = flatten_config(load_config("tiny-cpu"))
    assert sorted(flat) == sorted(_leaf_paths())
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["algorithm.kl_coef"] == "0.01" and flat["model.path"] == "null"
    assert flat["evaluation.benchmarks"] == '["synthetic"]'


def test_describe_config_documents_every_field() -> None:
    text = describe_config()
    for path in _leaf_paths():
        assert f"`{path}`" in text, path
    for section in ("model", "rollout", "algorithm", "deepspeed", "evaluation"):
        assert f"## `{section}`" in text
    assert "Rollouts per prompt" in text  # a field docstring became its description
    assert all(field.description for field in MGPOConfig.model_fields.values())


def test_default_image_limit_lets_80_megapixel_originals_through() -> None:
    assert load_config().data.max_image_pixels >= 80_000_000


def test_docs_config_reference_is_current() -> None:
    from pathlib import Path

    from mgpo_core.config import describe_config

    doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG_REFERENCE.md"
    assert doc.read_text().strip() == describe_config().strip(), (
        "docs/CONFIG_REFERENCE.md is stale: regenerate it with `.venv/bin/mgpo config describe > docs/CONFIG_REFERENCE.md`"
    )
