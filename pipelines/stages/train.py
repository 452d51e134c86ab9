"""Stage `train`: NoisyRollout GRPO on Ray + DeepSpeed learners (noisyrollout/train/driver.py), tracked in MLflow;
then greedy validation and the before/after report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.timing import overhead, record as record_time
from pipelines.stages.common import Log, reports_for, require_valid_data, run_stage, set_threads, write_json
from pipelines.stages.common import write_report


def policy_init_dir(params: Params) -> Path:
    """The policy RL starts from: the SFT model, or the base one when SFT is off."""
    return Path(params.sft.output_dir) / "model" if params.sft.enabled else Path(params.model.base)


def train(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Any]:
    """NoisyRollout RL from the SFT policy (or the base one when SFT is off); saves to `train.output_dir`, validates,
    and writes the before/after report."""
    require_valid_data(params, adhoc)
    if params.tracking.enabled:
        from noisyrollout.tracking import check_store, tracking_uri

        check_store(tracking_uri())   # an unreachable store fails here, in one line, not after training
    set_threads(params)
    init = policy_init_dir(params)

    if params.rollout.engine == "vllm":
        if params.cluster.trainer != "ray":
            raise NoisyRolloutError("rollout.engine=vllm runs inside the Ray learners: set cluster.trainer=ray")
        from noisyrollout.rollout.vllm_engine import require_vllm

        require_vllm()  # fail here, in one line, before any cluster starts
    from noisyrollout.data.loaders import load_examples
    from noisyrollout.models.load import require_model
    from noisyrollout.train.driver import train_rl
    from noisyrollout.train.validate import validate_checkpoint

    train_rows = len(load_examples(str(params.data.prepared_dir), split="train"))  # bad rows fail here, before any learner
    rl_rows = train_rows - params.rl_first_example(train_rows)
    if rl_rows < params.train.prompts_per_step:
        raise NoisyRolloutError(f"sft.fraction={params.sft.fraction} leaves {rl_rows} of the {train_rows} train examples "
                                f"for RL, fewer than train.prompts_per_step={params.train.prompts_per_step}")
    require_model(init)
    result = train_rl(params, init, log=log)
    record_time("rl steps", sum(m.time_step for m in result.metrics))   # measured inside the learner(s)
    val = validate_checkpoint(result.model_dir, params, "rl val")
    summary = {"val": val, "steps": len(result.metrics), "mlflow_run_id": result.run_id}
    if params.sft.enabled:   # the SFT policy on this run's distorted images (the SFT stage does not depend on `noise`)
        summary["sft_noisy"] = validate_checkpoint(init, params, "sft val", which=("noisy",))["noisy"]
    write_json(Path(params.train.output_dir) / "val.json", summary)
    log(f"rl: val accuracy {val['clean']['accuracy']:.3f}")
    with overhead("train: report + plots"):
        report(params, log=log, adhoc=adhoc)
    return summary


def report(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Any]:
    """The before/after table (SFT vs RL validation; clean vs noisy), the CSV of the training curves that `dvc plots`
    draws and `train.json` (training.png is drawn once, by the driver)."""
    from noisyrollout.report import before_after, training_csv
    from noisyrollout.train.validate import val_metrics

    sft_file = Path(params.sft.output_dir) / "val.json"
    sft_val = json.loads(sft_file.read_text()).get("val") if params.sft.enabled and sft_file.is_file() else None
    rl_dir = Path(params.train.output_dir)
    rl_file = rl_dir / "val.json"
    if not rl_file.is_file():
        raise NoisyRolloutError(f"{rl_file}: no RL result to report (run `noisyrollout train` first)")
    rl = json.loads(rl_file.read_text())
    if sft_val is not None and "sft_noisy" in rl:
        sft_val = {**sft_val, "noisy": rl["sft_noisy"]}
    table, summary = before_after(sft_val, rl["val"], rl_dir / "metrics.jsonl")
    log(table)
    reports = reports_for(params, rl_dir, adhoc)
    write_json(rl_dir / "report.json", summary)
    (rl_dir / "report.md").write_text(table + "\n")
    training_csv(rl_dir / "metrics.jsonl", reports / "plots" / "training.csv")
    write_report(reports, "train", {
        **val_metrics(rl["val"]), "steps": rl["steps"], "val_accuracy_gain": summary["val_accuracy_gain"],
        **{k: v for k, v in summary.items() if k.startswith("train_")}})
    log(f"report: {rl_dir / 'report.md'}, {rl_dir / 'training.png'}; metrics in {reports}")
    return summary


if __name__ == "__main__":
    run_stage(train)
