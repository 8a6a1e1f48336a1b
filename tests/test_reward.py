"""Tests of mgpo_core.reward: the binary reward read from the last \\boxed{} of the model's own turns."""

from __future__ import annotations

import doctest

import pytest

from mgpo_core import reward
from mgpo_core.reward import answer_reward, last_boxed, normalize_choice

# The inserted turn-2 user prompt ends like this in the reference: it must never reach the reward.
TURN2_PROMPT_TAIL = "Put the final answer letter in \\boxed{}."


def test_last_boxed_allows_nested_braces():
    assert last_boxed(r"so \boxed{\text{(C)} {x}} done") == r"\text{(C)} {x}"


def test_last_boxed_takes_the_last_of_several():
    assert last_boxed(r"first \boxed{A}, on reflection \boxed{D}") == "D"


def test_last_boxed_skips_an_unclosed_box_in_favour_of_the_complete_one_before():
    assert last_boxed(r"\boxed{B} and then \boxed{C") == "B"


def test_last_boxed_returns_empty_string_for_an_empty_box_and_none_without_one():
    assert last_boxed(r"answer: \boxed{}") == ""
    assert last_boxed("the answer is C") is None
    assert last_boxed(r"\boxed C") is None  # only the brace form counts


def test_last_boxed_of_nested_boxes_is_the_innermost():
    assert last_boxed(r"\boxed{\boxed{E}}") == "E"


@pytest.mark.parametrize(
    "answer",
    [
        "C",
        "(C)",
        " c ",
        "C.",
        "C) a red car",
        "(C) a red car",
        "c: red",
        "[C]",
        "$C$",
        "**C**",
        r"\text{C}",
        "( c )",
    ],
)
def test_normalize_choice_reads_the_letter_in_every_common_spelling(answer):
    assert normalize_choice(answer) == "C"


@pytest.mark.parametrize("answer", ["", "   ", "A cat", "Option C", "CD", "(", "42", "é"])
def test_normalize_choice_returns_none_when_no_letter_can_be_read(answer):
    assert normalize_choice(answer) is None


def test_normalize_choice_rejects_non_strings():
    with pytest.raises(TypeError, match="str"):
        normalize_choice(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "truth", "expected"),
    [
        (r"It is red. \boxed{C}", "C", 1.0),
        (r"It is red. \boxed{c}", "(C)", 1.0),  # lower case and a parenthesised ground truth
        (r"It is red. \boxed{(C)}", "c", 1.0),
        (r"\boxed{\text{C}}", "C", 1.0),
        (r"It is red. \boxed{B}", "C", 0.0),
        (r"first \boxed{C} then \boxed{B}", "C", 0.0),  # the LAST box counts
        (r"first \boxed{B} then \boxed{C}", "C", 1.0),
        (r"\boxed{}", "C", 0.0),
        ("The answer is C.", "C", 0.0),  # no box, no reward
    ],
)
def test_answer_reward_on_single_texts(text, truth, expected):
    assert answer_reward(text, truth) == expected


def test_answer_reward_uses_the_last_turn_that_holds_a_box():
    assert answer_reward([r"maybe \boxed{B}", r"now clear: \boxed{C}"], "C") == 1.0
    assert answer_reward([r"first guess \boxed{C}", "```json\n[]\n```"], "C") == 1.0
    assert answer_reward([r"\boxed{C}", r"changed my mind: \boxed{}"], "C") == 0.0
    assert answer_reward([], "C") == 0.0


def test_turn2_prompt_must_not_be_passed_because_its_empty_box_would_decide():
    # The model answered correctly in turn 2, but scoring the inserted prompt after it would zero the reward.
    assert answer_reward([r"```json[]```", r"\boxed{C}"], "C") == 1.0
    assert answer_reward([r"\boxed{C}", TURN2_PROMPT_TAIL], "C") == 0.0


def test_answer_reward_refuses_an_unreadable_ground_truth():
    with pytest.raises(ValueError, match="fix the dataset row"):
        answer_reward(r"\boxed{C}", "the red one")


def test_answer_reward_refuses_non_text_turns():
    with pytest.raises(TypeError, match="assistant"):
        answer_reward([r"\boxed{C}", None], "C")  # type: ignore[list-item]


def test_reward_doctests_pass():
    failures, attempted = doctest.testmod(reward, verbose=False)
    assert attempted >= 2 and failures == 0
