r"""Answer extraction for evaluation: the SCORE's rule (:func:`strict_answer`) and a lenient diagnostic
(:func:`extract_answer`).

The score (METHOD.md §1.7, DESIGN.md decision 13) uses the training reward's rule and nothing else: the letter in
the last complete ``\boxed{}`` of the FINAL assistant turn (:func:`mgpo_core.reward.answer_reward` of that turn).
A box in an earlier turn, option text or "the answer is B" never earns a point, so benchmark numbers compare
with the paper's and a weak model is not credited for answers the reward would reject.

The lenient extraction below stays as a diagnostic (metric ``lenient_overall``, per-record ``lenient_*``
fields): how many answers a looser reader would have accepted, i.e. how often the model answered but not in the
format it was trained on. It is never a score or a promotion metric.

Lenient precedence (first rule that yields a letter wins; only letters of the question's own choices count):

1. ``boxed``        the content of the LAST complete ``\boxed{...}`` (the training reward's rule),
                    searched from the last assistant turn backwards; read as a letter (``C``, ``(c)``,
                    ``\text{C}``, ``C. red``).
2. ``boxed_text``   the same ``\boxed{}`` content equals one option's text (``\boxed{red}``).
3. ``answer_is``    an explicit statement in the last turn: "the answer is B", "Answer: (B)", "correct option
                    is b", "I choose C"; the LAST such statement wins (models revise themselves).
4. ``bare_letter``  the whole last turn is one line reading as a letter, optionally followed by its text:
                    ``B``, ``(B)``, ``b.``, ``**B**``, ``B. blue``.
5. ``option_text``  the whole last turn equals one option's text (case, spaces and end punctuation ignored).
6. ``letter_mark``  "(B)" or a line starting "B." / "B)" / "B:" in the last turn, when exactly ONE distinct
                    letter is marked that way; several distinct letters make the output ``ambiguous``.
7. ``option_mention`` exactly one option's text occurs (as whole words) in the last turn, after dropping
                    options that only occur inside a longer matching option ("red" inside "dark red");
                    several are ``ambiguous``.

Rules 1-3 are explicit answers, so a mention of other letters around them ("(A) is wrong, the answer is B")
does not matter. Rules 6-7 are weak evidence, hence the one-distinct-answer condition. A lone capital letter
in prose ("A cat sits") and letters inside words never count. Unreadable content inside a ``\boxed{}`` falls
through to the later rules.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from mgpo_core.reward import last_boxed, normalize_choice

__all__ = [
    "EXTRACTION_RULES",
    "STRICT_RULES",
    "Extraction",
    "extract_answer",
    "normalize_option_text",
    "strict_answer",
]

#: Outcomes of :func:`strict_answer`: a letter read from the final turn's last box, a last box whose content is
#: not one of the question's letters, or no complete box in the final turn.
STRICT_RULES = ("boxed", "boxed_unreadable", "no_box")

#: Every lenient ``Extraction.rule``, in precedence order, then the two outcomes without a letter.
EXTRACTION_RULES = (
    "boxed",
    "boxed_text",
    "answer_is",
    "bare_letter",
    "option_text",
    "letter_mark",
    "option_mention",
    "ambiguous",
    "none",
)

# A letter in parentheses/brackets, a capital letter, or a lower-case one that ends the clause: "answer is a
# red car" must not read as (A), "answer is b." may.
_LETTER_TOKEN = r"(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|\b([A-Z])\b|\b([a-z])(?=\s*(?:[.,;:!?)*]|$)))"
# "answer is B", "answer: (B)", "correct choice is b", "final answer - C", "option C is correct" is NOT here
# (too close to "option C is wrong"); "I choose/pick/select C" is.
_ANSWER_IS = re.compile(
    r"(?i:(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice)\s*"
    r"(?:is|:|=|-|would\s+be|should\s+be)|\bI\s+(?:choose|pick|select|go\s+with))\s*\**\s*"
    + _LETTER_TOKEN
    + r"(?![A-Za-z])"
)
# "(B)" anywhere, or "B." / "B)" / "B:" at the start of a line (a list item or a terse reply).
_PAREN_MARK = re.compile(r"\(\s*([A-Za-z])\s*\)")
_LINE_MARK = re.compile(r"(?m)^\s*\**([A-Za-z])[.):]\**(?:\s|$)")
_PUNCT_EDGES = string.punctuation + " \t\n"


@dataclass(frozen=True)
class Extraction:
    """The letter read from a model output (None when unreadable) and the rule that produced it.

    ``rule`` is one of :data:`EXTRACTION_RULES`; ``span`` is the text the letter was read from (for the
    per-sample record, so a person can check the decision).
    """

    letter: str | None
    rule: str
    span: str = ""


def normalize_option_text(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding punctuation and markup stripped."""
    return " ".join(text.lower().split()).strip(_PUNCT_EDGES)


def _letter(match: re.Match[str]) -> str:
    return next(g for g in match.groups() if g is not None).upper()


def strict_answer(final_turn: str, choices: Sequence[str]) -> Extraction:
    r"""The letter the SCORE credits: the last complete ``\boxed{}`` of ``final_turn`` read as a choice letter.

    This is the reward's rule (:func:`mgpo_core.reward.answer_reward` on the final turn alone): a prediction
    is right iff ``answer_reward(final_turn, answer) == 1.0``. Pass only the model's final assistant turn
    (turn 2 of an MGPO episode, the one reply of the direct mode), never the inserted turn-2 prompt (its own
    empty ``\boxed{}``) nor turn 1. The rule is ``boxed``, ``boxed_unreadable`` (the last box holds no letter
    of these choices: ``\boxed{}``, ``\boxed{red}``, ``\boxed{F}`` of four) or ``no_box``.

    >>> strict_answer(r"It is red: \boxed{(b)}", ["blue", "red"]).letter
    'B'
    >>> strict_answer("The answer is B", ["blue", "red"]).rule
    'no_box'
    >>> strict_answer(r"\boxed{A} no, \boxed{red}", ["blue", "red"]).rule
    'boxed_unreadable'
    """
    if not choices:
        raise ValueError("strict_answer needs the question's choices (got none); pass Sample.choices")
    if not isinstance(final_turn, str):
        got = type(final_turn).__name__
        raise TypeError(f"strict_answer expects the final assistant turn as a str, got {got}")
    content = last_boxed(final_turn)
    if content is None:
        return Extraction(None, "no_box")
    letter = normalize_choice(content)
    if letter is None or letter not in string.ascii_uppercase[: len(choices)]:
        return Extraction(None, "boxed_unreadable", content)
    return Extraction(letter, "boxed", content)


def _from_boxed(turns: Sequence[str], letters: str, options: Sequence[str]) -> Extraction | None:
    for turn in reversed(turns):
        content = last_boxed(turn)
        if content is None:
            continue
        letter = normalize_choice(content)
        if letter is not None and letter in letters:
            return Extraction(letter, "boxed", content)
        normalized = normalize_option_text(content)
        hits = [i for i, opt in enumerate(options) if normalize_option_text(opt) == normalized]
        if normalized and len(hits) == 1:
            return Extraction(letters[hits[0]], "boxed_text", content)
        return None  # the decisive \boxed{} is unreadable: later turns' weaker rules decide
    return None


def _option_mentions(text: str, options: Sequence[str]) -> list[int]:
    """Indices of options whose normalised text occurs as whole words, minus those nested in a longer hit."""
    low = " ".join(text.lower().split())
    spans: list[tuple[int, int, int]] = []
    for i, opt in enumerate(options):
        norm = normalize_option_text(opt)
        if not norm:
            continue
        for m in re.finditer(r"(?<!\w)" + re.escape(norm) + r"(?!\w)", low):
            spans.append((m.start(), m.end(), i))
    kept = {
        i for s, e, i in spans if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)
    }
    return sorted(kept)


def extract_answer(turns: str | Sequence[str], choices: Sequence[str]) -> Extraction:
    r"""The letter a model chose, from its assistant turn(s) in order (pass ONLY the model's own text).

    ``choices`` are the option texts in letter order; only their letters (``A``..) can be returned.

    >>> extract_answer("It is red. \\boxed{B}", ["blue", "red"]).letter
    'B'
    >>> extract_answer("(A) is too small, so the answer is (B).", ["cat", "dog"]).rule
    'answer_is'
    >>> extract_answer("Either (A) or (B).", ["cat", "dog"]).rule
    'ambiguous'
    """
    if not choices:
        raise ValueError("extract_answer needs the question's choices (got none); pass Sample.choices")
    turn_list = [turns] if isinstance(turns, str) else list(turns)
    if not all(isinstance(t, str) for t in turn_list):
        raise TypeError("extract_answer expects the assistant text or a sequence of assistant texts (str)")
    letters = string.ascii_uppercase[: len(choices)]
    found = _from_boxed(turn_list, letters, choices)
    if found is not None:
        return found
    last = next((t for t in reversed(turn_list) if t.strip()), "")
    if not last:
        return Extraction(None, "none")

    stated = [m for m in _ANSWER_IS.finditer(last) if _letter(m) in letters]
    if stated:
        return Extraction(_letter(stated[-1]), "answer_is", stated[-1].group(0))

    # One line only: "A. maybe\nB. maybe" lists options, it does not answer.
    whole = None if "\n" in last.strip() else normalize_choice(last)
    if whole is not None and whole in letters:
        return Extraction(whole, "bare_letter", last.strip())

    norm = normalize_option_text(last)
    exact = [i for i, opt in enumerate(choices) if normalize_option_text(opt) == norm]
    if norm and len(exact) == 1:
        return Extraction(letters[exact[0]], "option_text", last.strip())

    marks = {m.group(1).upper() for m in _PAREN_MARK.finditer(last)} | {
        m.group(1).upper() for m in _LINE_MARK.finditer(last)
    }
    marks &= set(letters)
    if len(marks) == 1:
        return Extraction(next(iter(marks)), "letter_mark", last.strip()[:200])
    if len(marks) > 1:
        return Extraction(None, "ambiguous", ",".join(sorted(marks)))

    mentioned = _option_mentions(last, choices)
    if len(mentioned) == 1:
        return Extraction(letters[mentioned[0]], "option_mention", choices[mentioned[0]])
    if len(mentioned) > 1:
        return Extraction(None, "ambiguous", ",".join(letters[i] for i in mentioned))
    return Extraction(None, "none")
