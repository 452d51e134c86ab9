"""Stage `evaluate`: greedy benchmark evaluation (eval/) of the RL policy on the prepared test / ood splits and the
paper benchmarks under eval.data_dir; `noisyrollout eval` is the same function outside the DAG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.timing import model_work
from pipelines.stages.common import Log, reports_for, run_stage, set_threads, write_report


def evaluate(params: Params, log: Log = print, adhoc: bool = False, predictions_from: Path | None = None,
             record: bool = True) -> dict[str, Any]:
    """Benchmark a checkpoint: the six paper benchmarks found under `eval.data_dir` and the prepared test /
    out-of-domain splits (`embedded_test`, `embedded_ood`). With `predictions_from`, re-grade saved predictions
    without a model. `record` also writes `eval.json` (the metrics `dvc metrics show` reads and `promote` compares),
    `eval_samples.csv` and `plots/eval.csv`."""
    from eval.judge import Judge
    from eval.report import render_markdown
    from eval.runner import regrade, run_eval
    from noisyrollout.rollout.engine import SamplingParams

    cfg = params.eval
    judge = Judge.from_env(max_retries=cfg.judge_max_retries, max_workers=cfg.judge_max_workers,   # endpoint, key:
                           timeout_s=cfg.judge_timeout_s, max_response_chars=cfg.judge_max_response_chars)  # env only
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
            from noisyrollout.rollout.hf_engine import HFEngine

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

        reports = reports_for(params, Path(cfg.output_dir), adhoc)
        results = load_results(Path(cfg.output_dir), summary["benchmarks"])
        metrics = {**eval_metrics(summary), **shift_metrics(results.get("embedded_ood", []), prefix="embedded_ood.")}
        write_report(reports, "eval", metrics)
        write_samples_csv(results, reports / "eval_samples.csv")
        plots = reports / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        rows = [f"{name},{row['accuracy']:.6f}" for name, row in summary["benchmarks"].items()]
        (plots / "eval.csv").write_text("\n".join(["benchmark,accuracy", *rows]) + "\n")
        log(f"eval: mean accuracy over {len(summary['benchmarks'])} evaluated split(s) {metrics['mean_accuracy']:.4f}"
            f" ({reports / 'eval.json'})")
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


if __name__ == "__main__":
    run_stage(evaluate)
