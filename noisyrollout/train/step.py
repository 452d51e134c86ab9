"""ONE NoisyRollout step (SPEC section 1), readable top to bottom.

    alpha_t  = alpha0 * anneal(step, total)                       noise schedule
    noisy    = distort(clean image, alpha_t)                      one fresh draw per image
    rollouts = n_clean samples on clean + n_noisy on noisy        current policy
    rewards  = score(response, answer)                            0.9 accuracy + 0.1 format
    adv      = group_advantages(rewards, prompt id)               clean + noisy form ONE group
    old_logp = logp(response | CLEAN image)                       for every response, noisy ones included
                                                                  (the update's own, detached, with one mini-batch)
    loss     = PPO-clip(logp, old_logp, adv)                      on the clean image, token-mean

The heavy parts sit behind `engine` (generation) and `optimizer` (backward/step); nothing here knows
whether they are local torch, DeepSpeed or vLLM. With several learners each runs this on its own prompts, and
`collective` adds up the few batch totals the formulas need (token and sequence counts, reward sums), so the
update is the one a single learner would make on the whole batch (SPEC 1.6: token-mean over the batch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from noisyrollout.algo.advantages import group_advantages, moments_from_sums
from noisyrollout.algo.augment import distort
from noisyrollout.algo.loss import policy_loss
from noisyrollout.algo.schedule import anneal
from noisyrollout.config import Params
from noisyrollout.rollout.engine import Engine, Prompt, SamplingParams
from noisyrollout.train.batching import shard_prompts
from noisyrollout.train.metrics import RolloutScores, StepMetrics, reward_metrics
from noisyrollout.train.reward_pool import shared_pool
from noisyrollout.rollout.chat import EncodedPrompts, cache_image_features, encode_prompts
from noisyrollout.train.scoring import pad_responses, response_logprobs


class Collective:
    """Sums (and maxima) over the learners of a step: a torch.distributed all-reduce, the identity for one."""

    def __init__(self, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        self.world_size = world_size
        self.device = device   # nccl reduces CUDA tensors only

    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, "SUM")

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, "MAX")


LOCAL = Collective()


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
                    n_clean: int, n_noisy: int, sampling: SamplingParams, pad_id: int,
                    encoded: EncodedPrompts | None = None) -> Rollouts:
    """n_clean responses per clean image, n_noisy per distorted image, grouped by prompt.

    With n_clean == n_noisy the clean and distorted prompts go to the engine in ONE call, so they share the
    decoding steps; otherwise one call per kind. `encoded`: the clean prompts then the distorted ones, already
    encoded, for an engine that accepts it.
    """
    per_prompt: list[list[tuple[list[int], str, bool]]] = [[] for _ in batch.images]
    kinds = [(images, n, noisy) for images, n, noisy in ((batch.images, n_clean, False), (noisy_images, n_noisy, True))
             if n > 0 and images is not None]
    calls = [kinds] if len(kinds) == 2 and n_clean == n_noisy else [[k] for k in kinds]
    for call in calls:
        prompts = [Prompt(image=img, text=q) for images, _, _ in call for img, q in zip(images, batch.problems)]
        params = SamplingParams(n=call[0][1], temperature=sampling.temperature, top_p=sampling.top_p,
                                max_new_tokens=sampling.max_new_tokens)
        flags = [noisy for images, _, noisy in call for _ in images]
        # row of each prompt in `encoded`: clean prompts first, then the distorted ones
        n_prompts = len(batch.images)
        encoded_rows = [p + (n_prompts if noisy else 0) for _, _, noisy in call for p in range(n_prompts)]
        call_encoded = None if encoded is None else encoded.select(encoded_rows)
        for i, gen in enumerate(engine.generate(prompts, params, call_encoded)):
            per_prompt[i % len(batch.images)] += [(ids, text, flags[i]) for ids, text in zip(gen.token_ids, gen.texts)]
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
                      ref_model: Any | None = None, mini_batch_sizes: Sequence[int] | None = None,
                      collective: Collective = LOCAL, recompute_old_logp: bool = False,
                      share_prompts: bool = True) -> StepResult:
    """Run one rollout batch and its policy update(s).

    `mini_batch_sizes`: how many of `batch`'s prompts (in order) form each mini-batch on this learner (see
    `batching.shard_prompts`); None = `train.mini_batches` near-equal chunks (one learner).
    `recompute_old_logp`: run the separate old-log-prob pass even where it is redundant (the plain path, for
    tests and benchmarks).
    `share_prompts`: compute each prompt once for all its responses in the log-prob passes (exact); False runs
    every `[prompt | response]` sequence whole (the plain path).
    """
    cfg, noise, roll = params.train, params.noise, params.rollout
    if mini_batch_sizes is None:
        mini_batch_sizes = [len(c) for c in shard_prompts(len(batch.images), 1, cfg.mini_batches)[0]]
    pad_id = processor.tokenizer.pad_token_id
    t0 = time.perf_counter()

    # 1. Noise strength for this step, and one fresh distortion per image.
    decay = anneal(step, total_steps, noise.anneal, noise.resolved_anneal_coef, noise.anneal_mid_step)
    noisy_images = None
    if roll.n_noisy > 0:
        noisy_images = [distort(img, noise.distortion, noise.alpha0, decay, generator) for img in batch.images]

    # 2. Encode the prompts once: the processor, and the vision tower when it is frozen. The clean prompts (the
    #    first len(batch) rows) serve the log-prob passes; the engine samples from all of them, if it can.
    encoded = encode_step_prompts(batch, noisy_images, engine, model, processor, params)
    clean_prompts = encoded.select(range(len(batch.images)))

    # 3. Rollouts with the current policy: n_clean on clean images, n_noisy on distorted ones.
    sampling = SamplingParams(temperature=roll.temperature, top_p=roll.top_p, max_new_tokens=roll.max_new_tokens)
    rollouts = sample_rollouts(engine, batch, noisy_images, n_clean=roll.n_clean, n_noisy=roll.n_noisy,
                               sampling=sampling, pad_id=pad_id, encoded=encoded if engine.accepts_encoded else None)
    t_gen = time.perf_counter()

    # 4. Rewards, and 5. advantages over the mixed group of each prompt.
    answers = [batch.answers[p] for p in rollouts.prompt_index.tolist()]
    graded = shared_pool(cfg.reward_workers, cfg.reward_timeout_s, cfg.reward_budget_s).score_batch(
        rollouts.texts, answers, format_weight=cfg.format_weight, accuracy_only=cfg.accuracy_only)   # = score_batch
    scores = graded.scores
    rewards = torch.tensor([s["overall"] for s in scores])
    advantages = batch_advantages(rewards, rollouts.prompt_index, cfg.estimator, collective)
    t_reward = time.perf_counter()

    # 6. Old (and reference) log-probs of EVERY response, conditioned on the CLEAN image.
    # With one mini-batch the update's forward runs on the very weights that sampled, so the old log-probs ARE
    # its log-probs (ratio exactly 1): the update takes logp.detach() and this pass is skipped.
    every_row = torch.arange(len(rollouts.texts))
    old_logp = None
    if cfg.mini_batches > 1 or recompute_old_logp:
        old_logp = logprobs_no_grad(model, clean_prompts, rollouts, every_row, params, pad_id, share_prompts)
    ref_logp = None
    if ref_model is not None and cfg.kl_coef > 0:
        ref_logp = logprobs_no_grad(ref_model, clean_prompts, rollouts, every_row, params, pad_id, share_prompts)
    t_logp = time.perf_counter()

    # 7. PPO-clip update(s) on the clean image, one optimizer step per whole-prompt mini-batch.
    stats, old_logp = update_policy(model, optimizer, clean_prompts, rollouts, old_logp, ref_logp, advantages, params,
                                    pad_id, mini_batch_sizes, collective, share_prompts)
    t_update = time.perf_counter()

    outcome = RolloutScores(rewards=rewards.tolist(), accuracy=[s["accuracy"] for s in scores],
                            formats=[s["format"] for s in scores], is_noisy=rollouts.is_noisy.tolist(),
                            lengths=rollouts.response_mask.sum(-1).tolist(), timed_out=graded.timed_out)
    metrics = StepMetrics(
        step=step, alpha=noise.alpha0 * decay, decay=decay, **reward_metrics(outcome), **stats, lr=optimizer.lr,
        time_generate=t_gen - t0, time_reward=t_reward - t_gen, time_logprob=t_logp - t_reward,
        time_update=t_update - t_logp, time_step=t_update - t0,
    )
    return StepResult(metrics=metrics, scores=outcome, rollouts=rollouts, old_logp=old_logp)


def encode_step_prompts(batch: PromptBatch, noisy_images: Sequence[Image.Image] | None, engine: Engine, model: Any,
                        processor: Any, params: Params) -> EncodedPrompts:
    """The step's prompts through the processor (and the frozen vision tower): the clean ones, then, for an engine
    that samples from an encoding, the distorted ones (a twin's text is tokenized once, `encode_chats`)."""
    images = list(batch.images)
    if noisy_images and engine.accepts_encoded:
        images += list(noisy_images)
    problems = list(batch.problems) * (len(images) // len(batch.images))
    encoded = encode_prompts(processor, images, problems, params.model.system_prompt)
    if params.model.freeze_vision:
        encoded = cache_image_features(model, encoded)   # each image through the tower once per step
    return encoded


def logprobs_no_grad(model: Any, prompts: EncodedPrompts, rollouts: Rollouts, rows: torch.Tensor, params: Params,
                      pad_id: int, share_prompts: bool = True) -> torch.Tensor:
    """Log-probs of `rows` in chunks of `train.micro_batch_size` responses (no collective: any chunking works)."""
    size = params.train.micro_batch_size or max(len(rows), 1)
    parts = []
    with torch.no_grad():
        for part in rows.split(size):
            logp, _ = response_logprobs(model, prompts, rollouts.prompt_index[part].tolist(),
                                        rollouts.response_ids[part], rollouts.response_mask[part], pad_id=pad_id,
                                        temperature=params.rollout.temperature, share_prompts=share_prompts)
            parts.append(logp)
    return torch.cat(parts)


def batch_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor, estimator: str,
                     collective: Collective = LOCAL) -> torch.Tensor:
    """Advantages of this learner's responses. Groups are whole prompts, so they are local; reinforce_pp
    whitens over the whole batch, every learner's rewards included."""
    moments = None
    if estimator == "reinforce_pp":
        moments = moments_from_sums(*collective.sum([rewards.sum(), (rewards.double() ** 2).sum(), len(rewards)]))
    return group_advantages(rewards, prompt_index.tolist(), estimator, batch_moments=moments)


def update_policy(model: Any, optimizer: Any, prompts: EncodedPrompts, rollouts: Rollouts,
                  old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                  params: Params, pad_id: int, mini_batch_sizes: Sequence[int],
                  collective: Collective, share_prompts: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """One optimizer step per mini-batch, gradients accumulated over micro-batches; returns the statistics and the
    old log-probs used. `old_logp` None (one mini-batch only): the weights are still the sampling ones, so the
    old log-probs are the forward's own, detached.

    Each micro-batch's loss uses the mini-batch's token (or sequence) count summed over ALL learners as its
    denominator, and is multiplied by W because DeepSpeed averages gradients over the W learners: the step is
    then the token-mean gradient of the whole mini-batch, whatever its split over learners and micro-batches.
    Every learner runs the same number of backward calls (ZeRO reduces gradients in each): a learner with
    fewer responses pads with zero-weight micro-batches. The returned loss statistics are this learner's
    shares of the batch values (the driver adds them up), averaged over mini-batches.
    """
    cfg = params.train
    if old_logp is None and len(mini_batch_sizes) > 1:
        raise ValueError("old_logp is required with several mini-batches (the weights change between them)")
    used_old = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)
    sums = {"pg_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0}
    start = 0
    for size in mini_batch_sizes:
        in_chunk = (rollouts.prompt_index >= start) & (rollouts.prompt_index < start + size)
        start += size
        rows = torch.nonzero(in_chunk).flatten()
        batch_tokens, batch_seqs = collective.sum([rollouts.response_mask[rows].sum(), len(rows)])
        most_rows = collective.max([len(rows)])[0]
        n_micro = math.ceil(most_rows / cfg.micro_batch_size) if cfg.micro_batch_size else 1
        for i, part in enumerate(rows.tensor_split(n_micro)):
            weight = 1.0
            if len(part) == 0:   # a learner with fewer responses than its peers: same backward count, no gradient
                part, weight = rows[:1], 0.0
            logp, entropy = response_logprobs(model, prompts, rollouts.prompt_index[part].tolist(),
                                              rollouts.response_ids[part], rollouts.response_mask[part],
                                              pad_id=pad_id, temperature=params.rollout.temperature, with_entropy=True,
                                              share_prompts=share_prompts)
            old = logp.detach() if old_logp is None else old_logp[part].to(logp.device)
            if weight:
                used_old[part] = old.float().cpu()
            out = policy_loss(logp, old, advantages[part], rollouts.response_mask[part],
                              clip_eps=cfg.clip_eps, entropy=entropy if cfg.entropy_coef > 0 else entropy.detach(),
                              entropy_coef=cfg.entropy_coef, ref_logp=None if ref_logp is None else ref_logp[part],
                              kl_coef=cfg.kl_coef, agg=cfg.loss_agg, norm_length=params.rollout.max_new_tokens,
                              batch_tokens=batch_tokens, batch_seqs=batch_seqs)
            optimizer.backward(out.loss * (weight * collective.world_size), last=i == n_micro - 1)
            if weight:
                for key in ("pg_loss", "clip_frac", "approx_kl", "entropy", "kl"):
                    sums[key] += float(getattr(out, key))
        sums["grad_norm"] += optimizer.step()
    return {k: v / len(mini_batch_sizes) for k, v in sums.items()}, used_old
