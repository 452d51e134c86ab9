"""The before/after table of a run and its training-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _window_mean(rows: list[dict], key: str, first: bool, k: int = 10) -> float:
    picked = rows[:k] if first else rows[-k:]
    vals = [r[key] for r in picked if r.get(key) is not None and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def before_after(sft_val: dict, rl_val: dict, metrics_path: Path) -> tuple[str, dict[str, Any]]:
    """A markdown table: validation accuracy (clean / distorted images, per task) after SFT and after RL,
    and the training reward on clean vs noisy rollouts over the first and last 10 steps."""
    tasks = sorted(k for k in sft_val["clean"] if k.startswith("accuracy/"))
    rows = [("val accuracy (clean images)", "accuracy", "clean"), ("val accuracy (distorted images)", "accuracy", "noisy"),
            ("val format rate", "format", "clean")]
    rows += [(f"val accuracy {t.split('/', 1)[1]}", t, "clean") for t in tasks]
    lines = ["| metric | after SFT | after RL | change |", "|---|---|---|---|"]
    summary: dict[str, Any] = {"sft": sft_val, "rl": rl_val}
    for label, key, which in rows:
        a, b = sft_val[which][key], rl_val[which][key]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    history = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    lines += ["", "| training reward | first 10 steps | last 10 steps | change |", "|---|---|---|---|"]
    for label, key in (("clean rollouts", "reward_clean"), ("noisy rollouts", "reward_noisy"),
                       ("accuracy (all rollouts)", "accuracy")):
        a, b = _window_mean(history, key, True), _window_mean(history, key, False)
        summary[f"train_{key}_first10"], summary[f"train_{key}_last10"] = a, b
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    n = int(sft_val["clean"]["n"])
    lines.append(f"\n(validation: {n} examples, greedy decoding; distorted images at alpha0, full strength)")
    summary["val_accuracy_gain"] = rl_val["clean"]["accuracy"] - sft_val["clean"]["accuracy"]
    return "\n".join(lines), summary


def plot_training(metrics_path: Path, out_png: Path) -> Path:
    """Reward on clean vs noisy rollouts, accuracy and alpha_t per step of a metrics.jsonl file, as one PNG
    (drawn by `noisyrollout.tracking.plot_metrics`)."""
    from noisyrollout.tracking import plot_metrics

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    return plot_metrics(rows, out_png)
