"""Benchmark aggregations against hand-computed values, grounding metrics, the registry, prompt conventions
and the deterministic --limit subsample."""

from __future__ import annotations

import pytest

from mgpo_core.data.schema import Sample
from mgpo_core.evaluation.benchmarks import available_benchmarks, get_benchmark
from mgpo_core.evaluation.grounding_metrics import aggregate_grounding, enclosing_box, grounding_outcome
from mgpo_core.evaluation.runner import subsample
from mgpo_core.evaluation.scoring import (
    Outcome,
    group_counts,
    hrbench_scores,
    metric_key,
    mme_realworld_scores,
    synthetic_scores,
    vstar_scores,
)
from mgpo_core.evaluation.spec import BENCHMARKS, BenchmarkSpec, register_benchmark, strip_inline_choices
from mgpo_core.grounding import GroundingResult


def _o(correct: bool, **labels: str) -> Outcome:
    return Outcome(correct, labels)


def test_vstar_overall_is_pooled_accuracy_and_each_category_its_own() -> None:
    outcomes = [
        _o(True, category="direct_attributes"),
        _o(True, category="direct_attributes"),
        _o(False, category="direct_attributes"),
        _o(True, category="relative_position"),
        _o(False, category="relative_position"),
    ]
    assert vstar_scores(outcomes) == pytest.approx(
        {"overall": 3 / 5, "direct_attributes": 2 / 3, "relative_position": 1 / 2}
    )


def test_hrbench_averages_per_cycle_group_accuracies_not_pooled_accuracy() -> None:
    # cycle 1: single T F (0.5), cross T T F (2/3), all 3/5; cycle 2: single T T (1.0), cross F (0), all 2/3
    outcomes = [
        _o(True, category="single", cycle_category="1"),
        _o(False, category="single", cycle_category="1"),
        _o(True, category="cross", cycle_category="1"),
        _o(True, category="cross", cycle_category="1"),
        _o(False, category="cross", cycle_category="1"),
        _o(True, category="single", cycle_category="2"),
        _o(True, category="single", cycle_category="2"),
        _o(False, category="cross", cycle_category="2"),
    ]
    scores = hrbench_scores(outcomes)
    assert scores["single"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["cross"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert scores["overall"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert scores["overall"] != pytest.approx(5 / 8)  # the pooled accuracy is NOT the published score
    assert scores["cycle/1"] == pytest.approx(3 / 5)
    assert scores["cycle/2"] == pytest.approx(2 / 3)


def test_hrbench_category_missing_from_a_group_is_averaged_over_groups_that_have_it() -> None:
    outcomes = [
        _o(True, category="single", cycle_category="a"),
        _o(False, category="cross", cycle_category="a"),
        _o(False, category="single", cycle_category="b"),
    ]
    scores = hrbench_scores(outcomes)
    assert scores["cross"] == pytest.approx(0.0)
    assert scores["single"] == pytest.approx(0.5)
    assert scores["overall"] == pytest.approx((0.5 + 0.0) / 2)


def test_mme_realworld_reports_overall_task_and_task_qualified_subtask() -> None:
    outcomes = [
        _o(True, task="Perception", subtask="OCR"),
        _o(False, task="Perception", subtask="OCR"),
        _o(True, task="Perception", subtask="Remote Sensing"),
        _o(False, task="Reasoning", subtask="OCR"),
        _o(False, task="Reasoning", subtask="OCR"),
        _o(True, task="Reasoning", subtask="OCR"),
    ]
    assert mme_realworld_scores(outcomes) == pytest.approx(
        {
            "overall": 3 / 6,
            "task/perception": 2 / 3,
            "task/reasoning": 1 / 3,
            "subtask/perception/ocr": 1 / 2,
            "subtask/perception/remote_sensing": 1.0,
            "subtask/reasoning/ocr": 1 / 3,
        }
    )


def test_synthetic_scores_overall_and_per_category() -> None:
    outcomes = [_o(True, category="colour"), _o(False, category="colour"), _o(True, category="shape")]
    assert synthetic_scores(outcomes) == pytest.approx(
        {"overall": 2 / 3, "category/colour": 0.5, "category/shape": 1.0}
    )
    assert synthetic_scores([_o(True), _o(False)]) == {"overall": 0.5}


def test_missing_label_names_the_question_the_key_and_the_reader_fix() -> None:
    with pytest.raises(ValueError, match=r"'q7'.*'cycle_category'.*reader"):
        hrbench_scores([Outcome(True, {"category": "single"}, id="q7")])
    with pytest.raises(ValueError, match="no outcomes"):
        vstar_scores([])


def test_metric_key_makes_label_values_safe_metric_name_parts() -> None:
    assert metric_key("Remote Sensing/Position") == "remote_sensing_position"
    assert metric_key("  ") == "unknown"
    assert group_counts([_o(True, task="A"), _o(False, task="A"), _o(True, task="B")]) == {
        "task": {"A": 2, "B": 1}
    }


# ------------------------------------------------------------------------------------------- grounding


def _g(box, valid=True, reason="ok") -> GroundingResult:
    return GroundingResult(box, valid, reason, "fenced_json" if box else "", None, None)


def test_grounding_outcome_iou_in_model_pixels_and_containment_in_original_pixels() -> None:
    gt = [(100.0, 100.0, 300.0, 300.0)]  # original 1000x1000 -> overview 100x100: (10, 10, 30, 30)
    exact = grounding_outcome(_g((10, 10, 30, 30)), (100, 100, 300, 300), gt, (100, 100), (1000, 1000))
    assert exact.iou == pytest.approx(1.0) and exact.contains_gt and exact.gt_coverage == 1.0
    shifted = grounding_outcome(_g((20, 20, 40, 40)), (200, 200, 400, 400), gt, (100, 100), (1000, 1000))
    assert shifted.iou == pytest.approx(100 / 700)
    assert shifted.contains_gt is False
    assert shifted.gt_coverage == pytest.approx(0.25)
    # a crop one rounding pixel short still contains the ground truth
    near = grounding_outcome(_g((10, 10, 30, 30)), (101, 100, 299, 300), gt, (100, 100), (1000, 1000))
    assert near.contains_gt is True


def test_relative_position_ground_truth_is_the_box_enclosing_all_targets() -> None:
    assert enclosing_box([(0, 5, 10, 20), (30, 0, 40, 8)]) == (0.0, 0.0, 40.0, 20.0)
    one_target_only = grounding_outcome(
        _g((0, 5, 10, 20)), (0, 5, 10, 20), [(0, 5, 10, 20), (30, 0, 40, 8)], (50, 50), (50, 50)
    )
    assert one_target_only.contains_gt is False


def test_aggregate_grounding_hand_computed() -> None:
    gt = [(100.0, 100.0, 300.0, 300.0)]
    size = ((100, 100), (1000, 1000))
    outcomes = [
        grounding_outcome(_g((10, 10, 30, 30)), (100, 100, 300, 300), gt, *size),
        grounding_outcome(_g((20, 20, 40, 40)), (200, 200, 400, 400), gt, *size),
        grounding_outcome(_g(None, False, "no_json"), None, gt, *size),
        grounding_outcome(_g((0, 0, 50, 50)), (0, 0, 500, 500), [], *size),  # no ground truth
    ]
    m = aggregate_grounding(outcomes)
    assert m["grounding/valid_box_ratio"] == pytest.approx(3 / 4)
    assert m["grounding/iou_mean"] == pytest.approx((1 + 1 / 7 + 0) / 3)
    assert m["grounding/iou_mean_valid"] == pytest.approx((1 + 1 / 7) / 2)
    assert m["grounding/crop_contains_gt"] == pytest.approx(1 / 3)
    assert m["grounding/gt_coverage_mean"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["grounding/reason/ok"] == pytest.approx(3 / 4)
    assert m["grounding/reason/no_json"] == pytest.approx(1 / 4)
    assert aggregate_grounding([]) == {}


# ------------------------------------------------------------------------------------------- registry


def _sample(i: int | str, question: str = "What colour?", choices=("red", "blue")) -> Sample:
    return Sample(id=str(i), image_path="x.png", question=question, choices=tuple(choices), answer="A")


def test_builtin_benchmarks_are_registered_by_name() -> None:
    names = available_benchmarks()
    for name in ("vstar", "hrbench_4k", "hrbench_8k", "mme_realworld", "mme_realworld_lite", "synthetic"):
        assert name in names
    assert get_benchmark("hrbench_8k").aggregate is hrbench_scores


@pytest.fixture
def restored_benchmarks():  # noqa: ANN201
    saved = dict(BENCHMARKS)
    yield BENCHMARKS
    BENCHMARKS.clear()
    BENCHMARKS.update(saved)


def test_registry_refuses_duplicates_and_suggests_close_names(restored_benchmarks) -> None:  # noqa: ANN001
    spec = BenchmarkSpec(
        "my_bench", "one small spec", read=lambda ctx: [], labels=lambda s: {}, aggregate=vstar_scores
    )
    register_benchmark(spec)
    assert get_benchmark("my_bench") is spec
    with pytest.raises(ValueError, match="already registered"):
        register_benchmark(spec)
    with pytest.raises(KeyError, match="did you mean 'hrbench_8k'"):
        get_benchmark("hrbench8k")
    with pytest.raises(ValueError, match="lower-case"):
        BenchmarkSpec("HR Bench", "", read=lambda ctx: [], labels=lambda s: {}, aggregate=vstar_scores)


def test_strip_inline_choices_removes_restated_options_only() -> None:
    s = _sample(1, "Is the cup red or blue?\nThe choices are listed below:\n(A) red\n(B) blue")
    assert strip_inline_choices(s).question == "Is the cup red or blue?"
    inline = _sample(2, "Which is left?\nA. red\nB. blue", ("red", "blue"))
    assert strip_inline_choices(inline).question == "Which is left?"
    untouched = _sample(3, "Does the sign say (A) or (B)?\n(A) exit")  # "(A) exit" is not the sample's choice
    assert strip_inline_choices(untouched) is untouched


def test_subsample_is_deterministic_nested_and_independent_of_input_order() -> None:
    pool = [_sample(i) for i in range(50)]
    a = subsample(pool, 10, seed=0)
    assert [s.id for s in a] == [s.id for s in subsample(pool, 10, seed=0)]
    assert [s.id for s in a] == sorted((s.id for s in a), key=int)  # file order kept
    assert {s.id for s in a} <= {s.id for s in subsample(pool, 20, seed=0)}
    assert {s.id for s in subsample(pool[::-1], 10, seed=0)} == {s.id for s in a}
    assert {s.id for s in subsample(pool, 10, seed=1)} != {s.id for s in a}
    assert subsample(pool, None) == pool and subsample(pool, 99) == pool
    with pytest.raises(ValueError, match="positive"):
        subsample(pool, 0)
