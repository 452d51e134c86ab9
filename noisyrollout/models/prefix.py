"""Run a batch of prompts once, sharing what they have in common, and keep their KV cache.

Every prompt of a step starts with the same tokens (the chat's system turn and the user header, up to the image);
generation and the log-prob passes then extend each prompt with several responses. `prompt_cache` computes:

    the common prefix       once, for the whole batch            (1 row)
    each prompt's remainder once, on top of the prefix's cache   (1 row per distinct prompt)

and returns the cache, which callers gather to their responses' rows. The batch is laid out as
`[common prefix | left-padded remainders]`; padding sits in the middle and is masked. Positions are Qwen2.5-VL's
M-RoPE positions of that layout (`get_rope_index` with the attention mask), which are those of the plain
left-padded prompt: padding takes no position. So the numbers are the plain path's, computed with fewer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PromptCache:
    input_ids: torch.Tensor        # (U, C + S) the prompts as laid out: [common prefix | left-padded remainders]
    attention_mask: torch.Tensor   # (U, C + S)
    positions: torch.Tensor        # (3, U, C + S) M-RoPE positions
    rope_deltas: torch.Tensor      # (U, 1) text position offset after the image, as Qwen2.5-VL's prefill sets it
    cache: Any                     # DynamicCache over columns [:upto]
    last_hidden: torch.Tensor      # (U, hidden) final hidden state at column upto - 1
    prefix_length: int             # C (0: nothing shared)


def common_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         stop_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Re-lay left-padded prompts as `[common prefix | left-padded remainders]`. The prefix stops before the first
    token in `stop_ids` (the vision tokens: equal ids, different images) and leaves every row at least one token.
    One prompt is split the same way, so a batch of one runs the same passes as a batch of many (the same
    backward structure on every learner: see `train/scoring.py:response_logprobs`)."""
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    shortest = min(len(r) for r in rows)
    heads = torch.stack([r[:shortest] for r in rows])                       # (U, shortest)
    shared = (heads == heads[:1]).all(dim=0) & ~torch.isin(heads[0], torch.tensor(sorted(stop_ids), device=heads.device))
    shared[max(shortest - 1, 0):] = False                                  # leave every row at least one token
    common = int(shared.long().cumprod(dim=0).sum())                       # length of the leading run of shared columns
    if common == 0:
        return input_ids, attention_mask, 0
    width = max(len(r) for r in rows) - common
    ids = torch.full((len(rows), common + width), 0, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids, dtype=attention_mask.dtype)
    ids[:, :common] = rows[0][:common]
    mask[:, :common] = 1
    for i, r in enumerate(rows):
        rest = r[common:]
        ids[i, common + width - len(rest):] = rest
        mask[i, common + width - len(rest):] = 1
    return ids, mask, common


def prompt_cache(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                 vision: dict[str, Any], *, drop_last: bool = False) -> PromptCache:
    """Run left-padded prompts (all columns, or all but the last with `drop_last`), the common prefix once.

    `vision`: {"pixel_values": ...} or {"mm_encoder_outputs": ...} for the prompts' images, in order. Runs with
    whatever grad mode the caller has: with gradient, the prefix's share flows back from every prompt.
    """
    core = model.model
    cfg = model.config
    stop = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id}
    ids, mask, common = common_prefix_layout(input_ids, attention_mask, stop)
    types = (ids == cfg.image_token_id).int()
    positions, deltas = core.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw,
                                            attention_mask=mask)
    upto = ids.shape[1] - 1 if drop_last else ids.shape[1]
    cache = None
    if common:
        head = core(input_ids=ids[:1, :common], attention_mask=mask[:1, :common], position_ids=positions[:, :1, :common],
                    use_cache=True)
        cache = head.cache
        cache.batch_repeat_interleave(len(ids))
    tail = core(input_ids=ids[:, common:upto], attention_mask=mask[:, :upto], position_ids=positions[..., common:upto],
                mm_token_type_ids=types[:, common:upto], image_grid_thw=image_grid_thw, cache=cache, use_cache=True,
                **vision)
    return PromptCache(input_ids=ids, attention_mask=mask, positions=positions, rope_deltas=deltas, cache=tail.cache,
                       last_hidden=tail.last_hidden_state[:, -1], prefix_length=common)
