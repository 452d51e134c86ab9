"""`noisyrollout` command line: one subcommand per pipeline stage.

Every knob lives in params.yaml; `--set section.key=value` overrides it for one call (the syntax of
`dvc exp run -S`). `noisyrollout params` lists every knob with its description.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file.")
SetOpt = typer.Option(None, "--set", "-S", help="Override a parameter, e.g. -S train.steps=10 (repeatable).")
RecipeOpt = typer.Option(None, "--recipe", help="A YAML file deep-merged over params.yaml (e.g. recipes/gpu-7b.yaml).")


def _run(stage: str, params_path: Path, overrides: Optional[list[str]], recipe: Optional[Path], **kwargs) -> None:
    from noisyrollout import stages
    from noisyrollout.config import load_params
    from noisyrollout.errors import NoisyRolloutError

    try:
        params = load_params(params_path, overrides, recipe)
        getattr(stages, stage)(params, **kwargs)
    except NoisyRolloutError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _stage(name: str, doc: str) -> Callable:
    def command(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
        _run(name.replace("-", "_"), params, set_, recipe)
    command.__doc__ = doc
    return app.command(name)(command)


_stage("prepare", "Render the synthetic visual-reasoning corpus (train/val/test/ood parquet).")
_stage("build-model", "Train the tokenizer and build the tiny Qwen2.5-VL (embedded profile).")
_stage("sft", "SFT warm start on <think>...</think> \\boxed{} targets, then validate.")
_stage("train", "NoisyRollout GRPO from the SFT policy, then validate.")
_stage("report", "Print the before/after table and plot the training curves.")


@app.command("run")
def run_all(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """All stages in order: prepare, build-model, sft, train, report."""
    for stage in ("prepare", "build_model", "sft", "train", "report"):
        _run(stage, params, set_, recipe)


@app.command("eval")
def eval_command(
    model: Optional[Path] = typer.Option(None, help="Checkpoint folder (HF format). Default: eval.model, else the RL policy."),
    data_dir: Optional[Path] = typer.Option(None, help="The authors' eval data unpacked (geometry3k/, wemath/, mathvista/, ...)."),
    datasets: Optional[str] = typer.Option(None, help="Comma list: geo3k,wemath,mathvista,mathverse,mathvision,hallubench,"
                                                      "embedded_test,embedded_ood; or `all` (every one found)."),
    output_dir: Optional[Path] = typer.Option(None, help="Where <benchmark>.json, summary.json/.md/.png go."),
    engine: Optional[str] = typer.Option(None, help="hf (transformers, CPU) or vllm (GPU; pip install '.[gpu]')."),
    predictions_from: Optional[Path] = typer.Option(None, help="Re-grade the predictions saved in this output dir; no model is loaded."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    min_pixels: Optional[int] = typer.Option(None),
    max_pixels: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, help="Only the first N samples of each benchmark."),
    params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt,
) -> None:
    """Score a checkpoint on the benchmarks (rule grading; optional OpenAI-compatible judge from
    NOISYROLLOUT_JUDGE_BASE_URL / _MODEL / _API_KEY). Flags override the `eval` section of params.yaml."""
    flags = {"model": model, "engine": engine, "data_dir": data_dir, "datasets": datasets, "output_dir": output_dir,
             "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "min_pixels": min_pixels,
             "max_pixels": max_pixels, "batch_size": batch_size, "limit": limit}
    overrides = list(set_ or []) + [f"eval.{k}={v}" for k, v in flags.items() if v is not None]
    _run("evaluate", params, overrides, recipe, predictions_from=predictions_from)


@app.command("params")
def show_params() -> None:
    """List every parameter with its default and description."""
    from noisyrollout.config import Params

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            else:
                typer.echo(f"{prefix}{name} = {field.get_default(call_default_factory=True)!r}\n    {field.description or ''}")
    walk(Params, "")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
