"""The reproduction's arms as the trainer runs them: single-turn GRPO episodes, the final-turn-only ablation's mask,
and the grounding-quality metrics (box contains target, IoU) for both episode shapes."""

from __future__ import annotations

import torch

from mgpo_core.episodes import TURN1_TOKEN, TURN2_TOKEN
from mgpo_core.grounding import GroundingResult, map_box_to_model
from mgpo_core.reward import answer_reward
from mgpo_core.training.metrics import grounding_quality
from mgpo_core.training.rewards import get_reward
from mgpo_core.training.trainer import rollout_episodes


def test_single_turn_episodes_have_one_image_one_trained_turn_and_the_answer_reward(hf_engine, tiny_cfg, synthetic_samples):
    cfg = tiny_cfg.model_copy(update={"rollout": tiny_cfg.rollout.model_copy(update={"mode": "single_turn"})})
    eps = rollout_episodes(hf_engine, cfg, synthetic_samples[:2], seed=0, n=2)
    assert len(eps) == 4 and [e.group for e in eps] == [0, 0, 1, 1]
    for ep in eps:
        assert ep.image_grid_thw.shape[0] == 1 and ep.turn_length(TURN2_TOKEN) == 0
        assert ep.crop_box is None and ep.turn2_text == ""
        # the choices are in the single turn's prompt (unlike MGPO's turn 1)
        prompt = hf_engine.tokenizer.decode(ep.input_ids[: ep.prompt_len])
        assert "(A)" in prompt and ep.sample.question in prompt
        trained = ep.loss_mask.bool()
        assert trained.any() and bool((ep.turn_index[trained] == TURN1_TOKEN).all())
        assert ep.reward in (0.0, 1.0)
        assert ep.turns == 1 and get_reward("answer")(ep) == answer_reward(ep.turn1_text, ep.sample.answer)
    # the trainer's reward (which never scores turn 1 of an MGPO episode) scores the single turn here
    ep = eps[0]
    ep.turn1_text = f"```json\n[]\n```\n\\boxed{{{ep.sample.answer}}}"
    assert get_reward("answer")(ep) == 1.0


def test_final_turn_ablation_keeps_only_turn_two_in_the_loss_mask(hf_engine, tiny_cfg, synthetic_samples):
    both = rollout_episodes(hf_engine, tiny_cfg, synthetic_samples[:1], seed=3, n=2)
    cfg = tiny_cfg.model_copy(update={"algorithm": tiny_cfg.algorithm.model_copy(update={"loss_turns": "final"})})
    final = rollout_episodes(hf_engine, cfg, synthetic_samples[:1], seed=3, n=2)
    for a, b in zip(both, final, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)  # same rollout, only the mask differs
        assert bool((a.loss_mask[a.turn_index == TURN1_TOKEN] == 1).all())
        assert not bool(b.loss_mask[b.turn_index == TURN1_TOKEN].any())
        assert torch.equal(a.loss_mask[a.turn_index == TURN2_TOKEN], b.loss_mask[b.turn_index == TURN2_TOKEN])


def test_grounding_quality_counts_misses_and_maps_single_turn_boxes_to_the_original(hf_engine, tiny_cfg, synthetic_samples):
    eps = rollout_episodes(hf_engine, tiny_cfg, synthetic_samples[:1], seed=0, n=3)
    gt = eps[0].sample.gt_boxes[0]
    around = map_box_to_model(
        (max(0, gt[0] - 40), max(0, gt[1] - 40), gt[2] + 40, gt[3] + 40), eps[0].original_size, eps[0].overview_size
    )
    for ep, box in zip(eps, [around, (0.0, 0.0, 40.0, 40.0), None], strict=True):
        ep.crop_box = None  # as in a single-turn episode: the box is mapped, not cropped
        ep.grounding = GroundingResult(box, box is not None, "ok" if box else "no_json", "fenced", None, None)
    q = grounding_quality(eps)
    assert q["box_contains_target"] == 1 / 3  # the invalid one counts as a miss
    assert 0 < q["box_iou"] < 1


def test_sampled_episodes_are_logged_as_a_table_and_a_picture_locally_and_to_mlflow(hf_engine, tiny_cfg, synthetic_samples, tmp_path):
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from mgpo_core.training.episode_log import log_episodes

    eps = rollout_episodes(hf_engine, tiny_cfg, synthetic_samples[:3], seed=1, n=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("episodes", artifact_location=(tmp_path / "art").as_uri())
    run_id = MlflowClient(uri).create_run(exp).info.run_id
    table = log_episodes(eps, [0.5, -0.5] * 3, 7, run_dir=tmp_path / "run", k=4, tracking_uri=uri, run_id=run_id)
    rows = json.loads(table.read_text())
    assert len(rows) == 4 and {r["group"] for r in rows} == {0, 1, 2}  # spread over the prompts
    assert {"turn1", "box", "box_reason", "turn2", "answer", "ground_truth", "reward", "advantage"} <= set(rows[0])
    assert (tmp_path / "run" / "episodes" / "step_00007.png").stat().st_size > 1000
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "episodes")}
    assert logged == {"episodes/step_00007.json", "episodes/step_00007.png"}
