"""The evaluator end to end with scripted model replies (exact records and metrics), benchmark files read
through the dataset readers, and the per-sample JSONL / summary / picture outputs."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgpo_core.data.schema import LETTERS, Sample
from mgpo_core.episodes import PromptTemplates
from mgpo_core.evaluation.benchmarks import get_benchmark
from mgpo_core.evaluation.direct import model_max_pixels
from mgpo_core.evaluation.runner import evaluate
from mgpo_core.evaluation.spec import ReadContext
from mgpo_core.evaluation.visualize import GT_COLOUR, PRED_COLOUR
from mgpo_core.grounding import box_iou, map_box_to_model
from mgpo_core.imaging import overview_size
from mgpo_core.rollout import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    RolloutSettings,
    SamplingSpec,
)


class ReplyEngine(RolloutEngine):
    """Answers from fixed texts, in request order: requests with one image get ``first`` replies (turn 1, or
    the direct answer), requests with two images get ``second`` replies (turn 2). Records every request."""

    name = "scripted"

    def __init__(self, bundle, cfg, first: Sequence[str], second: Sequence[str] = ()) -> None:
        super().__init__(
            bundle.tokenizer,
            bundle.image_processor,
            bundle.special,
            PromptTemplates.from_config(cfg.rollout),
            RolloutSettings.from_config(cfg),
        )
        self.first, self.second = list(first), list(second)
        self.requests: list[GenerationRequest] = []
        self.specs: list[SamplingSpec] = []

    def _generate(self, requests: Sequence[GenerationRequest], spec: SamplingSpec, n: int):
        assert n == 1
        self.specs.append(spec)
        out = []
        for r in requests:
            self.requests.append(r)
            text = (self.first if len(r.images) == 1 else self.second).pop(0)
            ids = self.prompts.text_ids(text) + [self.special.im_end]
            out.append([GenerationResult(ids, [0.0] * len(ids), "stop")])
        return out

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass


def _box_reply(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f'Key area:\n```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "target"}}]\n```'


def _around(box: Sequence[float], side: float, limit: tuple[int, int]) -> tuple[float, float, float, float]:
    """A ``side``-wide box centred on ``box``, kept inside the image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x1 = min(max(0.0, cx - side / 2), limit[0] - side)
    y1 = min(max(0.0, cy - side / 2), limit[1] - side)
    return (x1, y1, x1 + side, y1 + side)


@pytest.fixture()
def eval_cfg(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluation.max_new_tokens = 16
    cfg.evaluation.batch_size = 8
    return cfg


def test_mgpo_eval_records_boxes_crops_predictions_and_exact_metrics(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    cfg, samples = eval_cfg, synthetic_samples
    sizes = [Image.open(s.image_path).size for s in samples]
    overviews = [
        overview_size(*sz, min_pixels=cfg.rollout.min_pixels, max_pixels=cfg.rollout.max_pixels)
        for sz in sizes
    ]
    gt_model = map_box_to_model(samples[0].gt_boxes[0], sizes[0], overviews[0])
    hit = _around(gt_model, 40, overviews[0])  # > 28 px sides, holds the small target
    corner = (
        (0, 0, 40, 40)
        if samples[2].gt_boxes[0][0] > sizes[2][0] / 2
        else (overviews[2][0] - 40, 0, overviews[2][0], 40)
    )
    wrong = LETTERS[(LETTERS.index(samples[1].answer) + 1) % len(samples[1].choices)]
    engine = ReplyEngine(
        tiny_bundle,
        cfg,
        first=[_box_reply(hit), "I cannot tell.", _box_reply(corner)],
        second=[rf"\boxed{{{samples[0].answer}}}", f"The answer is {wrong}", ""],
    )
    result = evaluate(cfg, "synthetic", engine, tmp_path, samples=samples, progress=False)

    assert all(spec.greedy for spec in engine.specs)
    assert result.n == 3
    m = result.metrics
    assert m["overall"] == pytest.approx(1 / 3)
    assert m["answered_ratio"] == pytest.approx(1 / 3)  # one final turn holds a readable box
    assert m["answer/boxed"] == pytest.approx(1 / 3) and m["answer/no_box"] == pytest.approx(2 / 3)
    assert m["lenient_overall"] == pytest.approx(1 / 3)  # the lenient reader finds the wrong "answer is"
    lenient = ("boxed", "answer_is", "none")
    assert all(m[f"lenient/extraction/{r}"] == pytest.approx(1 / 3) for r in lenient)
    assert m["grounding/valid_box_ratio"] == pytest.approx(2 / 3)
    assert m["grounding/crop_contains_gt"] == pytest.approx(1 / 3)
    expected_iou = box_iou(tuple(round(v) for v in hit), gt_model)
    assert m["grounding/iou_mean"] == pytest.approx(expected_iou / 3, rel=1e-6)
    assert m["grounding/reason/no_json"] == pytest.approx(1 / 3)
    assert result.prefixed()["eval/synthetic/overall"] == m["overall"]

    records = [json.loads(line) for line in result.records_path.read_text().splitlines()]
    assert [r["id"] for r in records] == [s.id for s in samples]
    first, second, third = records
    assert first["correct"] and first["prediction"] == samples[0].answer and first["box_valid"]
    assert first["parsed_box"] == [round(v) for v in hit]
    x1, y1, x2, y2 = first["crop_box"]
    gx1, gy1, gx2, gy2 = samples[0].gt_boxes[0]
    assert x1 <= gx1 and y1 <= gy1 and x2 >= gx2 and y2 >= gy2 and first["crop_contains_gt"]
    assert first["output"][1] == rf"\boxed{{{samples[0].answer}}}" and first["reward"] == 1.0
    assert second["box_reason"] == "no_json" and second["crop_box"] is None
    assert not second["correct"] and second["answer_rule"] == "no_box" and second["prediction"] is None
    assert second["lenient_prediction"] == wrong and second["lenient_rule"] == "answer_is"
    assert third["box_valid"] and third["iou"] == 0.0 and third["crop_contains_gt"] is False
    assert third["prediction"] is None and not third["correct"]
    # two images per episode: overview + crop (or the overview again)
    assert first["visual_tokens"] > overviews[0][0] * overviews[0][1] // 784

    summary = json.loads(result.summary_path.read_text())
    assert summary["questions"] == 3 and summary["mode"] == "mgpo"
    assert summary["metrics"]["overall"] == pytest.approx(1 / 3)
    assert summary["counts"]["labels"]["category"] == {
        c: sum(s.category == c for s in samples) for c in {s.category for s in samples}
    }


def test_scores_use_the_reward_rule_on_the_final_turn_and_lenient_is_a_diagnostic(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    """Hand-written two-turn outputs, one per case the lenient reader credits and the reward does not."""
    s = synthetic_samples[0]
    ans = s.answer
    wrong = LETTERS[(LETTERS.index(ans) + 1) % len(s.choices)]
    cases = [  # (name, turn 1, turn 2, strict rule, right by the rule, right by the lenient reader)
        ("turn1_box_only", rf"\boxed{{{ans}}}", "I think it is that one.", "no_box", False, True),
        ("empty_final_turn", rf"\boxed{{{ans}}}", "", "no_box", False, True),
        ("option_text_only", "no box", s.choices[LETTERS.index(ans)], "no_box", False, True),
        ("answer_is_only", "no box", f"The answer is {ans}", "no_box", False, True),
        ("two_boxes_last_right", "no box", rf"\boxed{{{wrong}}}, no: \boxed{{{ans}}}", "boxed", True, True),
        ("two_boxes_last_wrong", "no box", rf"\boxed{{{ans}}}, no: \boxed{{{wrong}}}", "boxed", False, False),
        ("empty_box_last", "no box", rf"\boxed{{{ans}}} then \boxed{{}}", "boxed_unreadable", False, False),
    ]
    samples = [replace(s, id=name) for name, *_ in cases]
    engine = ReplyEngine(
        tiny_bundle, eval_cfg, first=[c[1] for c in cases], second=[c[2] for c in cases]
    )
    result = evaluate(eval_cfg, "synthetic", engine, tmp_path, samples=samples, progress=False)
    records = {r["id"]: r for r in map(json.loads, result.records_path.read_text().splitlines())}
    for name, _, _, rule, right, lenient_right in cases:
        rec = records[name]
        assert (rec["answer_rule"], rec["correct"], rec["lenient_correct"]) == (rule, right, lenient_right), name
        assert rec["reward"] == float(right), name  # the score IS the reward
        assert rec["prediction"] == (ans if right else wrong if rule == "boxed" else None), name
    m = result.metrics
    assert m["overall"] == pytest.approx(1 / 7)
    assert m["lenient_overall"] == pytest.approx(5 / 7)
    assert m["answered_ratio"] == pytest.approx(2 / 7) and m["answer/boxed_unreadable"] == pytest.approx(1 / 7)
    assert result.prefixed()["eval/synthetic/overall"] == m["overall"]  # what promotion reads


def test_picture_draws_the_predicted_crop_and_the_ground_truth(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    s = synthetic_samples[0]
    ov = overview_size(
        *Image.open(s.image_path).size,
        min_pixels=eval_cfg.rollout.min_pixels,
        max_pixels=eval_cfg.rollout.max_pixels,
    )
    engine = ReplyEngine(
        tiny_bundle, eval_cfg, first=[_box_reply((0, 0, ov[0] // 2, ov[1] // 2))], second=["A"]
    )
    result = evaluate(eval_cfg, "synthetic", engine, tmp_path, samples=[s], progress=False)
    assert result.picture_path is not None
    picture = Image.open(result.picture_path).convert("RGB")
    colours = {c for _, c in picture.getcolors(maxcolors=1 << 20)}
    assert PRED_COLOUR in colours and GT_COLOUR in colours
    assert picture.width >= 320 and picture.height >= 320


def test_direct_eval_sends_one_image_at_the_full_resolution_budget(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    samples = synthetic_samples[:2]
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=[rf"\boxed{{{samples[0].answer}}}", "no idea"])
    result = evaluate(eval_cfg, "synthetic", engine, tmp_path, mode="direct", samples=samples, progress=False)

    budget = model_max_pixels(tiny_bundle.image_processor)
    assert budget == 14 * 14 * 4 * 16384
    records = [json.loads(line) for line in result.records_path.read_text().splitlines()]
    for rec, s in zip(records, samples, strict=True):
        w, h = overview_size(
            *Image.open(s.image_path).size, min_pixels=eval_cfg.rollout.min_pixels, max_pixels=budget
        )
        assert rec["visual_tokens"] == w * h // 784 and rec["image_size"] == [w, h]
        assert rec["crop_box"] is None and rec["parsed_box"] is None
    assert all(len(r.images) == 1 for r in engine.requests)
    prompt = tiny_bundle.tokenizer.decode(engine.requests[0].prompt_ids)
    assert eval_cfg.evaluation.direct_system_prompt in prompt
    assert "(A) " + samples[0].choices[0] in prompt and "bbox_2d" not in prompt
    assert result.metrics["overall"] == pytest.approx(1 / 2)
    assert not any(k.startswith("grounding/") for k in result.metrics)
    assert result.prefix == "eval/synthetic/direct"


def test_direct_max_pixels_caps_the_direct_image(tiny_bundle, eval_cfg, synthetic_samples, tmp_path) -> None:
    cfg = eval_cfg.model_copy(deep=True)
    cfg.evaluation.direct_max_pixels = cfg.rollout.max_pixels
    engine = ReplyEngine(tiny_bundle, cfg, first=["B"])
    result = evaluate(
        cfg, "synthetic", engine, tmp_path, mode="direct", samples=synthetic_samples[:1], progress=False
    )
    assert result.metrics["cost/visual_tokens_mean"] <= cfg.rollout.max_pixels // 784


def test_limit_evaluates_the_deterministic_subsample(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=["A", "A"])
    a = evaluate(
        eval_cfg,
        "synthetic",
        engine,
        tmp_path / "a",
        mode="direct",
        samples=synthetic_samples,
        limit=2,
        progress=False,
    )
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=["A", "A"])
    b = evaluate(
        eval_cfg,
        "synthetic",
        engine,
        tmp_path / "b",
        mode="direct",
        samples=synthetic_samples[::-1],
        limit=2,
        progress=False,
    )
    ids = [json.loads(line)["id"] for line in a.records_path.read_text().splitlines()]
    assert len(ids) == 2 and a.counts["available"] == 3
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in b.records_path.read_text().splitlines())


def test_missing_labels_fail_before_any_generation(
    tiny_bundle, eval_cfg, synthetic_samples, tmp_path
) -> None:
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=[])
    with pytest.raises(ValueError, match="cycle_category"):
        evaluate(eval_cfg, "hrbench_8k", engine, tmp_path, samples=synthetic_samples, progress=False)
    assert engine.requests == []
    with pytest.raises(ValueError, match="mode="):
        evaluate(eval_cfg, "synthetic", engine, tmp_path, mode="three-turn", samples=synthetic_samples)
    with pytest.raises(ValueError, match="--data"):
        evaluate(eval_cfg, "vstar", engine, tmp_path)


# ------------------------------------------------------------------------------- published formats


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _hrbench_tsv(path: Path) -> Path:
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    image = base64.b64encode(_png((200, 30, 30))).decode()
    rows = [
        ["0", "Colour of the car?", "A", "single", "red", "blue", "green", "black", "0", image],
        ["1", "Colour of the car?", "B", "single", "blue", "red", "green", "black", "1", image],
        ["2", "Which is left?", "C", "cross", "car", "tree", "sign", "dog", "0", image],
        ["3", "Which is left?", "D", "cross", "tree", "sign", "dog", "car", "1", image],
    ]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_hrbench_tsv_is_scored_by_cycle_groups_through_the_readers(tiny_bundle, eval_cfg, tmp_path) -> None:
    cfg = eval_cfg.model_copy(deep=True)
    cfg.state_dir = str(tmp_path / "state")
    tsv = _hrbench_tsv(tmp_path / "hr_bench_8k.tsv")
    # right on cycle 0 (both), wrong on the single question of cycle 1, right on its cross question
    engine = ReplyEngine(tiny_bundle, cfg, first=[rf"\boxed{{{x}}}" for x in "AACD"])
    result = evaluate(
        cfg, "hrbench_8k", engine, tmp_path / "out", mode="direct", data_path=tsv, progress=False
    )
    m = result.metrics
    assert m["single"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["cross"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["overall"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["cycle/0"] == 1.0 and m["cycle/1"] == 0.5


def test_mme_realworld_json_is_scored_per_task_and_subtask(tiny_bundle, eval_cfg, tmp_path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((10, 200, 10)))
    items = [
        {
            "Question_id": f"q{i}",
            "Question Type": "Multiple Choice",
            "Image": "img/a.png",
            "Text": "What is it?",
            "Answer choices": ["(A) car", "(B) bus", "(C) van", "(D) tram", "(E) bike"],
            "Ground truth": gt,
            "Task": task,
            "Subtask": sub,
            "Category": "count",
            "Dataset": "x",
        }
        for i, (gt, task, sub) in enumerate(
            [("A", "Perception", "OCR"), ("B", "Perception", "Remote Sensing"), ("C", "Reasoning", "OCR")]
        )
    ]
    data = tmp_path / "MME-RealWorld-Lite.json"
    data.write_text(json.dumps(items))
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=[r"\boxed{A}", r"\boxed{A}", r"so \boxed{(C)}"])
    result = evaluate(
        eval_cfg,
        "mme_realworld_lite",
        engine,
        tmp_path / "out",
        mode="direct",
        data_path=data,
        progress=False,
    )
    assert result.metrics["overall"] == pytest.approx(2 / 3)
    assert result.metrics["task/perception"] == pytest.approx(1 / 2)
    assert result.metrics["subtask/reasoning/ocr"] == 1.0
    assert result.metrics["subtask/perception/remote_sensing"] == 0.0


def test_vstar_folder_is_scored_per_category_with_ground_truth_boxes(tiny_bundle, eval_cfg, tmp_path) -> None:
    root = tmp_path / "vstar"
    for cat, name, options in [
        ("direct_attributes", "sa_1", ["red", "blue", "green", "white"]),
        ("relative_position", "sa_2", ["left", "right"]),
    ]:
        (root / cat).mkdir(parents=True)
        (root / cat / f"{name}.jpg").write_bytes(_png((90, 90, 90), (400, 300)))
        (root / cat / f"{name}.json").write_text(
            json.dumps(
                {
                    "target_object": ["cup"],
                    "bbox": [[100, 100, 30, 20]],
                    "question": "Where is the cup?",
                    "options": options,
                }
            )
        )
    # The reader shuffles V*'s options (the first is the right one): learn where "red" went from the reader.
    spec = get_benchmark("vstar")
    first = spec.read(ReadContext(root, tmp_path / "read", eval_cfg))
    red = LETTERS[first[0].choices.index("red")]
    # direct_attributes: boxed right letter; relative_position: the right option's text, unboxed
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=[rf"\boxed{{{red}}}", "left"])
    result = evaluate(
        eval_cfg, "vstar", engine, tmp_path / "out", mode="direct", data_path=root, progress=False
    )
    records = [json.loads(line) for line in result.records_path.read_text().splitlines()]
    assert records[0]["gt_boxes"] == [[100.0, 100.0, 130.0, 120.0]]
    assert records[0]["answer"] == red and records[0]["correct"]
    assert result.metrics["direct_attributes"] == 1.0
    assert result.metrics["relative_position"] == 0.0  # option text is not the answer rule
    assert records[1]["lenient_correct"] and records[1]["lenient_rule"] == "option_text"
    assert result.metrics["overall"] == pytest.approx(1 / 2)
    assert result.metrics["lenient_overall"] == 1.0


def test_unknown_benchmark_lists_the_registered_names(tiny_bundle, eval_cfg, tmp_path) -> None:
    engine = ReplyEngine(tiny_bundle, eval_cfg, first=[])
    with pytest.raises(KeyError, match="vstar"):
        evaluate(eval_cfg, "vstart", engine, tmp_path, samples=[Sample("x", "x.png", "q", ("a", "b"), "A")])
