"""The filter stage's output (a directory named by its content hash, manifest, report), its switches, and the
``mgpo data`` command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from mgpo_cli.data import FORMAT_CHOICES
from mgpo_cli.main import main
from mgpo_core.config import load_config
from mgpo_core.data.readers import FORMATS, DataInputError
from mgpo_core.data.stage import InputSpec, run_filter_stage
from mgpo_core.data.synthetic import read_samples_jsonl, write_synthetic_split


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_split(tmp_path_factory.mktemp("synth"), 6, seed=3, width=640, height=480)


def _cfg(tmp_path: Path, *overrides: str):  # noqa: ANN202
    return load_config("tiny-cpu", [f"state_dir={tmp_path / 'state'}", *overrides])


def _rows_file(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "data" / "rows.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_directory_is_named_by_the_hash_of_its_samples_and_holds_manifest_and_report(tmp_path, synth):
    result = run_filter_stage(_cfg(tmp_path), [synth], tmp_path / "out", progress=False)
    data = result.samples_path.read_bytes()
    assert result.manifest["samples_sha256"] == hashlib.sha256(data).hexdigest()
    assert len(result.dataset_dir.name) == 16
    assert sorted(p.name for p in result.dataset_dir.iterdir()) == [
        "dropped.jsonl",
        "manifest.json",
        "report.json",
        "report.md",
        "samples.jsonl",
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [result.dataset_dir.name]  # no temp dir left
    manifest = json.loads((result.dataset_dir / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["counts"] == {"in": 6, "kept": 6, "dropped": 0}
    assert manifest["config"]["data"]["filters"]["dedupe"] is True and manifest["config_hash"]
    assert set(manifest["code_version"]) == {"package", "git_commit", "git_dirty"}
    assert json.loads((result.dataset_dir / "report.json").read_text()) == result.report
    # The output is a training manifest: the canonical reader gets the same samples, paths made absolute.
    kept = read_samples_jsonl(result.samples_path)
    assert [s.id for s in kept] == [s.id for s in read_samples_jsonl(synth)]
    assert all(Path(s.image_path).is_absolute() for s in kept)
    assert all(len(json.loads(line)["image_sha256"]) == 64 for line in data.decode().splitlines())


def test_rerun_on_the_same_input_gives_the_same_directory_and_bytes(tmp_path, synth):
    a = run_filter_stage(_cfg(tmp_path), [synth], tmp_path / "out", progress=False)
    first = a.samples_path.read_bytes()
    b = run_filter_stage(_cfg(tmp_path), [synth], tmp_path / "out", progress=False)
    assert b.dataset_dir == a.dataset_dir and b.samples_path.read_bytes() == first
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_a_changed_row_gives_a_new_directory(tmp_path, synth):
    a = run_filter_stage(_cfg(tmp_path), [synth], tmp_path / "out", progress=False)
    rows = [json.loads(x) for x in synth.read_text().splitlines()]
    rows[0]["question"] += " (edited)"
    edited = _rows_file(tmp_path, rows)
    b = run_filter_stage(
        _cfg(tmp_path, f"data.root={synth.parent}"), [edited], tmp_path / "out", progress=False
    )
    assert b.dataset_dir != a.dataset_dir and b.report["counts"]["kept"] == 6


def _truncated_copy(src: str, dst: Path) -> None:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])


def test_header_only_integrity_lets_a_truncated_file_through_and_full_decode_catches_it(tmp_path, synth):
    first = read_samples_jsonl(synth)[0]
    _truncated_copy(first.image_path, tmp_path / "cut.jpg")
    rows = [dict(first.to_dict(), image_path=str(tmp_path / "cut.jpg"))]
    path = _rows_file(tmp_path, rows)
    root = f"data.root={tmp_path}"
    full = run_filter_stage(_cfg(tmp_path, root), [path], tmp_path / "a", progress=False)
    header = run_filter_stage(
        _cfg(tmp_path, root, "data.filters.integrity_decode=false"), [path], tmp_path / "b", progress=False
    )
    assert full.report["dropped_by_reason"] == {"image_truncated": 1}
    assert header.report["counts"]["kept"] == 1


SWITCH_CASES = {
    # switch: (what the second row changes, the reason it is dropped for while the switch is on)
    "answer_validity": (
        {"choices": ["red", "Red"], "answer": "A", "question": "Other?"},
        "duplicate_choices",
    ),
    "path_containment": ({"image_path": "../outside.jpg", "question": "Other?"}, "path_outside_root"),
    "dedupe": ({}, "duplicate"),
    "integrity": ({"image_path": "cut.jpg", "question": "Other?"}, "image_truncated"),
}


@pytest.mark.parametrize("switch", sorted(SWITCH_CASES))
def test_each_filter_can_be_switched_off(tmp_path, synth, switch):
    change, reason = SWITCH_CASES[switch]
    first = read_samples_jsonl(synth)[0]
    data = tmp_path / "data"
    data.mkdir()
    image = Path(first.image_path).read_bytes()
    (data / "img.jpg").write_bytes(image)
    (tmp_path / "outside.jpg").write_bytes(image)
    _truncated_copy(first.image_path, data / "cut.jpg")
    row = dict(first.to_dict(), image_path="img.jpg")
    path = _rows_file(tmp_path, [row, dict(row, id="second", **change)])
    on = run_filter_stage(_cfg(tmp_path), [path], tmp_path / "on", progress=False)
    off = run_filter_stage(
        _cfg(tmp_path, f"data.filters.{switch}=false"), [path], tmp_path / "off", progress=False
    )
    assert on.report["dropped_by_reason"] == {reason: 1}
    assert off.report["counts"] == {"in": 2, "kept": 2, "dropped": 0}


def test_resolution_limits_drop_images_outside_the_configured_range(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for name, size in {"tiny": (20, 20), "wide": (3000, 10), "big": (1200, 900), "ok": (300, 200)}.items():
        Image.new("RGB", size, (90, 90, 90)).save(data / f"{name}.png")
        rows.append(
            {"id": name, "image_path": f"{name}.png", "question": "Q?", "choices": ["a", "b"], "answer": "A"}
        )
    path = _rows_file(tmp_path, rows)
    result = run_filter_stage(
        _cfg(tmp_path, "data.filters.max_side=1000", "data.filters.max_aspect=100"),
        [path],
        tmp_path / "out",
        progress=False,
    )
    assert result.report["dropped_by_reason"] == {"image_too_small": 2, "image_too_large": 1}
    assert [json.loads(x)["id"] for x in result.samples_path.read_text().splitlines()] == ["ok"]
    wide = next(e for e in result.report["examples"]["image_too_small"] if "wide" in e["excerpt"])
    assert "3000x10" in wide["detail"]


def test_several_inputs_of_different_formats_are_accounted_for_per_input(tmp_path, synth):
    mme = tmp_path / "mme" / "MME.json"
    mme.parent.mkdir()
    first = read_samples_jsonl(synth)[0]
    img = mme.parent / "img.jpg"
    img.write_bytes(Path(first.image_path).read_bytes())
    mme.write_text(
        json.dumps(
            [
                {
                    "Question_id": "q1",
                    "Image": "img.jpg",
                    "Text": "Which?",
                    "Answer choices": ["(A) x", "(B) y"],
                    "Ground truth": "B",
                    "Task": "Perception",
                    "Subtask": "OCR",
                },
                "not an object",
            ]
        )
    )
    result = run_filter_stage(
        _cfg(tmp_path), [synth, InputSpec(mme, "mme-realworld")], tmp_path / "out", progress=False
    )
    assert [(i["format"], i["rows"]) for i in result.report["inputs"]] == [("jsonl", 6), ("mme-realworld", 2)]
    assert result.report["counts"] == {"in": 8, "kept": 7, "dropped": 1}
    kept = read_samples_jsonl(result.samples_path)
    assert kept[-1].meta == {"task": "Perception", "subtask": "OCR"}


def test_missing_input_is_a_setup_error_and_writes_nothing(tmp_path):
    with pytest.raises(DataInputError, match="does not exist"):
        run_filter_stage(_cfg(tmp_path), [tmp_path / "nope.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_bar_counts_the_rows(tmp_path, synth, capsys):
    run_filter_stage(_cfg(tmp_path), [synth], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "filter rows" in err and "6row" in err.replace(" ", "")


# ---------------------------------------------------------------- command line


def test_cli_synth_refuses_an_image_too_small_for_the_tag_before_writing_anything(tmp_path, capsys):
    # the default preset's 80-px tag needs 320 px per side
    code = main(["data", "synth", "--out", str(tmp_path / "syn"), "--train", "2", "--eval", "1", "--width", "320", "--height", "240",
                 "--set", f"state_dir={tmp_path / 'state'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "80-px tag" in err and "at least 320 px" in err and "data.synthetic_tag_px=60" in err, err
    assert not (tmp_path / "syn").exists()


def test_cli_synth_then_filter_writes_splits_and_a_dataset(tmp_path, capsys):
    state = f"state_dir={tmp_path / 'state'}"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(tmp_path / "syn"),
                "--train",
                "3",
                "--eval",
                "2",
                "--width",
                "320",
                "--height",
                "240",
                "--seed",
                "5",
                "--preset",
                "tiny-cpu",
                "--set",
                state,
            ]
        )
        == 0
    )
    assert len(read_samples_jsonl(tmp_path / "syn" / "train" / "samples.jsonl")) == 3
    assert len(read_samples_jsonl(tmp_path / "syn" / "eval" / "samples.jsonl")) == 2
    capsys.readouterr()
    code = main(
        [
            "data",
            "filter",
            "--input",
            str(tmp_path / "syn" / "train" / "samples.jsonl"),
            "--input",
            str(tmp_path / "syn" / "eval" / "samples.jsonl"),
            "--root",
            str(tmp_path / "syn"),
            "--out",
            str(tmp_path / "ds"),
            "--no-progress",
            "--set",
            state,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "5 in = 5 kept + 0 dropped" in out
    (dataset,) = (tmp_path / "ds").iterdir()
    assert str(dataset) in out
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["config"]["data"]["root"] == str((tmp_path / "syn").resolve())


def test_cli_filter_reports_a_missing_input_with_exit_code_2(tmp_path, capsys):
    code = main(["data", "filter", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "ds")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_format_choices_match_the_readers():
    assert FORMAT_CHOICES == FORMATS


def test_report_markdown_shows_an_example_for_each_reason(tmp_path, synth):
    first = read_samples_jsonl(synth)[0].to_dict()
    rows = [first, dict(first, id="dup"), dict(first, id="gone", image_path="missing.jpg"), {"id": 3}]
    path = _rows_file(tmp_path, rows)
    result = run_filter_stage(
        _cfg(tmp_path, "data.filters.path_containment=false"), [path], tmp_path / "out", progress=False
    )
    md = (result.dataset_dir / "report.md").read_text()
    assert "**4** rows in = **1** kept + **3** dropped" in md
    for reason in ("duplicate", "image_missing", "missing_field"):
        assert f"| {reason} | 1 |" in md


@pytest.mark.parametrize("dedupe", [True, False])
def test_the_dataset_hash_does_not_depend_on_where_the_state_folder_lies(tmp_path, dedupe):
    """Same rows and images in two state folders (a moved folder): same dataset hash, real paths in the file.
    With de-duplication the images are named by their content digest, without it by their place in the folder."""
    names, files = [], []
    for where in ("a", "b/deeper"):
        state = tmp_path / where / "state"
        split = write_synthetic_split(state / "data" / "synth", 4, seed=5, width=320, height=240)
        cfg = load_config("tiny-cpu", [f"state_dir={state}", f"data.filters.dedupe={str(dedupe).lower()}"])
        result = run_filter_stage(cfg, [split], state / "datasets", progress=False)
        names.append(result.dataset_dir.name)
        files.append(result.samples_path.read_text())
    assert names[0] == names[1]
    assert files[0] != files[1] and str(tmp_path / "b") in files[1]


def test_mme_realworld_images_published_apart_from_the_json_need_the_image_root_and_say_so(tmp_path):
    from mgpo_core.evaluation.benchmarks import get_benchmark
    from mgpo_core.evaluation.spec import ReadContext

    images = tmp_path / "downloads" / "images"
    (images / "remote_sensing").mkdir(parents=True)
    Image.new("RGB", (640, 480), (10, 200, 30)).save(images / "remote_sensing" / "0001.png")
    items = [
        {
            "Question_id": "perception/remote_sensing/0001",
            "Image": "remote_sensing/0001.png",
            "Text": "What colour dominates?",
            "Answer choices": ["(A) red", "(B) green"],
            "Ground truth": "B",
            "Task": "Perception",
            "Subtask": "Remote Sensing",
        }
    ]
    js = tmp_path / "json" / "MME_RealWorld_Lite.json"
    js.parent.mkdir()
    js.write_text(json.dumps(items))
    # Filter stage: without the image root every row is dropped, and the reason says how to set it.
    result = run_filter_stage(_cfg(tmp_path), [js], tmp_path / "out", progress=False)
    assert result.report["counts"]["kept"] == 0
    dropped = [json.loads(x) for x in (result.dataset_dir / "dropped.jsonl").read_text().splitlines()]
    assert dropped[0]["reason"] == "image_missing" and "--set data.image_root=" in dropped[0]["detail"]
    cfg = _cfg(tmp_path, f"data.image_root={images}")
    assert run_filter_stage(cfg, [js], tmp_path / "out", progress=False).report["counts"]["kept"] == 1
    # Evaluation reader: a clear error naming the option, then the samples once it is set.
    bench = get_benchmark("mme_realworld_lite")
    with pytest.raises(FileNotFoundError, match=r"evaluation\.image_roots\.mme_realworld_lite="):
        bench.read(ReadContext(js, tmp_path / "work", _cfg(tmp_path)))
    cfg = _cfg(tmp_path, f"evaluation.image_roots={{mme_realworld_lite: {images}}}")
    (s,) = bench.read(ReadContext(js, tmp_path / "work", cfg))
    assert s.image_path == str(images / "remote_sensing" / "0001.png")
