"""The TRL side of `make bench`: one GRPO step with TRL's `GRPOTrainer`, set up as our algorithm's step.

What is mirrored (params.yaml `rollout` / `train` / `model`):

- 16 prompts x 8 responses per optimizer step, generated once per step and used for one update
  (per_device_train_batch_size = 128 completions, gradient_accumulation_steps = 1, steps_per_generation = 1,
  num_iterations = 1): TRL then skips its separate "old log-prob" pass and uses the detached log-probs of the
  training forward, as an on-policy step should;
- sampling: temperature 1.0, top_p 1.0, no top_k / min_p / repetition penalty, 24 new tokens at most, the vision
  special tokens suppressed (our HFEngine's `suppress_tokens`, passed through `generation_kwargs`);
- loss: PPO clip 0.2 (both sides), no KL (beta 0: no reference model is built or run), advantages
  (r - group mean) / (group std + 1e-4) (scale_rewards "group"), aggregated as a token-mean over the whole batch
  (loss_type "dapo": sum of per-token losses / number of completion tokens of the generation batch; with one
  process and one micro-batch it is exactly our `token-mean`), no entropy bonus;
- optimiser: AdamW (betas 0.9 / 0.99, no weight decay), lr 1e-4 constant, no warm-up, grad-norm clip 1.0;
- float32 on CPU, no gradient checkpointing (TRL turns it on by default), no bf16 (TRL's default on CPU too);
- the vision tower frozen (model.freeze_vision), the same chat (system prompt + image + problem) and reward
  (noisyrollout.algo.reward.score(...)["overall"]: 0.9 accuracy + 0.1 format).

Prompts are consumed in order (shuffle_dataset=False): step i uses examples[i * prompts_per_step:(i + 1) *
prompts_per_step], so our side can be handed the same prompts and images.

    python -m bench.trl_grpo --model-dir runs/embedded/sft/model --steps 4
"""

from __future__ import annotations

import argparse
import resource
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LOSS_TYPE = "dapo"


def trl_prompt(problem: str, system_prompt: str | None) -> list[dict[str, Any]]:
    """Our chat (noisyrollout.rollout.chat.chat_messages) in TRL's conversational format. The system text is a
    content block, not a string, so every message's content has one Arrow type; the chat template renders both
    forms identically. TRL fills each `{"type": "image"}` placeholder from the example's `images` column."""
    from noisyrollout.rollout.chat import chat_messages

    messages = chat_messages(problem, system_prompt)
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def _dataset(examples: list[dict], n_prompts: int, system_prompt: str | None):
    """`n_prompts` rows (examples cycled in order): prompt (conversational), images (one PIL image), answer."""
    import datasets

    if not examples:
        raise ValueError("no examples")
    rows = []
    for i in range(n_prompts):
        ex = examples[i % len(examples)]
        rows.append({"prompt": trl_prompt(ex["problem"], system_prompt), "images": [ex["image"]],
                     "answer": str(ex["answer"])})
    return datasets.Dataset.from_list(rows)


class _StepTimer:
    """TrainerCallback timing each optimizer step (on_step_begin -> on_step_end); holds the tokens generated."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.threads = torch.get_num_threads()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.step_ends.append(time.perf_counter())
                timer.step_times.append(timer.step_ends[-1] - timer._start)

        self.callback = Callback()
        self.step_times: list[float] = []
        self.step_ends: list[float] = []
        self.step_tokens: list[int] = []  # completion tokens per step (EOS included), filled by the reward
        self.threads = 0  # torch threads seen inside the training loop
        self._start = 0.0


def _time_method(obj: Any, name: str, into: list[float]) -> None:
    """Wrap `obj.name` (a bound method, shadowed on the instance) to append each call's seconds to `into`."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(obj, name, timed)


def run_trl(model_dir: Path, examples: list[dict], *, steps: int, prompts_per_step: int = 16,
            num_generations: int = 8, max_new_tokens: int = 24, threads: int = 2, system_prompt: str | None,
            seed: int = 0, warmup_steps: int = 1, freeze_vision: bool = True, lr: float = 1e-4) -> dict:
    """Run `warmup_steps + steps` GRPO steps with TRL's GRPOTrainer; time the last `steps`."""
    import trl
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from noisyrollout.algo.reward import score
    from noisyrollout.models.load import load_model, load_processor, vision_tower
    from noisyrollout.rollout.hf_engine import vision_token_ids

    if steps < 1:
        raise ValueError("steps must be >= 1")
    torch.set_num_threads(threads)
    total_steps = warmup_steps + steps
    processor = load_processor(model_dir)
    model = load_model(model_dir, dtype="float32").train()
    if freeze_vision:
        vision_tower(model).requires_grad_(False)
    timer = _StepTimer()

    def reward(completions, answer, completion_ids, **kwargs):
        timer.step_tokens.append(sum(len(ids) for ids in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score(text, str(gt))["overall"] for text, gt in zip(texts, answer, strict=True)]

    train_dataset = _dataset(examples, total_steps * prompts_per_step, system_prompt)
    with tempfile.TemporaryDirectory(prefix="trl-grpo-bench-") as out:
        config = GRPOConfig(
            output_dir=out,
            # batch: one generation of prompts_per_step x num_generations completions per optimizer step, one update
            per_device_train_batch_size=prompts_per_step * num_generations,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            num_generations=num_generations, max_steps=total_steps, shuffle_dataset=False,
            # sampling
            max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
            repetition_penalty=1.0, generation_kwargs={"suppress_tokens": vision_token_ids(processor.tokenizer)},
            # loss
            loss_type=LOSS_TYPE, beta=0.0, epsilon=0.2, scale_rewards="group", importance_sampling_level="token",
            mask_truncated_completions=False, top_entropy_quantile=1.0, entropy_coef=0.0,
            # optimiser
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
            # numerics / device
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, activation_checkpointing=False,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=seed, data_seed=seed,
            # nothing else
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, log_completions=False,
            remove_unused_columns=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=train_dataset,
                              processing_class=processor, callbacks=[timer.callback])
        # Phase split (not part of the step timing): generate() alone, and the whole rollout phase (tokenize +
        # generate + decode + reward + advantages); the rest of a step is the forward/backward and optimizer step.
        phases: dict[str, list[float]] = {"generate": [], "rollout": []}
        _time_method(trainer, "_generate_single_turn", phases["generate"])
        _time_method(trainer, "_generate_and_score_completions", phases["rollout"])
        # The printer / progress callbacks write the final metrics to stdout, which carries our JSON.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        # Trainer switches checkpointing on inside train(): read it back afterwards, to report it was really off.
        checkpointing = bool(getattr(trainer.model, "is_activation_checkpointing", False))
        suppressed = list(trainer.generation_config.suppress_tokens or [])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    if len(timer.step_times) != total_steps:
        raise RuntimeError(f"timed {len(timer.step_times)} steps, expected {total_steps}")
    times = timer.step_times[warmup_steps:]
    tokens = timer.step_tokens[warmup_steps:total_steps]
    median = statistics.median(times)
    completions = prompts_per_step * num_generations
    return {
        "step_times": times,
        "step_tokens": tokens,
        "median_step_s": median,
        "rollouts_per_s": completions / median,
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times, strict=True)),
        "mean_completion_tokens": sum(tokens) / (len(tokens) * completions),
        "trl_version": trl.__version__,
        "loss_type": LOSS_TYPE,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # seconds from one step's end to the next (adds TRL's data fetch and logging between steps)
        "interval_times": ([b - a for a, b in zip(timer.step_ends[warmup_steps - 1:], timer.step_ends[warmup_steps:])]
                           if warmup_steps >= 1 else []),
        "generate_times": phases["generate"][warmup_steps:],
        "rollout_times": phases["rollout"][warmup_steps:],
        "generate_s": statistics.median(phases["generate"][warmup_steps:]),
        "rollout_s": statistics.median(phases["rollout"][warmup_steps:]),
        "activation_checkpointing": checkpointing,
        "suppress_tokens": suppressed,
        "threads": timer.threads,
        "trainable_params": trainable,
    }


def main() -> None:
    from noisyrollout.config import load_params
    from noisyrollout.data.loaders import load_records

    parser = argparse.ArgumentParser(description="Time TRL GRPOTrainer steps on a local Qwen2.5-VL (prints JSON).")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after the warm-up steps)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="runs/prepared/train.parquet")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    n = (args.warmup_steps + args.steps) * args.prompts_per_step
    examples = load_records(args.data, None, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels,
                            limit=n)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON line only
        result = run_trl(args.model_dir, examples, steps=args.steps, prompts_per_step=args.prompts_per_step,
                         num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                         threads=args.threads, system_prompt=params.model.system_prompt, seed=args.seed,
                         warmup_steps=args.warmup_steps, freeze_vision=params.model.freeze_vision, lr=params.train.lr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
