"""Rule grading of a model's response against a benchmark answer.

The answer is the content of the response's last `\\boxed{}` (`noisyrollout.algo.reward.extract_boxed`),
compared with `grade_answer` (normalisation, choice letters A-H, yes/no, degrees, math-verify
equivalence, bounded time). On top of that, for a question that shows lettered choices, an answer
given as a choice's *text* (or as "B. 12", "(B) 12") is mapped to its letter, and a letter is mapped
to its choice's text when the ground truth is a text.

math-verify's time limit works only on the main thread (SPEC stack notes): call these functions
from the main thread; the judge's thread pool only does HTTP. One prediction's rules share one `timeout_s`
budget: once math-verify has spent it (a hostile answer such as `\\boxed{10^{10^{10}}}`), the remaining rules
are skipped and the prediction is wrong, so a prediction takes about `timeout_s` seconds at most, not one limit
per choice. An answer holding a character that is not text (NUL, a lone surrogate, U+FFFD) is wrong.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

from noisyrollout.algo.reward import extract_boxed, grade_answer, is_text

from eval.benchmarks import CHOICE_LETTERS

#: Longest choice text tried with math-verify when matching an answer to a choice.
_MAX_MATH_CHOICE_CHARS = 100

_LEADING_LETTER = re.compile(r"^\(?([A-H])(?:\)|[.:：])\s*(.*)$|^([A-H])$", re.DOTALL)
_STYLE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


@dataclass(frozen=True)
class Grade:
    """The verdict on one response.

    `extracted` is the boxed answer (or the judge's extraction when `graded_by == "judge"`);
    `graded_by` says which rule decided a correct verdict ("rule", "choice", "judge"), or is None
    for a wrong one.
    """

    extracted: str | None
    correct: bool
    graded_by: str | None = None


def _plain(text: str) -> str:
    """Lower-case text without $..$, \\text{} wrappers, outer spaces and a final period."""
    s = _STYLE.sub(r"\1", text).strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return " ".join(s.rstrip(".").split()).lower()


def choice_letter(answer: str, choices: Sequence[str], *, timeout_s: int = 3,
                  deadline: float | None = None) -> str | None:
    """The letter an answer names among `choices`: 'B', '(B)', 'B. text', or the text of one choice.

    Text matching is exact after light normalisation first, then math-verify equivalence; an answer
    that matches several choices names none of them, and so does one whose math-verify comparisons
    reach `deadline` (time.monotonic()) before every choice is tried.
    """
    s = _STYLE.sub(r"\1", answer).strip().strip("$").strip()
    m = _LEADING_LETTER.match(s)
    if m:
        letter = m.group(1) or m.group(3)
        if CHOICE_LETTERS.index(letter) < len(choices):
            return letter
    plain = _plain(answer)
    exact = [i for i, c in enumerate(choices) if _plain(c) == plain]
    if len(exact) == 1:
        return CHOICE_LETTERS[exact[0]]
    if exact or not plain or len(plain) > _MAX_MATH_CHOICE_CHARS:
        return None
    equal = []
    for i, c in enumerate(choices):
        if len(c) > _MAX_MATH_CHOICE_CHARS:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if grade_answer(answer, c, timeout_s=timeout_s):
            equal.append(i)
    return CHOICE_LETTERS[equal[0]] if len(equal) == 1 else None


def grade_extracted(extracted: str | None, answer: str, *, choices: Sequence[str] | None = None,
                    timeout_s: int = 3) -> tuple[bool, str | None]:
    """(correct, graded_by) for an already extracted answer, its rules within about `timeout_s` seconds."""
    if extracted is None or not extracted.strip() or not is_text(extracted):
        return False, None
    deadline = time.monotonic() + timeout_s
    if grade_answer(extracted, answer, timeout_s=timeout_s):
        return True, "rule"
    if not choices or time.monotonic() >= deadline:
        return False, None
    letter = choice_letter(extracted, choices, timeout_s=timeout_s, deadline=deadline)
    if letter is None:
        return False, None
    gold = answer.strip().strip("()").upper()
    if len(gold) == 1 and gold in CHOICE_LETTERS:
        correct = letter == gold
    else:  # the ground truth is a value: grade the text of the chosen option
        correct = grade_answer(choices[CHOICE_LETTERS.index(letter)], answer, timeout_s=timeout_s)
    return correct, ("choice" if correct else None)


def grade_prediction(prediction: str, answer: str, *, choices: Sequence[str] | None = None,
                     timeout_s: int = 3) -> Grade:
    """Grade a full response: its last \\boxed{} against the answer (no boxed answer -> wrong)."""
    extracted = extract_boxed(prediction) if prediction else None
    correct, graded_by = grade_extracted(extracted, answer, choices=choices, timeout_s=timeout_s)
    return Grade(extracted=extracted, correct=correct, graded_by=graded_by)
