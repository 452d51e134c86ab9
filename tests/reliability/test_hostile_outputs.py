"""Hostile model outputs (issue #25, case 2): the reward and the grader give them 0 within a stated time, one at a
time and a whole step of them, and the run goes on.

Bounds (measured on the 2-core CI machine, see RELIABILITY.md): the cheap cases (100k characters, 10k braces, an
unclosed box, `9**9**9**9`, NUL, undecodable bytes) take milliseconds; LaTeX that makes sympy slow is stopped by
math-verify's own limit (~3 s at timeout_s=3) in the serial reward and the grader; in a training step the
killable worker pool (`noisyrollout/train/reward_pool.py`) cuts each response at `reward_timeout_s` and the whole
batch at `reward_budget_s`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from eval.grading import grade_prediction
from noisyrollout.algo.reward import MAX_RESPONSE_CHARS, score, score_batch
from noisyrollout.train.metrics import RolloutScores, StepMetrics, reward_metrics
from noisyrollout.train.reward_pool import RewardPool

THINK = "<think>Let me see.</think> "
CHOICES = ["3", "4", r"\frac{1}{2}", "x^2"]


def _decoded(raw: bytes, errors: str) -> str:
    """Bytes as a tokenizer's decode would hand them over."""
    return raw.decode("utf-8", errors=errors)


# Answered in milliseconds, without math-verify (or with a parse that fails at once). Each holds a "3" somewhere.
CHEAP = {
    "100k_chars_in_box": THINK + "\\boxed{" + "3+" * 50_000 + "3}",
    "10k_nested_braces": THINK + "\\boxed{" + "{" * 10_000 + "3" + "}" * 10_000 + "}",
    "10k_unclosed_braces": THINK + "\\boxed{" + "{" * 10_000 + "3",
    "unclosed_boxed": THINK + "\\boxed{3",
    "python_power_tower": THINK + "\\boxed{9**9**9**9}",
    "nul_bytes": THINK + "\x00" * 1000 + "\\boxed{\x00 3}\x00",
    "invalid_utf8_replace": _decoded(b"<think>\xff\xfe</think> \\boxed{\xc3\x28 3}", "replace"),
    "invalid_utf8_surrogateescape": _decoded(b"<think>\xff</think> \\boxed{\xed\xa0\x80 3\xff}", "surrogateescape"),
}
CHEAP_BOUND_S = 0.5

# LaTeX that makes sympy slow: math-verify's own time limits stop it (serial), or the pool kills it.
SLOW = {
    "power_tower_10": THINK + r"\boxed{10^{10^{10}}}",
    "power_tower_9": THINK + r"\boxed{9^{9^{9^{9^{9}}}}}",
    "factorial_of_power": THINK + r"\boxed{(10^{10})!}",
    # huggingface/Math-Verify#65 ("parse hangs forever despite the timeout"); with 0.9.0 its limit holds
    "math_verify_65": THINK + r"\boxed{\dfrac{5^{\left(5^{\left(5^{\left(5^5\right)}\right)} - 4\right)} - 5}{16}}",
    "nested_integral": THINK + r"\boxed{\int_0^1\int_0^1\int_0^1 e^{x y z} \sin(x^{y^z}) \,dx\,dy\,dz}",
    "huge_sum": THINK + r"\boxed{\sum_{n=1}^{10^{9}} n^{n}}",
}
SERIAL_BOUND_S = 8.0     # one response, reward.score or grade_prediction at timeout_s=3 (measured max 4.9 s)


@pytest.fixture(autouse=True, scope="module")
def _quiet_warm_math_verify():
    """math-verify logs one warning per timeout: keep the test output readable. Its first call in a process
    loads the LaTeX parser (~0.5 s, once): done here, not counted in a response's time."""
    logging.disable(logging.WARNING)
    score(r"\boxed{\frac{1}{2}}", "0.5")
    yield
    logging.disable(logging.NOTSET)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


# --- one response at a time: the serial reward and the grader ---------------------------------------------------


@pytest.mark.parametrize("name", list(CHEAP))
def test_cheap_hostile_output_scores_zero_at_once(name):
    response = CHEAP[name]
    start = time.perf_counter()
    reward = score(response, "3")
    grade = grade_prediction(response, "3", choices=CHOICES)
    elapsed = time.perf_counter() - start
    assert reward["accuracy"] == 0.0 and grade.correct is False
    assert elapsed < CHEAP_BOUND_S, f"{name}: {elapsed:.2f} s"


def test_a_100k_character_response():
    """Over MAX_RESPONSE_CHARS the reward is 0 at once; the grader reads its last box, in linear time."""
    response = THINK + "x" * 100_000 + r"\boxed{3}"
    assert len(response) > MAX_RESPONSE_CHARS
    start = time.perf_counter()
    assert score(response, "3") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert grade_prediction(response, "4", choices=CHOICES).correct is False
    assert grade_prediction(response, "3").correct is True   # a long right answer is right in evaluation
    assert time.perf_counter() - start < CHEAP_BOUND_S


def test_undecodable_bytes_around_a_right_answer_are_wrong():
    """math-verify alone skips the junk and reads these as 3; the reward and grader call them wrong."""
    for junk in ("\x00", "\ufffd(", "\udced"):
        assert score(rf"\boxed{{{junk} 3}}", "3")["accuracy"] == 0.0
        assert grade_prediction(rf"\boxed{{{junk} 3}}", "3", choices=CHOICES).correct is False
    assert score(r"\boxed{ 3}", "3")["accuracy"] == 1.0   # the same answer without them


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_slow_latex_is_stopped_in_the_serial_reward_and_the_grader(name):
    response = SLOW[name]
    start = time.perf_counter()
    assert score(response, "3")["accuracy"] == 0.0
    reward_s = time.perf_counter() - start
    start = time.perf_counter()
    assert grade_prediction(response, "3", choices=CHOICES).correct is False
    grade_s = time.perf_counter() - start
    print(f"\n{name}: reward {reward_s:.2f} s, grader {grade_s:.2f} s (bound {SERIAL_BOUND_S} s)")
    assert reward_s < SERIAL_BOUND_S and grade_s < SERIAL_BOUND_S, f"{name}: {reward_s:.1f} s, {grade_s:.1f} s"


# --- a whole batch: the killable pool the step grades with --------------------------------------------------------

GOLDS = ["3", "B", "yes", "red", r"\frac{1}{2}", "0.5", r"2\sqrt{3}", "x+1", "45", "C", "1/3", r"\pi", "12", "A",
         "no", r"\{1, 2\}"]


def reference_batch() -> tuple[list[str], list[str]]:
    """16 prompts x 4 responses (the embedded profile's step): right, right in another form, wrong, no box."""
    other = {"3": "3.0", "B": "(B)", "yes": "Yes", "red": r"\text{red}", r"\frac{1}{2}": "0.5", "0.5": "1/2",
             r"2\sqrt{3}": r"\sqrt{12}", "x+1": "1+x", "45": r"45^\circ", "C": r"\text{(C)}", "1/3": r"\frac{2}{6}",
             r"\pi": r"\frac{2\pi}{2}", "12": "12.", "A": "a", "no": "No.", r"\{1, 2\}": r"\{2, 1\}"}
    wrong = {"3": "4", "B": "D", "yes": "no", "red": "der", r"\frac{1}{2}": r"\frac{1}{3}", "0.5": "0.25",
             r"2\sqrt{3}": r"3\sqrt{2}", "x+1": "x-1", "45": "30", "C": "B", "1/3": "3", r"\pi": "3.14",
             "12": "21", "A": "E", "no": "yes", r"\{1, 2\}": r"\{1, 3\}"}
    responses, golds = [], []
    for gold in GOLDS:
        responses += [THINK + rf"\boxed{{{gold}}}", rf"so \boxed{{{other[gold]}}}.", THINK + rf"\boxed{{{wrong[gold]}}}",
                      THINK + "it is " + gold]
        golds += [gold] * 4
    return responses, golds


def test_the_pool_gives_the_serial_scores_on_a_normal_batch():
    responses, golds = reference_batch()
    serial = score_batch(responses, golds, format_weight=0.1)
    with RewardPool(2, timeout_s=3, budget_s=60) as pool:
        graded = pool.score_batch(responses, golds, format_weight=0.1)
        again = pool.score_batch(responses, golds, accuracy_only=True)
    assert graded.scores == serial and graded.timeouts == 0
    assert again.scores == score_batch(responses, golds, accuracy_only=True)
    assert sum(s["accuracy"] for s in serial) == 32   # the batch is not trivial: right, other form, wrong, no box


def test_a_batch_of_slow_latex_is_cut_at_the_per_response_limit():
    names = list(SLOW)
    responses = [SLOW[n] for n in names] + [THINK + r"\boxed{\frac{1}{2}}", THINK + r"\boxed{x+1}"]
    golds = ["3"] * len(names) + ["0.5", "1+x"]
    with RewardPool(2, timeout_s=1, budget_s=30) as pool:
        start = time.perf_counter()
        graded = pool.score_batch(responses, golds)
        elapsed = time.perf_counter() - start
    assert [s["accuracy"] for s in graded.scores] == [0.0] * len(names) + [1.0, 1.0]
    assert graded.timed_out[-2:] == [False, False]
    # 6 hostile responses x 1 s on 2 workers, plus the kills and respawns
    assert elapsed < 6.0, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_128_hostile_responses_finish_within_the_step_budget():
    """Serially these take ~3 s each (~6 minutes); with a 10 s budget the batch takes 10 s and the step goes on."""
    responses = [SLOW[n] for n in SLOW] * 21 + [THINK + r"\boxed{\frac{1}{2}}"] * 2
    responses = responses[:126] + [THINK + r"\boxed{\frac{1}{2}}", THINK + r"\boxed{3}"]
    golds = ["3"] * 126 + ["0.5", "3"]
    assert len(responses) == 128
    budget_s = 10.0
    with RewardPool(2, timeout_s=3, budget_s=budget_s) as pool:
        start = time.perf_counter()
        graded = pool.score_batch(responses, golds)
        elapsed = time.perf_counter() - start
        # the pool is usable at once for the next step, with exact scores
        normal, normal_golds = reference_batch()
        assert pool.score_batch(normal, normal_golds).scores == score_batch(normal, normal_golds)
    print(f"\n128 hostile responses: {elapsed:.1f} s (budget {budget_s} s), {graded.timeouts} cut off")
    assert elapsed < budget_s + 1.0, f"{elapsed:.1f} s"
    assert all(s["accuracy"] == 0.0 for s in graded.scores[:126])
    assert graded.scores[127]["accuracy"] == 1.0   # an integer: graded in-process, never cut off
    assert graded.timeouts >= 100                  # most never reached a worker within the budget


def test_the_pool_survives_a_killed_worker():
    responses, golds = reference_batch()
    serial = score_batch(responses, golds)
    with RewardPool(2, timeout_s=3, budget_s=60) as pool:
        assert pool.score_batch(responses, golds).scores == serial
        for pid in pool.worker_pids():   # idle workers killed: pebble marks the pool broken
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert pool.score_batch(responses, golds).scores == serial
        # a worker killed while it grades: that response scores 0, the others are exact
        hostile = [SLOW["power_tower_10"]] + responses
        killer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import os, signal, time
            time.sleep(0.5)
            for pid in {pool.worker_pids()!r}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            """)])
        graded = pool.score_batch(hostile, ["3"] + golds)
        killer.wait(10)
        assert graded.scores[0]["accuracy"] == 0.0
        assert all(cut or got == want for got, want, cut in zip(graded.scores[1:], serial, graded.timed_out[1:]))
        assert pool.score_batch(responses, golds).scores == serial
    assert pool.worker_pids() == []


OWNER = textwrap.dedent("""
    import os, sys
    from noisyrollout.train.reward_pool import shared_pool
    pool = shared_pool(2, 3.0, 60.0)
    pool.score_batch([r"\\boxed{x+1}"], ["1+x"])
    print(" ".join(map(str, pool.worker_pids())), flush=True)
    if sys.argv[1] == "wait":
        sys.stdin.read()
""")


@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_workers_end_with_their_owner(end):
    """No leaked processes: the workers go when their owner exits (atexit) or is killed (PR_SET_PDEATHSIG)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, "wait" if end == "sigkill" else "exit"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 2
    if end == "sigkill":
        owner.kill()
    owner.wait(30)
    assert _wait_gone(pids, within_s=5.0) == []


def test_timeouts_are_counted_and_merged_across_learners():
    """`reward/timeouts` is the sum over the learners' responses, whatever the split."""
    def part(timed_out: list[bool]) -> RolloutScores:
        n = len(timed_out)
        return RolloutScores(rewards=[0.0] * n, accuracy=[0.0] * n, formats=[1.0] * n, is_noisy=[False] * n,
                             lengths=[4] * n, timed_out=timed_out)

    parts = [part([True, False, True]), part([False, True])]
    zeros = {name: 0.0 for name in StepMetrics.__dataclass_fields__ if name not in ("step", "timeouts")}
    metrics = [StepMetrics(step=0, **{**zeros, **reward_metrics(p)}) for p in parts]
    assert [m.timeouts for m in metrics] == [2, 1]
    merged = StepMetrics.merge(metrics, parts)
    assert merged.timeouts == 3 and merged.to_dict()["reward/timeouts"] == 3
    old_row = {k: v for k, v in vars(merged).items() if k != "timeouts"}   # a metrics log written before the key
    assert StepMetrics(**old_row).timeouts == 0


# --- the real places: a training step, a Ray learner ---------------------------------------------------------------


class HostileEngine:
    """The real HF engine's samples (their tokens feed the update), their texts replaced by hostile outputs."""

    def __init__(self, engine, texts: list[str]) -> None:
        self.engine, self.texts, self.accepts_encoded = engine, texts, engine.accepts_encoded

    def generate(self, prompts, params, encoded=None):
        out = self.engine.generate(prompts, params, encoded)
        for gen in out:
            gen.texts = [self.texts.pop(0) for _ in gen.texts]
        return out


@pytest.mark.slow
def test_a_step_of_128_hostile_responses_stays_within_its_budget(tiny_model_dir, corpus_dir):
    import torch

    from noisyrollout.config import Params
    from noisyrollout.data.loaders import load_records
    from noisyrollout.models.load import load_model, load_processor
    from noisyrollout.rollout.hf_engine import HFEngine
    from noisyrollout.train.optim import TorchOptimizer
    from noisyrollout.train.step import PromptBatch, noisyrollout_step

    budget_s = 10.0
    params = Params.model_validate({
        "data": {"train": str(corpus_dir)},
        "rollout": {"n_clean": 4, "n_noisy": 4, "max_new_tokens": 4},
        "train": {"prompts_per_step": 16, "reward_budget_s": budget_s, "reward_timeout_s": 3, "reward_workers": 2},
    })
    processor, model = load_processor(tiny_model_dir), load_model(tiny_model_dir).train()
    records = load_records(str(corpus_dir), "train", min_pixels=3136, max_pixels=3136, limit=16)
    batch = PromptBatch(images=[r["image"] for r in records], problems=[r["problem"] for r in records],
                        answers=[r["answer"] for r in records])
    texts = [SLOW[n] for n in SLOW] * 22
    engine = HostileEngine(HFEngine(model, processor, system_prompt=params.model.system_prompt, batch_size=128),
                           texts[:128])
    optimizer = TorchOptimizer(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), warmup_steps=0,
                               total_steps=1, max_grad_norm=1.0)
    result = noisyrollout_step(0, 1, batch, model=model, processor=processor, engine=engine, optimizer=optimizer,
                               params=params, generator=torch.Generator().manual_seed(0))
    metrics = result.metrics
    print(f"\nstep of 128 hostile responses: reward {metrics.time_reward:.1f} s (budget {budget_s} s), "
          f"{metrics.timeouts} cut off, step {metrics.time_step:.1f} s")
    assert len(result.rollouts.texts) == 128
    assert metrics.time_reward < budget_s + 1.0, f"{metrics.time_reward:.1f} s"
    assert metrics.accuracy == 0.0 and metrics.format_rate == 1.0
    assert metrics.timeouts >= 64 and metrics.to_dict()["reward/timeouts"] == metrics.timeouts   # 87 measured
    assert metrics.grad_norm == metrics.grad_norm   # the update ran (finite, not nan)


@pytest.mark.slow
def test_a_ray_learner_owns_its_pool(ray_cluster):
    """In a 1-CPU Ray actor the pool starts in well under a second, survives a killed worker, and its workers
    die with the actor (ray.kill is a SIGKILL: no atexit runs)."""
    ray = ray_cluster

    @ray.remote(num_cpus=1)
    class Grader:
        def grade(self, responses: list[str], golds: list[str]):
            from noisyrollout.train.reward_pool import shared_pool

            pool = shared_pool(2, 3.0, 60.0)
            start = time.perf_counter()
            scores = pool.score_batch(responses, golds).scores
            return scores, pool.worker_pids(), time.perf_counter() - start

    responses, golds = reference_batch()
    serial = score_batch(responses, golds)
    grader = Grader.remote()
    scores, pids, first_s = ray.get(grader.grade.remote(responses, golds), timeout=120)
    assert scores == serial and len(pids) == 2
    assert first_s < 3.0, f"first batch with the pool's start: {first_s:.2f} s"
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    scores, pids, _ = ray.get(grader.grade.remote(responses, golds), timeout=120)
    assert scores == serial
    ray.kill(grader)
    assert _wait_gone(pids, within_s=10.0) == []
