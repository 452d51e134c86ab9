"""Stage `promote`: champion moves only by the rule; every decision is recorded on the version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.timing import overhead
from pipelines.stages.common import Log, reports_for, run_stage, write_report


def promote(params: Params, log: Log = print, adhoc: bool = False, version: str | None = None) -> dict[str, Any]:
    """Move `champion` to the challenger only when its `registry.metric` beats the champion's by `registry.margin`
    (no champion yet: promote; never an unevaluated version). The decision is recorded on the version; the DAG's
    run (no `version` given) also writes it to `promotion.json`."""
    from noisyrollout.tracking import tracking_uri
    from pipelines.registry import format_state, promote as promote_version, registry_state

    reports = reports_for(params, Path(params.train.output_dir), adhoc)
    if not params.registry.enabled:
        write_report(reports, "promotion", {"enabled": False})
        log("promote: registry.enabled is false; nothing to promote")
        return {"enabled": False}
    uri = tracking_uri()
    registered = reports / "register.json"
    record = version is None     # the DAG's stage judges what `register` wrote and records the decision for DVC
    if version is None and registered.is_file():
        version = str(json.loads(registered.read_text())["version"])
    with overhead("promote: MLflow registry"):
        decision = promote_version(name=params.registry.model_name, metric=params.registry.metric,
                                   margin=params.registry.margin, version=version, tracking_uri=uri)
    if record:
        write_report(reports, "promotion", {k: decision.get(k) for k in ("candidate", "champion_before",
                                                                          "champion_after", "decision", "reason",
                                                                          "metric")})
    log(format_state(registry_state(name=params.registry.model_name, tracking_uri=uri), decision))
    return decision


if __name__ == "__main__":
    run_stage(promote)
