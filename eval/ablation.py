"""The ablation's statistics and report: NoisyRollout arms against vanilla GRPO on the same samples.

Inputs are per-sample correctness vectors (one per run, all over the same evaluated samples, from each run's
`reports/eval_samples.csv`) and each run's training curve (`reports/plots/training.csv`). Runs are paired by
seed: arm A's seed s and GRPO's seed s start from the same SFT checkpoint and see the same prompts in the same
order, and all are graded on the same samples. Every interval is a 95% percentile bootstrap over seeds and
samples together (both resampled with replacement), so it carries the seed-to-seed spread of RL as well as
the finite test set.

    subsets = sample_subsets(keys, groups)                 # test, ood, ood-dev, ood-heldout, per shift, per cell
    table = summarise(runs, subsets, baseline="grpo")      # mean, sd over seeds, paired difference + CI
    write_markdown(...) ; plot(...)
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from noisyrollout.data.shifts import SHIFTS
from noisyrollout.files import save_figure

BOOTSTRAP_REPS = 2000
#: Subsets every table reports, in order (per-shift and per-cell subsets follow).
MAIN_SUBSETS = ("test", "ood", "ood-dev", "ood-heldout")


@dataclass
class Run:
    """One trained arm x seed: correctness over the common samples, and its training curve."""
    arm: str
    seed: int
    correct: np.ndarray                     # (n_samples,) 0/1, in the order of `keys`
    curve: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = ""


def read_samples_csv(text: str) -> dict[tuple[str, str], tuple[str, int]]:
    """`reports/eval_samples.csv` -> {(benchmark, id): (group, correct)}."""
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows[(row["benchmark"], row["id"])] = (row["group"], int(row["correct"]))
    if not rows:
        raise ValueError("no samples in the evaluation CSV")
    return rows


def read_curve_csv(text: str) -> list[dict[str, float]]:
    """`reports/plots/training.csv` -> rows of floats (empty cells -> nan)."""
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        out.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
    return out


def correctness(samples: Mapping[tuple[str, str], tuple[str, int]], keys: Sequence[tuple[str, str]],
                where: str = "run") -> np.ndarray:
    """The 0/1 vector of `samples` in the order of `keys`; a key it lacks is an error (runs must share samples)."""
    missing = [k for k in keys if k not in samples]
    if missing:
        raise ValueError(f"{where}: {len(missing)} of {len(keys)} samples missing (first: {missing[0]}); every run "
                         f"must be evaluated on the same samples")
    return np.array([samples[k][1] for k in keys], dtype=np.float64)


def sample_subsets(keys: Sequence[tuple[str, str]], groups: Sequence[str]) -> dict[str, np.ndarray]:
    """Index arrays into `keys` for: `test`, `ood`, `ood-dev`, `ood-heldout`, `shift:<name>` (its three levels) and
    `cell:<name>-<level>`. `groups` holds each sample's OOD cell (e.g. "blur-2") or its task."""
    idx: dict[str, list[int]] = defaultdict(list)
    for i, ((bench, _), group) in enumerate(zip(keys, groups)):
        if bench == "embedded_test":
            idx["test"].append(i)
        elif bench == "embedded_ood":
            idx["ood"].append(i)
            shift, _, level = group.rpartition("-")
            if shift in SHIFTS:
                idx[f"ood-{SHIFTS[shift].group}"].append(i)
                idx[f"shift:{shift}"].append(i)
                idx[f"cell:{group}"].append(i)
    order = [s for s in MAIN_SUBSETS if s in idx]
    order += [f"shift:{s}" for s in SHIFTS if f"shift:{s}" in idx]
    order += sorted((k for k in idx if k.startswith("cell:")), key=lambda k: (list(SHIFTS).index(k[5:].rpartition("-")[0]), k))
    return {k: np.asarray(idx[k], dtype=np.int64) for k in order}


def bootstrap_mean(matrix: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the grand mean of `matrix` (seeds x samples), resampling seeds and samples with replacement.

    Each replicate draws S seeds and N samples and averages the S x N sub-matrix they select; the interval is the
    replicates' percentile interval."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty (seeds x samples) matrix, got shape {m.shape}")
    s, n = m.shape
    rng = np.random.default_rng(seed)
    seed_counts = np.stack([np.bincount(rng.integers(0, s, s), minlength=s) for _ in range(reps)]).astype(np.float64)
    per_sample = seed_counts @ m / s                                   # (reps, n): the resampled seeds' mean per sample
    pick = rng.integers(0, n, size=(reps, n))
    values = np.take_along_axis(per_sample, pick, axis=1).mean(axis=1)
    alpha = (1 - level) / 2
    return float(m.mean()), float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def _by_arm(runs: Sequence[Run]) -> dict[str, dict[int, Run]]:
    arms: dict[str, dict[int, Run]] = defaultdict(dict)
    for r in runs:
        if r.seed in arms[r.arm]:
            raise ValueError(f"two runs of arm {r.arm!r} with seed {r.seed}")
        arms[r.arm][r.seed] = r
    return arms


def summarise(runs: Sequence[Run], subsets: Mapping[str, np.ndarray], baseline: str = "grpo",
              reps: int = BOOTSTRAP_REPS) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: {subset: {mean, sd, low, high, per_seed, diff, diff_low, diff_high, n}}}.

    `mean` and its interval: the arm's accuracy on the subset (bootstrap over seeds and samples); `sd`: the spread of
    the per-seed accuracies; `diff`: arm minus `baseline` paired by seed (over the seeds both have), with its interval.
    """
    arms = _by_arm(runs)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    base = arms.get(baseline, {})
    for k, (arm, by_seed) in enumerate(arms.items()):
        seeds = sorted(by_seed)
        out[arm] = {}
        for j, (subset, index) in enumerate(subsets.items()):
            m = np.stack([by_seed[s].correct[index] for s in seeds])
            mean, low, high = bootstrap_mean(m, reps, seed=1000 * k + j)
            per_seed = m.mean(axis=1)
            row: dict[str, Any] = {"mean": mean, "low": low, "high": high, "n": int(len(index)),
                                   "sd": float(per_seed.std(ddof=1)) if len(seeds) > 1 else math.nan,
                                   "per_seed": {int(s): float(v) for s, v in zip(seeds, per_seed)}}
            paired = [s for s in seeds if s in base]
            if arm != baseline and paired:
                d = np.stack([by_seed[s].correct[index] - base[s].correct[index] for s in paired])
                row["diff"], row["diff_low"], row["diff_high"] = bootstrap_mean(d, reps, seed=1000 * k + j + 500)
                row["paired_seeds"] = paired
            out[arm][subset] = row
    return out


def reward_gap(runs: Sequence[Run], first: int = 10) -> dict[str, dict[str, Any]]:
    """Per arm: the clean-minus-noisy training reward per step (mean over seeds), and over the first / last `first`
    steps. Arms without noisy rollouts get nan."""
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in _by_arm(runs).items():
        curves = []
        for run in by_seed.values():
            gap = [r.get("reward_clean", math.nan) - r.get("reward_noisy", math.nan) for r in run.curve]
            curves.append(gap)
        length = min((len(c) for c in curves), default=0)
        gaps = np.array([c[:length] for c in curves], dtype=np.float64).reshape(len(curves), length)
        if length == 0 or np.isnan(gaps).all():     # no noisy rollouts (vanilla GRPO)
            out[arm] = {"per_step": [], "first": math.nan, "last": math.nan}
            continue
        per_step = np.nanmean(gaps, axis=0)
        out[arm] = {"per_step": [float(v) for v in per_step],
                    "first": float(np.mean(per_step[:first])), "last": float(np.mean(per_step[-first:]))}
    return out


# --------------------------------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(row: Mapping[str, Any]) -> str:
    if "diff" not in row:
        return "(baseline)"
    mark = " **" if row["diff_low"] > 0 or row["diff_high"] < 0 else ""
    return f"{_signed(row['diff'])} [{_signed(row['diff_low'])}, {_signed(row['diff_high'])}]{mark}"


SUBSET_LABELS = {"test": "in-domain test", "ood": "OOD, all shifts", "ood-dev": "OOD, dev shifts",
                 "ood-heldout": "OOD, held-out shifts"}


def verdicts(table: Mapping[str, Mapping[str, Mapping[str, Any]]], baseline: str = "grpo") -> list[str]:
    """One plain sentence per arm and main subset: better, worse, or no difference resolved at 95%."""
    lines = []
    for arm, rows in table.items():
        if arm == baseline:
            continue
        for subset in MAIN_SUBSETS:
            row = rows.get(subset)
            if row is None or "diff" not in row:
                continue
            if row["diff_low"] > 0:
                word = "better than"
            elif row["diff_high"] < 0:
                word = "worse than"
            else:
                word = "not distinguishable from"
            lines.append(f"{arm} is {word} GRPO on {SUBSET_LABELS[subset]}: {_signed(row['diff'])} points "
                         f"[{_signed(row['diff_low'])}, {_signed(row['diff_high'])}]")
    return lines


def markdown_tables(table: Mapping[str, Mapping[str, Mapping[str, Any]]], sft: Mapping[str, float] | None,
                    gaps: Mapping[str, Mapping[str, Any]], baseline: str = "grpo") -> str:
    """The main table (accuracy and paired difference per main subset), the per-shift table and the reward gap."""
    arms = list(table)
    lines = ["| arm | " + " | ".join(f"{SUBSET_LABELS[s]}: acc. (sd) | diff. vs GRPO [95% CI]" for s in MAIN_SUBSETS)
             + " |", "|---|" + "---:|---:|" * len(MAIN_SUBSETS)]
    if sft is not None:
        lines.append("| SFT start | " + " | ".join(f"{_pct(sft.get(s, math.nan))} | " for s in MAIN_SUBSETS) + " |")
    for arm in arms:
        cells = []
        for s in MAIN_SUBSETS:
            row = table[arm].get(s)
            cells += ["", ""] if row is None else [f"{_pct(row['mean'])} ({_pct(row['sd'])})", _ci(row)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    shifts = [k for k in next(iter(table.values())) if k.startswith("shift:")]
    if shifts:
        names = [k.split(":", 1)[1] for k in shifts]
        lines += ["", "Per shift (its three strengths pooled; accuracy, then the paired difference vs GRPO with its "
                  "95% CI; ** = the interval excludes 0):", "",
                  "| arm | " + " | ".join(f"{n} ({SHIFTS[n].group})" for n in names) + " |",
                  "|---|" + "---:|" * len(names)]
        if sft is not None:
            lines.append("| SFT start | " + " | ".join(_pct(sft.get(k, math.nan)) for k in shifts) + " |")
        for arm in arms:
            cells = []
            for k in shifts:
                row = table[arm][k]
                cells.append(_pct(row["mean"]) + ("" if "diff" not in row else f"<br>{_ci(row)}"))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Clean-minus-noisy training reward (mean over seeds; first and last 10 RL steps):", "",
              "| arm | first 10 steps | last 10 steps |", "|---|---:|---:|"]
    for arm in arms:
        g = gaps.get(arm, {})
        first, last = g.get("first", math.nan), g.get("last", math.nan)
        lines.append(f"| {arm} | {'n/a' if math.isnan(first) else f'{first:+.3f}'} | "
                     f"{'n/a' if math.isnan(last) else f'{last:+.3f}'} |")
    return "\n".join(lines) + "\n"


def plot(table: Mapping[str, Mapping[str, Mapping[str, Any]]], sft_cells: Mapping[str, float] | None,
         gaps: Mapping[str, Mapping[str, Any]], path: Path, baseline: str = "grpo") -> Path:
    """Four panels, one colour per arm: the paired difference vs GRPO with its 95% CI per main subset; accuracy by shift
    strength on the dev and on the held-out shifts (SFT in black); the clean-minus-noisy training reward per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    colour = {arm: f"C{i}" for i, arm in enumerate(arms)}
    others = [a for a in arms if a != baseline]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    width = 0.8 / max(1, len(others))
    for i, arm in enumerate(others):
        xs, ys, lo, hi = [], [], [], []
        for j, s in enumerate(MAIN_SUBSETS):
            row = table[arm].get(s)
            if row is None or "diff" not in row:
                continue
            xs.append(j + (i - (len(others) - 1) / 2) * width)
            ys.append(100 * row["diff"])
            lo.append(100 * (row["diff"] - row["diff_low"]))
            hi.append(100 * (row["diff_high"] - row["diff"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=arm, color=colour[arm])
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(MAIN_SUBSETS)), [SUBSET_LABELS[s].replace(", ", "\n") for s in MAIN_SUBSETS], fontsize=8)
    ax.set_ylabel("accuracy minus GRPO's (points)")
    ax.set_title("Paired difference vs GRPO, 95% CI")
    ax.legend(fontsize=8)

    for ax, group in ((axes[0, 1], "dev"), (axes[1, 0], "heldout")):
        names = [n for n, s in SHIFTS.items() if s.group == group]
        for arm in arms:
            ys = []
            for level in (1, 2, 3):
                vals = [table[arm][f"cell:{n}-{level}"]["mean"] for n in names if f"cell:{n}-{level}" in table[arm]]
                ys.append(100 * float(np.mean(vals)) if vals else math.nan)
            ax.plot([1, 2, 3], ys, marker="o", label=arm, color=colour[arm])
        if sft_cells:
            ys = [100 * float(np.mean([sft_cells[f"cell:{n}-{lv}"] for n in names if f"cell:{n}-{lv}" in sft_cells]
                                      or [math.nan])) for lv in (1, 2, 3)]
            ax.plot([1, 2, 3], ys, "--", marker="x", color="black", label="SFT start")
        ax.set_xticks([1, 2, 3], ["mild", "medium", "strong"])
        ax.set_ylabel("accuracy (%), mean over seeds and shifts")
        ax.set_title(f"{'Dev' if group == 'dev' else 'Held-out'} shifts ({', '.join(names)}) by strength")
        ax.legend(fontsize=8)

    ax = axes[1, 1]
    for arm in arms:
        per_step = gaps.get(arm, {}).get("per_step") or []
        if per_step and not all(math.isnan(v) for v in per_step):
            window = min(10, len(per_step))
            smooth = np.convolve(per_step, np.ones(window) / window, mode="valid")
            ax.plot(range(window - 1, len(per_step)), smooth, label=arm, color=colour[arm])
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward(clean) - reward(noisy)")
    ax.set_title("Clean vs noisy rollout reward gap (10-step mean over seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)
