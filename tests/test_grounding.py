"""Tests of mgpo_core.grounding: the turn-1 box parser on any model output, and box mapping between images."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpo_core.grounding import (
    GROUNDING_REASONS,
    GroundingOptions,
    GroundingResult,
    box_iou,
    map_box_to_model,
    map_box_to_original,
    parse_grounding_box,
)

W, H = 1008, 700  # the model image of a 1000x700 original


def fenced(payload: str) -> str:
    return f"The sign is top left.\n```json\n{payload}\n```\nwaiting for the crop"


def box_json(x1, y1, x2, y2, label="sign") -> str:
    return json.dumps([{"bbox_2d": [x1, y1, x2, y2], "label": label}])


# --- the reference (strict) rule ------------------------------------------------------------------------


def test_reference_box_is_accepted_with_label_rule_and_block_end():
    text = fenced(box_json(10, 20, 300, 400))
    result = parse_grounding_box(text, W, H)
    assert result == GroundingResult(
        (10.0, 20.0, 300.0, 400.0), True, "ok", "fenced_json", "sign", result.block_end
    )
    assert text[: result.block_end].endswith("```") and "waiting" not in text[: result.block_end]


def test_strict_options_are_the_defaults():
    assert GroundingOptions.strict() == GroundingOptions()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I cannot tell.", "no_json"),
        (box_json(10, 20, 300, 400), "no_json"),  # unfenced JSON is not the reference format
        (fenced("[{'bbox_2d': [1, 2, 3, 4]}]"), "bad_json"),
        (fenced('{"bbox_2d": [10, 20, 300, 400]}'), "not_a_list"),
        (fenced("[]"), "empty_list"),
        (fenced('[{"label": "sign"}]'), "no_bbox"),
        (fenced("[[10, 20, 300, 400]]"), "no_bbox"),
        (fenced('[{"bbox_2d": [10, 20, 300]}]'), "bad_bbox"),
        (fenced('[{"bbox_2d": [10.5, 20, 300, 400]}]'), "bad_bbox"),  # floats: the reference wants 4 ints
        (fenced('[{"bbox_2d": [true, 20, 300, 400]}]'), "bad_bbox"),  # bool is an int in Python, not here
        (fenced('[{"bbox_2d": [NaN, 20, 300, 400]}]'), "non_finite"),
        (fenced('[{"bbox_2d": [10, 20, 300, Infinity]}]'), "non_finite"),
        (fenced(box_json(10, 20, W + 1, 400)), "out_of_bounds"),  # 1 px outside is already out
        (fenced(box_json(-1, 20, 300, 400)), "out_of_bounds"),
        (fenced(box_json(10, 20, 10**400, 400)), "out_of_bounds"),
        (fenced(box_json(300, 20, 10, 400)), "degenerate"),
        (fenced(box_json(10, 20, 38, 400)), "too_small"),  # a side of exactly 28 is not > 28
        (fenced(box_json(10, 20, 300, 48)), "too_small"),
    ],
)
def test_each_rejection_reports_its_reason(text, reason):
    result = parse_grounding_box(text, W, H)
    assert (result.valid, result.box, result.reason) == (False, None, reason)
    assert reason in GROUNDING_REASONS


def test_extreme_aspect_ratio_is_rejected_as_bad_aspect():
    result = parse_grounding_box(fenced(box_json(0, 0, 3000, 29)), 3024, 700)
    assert result.reason == "bad_aspect"
    assert parse_grounding_box(fenced(box_json(0, 0, 2000, 29)), 3024, 700).valid


def test_box_touching_the_image_border_is_valid():
    assert parse_grounding_box(fenced(box_json(0, 0, W, H)), W, H).valid


def test_first_fenced_block_that_parses_to_a_list_of_dicts_is_the_one_judged():
    text = fenced("not json") + fenced(box_json(10, 20, 300, 400)) + fenced(box_json(50, 60, 200, 300))
    result = parse_grounding_box(text, W, H)
    assert result.box == (10.0, 20.0, 300.0, 400.0)
    assert "```json\nnot json" in text[: result.block_end] and text[result.block_end :].count("```json") == 1


def test_first_item_with_four_ints_is_taken_even_when_it_is_invalid():
    payload = json.dumps(
        [{"bbox_2d": [1.5, 2, 3, 4]}, {"bbox_2d": [0, 0, 5, 5]}, {"bbox_2d": [10, 20, 300, 400]}]
    )
    strict = parse_grounding_box(fenced(payload), W, H)
    assert strict.reason == "too_small"
    tolerant = parse_grounding_box(fenced(payload), W, H, GroundingOptions(first_item_only=False))
    assert tolerant.box == (10.0, 20.0, 300.0, 400.0)


def test_unclosed_fence_is_not_a_block():
    assert parse_grounding_box("```json\n" + box_json(10, 20, 300, 400), W, H).reason == "no_json"


# --- tolerance switches -------------------------------------------------------------------------------


def test_accept_float_admits_non_integer_coordinates_and_flags_the_rule():
    text = fenced('[{"bbox_2d": [10.5, 20, 300.25, 400]}]')
    result = parse_grounding_box(text, W, H, GroundingOptions(accept_float=True))
    assert result.box == (10.5, 20.0, 300.25, 400.0)
    assert result.rule == "fenced_json+float"


def test_accept_float_still_rejects_nan():
    text = fenced('[{"bbox_2d": [NaN, 20, 300, 400]}]')
    assert parse_grounding_box(text, W, H, GroundingOptions(accept_float=True)).reason == "non_finite"


def test_accept_unfenced_finds_bare_json_after_prose_and_sets_block_end():
    text = "See [1]. The answer region: " + box_json(10, 20, 300, 400) + " thanks"
    result = parse_grounding_box(text, W, H, GroundingOptions(accept_unfenced=True))
    assert result.valid and result.rule == "unfenced_json"
    assert text[: result.block_end].endswith("}]")


def test_accept_unfenced_takes_a_single_dict_and_flags_it():
    text = fenced('{"bbox_2d": [10, 20, 300, 400]}')
    result = parse_grounding_box(text, W, H, GroundingOptions(accept_unfenced=True))
    assert result.valid and result.rule == "fenced_json+dict"


def test_clamping_pulls_a_slightly_spilling_box_inside_and_flags_it():
    options = GroundingOptions(clamp_tolerance=0.02)
    result = parse_grounding_box(fenced(box_json(-5, 20, W + 10, 400)), W, H, options)
    assert result.box == (0.0, 20.0, float(W), 400.0)
    assert result.rule == "fenced_json+clamped"
    far = parse_grounding_box(fenced(box_json(10, 20, W + 30, 400)), W, H, options)  # 30 > 2% of 1008
    assert far.reason == "out_of_bounds"


def test_relative1000_coordinates_are_converted_to_model_pixels():
    options = GroundingOptions(coord_mode="relative1000")
    result = parse_grounding_box(fenced(box_json(100, 200, 500, 1000)), W, H, options)
    assert result.box == pytest.approx((100.8, 140.0, 504.0, 700.0))
    assert parse_grounding_box(fenced(box_json(100, 200, 1001, 900)), W, H, options).reason == "out_of_bounds"


@pytest.mark.parametrize(
    "kwargs",
    [{"coord_mode": "normalized"}, {"clamp_tolerance": 1.5}, {"min_side": -1}, {"max_aspect": 0.5}],
)
def test_bad_options_are_rejected_with_a_fix(kwargs):
    with pytest.raises(ValueError, match="grounding\\."):
        GroundingOptions(**kwargs)


@pytest.mark.parametrize(
    "text",
    [
        "```json\n" + "[" * 50_000 + "\n```",  # nesting deeper than the recursion limit
        "```json\n" * 5_000,  # many fences, none holding JSON
        '["unterminated' * 5_000,  # many brackets that never decode
        "{" * 50_000,
    ],
    ids=["deep-nesting", "many-fences", "open-strings", "open-braces"],
)
def test_pathological_text_is_rejected_quickly_without_raising(text):
    for options in (GroundingOptions(), GroundingOptions(accept_unfenced=True, accept_float=True)):
        result = parse_grounding_box(text, W, H, options)
        assert not result.valid and result.reason in ("no_json", "bad_json")


# --- properties on adversarial input -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["bbox_2d", "label", "x"]) | st.text(max_size=4), children, max_size=4
        )
    ),
    max_leaves=20,
)
all_options = st.builds(
    GroundingOptions,
    coord_mode=st.sampled_from(["absolute", "relative1000"]),
    accept_float=st.booleans(),
    accept_unfenced=st.booleans(),
    clamp_tolerance=st.sampled_from([0.0, 0.05]),
    first_item_only=st.booleans(),
)


def _check_result(result: GroundingResult, width: int, height: int) -> None:
    assert result.reason in GROUNDING_REASONS
    assert result.valid == (result.box is not None) == (result.reason == "ok")
    if result.box is not None:
        x1, y1, x2, y2 = result.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


@settings(max_examples=300, deadline=None)
@given(text=st.text(), options=all_options)
def test_parser_never_raises_on_arbitrary_text(text, options):
    _check_result(parse_grounding_box(text, W, H, options), W, H)


@settings(max_examples=300, deadline=None)
@given(value=json_values, options=all_options)
def test_parser_never_raises_on_arbitrary_fenced_json(value, options):
    _check_result(parse_grounding_box(fenced(json.dumps(value)), W, H, options), W, H)


@settings(max_examples=200, deadline=None)
@given(
    model=st.tuples(st.integers(28, 2000), st.integers(28, 2000)),
    original=st.tuples(st.integers(1, 12000), st.integers(1, 12000)),
    coords=st.lists(st.integers(-60, 2100) | st.floats(-60, 2100), min_size=4, max_size=4),
    options=all_options,
)
def test_every_accepted_box_maps_inside_the_original_with_positive_area(model, original, coords, options):
    result = parse_grounding_box(fenced(json.dumps([{"bbox_2d": coords}])), *model, options)
    if result.valid:
        x1, y1, x2, y2 = map_box_to_original(result.box, model, original)
        assert 0 <= x1 < x2 <= original[0] and 0 <= y1 < y2 <= original[1]


@st.composite
def valid_boxes(draw, width: int, height: int) -> tuple[float, float, float, float]:
    def side(limit: int) -> tuple[float, float]:
        lo = draw(st.floats(0, limit - 29, allow_nan=False))
        hi = draw(st.floats(lo + 28.5, limit, allow_nan=False))
        return lo, hi

    x1, x2 = side(width)
    y1, y2 = side(height)
    return x1, y1, x2, y2


@settings(max_examples=300, deadline=None)
@given(data=st.data(), w_in=st.integers(30, 3000), h_in=st.integers(30, 3000))
def test_mapping_to_original_and_back_is_within_one_model_pixel(data, w_in, h_in):
    # Overview sizes never exceed twice the original (they shrink it, or round a side up by < 14 px).
    w_ori = data.draw(st.integers(math.ceil(w_in / 2), 20_000))
    h_ori = data.draw(st.integers(math.ceil(h_in / 2), 20_000))
    box = data.draw(valid_boxes(w_in, h_in))
    back = map_box_to_model(
        map_box_to_original(box, (w_in, h_in), (w_ori, h_ori)), (w_ori, h_ori), (w_in, h_in)
    )
    assert all(abs(a - b) <= 1.0 + 1e-9 for a, b in zip(back, box, strict=True))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), w_in=st.integers(30, 3000), h_in=st.integers(30, 3000))
def test_round_trip_error_is_at_most_half_an_original_pixel_for_any_sizes(data, w_in, h_in):
    w_ori, h_ori = data.draw(st.integers(2, 20_000)), data.draw(st.integers(2, 20_000))
    box = data.draw(valid_boxes(w_in, h_in))
    back = map_box_to_model(
        map_box_to_original(box, (w_in, h_in), (w_ori, h_ori)), (w_ori, h_ori), (w_in, h_in)
    )
    # One original pixel is `pixel` model pixels; nearest rounding errs by half of it. Only a box thinner than
    # one original pixel (possible when pixel > 28.5, the smallest side drawn) is widened: an edge moves <= 1.
    pixel_x, pixel_y = w_in / w_ori, h_in / h_ori
    for got, want, pixel in zip(back, box, (pixel_x, pixel_y, pixel_x, pixel_y), strict=True):
        assert abs(got - want) <= pixel * (0.5 if pixel <= 28 else 1.0) + 1e-9


# --- mapping and IoU -----------------------------------------------------------------------------------


def test_map_box_to_original_scales_each_axis():
    assert map_box_to_original((336, 252, 672, 504), (1344, 756), (3840, 2160)) == (960, 720, 1920, 1440)


def test_map_box_to_original_never_returns_an_empty_box():
    box = map_box_to_original((0, 0, 0.1, 0.1), (1000, 1000), (10, 10))
    assert box == (0, 0, 1, 1)


@pytest.mark.parametrize(
    ("box", "match"),
    [((0, 0, 2000, 10), "outside"), ((10, 10, 5, 20), "empty"), ((0, 0, math.nan, 5), "finite")],
)
def test_map_box_to_original_rejects_unvalidated_boxes(box, match):
    with pytest.raises(ValueError, match=match):
        map_box_to_original(box, (1344, 756), (3840, 2160))


def test_no_bbox_in_a_selected_block_still_reports_where_the_block_ends():
    text = fenced('[{"label": "sign"}]')
    result = parse_grounding_box(text, W, H)
    assert (result.reason, result.rule) == ("no_bbox", "")
    assert text[: result.block_end].endswith("```")


def test_map_box_to_original_rejects_huge_coordinates_with_a_value_error():
    with pytest.raises(ValueError, match="finite"):
        map_box_to_original((0, 0, 10**400, 10), (1344, 756), (3840, 2160))


def test_map_box_to_original_rejects_bad_sizes():
    with pytest.raises(ValueError, match="model_size"):
        map_box_to_original((0, 0, 10, 10), (0, 756), (3840, 2160))


def test_map_box_to_model_is_the_inverse_scaling():
    assert map_box_to_model((960, 720, 1920, 1440), (3840, 2160), (1344, 756)) == pytest.approx(
        (336, 252, 672, 504)
    )


def test_box_iou_of_identical_disjoint_and_half_overlapping_boxes():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
