"""The canonical sample: one multiple-choice question about one ORIGINAL full-resolution image."""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

LETTERS = string.ascii_uppercase

Box = tuple[float, float, float, float]


class Meta(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping (insertion order kept): extra labels of a Sample."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: tuple[tuple[str, str], ...] = tuple(dict((str(k), str(v)) for k, v in pairs).items())

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"Meta({dict(self._items)!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Meta:
        return self


@dataclass(frozen=True)
class Sample:
    """One prompt of the training or evaluation set.

    ``image_path`` points at the ORIGINAL image (never a resized copy: crops are cut from it);
    ``answer`` is the letter of the correct choice; ``gt_boxes`` are optional ground-truth boxes
    ``(x1, y1, x2, y2)`` in original pixels (V* and the synthetic set have them); ``meta`` holds extra text
    labels a benchmark's scoring groups by (HR-Bench ``cycle_category``, MME-RealWorld ``task`` and
    ``subtask``) as a read-only mapping that keeps the Sample hashable (a dict or pairs are converted).
    """

    id: str
    image_path: str
    question: str
    choices: tuple[str, ...]
    answer: str
    source: str = ""
    category: str = ""
    gt_boxes: tuple[Box, ...] = field(default_factory=tuple)
    meta: Meta = field(default_factory=lambda: Meta())

    def __post_init__(self) -> None:
        if not isinstance(self.meta, Meta):
            object.__setattr__(self, "meta", Meta(self.meta))
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
        d["meta"] = dict(self.meta)
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
            meta=Meta(d.get("meta") or {}),
        )


def format_choices(choices: tuple[str, ...] | list[str]) -> str:
    """``["red", "blue"]`` → ``"(A) red\\n(B) blue"`` (the lettering every prompt and scorer shares)."""
    return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


@dataclass(frozen=True)
class DataRow:
    """One input row as it moves through the filter stage: a ``sample``, or dropped with a ``reason`` code.

    ``location`` says where the row came from (``file.jsonl:12``, ``table.parquet#row=3``, ``folder/x.json``);
    ``detail`` is a short human explanation of the drop; ``excerpt`` a short printable piece of the raw row for
    the report. Exactly one of ``sample`` and ``reason`` is set.
    """

    location: str
    sample: Sample | None = None
    reason: str = ""
    detail: str = ""
    excerpt: str = ""

    def __post_init__(self) -> None:
        if (self.sample is None) == (not self.reason):
            raise ValueError(f"DataRow at {self.location}: give exactly one of a sample and a drop reason")

    @property
    def dropped(self) -> bool:
        return self.sample is None

    def drop(self, reason: str, detail: str) -> DataRow:
        """This row, dropped with ``reason``; the excerpt names the sample it was."""
        excerpt = self.excerpt
        if self.sample is not None and not excerpt:
            excerpt = (
                f"id={self.sample.id!r} question={self.sample.question[:80]!r} image={self.sample.image_path}"
            )
        return DataRow(self.location, None, reason, detail, excerpt)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"location": self.location}
        if self.sample is None:
            d.update(reason=self.reason, detail=self.detail, excerpt=self.excerpt)
        else:
            d["id"] = self.sample.id
        return d
