"""What a pipeline run produced: `print_summary` (what `make run` prints after `dvc repro`: the before/after table,
the evaluation and the registry state) and `summary_markdown` (the Prefect flow's artifact)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from noisyrollout.config import Params, load_params

Log = Callable[[str], None]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def summary_markdown(repo: Path, ran: Iterable[str], restored: Iterable[str] = ()) -> str:
    """The run's summary: stages run, the before/after table, the evaluation, the registry decision, the MLflow run."""
    params = load_params(repo / "params.yaml")
    reports = repo / params.reports_dir
    out_dir = repo / params.train.output_dir
    ran, restored = list(ran), list(restored)
    parts = ["# NoisyRollout pipeline run", "",
             "**Stages run:** " + (", ".join(f"`{s}`" for s in ran) if ran else "nothing changed: no stage ran"), ""]
    if restored:
        parts += ["**Restored from DVC's run cache (not rerun):** " + ", ".join(f"`{s}`" for s in restored), ""]

    table = out_dir / "report.md"
    parts += ["## Before / after (validation)", "",
              table.read_text().rstrip() if table.is_file() else f"(no before/after table yet: `{table}`)", ""]

    evaluation = _read_json(reports / "eval.json")
    parts += ["## Evaluation (`reports/eval.json`)", ""]
    if evaluation:
        parts += ["| key | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in evaluation.items())]
    else:
        parts.append("(no evaluation yet)")
    parts.append("")

    decision = _read_json(reports / "promotion.json")
    parts += ["## Registry decision (`reports/promotion.json`)", ""]
    if not params.registry.enabled:
        parts.append("registry disabled (`registry.enabled: false`)")
    elif decision:
        parts += ["| key | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in decision.items())]
    else:
        parts.append("(no promotion yet)")
    parts.append("")

    val = _read_json(out_dir / "val.json") or {}
    parts += ["## MLflow", "", f"training run id: `{val.get('mlflow_run_id')}`", ""]
    return "\n".join(parts)


def print_summary(params: Params, log: Log = print) -> None:
    reports = Path(params.reports_dir)
    table = Path(params.train.output_dir) / "report.md"
    log(table.read_text().rstrip() if table.is_file() else f"(no before/after table yet: {table})")
    evaluation = _read_json(reports / "eval.json")
    if evaluation is not None:
        splits = {k.removesuffix(".accuracy"): v for k, v in evaluation.items() if k.endswith(".accuracy")}
        log("\nevaluation (greedy): " + ", ".join(f"{k} {v:.3f}" for k, v in splits.items())
            + f"; mean_accuracy {evaluation['mean_accuracy']:.3f}")
    decision = _read_json(reports / "promotion.json")
    if not params.registry.enabled or decision is None:
        log("\nregistry: " + ("disabled (registry.enabled is false)" if not params.registry.enabled else "no promotion yet"))
        return
    from noisyrollout.tracking import tracking_uri
    from pipelines.registry import format_state, registry_state

    log("\n" + format_state(registry_state(name=params.registry.model_name, tracking_uri=tracking_uri()), decision))


CODE_ROOTS = ("noisyrollout/", "pipelines/", "eval/")


def stage_code_deps(stage: str) -> list[str]:
    """The code `deps` DVC stage `stage` must list: its module's import closure, as the fewest paths."""
    from noisyrollout.sources import covering_paths, import_closure

    return covering_paths(import_closure([f"pipelines.stages.{stage}"]))


def sync_stage_deps(dvc_yaml: Path = Path("dvc.yaml"), write: bool = False) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (code deps to add, code deps to drop)} for every stage whose code deps differ from its import closure;
    with `write`, dvc.yaml is rewritten with the right ones (inputs kept first, comments kept: ruamel round trip)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)   # dvc.yaml's own style: list items indented under their key
    doc = rt.load(dvc_yaml.read_text())
    changes: dict[str, tuple[list[str], list[str]]] = {}
    for name, stage in doc["stages"].items():
        deps = stage.get("deps", [])
        listed = [d for d in deps if str(d).startswith(CODE_ROOTS)]
        wanted = stage_code_deps(name)
        if listed != wanted:
            changes[name] = ([d for d in wanted if d not in listed], [d for d in listed if d not in wanted])
            inputs = [d for d in deps if not str(d).startswith(CODE_ROOTS)]
            deps.clear()
            deps.extend([*inputs, *wanted])
    if write and changes:
        with dvc_yaml.open("w") as fh:
            rt.dump(doc, fh)
    return changes
