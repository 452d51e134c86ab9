"""Reports: per-benchmark JSON, summary.json, summary.md and a bar chart (summary.png).

`OUT/<benchmark>.json` = {"results": [...], "metrics": {...}, "config": {...}}. Metrics count every
sample: `n_total` = all loaded, `n_unreadable` = not scorable (image missing or unreadable, or no
ground-truth answer; not generated; each row's `error` says why), `n_scored` = the rest. `accuracy` is over scored samples (the authors' suite silently skipped
unreadable images, so this is the comparable number); `accuracy_all` counts unreadable samples as
wrong. Sub-accuracies are over scored samples too.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from eval.benchmarks import BENCHMARKS, EMBEDDED_SPLITS
from noisyrollout import files
from noisyrollout.tracking import is_secret_key

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config with secret-looking entries (an API key passed in by mistake, say) removed, recursively.

    Names are judged by `noisyrollout.tracking.is_secret_key`, the filter MLflow params and tags go through too.
    """
    clean: dict[str, Any] = {}
    for k, v in config.items():
        if is_secret_key(str(k)):
            continue
        clean[k] = redact(v) if isinstance(v, Mapping) else v
    return clean


def compute_metrics(results: Iterable[Mapping[str, Any]], sub_key: str | None = None) -> dict[str, Any]:
    """accuracy, accuracy_all, sub_accuracies (by `sub_key`), n_total, n_scored, n_unreadable, ..."""
    results = list(results)
    scored = [r for r in results if not r.get("unreadable")]
    n_correct = sum(1 for r in scored if r.get("correct"))
    groups: dict[str, list[bool]] = defaultdict(list)
    if sub_key:
        for r in scored:
            if r.get(sub_key) not in (None, ""):
                groups[str(r[sub_key])].append(bool(r.get("correct")))
    return {
        "accuracy": n_correct / len(scored) if scored else 0.0,
        "accuracy_all": n_correct / len(results) if results else 0.0,
        "sub_accuracies": {k: sum(v) / len(v) for k, v in sorted(groups.items())},
        "sub_counts": {k: len(v) for k, v in sorted(groups.items())},
        "sub_key": sub_key,
        "n_total": len(results),
        "n_scored": len(scored),
        "n_unreadable": len(results) - len(scored),
        "n_correct": n_correct,
        "n_no_answer": sum(1 for r in scored if r.get("extracted") in (None, "")),
        "n_judged": sum(1 for r in scored if r.get("judge_answer") is not None or r.get("judge_error")),
        "n_judge_errors": sum(1 for r in scored if r.get("judge_error")),
    }


def shift_metrics(results: Iterable[Mapping[str, Any]], prefix: str = "") -> dict[str, float]:
    """Accuracies of the graded OOD split by shift: `<shift>.accuracy` (its three levels pooled) and `dev.accuracy` /
    `heldout.accuracy` over each group of shifts (`noisyrollout.data.shifts`); per-cell accuracies are the split's
    sub-accuracies. Rows without a `shift` (other data) are ignored; no shifted rows give {}."""
    from noisyrollout.data.shifts import SHIFTS

    by: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        if r.get("unreadable") or r.get("shift") in (None, ""):
            continue
        ok = bool(r.get("correct"))
        by[str(r["shift"])].append(ok)
        group = SHIFTS[r["shift"]].group if r["shift"] in SHIFTS else "other"
        by[group].append(ok)
    return {f"{prefix}{key}.accuracy": sum(v) / len(v) for key, v in sorted(by.items())}


def load_results(output_dir: Path, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """{benchmark: its graded result rows} from the `OUT/<benchmark>.json` files of one evaluation."""
    return {name: read_benchmark(Path(output_dir) / f"{name}.json")["results"] for name in names}


def sample_outcomes(results: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[tuple[str, str], tuple[str, int]]:
    """{(benchmark, id): (group, correct 0/1)} for every evaluated sample: what a paired comparison of two checkpoints
    on the same samples (the ablation's bootstrap) needs. `group` is the OOD cell, the task, or empty."""
    return {(name, str(r["id"])): (r.get("group") or r.get("task") or "", int(bool(r.get("correct"))))
            for name, rows in results.items() for r in rows}


def write_samples_csv(results: Mapping[str, Iterable[Mapping[str, Any]]], path: Path) -> Path:
    """`sample_outcomes(results)` as a CSV, one row per sample: `benchmark,id,group,correct`."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "id", "group", "correct"])
        for (name, sample_id), (group, correct) in sample_outcomes(results).items():
            writer.writerow([name, sample_id, group, correct])
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically (a reader never sees half a file), strict (nan -> null)."""
    return files.write_json(path, payload, default=_json_default)


def write_benchmark(output_dir: Path, name: str, results: list[dict[str, Any]], metrics: Mapping[str, Any],
                    config: Mapping[str, Any]) -> Path:
    """OUT/<name>.json with results, metrics and the (redacted) config."""
    return write_json(Path(output_dir) / f"{name}.json",
                      {"benchmark": name, "results": results, "metrics": dict(metrics), "config": redact(config)})


def read_benchmark(path: Path) -> dict[str, Any]:
    """A saved OUT/<name>.json. Raises `DataError` when it is not one."""
    from noisyrollout.errors import DataError

    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise DataError(f"{path}: no 'results' list; not an eval output")
    return payload


def build_summary(metrics: Mapping[str, Mapping[str, Any]], *, skipped: Mapping[str, str] | None = None,
                  config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cross-benchmark summary: per-benchmark headline numbers and the paper-benchmark average."""
    order = [n for n in BENCHMARKS + EMBEDDED_SPLITS if n in metrics] + sorted(
        n for n in metrics if n not in BENCHMARKS + EMBEDDED_SPLITS)
    table = {
        name: {k: metrics[name].get(k) for k in
               ("accuracy", "accuracy_all", "n_total", "n_scored", "n_unreadable", "n_correct", "sub_accuracies")}
        for name in order
    }
    paper = [metrics[n]["accuracy"] for n in BENCHMARKS if n in metrics]
    return {
        "benchmarks": table,
        "average": sum(paper) / len(paper) if paper else None,
        "average_over": [n for n in BENCHMARKS if n in metrics],
        "skipped": dict(skipped or {}),
        "config": redact(config or {}),
    }


def render_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: the accuracy table, the skipped benchmarks and the sub-accuracies."""
    lines = ["# Evaluation summary", "", "| benchmark | accuracy (%) | scored | total | unreadable |",
             "|---|---:|---:|---:|---:|"]
    for name, row in summary["benchmarks"].items():
        lines.append(f"| {name} | {100 * row['accuracy']:.1f} | {row['n_scored']} | {row['n_total']} "
                     f"| {row['n_unreadable']} |")
    if summary.get("average") is not None:
        lines.append(f"| **average** ({len(summary['average_over'])} paper benchmarks) | "
                     f"**{100 * summary['average']:.1f}** | | | |")
    if summary.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {n}: {why}" for n, why in summary["skipped"].items()]
    subs = {n: r["sub_accuracies"] for n, r in summary["benchmarks"].items() if r.get("sub_accuracies")}
    if subs:
        lines += ["", "## Sub-accuracies", ""]
        for name, sub in subs.items():
            lines += [f"### {name}", "", "| group | accuracy (%) |", "|---|---:|"]
            lines += [f"| {g} | {100 * a:.1f} |" for g, a in sub.items()] + [""]
    return "\n".join(lines).rstrip() + "\n"


def plot_summary(summary: Mapping[str, Any], path: Path) -> Path:
    """A bar chart of accuracy per benchmark (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["benchmarks"])
    values = [100 * summary["benchmarks"][n]["accuracy"] for n in names]
    colors = ["#4c72b0"] * len(names)
    if summary.get("average") is not None:
        names.append("average")
        values.append(100 * summary["average"])
        colors.append("#dd8452")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.6))
    bars = ax.bar(names, values, color=colors)
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100.0, math.ceil(max(values, default=0) / 10) * 10))
    ax.set_title("NoisyRollout evaluation")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_summary(output_dir: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """summary.json, summary.md and summary.png in `output_dir`."""
    output_dir = Path(output_dir)
    md = output_dir / SUMMARY_MD
    write_json(output_dir / SUMMARY_JSON, summary)
    md.write_text(render_markdown(summary), encoding="utf-8")
    return {"json": output_dir / SUMMARY_JSON, "md": md, "png": plot_summary(summary, output_dir / SUMMARY_PNG)}
