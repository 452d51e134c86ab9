"""Rewards (SPEC section 4): hand-checked answers, the format rule, and bounded time on hostile input."""

import logging
import random
import re
import threading
import time

import pytest

from noisyrollout.algo import reward
from noisyrollout.algo.reward import (
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    accuracy_reward,
    extract_boxed,
    format_reward,
    grade_answer,
    score,
    score_batch,
)

THINK = "<think>Let me work it out.</think> "


def off_main_thread(fn, *args, **kwargs):
    """Run fn in a threading.Thread (the path where signal.alarm is unavailable); return its result."""
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("value", fn(*args, **kwargs)))
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "grading hung off the main thread"
    return out["value"]


# --- extract_boxed -----------------------------------------------------------------------------


def test_extract_boxed_nested_braces():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"


def test_extract_boxed_last_box_wins():
    assert extract_boxed(r"\boxed{1} then \boxed{2}") == "2"


def test_extract_boxed_unbalanced_or_missing():
    assert extract_boxed(r"\boxed{\frac{1}{2}") is None
    assert extract_boxed("the answer is 2") is None
    assert extract_boxed(r"\boxed{1} and \boxed{2") is None  # the last box decides


def test_extract_boxed_escaped_braces():
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


# --- format_reward -----------------------------------------------------------------------------


def test_format_well_formed():
    assert format_reward("<think>a</think> so \\boxed{3}.") == 1.0
    assert format_reward("<think></think>\\boxed{}") == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<think>never closed \\boxed{3}",
        "</think> backwards <think> \\boxed{3}",
        "Sure! <think>a</think> \\boxed{3}",
        "<think>a</think> the answer is 3",
        "<think>a \\boxed{3}</think> no box after the tags",
        "<think>a</think> \\boxed{ never closed",
    ],
)
def test_format_malformed(response):
    assert format_reward(response) == 0.0


def test_format_matches_regex_on_random_strings():
    pattern = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", "x", "\n"]
    rng = random.Random(0)
    positives = 0
    for _ in range(20_000):
        # start with "<think>" half the time, or almost nothing would match
        head = ["<think>"] if rng.random() < 0.5 else []
        text = "".join(head + [rng.choice(pieces) for _ in range(rng.randint(0, 9))])
        expected = 1.0 if pattern.fullmatch(text) else 0.0
        assert format_reward(text) == expected, repr(text)
        positives += expected == 1.0
    assert positives > 200  # the property was checked on both outcomes


# --- grade_answer / accuracy_reward --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "ground_truth"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        ("3", "3.0"),
        (r"45^\circ", "45"),
        (r"45^{\circ}", "45"),
        ("45°", "45"),
        ("45 degrees", "45"),
        ("(B)", "B"),
        ("B.", "B"),
        (r"\text{B}", "B"),
        ("b", "B"),
        ("Yes", "yes"),
        (r"\text{No}.", "no"),
        ("$x+1$", "1+x"),
    ],
)
def test_grade_answer_equivalent(prediction, ground_truth):
    assert grade_answer(prediction, ground_truth)


@pytest.mark.parametrize(
    ("prediction", "ground_truth"),
    [
        ("3", "4"),
        ("A", "B"),
        ("no", "yes"),
        ("sey", "yes"),  # math-verify alone would read both as the product y*e*s
        ("der", "red"),
        ("", "3"),
        (r"\frac{1}{3}", "0.5"),
    ],
)
def test_grade_answer_not_equivalent(prediction, ground_truth):
    assert not grade_answer(prediction, ground_truth)


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
        (r"\boxed{B}", "B", 1.0),
        (r"\boxed{(C)}", "C", 1.0),
        (r"\boxed{A}", "B", 0.0),
        (r"\boxed{Yes}", "yes", 1.0),
        (r"\boxed{no}", "yes", 0.0),
        (r"\boxed{45^\circ}", "45", 1.0),
        (r"\boxed{30^{\circ}}", "45", 0.0),
        (r"\boxed{1} wait, no: \boxed{2}", "2", 1.0),
        ("the answer is 0.5", "0.5", 0.0),
    ],
)
def test_accuracy_reward(response, ground_truth, expected):
    assert accuracy_reward(response, ground_truth) == expected


def test_grade_answer_off_main_thread_agrees():
    assert off_main_thread(grade_answer, r"\frac{1}{2}", "0.5", timeout_s=1) is True
    assert off_main_thread(grade_answer, "3", "4", timeout_s=1) is False


def test_answer_over_cap_is_wrong():
    assert not grade_answer("3" + " " * MAX_ANSWER_CHARS, "3")


# --- score -----------------------------------------------------------------------------------------


def test_score_correct_and_well_formatted():
    assert score(THINK + r"\boxed{\frac{1}{2}}", "0.5") == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}


def test_score_correct_without_think_tags():
    result = score(r"The answer is \boxed{\frac{1}{2}}", "0.5")
    assert result["accuracy"] == 1.0 and result["format"] == 0.0
    assert result["overall"] == pytest.approx(0.9)


def test_score_missing_box():
    assert score("<think>hmm</think> it is 3", "3") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}


def test_score_wrong_but_well_formatted():
    assert score(THINK + r"\boxed{4}", "3")["overall"] == pytest.approx(0.1)


def test_score_accuracy_only_and_weight():
    assert score(THINK + r"\boxed{4}", "3", accuracy_only=True)["overall"] == 0.0
    assert score(r"\boxed{3}", "3", accuracy_only=True)["overall"] == 1.0
    assert score(THINK + r"\boxed{4}", "3", format_weight=0.5)["overall"] == pytest.approx(0.5)


def test_score_batch():
    out = score_batch([THINK + r"\boxed{B}", "B"], ["B", "B"])
    assert [r["overall"] for r in out] == [1.0, 0.0]
    with pytest.raises(ValueError):
        score_batch(["a"], [])


# --- bounded time ------------------------------------------------------------------------------------


def test_huge_response_scores_zero_fast():
    response = THINK + "x" * 100_000 + r"\boxed{3}"
    assert len(response) > MAX_RESPONSE_CHARS
    start = time.perf_counter()
    result = score(response, "3")
    assert time.perf_counter() - start < 1.0
    assert result == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}


HOSTILE = {
    "power_tower": r"\boxed{9^{9^{9^{9^{9}}}}}",
    # 10k nested braces: over MAX_ANSWER_CHARS, rejected before math-verify
    "deep_braces": "\\boxed{" + "{" * 10_000 + "3" + "}" * 10_000 + "}",
    # nesting short enough to reach math-verify, whose parser then times out
    "deep_braces_under_cap": "\\boxed{" + "{" * 250 + "3" + "}" * 250 + "}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("where", ["main_thread", "thread"])
def test_hostile_answer_is_bounded(name, where, caplog):
    response = THINK + HOSTILE[name]
    assert len(response) < MAX_RESPONSE_CHARS
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        if where == "main_thread":
            result = score(response, "3", timeout_s=1)
        else:
            result = off_main_thread(score, response, "3", timeout_s=1)
    assert time.perf_counter() - start < 8.0
    assert result["accuracy"] == 0.0 and result["format"] == 1.0
    assert all(len(r.getMessage()) < 300 for r in caplog.records)  # no 100k-character log lines


def test_stuck_worker_is_killed(monkeypatch):
    """A grader that never returns (e.g. stuck in C code) is killed at the deadline off the main thread."""
    monkeypatch.setattr(reward, "_math_verify_equal", lambda *a: time.sleep(600))  # inherited by fork
    start = time.perf_counter()
    assert off_main_thread(grade_answer, "x+1", "2", timeout_s=1) is False
    assert time.perf_counter() - start < 8.0


INTEGER_PAIRS = [("3", "3"), ("3", "4"), ("-2", "2"), ("+7", "7"), ("007", "7"), ("0", "-0"), ("10", "1"),
                 ("123456789012", "123456789012"), ("5", "05"), ("12", "21")]


@pytest.mark.parametrize("prediction,ground_truth", INTEGER_PAIRS)
def test_integer_fast_path_agrees_with_math_verify(prediction, ground_truth):
    """Two plain integers skip math-verify: the verdict must be the one math-verify gives."""
    from noisyrollout.algo.reward import _math_verify_equal

    assert grade_answer(prediction, ground_truth) == _math_verify_equal(ground_truth, prediction, 3)


def test_a_letter_against_an_integer_skips_math_verify_with_its_verdict():
    """A one-letter prediction (a choice letter where a number is asked) is False without math-verify: the
    verdict math-verify gives for every letter against integers, e and i included."""
    import string

    from noisyrollout.algo.reward import _math_verify_equal

    for gold in ("-1", "0", "1", "2", "3", "10"):
        for letter in string.ascii_letters:
            assert grade_answer(letter, gold) is False
            assert _math_verify_equal(gold, letter, 3) is False


def test_a_ground_truth_is_parsed_once_per_group():
    """The n responses of a group share one parse of their ground truth, and get the uncached verdicts."""
    from math_verify import parse, verify

    from noisyrollout.algo.reward import _parse_gold

    gold, preds = "\\frac{1}{3}", ["1/3", "0.5", "\\frac{2}{6}", "3", "\\dfrac{1}{3}"]
    _parse_gold.cache_clear()
    verdicts = [grade_answer(p, gold) for p in preds]
    reference = [bool(verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + p + "}"))) for p in preds]
    assert verdicts == reference == [True, False, True, False, True]
    info = _parse_gold.cache_info()
    assert info.misses == 1 and info.hits == len(preds) - 1
