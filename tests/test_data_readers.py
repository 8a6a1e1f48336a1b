"""Readers of the published formats, each on a fixture this file writes in exactly that format."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgpo_core.data.readers import (
    FORMATS,
    DataInputError,
    ImageCache,
    ReadContext,
    ReadLimits,
    detect_format,
    read_hrbench,
    read_rows,
    read_vstar,
)
from mgpo_core.data.rows import answer_letter, split_options, strip_letter_prefixes
from mgpo_core.data.schema import LETTERS, Sample


def _jpeg_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _ctx(tmp_path: Path, **kw) -> ReadContext:  # noqa: ANN003
    return ReadContext(ImageCache(tmp_path / "cache"), **kw)


def _read(path: Path, fmt: str, ctx: ReadContext) -> list:
    return list(read_rows(path, fmt, ctx=ctx))


# ---------------------------------------------------------------- MGPO training tables


def _mgpo_rows(img: Path) -> list[dict]:
    return [
        {
            "data_source": "mme_realworld",
            "prompt": [{"role": "user", "content": "<image>What colour is the car?"}],
            "image_path": str(img),
            "image": None,
            "question": "What colour is the car?",
            "choices": "(A) red\n(B) blue\n(C) green\n(D) white",
            "reward_model": {"style": "rule", "ground_truth": "B"},
            "extra_info": {"index": 7, "category": "color"},
        },
        {
            "data_source": "mme_realworld",
            "prompt": [{"role": "user", "content": "<image>How many boats are there?"}],
            "image_path": None,
            "image": img.name,  # a relative path: resolved against the table's own folder
            "question": "",
            "choices": "(A) 1\n(B) 2\n(C) 3",
            "reward_model": {"style": "rule", "ground_truth": "(C)"},
            "extra_info": {"index": 8},
        },
    ]


def test_mgpo_parquet_rows_become_canonical_samples(tmp_path):
    img = tmp_path / "car.jpg"
    img.write_bytes(_jpeg_bytes())
    table = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_mgpo_rows(img)), table)
    assert detect_format(table) == "mgpo"
    rows = _read(table, "auto", _ctx(tmp_path))
    a, b = (r.sample for r in rows)
    assert a == Sample(
        id="7",
        image_path=str(img),
        question="What colour is the car?",
        choices=("red", "blue", "green", "white"),
        answer="B",
        source="mme_realworld",
        category="color",
    )
    # An empty question falls back to the prompt's user text, without the image token.
    assert b.question == "How many boats are there?" and b.choices == ("1", "2", "3") and b.answer == "C"
    assert b.image_path == str(tmp_path / "car.jpg")
    assert rows[1].location.endswith("train.parquet#row=1")


def test_mgpo_embedded_image_bytes_are_decoded_once_into_the_content_addressed_cache(tmp_path):
    data = _jpeg_bytes()
    rows = [dict(r, image_path=None, image={"bytes": data, "path": "orig.jpg"}) for r in _mgpo_rows(tmp_path)]
    table = tmp_path / "embedded.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    samples = [r.sample for r in _read(table, "mgpo", _ctx(tmp_path))]
    assert samples[0].image_path == samples[1].image_path  # same bytes, same cached file
    cached = Path(samples[0].image_path)
    assert cached.parent.parent == (tmp_path / "cache").resolve() and cached.suffix == ".jpg"
    assert cached.read_bytes() == data
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 1


def test_mgpo_row_with_flattened_ground_truth_column_is_read(tmp_path):
    path = tmp_path / "flat.jsonl"
    path.write_text(
        json.dumps(
            {
                "data_source": "x",
                "image_path": "a.jpg",
                "question": "Q?",
                "choices": "A. yes\nB. no",
                "reward_model.ground_truth": "no",
            }
        )
        + "\n"
    )
    assert detect_format(path) == "mgpo"
    (row,) = _read(path, "auto", _ctx(tmp_path))
    assert row.sample.choices == ("yes", "no") and row.sample.answer == "B"  # answer given as option text
    assert row.sample.id == "flat-1"


def test_corrupt_parquet_row_group_drops_only_its_rows_and_a_cut_file_counts_as_one(tmp_path):
    rows = [dict(_mgpo_rows(tmp_path / "x.jpg")[0], id=str(i)) for i in range(6)]
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=2, compression="NONE")
    data = bytearray(table.read_bytes())
    offset = pq.ParquetFile(table).metadata.row_group(1).column(0).data_page_offset
    data[offset : offset + 8] = b"\xff" * 8  # break the page header of the second row group
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(data))
    got = _read(broken, "mgpo", _ctx(tmp_path))
    assert [r.sample.id if r.sample else r.reason for r in got] == [
        "0",
        "1",
        "unreadable_file",
        "unreadable_file",
        "4",
        "5",
    ]
    assert got[2].location.endswith("#row=2") and "row group 1" in got[2].detail
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(table.read_bytes()[: len(data) // 2])
    (only,) = _read(cut, "mgpo", _ctx(tmp_path))
    assert only.reason == "unreadable_file" and only.location == str(cut)


# ---------------------------------------------------------------- MME-RealWorld


def test_mme_realworld_json_list_keeps_task_and_subtask_for_scoring(tmp_path):
    items = [
        {
            "Question_id": "perception/remote_sensing/0001",
            "Image": "remote_sensing/03553.png",
            "Text": "How many planes are on the apron?",
            "Question Type": "Multiple Choice",
            "Answer choices": [
                "(A) 3",
                "(B) 5",
                "(C) 7",
                "(D) 9",
                "(E) The image does not feature the planes",
            ],
            "Ground truth": "D",
            "Task": "Perception",
            "Subtask": "Remote Sensing",
            "Category": "count",
            "Dataset": "MME-RealWorld",
        },
        {
            "Question_id": "p2",
            "Image": "x.png",
            "Text": "Q?",
            "Answer choices": ["(A) a", "(B) b"],
            "Ground truth": "F",
            "Task": "Reasoning",
            "Subtask": "Diagram",
        },
    ]
    path = tmp_path / "MME-RealWorld.json"
    path.write_text(json.dumps(items))
    assert detect_format(path) == "mme-realworld"
    good, bad = _read(path, "auto", _ctx(tmp_path))
    s = good.sample
    assert s.id == "mme-realworld/perception/remote_sensing/0001"
    assert s.choices[:2] == ("3", "5") and len(s.choices) == 5 and s.answer == "D"
    assert s.image_path == str(tmp_path / "remote_sensing/03553.png")
    assert s.meta["task"] == "Perception" and s.meta["subtask"] == "Remote Sensing"
    assert s.category == "Perception/Remote Sensing" and s.source == "mme-realworld"
    assert bad.dropped and bad.reason == "answer_not_in_choices" and bad.location.endswith("[1]")


def test_mme_realworld_file_that_is_not_a_list_is_one_dropped_row(tmp_path):
    path = tmp_path / "mme.json"
    path.write_text(json.dumps({"data": []}))
    (row,) = _read(path, "mme-realworld", _ctx(tmp_path))
    assert row.reason == "unreadable_file" and "list" in row.detail


# ---------------------------------------------------------------- V* Bench


def _vstar_folder(root: Path, n: int = 12) -> Path:
    for i in range(n):
        category = "direct_attributes" if i % 3 else "relative_position"
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (400, 300), (i * 10, 80, 80)).save(folder / f"sa_{i}.jpg")
        options = ["right", "left"] if category == "relative_position" else [f"correct{i}", "b", "c", "d"]
        (folder / f"sa_{i}.json").write_text(
            json.dumps(
                {
                    "target_object": ["glove"],
                    "bbox": [[10, 20, 30, 40]],
                    "question": f"Question {i}?",
                    "options": options,
                }
            )
        )
    return root


def test_vstar_folder_shuffles_options_with_a_fixed_seed_and_converts_xywh_boxes(tmp_path):
    root = _vstar_folder(tmp_path / "vstar")
    assert detect_format(root) == "vstar"
    rows = _read(root, "auto", _ctx(tmp_path))
    samples = [r.sample for r in rows]
    assert len(samples) == 12 and all(s is not None for s in samples)
    for s in samples:
        correct = "right" if s.category == "relative_position" else f"correct{s.id.rsplit('_', 1)[1]}"
        assert s.choices[LETTERS.index(s.answer)] == correct  # the letter follows the first (correct) option
        assert s.gt_boxes == ((10.0, 20.0, 40.0, 60.0),)  # [x, y, w, h] -> (x1, y1, x2, y2)
        assert Path(s.image_path).is_file() and s.source == "vstar"
    assert len({s.answer for s in samples}) > 1  # not always "A"
    again = [r.sample for r in _read(root, "vstar", _ctx(tmp_path))]
    assert again == samples
    other_seed = [r.sample for r in _read(root, "vstar", _ctx(tmp_path, shuffle_seed=1))]
    assert [s.answer for s in other_seed] != [s.answer for s in samples]


def test_vstar_parquet_variant_parses_inline_options_and_label(tmp_path):
    rows = [
        {
            "image": {"bytes": _jpeg_bytes(), "path": "sa_1.jpg"},
            "text": "What is the color of the woman's bag?\n(A) black\n(B) red\n(C) white\n(D) brown\n"
            "Answer with the option's letter from the given choices directly.",
            "label": "A",
            "category": "direct_attributes",
            "question_id": 1,
        },
        {
            "image": {"bytes": _jpeg_bytes(), "path": "sa_2.jpg"},
            "text": "Is the cup on the left or right of the dog? (A) left (B) right",
            "label": "B",
            "category": "relative_position",
            "question_id": 2,
        },
    ]
    table = tmp_path / "vstar.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    assert detect_format(table) == "vstar-parquet"
    a, b = read_vstar(table, image_dir=tmp_path / "cache")
    assert a.question == "What is the color of the woman's bag?"
    assert sorted(a.choices) == ["black", "brown", "red", "white"]
    assert a.choices[LETTERS.index(a.answer)] == "black"
    assert b.choices[LETTERS.index(b.answer)] == "right" and len(b.choices) == 2
    assert a.id == "vstar/1" and a.category == "direct_attributes"


# ---------------------------------------------------------------- HR-Bench


def _hrbench_tsv(path: Path, image_bytes: bytes, n_questions: int = 2) -> Path:
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    b64 = base64.b64encode(image_bytes).decode()
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        index = 0
        for q in range(n_questions):
            options = [f"opt{q}{k}" for k in range(4)]
            for cycle in range(4):  # HR-Bench: each question 4 times with the options rotated
                rot = options[cycle:] + options[:cycle]
                answer = LETTERS[rot.index(options[0])]
                image = (
                    b64 if cycle == 0 else str(index - cycle)
                )  # VLMEvalKit: repeats point at the first row
                w.writerow(
                    [
                        index,
                        f"Question {q}?",
                        answer,
                        "single" if q % 2 == 0 else "cross",
                        *rot,
                        f"cycle{q}",
                        image,
                    ]
                )
                index += 1
    return path


def test_hrbench_tsv_decodes_each_base64_image_once_and_keeps_the_cycle_group(tmp_path):
    data = _jpeg_bytes((120, 90))
    path = _hrbench_tsv(tmp_path / "hr_bench_4k.tsv", data)
    assert detect_format(path) == "hrbench"
    samples = read_hrbench(path, image_dir=tmp_path / "cache")
    assert len(samples) == 8
    assert len({s.image_path for s in samples}) == 1 and Path(samples[0].image_path).read_bytes() == data
    for s in samples:
        q = s.id.rsplit("/", 1)[1]
        assert s.choices[LETTERS.index(s.answer)] == f"opt{int(q) // 4}0"
        assert s.meta["cycle_category"] == f"cycle{int(q) // 4}"
    assert {s.category for s in samples} == {"single", "cross"} and samples[0].source == "hr_bench_4k"
    mtime = Path(samples[0].image_path).stat().st_mtime_ns
    read_hrbench(path, image_dir=tmp_path / "cache")
    assert Path(samples[0].image_path).stat().st_mtime_ns == mtime  # cached: not written again


def test_hrbench_row_with_bad_base64_or_dangling_image_reference_is_dropped(tmp_path):
    path = tmp_path / "hr.tsv"
    path.write_text(
        "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage\n"
        "0\tQ?\tA\tsingle\ta\tb\tc\td\tc0\t%%%not-base64%%%\n"
        "1\tQ?\tA\tsingle\ta\tb\tc\td\tc0\t77\n"
    )
    rows = _read(path, "hrbench", _ctx(tmp_path))
    assert [r.reason for r in rows] == ["image_undecodable", "bad_image_ref"]
    assert rows[0].location.endswith("hr.tsv:2")


def test_hrbench_row_over_the_size_cap_or_with_a_gap_in_its_options_is_dropped(tmp_path):
    b64 = base64.b64encode(_jpeg_bytes()).decode()
    path = tmp_path / "hr.tsv"
    path.write_text(
        "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage\n"
        f"0\tQ?\tA\tsingle\ta\tb\tc\td\tc0\t{b64 * 40}\n"
        f"1\tQ?\tD\tsingle\ta\tb\t\td\tc0\t{b64}\n"
        f"2\tQ?\tC\tsingle\ta\tb\tc\t\tc0\t{b64}\n"
    )
    ctx = _ctx(tmp_path, limits=ReadLimits(max_row_bytes=len(b64) * 10))
    rows = _read(path, "hrbench", ctx)
    assert [r.reason for r in rows] == ["row_too_large", "bad_choices", ""]
    assert "column C is empty but D is not" in rows[1].detail
    assert rows[2].sample.choices == ("a", "b", "c") and rows[2].sample.answer == "C"


# ---------------------------------------------------------------- canonical JSONL and helpers


def test_canonical_jsonl_round_trips_sample_to_dict(tmp_path):
    s = Sample(
        id="s1",
        image_path=str(tmp_path / "a.png"),
        question="Q?",
        choices=("x", "y"),
        answer="B",
        source="src",
        category="cat",
        gt_boxes=((1.0, 2.0, 3.0, 4.0),),
        meta={"k": "v"},
    )
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(s.to_dict()) + "\n\n")  # a blank line is not a row
    assert detect_format(path) == "jsonl"
    assert [r.sample for r in _read(path, "auto", _ctx(tmp_path))] == [s]


def test_split_options_reads_inline_and_line_start_markers_in_order():
    assert split_options("Q? (A) red (B) blue (C) a (B) b") == ("Q?", ["red", "blue", "a (B) b"])
    assert split_options("Which?\nA. one\nB) two\nC: three\nAnswer directly.") == (
        "Which?",
        ["one", "two", "three"],
    )
    assert split_options("no options here") == ("no options here", [])
    assert strip_letter_prefixes(["(A) x", "(B) y"]) == ["x", "y"]
    assert strip_letter_prefixes(["(B) x", "(A) y"]) == ["(B) x", "(A) y"]  # letters out of order: kept


def test_answer_letter_accepts_letters_and_option_text_and_names_bad_values():
    choices = ("red", "blue", "green")
    assert [answer_letter(a, choices) for a in ("b", "(C)", "A. red", "Blue")] == ["B", "C", "A", "B"]
    with pytest.raises(ValueError, match="answer_not_in_choices"):
        answer_letter("D", choices)
    with pytest.raises(ValueError, match="bad_answer"):
        answer_letter("purple", choices)


def test_unknown_format_or_missing_input_is_a_setup_error_naming_the_fix(tmp_path):
    with pytest.raises(DataInputError, match="does not exist"):
        list(read_rows(tmp_path / "nope.jsonl", ctx=_ctx(tmp_path)))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataInputError, match="pass one of"):
        list(read_rows(tmp_path / "data.csv", ctx=_ctx(tmp_path)))
    with pytest.raises(DataInputError, match="unknown format"):
        list(read_rows(tmp_path / "data.csv", "csv", ctx=_ctx(tmp_path)))
    assert FORMATS[0] == "auto"
