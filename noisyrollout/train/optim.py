"""The optimiser side of a learner: AdamW, warm-up + schedule, gradient clipping.

`TorchOptimizer` is the single-process implementation; a DeepSpeed engine can stand behind the same three
calls (`backward`, `step`, `lr`), so `step.py` never knows which one it drives.

The schedules are transformers' own (a linear warm-up, then constant, or a cosine decay to a floor of `0.1 * lr` at
`total_steps`), read one step ahead: optimizer step `s` (0-based) runs with the schedule's value at `s + 1`, so a
warm-up's first step is not spent at lr 0 (`lr * (s + 1) / warmup_steps`) and the last step runs at the floor.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

COSINE_MIN_LR_RATE = 0.1  # the cosine schedule ends at this fraction of the peak learning rate


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
          total_steps: int, schedule: Literal["constant", "cosine"] = "constant"
          ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warm-up + schedule (also handed to DeepSpeed by learners)."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.99))
    # Optimizer step s uses the schedule's value at s + 1 (the scheduler starts one step in): with a warm-up the
    # first step is not spent at lr 0, and the last one reaches the cosine floor.
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, last_epoch=0)
    else:
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                                 num_training_steps=total_steps,
                                                                 min_lr_rate=COSINE_MIN_LR_RATE, last_epoch=0)
    return optimizer, scheduler


class TorchOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, max_grad_norm: float, schedule: Literal["constant", "cosine"] = "constant") -> None:
        self.optimizer, self.scheduler = adamw(params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                               total_steps=total_steps, schedule=schedule)
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
