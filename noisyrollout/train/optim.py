"""The optimiser side of a learner: AdamW, warm-up + schedule, gradient clipping.

`TorchOptimizer` is the single-process implementation; a DeepSpeed engine can stand behind the same three
calls (`backward`, `step`, `lr`), so `step.py` never knows which one it drives.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch


def lr_lambda(warmup_steps: int, total_steps: int, schedule: Literal["constant", "cosine"]):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
          total_steps: int, schedule: Literal["constant", "cosine"] = "constant"
          ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warm-up + schedule (also handed to DeepSpeed by learners)."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.99))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, schedule))


class TorchOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, max_grad_norm: float, schedule: Literal["constant", "cosine"] = "constant") -> None:
        self.optimizer, self.scheduler = adamw(params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                               total_steps=total_steps, schedule=schedule)
        self.params = self.optimizer.param_groups[0]["params"]
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
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
