"""Our side of `make bench`: NoisyRollout steps timed in one process, as `cluster.trainer=local` runs them.

Each call builds one learner (`noisyrollout.train.learner.Learner`, plain torch, no Ray) on a model folder and the
prepared train split, runs `warmup` untimed steps and `steps` timed ones, and reports medians of the step and of each
phase. `--plain` turns the exact shortcuts off (the separate old-log-prob pass, and the prompt computed for every
response instead of once per group) to measure what they buy. Run as a subprocess so its peak RSS is its own:

    python -m bench.ours --model-dir runs/embedded/sft/model --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from noisyrollout.config import load_params
from noisyrollout.train.step import PromptBatch, noisyrollout_step

PHASES = ("time_generate", "time_reward", "time_logprob", "time_update", "time_step")


def summary(rows: list[dict[str, float]], tokens: list[float], n: int, *, step_key: str) -> dict[str, Any]:
    """Medians of the timed steps: `rows` hold each step's phase times and its step time under `step_key`,
    `tokens` its generated tokens, `n` the responses per step."""
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    step = median[step_key]
    return {
        "median_step_s": step,
        "phases_s": {k.removeprefix("time_"): v for k, v in median.items() if k not in ("time_step", "wall")},
        "step_times": [r[step_key] for r in rows],
        "step_tokens": tokens,
        "rollouts_per_s": n / step,
        "tokens_per_s": statistics.median(t / r[step_key] for t, r in zip(tokens, rows)),
        "mean_completion_tokens": sum(tokens) / len(tokens) / n,
    }


def step_batch(records: list[dict[str, Any]], step: int, prompts_per_step: int) -> PromptBatch:
    """Step `step`'s prompts: the train records in order, `prompts_per_step` at a time (the TRL side is given the
    same ones)."""
    chosen = records[step * prompts_per_step:(step + 1) * prompts_per_step]
    return PromptBatch(images=[r["image"] for r in chosen], problems=[r["problem"] for r in chosen],
                       answers=[r["answer"] for r in chosen])


def run_ours_ray(model_dir: Path, *, steps: int = 5, warmup: int = 1, prompts_per_step: int = 16, n_clean: int = 4,
                 n_noisy: int = 4, max_new_tokens: int = 24, learners: int = 2, seed: int = 0,
                 params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline's default trainer: `learners` Ray actors (DeepSpeed ZeRO-2, gloo, one thread each). Each step
    is timed around the driver's `group.step` call (Ray calls and the gradient all-reduce included); the phases
    are the slowest learner's. Peak RSS is the largest learner's."""
    from noisyrollout.train.launcher import RayGroup

    params = load_params(params_file, [
        f"seed={seed}", "threads=1", "cluster.trainer=ray", f"cluster.num_learners={learners}",
        "cluster.cpus_per_learner=1", f"train.prompts_per_step={prompts_per_step}", f"train.steps={warmup + steps}",
        f"rollout.n_clean={n_clean}", f"rollout.n_noisy={n_noisy}", f"rollout.max_new_tokens={max_new_tokens}",
        *(overrides or [])])
    group = RayGroup(params, model_dir)
    try:
        rows, tokens = [], []
        for step in range(warmup + steps):
            start = time.perf_counter()
            metrics = group.step(step, warmup + steps, list(range(step * prompts_per_step, (step + 1) * prompts_per_step)))
            wall = time.perf_counter() - start
            if step >= warmup:
                rows.append({**{k: getattr(metrics, k) for k in PHASES}, "wall": wall})
                tokens.append(metrics.response_length * prompts_per_step * (n_clean + n_noisy))
        rss = group.ray.get([actor.peak_rss_mb.remote() for actor in group.actors])
    finally:
        group.close()
    return {**summary(rows, tokens, prompts_per_step * (n_clean + n_noisy), step_key="wall"),
            "peak_rss_mb": max(rss), "learners": learners, "plain": False}


def run_ours(model_dir: Path, *, steps: int = 5, warmup: int = 1, prompts_per_step: int = 16, n_clean: int = 4,
             n_noisy: int = 4, max_new_tokens: int = 24, threads: int = 2, seed: int = 0, plain: bool = False,
             params_file: str = "params.yaml", overrides: list[str] | None = None,
             profile_dir: Path | None = None) -> dict[str, Any]:
    """Median step time and phase times of `steps` NoisyRollout steps after `warmup` untimed ones. `profile_dir`:
    torch-profile one more step, untimed, after the timed ones."""
    from noisyrollout.train.learner import Learner

    torch.set_num_threads(threads)
    params = load_params(params_file, [
        f"seed={seed}", f"threads={threads}", "cluster.trainer=local", f"train.prompts_per_step={prompts_per_step}",
        f"train.steps={warmup + steps + (profile_dir is not None)}", f"rollout.n_clean={n_clean}",
        f"rollout.n_noisy={n_noisy}", f"rollout.max_new_tokens={max_new_tokens}", *(overrides or [])])
    learner = Learner(0, 1, params.model_dump(mode="json"), str(model_dir), distributed=False)
    learner.setup()
    total = warmup + steps
    rows: list[dict[str, float]] = []
    tokens: list[float] = []
    profiler = None
    for step in range(total + (profile_dir is not None)):
        batch = step_batch(learner.records, step, prompts_per_step)
        if step == total:   # the extra, profiled step (the profiler slows it down: never timed)
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            profiler.__enter__()
        result = noisyrollout_step(step, params.train.steps, batch, model=learner.model, processor=learner.processor,
                                   engine=learner.rollout_engine, optimizer=learner.optimizer, params=learner.params,
                                   generator=learner.generator, recompute_old_logp=plain, share_prompts=not plain)
        if profiler is not None:
            profiler.__exit__(None, None, None)
        elif step >= warmup:
            rows.append({k: getattr(result.metrics, k) for k in PHASES})
            tokens.append(float(result.rollouts.response_mask.sum()))
    out: dict[str, Any] = {
        **summary(rows, tokens, prompts_per_step * (n_clean + n_noisy), step_key="time_step"),
        "parameters": sum(p.numel() for p in learner.model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "plain": plain,
    }
    if profiler is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        (profile_dir / f"ours{'-plain' if plain else ''}.txt").write_text(table)
        total_self = sum(e.self_cpu_time_total for e in profiler.key_averages())
        out["profile_top"] = [{"op": e.key, "share": e.self_cpu_time_total / total_self}
                              for e in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]]
    return out


def run_arms(model_dir: Path, arms: dict[str, tuple[int, int]], *, steps: int = 10, warmup: int = 1,
             prompts_per_step: int = 16, max_new_tokens: int = 24, threads: int = 2,
             params_file: str = "params.yaml") -> dict[str, Any]:
    """P2: arms {name: (n_clean, n_noisy)} timed step by step in ONE process, on one learner: each step's prompt
    batch goes through every arm, in alternating order (A B, then B A), each after the same seed. A slow spell of
    the machine, or the process's own state, then weighs on every arm alike, which separate runs could not give."""
    from noisyrollout.train.learner import Learner

    torch.set_num_threads(threads)
    common = [f"threads={threads}", "cluster.trainer=local", f"train.prompts_per_step={prompts_per_step}",
              f"train.steps={warmup + steps}", f"rollout.max_new_tokens={max_new_tokens}"]
    params = {name: load_params(params_file, [*common, f"rollout.n_clean={nc}", f"rollout.n_noisy={nn}"])
              for name, (nc, nn) in arms.items()}
    first = next(iter(params.values()))
    learner = Learner(0, 1, first.model_dump(mode="json"), str(model_dir), distributed=False)
    learner.setup()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    tokens: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(warmup + steps):
        batch = step_batch(learner.records, step, prompts_per_step)
        for name in (list(arms) if step % 2 == 0 else list(arms)[::-1]):
            torch.manual_seed(step)
            result = noisyrollout_step(step, warmup + steps, batch, model=learner.model, processor=learner.processor,
                                       engine=learner.rollout_engine, optimizer=learner.optimizer,
                                       params=params[name], generator=learner.generator)
            if step >= warmup:
                rows[name].append({k: getattr(result.metrics, k) for k in PHASES})
                tokens[name].append(float(result.rollouts.response_mask.sum()))
    return {name: summary(rows[name], tokens[name], prompts_per_step * sum(arms[name]), step_key="time_step")
            for name in arms}


def noisy_prompt_cost(model_dir: Path, *, prompts_per_step: int = 16, n: int = 12, repeats: int = 15,
                      threads: int = 2, params_file: str = "params.yaml") -> dict[str, Any]:
    """P2's parts: what a step's distorted prompts add before decoding, timed apart (medians over `repeats` batches).

    `n` clean rollouts per prompt prefill P prompts; n/2 clean + n/2 noisy prefill 2P (each distorted image is its own
    prompt). Decoding runs P x n rows either way, and the update scores every response on the clean image either
    way, so these parts are the whole difference between the two arms: the distortion, the processor (the twins'
    text is tokenized once, `encode_chats`), the vision tower on the distorted images, and their prefill.
    """
    from noisyrollout.algo.augment import distort
    from noisyrollout.rollout.chat import encode_chats
    from noisyrollout.train.learner import Learner

    torch.set_num_threads(threads)
    params = load_params(params_file, [f"threads={threads}", "cluster.trainer=local",
                                       f"train.prompts_per_step={prompts_per_step}"])
    learner = Learner(0, 1, params.model_dump(mode="json"), str(model_dir), distributed=False)
    learner.setup()
    engine, processor, model = learner.rollout_engine, learner.processor, learner.model
    processor.tokenizer.padding_side = "left"
    generator = torch.Generator().manual_seed(0)
    times: dict[str, dict[str, list[float]]] = {"grpo": {}, "noisyrollout": {}}
    for r in range(repeats + 1):                       # the first batch warms up, untimed
        chosen = learner.records[(r * prompts_per_step) % len(learner.records):][:prompts_per_step]
        images, problems = [c["image"] for c in chosen], [c["problem"] for c in chosen]
        for arm in ("grpo", "noisyrollout"):
            t0 = time.perf_counter()
            noisy = [distort(img, params.noise.distortion, params.noise.alpha0, 1.0, generator) for img in images] \
                if arm == "noisyrollout" else []
            t1 = time.perf_counter()
            inputs = dict(encode_chats(processor, problems * (2 if noisy else 1), images + noisy,
                                       params.model.system_prompt))
            t2 = time.perf_counter()
            with torch.no_grad():
                features = model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                          return_dict=True)
                inputs["mm_encoder_outputs"] = {"image": features}
                t3 = time.perf_counter()
                engine.prefill_shared(inputs, n // 2 if noisy else n)
                t4 = time.perf_counter()
            model.model.rope_deltas = None
            if r:
                for part, sec in (("distort", t1 - t0), ("processor", t2 - t1), ("vision", t3 - t2), ("prefill", t4 - t3)):
                    times[arm].setdefault(part, []).append(sec)
    return {arm: {part: statistics.median(v) for part, v in parts.items()} for arm, parts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--n-clean", type=int, default=4)
    parser.add_argument("--n-noisy", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="turn the exact shortcuts off (reference path)")
    parser.add_argument("--ray-learners", type=int, default=0,
                        help="run the default trainer instead: this many Ray learners with one thread each")
    parser.add_argument("--profile-dir", type=Path, default=None, help="torch-profile the last step into this folder")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="params override")
    parser.add_argument("--noisy-cost", action="store_true",
                        help="time only what the distorted prompts add before decoding (P2's parts)")
    parser.add_argument("--p2", action="store_true",
                        help="P2: n_clean+n_noisy against (n_clean+n_noisy)+0, alternating step by step in one process")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.p2:
        n = args.n_clean + args.n_noisy
        print(json.dumps(run_arms(args.model_dir, {"noisyrollout": (args.n_clean, args.n_noisy), "grpo": (n, 0)},
                                  steps=args.steps, warmup=args.warmup, prompts_per_step=args.prompts_per_step,
                                  max_new_tokens=args.max_new_tokens, threads=args.threads)))
        return
    if args.noisy_cost:
        print(json.dumps(noisy_prompt_cost(args.model_dir, prompts_per_step=args.prompts_per_step,
                                           n=args.n_clean + args.n_noisy, threads=args.threads)))
        return
    if args.ray_learners:
        out = run_ours_ray(args.model_dir, steps=args.steps, warmup=args.warmup, prompts_per_step=args.prompts_per_step,
                           n_clean=args.n_clean, n_noisy=args.n_noisy, max_new_tokens=args.max_new_tokens,
                           learners=args.ray_learners, overrides=args.overrides)
        out["wall_s"] = time.perf_counter() - start
        print(json.dumps(out))
        return
    out = run_ours(args.model_dir, steps=args.steps, warmup=args.warmup, prompts_per_step=args.prompts_per_step,
                   n_clean=args.n_clean, n_noisy=args.n_noisy, max_new_tokens=args.max_new_tokens,
                   threads=args.threads, plain=args.plain, overrides=args.overrides, profile_dir=args.profile_dir)
    out["wall_s"] = time.perf_counter() - start
    print(json.dumps(out))


if __name__ == "__main__":
    main()
