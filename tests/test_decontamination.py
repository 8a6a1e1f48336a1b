"""Decontamination: training rows whose image (or image and question) belongs to a configured evaluation
benchmark are dropped as ``eval_overlap`` and counted per benchmark, on files in the published formats
(MME-RealWorld JSON + image folder, its Lite subset published apart, an HR-Bench TSV); the preflight's
``overlap_report`` counts the same rows; and a real model never trains on the synthetic set by accident."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mgpo_core.config import load_config
from mgpo_core.data.decontaminate import EvalOverlapError, build_eval_index, overlap_report
from mgpo_core.data.readers import DataInputError
from mgpo_core.data.stage import require_training_inputs, run_filter_stage

P = "mme-realworld/"  # the reader's id prefix
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _item(qid: str, image: str, text: str, gt: str = "A") -> dict:
    return {
        "Question_id": qid,
        "Question Type": "Multiple Choice",
        "Image": image,
        "Text": text,
        "Answer choices": ["(A) red", "(B) green", "(C) blue", "(D) grey", "(E) none"],
        "Ground truth": gt,
        "Task": "Perception",
        "Subtask": "Color",
        "Category": "attribute",
        "Dataset": "remote_sensing",
    }


@pytest.fixture()
def published(tmp_path: Path) -> dict[str, Path]:
    """MME-RealWorld (6 images, 8 questions) with its images in their own folder; the Lite subset as published
    apart (its own JSON and a copy of the images it uses); an HR-Bench 4K TSV embedding one training image."""
    images = tmp_path / "mme" / "images"
    images.mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (96, 64), colour).save(images / f"{i}.png")
    full = [_item(f"rs/{i}", f"{i}.png", f"What colour is area {i}?") for i in range(6)]
    full += [
        _item("rs/1b", "1.png", "Which colour covers the top half?"),  # Lite image, another question
        _item("rs/5b", "5.png", "What colour is area 1?"),  # a Lite question's text, another image
    ]
    train = tmp_path / "mme" / "MME_RealWorld.json"
    train.write_text(json.dumps(full))
    lite_images = tmp_path / "lite" / "imgs"
    lite_images.mkdir(parents=True)
    for i in (0, 1):
        shutil.copy(images / f"{i}.png", lite_images / f"lite-{i}.png")  # same bytes, other names
    lite = tmp_path / "lite" / "MME_RealWorld_Lite.json"
    lite.write_text(
        json.dumps([_item(f"lite/{i}", f"lite-{i}.png", f"What colour is area {i}?") for i in (0, 1)])
    )
    buf = io.BytesIO((images / "3.png").read_bytes())
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    row = [
        "0",
        "Which colour?",
        "A",
        "single",
        "red",
        "green",
        "blue",
        "grey",
        "0",
        base64.b64encode(buf.getvalue()).decode(),
    ]
    hr = tmp_path / "hr" / "hr_bench_4k.tsv"
    hr.parent.mkdir()
    hr.write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    return {"train": train, "images": images, "lite": lite, "lite_images": lite_images, "hr": hr}


def _cfg(tmp_path: Path, files: dict[str, Path], *extra: str):  # noqa: ANN202
    return load_config(
        "tiny-cpu",
        [
            f"state_dir={tmp_path / 'state'}",
            f"data.image_root={files['images']}",
            "evaluation.benchmarks=[mme_realworld_lite, hrbench_4k, synthetic]",
            f"evaluation.data_paths={{mme_realworld_lite: {files['lite']}, hrbench_4k: {files['hr']}}}",
            f"evaluation.image_roots={{mme_realworld_lite: {files['lite_images']}}}",
            *extra,
        ],
    )


def test_filter_drops_evaluation_images_and_counts_them_per_benchmark(tmp_path, published) -> None:
    cfg = _cfg(tmp_path, published)
    result = run_filter_stage(cfg, [published["train"]], tmp_path / "out", progress=False)
    rep = result.report
    kept = [json.loads(line)["id"] for line in result.samples_path.read_text().splitlines()]
    # Lite's two images (rs/0, rs/1 and rs/1b on the same image), HR-Bench's one (rs/3)
    assert kept == [f"{P}rs/2", f"{P}rs/4", f"{P}rs/5", f"{P}rs/5b"]
    assert rep["counts"] == {"in": 8, "kept": 4, "dropped": 4}
    assert rep["dropped_by_reason"] == {"eval_overlap": 4}
    overlap = rep["eval_overlap"]
    assert overlap["per_benchmark"] == {"mme_realworld_lite": 3, "hrbench_4k": 1}
    assert overlap["dropped_rows"] == 4
    assert overlap["checked"]["mme_realworld_lite"]["questions"] == 2
    assert set(overlap["not_checked"]) == {"synthetic"}
    details = {
        d["excerpt"].split("'")[1]: d["detail"]
        for d in map(json.loads, (result.dataset_dir / "dropped.jsonl").read_text().splitlines())
    }
    assert f"mme_realworld_lite '{P}lite/1' (same question)" in details[f"{P}rs/1"]
    assert f"mme_realworld_lite '{P}lite/1' (same image)" in details[f"{P}rs/1b"]
    assert "hrbench_4k" in details[f"{P}rs/3"]
    md = (result.dataset_dir / "report.md").read_text()
    assert "- mme_realworld_lite: 3" in md and "- hrbench_4k: 1" in md


def test_preflight_overlap_report_counts_the_rows_the_filter_drops(tmp_path, published) -> None:
    cfg = _cfg(tmp_path, published)
    assert overlap_report(cfg, [published["train"]]) == {"mme_realworld_lite": 3, "hrbench_4k": 1}
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([_item("x", str(published["images"] / "4.png"), "Anything?")]))
    assert overlap_report(cfg, [clean]) == {"mme_realworld_lite": 0, "hrbench_4k": 0}


def test_the_index_is_cached_and_rebuilt_when_the_benchmark_changes(tmp_path, published) -> None:
    cfg = _cfg(tmp_path, published)
    first = build_eval_index(cfg)
    cached = sorted((tmp_path / "state" / "data" / "eval-index").glob("*.json"))
    assert [p.name.split("-")[0] for p in cached] == ["hrbench_4k", "mme_realworld_lite"]
    again = build_eval_index(cfg)
    assert {b.name: dict(b.images) for b in again.benchmarks} == {
        b.name: dict(b.images) for b in first.benchmarks
    }
    shutil.copy(published["images"] / "4.png", published["lite_images"] / "lite-4.png")
    items = json.loads(published["lite"].read_text()) + [
        _item("lite/4", "lite-4.png", "What colour is area 4?")
    ]
    published["lite"].write_text(json.dumps(items))
    grown = build_eval_index(cfg)
    assert grown.benchmarks[0].questions == 3
    assert overlap_report(cfg, [published["train"]])["mme_realworld_lite"] == 4


def test_unreadable_benchmark_data_stops_the_filter_before_any_row_unless_the_check_is_off(
    tmp_path, published
) -> None:
    published["lite"].write_text("{not json")
    cfg = _cfg(tmp_path, published)
    with pytest.raises(
        EvalOverlapError, match=r"mme_realworld_lite.*evaluation\.data_paths\.mme_realworld_lite"
    ):
        run_filter_stage(cfg, [published["train"]], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    off = _cfg(tmp_path, published, "data.filters.eval_overlap=false")
    result = run_filter_stage(off, [published["train"]], tmp_path / "out", progress=False)
    assert result.report["counts"]["kept"] == 8 and result.report["eval_overlap"] is None


def test_a_real_model_refuses_to_train_on_the_synthetic_set_unless_told(tmp_path, tiny_dir) -> None:
    real = load_config("tiny-cpu", [f"model.path={tiny_dir}"])
    with pytest.raises(
        DataInputError, match=r"mgpo run --input <MME-RealWorld JSON>.*data\.allow_synthetic=true"
    ):
        require_training_inputs(real, [])
    require_training_inputs(real, ["train.json"])  # data given
    require_training_inputs(
        load_config("tiny-cpu", [f"model.path={tiny_dir}", "data.allow_synthetic=true"]), []
    )
    require_training_inputs(load_config("tiny-cpu", [f"model.path={tiny_dir}", "data.train_path=/d"]), [])
    require_training_inputs(load_config("tiny-cpu"), [])  # the built-in tiny model: synthetic is its data
