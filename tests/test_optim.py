"""The learning-rate schedules of `TorchOptimizer`, against values computed here by hand."""

from __future__ import annotations

import math

import pytest
import torch

from noisyrollout.train.optim import TorchOptimizer, adamw

LR, WARMUP, TOTAL = 1e-3, 4, 12
BETAS = (0.9, 0.99)


def _lrs(schedule: str, warmup_steps: int = WARMUP, steps: int = TOTAL, min_lr_rate: float = 0.1) -> list[float]:
    """The learning rate each optimizer step runs with (read before the step)."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = TorchOptimizer([weight], lr=LR, weight_decay=0.0, betas=BETAS, warmup_steps=warmup_steps,
                               total_steps=steps, max_grad_norm=1.0, schedule=schedule, min_lr_rate=min_lr_rate)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.lr)
        weight.grad = torch.ones(3)
        optimizer.step()
    return lrs


def test_constant_with_warmup() -> None:
    # linear warm-up read one step ahead: step s < 4 runs with lr * (s + 1) / 4, then lr
    expected = [0.25e-3, 0.5e-3, 0.75e-3, 1e-3] + [1e-3] * 8
    assert _lrs("constant") == pytest.approx(expected, abs=1e-15)


def test_cosine_with_warmup_decays_to_a_tenth() -> None:
    decay = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]  # schedule points 4..12 of 12
    expected = [0.25e-3, 0.5e-3, 0.75e-3] + [LR * f for f in decay]
    lrs = _lrs("cosine")
    assert lrs == pytest.approx(expected, abs=1e-15)
    assert lrs[WARMUP - 1] == pytest.approx(LR) and lrs[-1] == pytest.approx(0.1 * LR)


def test_no_warmup_runs_at_the_peak_or_decays_from_it() -> None:
    assert _lrs("constant", warmup_steps=0, steps=3) == pytest.approx([LR] * 3)
    assert _lrs("cosine", warmup_steps=0, steps=2) == pytest.approx([LR * 0.55, LR * 0.1])


def test_adamw_skips_frozen_parameters_and_sets_its_options() -> None:
    frozen, live = torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.nn.Parameter(torch.ones(2))
    optimizer, scheduler = adamw([frozen, live], lr=LR, weight_decay=0.01, betas=(0.8, 0.95), warmup_steps=0,
                                 total_steps=5)
    [group] = optimizer.param_groups
    assert group["params"] == [live] and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.01
    assert scheduler.get_last_lr() == [LR]


def test_the_cosine_floor_is_min_lr_rate_and_required() -> None:
    assert _lrs("cosine", warmup_steps=0, steps=2, min_lr_rate=0.3) == pytest.approx([LR * 0.65, LR * 0.3])
    with pytest.raises(ValueError, match="min_lr_rate"):
        adamw([torch.nn.Parameter(torch.ones(2))], lr=LR, weight_decay=0.0, betas=BETAS, warmup_steps=0,
              total_steps=5, schedule="cosine")
