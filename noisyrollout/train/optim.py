"""The optimiser side of a learner: AdamW, warm-up + schedule, gradient clipping.

`TorchOptimizer` is the single-process implementation, `DeepSpeedOptimizer` the same three calls (`backward`,
`step`, `lr`) on a DeepSpeed engine (the Ray learners), so `step.py` never knows which one it drives.

Every setting comes from params.yaml (train.* for RL, sft.* for the warm start): nothing here has a default of its
own. The schedules are transformers' own (a linear warm-up, then constant, or a cosine decay to a floor of
`min_lr_rate * lr` at `total_steps`: sft.min_lr_rate), read one step ahead: optimizer step `s` (0-based) runs with
the schedule's value at `s + 1`, so a warm-up's first step is not spent at lr 0 (`lr * (s + 1) / warmup_steps`) and
the last step runs at the floor.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float],
          warmup_steps: int, total_steps: int, schedule: Literal["constant", "cosine"] = "constant",
          min_lr_rate: float | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warm-up + schedule (also handed to DeepSpeed by learners).
    `min_lr_rate`: where the cosine schedule ends, as a fraction of `lr` (required with it, unused otherwise)."""
    if schedule == "cosine" and min_lr_rate is None:
        raise ValueError("the cosine schedule needs min_lr_rate")
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                                  betas=tuple(betas))
    # Optimizer step s uses the schedule's value at s + 1 (the scheduler starts one step in): with a warm-up the
    # first step is not spent at lr 0, and the last one reaches the cosine floor.
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, last_epoch=0)
    else:
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                                 num_training_steps=total_steps,
                                                                 min_lr_rate=min_lr_rate, last_epoch=0)
    return optimizer, scheduler


class TorchOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                 betas: tuple[float, float], warmup_steps: int, total_steps: int, max_grad_norm: float,
                 schedule: Literal["constant", "cosine"] = "constant", min_lr_rate: float | None = None) -> None:
        self.optimizer, self.scheduler = adamw(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                               warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                                               min_lr_rate=min_lr_rate)
        self.params = self.optimizer.param_groups[0]["params"]
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate the gradient of `loss` (`last`: the final micro-batch before `step`; nothing to do here)."""
        loss.backward()

    def step(self) -> float:
        """Clip, step, schedule, zero grads; returns the pre-clip gradient norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class DeepSpeedOptimizer:
    """The `backward` / `step` / `lr` trio `noisyrollout_step` drives, on a DeepSpeed engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate the gradient of `loss`; `last` marks the final micro-batch before `step`, the gradient
        accumulation boundary (ZeRO-2 otherwise keeps only the newest micro-batch's reduced gradients)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        """All-reduce (ZeRO), clip, step, schedule, zero grads; returns the global pre-clip gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])
