"""The pipeline's stages as plain functions of `Params`: one per CLI subcommand (and later per DVC stage).

prepare -> build-model -> sft -> train -> report. Each reads its inputs from disk and writes its outputs to
disk, so any stage can be re-run alone; `pipelines/` chains them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError

Log = Callable[[str], None]


def set_threads(params: Params) -> None:
    torch.set_num_threads(params.threads)


def load_records(source: str, split: str, params: Params, limit: int | None = None) -> list[dict]:
    from noisyrollout.data.loaders import load_records as load

    return load(source, split, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels, limit=limit)


def prepare(params: Params, log: Log = print) -> Path:
    """Render the synthetic corpus to `data.corpus_dir`."""
    from noisyrollout.data.synthetic import build_corpus, save_corpus

    cfg = params.data
    corpus = build_corpus(seed=cfg.seed, image_size=cfg.image_size, tasks=cfg.tasks, sizes=cfg.sizes)
    save_corpus(corpus, Path(cfg.corpus_dir))
    log(f"corpus: {', '.join(f'{s} {len(d)}' for s, d in corpus.items())} -> {cfg.corpus_dir}")
    return Path(cfg.corpus_dir)


def build_model(params: Params, log: Log = print) -> Path:
    """Embedded profile: train the tokenizer on the corpus and save a fresh tiny Qwen2.5-VL."""
    from noisyrollout.data.loaders import load_examples
    from noisyrollout.models.tiny import create_embedded_model

    out = Path(params.model.name_or_path)
    if not params.model.embedded:
        log(f"model: using {params.model.name_or_path} (not embedded; nothing to build)")
        return out
    train = load_examples(params.data.train, split=params.data.train_split)
    texts = [params.model.system_prompt, "system user assistant You are a helpful assistant."]
    texts += list(train["problem"]) + [f"\\boxed{{{a}}}" for a in train["answer"]]
    if "solution" in train.column_names:
        texts += list(train["solution"])
    model = create_embedded_model(texts, params.model.tiny, out, seed=params.seed)
    n = sum(p.numel() for p in model.parameters())
    log(f"model: tiny Qwen2.5-VL with {n / 1e6:.2f}M parameters -> {out}")
    return out


def _validate_model(model_dir: Path, params: Params, desc: str) -> dict[str, Any]:
    from noisyrollout.rollout.hf_engine import HFEngine
    from noisyrollout.train.validate import validate

    engine = HFEngine.from_pretrained(model_dir, system_prompt=params.model.system_prompt,
                                      min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels,
                                      batch_size=params.eval.batch_size, dtype=params.model.dtype)
    examples = load_records(params.data.val, params.data.val_split, params, params.eval.val_limit)
    kw = dict(max_new_tokens=params.eval.max_new_tokens, batch_size=params.eval.batch_size, seed=params.seed)
    clean = validate(engine, examples, desc=f"{desc} clean", **kw)
    noisy = validate(engine, examples, distortion=params.noise.distortion, strength=params.noise.alpha0,
                     desc=f"{desc} noisy", **kw)
    return {"clean": clean, "noisy": noisy}


def sft(params: Params, log: Log = print) -> dict[str, Any]:
    """SFT warm start of the base model; saves to `sft.output_dir` and validates."""
    from noisyrollout.models.load import load_model, load_processor
    from noisyrollout.train.loop import seed_everything
    from noisyrollout.train.sft import run_sft

    set_threads(params)
    seed_everything(params.seed)
    base = Path(params.model.name_or_path)
    out = Path(params.sft.output_dir)
    processor = load_processor(base, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels)
    model = load_model(base, dtype=params.model.dtype)
    examples = load_records(params.data.train, params.data.train_split, params)
    losses = run_sft(model, processor, examples, params)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    val = _validate_model(out / "model", params, "sft val")
    result = {"loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan, "val": val}
    (out / "val.json").write_text(json.dumps(result, indent=2))
    log(f"sft: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}; val accuracy {val['clean']['accuracy']:.3f}")
    return result


def policy_init_dir(params: Params) -> Path:
    return Path(params.sft.output_dir) / "model" if params.sft.enabled else Path(params.model.name_or_path)


def train(params: Params, log: Log = print) -> dict[str, Any]:
    """NoisyRollout RL from the SFT policy; saves to `train.output_dir` and validates."""
    set_threads(params)
    init = policy_init_dir(params)
    if params.rollout.engine == "vllm":
        if params.cluster.trainer != "ray":
            raise NoisyRolloutError("rollout.engine=vllm runs inside the Ray learners: set cluster.trainer=ray")
        from noisyrollout.rollout.vllm_engine import require_vllm

        require_vllm()  # fail here, in one line, before any cluster starts
    if params.cluster.trainer == "ray":
        from noisyrollout.data.loaders import load_examples
        from noisyrollout.models.load import require_model
        from noisyrollout.train.launcher import train_distributed

        load_examples(params.data.train, split=params.data.train_split)  # bad rows fail here, before any cluster
        require_model(init)
        result = train_distributed(params, init, log=log)
    else:
        from noisyrollout.train.loop import train_rl

        examples = load_records(params.data.train, params.data.train_split, params)
        result = train_rl(params, examples, init, log=log)
    val = _validate_model(result.model_dir, params, "rl val")
    summary = {"val": val, "steps": len(result.metrics)}
    (Path(params.train.output_dir) / "val.json").write_text(json.dumps(summary, indent=2))
    log(f"rl: val accuracy {val['clean']['accuracy']:.3f}")
    return summary


def report(params: Params, log: Log = print) -> dict[str, Any]:
    """The before/after table (SFT vs RL validation; clean vs noisy) and training-curve plots."""
    from noisyrollout.report import before_after, plot_training

    sft_val = json.loads((Path(params.sft.output_dir) / "val.json").read_text())["val"]
    rl_dir = Path(params.train.output_dir)
    rl_val = json.loads((rl_dir / "val.json").read_text())["val"]
    table, summary = before_after(sft_val, rl_val, rl_dir / "metrics.jsonl")
    log(table)
    (rl_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (rl_dir / "report.md").write_text(table + "\n")
    plot_training(rl_dir / "metrics.jsonl", rl_dir / "training.png")
    log(f"report: {rl_dir / 'report.md'}, {rl_dir / 'training.png'}")
    return summary


def evaluate(params: Params, log: Log = print, predictions_from: Path | None = None) -> dict[str, Any]:
    """Benchmark a checkpoint (`eval/`): the six paper benchmarks found under `eval.data_dir` and the embedded
    test / out-of-domain splits. With `predictions_from`, re-grade saved predictions without a model."""
    from eval.judge import Judge
    from eval.report import render_markdown
    from eval.runner import regrade, run_eval
    from noisyrollout.rollout.engine import SamplingParams
    from noisyrollout.rollout.hf_engine import HFEngine

    cfg = params.eval
    judge = Judge.from_env()
    if predictions_from is not None:
        summary = regrade(Path(predictions_from), Path(cfg.output_dir), judge=judge)
    else:
        set_threads(params)
        model_dir = Path(cfg.model) if cfg.model is not None else Path(params.train.output_dir) / "model"
        if cfg.model is None and not (model_dir / "config.json").exists():
            raise NoisyRolloutError(f"{model_dir}: no model to evaluate (train first, or set eval.model / --model)")
        if cfg.engine == "vllm":
            from noisyrollout.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine.from_pretrained(model_dir, system_prompt=params.model.system_prompt,
                                                dtype=params.model.dtype, seed=params.seed,
                                                min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        else:
            engine = HFEngine.from_pretrained(model_dir, system_prompt=params.model.system_prompt,
                                              batch_size=cfg.batch_size, dtype=params.model.dtype)
        sampling = SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
        summary = run_eval(engine, data_dir=cfg.data_dir, corpus_dir=Path(params.data.corpus_dir), datasets=cfg.datasets,
                           output_dir=Path(cfg.output_dir), sampling=sampling, judge=judge, limit=cfg.limit,
                           batch_size=cfg.batch_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                           config={"model": str(model_dir), "system_prompt": params.model.system_prompt})
    log(render_markdown(summary))
    log(f"eval: results in {cfg.output_dir}")
    return summary
