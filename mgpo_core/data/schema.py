"""The canonical sample: one multiple-choice question about one ORIGINAL full-resolution image."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from typing import Any

LETTERS = string.ascii_uppercase

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One prompt of the training or evaluation set.

    ``image_path`` points at the ORIGINAL image (never a resized copy: crops are cut from it);
    ``answer`` is the letter of the correct choice; ``gt_boxes`` are optional ground-truth boxes
    ``(x1, y1, x2, y2)`` in original pixels (V* and the synthetic set have them).
    """

    id: str
    image_path: str
    question: str
    choices: tuple[str, ...]
    answer: str
    source: str = ""
    category: str = ""
    gt_boxes: tuple[Box, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"sample {self.id!r}: no answer choices; give at least two options")
        letters = LETTERS[: len(self.choices)]
        if self.answer not in letters:
            raise ValueError(
                f"sample {self.id!r}: answer {self.answer!r} is not one of the choice letters {list(letters)}; "
                "give the answer as the letter of the correct choice"
            )

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        d["gt_boxes"] = [list(b) for b in self.gt_boxes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(
            id=str(d["id"]),
            image_path=str(d["image_path"]),
            question=str(d["question"]),
            choices=tuple(str(c) for c in d["choices"]),
            answer=str(d["answer"]),
            source=str(d.get("source", "")),
            category=str(d.get("category", "")),
            gt_boxes=tuple(tuple(float(v) for v in b) for b in d.get("gt_boxes", ()) or ()),  # type: ignore[misc]
        )


def format_choices(choices: tuple[str, ...] | list[str]) -> str:
    """``["red", "blue"]`` → ``"(A) red\\n(B) blue"`` (the lettering every prompt and scorer shares)."""
    return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
