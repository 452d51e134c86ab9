"""Stage `build_model`: the embedded profile's tokenizer + tiny Qwen2.5-VL; a note when model.embedded is false."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from noisyrollout.config import Params
from noisyrollout.timing import model_work
from pipelines.stages.common import Log, run_stage


def build_model(params: Params, log: Log = print, adhoc: bool = False) -> Path:
    """Train the tokenizer on the prepared train split and save a fresh tiny Qwen2.5-VL to `model.build_dir`. With
    `model.embedded: false` there is nothing to build: a note says which base is used."""
    from noisyrollout.data.loaders import load_examples
    from noisyrollout.models.tiny import create_embedded_model

    out = Path(params.model.build_dir)
    if not params.model.embedded:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "NOT_BUILT.json").write_text(json.dumps({"embedded": False, "base": params.model.base}) + "\n")
        log(f"model: using {params.model.base} (model.embedded is false; nothing to build)")
        return out
    train = load_examples(str(params.data.prepared_dir), split="train")
    texts = [params.model.system_prompt, "system user assistant You are a helpful assistant."]
    texts += list(train["problem"]) + [f"\\boxed{{{a}}}" for a in train["answer"]]
    if "solution" in train.column_names:
        texts += list(train["solution"])
    with model_work("build model"):
        model = create_embedded_model(texts, params.model.tiny, out, seed=params.seed)
    n = sum(p.numel() for p in model.parameters())
    log(f"model: tiny Qwen2.5-VL with {n / 1e6:.2f}M parameters -> {out}")
    return out


if __name__ == "__main__":
    run_stage(build_model)
