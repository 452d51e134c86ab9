"""Greedy validation accuracy on a held-out split, overall and per task (the before/after table)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from noisyrollout.progress import progress_bar

from noisyrollout.algo.augment import distort
from noisyrollout.algo.reward import score_batch
from noisyrollout.rollout.engine import Engine, Prompt, SamplingParams
from noisyrollout.timing import model_work

if TYPE_CHECKING:
    from noisyrollout.config import Params


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
    for start in progress_bar(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
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


def validate_checkpoint(model_dir: Path, params: "Params", desc: str,
                        which: tuple[str, ...] = ("clean", "noisy")) -> dict[str, Any]:
    """Greedy validation of a saved policy on the prepared val split: `clean` on the val images, `noisy` on them
    distorted by `noise.distortion` at `noise.alpha0` (full strength)."""
    from noisyrollout.data.loaders import load_records
    from noisyrollout.rollout.hf_engine import HFEngine

    engine = HFEngine.from_pretrained(model_dir, system_prompt=params.model.system_prompt,
                                      min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels,
                                      batch_size=params.val.batch_size, dtype=params.model.dtype)
    examples = load_records(str(params.data.prepared_dir), "val", min_pixels=params.data.min_pixels,
                            max_pixels=params.data.max_pixels, limit=params.val.limit)
    kw = dict(max_new_tokens=params.val.max_new_tokens, batch_size=params.val.batch_size, seed=params.seed)
    out = {}
    with model_work(f"{desc} decode"):
        if "clean" in which:
            out["clean"] = validate(engine, examples, desc=f"{desc} clean", **kw)
        if "noisy" in which:
            out["noisy"] = validate(engine, examples, distortion=params.noise.distortion, strength=params.noise.alpha0,
                                    desc=f"{desc} noisy", **kw)
    return out


def val_metrics(val: dict[str, Any]) -> dict[str, float]:
    """The flat metrics of a `validate_checkpoint` result, as the stages' reports hold them."""
    distorted = {"val_accuracy_distorted": val["noisy"]["accuracy"]} if "noisy" in val else {}
    return {"val_accuracy": val["clean"]["accuracy"], **distorted, "val_format": val["clean"]["format"],
            **{f"val_{k.replace('/', '_')}": v for k, v in val["clean"].items() if k.startswith("accuracy/")}}
