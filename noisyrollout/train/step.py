"""ONE NoisyRollout step (SPEC section 1), readable top to bottom.

    alpha_t  = alpha0 * anneal(step, total)                       noise schedule
    noisy    = distort(clean image, alpha_t)                      one fresh draw per image
    rollouts = n_clean samples on clean + n_noisy on noisy        current policy
    rewards  = score(response, answer)                            0.9 accuracy + 0.1 format
    adv      = group_advantages(rewards, prompt id)               clean + noisy form ONE group
    old_logp = logp(response | CLEAN image)                       for every response, noisy ones included
    loss     = PPO-clip(logp, old_logp, adv)                      on the clean image, token-mean

The heavy parts sit behind `engine` (generation) and `optimizer` (backward/step); nothing here knows
whether they are local torch, DeepSpeed or vLLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from noisyrollout.algo.advantages import group_advantages
from noisyrollout.algo.augment import distort
from noisyrollout.algo.loss import policy_loss
from noisyrollout.algo.reward import score_batch
from noisyrollout.algo.schedule import anneal
from noisyrollout.config import Params
from noisyrollout.rollout.engine import Engine, Prompt, SamplingParams
from noisyrollout.train.metrics import RolloutScores, StepMetrics, reward_metrics
from noisyrollout.train.scoring import (EncodedPrompts, cache_image_features, encode_prompts, pad_responses,
                                        response_logprobs)


@dataclass
class PromptBatch:
    """The prompts of one rollout batch (clean images)."""

    images: list[Image.Image]
    problems: list[str]
    answers: list[str]


@dataclass
class Rollouts:
    """All responses of a rollout batch; row i answers prompt `prompt_index[i]`."""

    prompt_index: torch.Tensor    # (N,) long; also the group id: one group per prompt
    is_noisy: torch.Tensor        # (N,) bool; sampled from the distorted image
    response_ids: torch.Tensor    # (N, L) long, right-padded
    response_mask: torch.Tensor   # (N, L) bool; 1 up to and including EOS
    texts: list[str]


def sample_rollouts(engine: Engine, batch: PromptBatch, noisy_images: Sequence[Image.Image] | None, *,
                    n_clean: int, n_noisy: int, sampling: SamplingParams, pad_id: int) -> Rollouts:
    """n_clean responses per clean image, n_noisy per distorted image, grouped by prompt."""
    per_prompt: list[list[tuple[list[int], str, bool]]] = [[] for _ in batch.images]
    for images, n, noisy in ((batch.images, n_clean, False), (noisy_images, n_noisy, True)):
        if n == 0 or images is None:
            continue
        prompts = [Prompt(image=img, text=q) for img, q in zip(images, batch.problems)]
        params = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_new_tokens=sampling.max_new_tokens)
        for p, gen in enumerate(engine.generate(prompts, params)):
            per_prompt[p] += [(ids, text, noisy) for ids, text in zip(gen.token_ids, gen.texts)]
    rows = [(p, *r) for p, responses in enumerate(per_prompt) for r in responses]
    response_ids, response_mask = pad_responses([ids for _, ids, _, _ in rows], pad_id)
    return Rollouts(prompt_index=torch.tensor([r[0] for r in rows]), is_noisy=torch.tensor([r[3] for r in rows]),
                    response_ids=response_ids, response_mask=response_mask, texts=[r[2] for r in rows])


@dataclass
class StepResult:
    metrics: StepMetrics
    scores: RolloutScores         # per-response outcomes, for merging across learners
    rollouts: Rollouts
    old_logp: torch.Tensor        # the log-probs the loss used as the rollout policy's (clean image)


def noisyrollout_step(step: int, total_steps: int, batch: PromptBatch, *, model: Any, processor: Any,
                      engine: Engine, optimizer: Any, params: Params, generator: torch.Generator,
                      ref_model: Any | None = None) -> StepResult:
    """Run one rollout batch and its policy update(s)."""
    cfg, noise, roll = params.train, params.noise, params.rollout
    pad_id = processor.tokenizer.pad_token_id
    t0 = time.perf_counter()

    # 1. Noise strength for this step, and one fresh distortion per image.
    decay = anneal(step, total_steps, noise.anneal, noise.anneal_coef, noise.anneal_mid_step)
    noisy_images = None
    if roll.n_noisy > 0:
        noisy_images = [distort(img, noise.distortion, noise.alpha0, decay, generator) for img in batch.images]

    # 2. Rollouts with the current policy: n_clean on clean images, n_noisy on distorted ones.
    sampling = SamplingParams(temperature=roll.temperature, top_p=roll.top_p, max_new_tokens=roll.max_new_tokens)
    rollouts = sample_rollouts(engine, batch, noisy_images, n_clean=roll.n_clean, n_noisy=roll.n_noisy,
                               sampling=sampling, pad_id=pad_id)
    t_gen = time.perf_counter()

    # 3. Rewards, and 4. advantages over the mixed group of each prompt.
    answers = [batch.answers[p] for p in rollouts.prompt_index.tolist()]
    scores = score_batch(rollouts.texts, answers, format_weight=cfg.format_weight, accuracy_only=cfg.accuracy_only)
    rewards = torch.tensor([s["overall"] for s in scores])
    advantages = group_advantages(rewards, rollouts.prompt_index.tolist(), cfg.estimator)
    t_reward = time.perf_counter()

    # 5. Old (and reference) log-probs of EVERY response, conditioned on the CLEAN image.
    clean_prompts = encode_prompts(processor, batch.images, batch.problems, params.model.system_prompt)
    if params.model.freeze_vision:
        clean_prompts = cache_image_features(model, clean_prompts)   # encode each clean image once per step
    with torch.no_grad():
        old_logp, _ = response_logprobs(model, clean_prompts, rollouts.prompt_index.tolist(), rollouts.response_ids,
                                        rollouts.response_mask, pad_id=pad_id, temperature=roll.temperature)
        ref_logp = None
        if ref_model is not None and cfg.kl_coef > 0:
            ref_logp, _ = response_logprobs(ref_model, clean_prompts, rollouts.prompt_index.tolist(),
                                            rollouts.response_ids, rollouts.response_mask, pad_id=pad_id,
                                            temperature=roll.temperature)
    t_logp = time.perf_counter()

    # 6. PPO-clip update(s) on the clean image: the rollout batch split into `mini_batches` whole-prompt chunks.
    stats = _update(model, optimizer, clean_prompts, rollouts, old_logp, ref_logp, advantages, params, pad_id)
    t_update = time.perf_counter()

    outcome = RolloutScores(rewards=rewards.tolist(), accuracy=[s["accuracy"] for s in scores],
                            formats=[s["format"] for s in scores], is_noisy=rollouts.is_noisy.tolist(),
                            lengths=rollouts.response_mask.sum(-1).tolist())
    metrics = StepMetrics(
        step=step, alpha=noise.alpha0 * decay, decay=decay, **reward_metrics(outcome), **stats, lr=optimizer.lr,
        time_generate=t_gen - t0, time_reward=t_reward - t_gen, time_logprob=t_logp - t_reward,
        time_update=t_update - t_logp, time_step=t_update - t0,
    )
    return StepResult(metrics=metrics, scores=outcome, rollouts=rollouts, old_logp=old_logp)


def _update(model: Any, optimizer: Any, prompts: EncodedPrompts, rollouts: Rollouts, old_logp: torch.Tensor,
            ref_logp: torch.Tensor | None, advantages: torch.Tensor, params: Params, pad_id: int) -> dict[str, float]:
    cfg = params.train
    n_prompts = len(prompts.input_ids)
    chunks = [c.tolist() for c in torch.arange(n_prompts).chunk(cfg.mini_batches)]
    want_entropy = True  # logged every step; it joins the loss only when entropy_coef > 0
    sums = {"pg_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0}
    for chunk in chunks:
        rows = torch.nonzero(torch.isin(rollouts.prompt_index, torch.tensor(chunk))).flatten()
        index = rollouts.prompt_index[rows].tolist()
        logp, entropy = response_logprobs(model, prompts, index, rollouts.response_ids[rows],
                                          rollouts.response_mask[rows], pad_id=pad_id,
                                          temperature=params.rollout.temperature, with_entropy=want_entropy)
        out = policy_loss(logp, old_logp[rows], advantages[rows], rollouts.response_mask[rows],
                          clip_eps=cfg.clip_eps, entropy=entropy if cfg.entropy_coef > 0 else entropy.detach(),
                          entropy_coef=cfg.entropy_coef, ref_logp=None if ref_logp is None else ref_logp[rows],
                          kl_coef=cfg.kl_coef, agg=cfg.loss_agg, norm_length=params.rollout.max_new_tokens)
        optimizer.backward(out.loss)
        sums["grad_norm"] += optimizer.step()
        for key in ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl"):
            sums[key] += float(getattr(out, key))
    return {k: v / len(chunks) for k, v in sums.items()}
