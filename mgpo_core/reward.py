r"""The MGPO reward: 1.0 iff the last ``\boxed{...}`` of the model's own turns names the ground-truth letter,
else 0.0 (METHOD.md §1.7); no format or grounding reward."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["answer_reward", "episode_answer_reward", "last_boxed", "normalize_choice"]

_BOXED = re.compile(r"\\boxed\s*\{")
# LaTeX wrappers models put around a letter inside \boxed{}: \text{C}, \textbf{C}, \mathrm{C}, ...
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{(.*)\}", re.DOTALL)
_CHOICE_PATTERNS = (
    re.compile(r"\(\s*([A-Za-z])\s*\)(?:\W.*)?", re.DOTALL),  # (C)  (C) text  (C).
    re.compile(r"\[\s*([A-Za-z])\s*\](?:\W.*)?", re.DOTALL),  # [C]  [C] text
    re.compile(r"([A-Za-z])(?:[.):]\s*(?:\S.*)?)?", re.DOTALL),  # C  C.  C)  C) text  C: text
)


def last_boxed(text: str) -> str | None:
    r"""Content of the LAST complete ``\boxed{...}`` in ``text`` (nested braces allowed), or None.

    An unclosed ``\boxed{`` is skipped in favour of the complete one before it; with ``\boxed{\boxed{C}}`` the
    innermost (last opened) one wins, giving ``C``. Only the brace form counts (``\boxed C`` does not).
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def normalize_choice(answer: str) -> str | None:
    """The choice letter (upper case) written in ``answer``, or None when no letter can be read.

    Accepts ``C``, ``c``, ``(C)``, ``[C]``, ``C.``, ``C)``, ``C: text``, ``(C) text``, optionally wrapped in
    ``$...$``, ``**...**`` or ``\\text{...}``. A bare letter followed by words (``A cat``) is NOT read,
    since it is indistinguishable from prose.
    """
    if not isinstance(answer, str):
        raise TypeError(f"normalize_choice expects a str, got {type(answer).__name__}")
    text = answer.strip().strip("$*").strip()
    while (wrapped := _WRAPPER.fullmatch(text)) is not None:
        text = wrapped.group(1).strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.fullmatch(text)
        if match is not None:
            return match.group(1).upper()
    return None


def answer_reward(model_turns: str | Sequence[str], ground_truth: str) -> float:
    r"""1.0 iff the last ``\boxed{}`` of the model's own turns normalises to the ground-truth letter, else 0.

    ``model_turns`` is the assistant text, or the assistant turns in order; the last turn that holds a
    complete ``\boxed{}`` decides (an empty ``\boxed{}`` there scores 0). Pass ONLY assistant texts: the
    inserted turn-2 user prompt itself contains an empty ``\boxed{}`` and must never be passed.
    ``ground_truth`` may be ``C`` or ``(C)``, in either case.

    >>> answer_reward("The sign is red, so the answer is \\boxed{C}.", "(C)")
    1.0
    >>> answer_reward(["```json\n[]\n```", "It is blue: \\boxed{(b)}"], "C")
    0.0

    Raises:
        ValueError: ``ground_truth`` holds no readable letter (a data bug: it must not silently score 0).
        TypeError: ``model_turns`` is not a str or a sequence of str.
    """
    truth = normalize_choice(ground_truth)
    if truth is None:
        raise ValueError(
            f"ground truth {ground_truth!r} is not a choice letter; fix the dataset row (e.g. 'C')"
        )
    turns = [model_turns] if isinstance(model_turns, str) else list(model_turns)
    if not all(isinstance(turn, str) for turn in turns):
        raise TypeError("answer_reward expects the assistant text or a sequence of assistant texts (str)")
    for turn in reversed(turns):
        boxed = last_boxed(turn)
        if boxed is not None:
            return 1.0 if normalize_choice(boxed) == truth else 0.0
    return 0.0


def episode_answer_reward(turn2_text: str, ground_truth: str, *, turn2_ran: bool = True) -> float:
    r"""The MGPO reward of a two-turn episode: ``answer_reward`` of turn 2's text alone.

    The answer is what turn 2 — the turn that saw the enlarged crop — puts in ``\boxed{}``. A ``\boxed{}`` in
    turn 1 (the grounding turn, which was asked for coordinates only) never earns the reward, also not when
    turn 2 wrote no box or never ran because the response budget was spent (``turn2_ran=False``: reward 0).
    This is what the reference's scoring amounts to: it scores the whole response string, in which the inserted
    turn-2 prompt's empty ``\boxed{}`` comes after anything turn 1 wrote. A turn 2 cut by its length cap is
    scored on what it wrote (a complete box before the cut counts).
    """
    return answer_reward(turn2_text if turn2_ran else "", ground_truth)
