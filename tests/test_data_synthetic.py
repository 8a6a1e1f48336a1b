"""The synthetic V*-style generator: deterministic bytes, large sizes, a target too small to read in the
overview but legible in a crop of the original, shuffled options, ground-truth boxes, disjoint splits."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from mgpo_core.data.schema import LETTERS
from mgpo_core.data.synthetic import (
    KINDS,
    QUESTIONS,
    VOCABULARY,
    content_box,
    iter_synthetic_samples,
    make_synthetic_image,
    read_samples_jsonl,
    render_tag,
    write_synthetic_dataset,
)
from mgpo_core.imaging import crop_and_enlarge, open_image, overview_size

TINY_MAX_PIXELS = 64 * 28 * 28  # the tiny-cpu preset's overview budget
PAPER_MAX_PIXELS = 1280 * 28 * 28


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return list(iter_synthetic_samples(tmp_path_factory.mktemp("syn"), 9, seed=4, width=1920, height=1080))


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path, image_format):
    def files(out, seed):  # noqa: ANN001, ANN202
        ss = list(iter_synthetic_samples(out, 3, seed=seed, width=800, height=600, image_format=image_format))
        return [open(s.image_path, "rb").read() for s in ss], [s.to_dict() | {"image_path": ""} for s in ss]

    a = files(tmp_path / "a", 1)
    assert a == files(tmp_path / "b", 1)
    assert a[0] != files(tmp_path / "c", 2)[0]


def test_two_worker_processes_write_the_same_bytes_as_one(tmp_path):
    one = list(iter_synthetic_samples(tmp_path / "one", 4, seed=3, width=640, height=480))
    two = list(iter_synthetic_samples(tmp_path / "two", 4, seed=3, width=640, height=480, workers=2))
    assert [s.answer for s in one] == [s.answer for s in two]
    assert [open(s.image_path, "rb").read() for s in one] == [open(s.image_path, "rb").read() for s in two]


def test_eight_k_image_is_generated_at_full_size_with_its_target_inside(tmp_path):
    (s,) = iter_synthetic_samples(tmp_path, 1, seed=0, width=7680, height=4320)
    with Image.open(s.image_path) as im:
        assert im.size == (7680, 4320)
    x1, y1, x2, y2 = s.gt_boxes[0]
    assert 0 <= x1 < x2 <= 7680 and 0 <= y1 < y2 <= 4320


def test_samples_ask_about_each_kind_with_shuffled_options_and_a_correct_letter(samples):
    assert {s.category for s in samples} == set(KINDS)
    for s in samples:
        assert s.question == QUESTIONS[s.category] and s.source == "synthetic"
        assert len(s.choices) == 4 and len(set(s.choices)) == 4
        assert set(s.choices) <= set(VOCABULARY[s.category])
    assert len({s.answer for s in samples}) > 1  # the correct option is not always first


def test_unshuffled_options_list_the_whole_vocabulary_in_order_so_a_value_keeps_its_letter(tmp_path):
    from mgpo_core.config import load_config
    from mgpo_core.data.synthetic import synthetic_options

    opts = synthetic_options(load_config("tiny-cpu", ["data.synthetic_choices=6", "data.synthetic_shuffle_choices=false"]))
    assert opts["n_choices"] == 6 and opts["shuffle_choices"] is False
    ss = list(iter_synthetic_samples(tmp_path, 12, seed=2, width=640, height=480, kinds=("colour",),
                                     n_choices=6, shuffle_choices=False))
    vocab = VOCABULARY["colour"]
    assert all(s.choices == vocab for s in ss)
    assert len({s.answer for s in ss}) > 1  # still every colour, so the letter depends on the picture
    # the default keeps the benchmarks' shuffled options
    assert synthetic_options(load_config("tiny-cpu"))["shuffle_choices"] is True


def _best_template(patch: Image.Image, kind: str, options: tuple[str, ...], side: int) -> str:
    """The option whose rendered tag is closest (mean squared error) to ``patch``: a minimal reader."""
    arr = np.asarray(patch.convert("RGB").resize((side, side)), dtype=np.float64)
    errors = {
        o: float(((np.asarray(render_tag(kind, o, side), dtype=np.float64) - arr) ** 2).mean())
        for o in options
    }
    return min(errors, key=errors.get)


def test_target_is_legible_in_a_crop_of_the_original(samples):
    for s in samples:
        x1, y1, x2, y2 = (int(v) for v in s.gt_boxes[0])
        side = x2 - x1
        original = open_image(s.image_path)
        pad = side  # the generator keeps the tag at least one tag-width from the border
        crop = crop_and_enlarge(
            original, (x1 - pad, y1 - pad, x2 + pad, y2 + pad), min_pixels=12544, max_pixels=TINY_MAX_PIXELS
        )
        scale = crop.width / (3 * side)
        assert scale > 1.5  # the crop is enlarged, not shrunk
        tag = crop.crop(
            (round(pad * scale), round(pad * scale), round((pad + side) * scale), round((pad + side) * scale))
        )
        assert _best_template(tag, s.category, s.choices, side) == s.choices[LETTERS.index(s.answer)]


@pytest.mark.parametrize("max_pixels", [TINY_MAX_PIXELS, PAPER_MAX_PIXELS])
def test_target_content_spans_only_a_few_pixels_of_the_overview(tmp_path, max_pixels):
    ss = list(
        iter_synthetic_samples(tmp_path, 3, seed=7, width=3840, height=2160, overview_max_pixels=max_pixels)
    )
    w_in, _ = overview_size(3840, 2160, min_pixels=12544, max_pixels=max_pixels)
    for s in ss:
        side = s.gt_boxes[0][2] - s.gt_boxes[0][0]
        c = content_box(int(side))
        content_in_overview = (c[2] - c[0]) * w_in / 3840
        # A glyph or shape needs ~8 pixels to be told apart; the content gets at most 4.
        assert content_in_overview <= 4.0, (s.id, side, content_in_overview)
        assert side >= 16  # legible at full resolution (see the crop test)


def test_target_is_the_only_white_tag_and_lies_inside_its_box():
    rng = random.Random("probe")
    img, target = make_synthetic_image(rng, 1600, 1200, kind="shape", overview_max_pixels=TINY_MAX_PIXELS)
    arr = np.asarray(img)
    white = np.argwhere(arr.min(axis=2) >= 250)  # pure white: only the target tag's background
    x1, y1, x2, y2 = target["box"]
    assert len(white) > 0
    assert (
        white[:, 1].min() >= x1
        and white[:, 1].max() < x2
        and white[:, 0].min() >= y1
        and white[:, 0].max() < y2
    )


def test_train_and_eval_splits_are_disjoint_and_each_has_its_jsonl(tmp_path):
    paths = write_synthetic_dataset(tmp_path, 4, 3, seed=0, width=640, height=480)
    train, ev = read_samples_jsonl(paths["train"]), read_samples_jsonl(paths["eval"])
    assert len(train) == 4 and len(ev) == 3
    assert not {s.id for s in train} & {s.id for s in ev}
    train_bytes = {open(s.image_path, "rb").read() for s in train}
    assert not train_bytes & {open(s.image_path, "rb").read() for s in ev}


def test_bad_generator_arguments_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic kinds"):
        next(iter_synthetic_samples(tmp_path, 1, kinds=("size",)))
    with pytest.raises(ValueError, match="too small"):
        next(iter_synthetic_samples(tmp_path, 1, width=50, height=50))
    with pytest.raises(ValueError, match="n_choices"):
        next(iter_synthetic_samples(tmp_path, 1, n_choices=9, kinds=("colour",)))
