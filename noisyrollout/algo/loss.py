"""The policy loss of one update (SPEC section 1, step 6): PPO-clip, entropy bonus, low-variance KL.

All tensors are (batch, response_len); `mask` is 1 on response tokens up to and including EOS.

    ratio    = exp(logp - old_logp)
    pg_loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))          per token
    kl       = exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10]      ("low_var_kl")
    loss     = agg(pg_loss) - entropy_coef * agg(entropy) + kl_coef * agg(kl)

`agg` is "token-mean" (mean over every response token of the batch; the paper's setting) or
"seq-mean-token-sum-norm" (Dr. GRPO: per-sequence token sum divided by a constant, then mean over sequences).

When the tensors are one shard of a larger batch (one learner's rows, one micro-batch), pass the WHOLE batch's
`batch_tokens` / `batch_seqs` as denominators: the shards' losses then add up to the batch's loss exactly,
whatever the shards' lengths (a mean of per-shard means would reweight long responses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossAgg = Literal["token-mean", "seq-mean-token-sum-norm"]


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: LossAgg = "token-mean",
              norm_length: int | None = None, count: float | None = None) -> torch.Tensor:
    """Reduce a per-token tensor to a scalar over the masked response tokens.

    `count` is the denominator: the batch's number of response tokens (token-mean) or of sequences
    (seq-mean-token-sum-norm); None = this tensor's own.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        denominator = mask.sum().clamp(min=1.0) if count is None else max(float(count), 1.0)
        return (values * mask).sum() / denominator
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else values.shape[-1]
        denominator = values.shape[0] if count is None else max(float(count), 1.0)
        return ((values * mask).sum(-1) / length).sum() / denominator
    raise ValueError(f"unknown loss aggregation {mode!r}")


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || ref) per token, clamped to [-10, 10]."""
    log_ratio = ref_logp - logp
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


@dataclass
class PolicyLoss:
    loss: torch.Tensor          # scalar to backpropagate
    pg_loss: torch.Tensor       # the clipped surrogate alone (detached)
    clip_frac: torch.Tensor     # fraction of response tokens where the clipped branch was taken
    approx_kl: torch.Tensor     # mean(old_logp - logp): drift from the rollout policy
    entropy: torch.Tensor       # mean token entropy (nan when not computed)
    kl: torch.Tensor            # mean low_var_kl to the reference (nan when not used)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_eps: float = 0.2, entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, agg: LossAgg = "token-mean",
                norm_length: int | None = None, batch_tokens: float | None = None,
                batch_seqs: float | None = None) -> PolicyLoss:
    """PPO-clip loss; `advantages` is one scalar per response, broadcast over its tokens.

    `batch_tokens` / `batch_seqs`: response tokens / sequences of the whole batch this shard belongs to (None:
    the shard is the batch). Every returned statistic is then this shard's share of the batch value.
    """
    count = batch_tokens if agg == "token-mean" else batch_seqs
    adv = advantages.to(logp.dtype).unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = aggregate(torch.maximum(pg_losses1, pg_losses2), mask, agg, norm_length, count)
    loss = pg_loss
    nan = torch.tensor(float("nan"))
    ent = kl = nan
    if entropy is not None:
        ent = aggregate(entropy, mask, agg, norm_length, count)
        loss = loss - entropy_coef * ent
    if ref_logp is not None and kl_coef != 0.0:
        kl = aggregate(low_var_kl(logp, ref_logp), mask, agg, norm_length, count)
        loss = loss + kl_coef * kl
    with torch.no_grad():
        clip_frac = aggregate((pg_losses2 > pg_losses1).to(logp.dtype), mask, count=batch_tokens)
        approx_kl = aggregate(old_logp - logp, mask, count=batch_tokens)
    return PolicyLoss(loss=loss, pg_loss=pg_loss.detach(), clip_frac=clip_frac, approx_kl=approx_kl,
                      entropy=ent.detach(), kl=kl.detach())
