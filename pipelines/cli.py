"""`noisyrollout` command line: one subcommand per pipeline stage.

Every knob lives in params.yaml; `--set section.key=value` overrides it for one call (the syntax of
`dvc exp run -S`). `noisyrollout params` lists every knob with its description.
"""

from __future__ import annotations

import importlib
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


def _stage_function(name: str) -> Callable:
    """The function of DAG stage `name` (pipelines/stages/<name>.py), imported only when that stage runs."""
    return getattr(importlib.import_module(f"pipelines.stages.{name}"), name)


def _run(stage: Callable, params_path: Path, overrides: Optional[list[str]], recipe: Optional[Path], **kwargs) -> None:
    """`stage(params, adhoc=..., **kwargs)` with the parameters loaded; a run with overrides or a recipe is ad hoc
    (its reports go beside its outputs, never over the DAG's: pipelines/stages/common.py)."""
    from pipelines.stages.common import run_stage

    run_stage(stage, params_path, overrides, recipe, **kwargs)


def _stage(name: str, doc: str, function: str | None = None) -> Callable:
    def command(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
        module = name.replace("-", "_")
        stage = _stage_function(module) if function is None else getattr(
            importlib.import_module(f"pipelines.stages.{module}"), function)
        _run(stage, params, set_, recipe)
    command.__doc__ = doc
    return app.command(name if function is None else function)(command)


def _plain(function: Callable) -> Callable:
    """A function of `params` (and `log`) as a stage: it writes no reports, so `adhoc` does not concern it."""
    def stage(params, adhoc: bool = False, **kwargs):
        return function(params, **kwargs)
    stage.__name__ = function.__name__
    return stage


@app.command("render-data")
def render_data(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """Render the synthetic visual-reasoning corpus into data.corpus_dir (the raw data data.dvc versions)."""
    from pipelines.data import render

    _run(_plain(render), params, set_, recipe)


_stage("prepare", "Read data.train/val/test/ood into one schema -> data.prepared_dir/<split>.parquet.")
_stage("validate", "Great Expectations gate over the prepared tables; Data Docs to gate.docs_dir.")
_stage("build-model", "Train the tokenizer and build the tiny Qwen2.5-VL (embedded profile; else a no-op).")
_stage("sft", "SFT warm start on <think>...</think> \\boxed{} targets, then validate (a no-op when sft.enabled is false).")
_stage("train", "NoisyRollout GRPO from the SFT policy, then validate and write the before/after report.")
_stage("train", "Print the before/after table and write the training curves' CSV.", function="report")
_stage("register", "Register the trained policy in the MLflow model registry (alias challenger).")


@app.command("promote")
def promote_stage(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt,
                  version: Optional[str] = typer.Option(None, help="Judge this version instead of the one `register` "
                                                        "wrote (e.g. a sweep's winner); the same rule applies.")) -> None:
    """Move the champion alias to the challenger when it beats the champion by registry.margin."""
    _run(_stage_function("promote"), params, set_, recipe, version=version)


@app.command("evaluate")
def evaluate_stage(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """The DAG's evaluation stage: `eval` with the `eval` section of params.yaml, recording eval.json."""
    _run(_stage_function("evaluate"), params, set_, recipe)


DAG = ("prepare", "validate", "build_model", "sft", "train", "evaluate", "register", "promote")


@app.command("run")
def run_all(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """Every DAG stage in order in this process, without DVC (render-data first when data.corpus_dir is missing)."""
    from noisyrollout.config import load_params
    from pipelines.data import render

    with _user_errors():
        corpus = Path(load_params(params, set_, recipe).data.corpus_dir)
    if not corpus.exists():
        _run(_plain(render), params, set_, recipe)
    for stage in DAG:
        _run(_stage_function(stage), params, set_, recipe)


@app.command("restore-data")
def restore_data(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """Make data.dvc's folder present and verified: check it, or `dvc pull` it (with a DVC remote), or render the
    embedded corpus and check the render against data.dvc's hash (a mismatch is an error, never new data)."""
    from pipelines.data import restore

    _run(_plain(restore), params, set_, recipe)


@app.command("summary")
def summary(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """What the last pipeline run produced: the before/after table, the evaluation and the registry state."""
    from pipelines.dag import print_summary

    _run(_plain(print_summary), params, set_, recipe)


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
    from noisyrollout.config import format_value

    # as JSON (which is YAML): a flag's text stays text (`--datasets yes` is not a bool, `--model 'a: b'` no mapping)
    overrides = list(set_ or []) + [f"eval.{k}={format_value(str(v) if isinstance(v, Path) else v)}"
                                    for k, v in flags.items() if v is not None]
    _run(_stage_function("evaluate"), params, overrides, recipe, predictions_from=predictions_from, record=False)


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
    _run(_plain(lambda p: runner.run(p, arms=[a.strip() for a in arms.split(",") if a.strip()], seeds=seeds,
                              extra=list(set_ or []), collect_prefix=collect, out_md=output, out_dir=out_dir,
                              command=command)), params, set_, None)


@app.command("serve")
def serve(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt,
          alias: str = typer.Option("champion", help="The alias (or a version number) of registry.model_name to serve."),
          host: str = typer.Option("127.0.0.1", help="The interface to bind (127.0.0.1: this machine only)."),
          port: int = typer.Option(5001, help="The port of the REST endpoint (POST /invocations, GET /ping)."),
          workers: int = typer.Option(1, help="Server worker processes (each loads the model).")) -> None:
    """Serve the registered policy (default: the champion) as a REST endpoint: `mlflow models serve` in this
    environment, against the MLflow store the pipeline uses (MLFLOW_TRACKING_URI, else ./mlruns.db). Blocks until
    Ctrl-C. A request: {"dataframe_split": {"columns": ["image", "question"], "data": [[<base64 PNG>, "..."]]},
    "params": {"max_new_tokens": 24}}; the answer: {"predictions": [{"response": "...", "answer": "..."}]}."""
    import os
    import subprocess

    from noisyrollout.config import load_params
    from noisyrollout.tracking import safe_uri, split_credentials, tracking_uri

    with _user_errors():
        name = load_params(params, set_, recipe).registry.model_name
    uri = tracking_uri()
    model = f"models:/{name}/{alias}" if alias.isdigit() else f"models:/{name}@{alias}"
    typer.echo(f"serve: {model} from {safe_uri(uri)} on http://{host}:{port}/invocations")
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
               "--host", host, "--port", str(port), "--workers", str(workers)]
    bin_dir = str(Path(sys.executable).parent)   # mlflow starts `uvicorn` from PATH: this environment's
    # `user:password@` of the URI goes to the child as basic-auth variables (ones already set win, as they would over
    # the URI's), so mlflow's own messages, which quote the URL they call, never print it
    bare, user, password = split_credentials(uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": bare, "MLFLOW_REGISTRY_URI": bare,
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    if user is not None and not (env.get("MLFLOW_TRACKING_USERNAME") or env.get("MLFLOW_TRACKING_PASSWORD")):
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or "")
    try:
        raise typer.Exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command("request")
def request(image: Optional[Path] = typer.Option(None, help="An image file (PNG/JPEG) to ask about."),
            question: Optional[str] = typer.Option(None, help="The question (with --image)."),
            split: str = typer.Option("test", help="Without --image: a sample of this prepared split."),
            index: int = typer.Option(0, help="Without --image: the sample's row in the split."),
            max_new_tokens: Optional[int] = typer.Option(None, help="Longest answer (default: eval.max_new_tokens)."),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Print a JSON request for `noisyrollout serve`'s POST /invocations: an image and a question, by default a
    sample of the prepared test split (its id goes to stderr). E.g. `noisyrollout request > request.json` and
    `curl -s -H 'Content-Type: application/json' -d @request.json http://127.0.0.1:5001/invocations`."""
    import json

    from noisyrollout.config import load_params
    from noisyrollout.errors import NoisyRolloutError
    from pipelines.payload import encode_image

    with _user_errors():
        p = load_params(params, set_)
        if image is not None:
            from PIL import Image

            if question is None:
                raise NoisyRolloutError("--image needs --question")
            with Image.open(image) as img:
                picture, text = img.convert("RGB"), question
        else:
            from noisyrollout.data.loaders import load_records

            rows = load_records(str(p.data.prepared_dir), split, min_pixels=p.data.min_pixels,
                                max_pixels=p.data.max_pixels, limit=index + 1)
            if index >= len(rows):
                raise NoisyRolloutError(f"{split} has {len(rows)} rows, no row {index}")
            picture, text = rows[index]["image"], rows[index]["problem"]
            typer.echo(f"request: {split} row {index}, id {rows[index]['id']}", err=True)
    body = {"dataframe_split": {"columns": ["image", "question"], "data": [[encode_image(picture), text]]},
            "params": {"max_new_tokens": max_new_tokens or p.eval.max_new_tokens}}
    typer.echo(json.dumps(body))


@app.command("stage-deps")
def stage_deps(write: bool = typer.Option(False, "--write", help="Rewrite dvc.yaml's code deps (comments kept)."),
               dvc_yaml: Path = typer.Option(Path("dvc.yaml"), help="The DAG file.")) -> None:
    """Check that every DVC stage's code deps are exactly the project code it runs (its module's import closure);
    with --write, fix dvc.yaml. Exit 1 when they differ and --write is not given."""
    from pipelines.dag import sync_stage_deps

    changes = sync_stage_deps(dvc_yaml, write=write)
    for stage, (add, drop) in changes.items():
        typer.echo(f"{stage}: " + ", ".join([*(f"+{d}" for d in add), *(f"-{d}" for d in drop)]))
    typer.echo(f"{dvc_yaml}: {'updated' if write and changes else 'up to date' if not changes else 'out of date'}")
    if changes and not write:
        raise typer.Exit(1)


@app.command("params")
def show_params(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, recipe: Optional[Path] = RecipeOpt) -> None:
    """List every parameter with the value the pipeline will use (params.yaml, --recipe and -S applied) and its
    description."""
    from noisyrollout.config import format_value, load_params, param_rows

    with _user_errors():
        loaded = load_params(params, set_, recipe)
    for key, value, description in param_rows(loaded):
        typer.echo(f"{key} = {format_value(value)}\n    {description}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
