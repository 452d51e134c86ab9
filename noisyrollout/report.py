"""The before/after table of a run, its training-curve plot (training.png) and the CSV that `dvc plots` draws."""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from noisyrollout.files import save_figure
from noisyrollout.tracking import finite_or_none
from noisyrollout.train.metrics import MetricsLog


def _window_mean(rows: list[dict], key: str, first: bool, k: int = 10) -> float:
    picked = rows[:k] if first else rows[-k:]
    vals = [r[key] for r in picked if r.get(key) is not None and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def before_after(sft_val: dict | None, rl_val: dict, metrics_path: Path) -> tuple[str, dict[str, Any]]:
    """A markdown table: validation accuracy (clean / distorted images, per task) after SFT and after RL,
    and the training reward on clean vs noisy rollouts over the first and last 10 steps. Without SFT
    (`sft_val` None) the "before" column is empty and the gain is nan."""
    tasks = sorted(k for k in rl_val["clean"] if k.startswith("accuracy/"))
    rows = [("val accuracy (clean images)", "accuracy", "clean"), ("val accuracy (distorted images)", "accuracy", "noisy"),
            ("val format rate", "format", "clean")]
    rows += [(f"val accuracy {t.split('/', 1)[1]}", t, "clean") for t in tasks]
    lines = ["| metric | after SFT | after RL | change |", "|---|---|---|---|"]
    summary: dict[str, Any] = {"sft": sft_val, "rl": rl_val}
    for label, key, which in rows:
        b = rl_val[which][key]
        a = sft_val.get(which, {}).get(key, math.nan) if sft_val is not None else math.nan
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" if sft_val is not None
                     else f"| {label} | (no SFT) | {b:.3f} | |")
    history = MetricsLog(Path(metrics_path)).read()
    lines += ["", "| training reward | first 10 steps | last 10 steps | change |", "|---|---|---|---|"]
    for label, key in (("clean rollouts", "reward_clean"), ("noisy rollouts", "reward_noisy"),
                       ("accuracy (all rollouts)", "accuracy")):
        a, b = _window_mean(history, key, True), _window_mean(history, key, False)
        summary[f"train_{key}_first10"], summary[f"train_{key}_last10"] = a, b
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    n = int(rl_val["clean"]["n"])
    lines.append(f"\n(validation: {n} examples, greedy decoding; distorted images at alpha0, full strength)")
    summary["val_accuracy_gain"] = (rl_val["clean"]["accuracy"] - sft_val["clean"]["accuracy"]
                                    if sft_val is not None else math.nan)
    return "\n".join(lines), summary


SMOOTH_STEPS = 10   # training.png's smoothed curves: the mean of the last this many steps


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start), skipping nan; nan where all are nan."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if not math.isnan(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def plot_training(rows: Sequence[Mapping[str, Any]], out_png: Path) -> Path:
    """training.png: reward on clean vs noisy rollouts, rollout accuracy and alpha_t per step, in three panels.

    `rows` are StepMetrics dicts (keys step, reward_clean, reward_noisy, accuracy, alpha); a missing key or a nan
    value (reward_noisy when n_noisy = 0) leaves a gap in its curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(key: str) -> list[float]:
        return [math.nan if (v := finite_or_none(r.get(key))) is None else v for r in rows]

    def curve(ax: Any, key: str, colour: str, label: str | None = None) -> None:
        """The raw per-step values, faint, and their trailing SMOOTH_STEPS-step mean over them."""
        values = col(key)
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(values, SMOOTH_STEPS), color=colour, linewidth=2, label=label)

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    curve(axes[0], "reward_clean", "tab:blue", "clean rollouts")
    curve(axes[0], "reward_noisy", "tab:orange", "noisy rollouts")
    axes[0].set_title(f"reward (line: {SMOOTH_STEPS}-step mean)")
    axes[0].legend()
    curve(axes[1], "accuracy", "tab:green")
    axes[1].set_title(f"rollout accuracy ({SMOOTH_STEPS}-step mean)")
    axes[2].plot(steps, col("alpha"), color="tab:red")
    axes[2].set_title("alpha_t (distortion strength)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, out_png, dpi=110)


TRAINING_COLUMNS = ("step", "reward_clean", "reward_noisy", "accuracy", "alpha")


def training_csv(metrics_path: Path, out_csv: Path) -> Path:
    """The per-step curves `dvc plots` draws (reward on clean vs noisy rollouts, accuracy, alpha_t), as CSV.
    A missing or nan value (reward_noisy with n_noisy = 0) is left empty."""
    rows = MetricsLog(Path(metrics_path)).read()

    def cell(value: Any) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(TRAINING_COLUMNS)] + [",".join(cell(r.get(c)) for c in TRAINING_COLUMNS) for r in rows]
    out_csv.write_text("\n".join(lines) + "\n")
    return out_csv
