"""`make ablation`: NoisyRollout arms against vanilla GRPO, several seeds each, through DVC's experiment queue.

Every run is one `dvc exp run --queue` of the DAG with a few `-S` overrides, so the stages before `train` come
from DVC's run cache: all runs start from the same SFT checkpoint (`train.seed` changes only the RL stage),
see the same prompts in the same order for a given seed, and have the same rollout budget (n_clean + n_noisy).
Runs do not register models (`registry.enabled=false`) and log to their own MLflow experiment.

    noisyrollout ablation                       # 5 arms x 3 seeds -> ABLATION.md + ablation/
    noisyrollout ablation --collect abl-1129    # re-analyse finished experiments whose names start with it

The statistics (paired bootstrap over seeds and samples) live in `eval/ablation.py`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError

Log = Callable[[str], None]

#: The arms: overrides of params.yaml. Same rollout budget (8 per prompt); alpha0 picked by the SFT model's
#: greedy val accuracy under the distortion (the "moderate" check printed in ABLATION.md), never by an OOD split.
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"rollout.n_clean": 8, "rollout.n_noisy": 0},
    "gaussian": {"rollout.n_clean": 4, "rollout.n_noisy": 4, "noise.distortion": "gaussian", "noise.alpha0": 5},
    "rotate": {"rollout.n_clean": 4, "rollout.n_noisy": 4, "noise.distortion": "rotate", "noise.alpha0": 2},
    "crop_fill": {"rollout.n_clean": 4, "rollout.n_noisy": 4, "noise.distortion": "crop_fill", "noise.alpha0": 0.2},
    "blur": {"rollout.n_clean": 4, "rollout.n_noisy": 4, "noise.distortion": "tv:GaussianBlur", "noise.alpha0": 0.5},
}
#: Overrides of every run: no registry versions, a separate MLflow experiment.
COMMON = {"registry.enabled": "false", "tracking.experiment": "noisyrollout-ablation"}
#: The training distortion each arm is matched to among the OOD shifts (trained toward it: not a generalisation test).
MATCHED_SHIFT = {"gaussian": "noise", "rotate": "rotate", "crop_fill": "occlusion", "blur": "blur"}


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "failed").splitlines()[-1]
        raise NoisyRolloutError(f"dvc {' '.join(args)}: {last}")
    return result


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def check_ready(params: Params) -> None:
    """The ablation starts from the workspace's SFT checkpoint: `make run` (or `dvc repro`) must have made it."""
    sft = Path(params.sft.output_dir) / "model" / "config.json"
    if not Path("dvc.lock").is_file() or not sft.is_file():
        raise NoisyRolloutError(f"no finished pipeline here ({'dvc.lock' if not Path('dvc.lock').is_file() else sft} "
                                f"missing): run `make run` (or `dvc repro`) first; the ablation starts from its SFT model")
    status = _dvc("status", "prepare", "validate", "build_model", "sft", "--json").stdout.strip() or "{}"
    if json.loads(status):
        raise NoisyRolloutError(f"the stages before `train` are not up to date ({', '.join(json.loads(status))}): run "
                                f"`dvc repro` first, so that every run starts from the same SFT checkpoint")


def sft_baseline(params: Params, out_dir: Path, log: Log) -> dict[tuple[str, str], tuple[str, int]]:
    """Evaluate the SFT checkpoint on the same splits (greedy); its per-sample correctness."""
    from eval.report import load_results, sample_outcomes
    from pipelines.stages.evaluate import evaluate

    model = Path(params.sft.output_dir) / "model"
    p = params.model_copy(update={"eval": params.eval.model_copy(update={"model": model, "output_dir": out_dir})})
    summary = evaluate(p, log=lambda _: None, record=False)
    samples = sample_outcomes(load_results(out_dir, summary["benchmarks"]))
    log(f"ablation: SFT start evaluated on {len(samples)} samples")
    return samples


def distortion_check(params: Params, arms: dict[str, dict[str, Any]], log: Log) -> dict[str, dict[str, float]]:
    """The SFT model's greedy val accuracy on clean images and under each arm's distortion at its alpha0: how readable
    each arm's noisy rollouts are at the start (the paper's distortions are meant to be moderate)."""
    from noisyrollout.train.validate import validate_checkpoint

    out: dict[str, dict[str, float]] = {}
    model = Path(params.sft.output_dir) / "model"
    clean = validate_checkpoint(model, params, "sft clean", which=("clean",))["clean"]["accuracy"]
    for arm, overrides in arms.items():
        if "noise.distortion" not in overrides:
            continue
        noise = params.noise.model_copy(update={"distortion": overrides["noise.distortion"],
                                                "alpha0": float(overrides["noise.alpha0"])})
        acc = validate_checkpoint(model, params.model_copy(update={"noise": noise}), f"sft {arm}",
                                  which=("noisy",))["noisy"]["accuracy"]
        out[arm] = {"clean": clean, "distorted": acc}
        log(f"ablation: SFT val accuracy {clean:.3f} clean, {acc:.3f} under {overrides['noise.distortion']} "
            f"at alpha0 {overrides['noise.alpha0']}")
    return out


def queue(prefix: str, arms: dict[str, dict[str, Any]], seeds: list[int], extra: list[str], log: Log) -> list[str]:
    """Queue one experiment per arm x seed; returns their names."""
    names = []
    for seed in seeds:                                  # seed-major: a partial ablation still has every arm
        for arm, overrides in arms.items():
            name = f"{prefix}-{arm}-s{seed}"
            sets = {**COMMON, **{k: str(v) for k, v in overrides.items()}, "train.seed": str(seed)}
            args = ["exp", "run", "--queue", "-n", name]
            for key, value in sets.items():
                args += ["-S", f"{key}={value}"]
            for item in extra:
                args += ["-S", item]
            _dvc(*args)
            names.append(name)
    log(f"ablation: queued {len(names)} experiments ({len(arms)} arms x {len(seeds)} seeds), prefix {prefix}")
    return names


def wait(names: list[str], log: Log, poll: float = 10.0) -> dict[str, str]:
    """Start the queue (one worker: the runs use every core) and wait; {name: final status}."""
    from noisyrollout.progress import progress_bar

    # the worker outlives this call: its output must not be a pipe we wait on (that would block until the queue is done)
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bar = progress_bar(total=len(names), desc="ablation runs", unit="run")
    states: dict[str, str] = {}
    began = time.time()
    while True:
        table = _dvc("queue", "status").stdout
        for line in table.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] in names:
                states[parts[1]] = parts[-1]
        done = [n for n in names if states.get(n) in ("Success", "Failed")]
        bar.n = len(done)
        bar.set_postfix(running=next((n for n in names if states.get(n) == "Running"), "-")[-20:])
        bar.refresh()
        if len(done) == len(names):
            break
        if not any(states.get(n) in ("Queued", "Running") for n in names) and time.time() - began > 120:
            missing = [n for n in names if n not in done]
            raise NoisyRolloutError(f"the DVC queue stopped with {len(missing)} experiment(s) unfinished "
                                    f"({', '.join(missing[:3])}...): `dvc queue status`, `dvc queue logs <name>`")
        time.sleep(poll)
    bar.close()
    failed = [n for n in names if states[n] == "Failed"]
    for n in failed:
        tail = _dvc("queue", "logs", n, check=False).stdout.strip().splitlines()[-5:]
        log(f"ablation: {n} FAILED; last lines of `dvc queue logs {n}`:\n  " + "\n  ".join(tail))
    return {n: states[n] for n in names}


def experiments(prefix: str) -> dict[str, dict[str, Any]]:
    """{name: {"rev", "params"}} of the finished experiments whose names start with `prefix`."""
    show = json.loads(_dvc("exp", "show", "--all-commits", "--json").stdout or "[]")   # also runs of older commits
    out = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or ""
                if name.startswith(prefix + "-") and rev.get("rev") and not rev.get("error"):
                    params = ((rev.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {})
                    out[name] = {"rev": rev["rev"], "params": params}
    return out


def collect(prefix: str, keys: list[tuple[str, str]], log: Log) -> list:
    """The runs of the finished experiments named `<prefix>-<arm>-s<seed>`, read from their git commits."""
    from eval.ablation import Run, correctness, read_curve_csv, read_samples_csv

    runs = []
    for name, info in sorted(experiments(prefix).items()):
        m = re.fullmatch(re.escape(prefix) + r"-(.+)-s(\d+)", name)
        if m is None:
            continue
        rev = info["rev"]
        try:
            samples = read_samples_csv(_git("show", f"{rev}:reports/eval_samples.csv"))
            curve = read_curve_csv(_git("show", f"{rev}:reports/plots/training.csv"))
            metrics = json.loads(_git("show", f"{rev}:reports/train.json"))
        except subprocess.CalledProcessError as exc:
            raise NoisyRolloutError(f"experiment {name} ({rev[:7]}) lacks its reports ({exc.stderr.strip()})") from None
        runs.append(Run(arm=m.group(1), seed=int(m.group(2)), correct=correctness(samples, keys, name), curve=curve,
                        metrics=metrics, name=name))
    if not runs:
        raise NoisyRolloutError(f"no finished experiments named {prefix}-<arm>-s<seed> (`dvc exp show`)")
    order = list(ARMS)
    runs.sort(key=lambda r: (order.index(r.arm) if r.arm in order else len(order), r.arm, r.seed))
    log(f"ablation: collected {len(runs)} runs")
    return runs


def _machine() -> str:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu or platform.processor() or 'unknown CPU'}), {platform.system()}"


def write_report(runs: list, sft: dict, keys: list[tuple[str, str]], checks: dict[str, dict[str, float]],
                 params: Params, meta: dict[str, Any], out_md: Path, out_dir: Path, log: Log) -> dict[str, Any]:
    """ABLATION.md, ablation/ablation.png and ablation/results.json."""
    import numpy as np

    from eval.ablation import markdown_tables, plot, reward_gap, sample_subsets, summarise, verdicts
    from noisyrollout.data.shifts import SHIFTS

    groups = [sft[k][0] for k in keys]
    subsets = sample_subsets(keys, groups)
    table = summarise(runs, subsets)
    sft_vec = np.array([sft[k][1] for k in keys], dtype=np.float64)
    sft_acc = {name: float(sft_vec[idx].mean()) for name, idx in subsets.items()}
    gaps = reward_gap(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(table, sft_acc, gaps, out_dir / "ablation.png")
    arms = list(table)
    seeds = sorted({r.seed for r in runs})
    results = {"meta": meta, "table": table, "sft": sft_acc, "reward_gap": gaps, "distortion_check": checks,
               "runs": {r.name: {"arm": r.arm, "seed": r.seed, "val_accuracy": r.metrics.get("val_accuracy")}
                        for r in runs}}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")

    arm_rows = ["| arm | rollouts (clean + noisy) | distortion, alpha0 | SFT val accuracy under it | matched OOD shift |",
                "|---|---|---|---:|---|"]
    for arm in arms:
        o = ARMS.get(arm, {})
        if o.get("rollout.n_noisy", 0) == 0:
            arm_rows.append(f"| {arm} | {o.get('rollout.n_clean', '?')} + 0 | none (vanilla GRPO) | | |")
            continue
        c = checks.get(arm, {})
        arm_rows.append(f"| {arm} | {o['rollout.n_clean']} + {o['rollout.n_noisy']} | `{o['noise.distortion']}`, "
                        f"{o['noise.alpha0']} | {c.get('distorted', float('nan')):.3f} (clean {c.get('clean', float('nan')):.3f}) "
                        f"| {MATCHED_SHIFT.get(arm, '')} |")
    shift_rows = ["| shift | group | strengths (levels 1, 2, 3) | SFT accuracy at levels 1, 2, 3 |", "|---|---|---|---|"]
    for name, s in SHIFTS.items():
        accs = ", ".join(f"{100 * sft_acc.get(f'cell:{name}-{lv}', float('nan')):.1f}" for lv in (1, 2, 3))
        shift_rows.append(f"| {name} | {s.group} | {', '.join(f'{v:g}' for v in s.levels)} {s.unit} | {accs} |")
    n_cell = int(np.median([len(v) for k, v in subsets.items() if k.startswith("cell:")])) if any(
        k.startswith("cell:") for k in subsets) else 0
    val_rows = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for arm in arms:
        by_seed = {r.seed: r.metrics.get("val_accuracy") for r in runs if r.arm == arm}
        val_rows.append(f"| {arm} | " + " | ".join("" if by_seed.get(s) is None else f"{by_seed[s]:.3f}" for s in seeds)
                        + " |")
    md = [
        "# Ablation: NoisyRollout vs vanilla GRPO on the embedded task",
        "",
        f"Command: `{meta['command']}` (written by `pipelines/ablation.py`; numbers below are this run's output).",
        f"Date: {meta['date']}. Machine: {meta['machine']}. Commit: `{meta['commit']}`. "
        f"Wall time: {meta['minutes']:.1f} min ({meta['n_runs']} runs through `dvc exp run --queue`)."
        + (f" Tables and plot re-analysed from those runs on {meta['reanalysed']}." if meta.get("reanalysed") else ""),
        "",
        "## Design",
        "",
        f"- Every run starts from the same SFT checkpoint (SFT val accuracy {sft_val(params):.3f}), runs "
        f"{params.train.steps} RL steps of {params.train.prompts_per_step} prompts with 8 rollouts per prompt, and "
        f"differs from the others only in its arm and its RL seed (`train.seed` in {seeds}: prompt order, sampling and "
        f"noise draws). Arm A's seed s and GRPO's seed s see the same prompts in the same order.",
        f"- Evaluation: greedy, on the in-domain test split ({len(subsets.get('test', []))} samples) and the graded OOD "
        f"split ({len(subsets.get('ood', []))} samples: 7 shifts x 3 strengths, {n_cell} per cell).",
        "- Intervals: 95% percentile bootstrap (2000 replicates) resampling seeds and samples together; differences "
        "are paired by seed and sample. `**` marks an interval that excludes 0.",
        "- Dev shifts are the ones a training distortion resembles (each NoisyRollout arm trains toward its matched "
        "shift, so its matched cells are not a generalisation test). Held-out shifts resemble no training "
        "distortion, and nothing was tuned on them: the shift strengths were set from the SFT model alone, and each "
        "arm's alpha0 from the SFT model's validation accuracy under that arm's own distortion (below).",
        *[f"- `{arm}` trains with `{ARMS[arm]['noise.distortion']}`, the family of the `{MATCHED_SHIFT[arm]}` dev shift: "
          f"it is tuned toward that shift, so its `{MATCHED_SHIFT[arm]}` cells measure robustness to its own training "
          f"distortion, not generalisation." for arm in arms if arm in MATCHED_SHIFT],
        "",
        *arm_rows,
        "",
        *shift_rows,
        "",
        "## Results",
        "",
        markdown_tables(table, sft_acc, gaps),
        "Validation accuracy after RL per run (the `train` stage's clean val split):",
        "",
        *val_rows,
        "",
        "In words (computed from the intervals above):",
        "",
        *[f"- {line}" for line in verdicts(table)],
        "",
        "![ablation](ablation/ablation.png)",
        "",
        "Raw numbers: `ablation/results.json`. Re-analyse finished runs: "
        f"`noisyrollout ablation --collect {meta['prefix']}`.",
    ]
    out_md.write_text("\n".join(md) + "\n")
    log(f"ablation: {out_md}, {png}, {out_dir / 'results.json'}")
    return results


def sft_val(params: Params) -> float:
    path = Path(params.sft.output_dir) / "val.json"
    try:
        return float(json.loads(path.read_text())["val"]["clean"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")


def run(params: Params, *, arms: list[str], seeds: int, extra: list[str], collect_prefix: str | None,
        out_md: Path, out_dir: Path, command: str, log: Log = print) -> dict[str, Any]:
    """Queue, wait, collect and report (or, with `collect_prefix`, only collect and report finished runs)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise NoisyRolloutError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "grpo" not in arms:
        raise NoisyRolloutError("the arms must include grpo: every difference is measured against it")
    if seeds < 1:
        raise NoisyRolloutError("--seeds must be at least 1")
    began = time.time()
    check_ready(params)
    chosen = {a: ARMS[a] for a in arms}
    checks = distortion_check(params, chosen, log)
    sft = sft_baseline(params, Path("runs/ablation/sft-eval"), log)   # per-sample files: not for git
    keys = sorted(sft)
    prefix = collect_prefix or f"abl{time.strftime('%m%d%H%M')}"
    states: dict[str, str] = {}
    if collect_prefix is None:
        names = queue(prefix, chosen, list(range(seeds)), extra, log)
        states = wait(names, log)
    runs = collect(prefix, keys, log)
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(),
            "commit": _git("rev-parse", "--short", "HEAD").strip(), "minutes": (time.time() - began) / 60,
            "n_runs": len(runs), "prefix": prefix, "failed": [n for n, s in states.items() if s != "Success"]}
    if collect_prefix is not None:   # a re-analysis: the run's own command, date, commit and wall time stay
        try:
            earlier = json.loads((out_dir / "results.json").read_text())["meta"]
        except (OSError, ValueError, KeyError):
            earlier = {}
        if earlier.get("prefix") == prefix:
            meta = {**meta, **{k: earlier[k] for k in ("command", "date", "commit", "minutes") if k in earlier},
                    "reanalysed": f"{meta['date']} at {meta['commit']}"}
    results = write_report(runs, sft, keys, checks, params, meta, out_md, out_dir, log)
    if meta["failed"]:
        raise NoisyRolloutError(f"{len(meta['failed'])} run(s) failed ({', '.join(meta['failed'])}); the report covers "
                                f"the {len(runs)} that finished")
    return results
