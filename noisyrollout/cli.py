"""`noisyrollout` command line: one subcommand per pipeline stage.

Every knob lives in params.yaml; `--set section.key=value` overrides it for one call (the syntax of
`dvc exp run -S`). `noisyrollout params` lists every knob with its description.
"""

from __future__ import annotations

import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file.")
SetOpt = typer.Option(None, "--set", "-S", help="Override a parameter, e.g. -S train.steps=10 (repeatable).")
RecipeOpt = typer.Option(None, "--recipe", help="A YAML file deep-merged over params.yaml (e.g. recipes/gpu-7b.yaml).")


@contextmanager
def _user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Errors a user can act on (NoisyRolloutError, and `extra`) become one `error: ...` line and exit code 2."""
    from noisyrollout.errors import NoisyRolloutError

    try:
        yield
    except (NoisyRolloutError, *extra) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _run(stage: str | Callable, params_path: Path, overrides: Optional[list[str]], recipe: Optional[Path],
         **kwargs) -> None:
    """Load the parameters and call `stage` (a function of `noisyrollout.stages` by name, or any callable) with them."""
    from noisyrollout import stages
    from noisyrollout.config import load_params
    from noisyrollout.timing import record_process

    try:
        with _user_errors():
            params = load_params(params_path, overrides, recipe)
            (getattr(stages, stage) if isinstance(stage, str) else stage)(params, **kwargs)
    finally:
        record_process(stage if isinstance(stage, str) else getattr(stage, "__name__", "stage"))


def _stage(name: str, doc: str) -> Callable:
    def command(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
        _run(name.replace("-", "_"), params, set_, recipe)
    command.__doc__ = doc
    return app.command(name)(command)


_stage("render-data", "Render the synthetic visual-reasoning corpus into data.corpus_dir (the raw data data.dvc versions).")
_stage("prepare", "Read data.train/val/test/ood into one schema -> data.prepared_dir/<split>.parquet.")
_stage("validate", "Great Expectations gate over the prepared tables; Data Docs to gate.docs_dir.")
_stage("build-model", "Train the tokenizer and build the tiny Qwen2.5-VL (embedded profile; else a no-op).")
_stage("sft", "SFT warm start on <think>...</think> \\boxed{} targets, then validate (a no-op when sft.enabled is false).")
_stage("train", "NoisyRollout GRPO from the SFT policy, then validate and write the before/after report.")
_stage("report", "Print the before/after table and plot the training curves.")
_stage("register", "Register the trained policy in the MLflow model registry (alias challenger).")


@app.command("promote")
def promote_stage(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt,
                  version: Optional[str] = typer.Option(None, help="Judge this version instead of the one `register` "
                                                        "wrote (e.g. a sweep's winner); the same rule applies.")) -> None:
    """Move the champion alias to the challenger when it beats the champion by registry.margin."""
    _run("promote", params, set_, recipe, version=version)


@app.command("evaluate")
def evaluate_stage(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """The DAG's evaluation stage: `eval` with the `eval` section of params.yaml, recording reports/eval.json."""
    _run("evaluate", params, set_, recipe, record=True)


DAG = ("prepare", "validate", "build_model", "sft", "train", "evaluate", "register", "promote")


@app.command("run")
def run_all(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """Every DAG stage in order in this process, without DVC (render-data first when data.corpus_dir is missing)."""
    from noisyrollout.config import load_params

    if not Path(load_params(params, set_, recipe).data.corpus_dir).exists():
        _run("render_data", params, set_, recipe)
    for stage in DAG:
        _run(stage, params, set_, recipe, **({"record": True} if stage == "evaluate" else {}))


@app.command("restore-data")
def restore_data(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """Make data.dvc's folder present and verified: check it, or `dvc pull` it (with a DVC remote), or render the
    embedded corpus and check the render against data.dvc's hash (a mismatch is an error, never new data)."""
    from pipelines.data import restore

    _run(restore, params, set_, recipe)


@app.command("summary")
def summary(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """What the last pipeline run produced: the before/after table, the evaluation and the registry state."""
    from pipelines.dag import print_summary

    _run(print_summary, params, set_, recipe)


@app.command("plots")
def plots(output: Path = typer.Option(Path("reports/plots.html"), help="The self-contained page to write."),
          screenshot: Optional[Path] = typer.Option(None, help="Also render the page in headless Chromium to this PNG.")) -> None:
    """Draw every plot of dvc.yaml (training curves, evaluation bars) into one page that renders offline."""
    from pipelines.plots import render_plots_page, screenshot as shoot

    with _user_errors(FileNotFoundError):
        page = render_plots_page(Path("."), output)
        typer.echo(f"plots: {page}")
        if screenshot is not None:
            errors = shoot(page, screenshot)
            typer.echo(f"plots: screenshot {screenshot}" + (f"; console errors: {errors}" if errors else ""))


@app.command("flow")
def flow(params: Path = ParamsOpt) -> None:
    """Run the DAG once as a Prefect flow (each task = `dvc repro --single-item <stage>`). Prefect's ephemeral mode
    with no server unless PREFECT_API_URL is set; ends with a markdown artifact (table, evaluation, registry)."""
    from pipelines.flow import run_once

    state = run_once(Path(params).resolve().parent)
    typer.echo(f"flow: {state}")
    if state != "COMPLETED":
        raise typer.Exit(1)


@app.command("deploy")
def deploy(params: Path = ParamsOpt,
           name: Optional[str] = typer.Option(None, help="Deployment name (default: orchestration.deployment)."),
           cron: Optional[str] = typer.Option(None, help="Cron schedule (default: orchestration.cron)."),
           interval: Optional[int] = typer.Option(None, help="Interval in seconds (replaces the cron schedule).")) -> None:
    """Serve the flow as a scheduled Prefect deployment (blocks; Ctrl-C stops it). Schedules fire only against a real
    Prefect server: `prefect server start --host 127.0.0.1` and PREFECT_API_URL=http://127.0.0.1:4200/api, or Prefect
    Cloud. One run at a time; a run where nothing changed is a no-op."""
    from noisyrollout.config import load_params
    from pipelines.flow import serve_deployment

    with _user_errors():
        cfg = load_params(params).orchestration
    if interval is not None:
        cron_value, interval_value = None, interval
    else:
        cron_value = cron or cfg.cron
        interval_value = None if cron_value else cfg.interval_seconds
    serve_deployment(Path(params).resolve().parent, name=name or cfg.deployment, cron=cron_value,
                     interval_seconds=interval_value)


@app.command("use-recipe")
def use_recipe(recipe: Path = typer.Argument(..., help="A recipe YAML, e.g. recipes/gpu-7b.yaml."),
               params: Path = ParamsOpt) -> None:
    """Merge a recipe into params.yaml in place (comments kept), so `dvc repro` / `dvc exp run` run it through the
    DAG. `git checkout params.yaml` switches back."""
    from noisyrollout.config import apply_recipe

    with _user_errors():
        changed = apply_recipe(params, recipe)
    typer.echo(f"{params}: {len(changed)} key(s) set from {recipe}: {', '.join(changed) or 'none'}")


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


@app.command("ablation")
def ablation(
    arms: str = typer.Option("grpo,gaussian,rotate,crop_fill,blur",
                             help="Comma list of arms (pipelines/ablation.py: ARMS); grpo is the baseline and required."),
    seeds: int = typer.Option(3, help="RL seeds per arm (train.seed = 0 .. seeds-1)."),
    collect: Optional[str] = typer.Option(None, help="Only re-analyse the finished experiments named <COLLECT>-<arm>-s<seed>."),
    output: Path = typer.Option(Path("ABLATION.md"), help="The report to write."),
    out_dir: Path = typer.Option(Path("ablation"), help="Where the plot and results.json go (the SFT evaluation: "
                                 "runs/ablation/sft-eval)."),
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = typer.Option(None, "--set", "-S", help="An override for every run, e.g. -S train.steps=60."),
) -> None:
    """NoisyRollout arms vs vanilla GRPO, several seeds each, from the same SFT checkpoint, through `dvc exp run
    --queue`; writes ABLATION.md (tables, 95% bootstrap CIs) and ablation/ablation.png. Run `make run` first."""
    from pipelines import ablation as runner

    command = "noisyrollout ablation" + "".join(f" {a}" for a in sys.argv[2:])
    _run(lambda p: runner.run(p, arms=[a.strip() for a in arms.split(",") if a.strip()], seeds=seeds,
                              extra=list(set_ or []), collect_prefix=collect, out_md=output, out_dir=out_dir,
                              command=command), params, set_, None)


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
