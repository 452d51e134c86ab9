"""Per-step training metrics: one dataclass, logged in one place, named with CleanRL-style prefixes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


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

    GROUPS = {
        "reward": ("reward_mean", "reward_clean", "reward_noisy", "accuracy", "accuracy_clean", "accuracy_noisy",
                   "format_rate", "response_length"),
        "noise": ("alpha", "decay"),
        "losses": ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl", "grad_norm", "lr"),
        "time": ("time_generate", "time_reward", "time_logprob", "time_update", "time_step"),
    }

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
    """Append-only JSON-lines file of step metrics (the one place every step is recorded)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, metrics: StepMetrics) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(metrics)) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
