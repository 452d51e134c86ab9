"""Stage `register`: a new MLflow model version of the trained policy (alias challenger), with tags + model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.timing import overhead
from pipelines.stages.common import Log, reports_for, run_stage, write_report


def register(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Any]:
    """Register the trained policy as a new version of `registry.model_name` (alias `challenger`), tagged with the
    git commit, the data hashes, key parameters and the evaluation metrics, with a model card as description."""
    from noisyrollout.tracking import tracking_uri
    from pipelines.registry import model_card, register as register_version, version_tags

    rl_dir = Path(params.train.output_dir)
    reports = reports_for(params, rl_dir, adhoc)
    if not params.registry.enabled:
        write_report(reports, "register", {"enabled": False})
        log("register: registry.enabled is false; nothing registered")
        return {"enabled": False}
    eval_file = reports_for(params, Path(params.eval.output_dir), adhoc) / "eval.json"   # the evaluation of this run
    if not (rl_dir / "model" / "config.json").is_file():
        raise NoisyRolloutError(f"{rl_dir / 'model'}: no trained model to register (run `noisyrollout train` first)")
    metrics = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    run_id = json.loads((rl_dir / "val.json").read_text()).get("mlflow_run_id") if (rl_dir / "val.json").is_file() else None
    tags = version_tags(params, experiment=os.environ.get("DVC_EXP_NAME"))
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    policy = {"system_prompt": params.model.system_prompt, "max_new_tokens": params.eval.max_new_tokens,
              "dtype": params.model.dtype, "example": input_example(params)}
    with overhead("register: MLflow registry"):
        info = register_version(name=params.registry.model_name, model_dir=rl_dir / "model", run_id=run_id,
                                experiment=params.tracking.experiment, eval_metrics=numeric, tags=tags,
                                description=model_card(params, numeric, tags), tracking_uri=tracking_uri(),
                                artifact_root=params.tracking.artifact_root, policy=policy)
    write_report(reports, "register", {"name": info["name"], "version": int(info["version"]), "run_id": info["run_id"]})
    log(f"register: {info['name']} version {info['version']} (alias challenger) from {info['source']}")
    return info


def input_example(params: Params) -> tuple[Any, str] | None:
    """The servable model's input example: the first validation image and its question (None without a val split)."""
    from noisyrollout.data.loaders import load_records

    try:
        (first,) = load_records(str(params.data.prepared_dir), "val", min_pixels=params.data.min_pixels,
                                max_pixels=params.data.max_pixels, limit=1)
    except (NoisyRolloutError, OSError, ValueError):
        return None
    return first["image"], first["problem"]


if __name__ == "__main__":
    run_stage(register)
