"""Rule-based rewards for GRPO (SPEC section 4).

`score` gives {"overall", "accuracy", "format"} for one response: format checks the
`<think>...</think>...\\boxed{...}` layout, accuracy compares the last `\\boxed{}` with the
ground truth (choice letters, yes/no and words as strings, everything else with math-verify).
Every call is bounded in time: hostile or huge outputs score 0, they never hang the run.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import threading
from collections.abc import Sequence

from math_verify import parse, verify
from math_verify.errors import TimeoutException

MAX_RESPONSE_CHARS: int = 32_768  # longer responses score 0 on everything, immediately
MAX_ANSWER_CHARS: int = 512  # a boxed answer longer than this is not sent to math-verify

_BOXED = "\\boxed{"
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char, or a real brace
_STYLE = re.compile(r"\\(?:text|mathrm|textbf|textrm|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree|\s+degrees?$)")
_PAREN_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)")
_CHOICE = re.compile(r"[A-H]")
_WORD = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")  # "yes", "red", "dark blue": compared as text
_INTEGER = re.compile(r"[+-]?\d{1,18}")  # plain integers: compared as numbers, without math-verify
_LETTER = re.compile(r"[A-Za-z]")
# NUL and other control characters, lone surrogates (bytes decoded with errors="surrogateescape") and U+FFFD (bytes
# decoded with errors="replace"): not text, so an answer holding one is wrong (math-verify skips some of them and
# would read "\x00 3" or "\ufffd( 3" as 3)
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffd]")

_log = logging.getLogger(__name__)


class _ShortenLongRecords(logging.Filter):
    """math-verify logs the whole input on a timeout (up to 100k characters): keep the head."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > 200:
            record.msg, record.args = f"{message[:200]}... [{len(message)} chars]", None
        return True


for _name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
    logging.getLogger(_name).addFilter(_ShortenLongRecords())


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), None if absent or unbalanced."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    begin = start + len(_BOXED)
    depth = 1
    for match in _BRACE_TOKEN.finditer(text, begin):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[begin : match.start()]
    return None


def format_reward(response: str) -> float:
    """1.0 iff re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response, re.DOTALL) matches.

    Written with str.find (linear time): the regex backtracks badly on hostile input.
    The leftmost choice of each piece leaves the most room for the next one, so it is exact.
    """
    if not response.startswith("<think>"):
        return 0.0
    close = response.find("</think>", len("<think>"))
    if close < 0:
        return 0.0
    box = response.find(_BOXED, close + len("</think>"))
    if box < 0:
        return 0.0
    return 1.0 if response.find("}", box + len(_BOXED)) >= 0 else 0.0


def _normalize(answer: str) -> str:
    """Strip the wrapping that does not change an answer: $..$, \\text{}, degrees, '(B)', a final '.'."""
    s = answer
    for _ in range(4):  # a few passes, for wrappings inside wrappings, e.g. "$\text{(B)}$."
        before = s
        s = s.strip().rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        s = _STYLE.sub(r"\1", s)
        s = _DEGREES.sub("", s)
        s = s.replace("\\left", "").replace("\\right", "")
        letter = _PAREN_LETTER.fullmatch(s.strip())
        s = letter.group(1) if letter else s
        if s == before:
            break
    return s.strip()


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    """A ground truth parsed once: a group's n responses (and every epoch) share its parse. Failures are not
    cached (they raise)."""
    return tuple(parse(_BOXED + gold + "}", parsing_timeout=timeout_s))


def _math_verify_equal(gold: str, pred: str, timeout_s: int | None) -> bool:
    """math-verify on two normalised answers; any exception or timeout counts as False."""
    try:
        gold_parsed = list(_parse_gold(gold, timeout_s))
        pred_parsed = parse(_BOXED + pred + "}", parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def _grade_in_child(gold: str, pred: str, timeout_s: int) -> None:
    """Worker process: the verdict is the exit code (0 equal, 1 not); os._exit skips all cleanup."""
    equal = False
    try:  # a forked child's one thread is its main thread: signal.alarm timeouts work here too
        equal = _math_verify_equal(gold, pred, timeout_s)
    finally:
        os._exit(0 if equal else 1)


def _math_verify_in_process(gold: str, pred: str, timeout_s: int) -> bool:
    """Off the main thread signal.alarm is unavailable: grade in a process we can kill."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    worker = context.Process(target=_grade_in_child, args=(gold, pred, timeout_s))
    try:
        worker.start()
    except Exception as exc:  # e.g. out of processes, or called inside a daemonic process
        _log.warning("could not start a grading process (%s): answer scored as wrong", exc)
        return False
    worker.join(3 * timeout_s + 1)  # parse gold + parse pred + verify, as on the main thread
    if worker.is_alive():
        worker.kill()
        worker.join()
        return False
    return worker.exitcode == 0


def is_text(answer: str) -> bool:
    """False when the answer holds NUL, another control character, a lone surrogate or U+FFFD (undecodable
    bytes): such an answer is wrong whatever else it says."""
    return _NOT_TEXT.search(answer) is None


def quick_verdict(prediction: str, ground_truth: str) -> bool | tuple[str, str]:
    """`grade_answer`'s verdict where it needs no math-verify (fast, bounded by the answer's length): True or False;
    else the normalised (gold, prediction) pair that `math_verify_equal` decides."""
    if len(prediction) > MAX_ANSWER_CHARS or not is_text(prediction):
        return False
    pred, gold = _normalize(prediction), _normalize(ground_truth)
    if not pred or not gold:
        return False
    if _CHOICE.fullmatch(gold) or _WORD.fullmatch(gold) and len(gold) > 1:
        # math-verify would read "yes" as y*e*s (so "sey" would match) and "B" as a variable b.
        return pred.lower() == gold.lower()
    if pred == gold:
        return True
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(pred):   # math-verify's verdict on two integers, ~1000x faster
        return int(gold) == int(pred)
    if _INTEGER.fullmatch(gold) and _LETTER.fullmatch(pred):
        return False   # one letter is a symbol (or e, i) to math-verify, never an integer
    return gold, pred


def math_verify_equal(gold: str, pred: str, timeout_s: float = 3) -> bool:
    """math-verify on a `quick_verdict` pair, each of its phases limited to `timeout_s` seconds (signal.alarm: call
    it on a main thread, e.g. in a worker process). Any error or timeout is False."""
    return _math_verify_equal(gold, pred, max(1, int(timeout_s)))  # math-verify disables its timeout for 0


def grade_answer(prediction: str, ground_truth: str, *, timeout_s: int = 3) -> bool:
    """Are two answers equivalent? Choice letters, yes/no and plain words: case-insensitive text.

    Two plain integers: compared as numbers. Anything else: exact normalised match, else math-verify with a time
    limit (signal.alarm on the main thread, a killable worker process elsewhere). A prediction over
    MAX_ANSWER_CHARS, or holding a character that is not text (NUL, control, a lone surrogate, U+FFFD), is False.
    """
    verdict = quick_verdict(prediction, ground_truth)
    return verdict if isinstance(verdict, bool) else _decide(*verdict, timeout_s)


def _decide(gold: str, pred: str, timeout_s: float) -> bool:
    """math-verify on a `quick_verdict` pair with a time limit: signal.alarm on the main thread, a killable worker
    process elsewhere."""
    timeout_s = max(1, int(timeout_s))  # math-verify disables its timeout for 0
    if threading.current_thread() is threading.main_thread():
        return _math_verify_equal(gold, pred, timeout_s)
    return _math_verify_in_process(gold, pred, timeout_s)


def accuracy_reward(response: str, ground_truth: str, *, timeout_s: int = 3) -> float:
    """1.0 iff the last \\boxed{} of the response is equivalent to the ground truth."""
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    answer = extract_boxed(response)
    return 1.0 if answer is not None and grade_answer(answer, ground_truth, timeout_s=timeout_s) else 0.0


def combine(accuracy: float, fmt: float, *, format_weight: float = 0.1,
            accuracy_only: bool = False) -> dict[str, float]:
    """{"overall", "accuracy", "format"}; overall = (1 - w) * accuracy + w * format, or accuracy alone."""
    overall = accuracy if accuracy_only else (1.0 - format_weight) * accuracy + format_weight * fmt
    return {"overall": overall, "accuracy": accuracy, "format": fmt}


def score(
    response: str,
    ground_truth: str,
    *,
    format_weight: float = 0.1,
    accuracy_only: bool = False,
    timeout_s: int = 3,
) -> dict[str, float]:
    """{"overall", "accuracy", "format"}; overall = (1 - w) * accuracy + w * format, or accuracy alone.
    `quick_score`'s parts, math-verify deciding what they leave open (as the reward pool does, but serially)."""
    fmt, accuracy = quick_score(response, ground_truth)
    if not isinstance(accuracy, float):
        accuracy = float(_decide(*accuracy, timeout_s))
    return combine(accuracy, fmt, format_weight=format_weight, accuracy_only=accuracy_only)


def quick_score(response: str, ground_truth: str) -> tuple[float, float | tuple[str, str]]:
    """`score`'s parts without math-verify: (format, accuracy), the accuracy 1.0 or 0.0, or the `quick_verdict`
    pair still to be decided by `math_verify_equal` (what a killable worker pool runs)."""
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0, 0.0
    answer = extract_boxed(response)
    verdict = False if answer is None else quick_verdict(answer, ground_truth)
    accuracy = float(verdict) if isinstance(verdict, bool) else verdict
    return format_reward(response), accuracy


def score_batch(responses: Sequence[str], ground_truths: Sequence[str], **kw) -> list[dict[str, float]]:
    """`score` for each (response, ground truth) pair; keyword arguments go to `score`."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [score(r, g, **kw) for r, g in zip(responses, ground_truths)]
