"""The pipeline's stages as plain functions of `Params`: one per CLI subcommand (and later per DVC stage).

prepare -> build-model -> sft -> train -> report. Each reads its inputs from disk and writes its outputs to
disk, so any stage can be re-run alone; `pipelines/` chains them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

from noisyrollout.config import Params
from noisyrollout.errors import DataError, NoisyRolloutError
from noisyrollout.timing import model_work, overhead, record as record_time

Log = Callable[[str], None]


def set_threads(params: Params) -> None:
    import torch   # here, not at the top: the stages without a model (prepare, validate, register, promote) skip it

    torch.set_num_threads(params.threads)


def load_records(source: str, split: str, params: Params, limit: int | None = None) -> list[dict]:
    from noisyrollout.data.loaders import load_records as load

    return load(source, split, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels, limit=limit)


def render_data(params: Params, log: Log = print) -> Path:
    """Render the synthetic corpus to `data.corpus_dir` (the raw data that data.dvc versions)."""
    from noisyrollout.data.synthetic import build_corpus, save_corpus

    cfg = params.data
    corpus = build_corpus(seed=cfg.seed, image_size=cfg.image_size, tasks=cfg.tasks, sizes=cfg.sizes)
    save_corpus(corpus, Path(cfg.corpus_dir))
    log(f"corpus: {', '.join(f'{s} {len(d)}' for s, d in corpus.items())} -> {cfg.corpus_dir}")
    return Path(cfg.corpus_dir)


def prepared(params: Params) -> str:
    """The folder of prepared tables (`<split>.parquet`) every stage after `prepare` reads."""
    return str(params.data.prepared_dir)


def prepare(params: Params, log: Log = print) -> dict[str, Path]:
    """Read each source split (`data.train` / `val` / `test` / `ood`: hub id, parquet, jsonl or folder) into one schema
    (`id`, `images`, `problem`, `answer`, ...) and write `data.prepared_dir/<split>.parquet`. Rows are not judged
    here: the `validate` stage (Great Expectations) is the gate, so a bad row reaches it and is named there."""
    from noisyrollout.data.loaders import load_examples

    out = Path(params.data.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, (source, source_split) in params.data.sources().items():
        if Path(source).parts[:1] == ("data",) and not Path(source).exists():
            raise DataError(f"{source}: missing (data/ is versioned by data.dvc); restore it with "
                            f"`noisyrollout restore-data` (renders the embedded corpus) or `dvc pull data.dvc`")
        ds = load_examples(source, split=source_split, validate=False)
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [f"{split}-{i:06d}" for i in range(len(ds))])
        path = out / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        ds.to_parquet(str(tmp))
        tmp.replace(path)
        written[split] = path
        log(f"prepare: {split} <- {source} ({source_split}): {len(ds)} rows -> {path}")
    for stale in out.glob("*.parquet"):   # a split dropped from params must not linger for later stages
        if stale.stem not in written:
            stale.unlink()
    return written


def validate(params: Params, log: Log = print) -> dict[str, Any]:
    """The Great Expectations gate over the prepared tables (`pipelines/validate.py`): required columns, non-empty
    answers, decodable images within the pixel bounds, unique ids, one `<image>` placeholder per image. Writes Data
    Docs to `gate.docs_dir` and `reports/gate.json`; on failure prints which expectation failed on which rows and
    stops, so nothing downstream runs on that data."""
    from pipelines.validate import run_gate

    cfg = params.gate
    splits = [s for s in cfg.splits if s in params.data.sources()]
    with overhead("validate: GX gate + Data Docs"):
        result = run_gate(Path(params.data.prepared_dir), splits, docs_dir=Path(cfg.docs_dir),
                          min_image_pixels=cfg.min_image_pixels, max_image_pixels=cfg.max_image_pixels)
    write_report(params, "gate", result.to_dict())
    log(result.summary())
    if result.docs_index is not None:
        log(f"validate: Data Docs at {result.docs_index}")
    if not result.success:
        failed = [s for s, r in result.splits.items() if not r["success"]]
        raise DataError(f"data validation failed on {', '.join(failed)} (details above; Data Docs in {cfg.docs_dir}); "
                        f"nothing downstream runs on this data")
    return result.to_dict()


def build_model(params: Params, log: Log = print) -> Path:
    """Embedded profile: train the tokenizer on the prepared train split and save a fresh tiny Qwen2.5-VL to
    `model.build_dir`. With `model.embedded: false` there is nothing to build: a note says which base is used."""
    from noisyrollout.data.loaders import load_examples
    from noisyrollout.models.tiny import create_embedded_model

    out = Path(params.model.build_dir)
    if not params.model.embedded:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "NOT_BUILT.json").write_text(json.dumps({"embedded": False, "base": params.model.base}) + "\n")
        log(f"model: using {params.model.base} (model.embedded is false; nothing to build)")
        return out
    train = load_examples(prepared(params), split="train")
    texts = [params.model.system_prompt, "system user assistant You are a helpful assistant."]
    texts += list(train["problem"]) + [f"\\boxed{{{a}}}" for a in train["answer"]]
    if "solution" in train.column_names:
        texts += list(train["solution"])
    with model_work("build model"):
        model = create_embedded_model(texts, params.model.tiny, out, seed=params.seed)
    n = sum(p.numel() for p in model.parameters())
    log(f"model: tiny Qwen2.5-VL with {n / 1e6:.2f}M parameters -> {out}")
    return out


def validate_model(model_dir: Path, params: Params, desc: str, which: tuple[str, ...] = ("clean", "noisy")) -> dict[str, Any]:
    """Greedy validation of a checkpoint: `clean` on the val images, `noisy` on them distorted by `noise.distortion` at
    `noise.alpha0` (full strength)."""
    from noisyrollout.rollout.hf_engine import HFEngine
    from noisyrollout.train.validate import validate

    engine = HFEngine.from_pretrained(model_dir, system_prompt=params.model.system_prompt,
                                      min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels,
                                      batch_size=params.val.batch_size, dtype=params.model.dtype)
    examples = load_records(prepared(params), "val", params, params.val.limit)
    kw = dict(max_new_tokens=params.val.max_new_tokens, batch_size=params.val.batch_size, seed=params.seed)
    out = {}
    with model_work(f"{desc} decode"):
        if "clean" in which:
            out["clean"] = validate(engine, examples, desc=f"{desc} clean", **kw)
        if "noisy" in which:
            out["noisy"] = validate(engine, examples, distortion=params.noise.distortion, strength=params.noise.alpha0,
                                    desc=f"{desc} noisy", **kw)
    return out


def require_valid_data(params: Params) -> None:
    """Training never starts on data the gate failed: refuse when the last `validate` recorded a failure."""
    record = Path(params.reports_dir) / "gate.json"
    if record.is_file() and not json.loads(record.read_text()).get("success", False):
        raise NoisyRolloutError(f"the prepared data failed validation ({record}); fix the data, then run "
                                f"`noisyrollout prepare` and `noisyrollout validate` (or `dvc repro`)")


def write_report(params: Params, name: str, payload: dict[str, Any]) -> Path:
    """`reports/<name>.json`: a small metrics file that DVC reads (`dvc metrics show`) and git keeps."""
    path = Path(params.reports_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def _val_metrics(val: dict[str, Any]) -> dict[str, float]:
    distorted = {"val_accuracy_distorted": val["noisy"]["accuracy"]} if "noisy" in val else {}
    return {"val_accuracy": val["clean"]["accuracy"], **distorted, "val_format": val["clean"]["format"],
            **{f"val_{k.replace('/', '_')}": v for k, v in val["clean"].items() if k.startswith("accuracy/")}}


def sft(params: Params, log: Log = print) -> dict[str, Any]:
    """SFT warm start of the base model; saves to `sft.output_dir` and validates. With `sft.enabled: false` nothing
    is trained (the base policy starts RL) and `sft.output_dir` only records that."""
    from noisyrollout.models.load import load_model, load_processor
    from noisyrollout.train.batching import seed_everything
    from noisyrollout.train.sft import run_sft

    out = Path(params.sft.output_dir)
    if not params.sft.enabled:
        shutil.rmtree(out / "model", ignore_errors=True)
        (out / "model").mkdir(parents=True)
        (out / "model" / "NOT_TRAINED.json").write_text(json.dumps({"sft.enabled": False, "base": params.model.base}) + "\n")
        (out / "val.json").write_text(json.dumps({"enabled": False}) + "\n")
        write_report(params, "sft", {"enabled": False})
        log(f"sft: disabled (sft.enabled is false); RL starts from {params.model.base}")
        return {"enabled": False}
    require_valid_data(params)
    set_threads(params)
    seed_everything(params.seed)
    base = params.model.base
    processor = load_processor(base, min_pixels=params.data.min_pixels, max_pixels=params.data.max_pixels)
    model = load_model(base, dtype=params.model.dtype)
    examples = load_records(prepared(params), "train", params)
    examples = examples[:params.sft_examples(len(examples))]   # the rest are RL's prompts (Learner.setup)
    with model_work("sft steps"):
        losses = run_sft(model, processor, examples, params)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    val = validate_model(out / "model", params, "sft val", which=("clean",))   # distorted: by `train`, for its noise
    result = {"loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan, "val": val}
    (out / "val.json").write_text(json.dumps(result, indent=2))
    write_report(params, "sft", {"enabled": True, "loss_first": result["loss_first"], "loss_last": result["loss_last"],
                                 **_val_metrics(val)})
    log(f"sft: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}; val accuracy {val['clean']['accuracy']:.3f}")
    return result


def policy_init_dir(params: Params) -> Path:
    return Path(params.sft.output_dir) / "model" if params.sft.enabled else Path(params.model.base)


def train(params: Params, log: Log = print) -> dict[str, Any]:
    """NoisyRollout RL from the SFT policy (or the base one when SFT is off); saves to `train.output_dir`, validates,
    and writes the before/after report."""
    require_valid_data(params)
    if params.tracking.enabled:
        from noisyrollout.tracking import tracking_uri
        from pipelines.registry import check_store

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

    train_rows = len(load_examples(prepared(params), split="train"))  # bad rows fail here, before any learner starts
    rl_rows = train_rows - params.rl_first_example(train_rows)
    if rl_rows < params.train.prompts_per_step:
        raise NoisyRolloutError(f"sft.fraction={params.sft.fraction} leaves {rl_rows} of the {train_rows} train examples "
                                f"for RL, fewer than train.prompts_per_step={params.train.prompts_per_step}")
    require_model(init)
    result = train_rl(params, init, log=log)
    record_time("rl steps", sum(m.time_step for m in result.metrics))   # measured inside the learner(s)
    val = validate_model(result.model_dir, params, "rl val")
    summary = {"val": val, "steps": len(result.metrics), "mlflow_run_id": result.run_id}
    if params.sft.enabled:   # the SFT policy on this run's distorted images (the SFT stage does not depend on `noise`)
        summary["sft_noisy"] = validate_model(init, params, "sft val", which=("noisy",))["noisy"]
    (Path(params.train.output_dir) / "val.json").write_text(json.dumps(summary, indent=2))
    log(f"rl: val accuracy {val['clean']['accuracy']:.3f}")
    with overhead("train: report + plots"):
        report(params, log=log)
    return summary


def report(params: Params, log: Log = print) -> dict[str, Any]:
    """The before/after table (SFT vs RL validation; clean vs noisy), training-curve plots (PNG, and the CSV that
    `dvc plots` draws) and `reports/train.json`."""
    from noisyrollout.report import before_after, plot_training, training_csv

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
    (rl_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (rl_dir / "report.md").write_text(table + "\n")
    plot_training(rl_dir / "metrics.jsonl", rl_dir / "training.png")
    training_csv(rl_dir / "metrics.jsonl", Path(params.reports_dir) / "plots" / "training.csv")
    write_report(params, "train", {
        **_val_metrics(rl["val"]), "steps": rl["steps"], "val_accuracy_gain": summary["val_accuracy_gain"],
        **{k: v for k, v in summary.items() if k.startswith("train_")}})
    log(f"report: {rl_dir / 'report.md'}, {rl_dir / 'training.png'}")
    return summary


def evaluate(params: Params, log: Log = print, predictions_from: Path | None = None, record: bool = False) -> dict[str, Any]:
    """Benchmark a checkpoint (`eval/`): the six paper benchmarks found under `eval.data_dir` and the prepared
    test / out-of-domain splits (`embedded_test`, `embedded_ood`). With `predictions_from`, re-grade saved
    predictions without a model. `record` (the DAG's `evaluate` stage) also writes `reports/eval.json` (the metrics
    `dvc metrics show` reads and `promote` compares) and `reports/plots/eval.csv`."""
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
        with model_work("evaluate decode"):
            summary = run_eval(engine, data_dir=cfg.data_dir, corpus_dir=Path(params.data.prepared_dir),
                               datasets=cfg.datasets, output_dir=Path(cfg.output_dir), sampling=sampling, judge=judge,
                               limit=cfg.limit, batch_size=cfg.batch_size, min_pixels=cfg.min_pixels,
                               max_pixels=cfg.max_pixels,
                               config={"model": str(model_dir), "system_prompt": params.model.system_prompt})
    log(render_markdown(summary))
    log(f"eval: results in {cfg.output_dir}")
    if record:
        from eval.report import load_results, shift_metrics, write_samples_csv

        results = load_results(Path(cfg.output_dir), summary["benchmarks"])
        metrics = {**eval_metrics(summary), **shift_metrics(results.get("embedded_ood", []), prefix="embedded_ood.")}
        write_report(params, "eval", metrics)
        write_samples_csv(results, Path(params.reports_dir) / "eval_samples.csv")
        plots = Path(params.reports_dir) / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        rows = [f"{name},{row['accuracy']:.6f}" for name, row in summary["benchmarks"].items()]
        (plots / "eval.csv").write_text("\n".join(["benchmark,accuracy", *rows]) + "\n")
        log(f"eval: mean accuracy over {len(summary['benchmarks'])} evaluated split(s) {metrics['mean_accuracy']:.4f}")
    return summary


def eval_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics of an evaluation: `mean_accuracy` over every evaluated split, and per split
    `<name>.accuracy` / `<name>.n_scored` (the keys `promote` can compare)."""
    benches = summary["benchmarks"]
    out: dict[str, Any] = {"mean_accuracy": sum(r["accuracy"] for r in benches.values()) / len(benches)}
    for name, row in benches.items():
        out[f"{name}.accuracy"] = row["accuracy"]
        out[f"{name}.n_scored"] = row["n_scored"]
    if summary.get("average") is not None:
        out["paper_average"] = summary["average"]
    return out


def _git(*args: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _data_hashes() -> dict[str, str]:
    """The versions of the data this model saw: data.dvc's hash, and the prepared tables' hash from dvc.lock."""
    import yaml

    out: dict[str, str] = {}
    if Path("data.dvc").is_file():
        spec = yaml.safe_load(Path("data.dvc").read_text()) or {}
        for o in spec.get("outs", []):
            out[f"data.{o.get('path')}"] = str(o.get("md5"))
    if Path("dvc.lock").is_file():
        lock = yaml.safe_load(Path("dvc.lock").read_text()) or {}
        for o in lock.get("stages", {}).get("prepare", {}).get("outs", []):
            out[f"prepared.{o.get('path')}"] = str(o.get("md5"))
    return out


KEY_PARAMS = ("seed", "model.base", "rollout.n_clean", "rollout.n_noisy", "noise.distortion", "noise.alpha0",
              "noise.anneal", "train.lr", "train.steps", "train.prompts_per_step", "train.estimator", "sft.enabled")


def _key_params(params: Params) -> dict[str, str]:
    out = {}
    for key in KEY_PARAMS:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = str(node)
    return out


def _model_card(params: Params, metrics: dict[str, Any], tags: dict[str, str]) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k.endswith("accuracy"))
    knobs = "\n".join(f"| {k} | {v} |" for k, v in _key_params(params).items())
    return (f"# {params.registry.model_name}\n\n"
            f"NoisyRollout GRPO policy (arXiv 2504.13055): each prompt's group mixes {params.rollout.n_clean} clean and "
            f"{params.rollout.n_noisy} distorted-image rollouts ({params.noise.distortion}, alpha0 {params.noise.alpha0}, "
            f"{params.noise.anneal} annealing); the update scores every response on the clean image.\n\n"
            f"Base policy: `{params.model.base}`; trained on `{params.data.train}` ({params.data.train_split}).\n"
            f"Code: git {tags.get('git_commit', 'unknown')}; data: {tags.get('data_hashes', 'unknown')}.\n\n"
            f"## Evaluation (greedy)\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            f"## Key parameters\n\n| parameter | value |\n|---|---|\n{knobs}\n\n"
            f"## Load\n\n```python\nimport mlflow\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
            f"mlflow.set_tracking_uri('sqlite:///mlruns.db')  # or your MLFLOW_TRACKING_URI\n"
            f"path = mlflow.artifacts.download_artifacts('models:/{params.registry.model_name}@champion')\n"
            f"model = AutoModelForImageTextToText.from_pretrained(path)\nprocessor = AutoProcessor.from_pretrained(path)\n```\n")


def register(params: Params, log: Log = print) -> dict[str, Any]:
    """Register the trained policy as a new version of `registry.model_name` (alias `challenger`), tagged with the
    git commit, the data hashes, key parameters and the evaluation metrics, with a model card as description."""
    import os

    from pipelines.registry import register as register_version
    from noisyrollout.tracking import tracking_uri

    if not params.registry.enabled:
        write_report(params, "register", {"enabled": False})
        log("register: registry.enabled is false; nothing registered")
        return {"enabled": False}
    rl_dir = Path(params.train.output_dir)
    eval_file = Path(params.reports_dir) / "eval.json"
    if not (rl_dir / "model" / "config.json").is_file():
        raise NoisyRolloutError(f"{rl_dir / 'model'}: no trained model to register (run `noisyrollout train` first)")
    metrics = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    run_id = json.loads((rl_dir / "val.json").read_text()).get("mlflow_run_id") if (rl_dir / "val.json").is_file() else None
    uri = tracking_uri()
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    hashes = _data_hashes()
    tags = {"git_commit": f"{commit}{'-dirty' if dirty else ''}" if commit else "unknown",
            "data_hashes": ", ".join(f"{k}={v}" for k, v in hashes.items()) or "unknown",
            **{f"data_hash.{k}": v for k, v in hashes.items()},
            **{f"param.{k}": v for k, v in _key_params(params).items()}}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with overhead("register: MLflow registry"):
        info = register_version(name=params.registry.model_name, model_dir=rl_dir / "model", run_id=run_id,
                                experiment=params.tracking.experiment, eval_metrics=numeric, tags=tags,
                                description=_model_card(params, numeric, tags), tracking_uri=uri,
                                artifact_root=params.tracking.artifact_root)
    write_report(params, "register", {"name": info["name"], "version": int(info["version"]), "run_id": info["run_id"]})
    log(f"register: {info['name']} version {info['version']} (alias challenger) from {info['source']}")
    return info


def promote(params: Params, log: Log = print, version: str | None = None) -> dict[str, Any]:
    """Move `champion` to the challenger only when its `registry.metric` beats the champion's by `registry.margin`
    (no champion yet: promote; never an unevaluated version). The decision is recorded on the version."""
    from pipelines.registry import format_state, promote as promote_version, registry_state
    from noisyrollout.tracking import tracking_uri

    if not params.registry.enabled:
        write_report(params, "promotion", {"enabled": False})
        log("promote: registry.enabled is false; nothing to promote")
        return {"enabled": False}
    uri = tracking_uri()
    registered = Path(params.reports_dir) / "register.json"
    record = version is None     # the DAG's stage judges what `register` wrote and records the decision for DVC
    if version is None and registered.is_file():
        version = str(json.loads(registered.read_text())["version"])
    with overhead("promote: MLflow registry"):
        decision = promote_version(name=params.registry.model_name, metric=params.registry.metric,
                                   margin=params.registry.margin, version=version, tracking_uri=uri)
    if record:
        write_report(params, "promotion", {k: decision.get(k) for k in ("candidate", "champion_before", "champion_after",
                                                                        "decision", "reason", "metric")})
    log(format_state(registry_state(name=params.registry.model_name, tracking_uri=uri), decision))
    return decision
