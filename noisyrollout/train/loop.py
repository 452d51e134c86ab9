"""The single-process RL driver: load the warm-started policy, run `noisyrollout_step` T times, save."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from noisyrollout.config import Params
from noisyrollout.models.load import load_policy
from noisyrollout.rollout.hf_engine import HFEngine
from noisyrollout.train.metrics import MetricsLog, StepMetrics
from noisyrollout.train.optim import TorchOptimizer
from noisyrollout.train.step import PromptBatch, noisyrollout_step


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(random.Random(seed * 1_000_003 + epoch).sample(range(n), n))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The prompts of rollout batch `step`: a fresh shuffle every epoch, a pure function of the step so a resumed
    run sees exactly the batches an uninterrupted one would."""
    return [_epoch_order(seed, position // n, n)[position % n]
            for position in range(step * batch_size, (step + 1) * batch_size)]


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class RLResult:
    model_dir: Path
    metrics: list[StepMetrics]
    run_id: str | None = None   # the MLflow run that tracked the training, if any


def train_rl(params: Params, examples: Sequence[dict], init_dir: Path, *, progress: bool = True,
             log: Any = print) -> RLResult:
    """NoisyRollout GRPO from the policy in `init_dir`; writes `<output_dir>/model` and `metrics.jsonl`."""
    cfg = params.train
    generator = seed_everything(params.seed)
    processor, model, ref_model = load_policy(init_dir, dtype=params.model.dtype, min_pixels=params.data.min_pixels,
                                              max_pixels=params.data.max_pixels,
                                              freeze_vision=params.model.freeze_vision, with_reference=cfg.kl_coef > 0)
    engine = HFEngine(model, processor, system_prompt=params.model.system_prompt,
                      batch_size=cfg.prompts_per_step * (params.rollout.n_clean + params.rollout.n_noisy),
                      cache_vision=params.model.freeze_vision)
    optimizer = TorchOptimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, max_grad_norm=cfg.max_grad_norm)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl")
    metrics_log.path.unlink(missing_ok=True)
    history: list[StepMetrics] = []
    bar = tqdm(range(cfg.steps), desc="rl", disable=not progress)
    for step in bar:
        chosen = [examples[i] for i in batch_indices(step, cfg.prompts_per_step, len(examples), params.seed)]
        batch = PromptBatch(images=[e["image"] for e in chosen], problems=[e["problem"] for e in chosen],
                            answers=[e["answer"] for e in chosen])
        metrics = noisyrollout_step(step, cfg.steps, batch, model=model, processor=processor, engine=engine,
                                    optimizer=optimizer, params=params, generator=generator,
                                    ref_model=ref_model).metrics
        metrics_log.append(metrics)
        history.append(metrics)
        bar.set_postfix(clean=f"{metrics.reward_clean:.2f}", noisy=f"{metrics.reward_noisy:.2f}")
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            (bar.write if progress else log)(metrics.line())
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return RLResult(model_dir=model_dir, metrics=history)
