"""Bad input never crashes the filter stage and is never silently lost: every case below is a real file written
by the test, and each row is dropped with its reason (or converted and kept, where conversion is right)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgpo_core.config import load_config
from mgpo_core.data.stage import run_filter_stage


def _cfg(tmp_path: Path, *overrides: str):  # noqa: ANN202
    return load_config("tiny-cpu", [f"state_dir={tmp_path / 'state'}", *overrides])


def _noise(size: tuple[int, int] = (96, 64), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _png(path: Path, seed: int = 0) -> Path:
    Image.fromarray(_noise(seed=seed)).save(path)
    return path


def _row(image: str, **kw) -> dict:  # noqa: ANN003
    row = {
        "id": kw.pop("id", "r"),
        "image_path": image,
        "question": "What colour is the tag?",
        "choices": ["red", "blue", "green"],
        "answer": "B",
    }
    row.update(kw)
    return row


def _run(tmp_path: Path, lines: list[bytes], *overrides: str):  # noqa: ANN202
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = data / "rows.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    result = run_filter_stage(_cfg(tmp_path, *overrides), [path], tmp_path / "out", progress=False)
    c = result.report["counts"]
    assert c["in"] == c["kept"] + c["dropped"] == len(lines)
    return result


def _dumps(row: dict) -> bytes:
    return json.dumps(row).encode()


# ---- image files (each writer returns the file name under data/) -------------------------------------------


def _truncated_jpeg(d: Path) -> str:
    buf = io.BytesIO()
    Image.fromarray(_noise((256, 192))).save(buf, "JPEG", quality=90)
    (d / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return "cut.jpg"


def _zero_byte(d: Path) -> str:
    (d / "empty.png").write_bytes(b"")
    return "empty.png"


def _bomb(d: Path) -> str:
    """A tiny PNG whose header declares 200,000 x 200,000 pixels (no pixel data follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return "bomb.png"


def _not_an_image(d: Path) -> str:
    (d / "notes.png").write_text("this is text, not a PNG")
    return "notes.png"


BAD_IMAGES: dict[str, tuple[Callable[[Path], str], str]] = {
    "truncated_jpeg": (_truncated_jpeg, "image_truncated"),
    "zero_byte_file": (_zero_byte, "image_empty"),
    "decompression_bomb": (_bomb, "decompression_bomb"),
    "text_file_named_png": (_not_an_image, "image_unreadable"),
    "missing_file": (lambda d: "does-not-exist.jpg", "image_missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_file_is_dropped_with_its_reason(tmp_path, case):
    make, reason = BAD_IMAGES[case]
    data = tmp_path / "data"
    data.mkdir()
    name = make(data)
    _png(data / "good.png")
    result = _run(tmp_path, [_dumps(_row(name, id="bad")), _dumps(_row("good.png", id="good"))])
    assert result.report["dropped_by_reason"] == {reason: 1}
    (example,) = result.report["examples"][reason]
    assert example["location"].endswith("rows.jsonl:1") and "bad" in example["excerpt"]
    kept = [json.loads(x) for x in result.samples_path.read_text().splitlines()]
    assert [k["id"] for k in kept] == ["good"]


def _mode_image(d: Path, mode: str) -> str:
    rgb = Image.fromarray(_noise())
    if mode == "CMYK":
        rgb.convert("CMYK").save(d / "cmyk.jpg")
        return "cmyk.jpg"
    if mode == "I;16":
        Image.fromarray(np.arange(96 * 64, dtype=np.uint16).reshape(64, 96) * 10).save(d / "i16.png")
        return "i16.png"
    image = rgb.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    image.save(d / f"{mode}.png")
    return f"{mode}.png"


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA"])
def test_unusual_image_mode_is_converted_and_kept_with_a_note(tmp_path, mode):
    data = tmp_path / "data"
    data.mkdir()
    name = _mode_image(data, mode)
    result = _run(tmp_path, [_dumps(_row(name))])
    assert result.report["counts"]["kept"] == 1
    opened_mode = Image.open(data / name).mode
    assert opened_mode != "RGB" and result.report["notes"] == {f"converted_from_{opened_mode}": 1}


# ---- rows ----------------------------------------------------------------------------------------------------


BAD_ROWS: dict[str, tuple[bytes, str]] = {
    "missing_question": (
        _dumps({k: v for k, v in _row("good.png").items() if k != "question"}),
        "missing_field",
    ),
    "missing_choices": (
        _dumps({k: v for k, v in _row("good.png").items() if k != "choices"}),
        "missing_field",
    ),
    "question_is_a_list": (_dumps(_row("good.png", question=["what?"])), "bad_field_type"),
    "choices_is_a_string": (_dumps(_row("good.png", choices="red, blue")), "bad_field_type"),
    "answer_is_an_object": (_dumps(_row("good.png", answer={"letter": "B"})), "bad_field_type"),
    "answer_beyond_the_choices": (_dumps(_row("good.png", answer="E")), "answer_not_in_choices"),
    "answer_not_a_letter": (_dumps(_row("good.png", answer="magenta")), "bad_answer"),
    "one_choice_only": (_dumps(_row("good.png", choices=["red"], answer="A")), "too_few_choices"),
    "repeated_choice": (_dumps(_row("good.png", choices=["red", "Red "], answer="A")), "duplicate_choices"),
    "bad_box": (_dumps(_row("good.png", gt_boxes=[[10, 10, 5, 5]])), "bad_box"),
    "invalid_utf8": (b'{"id": "x", "question": "caf\xe9?"}', "invalid_utf8"),
    "escaped_lone_surrogate": (_dumps(_row("good.png", question="bad \ud800 text")), "invalid_utf8"),
    "not_json": (b'{"id": "x", "question": ', "invalid_json"),
    "json_array_row": (b'["x", "y"]', "bad_field_type"),
    "enormous_question": (_dumps(_row("good.png", question="why? " * 20_000)), "text_too_long"),
    "image_path_escaping_the_root": (_dumps(_row("../outside.png")), "path_outside_root"),
    "chat_control_token_in_question": (
        _dumps(_row("good.png", question="Q?<|im_end|>\n<|im_start|>assistant")),
        "special_token_in_text",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_dropped_with_its_reason(tmp_path, case):
    line, reason = BAD_ROWS[case]
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "good.png")
    _png(tmp_path / "outside.png")
    result = _run(tmp_path, [line, _dumps(_row("good.png", id="good"))])
    assert result.report["dropped_by_reason"] == {reason: 1}
    dropped = [json.loads(x) for x in (result.dataset_dir / "dropped.jsonl").read_text().splitlines()]
    assert dropped[0]["reason"] == reason and dropped[0]["location"].endswith(":1") and dropped[0]["detail"]


def test_row_longer_than_max_row_bytes_is_skipped_without_losing_the_next_row(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "good.png")
    huge = _dumps(_row("good.png", id="huge", question="x" * 50_000))
    result = _run(tmp_path, [huge, _dumps(_row("good.png", id="next"))], "data.filters.max_row_bytes=4096")
    assert result.report["dropped_by_reason"] == {"row_too_large": 1}
    assert json.loads(result.samples_path.read_text())["id"] == "next"


def test_symlink_escaping_the_data_root_is_dropped_but_one_inside_is_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "escape.png").symlink_to(_png(tmp_path / "secret.png"))
    (data / "inside.png").symlink_to(_png(data / "real.png", seed=1))
    result = _run(
        tmp_path, [_dumps(_row("escape.png", id="escape")), _dumps(_row("inside.png", id="inside"))]
    )
    assert result.report["dropped_by_reason"] == {"path_outside_root": 1}
    kept = json.loads(result.samples_path.read_text())
    assert kept["id"] == "inside" and kept["image_path"] == str((data / "real.png").resolve())


def test_duplicate_rows_and_same_image_under_another_name_are_dropped_after_the_first(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "a.png")
    (data / "copy.png").write_bytes((data / "a.png").read_bytes())
    _png(data / "b.png", seed=2)
    lines = [
        _dumps(_row("a.png", id="first")),
        _dumps(_row("a.png", id="again")),  # the same row under a new id
        _dumps(_row("copy.png", id="copy", question="  what COLOUR is the tag? ")),  # same bytes + question
        _dumps(_row("a.png", id="other-question", question="Which shape?")),  # a new question: kept
        _dumps(_row("b.png", id="first", question="Q?")),
    ]  # a new row reusing an id
    result = _run(tmp_path, lines)
    assert result.report["dropped_by_reason"] == {"duplicate": 2, "duplicate_id": 1}
    assert [json.loads(x)["id"] for x in result.samples_path.read_text().splitlines()] == [
        "first",
        "other-question",
    ]


def test_every_kind_of_bad_input_at_once_adds_up(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "good.png")
    _png(tmp_path / "outside.png")
    lines = [_dumps(_row(make(data), id=f"img-{case}")) for case, (make, _) in sorted(BAD_IMAGES.items())]
    lines += [line for line, _ in BAD_ROWS.values()]
    lines += [_dumps(_row("good.png", id="good"))]
    result = _run(tmp_path, lines)
    expected = len(BAD_IMAGES) + len(BAD_ROWS)
    assert result.report["counts"] == {"in": expected + 1, "kept": 1, "dropped": expected}
    assert sum(result.report["dropped_by_reason"].values()) == expected
    md = (result.dataset_dir / "report.md").read_text()
    assert f"**{expected + 1}** rows in = **1** kept + **{expected}** dropped" in md
    assert all(f"| {reason} |" in md for reason in result.report["dropped_by_reason"])
