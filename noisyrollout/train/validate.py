"""Greedy validation accuracy on a held-out split, overall and per task (the before/after table)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from noisyrollout.algo.augment import distort
from noisyrollout.algo.reward import score_batch
from noisyrollout.rollout.engine import Engine, Prompt, SamplingParams


def validate(engine: Engine, examples: Sequence[dict], *, max_new_tokens: int, batch_size: int = 128,
             distortion: str | None = None, strength: float = 0.0, seed: int = 0,
             progress: bool = True, desc: str = "validate") -> dict[str, float]:
    """Greedy accuracy/format over `examples` (optionally on distorted images); keys `accuracy`,
    `format`, `accuracy/<task>`, `n`."""
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    by_task: dict[str, list[float]] = defaultdict(list)
    acc: list[float] = []
    fmt: list[float] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        images = [ex["image"] for ex in chunk]
        if distortion is not None:
            images = [distort(img, distortion, strength, 1.0, generator) for img in images]
        gens = engine.generate([Prompt(img, ex["problem"]) for img, ex in zip(images, chunk)], params)
        scores = score_batch([g.texts[0] for g in gens], [ex["answer"] for ex in chunk])
        for ex, s in zip(chunk, scores):
            acc.append(s["accuracy"])
            fmt.append(s["format"])
            by_task[ex.get("task") or "all"].append(s["accuracy"])
    out = {"accuracy": sum(acc) / max(len(acc), 1), "format": sum(fmt) / max(len(fmt), 1), "n": float(len(acc))}
    out.update({f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_task.items())})
    return out
