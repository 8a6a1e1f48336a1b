"""Synthetic scenes written in the benchmarks' published file formats (METHOD.md §4), for the 7B rehearsal.

``write_published_sets(out)`` writes, from the synthetic generator:

- ``mme_realworld/MME-RealWorld.json`` + ``mme_realworld/images/``: the training file (one JSON list, relative
  image paths, ``"(A) ..."`` choices, a ground-truth letter);
- ``mme_realworld/MME-RealWorld-Lite.json``: the evaluation subset; as in the real release, part of it (the
  ``overlap`` first items) is ALSO in the training file, so decontamination has something to remove;
- ``vstar/direct_attributes/*.jpg|json`` and ``vstar/relative_position/``: V* Bench folders (``bbox`` as
  ``[x, y, w, h]``, the correct option listed first);
- ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv``: HR-Bench TSVs, each question four times with its options rotated
  (``cycle_category``), the image as base64 on the first row and as a row reference on the repeats.

Returns the paths a preset's ``evaluation.data_paths`` and ``mgpo run --input`` take (``published_paths``).
Deterministic from the seed.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgpo_core.data.schema import LETTERS, Sample
from mgpo_core.data.synthetic import iter_synthetic_samples


def _mme_item(s: Sample, image_rel: str, qid: str) -> dict[str, Any]:
    return {
        "Question_id": qid,
        "Question Type": "Multiple Choice",
        "Image": image_rel,
        "Text": s.question,
        "Answer choices": [f"({LETTERS[k]}) {c}" for k, c in enumerate(s.choices)],
        "Ground truth": s.answer,
        "Task": "Perception",
        "Subtask": "Attribute Recognition",
        "Category": "color",
        "Dataset": "MGPO-rehearsal",
    }


def _four_options(s: Sample) -> list[str]:
    """The correct option first, then the next three (V* and HR-Bench offer four; the synthetic set six)."""
    right = s.choices[LETTERS.index(s.answer)]
    return [right] + [c for c in s.choices if c != right][:3]


def _write_mme(out: Path, train: Sequence[Sample], lite: Sequence[Sample], overlap: int) -> dict[str, Path]:
    images = out / "images"
    images.mkdir(parents=True)
    items_train, items_lite = [], []
    for i, s in enumerate(train):
        rel = f"images/train_{i:05d}{Path(s.image_path).suffix}"
        shutil.copy2(s.image_path, out / rel)
        items_train.append(_mme_item(s, rel, f"perception/attr/{i:05d}"))
    items_lite = list(items_train[:overlap])  # the Lite subset is drawn from the full set
    for i, s in enumerate(lite):
        rel = f"images/lite_{i:05d}{Path(s.image_path).suffix}"
        shutil.copy2(s.image_path, out / rel)
        items_lite.append(_mme_item(s, rel, f"perception/attr/lite-{i:05d}"))
    (out / "MME-RealWorld.json").write_text(json.dumps(items_train, indent=1))
    (out / "MME-RealWorld-Lite.json").write_text(json.dumps(items_lite, indent=1))
    return {"train": out / "MME-RealWorld.json", "lite": out / "MME-RealWorld-Lite.json"}


def _write_vstar(out: Path, samples: Sequence[Sample]) -> Path:
    for i, s in enumerate(samples):
        relative = i % 3 == 2  # a third are "relative position" questions with two options
        folder = out / ("relative_position" if relative else "direct_attributes")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"sa_{i:05d}"
        shutil.copy2(s.image_path, folder / f"{name}.jpg")
        x1, y1, x2, y2 = s.gt_boxes[0]
        options = _four_options(s)[: 2 if relative else 4]
        meta = {
            "target_object": ["tag"],
            "bbox": [[round(x1), round(y1), round(x2 - x1), round(y2 - y1)]],
            "question": s.question,
            "options": options,
        }
        (folder / f"{name}.json").write_text(json.dumps(meta))
    return out


def _write_hrbench(path: Path, samples: Sequence[Sample]) -> Path:
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        index = 0
        for q, s in enumerate(samples):
            options = _four_options(s)
            b64 = base64.b64encode(Path(s.image_path).read_bytes()).decode()
            for cycle in range(4):  # each question four times, its options rotated
                rot = options[cycle:] + options[:cycle]
                answer = LETTERS[rot.index(options[0])]
                image = b64 if cycle == 0 else str(index - cycle)
                w.writerow([index, s.question, answer, "single" if q % 2 == 0 else "cross", *rot,
                            f"cycle{q}", image])  # fmt: skip
                index += 1
    return path


def write_published_sets(
    out_dir: str | Path,
    *,
    train: int = 48,
    per_benchmark: int = 8,
    overlap: int = 4,
    seed: int = 0,
    width: int = 1024,
    height: int = 768,
    overview_max_pixels: int = 50176,
    kinds: Sequence[str] = ("colour",),
) -> dict[str, Path]:
    """Write the training file and the four evaluation sets under ``out_dir`` (replaced); returns their paths.

    ``overlap`` of the Lite file's items are copies of training items (as MME-RealWorld-Lite is a subset of
    MME-RealWorld); every other evaluation image is drawn from a separate random stream.
    """
    if overlap > train:
        raise ValueError(f"overlap={overlap} is more than the {train} training items it copies")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    scratch = out / ".scenes"
    opts: dict[str, Any] = dict(seed=seed, width=width, height=height, kinds=tuple(kinds),
                                overview_max_pixels=overview_max_pixels, n_choices=4)  # fmt: skip
    tr = list(iter_synthetic_samples(scratch / "train", train, split="train", **opts))
    ev = list(iter_synthetic_samples(scratch / "eval", 4 * per_benchmark, split="eval", **opts))
    big = list(iter_synthetic_samples(scratch / "eval8k", per_benchmark, split="eval8k",
                                      **{**opts, "width": 2 * width, "height": 2 * height}))  # fmt: skip
    mme = _write_mme(out / "mme_realworld", tr, ev[:per_benchmark], overlap)
    paths = {
        "train": mme["train"],
        "mme_realworld_lite": mme["lite"],
        "vstar": _write_vstar(out / "vstar", ev[per_benchmark : 3 * per_benchmark]),
        "hrbench_4k": _write_hrbench(out / "hr_bench_4k.tsv", ev[3 * per_benchmark :]),
        "hrbench_8k": _write_hrbench(out / "hr_bench_8k.tsv", big),
    }
    shutil.rmtree(scratch)
    (out / "README.txt").write_text(
        "Synthetic scenes in the published formats (mgpo data published). Train on "
        "mme_realworld/MME-RealWorld.json; evaluate on the others. The Lite file's first "
        f"{overlap} items are also in the training file.\n"
    )
    return paths


def published_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where ``write_published_sets(out_dir)`` puts each file (without writing anything)."""
    out = Path(out_dir)
    return {
        "train": out / "mme_realworld" / "MME-RealWorld.json",
        "mme_realworld_lite": out / "mme_realworld" / "MME-RealWorld-Lite.json",
        "vstar": out / "vstar",
        "hrbench_4k": out / "hr_bench_4k.tsv",
        "hrbench_8k": out / "hr_bench_8k.tsv",
    }
