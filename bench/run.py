"""`make bench`: measure, then write BENCHMARKS.md. Every number in the file comes from this one run.

    P1  our NoisyRollout step vs TRL's GRPOTrainer: same model, prompts, images, system prompt, n, max new tokens,
        threads; on the embedded tiny model and on a ~30M-parameter config (bench/models.py)
        (+ what the exact shortcuts buy: the plain path with them off, phase by phase)
    P2  NoisyRollout's overhead: step time with n_clean=6, n_noisy=6 over n_clean=12, n_noisy=0
    P3  the gaussian distortion on 1-megapixel images against the straightforward per-image baseline
    P4  the update phase's achieved FLOP/s as a fraction of this machine's fp32 GEMM rate (~30M config)
    P5  pipeline overhead: `dvc repro` wall time in a fresh clone, and the share spent outside model work
    Memory: peak RSS of each measuring process (one learner each)

Each measurement runs in its own subprocess (its peak RSS is its own; nothing warms the next). Usage:

    python -m bench.run [--quick] [--skip-trl] [--skip-pipeline] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "runs/embedded/sft/model"
THREADS = 2
P1_REPS = 2          # runs each of the default trainer and of TRL, alternating
SIDES = {"ray": "ours, the default trainer (2 Ray learners x 1 thread)",
         "ours": "ours, one process (cluster.trainer=local, 2 threads)",
         "plain": "ours, plain path (shortcuts off)", "trl": "TRL GRPOTrainer (8 generations)"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_json(args: list[str], threads: int = THREADS, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m <args>` with `threads` OpenMP threads; its last stdout line is the JSON result."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        memory = f"{mem_kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": memory, "os": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "ray", "mlflow", "dvc",
                 "great-expectations", "prefect"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def gemm_rate(threads: int = THREADS) -> dict[str, float]:
    """This machine's fp32 matmul rate with `threads` threads (median of 5 timed 1024^3 products)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        times.append((time.perf_counter() - start) / 4)
    return {"gflops": 2 * 1024**3 / statistics.median(times) / 1e9}


def update_flops(model_dir: Path, prompt_tokens: float, response_tokens: float, prompt_len: float,
                 response_len: float) -> float:
    """Training FLOPs of one update phase (forward + backward = 3 x forward) counted from the text model's shapes:
    each prompt token once (prompts are shared by their group), each response token once; the LM head on
    response positions only; attention 4 * d * context per token and layer. The frozen vision tower is excluded
    (its features are computed without gradient)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir).text_config
    d, ff, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff          # q, o, k, v, gate, up, down
    body = 2 * layers * per_layer
    attn_prompt = 4 * layers * d * prompt_len / 2             # causal: on average half the prompt
    attn_response = 4 * layers * d * (prompt_len + response_len / 2)
    forward = prompt_tokens * (body + attn_prompt) + response_tokens * (body + attn_response + 2 * d * vocab)
    return 3 * forward


def prompt_shape(model_dir: Path, prompts_per_step: int) -> dict[str, float]:
    """Mean prompt length (tokens, with the system prompt and image tokens) of the bench's first batch."""
    from noisyrollout.config import load_params
    from noisyrollout.data.loaders import load_records
    from noisyrollout.models.load import load_processor
    from noisyrollout.rollout.chat import encode_prompts

    params = load_params(ROOT / "params.yaml")
    records = load_records(str(ROOT / params.data.prepared_dir), "train", min_pixels=params.data.min_pixels,
                           max_pixels=params.data.max_pixels)
    chosen = records[:prompts_per_step]
    processor = load_processor(model_dir, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels)
    enc = encode_prompts(processor, [r["image"] for r in chosen], [r["problem"] for r in chosen],
                         params.model.system_prompt)
    return {"prompt_len": statistics.mean(len(ids) for ids in enc.input_ids)}




def pipeline_overhead(quick: bool) -> dict[str, Any]:
    """P5: `dvc repro` of this commit in a fresh clone (its own MLflow store), timed; model work is what the
    stages report through noisyrollout.timing; the rest is the pipeline's overhead."""
    tmp = Path(tempfile.mkdtemp(prefix="noisyrollout-bench-"))
    clone = tmp / "repo"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        scale = {"sft.steps": 60, "train.steps": 12, "val.limit": 120} if quick else {}
        if scale:
            import yaml

            tree = yaml.safe_load((clone / "params.yaml").read_text())
            for key, value in scale.items():
                section, name = key.split(".")
                tree[section][name] = value
            (clone / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        timings = tmp / "timings.jsonl"
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
               "NOISYROLLOUT_TIMINGS": str(timings), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        subprocess.run(["noisyrollout", "restore-data"], cwd=clone, check=True, capture_output=True,
                       env={k: v for k, v in env.items() if k != "NOISYROLLOUT_TIMINGS"})   # before the timed run
        start = time.perf_counter()
        proc = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        blocks = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
        # stages run one after another, and each process writes its "process <stage>" record last: a record
        # belongs to the next process record in the file
        stages: dict[str, dict[str, float]] = {}
        named: dict[str, float] = {}
        pending: list[dict[str, Any]] = []
        for b in blocks:
            if not b["label"].startswith("process "):
                pending.append(b)
                continue
            row = stages.setdefault(b["label"].removeprefix("process "), {"process": 0.0, "model": 0.0})
            row["process"] += b["seconds"]
            for p in pending:
                if p["label"].startswith("overhead "):
                    label = p["label"].removeprefix("overhead ")
                    named[label] = named.get(label, 0.0) + p["seconds"]
                else:
                    row["model"] += p["seconds"]
            pending = []
        model = sum(s["model"] for s in stages.values())
        in_processes = sum(s["process"] for s in stages.values())
        return {"wall_s": wall, "model_s": model, "overhead_s": wall - model, "overhead_share": (wall - model) / wall,
                "dvc_s": wall - in_processes, "stages": stages, "named_overhead": named,
                "profile": "quick (" + ", ".join(f"{k}={v}" for k, v in scale.items()) + ")"
                if scale else "embedded default (params.yaml)"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.distortion import bench_gaussian
    from bench.models import build_bench_model

    results: dict[str, Any] = {"machine": machine(), "versions": versions(),
                               "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "threads": THREADS}
    if not (TINY / "config.json").exists():
        raise SystemExit(f"{TINY}: no SFT model; run `make run` first")
    model_30m = build_bench_model(ROOT / "runs/bench/30m", "30m", base_dir=TINY)
    # timed steps per run (each after one warm-up step): default trainer and TRL (per run, `P1_REPS` runs each),
    # ours in one process, ours with the shortcuts off
    steps = {"tiny": (4, 5, 4), "30m": (2, 2, 1)} if not args.quick else {"tiny": (1, 1, 1), "30m": (1, 1, 1)}
    reps = 1 if args.quick else P1_REPS
    sizes = {"tiny": TINY, "30m": model_30m}
    common = ["--prompts-per-step", "16", "--max-new-tokens", "24", "--threads", str(THREADS)]

    def side(name: str, size: str) -> dict[str, Any]:
        model_dir, (n_paired, n_ours, n_plain) = sizes[size], steps[size]
        log(f"P1 {size}: {SIDES[name]}")
        if name == "ray":
            return run_json(["bench.ours", "--model-dir", str(model_dir), "--steps", str(n_paired), "--ray-learners",
                             "2", "--n-clean", "4", "--n-noisy", "4", *common], threads=1)
        if name == "trl":
            return run_json(["bench.trl_grpo", "--model-dir", str(model_dir), "--steps", str(n_paired),
                             "--num-generations", "8", *common])
        if name == "ours":
            return run_json(["bench.ours", "--model-dir", str(model_dir), "--steps", str(n_ours), "--n-clean", "4",
                             "--n-noisy", "4", *common, "--profile-dir", str(ROOT / "runs/bench/profile" / size)])
        return run_json(["bench.ours", "--model-dir", str(model_dir), "--steps", str(n_plain), "--plain",
                         "--n-clean", "4", "--n-noisy", "4", *common])

    results["p1"], results["p1_steps"] = {}, steps
    for size in sizes:
        # The default trainer and TRL alternate A B B A (...): a slow spell of the machine weighs on both sides.
        # Ours in one process and the plain path run once, between them.
        pair = ["ray"] + ([] if args.skip_trl else ["trl"])
        order = [name for rep in range(reps) for name in (pair if rep % 2 == 0 else pair[::-1])]
        order[len(pair):len(pair)] = ["ours", "plain"]
        runs: dict[str, list[dict[str, Any]]] = {}
        for name in order:
            runs.setdefault(name, []).append(side(name, size))
        results["p1"][size] = {name: pooled(parts, 16 * 8) for name, parts in runs.items()}

    results["p2"] = {}
    for size, n_steps in ({"tiny": 1, "30m": 1} if args.quick else {"tiny": 12, "30m": 2}).items():
        log(f"P2 {size}: 6 clean + 6 noisy vs 12 clean, alternating step by step in one process")
        arms = run_json(["bench.ours", "--model-dir", str(sizes[size]), "--p2", "--steps", str(n_steps),
                         "--n-clean", "6", "--n-noisy", "6", *common])
        pairs = zip(arms["noisyrollout"]["step_times"], arms["grpo"]["step_times"], strict=True)
        results["p2"][size] = {**arms, "paired_ratio": statistics.median(a / b for a, b in pairs),
                               "steps": n_steps}

    log("P2: what the distorted prompts add before decoding, timed apart")
    results["p2"]["parts"] = run_json(["bench.ours", "--model-dir", str(TINY), "--noisy-cost", "--n-clean", "6",
                                       "--n-noisy", "6", *common])

    log("P3: gaussian distortion, 1 MP")
    results["p3"] = bench_gaussian(n_images=4 if args.quick else 8, repeats=3)

    log("P4: GEMM rate and the update's FLOP/s (30m)")
    ours30 = results["p1"]["30m"]["ours"]
    shape = prompt_shape(model_30m, 16)
    flops = update_flops(model_30m, prompt_tokens=16 * shape["prompt_len"],
                         response_tokens=ours30["mean_completion_tokens"] * 16 * 8, prompt_len=shape["prompt_len"],
                         response_len=ours30["mean_completion_tokens"])
    gemm = gemm_rate()
    achieved = flops / ours30["phases_s"]["update"] / 1e9
    results["p4"] = {"gemm_gflops": gemm["gflops"], "update_gflop": flops / 1e9, "update_s": ours30["phases_s"]["update"],
                     "achieved_gflops": achieved, "fraction": achieved / gemm["gflops"], **shape}

    if not args.skip_pipeline:
        log("P5: dvc repro in a fresh clone")
        results["p5"] = pipeline_overhead(args.quick)
    return results


def pooled(runs: list[dict[str, Any]], rollouts_per_step: int) -> dict[str, Any]:
    """One side's repeated runs as one: medians over every timed step of every run (phases: the median of the
    runs' phase medians), the largest peak RSS; `run_medians` keeps each run's own median step."""
    if len(runs) == 1:
        return {**runs[0], "run_medians": [runs[0]["median_step_s"]]}
    times = [t for r in runs for t in r["step_times"]]
    tokens = [t for r in runs for t in r["step_tokens"]]
    median = statistics.median(times)
    out = {**runs[-1], "step_times": times, "step_tokens": tokens, "median_step_s": median,
           "rollouts_per_s": rollouts_per_step / median,
           "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times, strict=True)),
           "mean_completion_tokens": sum(tokens) / (len(tokens) * rollouts_per_step),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "run_medians": [r["median_step_s"] for r in runs]}
    if "phases_s" in runs[0]:
        out["phases_s"] = {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]}
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def render(r: dict[str, Any], command: str, elapsed: float) -> str:
    m, v = r["machine"], r["versions"]
    lines = [
        "# Benchmarks", "",
        f"Written by `{command}` on {r['date']} in {elapsed / 60:.1f} minutes. Every number below comes from that run;"
        " rerun it to refresh them.", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, Python {m['python']}",
        f"- Threads: {r['threads']} per measuring process (OMP_NUM_THREADS and torch.set_num_threads)",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
        "Workload for P1/P2: 16 prompts per step from the prepared train split, 8 (P2: 12) responses per prompt, "
        "max 24 new tokens, temperature 1.0, the embedded system prompt, float32, one optimizer step per rollout "
        "batch, no KL (beta 0), no gradient checkpointing. Times are medians over the timed steps after one "
        "untimed warm-up step.", "",
        f"In P1 the default trainer and TRL run {P1_REPS} times each, alternating (ours, TRL, TRL, ours, ...), so a "
        "slow spell of the machine weighs on both sides; their rows pool every timed step of those runs. Ours in one "
        "process and the plain path run once each, between them. Timed steps per run: "
        + "; ".join(f"{size}: {a} (default trainer, TRL), {b} (one process), {c} (plain)"
                    for size, (a, b, c) in r.get("p1_steps", {}).items()) + ".", "",
        "## P1: ours vs TRL GRPOTrainer", "",
        "| model | params | side | median step (s) | rollouts/s | tokens/s | completion tokens | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, row in r["p1"].items():
        for side, label in (("ray", "ours: 2 Ray learners x 1 thread (the default trainer)"),
                            ("ours", "ours: 1 process x 2 threads (`cluster.trainer=local`)"),
                            ("plain", "ours, 1 process, shortcuts off"),
                            ("trl", f"TRL {r['versions']['trl']} GRPOTrainer, 1 process x 2 threads")):
            if side in row:
                x = row[side]
                lines.append(f"| {size} | {row['ours']['parameters'] / 1e6:.2f}M | {label} | {x['median_step_s']:.3f} | "
                             f"{x['rollouts_per_s']:.1f} | {x['tokens_per_s']:.0f} | {x['mean_completion_tokens']:.1f} "
                             f"| {x.get('peak_rss_mb', float('nan')):.0f} |")
    lines += [""]
    for size, row in r["p1"].items():
        if "trl" in row:
            trl = row["trl"]
            each = ", ".join(_ratio(t, o) for o, t in zip(row["ray"]["run_medians"], trl["run_medians"]))
            lines.append(f"- **{size}: ours / TRL = {_ratio(row['ray']['rollouts_per_s'], trl['rollouts_per_s'])} "
                         f"rollouts/s with the default trainer, {_ratio(row['ours']['rollouts_per_s'], trl['rollouts_per_s'])}"
                         f" in one process** (tokens/s: {_ratio(row['ray']['tokens_per_s'], trl['tokens_per_s'])}, "
                         f"{_ratio(row['ours']['tokens_per_s'], trl['tokens_per_s'])}). Each pair of runs alone, "
                         f"default trainer: {each}.")
    lines += ["", "Ours runs NoisyRollout (4 clean + 4 noisy responses per prompt, crop_fill distortion); TRL runs 8 "
              "clean ones (it has no noisy rollouts), with `loss_type=\"dapo\"` (the batch token-mean, as ours), "
              "`beta=0`, `scale_rewards=\"group\"`, gradient checkpointing off, the same AdamW settings, "
              "suppressed vision tokens and reward function (bench/trl_grpo.py lists every setting)."]
    lines += ["", "Where our step's time goes (median seconds per phase), and what the exact shortcuts buy "
              "(shortcuts off = the separate old-log-prob pass, every prompt recomputed for each of its responses):", "",
              "| model | path | generate | reward | old log-probs | update | step |", "|---|---|---|---|---|---|---|"]
    for size, row in r["p1"].items():
        for side, label in (("plain", "1 process, shortcuts off"), ("ours", "1 process"),
                            ("ray", "2 Ray learners (slowest learner)")):
            p = row[side]["phases_s"]
            lines.append(f"| {size} | {label} | {p['generate']:.3f} | {p['reward']:.3f} | {p['logprob']:.3f} | "
                         f"{p['update']:.3f} | {row[side]['median_step_s']:.3f} |")
    for size, row in r["p1"].items():
        top = row["ours"].get("profile_top")
        if top:
            lines += ["", f"Top operators of one step ({size}, torch profiler, share of self CPU time): " +
                      ", ".join(f"`{t['op']}` {t['share']:.0%}" for t in top[:6]) + "."]
    p2 = r["p2"]
    lines += ["", "## P2: NoisyRollout overhead", "",
              "Both arms run in ONE process (2 threads) on one learner, alternating step by step (A B, then B A) on "
              "the same prompt batch after the same seed, so a slow spell of the machine weighs on both alike. "
              "Medians over the timed steps; the paired ratio is the median of each step's own ratio.", "",
              "| model | rollouts | timed steps | median step (s) | generate | update | rollouts/s | completion tokens |",
              "|---|---|---|---|---|---|---|---|"]
    sized = {size: v for size, v in p2.items() if size != "parts"}
    for size, arms in sized.items():
        for k, label in (("noisyrollout", "6 clean + 6 noisy"), ("grpo", "12 clean (GRPO)")):
            a = arms[k]
            lines.append(f"| {size} | {label} | {arms['steps']} | {a['median_step_s']:.3f} | "
                         f"{a['phases_s']['generate']:.3f} | {a['phases_s']['update']:.3f} | {a['rollouts_per_s']:.1f} | "
                         f"{a['mean_completion_tokens']:.1f} |")
    lines += [""]
    for size, arms in sized.items():
        ratio = arms["noisyrollout"]["median_step_s"] / arms["grpo"]["median_step_s"]
        lines.append(f"- **{size}: step time ratio 6+6 / 12+0 = {ratio:.3f}** (paired: {arms['paired_ratio']:.3f}; "
                     "target <= 1.03).")
    lines += [""]
    if "parts" in p2:
        parts = p2["parts"]
        added = sum(parts["noisyrollout"].values()) - sum(parts["grpo"].values())
        grpo_step = sized["tiny"]["grpo"]["median_step_s"]
        lines += ["The two arms decode the same P x 12 rows and score every response on the clean image, so they "
                  "differ only before decoding: the distortion, the processor (the twins' text is tokenized once), "
                  "the vision tower on the distorted images and their prefill (2P prompts instead of P). Those parts, "
                  "timed apart on the tiny model (median of 15 batches of 16 prompts, milliseconds):", "",
                  "| part | 12 clean | 6 clean + 6 noisy | added |", "|---|---|---|---|",
                  *[f"| {part} | {parts['grpo'][part] * 1e3:.1f} | {parts['noisyrollout'][part] * 1e3:.1f} | "
                    f"{(parts['noisyrollout'][part] - parts['grpo'][part]) * 1e3:+.1f} |" for part in parts["grpo"]],
                  "",
                  f"- **Added per step: {added * 1e3:.1f} ms = {added / grpo_step:.1%} of the tiny GRPO step** "
                  f"({grpo_step:.3f} s). Each distorted image is a prompt of its own: its image tokens and the text "
                  "after them attend to other pixels, so their prefill cannot be shared with the clean twin's.", ""]
    p3 = r["p3"]
    lines += ["## P3: gaussian distortion on 1-megapixel images", "",
              "| version | s per image |", "|---|---|",
              f"| baseline (rebuilds the beta table, float64, PIL<->tensor each call) | {p3['baseline_s_per_image']:.4f} |",
              f"| ours (`noisyrollout.algo.augment.gaussian_noise`) | {p3['fast_s_per_image']:.4f} |", "",
              f"- **Speed-up {p3['speedup']:.2f}x** (target >= 5x).", ""]
    p4 = r["p4"]
    lines += ["## P4: against the machine (30m config, update phase)", "",
              f"- fp32 GEMM rate, 1024^3 matmul, {r['threads']} threads: **{p4['gemm_gflops']:.1f} GFLOP/s**",
              f"- Update phase: {p4['update_gflop']:.1f} GFLOP (3 x forward over {p4['prompt_len']:.0f}-token prompts "
              f"counted once each and the response tokens) in {p4['update_s']:.2f} s = "
              f"**{p4['achieved_gflops']:.1f} GFLOP/s, {p4['fraction']:.0%} of the GEMM rate** (target >= 30%).", ""]
    if "p5" in r:
        p5 = r["p5"]
        lines += ["## P5: pipeline overhead", "",
                  f"`dvc repro` of this commit in a fresh clone, profile: {p5['profile']}.", "",
                  "| stage | process (s) | model work (s) | outside model work (s) |", "|---|---|---|---|"]
        for stage, t in p5["stages"].items():
            lines.append(f"| {stage} | {t['process']:.1f} | {t['model']:.1f} | {t['process'] - t['model']:.1f} |")
        lines += [f"| between the stage processes (DVC: hashing, lock file; interpreter start and teardown) | - | - | "
                  f"{p5['dvc_s']:.1f} |",
                  f"| **`dvc repro` wall time** | **{p5['wall_s']:.1f}** | **{p5['model_s']:.1f}** | "
                  f"**{p5['overhead_s']:.1f}** |", "",
                  "Model work = SFT and RL steps, validation and evaluation decoding, building the model. Everything "
                  "else (interpreter start-up and imports in each stage process, data preparation, the GX gate, "
                  "MLflow logging and registry calls, Ray and DeepSpeed start-up, checkpoints, DVC) is overhead.", "",
                  f"- **Overhead share {p5['overhead_share']:.0%}** (target <= 10%).", ""]
        if p5.get("named_overhead"):
            lines += ["Named pieces of the overhead, inside the stage processes (seconds):", "",
                      "| piece | s |", "|---|---|"]
            lines += [f"| {label} | {sec:.1f} |" for label, sec in sorted(p5["named_overhead"].items(), key=lambda kv: -kv[1])]
            lines += [""]
    lines += ["## Memory", "", "Peak RSS per learner process (model + optimizer + rollout engine + data):", "",
              "| model | ours, per Ray learner (MB) | ours, one process (MB) | TRL (MB) |", "|---|---|---|---|"]
    for size, row in r["p1"].items():
        trl = row.get("trl", {}).get("peak_rss_mb")
        lines.append(f"| {size} | {row['ray']['peak_rss_mb']:.0f} | {row['ours']['peak_rss_mb']:.0f} | "
                     + (f"{trl:.0f} |" if trl else "- |"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure and write BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="fewer steps and a short pipeline (a smoke run)")
    parser.add_argument("--skip-trl", action="store_true", help="no TRL side (when the bench extra is not installed)")
    parser.add_argument("--skip-pipeline", action="store_true", help="no P5 (dvc repro in a fresh clone)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    results = measure(args)
    elapsed = time.perf_counter() - start
    command = "make bench" if not (args.quick or args.skip_trl or args.skip_pipeline) else \
        "python -m bench.run " + " ".join(a for a in sys.argv[1:])
    (ROOT / "runs/bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs/bench/results.json").write_text(json.dumps(results, indent=2))
    args.out.write_text(render(results, command, elapsed))
    log(f"wrote {args.out} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
