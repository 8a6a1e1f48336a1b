"""Training data contained at load time (issue 26, item 4): a hand-written ``data.train_path`` / ``eval_path``
whose rows name images outside the dataset's folder (or ``data.root``) has those rows dropped as
``path_outside_root`` and counted; a split with nothing left is refused with the fix; the filter stage's own
datasets inside the state folder keep loading from the input folders their manifest records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from mgpo_core.config import load_config
from mgpo_core.data.splits import load_eval_samples, load_training_samples


def _row(i: int, image: Path | str) -> dict:
    return {"id": f"r{i}", "image_path": str(image), "question": "What colour is the tag?",
            "choices": ["red", "green"], "answer": "A", "source": "hand"}  # fmt: skip


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    """``hand/`` (a hand-written split with one image inside), ``secret.png`` beside it, a symlink out of it,
    and a separate state folder."""
    hand = tmp_path / "hand"
    hand.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(hand / "inside.png")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "secret.png")
    (hand / "link.png").symlink_to(tmp_path / "secret.png")
    return {"root": tmp_path, "hand": hand, "state": tmp_path / "state"}


def _write(path: Path, images: list[Path | str]) -> Path:
    path.write_text("".join(json.dumps(_row(i, im)) + "\n" for i, im in enumerate(images)))
    return path


def _cfg(layout: dict[str, Path], **sets: str):
    return load_config("tiny-cpu", [f"state_dir={layout['state']}", *(f"{k}={v}" for k, v in sets.items())])


def test_rows_escaping_the_split_folder_are_dropped_and_counted(layout, caplog):
    hand, root = layout["hand"], layout["root"]
    escapes = [
        root / "secret.png",
        hand / "link.png",
        hand / "sub" / ".." / ".." / "secret.png",
        "/etc/hostname",
    ]
    split = _write(hand / "samples.jsonl", [hand / "inside.png", *escapes])
    with caplog.at_level(logging.WARNING, logger="mgpo_core.data.splits"):
        for key, load in (("train_path", load_training_samples), ("eval_path", load_eval_samples)):
            caplog.clear()
            samples = load(_cfg(layout, **{f"data.{key}": str(hand)}))
            assert [s.id for s in samples] == ["r0"], "only the row whose image lies in the split's folder"
            assert (
                f"data.{key}" in caplog.text and "4 of 5 rows dropped (path_outside_root: 4)" in caplog.text
            )
    assert split.exists()


def test_data_root_names_the_one_folder_images_may_come_from(layout):
    hand, root = layout["hand"], layout["root"]
    split = _write(hand / "train.jsonl", [hand / "inside.png", root / "secret.png"])
    kept = load_training_samples(_cfg(layout, **{"data.train_path": str(split), "data.root": str(root)}))
    assert [s.id for s in kept] == ["r0", "r1"], "both images lie under data.root"
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ValueError, match=r"path_outside_root: 2"):  # data.root replaces the split's folder
        load_training_samples(_cfg(layout, **{"data.train_path": str(split), "data.root": str(elsewhere)}))


def test_a_split_with_every_row_outside_is_refused_with_the_fix(layout):
    split = _write(layout["hand"] / "train.jsonl", [layout["root"] / "secret.png", "/etc/hostname"])
    with pytest.raises(ValueError, match=r"every row was dropped \(path_outside_root: 2\).*data\.root"):
        load_training_samples(_cfg(layout, **{"data.train_path": str(split)}))


def test_a_filtered_dataset_in_the_state_folder_loads_from_its_recorded_inputs(layout):
    """The filter stage's output names images next to its inputs; its manifest (written by the filter, inside
    the state folder) records those folders. The same files copied outside the state folder get no such trust."""
    hand = layout["hand"]
    dataset = layout["state"] / "datasets" / "0123456789abcdef"
    dataset.mkdir(parents=True)
    _write(dataset / "samples.jsonl", [hand / "inside.png"])
    manifest = {"inputs": [{"path": str(hand / "in.jsonl"), "format": "mgpo", "rows": 1}],
                "config": {"data": {"root": None, "image_root": None}}}  # fmt: skip
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    assert [s.id for s in load_training_samples(_cfg(layout, **{"data.train_path": str(dataset)}))] == ["r0"]

    copied = layout["root"] / "copied"
    copied.mkdir()
    for name in ("samples.jsonl", "manifest.json"):
        (copied / name).write_bytes((dataset / name).read_bytes())
    with pytest.raises(ValueError, match="path_outside_root"):
        load_training_samples(_cfg(layout, **{"data.train_path": str(copied)}))
