"""A step's rewards in bounded time: the cheap rules in this process, math-verify in killable worker processes.

`reward.score_batch` grades one response after the other, each math-verify phase limited by signal.alarm, so a
batch of hostile answers (`\\boxed{10^{10^{10}}}`, huge factorials, nested integrals: ~3 s each) stalls a step for
minutes. `RewardPool.score_batch` gives the same scores on the same responses, but

    format, extraction, letters, words, integers, exact matches   in this process (`reward.quick_score`)
    everything else                                                `reward.math_verify_equal` in a pebble worker,
                                                                   killed after `train.reward_timeout_s`
    the whole batch                                                at most `train.reward_budget_s`: what is not
                                                                   graded by then scores accuracy 0

and reports which responses ran out of time (`reward/timeouts`). Workers are forked (they start in milliseconds and
need no importable `__main__`), die with the process that owns them (PR_SET_PDEATHSIG on Linux), are recycled every
`MAX_TASKS` tasks, and a pool whose workers were killed is rebuilt. `shared_pool` keeps one pool per process,
created on first use and closed at exit, so a learner needs no code to own it.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass
from typing import Sequence

import pebble
from pebble.pool.process import WORKERS_NAME

from noisyrollout.algo.reward import combine, math_verify_equal, quick_score

MAX_TASKS: int = 500  # tasks a worker runs before it is replaced (bounds what sympy's caches can grow to)

_log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass
class BatchScores:
    """`reward.score_batch`'s dicts, and for each response whether its grading ran out of time (scored 0)."""

    scores: list[dict[str, float]]
    timed_out: list[bool]

    @property
    def timeouts(self) -> int:
        return sum(self.timed_out)


def _worker_init(owner_pid: int) -> None:
    """In each worker: a stop (SIGTERM) is immediate even inside C code, and the worker dies with its owner."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != owner_pid:   # the owner died before prctl took effect
        os._exit(1)


class RewardPool:
    """Scores batches of responses like `reward.score_batch`, in at most `budget_s` seconds per batch.

    `workers`: math-verify processes (forked on the first response that needs one); `timeout_s`: wall-clock seconds
    one response's math-verify may take before its worker is killed (also each math-verify phase's own limit, as in
    `reward.score`); `budget_s`: seconds a whole `score_batch` call may take.
    """

    def __init__(self, workers: int = 2, *, timeout_s: float = 3.0, budget_s: float = 60.0,
                 max_tasks: int = MAX_TASKS) -> None:
        if workers < 1 or timeout_s <= 0 or budget_s <= 0:
            raise ValueError(f"RewardPool needs workers >= 1, timeout_s > 0, budget_s > 0 "
                             f"(got {workers}, {timeout_s}, {budget_s})")
        self.workers, self.timeout_s, self.budget_s, self.max_tasks = workers, timeout_s, budget_s, max_tasks
        self._pool: pebble.ProcessPool | None = None
        self._owner = os.getpid()

    # -- the pool -------------------------------------------------------------------------------------------------

    def _live_pool(self) -> pebble.ProcessPool:
        """The worker pool, (re)built when absent or broken (pebble breaks it when an idle worker is killed)."""
        if self._pool is not None and not self._pool.active:
            _log.warning("reward worker pool broken (a worker was killed?): starting a new one")
            self._stop_pool()
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = pebble.ProcessPool(max_workers=self.workers, max_tasks=self.max_tasks,
                                            initializer=_worker_init, initargs=(os.getpid(),), context=context)
        return self._pool

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and leak checks)."""
        return [p.pid for p in multiprocessing.active_children() if p.name == WORKERS_NAME and p.pid]

    def close(self) -> None:
        """Stop every worker now (pending grading is dropped). Safe to call twice; a no-op in a forked child."""
        if os.getpid() == self._owner:
            self._stop_pool()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- grading --------------------------------------------------------------------------------------------------

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str], *, format_weight: float = 0.1,
                    accuracy_only: bool = False) -> BatchScores:
        """`reward.score_batch(responses, ground_truths, format_weight=..., accuracy_only=...)` within `budget_s`
        seconds: a response whose math-verify is killed (`timeout_s`), whose worker dies, or that is still waiting
        when the budget is spent gets accuracy 0 and `timed_out` True; all others get exactly serial scores."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        deadline = time.monotonic() + self.budget_s
        parts = [quick_score(r, g) for r, g in zip(responses, ground_truths)]
        accuracy = {i: a for i, (_, a) in enumerate(parts) if isinstance(a, float)}
        pending = {i: a for i, (_, a) in enumerate(parts) if not isinstance(a, float)}
        timed_out = [False] * len(parts)
        for _ in range(2):   # a second round only for tasks lost with a broken pool
            if not pending or time.monotonic() >= deadline:
                break
            verdicts, lost = self._verify(pending, deadline)
            for i, verdict in verdicts.items():
                accuracy[i] = 0.0 if verdict is None else float(verdict)
                timed_out[i] = verdict is None
            pending = {i: pending[i] for i in lost}
        for i in pending:    # the budget was spent before their turn, or the pool broke twice
            accuracy[i], timed_out[i] = 0.0, True
        if any(timed_out):
            _log.warning("%d of %d responses ran out of grading time (reward_timeout_s=%s, reward_budget_s=%s) "
                         "and scored 0", sum(timed_out), len(parts), self.timeout_s, self.budget_s)
        scores = [combine(accuracy[i], fmt, format_weight=format_weight, accuracy_only=accuracy_only)
                  for i, (fmt, _) in enumerate(parts)]
        return BatchScores(scores=scores, timed_out=timed_out)

    def _verify(self, pairs: dict[int, tuple[str, str]], deadline: float) -> tuple[dict[int, bool | None], list[int]]:
        """math-verify of each (gold, pred) pair in the pool: {index: verdict, None when cut off}, and the indices
        lost with a broken pool (to retry on a new one).

        At most one task per worker is handed to pebble at a time: a task already handed over cannot be withdrawn
        without killing the worker that picks it up, so at the deadline only the running ones are killed."""
        waiting = list(pairs)
        running: dict[Future, int] = {}
        verdicts: dict[int, bool | None] = {}
        lost: list[int] = []
        try:
            pool = self._live_pool()
            while waiting or running:
                while waiting and len(running) < self.workers:
                    i = waiting.pop(0)
                    running[pool.schedule(math_verify_equal, args=(*pairs[i], self.timeout_s),
                                           timeout=self.timeout_s)] = i
                done, _ = wait(running, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
                if not done:          # the budget is spent
                    break
                for future in done:
                    i = running.pop(future)
                    try:
                        verdicts[i] = bool(future.result())
                    except (TimeoutError, pebble.ProcessExpired, CancelledError):
                        verdicts[i] = None    # killed at its limit, or its worker died (killed, out of memory)
                    except Exception as exc:  # BrokenProcessPool and the like: the pool, not the answer
                        _log.warning("reward worker pool failed (%s)", exc)
                        lost.append(i)
        except RuntimeError as exc:   # the pool broke between the check and a schedule
            _log.warning("reward worker pool unusable (%s): starting a new one", exc)
            lost += waiting
            waiting = []
        for future, i in running.items():
            future.cancel()           # still running at the deadline: pebble kills its worker
            verdicts[i] = None
        for i in waiting:             # never started: the budget was spent
            verdicts[i] = None
        if lost:
            self._stop_pool()
        return verdicts, lost


_SHARED: dict[tuple[int, float, float], RewardPool] = {}


def shared_pool(workers: int, timeout_s: float, budget_s: float) -> RewardPool:
    """This process's pool for these settings, created on first use and closed at interpreter exit."""
    key = (workers, float(timeout_s), float(budget_s))
    if key not in _SHARED:
        _SHARED[key] = RewardPool(workers, timeout_s=timeout_s, budget_s=budget_s)
    return _SHARED[key]


@atexit.register
def close_shared_pools() -> None:
    """Stop the workers of every shared pool (also run at exit; a killed owner's workers die by PDEATHSIG)."""
    while _SHARED:
        _SHARED.popitem()[1].close()
