"""The filter stage's checks, each a pure function of a sample (and its image) that returns ``None`` to keep it
or ``(reason, detail)`` to drop it, plus the de-duplicator and the pass-rate filter that needs a rollout engine.

Image checks are ordered cheapest first: path containment (no I/O beyond ``resolve``), the header (size and
decompression-bomb limit, via :func:`mgpo_core.imaging.image_size`), the resolution limits on that size, and
only then the full decode (:func:`mgpo_core.imaging.open_image`) and the content hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mgpo_core.data.schema import Sample
from mgpo_core.imaging import ImageError, image_size, open_image

if TYPE_CHECKING:
    from mgpo_core.config import DataFilterConfig
    from mgpo_core.rollout.base import RolloutEngine

log = logging.getLogger(__name__)

#: The reason codes of the filters (readers add theirs: ``mgpo_core.data.rows.READER_REASONS``).
FILTER_REASONS = (
    "too_few_choices",
    "blank_choice",
    "duplicate_choices",
    "path_outside_root",
    "image_missing",
    "image_empty",
    "decompression_bomb",
    "image_unreadable",
    "image_truncated",
    "image_bad_size",
    "image_too_small",
    "image_too_large",
    "image_aspect_ratio",
    "eval_overlap",
    "duplicate",
    "duplicate_id",
    "pass_rate_low",
    "pass_rate_high",
    "pass_rate_error",
)

# imaging.ImageError.reason -> our reason code.
_IMAGE_REASON = {
    "missing": "image_missing",
    "empty_file": "image_empty",
    "too_many_pixels": "decompression_bomb",
    "unreadable": "image_unreadable",
    "truncated": "image_truncated",
    "bad_size": "image_bad_size",
}

Problem = tuple[str, str] | None


def answer_problem(sample: Sample) -> Problem:
    """At least two choices, none blank, no two the same (ignoring case and spacing)."""
    if len(sample.choices) < 2:
        return (
            "too_few_choices",
            f"{len(sample.choices)} choice(s); a multiple-choice question needs at least 2",
        )
    for i, c in enumerate(sample.choices):
        if not c.strip():
            return "blank_choice", f"choice ({chr(65 + i)}) is blank"
    seen: dict[str, int] = {}
    for i, c in enumerate(sample.choices):
        key = " ".join(c.split()).casefold()
        if key in seen:
            return "duplicate_choices", f"choices ({chr(65 + seen[key])}) and ({chr(65 + i)}) are both {c!r}"
        seen[key] = i
    return None


def containment_problem(path: Path, roots: Sequence[Path]) -> Problem:
    """``path`` (already resolved: symlinks followed) must lie inside one of the (resolved) ``roots``."""
    if any(path.is_relative_to(r) for r in roots):
        return None
    return "path_outside_root", (
        f"image resolves to {path}, outside the data root(s) "
        f"{[str(r) for r in roots]}; move it under the root or set data.root"
    )


def resolution_problem(size: tuple[int, int], f: DataFilterConfig) -> Problem:
    """Min/max side, max pixels and max aspect ratio of an upright ``(width, height)``."""
    w, h = size
    short, long = min(w, h), max(w, h)
    if f.min_side is not None and short < f.min_side:
        return "image_too_small", f"{w}x{h}: shorter side {short} < min_side={f.min_side}"
    if f.max_side is not None and long > f.max_side:
        return "image_too_large", f"{w}x{h}: longer side {long} > max_side={f.max_side}"
    if f.max_pixels is not None and w * h > f.max_pixels:
        return "image_too_large", f"{w}x{h} = {w * h:,} pixels > max_pixels={f.max_pixels:,}"
    if f.max_aspect is not None and long / short > f.max_aspect:
        return "image_aspect_ratio", f"{w}x{h}: aspect ratio {long / short:.1f} > max_aspect={f.max_aspect}"
    return None


@dataclass(frozen=True)
class ImageCheck:
    """What the checks learnt about one image file: its size and mode, its content hash, or why it fails."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    sha256: str | None = None
    reason: str = ""
    detail: str = ""


def _needs_header(f: DataFilterConfig) -> bool:
    return f.integrity or any(v is not None for v in (f.min_side, f.max_side, f.max_pixels, f.max_aspect))


def check_image(
    path: str | os.PathLike[str], f: DataFilterConfig, *, max_image_pixels: int, want_hash: bool
) -> ImageCheck:
    """Header → resolution → (decode) → (hash), stopping at the first failure. Never raises for a bad file."""
    size: tuple[int, int] | None = None
    mode: str | None = None
    try:
        if _needs_header(f):
            size = image_size(path, max_image_pixels=max_image_pixels)
            problem = resolution_problem(size, f)
            if problem is not None:
                return ImageCheck(size, None, None, *problem)
        if f.integrity and f.integrity_decode:
            with open_image(path, max_image_pixels=max_image_pixels, load=False) as raw:
                mode = raw.mode
            open_image(path, max_image_pixels=max_image_pixels).close()
        digest = None
        if want_hash:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
    except ImageError as err:
        return ImageCheck(size, mode, None, _IMAGE_REASON.get(err.reason, "image_unreadable"), err.detail)
    except FileNotFoundError:
        return ImageCheck(size, mode, None, "image_missing", "image file does not exist")
    except OSError as err:
        return ImageCheck(size, mode, None, "image_unreadable", f"cannot read the file: {err}")
    except Exception as err:  # a decoder bug on a hostile file must cost one row, not the stage
        return ImageCheck(size, mode, None, "image_unreadable", f"{type(err).__name__}: {err}"[:300])
    return ImageCheck(size, mode, digest)


class Deduper:
    """Remembers the first row of each key; ``seen`` returns that row's id for a repeat, else None."""

    def __init__(self, key: str = "image+question") -> None:
        self.key = key
        self._first: dict[tuple[str, ...], str] = {}

    def seen(self, sample: Sample, image_sha256: str) -> str | None:
        question = " ".join(sample.question.split()).casefold()
        key: tuple[str, ...] = (image_sha256, question)
        if self.key == "image+question+choices":
            key += tuple(" ".join(c.split()).casefold() for c in sample.choices)
        first = self._first.get(key)
        if first is None:
            self._first[key] = sample.id
        return first


@dataclass(frozen=True)
class PassRate:
    """Outcome of the pass-rate filter for one prompt: ``right`` of ``n`` rollouts, or the error that stopped it."""

    sample: Sample
    right: int
    n: int
    error: str = ""

    @property
    def rate(self) -> float:
        return self.right / self.n if self.n else 0.0


def pass_rates(
    samples: Sequence[Sample], engine: RolloutEngine, *, n: int, batch: int, seed: int
) -> Iterator[PassRate]:
    """``n`` sampled two-turn rollouts per prompt through ``engine.generate_episodes``, ``batch`` prompts a call.

    A failing batch is retried one prompt at a time, so one prompt the engine cannot handle costs only itself.
    """
    for start in range(0, len(samples), batch):
        chunk = list(samples[start : start + batch])
        try:
            episodes = engine.generate_episodes(chunk, n=n, seed=seed + start)
        except Exception as err:
            log.warning("pass-rate batch at %d failed (%s); retrying prompt by prompt", start, err)
            for k, s in enumerate(chunk):
                try:
                    eps = engine.generate_episodes([s], n=n, seed=seed + start + k)
                except Exception as one_err:  # accounted for as a drop with its message
                    yield PassRate(s, 0, n, f"{type(one_err).__name__}: {one_err}"[:300])
                    continue
                yield PassRate(s, sum(int(ep.reward > 0.5) for ep in eps), n)
            continue
        right = [0] * len(chunk)
        counts = [0] * len(chunk)
        for ep in episodes:
            counts[ep.group] += 1
            right[ep.group] += int(ep.reward > 0.5)
        for k, s in enumerate(chunk):
            yield PassRate(s, right[k], counts[k])


def pass_rate_problem(result: PassRate, f: DataFilterConfig) -> Problem:
    """Keep iff ``pass_rate_min <= right / n <= pass_rate_max`` (with a tolerance for k/n rounding)."""
    if result.error:
        return "pass_rate_error", f"rollouts failed: {result.error}"
    if result.n == 0:
        return "pass_rate_error", "the engine returned no rollouts for this prompt"
    eps = 1e-9
    if result.rate < f.pass_rate_min - eps:
        return "pass_rate_low", (
            f"{result.right} of {result.n} rollouts right ({result.rate:.3f}) < "
            f"pass_rate_min={f.pass_rate_min}"
        )
    if result.rate > f.pass_rate_max + eps:
        return "pass_rate_high", (
            f"{result.right} of {result.n} rollouts right ({result.rate:.3f}) > "
            f"pass_rate_max={f.pass_rate_max}"
        )
    return None
