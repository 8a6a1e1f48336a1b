"""Path containment in every reader (issue 26, item 4): an image path in a data row that resolves outside the
reader's roots (``../``, an absolute path, a symlink out) is dropped as ``path_outside_root`` and counted; the
same row pointing inside is read. Formats: mgpo (JSONL and parquet), canonical JSONL, MME-RealWorld, V* parquet /
JSONL, the V* folder (symlinked image); and the evaluation path (benchmark readers with ``evaluation.image_roots``
and ``data.root``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgpo_core.config import load_config
from mgpo_core.data.readers import ImageCache, ReadContext, read_rows, read_samples
from mgpo_core.evaluation.benchmarks import read_with_data_readers
from mgpo_core.evaluation.spec import ReadContext as EvalContext


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    """``data/`` (the input's folder, one image inside), ``secret.png`` beside it (outside), a symlink in data/
    pointing at it."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(data / "inside.png")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "secret.png")
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    return {"root": tmp_path, "data": data}


ESCAPES = ["../secret.png", "{root}/secret.png", "link.png", "./sub/../../secret.png"]


def _paths(layout: dict[str, Path]) -> list[str]:
    return ["inside.png", *(e.format(root=layout["root"]) for e in ESCAPES)]


def _reasons(path: Path, fmt: str, cache: Path) -> Counter:
    rows = list(read_rows(path, fmt, ctx=_ctx(path, cache)))
    return Counter(r.reason if r.sample is None else "ok" for r in rows)


def _ctx(path: Path, cache: Path) -> ReadContext:
    c = ImageCache(cache)
    return ReadContext(c, image_roots=(path.parent.resolve(), c.root))


def _mgpo_row(image: str, i: int) -> dict:
    return {"id": f"r{i}", "image": image, "question": "What colour?", "choices": "(A) red\n(B) green",
            "reward_model": {"ground_truth": "B"}}  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _expect(counts: Counter, n_escapes: int = len(ESCAPES)) -> None:
    assert counts == Counter({"ok": 1, "path_outside_root": n_escapes}), counts


def test_mgpo_jsonl_and_parquet_rows_cannot_escape(layout, tmp_path):
    rows = [_mgpo_row(p, i) for i, p in enumerate(_paths(layout))]
    _expect(_reasons(_write_jsonl(layout["data"] / "train.jsonl", rows), "mgpo", tmp_path / "cache"))
    pq.write_table(pa.Table.from_pylist(rows), layout["data"] / "train.parquet")
    _expect(_reasons(layout["data"] / "train.parquet", "mgpo", tmp_path / "cache"))


def test_canonical_jsonl_rows_cannot_escape(layout, tmp_path):
    rows = [{"id": f"c{i}", "image_path": p, "question": "Which?", "choices": ["red", "green"], "answer": "B"}
            for i, p in enumerate(_paths(layout))]  # fmt: skip
    _expect(_reasons(_write_jsonl(layout["data"] / "samples.jsonl", rows), "jsonl", tmp_path / "cache"))


def test_mme_realworld_rows_cannot_escape(layout, tmp_path):
    items = [{"Question_id": f"q{i}", "Image": p, "Text": "How many?", "Answer choices": ["(A) 1", "(B) 2"],
              "Ground truth": "A"} for i, p in enumerate(_paths(layout))]  # fmt: skip
    path = layout["data"] / "mme.json"
    path.write_text(json.dumps(items))
    _expect(_reasons(path, "mme-realworld", tmp_path / "cache"))


def test_vstar_table_rows_cannot_escape_and_embedded_bytes_stay_allowed(layout, tmp_path):
    rows = [{"image": {"bytes": None, "path": p}, "text": "Colour? (A) red (B) green", "label": "B",
             "question_id": i} for i, p in enumerate(_paths(layout))]  # fmt: skip
    rows.append({"image": {"bytes": (layout["data"] / "inside.png").read_bytes(), "path": "../../x.png"},
                 "text": "Colour? (A) red (B) green", "label": "B", "question_id": 99})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), layout["data"] / "vstar.parquet")
    counts = _reasons(layout["data"] / "vstar.parquet", "vstar-parquet", tmp_path / "cache")
    assert counts == Counter({"ok": 2, "path_outside_root": len(ESCAPES)}), counts


def test_vstar_folder_image_symlinked_out_is_refused(layout, tmp_path):
    folder = layout["data"] / "vstar" / "direct_attributes"
    folder.mkdir(parents=True)
    for name, target in (("good", layout["data"] / "inside.png"), ("bad", layout["root"] / "secret.png")):
        (folder / f"{name}.json").write_text(json.dumps({"question": "Colour?", "options": ["green", "red"]}))
        if name == "good":
            Image.open(target).save(folder / f"{name}.png")
        else:
            (folder / f"{name}.png").symlink_to(target)
    cache = ImageCache(tmp_path / "cache")
    ctx = ReadContext(cache, image_roots=((layout["data"] / "vstar").resolve(), cache.root))
    rows = list(read_rows(layout["data"] / "vstar", "vstar", ctx=ctx))
    assert sorted(r.reason if r.sample is None else "ok" for r in rows) == ["ok", "path_outside_root"]


def test_read_samples_contains_to_the_input_folder_by_default(layout, tmp_path):
    rows = [_mgpo_row(p, i) for i, p in enumerate(_paths(layout))]
    path = _write_jsonl(layout["data"] / "train.jsonl", rows)
    assert [s.id for s in read_samples(path, "mgpo", image_dir=tmp_path / "cache")] == ["r0"]
    wider = read_samples(path, "mgpo", image_dir=tmp_path / "cache", image_roots=[layout["root"]])
    assert len(wider) == len(rows), "a root the operator names widens the allowed set"


def test_benchmark_readers_contain_to_the_image_root_or_data_root(layout, tmp_path):
    items = [{"Question_id": f"q{i}", "Image": p, "Text": "How many?", "Answer choices": ["(A) 1", "(B) 2"],
              "Ground truth": "A"} for i, p in enumerate(_paths(layout))]  # fmt: skip
    path = layout["data"] / "mme.json"
    path.write_text(json.dumps(items))
    cfg = load_config("tiny-cpu", [f"state_dir={tmp_path / 'state'}"])
    ctx = EvalContext(path, tmp_path / "out", cfg)
    assert [s.id for s in read_with_data_readers(ctx, "mme-realworld")] == ["mme-realworld/q0"]
    cfg = load_config("tiny-cpu", [f"state_dir={tmp_path / 'state'}", f"data.root={layout['root']}"])
    assert len(read_with_data_readers(EvalContext(path, tmp_path / "out", cfg), "mme-realworld")) == len(items)
