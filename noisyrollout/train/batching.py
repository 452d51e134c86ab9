"""Batch arithmetic: which prompts a step uses, which learner and mini-batch each one goes to, and the seeds.

    step s          prompts batch_indices(s, P, n, seed)          P = train.prompts_per_step, a fresh shuffle per epoch
    mini-batch k    chunk k of those P prompts                    train.mini_batches chunks, sizes differ by <= 1
    learner r       prompts r, r + W, r + 2W, ... of each chunk   W = learners; every group stays on one learner

Every learner gets at least one prompt of every mini-batch (config refuses P < W * mini_batches), so all of
them run the same number of optimizer steps, which the collective all-reduces of DeepSpeed require.
"""

from __future__ import annotations

import functools
import random

import torch


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(random.Random(seed * 1_000_003 + epoch).sample(range(n), n))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The prompts of rollout batch `step`: a fresh shuffle every epoch, a pure function of the step so a resumed
    run sees exactly the batches an uninterrupted one would."""
    return [_epoch_order(seed, position // n, n)[position % n]
            for position in range(step * batch_size, (step + 1) * batch_size)]


def shard_prompts(n_prompts: int, world_size: int, mini_batches: int) -> list[list[list[int]]]:
    """`shards[r][k]`: positions (in the step's prompt list) of learner r's prompts in mini-batch k."""
    if n_prompts < world_size * mini_batches:
        raise ValueError(f"{n_prompts} prompts cannot give each of {world_size} learners a prompt in each of "
                         f"{mini_batches} mini-batches")
    chunks = [c.tolist() for c in torch.arange(n_prompts).tensor_split(mini_batches)]
    return [[chunk[r::world_size] for chunk in chunks] for r in range(world_size)]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python's and torch's global RNGs; returns a generator for the distortions."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
