"""Answer extraction: the documented precedence, adversarial outputs (several letters, lower case, letters
inside words, option text) and multi-turn behaviour."""

from __future__ import annotations

import pytest

from mgpo_core.evaluation.extract import EXTRACTION_RULES, extract_answer, normalize_option_text

COLOURS = ("red", "blue", "dark red", "green")

# (model text, expected letter, expected rule)
TABLE = [
    # 1. boxed wins over everything else in the text
    (r"The answer is A. \boxed{C}", "C", "boxed"),
    (r"(A) and (B) are wrong. \boxed{(d)}", "D", "boxed"),
    (r"\boxed{A} ... on reflection \boxed{B}", "B", "boxed"),
    (r"\boxed{\text{C}}", "C", "boxed"),
    (r"\boxed{C. dark red}", "C", "boxed"),
    # 2. boxed option text
    (r"\boxed{Dark Red}", "C", "boxed_text"),
    (r"\boxed{blue.}", "B", "boxed_text"),
    # an unreadable boxed falls through to weaker rules
    (r"\boxed{purple} but the answer is B", "B", "answer_is"),
    (r"\boxed{} (C)", "C", "letter_mark"),
    # 3. explicit statements, the last one wins
    ("The answer is B", "B", "answer_is"),
    ("the answer is b.", "B", "answer_is"),
    ("ANSWER: (c)", "C", "answer_is"),
    ("Final answer - D", "D", "answer_is"),
    ("(A) looks plausible and (B) too, but the answer is (C).", "C", "answer_is"),
    ("The answer is A. Wait, no: the correct answer is D", "D", "answer_is"),
    ("I choose B", "B", "answer_is"),
    ("The correct option is [d]", "D", "answer_is"),
    # 4. the whole turn is a letter
    ("B", "B", "bare_letter"),
    ("  (c)  ", "C", "bare_letter"),
    ("**d**", "D", "bare_letter"),
    ("a.", "A", "bare_letter"),
    ("B. blue", "B", "bare_letter"),
    # 5. the whole turn is an option's text
    ("Dark red.", "C", "option_text"),
    ("GREEN", "D", "option_text"),
    # 6. one marked letter
    ("Looking closely at the tag, (B) fits.", "B", "letter_mark"),
    ("Options considered:\nC) it is dark", "C", "letter_mark"),
    # 7. exactly one option text mentioned (nested options resolved to the longer one)
    ("The tag is clearly dark red in the crop.", "C", "option_mention"),
    ("I see something green there", "D", "option_mention"),
]

NO_ANSWER = [
    # several distinct letters with no explicit statement: ambiguous, never a guess
    ("Either (A) or (B).", "ambiguous"),
    ("A. maybe\nB. maybe", "ambiguous"),
    ("It is red or blue", "ambiguous"),
    # a capital letter used as a word, letters inside words, letters outside the choices
    ("A cat sits on the mat", "none"),
    ("Because the bicycle is big", "none"),
    ("The answer is E", "none"),
    ("the answer is a tiny purple thing", "none"),
    ("", "none"),
    ("   \n ", "none"),
]


@pytest.mark.parametrize(("text", "letter", "rule"), TABLE)
def test_extraction_precedence_table(text: str, letter: str, rule: str) -> None:
    got = extract_answer(text, COLOURS)
    assert (got.letter, got.rule) == (letter, rule), got


@pytest.mark.parametrize(("text", "rule"), NO_ANSWER)
def test_outputs_without_a_readable_answer_give_no_letter_and_say_why(text: str, rule: str) -> None:
    got = extract_answer(text, COLOURS)
    assert got.letter is None
    assert got.rule == rule


def test_every_table_rule_is_a_documented_rule() -> None:
    used = {rule for _, _, rule in TABLE} | {rule for _, rule in NO_ANSWER}
    assert used == set(EXTRACTION_RULES)


def test_letters_outside_the_question_choices_are_never_returned() -> None:
    two = ("yes", "no")
    assert extract_answer(r"\boxed{C}", two).letter is None
    got = extract_answer("The answer is D, or maybe (B)", two)
    assert (got.letter, got.rule) == ("B", "letter_mark")


def test_boxed_answer_in_an_earlier_turn_counts_when_the_last_turn_has_none() -> None:
    got = extract_answer([r"I think \boxed{A}", "The crop shows nothing useful."], COLOURS)
    assert (got.letter, got.rule) == ("A", "boxed")


def test_weak_rules_read_only_the_last_turn_not_the_grounding_turn() -> None:
    turn1 = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "(A) tag"}]\n```'
    got = extract_answer([turn1, "It is green."], COLOURS)
    assert (got.letter, got.rule) == ("D", "option_mention")


def test_last_boxed_of_the_last_turn_beats_an_earlier_turn() -> None:
    got = extract_answer([r"\boxed{A}", r"Having seen the crop: \boxed{B}"], COLOURS)
    assert got.letter == "B"


def test_span_records_where_the_letter_was_read() -> None:
    got = extract_answer("blah. The answer is (C), clearly.", COLOURS)
    assert "(C)" in got.span


def test_missing_choices_and_non_text_are_rejected_with_a_fix() -> None:
    with pytest.raises(ValueError, match="choices"):
        extract_answer("B", ())
    with pytest.raises(TypeError, match="str"):
        extract_answer(["B", None], COLOURS)  # type: ignore[list-item]


def test_option_text_normalisation_ignores_case_spacing_and_end_punctuation() -> None:
    assert normalize_option_text("  Dark   RED. ") == "dark red"
    assert normalize_option_text("**blue**") == "blue"
