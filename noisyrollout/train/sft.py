"""SFT warm start: teacher-forced `<think>...</think> \\boxed{answer}` targets on the clean image.

It plays the role the Instruct checkpoint plays for the authors: RL starts from a policy that follows the
format and is right sometimes. The loss reuses `response_logprobs`, so SFT and RL see identical sequences.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from PIL import Image
from noisyrollout.progress import progress_bar

from noisyrollout.algo.augment import distort
from noisyrollout.config import Params
from noisyrollout.train.optim import TorchOptimizer
from noisyrollout.rollout.chat import encode_prompts
from noisyrollout.train.scoring import pad_responses, response_logprobs


def target_text(example: dict) -> str:
    """The SFT target: the example's `solution` if it has one, else an empty think and the boxed answer."""
    return example.get("solution") or f"<think> </think> \\boxed{{{example['answer']}}}"


def tokenize_targets(tokenizer: Any, texts: Sequence[str], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(t, add_special_tokens=False) + [eos_id] for t in texts]
    return pad_responses(rows, tokenizer.pad_token_id)


def augment(image: Image.Image, prob: float, max_step: int, rng: random.Random,
            generator: torch.Generator) -> Image.Image:
    """With probability `prob`, gaussian noise at a step drawn uniformly from [0, max_step]."""
    if prob <= 0 or max_step <= 0 or rng.random() >= prob:
        return image
    return distort(image, "gaussian", rng.randint(0, max_step), 1.0, generator)


def run_sft(model: Any, processor: Any, examples: Sequence[dict], params: Params, *, progress: bool = True) -> list[float]:
    """Train `model` in place for `params.sft.steps`; returns the per-step losses."""
    cfg = params.sft
    model.train()
    optimizer = TorchOptimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas,
                               warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, max_grad_norm=cfg.max_grad_norm,
                               schedule="cosine", min_lr_rate=cfg.min_lr_rate)
    tokenizer = processor.tokenizer
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    rng = random.Random(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = progress_bar(range(cfg.steps), desc="sft", disable=not progress)
    for _ in bar:
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[:cfg.batch_size]]
        del order[:cfg.batch_size]
        images = [augment(b["image"], cfg.noise_prob, cfg.noise_max_step, rng, generator) for b in batch]
        prompts = encode_prompts(processor, images, [b["problem"] for b in batch], params.model.system_prompt)
        ids, mask = tokenize_targets(tokenizer, [target_text(b) for b in batch], eos_id)
        logp, _ = response_logprobs(model, prompts, list(range(len(batch))), ids, mask, pad_id=tokenizer.pad_token_id,
                                    share_prompts=False)   # one response per prompt: the plain single pass
        loss = -logp.sum() / mask.sum()
        optimizer.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
