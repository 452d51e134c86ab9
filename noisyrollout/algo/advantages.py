"""Outcome advantages over groups of responses (SPEC section 1, step 4).

In NoisyRollout a group is ALL responses to one prompt: the n_clean rollouts on the clean image and the
n_noisy rollouts on the distorted image together. `groups` gives one hashable id per response.

    grpo          A_i = (r_i - mean_g) / (std_g + 1e-6), std unbiased (n-1); a group of one: mean 0, std 1
    rloo          A_i = r_i * n/(n-1) - mean_g * n/(n-1); a group of one keeps A_i = r_i
    reinforce_pp  REINFORCE++: returns whitened over the whole batch, groups ignored; when `rewards` is one
                  learner's shard, pass the batch's `batch_moments` (see `moments_from_sums`)
    dr_grpo       Dr. GRPO: A_i = r_i - mean_g (no std division; pair with loss_agg "seq-mean-token-sum-norm")
"""

from __future__ import annotations

import math
from typing import Hashable, Literal, Sequence

import torch

Estimator = Literal["grpo", "rloo", "reinforce_pp", "dr_grpo"]
ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp", "dr_grpo")
EPS = 1e-6


def _group_index(groups: Sequence[Hashable]) -> torch.Tensor:
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(g, len(ids)) for g in groups], dtype=torch.long)


def group_stats(rewards: torch.Tensor, groups: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response (group mean, unbiased group std, group size); a group of one gets mean 0, std 1."""
    index = _group_index(groups)
    k = int(index.max()) + 1 if len(index) else 0
    r = rewards.to(torch.float64)
    size = torch.zeros(k, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, index, r) / size
    sq = torch.zeros(k, dtype=torch.float64).index_add_(0, index, (r - mean[index]) ** 2)
    std = (sq / (size - 1).clamp(min=1)).sqrt()
    # a group of equal rewards: its mean is that reward exactly (summing n copies and dividing rounds), its std 0,
    # so every advantage is exactly 0 (not ~1e-10 after dividing rounding noise by std + 1e-6)
    low = torch.full((k,), math.inf, dtype=torch.float64).scatter_reduce_(0, index, r, "amin")
    high = torch.full((k,), -math.inf, dtype=torch.float64).scatter_reduce_(0, index, r, "amax")
    equal = low == high
    mean, std = torch.where(equal, low, mean), torch.where(equal, torch.zeros_like(std), std)
    single = size == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[index], std[index], size[index]


def moments_from_sums(total: float, total_sq: float, count: float) -> tuple[float, float] | None:
    """(mean, unbiased variance) of a batch from its sums of r and r**2 (added up over learners); None when the
    batch has fewer than two rewards."""
    if count < 2:
        return None
    mean = total / count
    return mean, max(total_sq - count * mean * mean, 0.0) / (count - 1)


def group_advantages(rewards: torch.Tensor | Sequence[float], groups: Sequence[Hashable],
                     estimator: Estimator = "grpo",
                     batch_moments: tuple[float, float] | None = None) -> torch.Tensor:
    """One scalar advantage per response (float32, same order as `rewards`).

    `batch_moments`: (mean, unbiased variance) of the whole batch's rewards for `reinforce_pp` when `rewards`
    is one shard of it; None = `rewards` is the batch.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if len(groups) != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {len(groups)} group ids")
    if estimator == "reinforce_pp":
        if batch_moments is None:
            if rewards.numel() < 2:
                return torch.zeros_like(rewards, dtype=torch.float32)
            batch_moments = float(rewards.mean()), float(rewards.var())
        mean, var = batch_moments
        return ((rewards - mean) / math.sqrt(var + 1e-8)).to(torch.float32)
    mean, std, size = group_stats(rewards, groups)
    if estimator == "grpo":
        adv = (rewards - mean) / (std + EPS)
    elif estimator == "dr_grpo":
        adv = rewards - mean
    elif estimator == "rloo":
        scale = size / (size - 1).clamp(min=1)
        adv = torch.where(size > 1, rewards * scale - mean * scale, rewards)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return adv.to(torch.float32)
