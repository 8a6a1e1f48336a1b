"""Issue 29: the synthetic set draws each image's aspect ratio and size (``data.synthetic_geometry``), the tag keeps
its size in any overview (findable there, its mark unreadable there), and the held-out band shares no aspect ratio
and no size with the trained one."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from PIL import Image

from mgpo_core.config import load_config
from mgpo_core.data.synthetic import (
    GEOMETRIES,
    iter_synthetic_samples,
    synthetic_options,
    synthetic_split_for,
)
from mgpo_core.imaging import overview_size
from mgpo_core.modeling.base_tasks import SceneSpec, make_scene

TINY = {"min_pixels": 12544, "max_pixels": 50176}
REF_W, REF_H = 1024, 768


def _tiny_opts(geometry: str) -> dict:
    opts = synthetic_options(load_config("tiny-base-cpu"))
    return {**opts, "geometry": geometry}


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return list(iter_synthetic_samples(tmp_path_factory.mktemp("varied"), 24, split="eval", **_tiny_opts("varied")))


def _size(sample) -> tuple[int, int]:
    with Image.open(sample.image_path) as im:
        return im.size


def test_the_default_preset_draws_varied_geometry():
    assert load_config("tiny-base-cpu").data.synthetic_geometry == "varied"


def test_varied_images_cover_several_aspect_ratios_and_sizes_deterministically(varied, tmp_path):
    sizes = [_size(s) for s in varied]
    ratios = Counter(round(w / h, 2) for w, h in sizes)
    assert len(ratios) >= 4, ratios  # 24 draws from six ratios
    areas = [w * h / (REF_W * REF_H) for w, h in sizes]
    assert 0.55 <= min(areas) and max(areas) <= 2.05 and max(areas) / min(areas) > 1.5, areas
    again = list(iter_synthetic_samples(tmp_path, 3, split="eval", **_tiny_opts("varied")))
    for a, b in zip(again, varied[:3], strict=True):
        assert open(a.image_path, "rb").read() == open(b.image_path, "rb").read()


def test_overview_grids_vary_and_the_tag_keeps_its_overview_size(varied):
    grids, tag_px = set(), []
    for s in varied:
        w, h = _size(s)
        ow, oh = overview_size(w, h, **TINY)
        grids.add((ow // 28, oh // 28))
        x1, y1, x2, y2 = s.gt_boxes[0]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        tag_px.append((x2 - x1) * ow / w)
        mark = 0.25 * (x2 - x1) * ow / w
        assert mark <= 6.0, (s.id, mark)  # the colour mark stays unreadable in the overview
    assert len(grids) >= 3, grids
    assert 14 <= min(tag_px) and max(tag_px) <= 24, tag_px  # findable in every overview (~20 px)


def test_heldout_band_shares_no_aspect_ratio_or_size_with_training():
    train, held = GEOMETRIES["varied"], GEOMETRIES["heldout"]
    assert not {a / b for a, b in train.aspects} & {a / b for a, b in held.aspects}
    assert train.area[1] < held.area[0]
    trained_grids = set()
    for a, b in train.aspects:
        for f in (train.area[0], 1.0, train.area[1]):
            w = round(math.sqrt(REF_W * REF_H * f * a / b))
            ow, oh = overview_size(w, round(REF_W * REF_H * f / w), **TINY)
            trained_grids.add((ow // 28, oh // 28))
    held_grids = set()
    for a, b in held.aspects:
        w = round(math.sqrt(REF_W * REF_H * 2.5 * a / b))
        ow, oh = overview_size(w, round(REF_W * REF_H * 2.5 / w), **TINY)
        held_grids.add((ow // 28, oh // 28))
    assert held_grids - trained_grids, (held_grids, trained_grids)  # overview layouts training never shows


def test_cached_split_folders_name_their_geometry(tmp_path):
    fixed = load_config("tiny-base-cpu", [f"state_dir={tmp_path}", "data.synthetic_geometry=fixed",
                                          "data.synthetic_eval=2"])
    held = load_config("tiny-base-cpu", [f"state_dir={tmp_path}", "data.synthetic_geometry=heldout",
                                         "data.synthetic_eval=2"])
    a, b = synthetic_split_for(fixed, "eval"), synthetic_split_for(held, "eval")
    assert a.parent != b.parent and "heldout" in b.parent.name
    assert {_size_of(p) for p in a.parent.glob("*.jpg")} == {(REF_W, REF_H)}
    assert all(_size_of(p)[0] * _size_of(p)[1] > 2.1 * REF_W * REF_H for p in b.parent.glob("*.jpg"))


def _size_of(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_unknown_geometry_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic geometry 'square'"):
        next(iter_synthetic_samples(tmp_path / "out", 1, geometry="square"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="synthetic_geometry"):
        load_config("tiny-base-cpu", ["data.synthetic_geometry=square"])


def test_base_scenes_of_a_varied_spec_vary_and_fixed_ones_do_not():
    varied = SceneSpec(geometry="varied")
    sizes = {make_scene(f"geo:{i}", varied).original_size for i in range(12)}
    assert len({round(w / h, 2) for w, h in sizes}) >= 3
    assert {make_scene(f"geo:{i}", SceneSpec()).original_size for i in range(4)} == {(REF_W, REF_H)}


def test_the_trainer_validates_on_the_held_out_band_only_when_asked(tmp_path):
    from mgpo_core.data.splits import validation_sets

    over = [f"state_dir={tmp_path}", "data.synthetic_eval=3", "evaluation.during_training_limit=2"]
    assert set(validation_sets(load_config("tiny-base-cpu", over))) == {"val"}
    sets = validation_sets(load_config("tiny-base-cpu", [*over, "evaluation.during_training_heldout=true"]))
    assert set(sets) == {"val", "val_heldout"} and len(sets["val_heldout"]) == 2
    for s in sets["val_heldout"]:
        w, h = _size_of(s.image_path)
        assert w * h > 2.1 * REF_W * REF_H and round(w / h, 2) in {1.5, 0.67, 1.25, 0.8}, (w, h)
    assert not {s.image_path for s in sets["val"]} & {s.image_path for s in sets["val_heldout"]}
