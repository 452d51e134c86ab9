"""What `make run` prints after `dvc repro`: the before/after table, the evaluation and the registry state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from noisyrollout.config import Params

Log = Callable[[str], None]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def print_summary(params: Params, log: Log = print) -> None:
    reports = Path(params.reports_dir)
    table = Path(params.train.output_dir) / "report.md"
    log(table.read_text().rstrip() if table.is_file() else f"(no before/after table yet: {table})")
    evaluation = _read(reports / "eval.json")
    if evaluation is not None:
        splits = {k.removesuffix(".accuracy"): v for k, v in evaluation.items() if k.endswith(".accuracy")}
        log("\nevaluation (greedy): " + ", ".join(f"{k} {v:.3f}" for k, v in splits.items())
            + f"; mean_accuracy {evaluation['mean_accuracy']:.3f}")
    decision = _read(reports / "promotion.json")
    if not params.registry.enabled or decision is None:
        log("\nregistry: " + ("disabled (registry.enabled is false)" if not params.registry.enabled else "no promotion yet"))
        return
    from noisyrollout.tracking import tracking_uri
    from pipelines.registry import format_state, registry_state

    log("\n" + format_state(registry_state(name=params.registry.model_name, tracking_uri=tracking_uri()), decision))
