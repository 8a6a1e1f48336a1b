"""The validation split checkpoint selection scores: held out of the training data by the filter stage."""

from __future__ import annotations

import json

import pytest

from mgpo_core.config import load_config
from mgpo_core.data.published import write_published_sets
from mgpo_core.data.stage import run_filter_stage
from mgpo_core.data.synthetic import read_samples_jsonl


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_published_sets(tmp_path_factory.mktemp("d") / "data", train=12, per_benchmark=2, overlap=0)["train"]


def _filter(tmp_path, train_file, rows: int):
    cfg = load_config("tiny-cpu", [f"state_dir={tmp_path}", f"data.validation_rows={rows}"])
    return run_filter_stage(cfg, [str(train_file)], tmp_path / "datasets", progress=False)


def test_filter_holds_out_the_validation_rows_and_accounts_for_every_row(tmp_path, train_file):
    res = _filter(tmp_path / "a", train_file, 3)
    train = read_samples_jsonl(res.dataset_dir / "samples.jsonl")
    val = read_samples_jsonl(res.dataset_dir / "validation.jsonl")
    assert (len(train), len(val)) == (9, 3)
    assert not {s.id for s in train} & {s.id for s in val}, "a validation row is also trained on"
    counts = res.report["counts"]
    assert counts == {"in": 12, "kept": 12, "dropped": 0, "train": 9, "validation": 3}
    manifest = json.loads((res.dataset_dir / "manifest.json").read_text())
    assert manifest["files"]["validation"] == "validation.jsonl" and manifest["validation_rows"] == 3
    again = _filter(tmp_path / "b", train_file, 3)
    assert again.dataset_dir.name == res.dataset_dir.name, "the same rows are held out every time"
    assert _filter(tmp_path / "c", train_file, 0).dataset_dir.name != res.dataset_dir.name
    assert not (_filter(tmp_path / "d", train_file, 0).dataset_dir / "validation.jsonl").exists()


def test_holding_out_every_row_is_refused(tmp_path, train_file):
    with pytest.raises(ValueError, match="would hold out all 12"):
        _filter(tmp_path, train_file, 12)


def test_the_validation_benchmark_reads_the_held_out_split(tmp_path, train_file):
    from mgpo_core.evaluation.benchmarks import get_benchmark
    from mgpo_core.evaluation.spec import ReadContext

    res = _filter(tmp_path, train_file, 4)
    cfg = load_config("tiny-cpu", [f"state_dir={tmp_path}"])
    spec = get_benchmark("validation")
    ctx = ReadContext(cfg=cfg, path=res.dataset_dir / "validation.jsonl", work_dir=tmp_path / "w")
    assert len(spec.read(ctx)) == 4
    with pytest.raises(FileNotFoundError, match="validation_rows"):
        spec.read(ReadContext(cfg=cfg, path=tmp_path / "missing.jsonl", work_dir=tmp_path / "w"))
