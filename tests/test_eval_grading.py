"""Rule grading of benchmark responses: boxed answers, math equivalence, choices, yes/no."""

from __future__ import annotations

import pytest

from eval.grading import choice_letter, grade_extracted, grade_prediction

ABC = ["3", "4", "blue"]


@pytest.mark.parametrize(
    ("response", "answer", "choices", "correct", "graded_by"),
    [
        ("<think>x</think> \\boxed{4\\sqrt{3}}", "4\\sqrt{3}", None, True, "rule"),
        ("\\boxed{1} then \\boxed{\\frac{5}{2}}", "2.5", None, True, "rule"),  # the last box counts
        ("\\boxed{60^\\circ}", "60", None, True, "rule"),
        ("\\boxed{B}", "B", ABC, True, "rule"),
        ("\\boxed{(B)}", "B", ABC, True, "rule"),
        ("\\boxed{4}", "B", ABC, True, "choice"),  # the text of choice B
        ("\\boxed{B. 4}", "B", ABC, True, "choice"),
        ("\\boxed{\\text{Blue}}", "C", ABC, True, "choice"),
        ("\\boxed{\\frac{8}{2}}", "B", ABC, True, "choice"),  # equivalent to a choice's text
        ("\\boxed{B}", "4", ABC, True, "choice"),  # the letter of the right value
        ("\\boxed{3}", "B", ABC, False, None),
        ("\\boxed{4}", "B", None, False, None),  # no choices shown: a value is not a letter
        ("\\boxed{Yes}", "yes", None, True, "rule"),
        ("\\boxed{no}", "yes", None, False, None),
        ("the answer is yes", "yes", None, False, None),  # no \boxed{}: wrong
        ("\\boxed{yes", "yes", None, False, None),  # unbalanced
        ("", "1", None, False, None),
    ],
)
def test_grade_prediction(response: str, answer: str, choices: list[str] | None, correct: bool,
                          graded_by: str | None) -> None:
    grade = grade_prediction(response, answer, choices=choices)
    assert (grade.correct, grade.graded_by) == (correct, graded_by)


def test_extracted_is_the_last_box() -> None:
    assert grade_prediction("\\boxed{1} \\boxed{x^{2}}", "x^2").extracted == "x^{2}"


def test_choice_letter_ambiguous_text_names_nothing() -> None:
    assert choice_letter("4", ["4", "4", "5"]) is None
    assert choice_letter("(C)", ["1", "2", "3"]) == "C"
    assert choice_letter("H", ["1", "2"]) is None  # not one of the shown letters


def test_grade_extracted_none() -> None:
    assert grade_extracted(None, "1") == (False, None)
    assert grade_extracted("  ", "1") == (False, None)
