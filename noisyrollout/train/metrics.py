"""Per-step training metrics: one dataclass, logged in one place, named with CleanRL-style prefixes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from noisyrollout.files import dumps


@dataclass
class RolloutScores:
    """Per-response outcomes of one rollout batch (what learners send back to be merged exactly)."""

    rewards: list[float]
    accuracy: list[float]
    formats: list[float]
    is_noisy: list[bool]
    lengths: list[int]
    timed_out: list[bool] = field(default_factory=list)   # grading ran out of time: scored 0 (reward_pool.py)

    @staticmethod
    def concat(parts: Sequence["RolloutScores"]) -> "RolloutScores":
        return RolloutScores(*[sum((getattr(p, f.name) for p in parts), []) for f in fields(RolloutScores)])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def reward_metrics(s: RolloutScores) -> dict[str, float]:
    """The reward block of StepMetrics, clean and noisy rollouts separately."""
    clean = [i for i, noisy in enumerate(s.is_noisy) if not noisy]
    noisy = [i for i, n in enumerate(s.is_noisy) if n]
    return {
        "reward_mean": _mean(s.rewards),
        "reward_clean": _mean([s.rewards[i] for i in clean]),
        "reward_noisy": _mean([s.rewards[i] for i in noisy]),
        "accuracy": _mean(s.accuracy),
        "accuracy_clean": _mean([s.accuracy[i] for i in clean]),
        "accuracy_noisy": _mean([s.accuracy[i] for i in noisy]),
        "format_rate": _mean(s.formats),
        "response_length": _mean([float(n) for n in s.lengths]),
        "timeouts": sum(s.timed_out),
    }


@dataclass
class StepMetrics:
    step: int
    alpha: float              # distortion strength used this step, alpha0 * decay
    decay: float
    reward_mean: float
    reward_clean: float       # nan when n_clean == 0
    reward_noisy: float       # nan when n_noisy == 0
    accuracy: float
    accuracy_clean: float
    accuracy_noisy: float
    format_rate: float
    response_length: float    # mean tokens per response
    pg_loss: float
    clip_frac: float
    approx_kl: float
    entropy: float
    kl: float
    grad_norm: float
    lr: float
    time_generate: float
    time_reward: float
    time_logprob: float       # old (and reference) log-probs on the clean image
    time_update: float
    time_step: float
    timeouts: int = 0         # responses whose grading ran out of time (per response or the step's budget): scored 0

    GROUPS = {
        "reward": ("reward_mean", "reward_clean", "reward_noisy", "accuracy", "accuracy_clean", "accuracy_noisy",
                   "format_rate", "response_length", "timeouts"),
        "noise": ("alpha", "decay"),
        "losses": ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl", "grad_norm", "lr"),
        "time": ("time_generate", "time_reward", "time_logprob", "time_update", "time_step"),
    }

    @staticmethod
    def merge(parts: Sequence["StepMetrics"], scores: Sequence[RolloutScores]) -> "StepMetrics":
        """One step's metrics from every learner's: rewards recomputed over all responses, loss statistics added
        up (each learner reports its share of the batch token-mean), times the slowest learner's (grad norm and
        lr are global already)."""
        first = asdict(parts[0])
        out = {**first, **reward_metrics(RolloutScores.concat(scores))}
        for key in ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl"):
            out[key] = sum(getattr(p, key) for p in parts)
        for key in StepMetrics.GROUPS["time"]:
            out[key] = max(getattr(p, key) for p in parts)
        return StepMetrics(**out)

    def to_dict(self) -> dict[str, float]:
        """Flat `group/name` keys, as logged (e.g. `reward/reward_clean`, `time/time_generate`)."""
        d = asdict(self)
        return {f"{group}/{name}": d[name] for group, names in self.GROUPS.items() for name in names}

    def line(self) -> str:
        return (f"step {self.step:4d} | alpha {self.alpha:6.1f} | reward clean {self.reward_clean:.3f} "
                f"noisy {self.reward_noisy:.3f} | acc {self.accuracy:.3f} fmt {self.format_rate:.2f} | "
                f"len {self.response_length:4.1f} | clip {self.clip_frac:.3f} ent {self.entropy:.3f} "
                f"gnorm {self.grad_norm:.2f} | {self.time_step:.1f}s (gen {self.time_generate:.1f} "
                f"logp {self.time_logprob:.1f} upd {self.time_update:.1f})")


class MetricsLog:
    """Append-only JSON-lines file of step metrics (the one place every step is recorded); strict JSON: a nan
    metric (reward_noisy without noisy rollouts) is written as null and read back as None."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, metrics: StepMetrics) -> None:
        with self.path.open("a") as f:
            f.write(dumps(asdict(metrics)) + "\n")

    def rewrite(self, rows: Sequence[dict]) -> None:
        """Replace the file with `rows` (a resumed run keeps exactly the steps its checkpoint holds)."""
        self.path.write_text("".join(dumps(r) + "\n" for r in rows))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
