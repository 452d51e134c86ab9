"""The gradient of one policy update on FIXED prompts, responses and rewards, through the trainer's own code
(`batch_advantages`, `logprobs_no_grad`, `update_policy`), for one learner in-process or each of W Ray learners.

Used by tests/test_scale.py to check that the update does not depend on how the batch is split.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from noisyrollout.config import Params
from noisyrollout.rollout.chat import encode_prompts
from noisyrollout.train.batching import shard_prompts
from noisyrollout.train.launcher import RayLearner
from noisyrollout.train.scoring import pad_responses
from noisyrollout.train.step import Collective, Rollouts, batch_advantages, logprobs_no_grad, update_policy


def fixed_batch(n_prompts: int, group: int, vocab: int, seed: int = 0) -> tuple[list[list[list[int]]], list[list[float]]]:
    """Responses of very different lengths (1 to 24 tokens) and 0/1 rewards, per prompt."""
    g = torch.Generator().manual_seed(seed)
    responses, rewards = [], []
    for _ in range(n_prompts):
        lengths = torch.randint(1, 25, (group,), generator=g).tolist()
        responses.append([torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths])
        rewards.append(torch.randint(0, 2, (group,), generator=g).float().tolist())
    return responses, rewards


class _Capture:
    """The optimizer interface of `update_policy`; `step` records the gradient the real optimizer would use."""

    def __init__(self, backward: Callable[..., None], full_grads: Callable[[], torch.Tensor],
                 real_step: Callable[[], Any]) -> None:
        self.backward, self._full_grads, self._real_step = backward, full_grads, real_step
        self.grads: list[torch.Tensor] = []

    def step(self) -> float:
        self.grads.append(self._full_grads().clone())
        self._real_step()   # at lr 1e-30: clears the gradients, leaves the weights as they were
        return 0.0


def probe(model: Any, processor: Any, records: list[dict], params: Params, rank: int, world_size: int,
          responses: list[list[list[int]]], rewards: list[list[float]], optimizer: _Capture,
          collective: Collective) -> torch.Tensor:
    shards = shard_prompts(len(records), world_size, params.train.mini_batches)[rank]
    mine = [i for chunk in shards for i in chunk]
    prompts = encode_prompts(processor, [records[i]["image"] for i in mine], [records[i]["problem"] for i in mine],
                             params.model.system_prompt)
    rows = [(p, ids, r) for p, i in enumerate(mine) for ids, r in zip(responses[i], rewards[i])]
    ids, mask = pad_responses([ids for _, ids, _ in rows], processor.tokenizer.pad_token_id)
    rollouts = Rollouts(prompt_index=torch.tensor([p for p, _, _ in rows]), is_noisy=torch.zeros(len(rows), dtype=torch.bool),
                        response_ids=ids, response_mask=mask, texts=[""] * len(rows))
    advantages = batch_advantages(torch.tensor([r for _, _, r in rows]), rollouts.prompt_index,
                                  params.train.estimator, collective)
    pad = processor.tokenizer.pad_token_id
    # old log-probs 0.1 below the current ones: ratio exp(0.1), inside the clip range for positive advantages only
    old_logp = logprobs_no_grad(model, prompts, rollouts, torch.arange(len(rows)), params, pad) - 0.1
    update_policy(model, optimizer, prompts, rollouts, old_logp, None, advantages, params, pad,
                  [len(c) for c in shards], collective)
    return torch.stack([g for g in optimizer.grads])


def local_gradient(model: Any, processor: Any, records: list[dict], params: Params, responses, rewards) -> torch.Tensor:
    from noisyrollout.train.optim import TorchOptimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    real = TorchOptimizer(trainable, lr=1e-30, weight_decay=0.0, betas=(0.9, 0.99), warmup_steps=0, total_steps=10,
                          max_grad_norm=1e9)
    capture = _Capture(real.backward, lambda: torch.cat([p.grad.flatten() for p in trainable]), real.step)
    return probe(model, processor, records, params, 0, 1, responses, rewards, capture, Collective(1))


class ProbeLearner(RayLearner):
    """A Ray learner that also answers `gradient(...)` with its DeepSpeed engine (ZeRO gathers the full grads)."""

    def gradient(self, overrides: dict[str, Any], record_ids: list[int], responses, rewards) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_grad

        params = Params.model_validate(_merge(self.params.model_dump(mode="json"), overrides))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        capture = _Capture(self.optimizer.backward,
                           lambda: torch.cat([safe_get_full_grad(p).flatten().float() for p in trainable]),
                           self.engine.step)
        records = [self.records[i] for i in record_ids]
        return probe(self.model, self.processor, records, params, self.rank, self.world_size, responses, rewards,
                     capture, self.collective)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) else v
    return out
