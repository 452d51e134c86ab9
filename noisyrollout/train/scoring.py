"""Log-probabilities of responses under the policy, conditioned on (clean) image prompts.

Every sequence is `[left-padded prompt | right-padded response]`, so all responses start at the same column
and the M-RoPE positions of the prompt are the ones `generate` used. This is where NoisyRollout's rule is
kept: the caller passes the CLEAN prompts, whatever image a response was sampled from.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from noisyrollout.rollout.chat import EncodedPrompts, prompt_batch, to_device


def pad_responses(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) token ids and the bool mask of real tokens."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def build_sequences(prompts: EncodedPrompts, prompt_index: Sequence[int], response_ids: torch.Tensor,
                    response_mask: torch.Tensor, *, pad_id: int, image_token_id: int) -> dict[str, Any]:
    """Model inputs for `[prompt_index[i] prompt | response i]`; responses start at column `prompt_width`."""
    inputs = prompt_batch(prompts, prompt_index, pad_id=pad_id, image_token_id=image_token_id)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], response_ids.masked_fill(~response_mask.bool(), pad_id)], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], response_mask.long()], dim=1)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
    return inputs


def shared_prompt_hidden(model: Any, prompts: EncodedPrompts, prompt_index: Sequence[int], response_ids: torch.Tensor,
                         response_mask: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """Final hidden states at the positions predicting each response token, shape (n, L, hidden), computing each
    DISTINCT prompt once (and their common prefix once, `models/prefix.py`): the prompts run alone (with
    gradient), their KV cache is gathered to the responses' rows, and the responses run on top of it. The same
    numbers as running every `[prompt | response]` sequence whole (`build_sequences`), with far fewer tokens.

    M-RoPE positions are the plain path's: the prompt's from `get_rope_index`, then text positions that continue
    from the prompt's largest one, as for any text after the image.
    """
    from noisyrollout.models.prefix import prompt_cache

    distinct = list(dict.fromkeys(prompt_index))
    slot = {p: i for i, p in enumerate(distinct)}
    device = next(model.parameters()).device
    rows = torch.tensor([slot[p] for p in prompt_index], device=device)
    inputs = prompt_batch(prompts, distinct, pad_id=pad_id, image_token_id=model.config.image_token_id)
    inputs = to_device(inputs, device)
    vision = {k: inputs[k] for k in ("pixel_values", "mm_encoder_outputs") if k in inputs}
    head = prompt_cache(model, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], vision)
    cache = head.cache
    cache.batch_select_indices(rows)                 # each response row reads its prompt's keys and values
    length = response_ids.shape[1]
    start = head.positions.amax(dim=(0, 2)) + 1      # first text position after each prompt
    response_positions = (start[rows].unsqueeze(1) + torch.arange(length, device=device)).expand(3, -1, -1)
    mask = torch.cat([head.attention_mask[rows], response_mask.to(device).long()], dim=1)
    tail = model.model(input_ids=response_ids.to(device).masked_fill(~response_mask.to(device).bool(), pad_id),
                       attention_mask=mask, position_ids=response_positions, cache=cache, use_cache=True)
    # the prompt's last position predicts response token 0; response position j predicts token j + 1
    return torch.cat([head.last_hidden[rows].unsqueeze(1), tail.last_hidden_state[:, :-1]], dim=1)


def response_logprobs(model: Any, prompts: EncodedPrompts, prompt_index: Sequence[int], response_ids: torch.Tensor,
                      response_mask: torch.Tensor, *, pad_id: int, temperature: float = 1.0,
                      with_entropy: bool = False, share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(response | prompt) of shape (n, L) (0 where masked), and the token entropy if asked.

    `share_prompts`: compute each distinct prompt once for all its responses (`shared_prompt_hidden`); False runs
    each `[prompt | response]` sequence whole (the plain path, kept as the reference in tests and benchmarks).
    The choice never depends on the batch's content: with several DeepSpeed learners, ZeRO reduces gradients in
    the order they become ready, so every learner's backward must have the same graph structure (the same passes),
    whatever its prompts, or the learners would sum mismatched gradients.
    """
    device = next(model.parameters()).device
    length = response_ids.shape[1]
    if share_prompts:
        hidden = shared_prompt_hidden(model, prompts, prompt_index, response_ids, response_mask, pad_id=pad_id)
        logits = model.lm_head(hidden).float()
    else:
        inputs = build_sequences(prompts, prompt_index, response_ids, response_mask, pad_id=pad_id,
                                 image_token_id=model.config.image_token_id)
        inputs = to_device(inputs, device)
        # the LM head runs on the response positions only (the logit at column j predicts token j + 1)
        logits = model(**inputs, use_cache=False, logits_to_keep=length + 1).logits[:, :-1, :].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    mask = response_mask.to(device).bool()
    token_logp = logprobs.gather(-1, response_ids.to(device).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~mask, 0.0)
    return token_logp, entropy
