"""The command line as a user meets it: the whole embedded pipeline at toy sizes, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

TOY = [
    "data.sizes={train: 48, val: 24, test: 24, ood: 24}", "model.tiny.vocab_size=400",
    "sft.steps=4", "sft.batch_size=8", "train.steps=2", "train.prompts_per_step=2",
    "rollout.n_clean=2", "rollout.n_noisy=2", "rollout.max_new_tokens=8", "val.max_new_tokens=8",
    "eval.max_new_tokens=8",
]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def with_overrides(*args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [*args, "--params", "params.yaml", *[x for o in (*TOY, *extra) for x in ("-S", o)]]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    return tmp_path


def test_embedded_pipeline_end_to_end(workdir):
    result = invoke(*with_overrides("run"))
    assert result.exit_code == 0, result.output
    assert "| val accuracy (clean images) |" in result.output
    rl = workdir / "runs/embedded/rl"
    assert (rl / "model/config.json").exists() and (rl / "training.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and metrics[0]["alpha"] == pytest.approx(0.2, rel=1e-3)
    report = json.loads((rl / "report.json").read_text())
    assert set(report) >= {"sft", "rl", "val_accuracy_gain"}
    (final,) = (rl / "checkpoints").glob("*/step_000002")                     # the final step is checkpointed too
    assert (final / "hf/config.json").exists()
    # the DAG's stages ran in this process: gate, evaluation, registry; with -S overrides it is an ad-hoc run, so
    # each stage's reports lie beside its own outputs and the DAG's reports/ stays untouched
    assert not (workdir / "reports").exists()
    assert json.loads((workdir / "runs/data_docs/reports/gate.json").read_text())["success"] is True
    assert json.loads((workdir / "runs/embedded/eval/reports/eval.json").read_text())["mean_accuracy"] >= 0
    promotion = json.loads((rl / "reports/promotion.json").read_text())
    assert promotion["decision"] == "promoted" and promotion["champion_after"] == "1"
    # another parameter set trains beside the first (its own checkpoint folder), never resuming the other's
    other = invoke(*with_overrides("train", extra=("rollout.n_noisy=0", "rollout.n_clean=4")))
    assert other.exit_code == 0, other.output
    assert "resumed from" not in other.output
    assert len(list((rl / "checkpoints").glob("*/step_000002"))) == 2
    # the same parameters again: resumed at the last step, nothing retrained
    same = invoke(*with_overrides("train"))
    assert same.exit_code == 0 and "resumed from" in same.output and "at step 2" in same.output

    out = invoke(*with_overrides("eval"))
    assert out.exit_code == 0, out.output
    summary = json.loads((workdir / "runs/embedded/eval/summary.json").read_text())
    assert "embedded_test" in json.dumps(summary) and (workdir / "runs/embedded/eval/embedded_ood.json").exists()
    again = invoke(*with_overrides("eval", "--predictions-from", "runs/embedded/eval", "--output-dir", "regraded"))
    assert again.exit_code == 0, again.output
    regraded = json.loads((workdir / "regraded/embedded_test.json").read_text())["metrics"]
    original = json.loads((workdir / "runs/embedded/eval/embedded_test.json").read_text())["metrics"]
    assert regraded["accuracy"] == original["accuracy"] and regraded["n_total"] == original["n_total"] == 24


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    err = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1, result.output
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_training_rows_give_one_line_errors(workdir):
    (workdir / "img.png").write_bytes(b"not a png at all")
    __import__("PIL.Image").Image.new("RGB", (56, 56), "white").save(workdir / "ok.png")
    cases = {
        "no_image.jsonl": ('{"images": [], "problem": "<image>q", "answer": "1"}', "row 0"),
        "empty_answer.jsonl": ('{"images": ["ok.png"], "problem": "<image>q", "answer": " "}', "row 0"),
        "unreadable.jsonl": ('{"images": ["img.png"], "problem": "<image>q", "answer": "1"}', "img.png"),
        "missing.jsonl": ('{"images": ["img.png"], "problem": "<image>q"}', "answer"),
    }
    for name, (line, needle) in cases.items():
        folder = workdir / Path(name).stem     # a prepared dir holding a bad train table, as if no gate had run
        folder.mkdir()
        (folder / "train.jsonl").write_text(line + "\n")
        for png in ("img.png", "ok.png"):
            (folder / png).write_bytes((workdir / png).read_bytes())
        result = invoke("train", "--params", "params.yaml", "-S", f"data.prepared_dir={folder}", "-S", "sft.enabled=false")
        _assert_one_line_error(result, "train.jsonl", needle)


def test_an_sft_fraction_that_leaves_too_few_rl_prompts_give_a_one_line_error(workdir):
    __import__("PIL.Image").Image.new("RGB", (56, 56), "white").save(workdir / "ok.png")
    (workdir / "train.jsonl").write_text('{"images": ["ok.png"], "problem": "<image>q", "answer": "1"}\n' * 20)
    result = invoke("train", "--params", "params.yaml", "-S", f"data.prepared_dir={workdir}", "-S", "sft.fraction=0.5")
    _assert_one_line_error(result, "sft.fraction=0.5 leaves 10 of the 20", "train.prompts_per_step=16")


def test_bad_parameters_give_one_line_errors(workdir):
    _assert_one_line_error(invoke("prepare", "--params", "params.yaml", "-S", "train.nope=1"), "train.nope")
    _assert_one_line_error(invoke("prepare", "--params", "params.yaml", "-S", "rollout.n_clean=-1"), "rollout.n_clean")
    _assert_one_line_error(invoke("prepare", "--params", "missing.yaml"), "missing.yaml")
    _assert_one_line_error(invoke("sft", "--params", "params.yaml", "-S", "model.embedded=false", "-S",
                                  "model.name_or_path=nowhere"), "nowhere")
    _assert_one_line_error(invoke("train", "--params", "params.yaml", "-S", "rollout.engine=vllm"), "vLLM")
    _assert_one_line_error(invoke("eval", "--params", "params.yaml", "--engine", "vllm", "--model", "."), "vLLM")


def test_pipeline_inputs_give_one_line_errors(workdir, monkeypatch):
    # a missing data.dvc target says how to restore it
    _assert_one_line_error(invoke("prepare", "--params", "params.yaml"), "data/corpus: missing", "restore-data")
    # an MLflow store that cannot be reached is named, before any training or registration
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    _assert_one_line_error(invoke("train", "--params", "params.yaml"), "http://127.0.0.1:9")
    (workdir / "runs/embedded/rl/model").mkdir(parents=True)
    (workdir / "runs/embedded/rl/model/config.json").write_text("{}")
    _assert_one_line_error(invoke("register", "--params", "params.yaml"), "http://127.0.0.1:9")
    _assert_one_line_error(invoke("promote", "--params", "params.yaml"), "http://127.0.0.1:9")


def test_gpu_recipe_stages_become_noops_and_the_recipe_merges_into_params(workdir):
    recipe = Path(__file__).parents[1] / "recipes/gpu-7b.yaml"
    result = invoke("use-recipe", str(recipe), "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    text = (workdir / "params.yaml").read_text()
    assert "name_or_path: Qwen/Qwen2.5-VL-7B-Instruct" in text and "# the paper freezes the vision tower" in text
    from noisyrollout.config import load_params

    merged, direct = load_params(workdir / "params.yaml"), load_params(Path(__file__).parents[1] / "params.yaml",
                                                                       recipe=recipe)
    assert merged == direct
    assert invoke("build-model", "--params", "params.yaml").exit_code == 0
    assert json.loads((workdir / "runs/gpu-7b/base/NOT_BUILT.json").read_text())["base"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert invoke("sft", "--params", "params.yaml").exit_code == 0
    assert json.loads((workdir / "runs/gpu-7b/sft/val.json").read_text()) == {"enabled": False}
    assert json.loads((workdir / "reports/sft.json").read_text()) == {"enabled": False}


def test_before_after_without_sft_has_no_before_column(tmp_path):
    from noisyrollout.report import before_after

    val = {"accuracy": 0.5, "format": 1.0, "n": 4.0, "accuracy/count": 0.5}
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 0, "reward_clean": 0.4, "reward_noisy": 0.2,
                                                  "accuracy": 0.3}) + "\n")
    table, summary = before_after(None, {"clean": val, "noisy": {**val, "accuracy": 0.25}}, tmp_path / "m.jsonl")
    assert "| val accuracy (clean images) | (no SFT) | 0.500 | |" in table
    assert "| val accuracy (distorted images) | (no SFT) | 0.250 | |" in table
    assert summary["val_accuracy_gain"] != summary["val_accuracy_gain"]   # nan: no SFT to compare with
    assert summary["train_reward_clean_first10"] == pytest.approx(0.4)


def test_the_cli_and_the_light_stages_do_not_import_torch():
    """Every DAG stage is a fresh process: the CLI, the parameters and the stages without a model (prepare, the GX
    gate, the registry) must not pay for torch / torchvision / transformers (~3 s per process on 2 cores)."""
    code = ("import sys, noisyrollout, pipelines.cli, pipelines.stages.prepare, pipelines.stages.validate, "
            "pipelines.stages.register, pipelines.stages.promote, noisyrollout.data.loaders, pipelines.gate, "
            "pipelines.registry\n"
            "from noisyrollout.config import load_params\n"
            "load_params('params.yaml', ['noise.distortion=crop_fill'])\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'ray', 'deepspeed') if m in sys.modules))\n"
            "print(noisyrollout.anneal(0, 10))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.splitlines()
    assert out == ["[]", "1.0"]   # and the public API still resolves (lazily)
