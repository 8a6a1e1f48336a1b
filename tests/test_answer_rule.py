r"""The one answer rule (METHOD.md §1.7): the score reads the last complete ``\boxed{}`` of the final assistant
turn exactly as the reward does; the lenient extraction is only a diagnostic."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpo_core.evaluation.extract import STRICT_RULES, extract_answer, strict_answer
from mgpo_core.reward import answer_reward, episode_answer_reward

CHOICES = ("red", "blue", "dark red", "green")

# (final turn, letter, rule)
TABLE = [
    (r"It is red. \boxed{A}", "A", "boxed"),
    (r"\boxed{(c)}", "C", "boxed"),
    (r"\boxed{\text{D}}", "D", "boxed"),
    (r"\boxed{B. blue}", "B", "boxed"),
    (r"\boxed{A} on reflection \boxed{B}", "B", "boxed"),  # two boxes: the last one
    (r"\boxed{B} and an unclosed \boxed{C", "B", "boxed"),  # the last COMPLETE box
    (r"\boxed{A} then \boxed{}", None, "boxed_unreadable"),  # an empty last box scores 0
    (r"\boxed{blue}", None, "boxed_unreadable"),  # option text in the box is not a letter
    (r"\boxed{E}", None, "boxed_unreadable"),  # a letter outside the four choices
    ("The answer is B", None, "no_box"),
    ("blue", None, "no_box"),  # option text only
    ("B", None, "no_box"),  # a bare letter
    ("", None, "no_box"),  # empty final turn
]


@pytest.mark.parametrize(("text", "letter", "rule"), TABLE)
def test_strict_answer_table(text: str, letter: str | None, rule: str) -> None:
    got = strict_answer(text, CHOICES)
    assert (got.letter, got.rule) == (letter, rule)
    assert got.rule in STRICT_RULES
    for truth in "ABCD":
        assert (answer_reward(text, truth) == 1.0) == (letter == truth)


def test_a_box_in_turn_one_never_scores_but_the_lenient_reader_credits_it() -> None:
    turn1, turn2 = r"```json\n[]\n``` \boxed{B}", "I cannot see it."
    assert strict_answer(turn2, CHOICES).letter is None
    assert episode_answer_reward(turn2, "B") == 0.0
    lenient = extract_answer([turn1, turn2], CHOICES)
    assert (lenient.letter, lenient.rule) == ("B", "boxed")


def test_strict_answer_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="choices"):
        strict_answer(r"\boxed{A}", [])
    with pytest.raises(TypeError, match="final assistant turn"):
        strict_answer([r"\boxed{A}"], CHOICES)  # type: ignore[arg-type]


_PIECES = st.sampled_from(
    [r"\boxed{", "}", "{", "A", "b", "(C)", "[d]", "E", " ", "the answer is ", "red", r"\text{", "\n", "."]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join), st.sampled_from("ABCD"))
def test_the_score_and_the_reward_agree_on_any_text(text: str, truth: str) -> None:
    got = strict_answer(text, CHOICES)
    assert (got.letter == truth) == (answer_reward(text, truth) == 1.0)
    assert got.letter is None or got.letter in string.ascii_uppercase[:4]
