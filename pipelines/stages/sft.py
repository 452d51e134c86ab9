"""Stage `sft`: the warm start (the Instruct checkpoint's role); a note when sft.enabled is false."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.timing import model_work
from pipelines.stages.common import Log, reports_for, require_valid_data, run_stage, set_threads
from pipelines.stages.common import write_json, write_report


def sft(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Any]:
    """SFT of the base model on the first `sft.fraction` of the train split; saves to `sft.output_dir` and validates.
    With `sft.enabled: false` nothing is trained (the base policy starts RL) and `sft.output_dir` only records that."""
    from noisyrollout.data.loaders import load_records
    from noisyrollout.models.load import load_model, load_processor
    from noisyrollout.train.batching import seed_everything
    from noisyrollout.train.sft import run_sft
    from noisyrollout.train.validate import val_metrics, validate_checkpoint

    out = Path(params.sft.output_dir)
    reports = reports_for(params, out, adhoc)
    if not params.sft.enabled:
        shutil.rmtree(out / "model", ignore_errors=True)
        (out / "model").mkdir(parents=True)
        (out / "model" / "NOT_TRAINED.json").write_text(json.dumps({"sft.enabled": False, "base": params.model.base}) + "\n")
        (out / "val.json").write_text(json.dumps({"enabled": False}) + "\n")
        write_report(reports, "sft", {"enabled": False})
        log(f"sft: disabled (sft.enabled is false); RL starts from {params.model.base}")
        return {"enabled": False}
    require_valid_data(params, adhoc)
    set_threads(params)
    seed_everything(params.seed)
    base = params.model.base
    processor = load_processor(base, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels)
    model = load_model(base, dtype=params.model.dtype)
    examples = load_records(str(params.data.prepared_dir), "train", min_pixels=params.data.min_pixels,
                            max_pixels=params.data.max_pixels)
    examples = examples[:params.sft_examples(len(examples))]   # the rest are RL's prompts (Learner.setup)
    with model_work("sft steps"):
        losses = run_sft(model, processor, examples, params)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    val = validate_checkpoint(out / "model", params, "sft val", which=("clean",))   # distorted: by `train`, for its noise
    result = {"loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan, "val": val}
    write_json(out / "val.json", result)
    write_report(reports, "sft", {"enabled": True, "loss_first": result["loss_first"], "loss_last": result["loss_last"],
                                  **val_metrics(val)})
    log(f"sft: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}; val accuracy {val['clean']['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    run_stage(sft)
