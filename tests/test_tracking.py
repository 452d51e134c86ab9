"""noisyrollout.tracking against a real MLflow 3.17 sqlite store (no mocks). One store for the module: its first
migration takes seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from noisyrollout.report import plot_training
from noisyrollout.tracking import Tracker, project_root, flatten_params, is_secret_key, tracking_uri

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite store and an absolute artifact root, migrated once for the module."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'db' / 'mlruns.db'}"
    with Tracker("warmup", tracking_uri=uri, artifact_root=root / "artifacts"):
        pass
    return {"uri": uri, "artifacts": root / "artifacts", "client": MlflowClient(tracking_uri=uri)}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty cwd, to check that nothing lands in ./mlruns (or ./mlflow.db)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return cwd


def _rows(n: int = 4, nan_noisy: bool = False) -> list[dict]:
    return [{"step": s, "reward_clean": 0.1 * s, "reward_noisy": math.nan if nan_noisy else 0.05 * s,
             "accuracy": 0.2 + 0.1 * s, "alpha": 0.2 * (1 - s / n)} for s in range(n)]


def test_secret_names_and_flattening():
    assert is_secret_key("judge.api_key") and is_secret_key("hf_token") and is_secret_key("db.password")
    assert is_secret_key("key") and is_secret_key("aws.secretAccessKey") and is_secret_key("auth.user")
    assert not is_secret_key("model.tiny.num_key_value_heads")
    assert not is_secret_key("rollout.max_new_tokens") and not is_secret_key("model.tokenizer_dir")
    flat = flatten_params({"a": {"b": {"c": 1}, "api_key": "sk-x"}, "n": None, "lst": [1, 2], "long": "x" * 7000})
    assert flat == {"a.b.c": "1", "n": "None", "lst": "[1, 2]", "long": "x" * 6000}


# The two word lists the project had before one filter served both MLflow params and eval reports.
OLD_TRACKING_WORDS = ["token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "apikey", "credential",
                      "credentials", "auth", "authorization", "cookie", "bearer"]
OLD_REPORT_WORDS = ["key", "apikey", "token", "secret", "password", "passwd", "authorization", "auth", "credential"]


@pytest.mark.parametrize("word", sorted(set(OLD_TRACKING_WORDS) | set(OLD_REPORT_WORDS)))
def test_one_secret_filter_for_params_and_eval_reports(word):
    from eval.report import redact

    for name in (word, f"judge.{word}", f"hf_{word}", f"hf-{word}", f"db{word.capitalize()}"):
        assert is_secret_key(name), name
        assert redact({name: "s", "train": {name: "s", "lr": 1}}) == {"train": {"lr": 1}}, name
    normal = {"train.lr": 1, "lr": 1, "model.tiny.num_key_value_heads": 2, "rollout.max_new_tokens": 8,
              "model.tokenizer_dir": "t"}
    assert not any(is_secret_key(name) for name in normal)
    assert redact(normal) == normal


def test_run_params_metrics_artifacts_registry(store, workdir, tmp_path):
    import mlflow

    client = store["client"]
    model_dir = tmp_path / "hf_model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (model_dir / "sub" / "weights.bin").write_bytes(b"\0" * 64)
    png = plot_training(_rows(), tmp_path / "training.png")

    with Tracker("noisyrollout-test", run_name="rl", tracking_uri=store["uri"],
                 artifact_root=store["artifacts"]) as tr:
        tr.log_params({"train": {"lr": 1e-4, "steps": 3}, "model": {"tiny": {"num_key_value_heads": 2}},
                       "judge": {"api_key": "sk-very-secret", "model": "m"}, "hf_token": "hf_secret", "seed": 0})
        tr.log_params({"train": {"lr": 1e-4}})   # same value again: allowed
        for step in range(3):
            tr.log_metrics({"reward/reward_clean": 0.5 + step, "reward/reward_noisy": math.nan,
                            "noise/alpha": math.inf, "losses/pg_loss": -0.1 * step}, step=step)
        tr.log_system_info()
        tr.log_artifact_dir(model_dir, "model")
        tr.log_figure_png(png)

    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "rl"
    assert run.data.params == {"train.lr": "0.0001", "train.steps": "3", "model.tiny.num_key_value_heads": "2",
                               "judge.model": "m", "seed": "0"}
    assert not any("secret" in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert {"system.python", "system.torch", "system.transformers", "system.cpu_count",
            "system.hostname"} <= set(run.data.tags)
    assert [(m.step, m.value) for m in client.get_metric_history(tr.run_id, "reward/reward_clean")] == \
        [(0, 0.5), (1, 1.5), (2, 2.5)]
    assert client.get_metric_history(tr.run_id, "reward/reward_noisy") == []   # nan skipped
    assert client.get_metric_history(tr.run_id, "noise/alpha") == []           # inf skipped
    assert "losses/pg_loss" in run.data.metrics

    # artifacts: under the absolute artifact root, readable back through MLflow
    assert run.info.artifact_uri == (store["artifacts"] / tr.run_id / "artifacts").as_uri()
    on_disk = store["artifacts"] / tr.run_id / "artifacts"
    assert (on_disk / "model" / "sub" / "weights.bin").read_bytes() == b"\0" * 64
    assert (on_disk / "plots" / "training.png").read_bytes()[:8] == PNG_MAGIC
    assert {a.path for a in client.list_artifacts(tr.run_id, "model")} == {"model/config.json", "model/sub"}
    got = Path(mlflow.artifacts.download_artifacts(f"runs:/{tr.run_id}/model", dst_path=str(tmp_path / "dl"),
                                                   tracking_uri=store["uri"]))
    assert json.loads((got / "config.json").read_text()) == {"model_type": "qwen2_5_vl"}

    assert sorted(p.name for p in workdir.iterdir()) == []   # no ./mlruns, ./mlartifacts or ./mlflow.db


def test_resume_appends_to_same_run(store, workdir):
    client = store["client"]
    with Tracker("noisyrollout-resume", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as tr:
        tr.log_params({"train": {"steps": 2}})
        tr.log_metrics({"reward/reward_clean": 0.1}, step=0)
        tr.log_metrics({"reward/reward_clean": 0.2}, step=1)
    with Tracker("ignored-on-resume", tracking_uri=store["uri"], artifact_root=store["artifacts"],
                 run_id=tr.run_id) as again:
        assert again.run_id == tr.run_id and again.resumed
        assert client.get_run(tr.run_id).info.status == "RUNNING"
        again.log_params({"train": {"steps": 4}})   # immutable param: kept, new value tagged
        again.log_metrics({"reward/reward_clean": 0.3}, step=2)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2" and run.data.tags["param_changed.train.steps"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(tr.run_id, "reward/reward_clean")] == \
        [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracking_uri_env_override(store, workdir, monkeypatch):
    assert tracking_uri() == f"sqlite:///{workdir.resolve() / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert tracking_uri() == store["uri"]
    with Tracker("noisyrollout-env", artifact_root=store["artifacts"]) as tr:
        tr.log_metrics({"x": 1.0}, step=0)
    assert tr.tracking_uri == store["uri"]
    assert store["client"].get_run(tr.run_id).data.metrics == {"x": 1.0}   # found in the env's store
    assert not (workdir / "mlruns.db").exists()


def test_exception_in_block_marks_run_failed(store, workdir):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker("noisyrollout-fail", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as tr:
            tr.log_metrics({"x": 1.0}, step=0)
            raise RuntimeError("boom")
    assert store["client"].get_run(tr.run_id).info.status == "FAILED"
    tr.finish()   # already finished: no-op, status stays FAILED
    assert store["client"].get_run(tr.run_id).info.status == "FAILED"


def test_plot_training_draws_gaps_for_missing_curves(tmp_path):
    out = plot_training(_rows(5, nan_noisy=True), tmp_path / "a" / "plot.png")   # vanilla GRPO: reward_noisy nan
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_queued_dvc_experiments_log_into_the_repository_store(tmp_path):
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    assert project_root(workspace) == (tmp_path / "repo").resolve()
    assert project_root(tmp_path / "repo") == (tmp_path / "repo").resolve()


def test_metrics_are_written_in_batches_and_never_lost(store, workdir):
    """Steps are buffered (one log_batch per FLUSH_SECONDS, not one commit per step), and every path that reads or
    ends the run writes them first."""
    client = store["client"]
    with Tracker("noisyrollout-buffer", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as tr:
        for step in range(5):
            tr.log_metrics({"x": float(step)}, step=step)
        assert client.get_metric_history(tr.run_id, "x") == []       # still buffered: written together
        assert tr.last_logged_step("x") == 4                         # a read writes them first
        assert [m.value for m in client.get_metric_history(tr.run_id, "x")] == [0.0, 1.0, 2.0, 3.0, 4.0]
        tr.log_metrics({"x": 5.0}, step=5)
    assert [m.step for m in client.get_metric_history(tr.run_id, "x")] == [0, 1, 2, 3, 4, 5]   # finish writes
    with pytest.raises(RuntimeError):
        with Tracker("noisyrollout-buffer", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as failed:
            failed.log_metrics({"x": 1.0}, step=0)
            raise RuntimeError("boom")
    assert [m.value for m in client.get_metric_history(failed.run_id, "x")] == [1.0]   # a failed run keeps them


def test_the_smoothed_curve_is_the_trailing_mean():
    from noisyrollout.report import smooth

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    out = smooth([math.nan, 2.0, math.nan, 4.0], 3)
    assert math.isnan(out[0]) and out[1:] == [2.0, 2.0, 3.0]


def test_run_names_say_what_the_run_is(monkeypatch):
    from noisyrollout.config import Params
    from noisyrollout.tracking import run_name

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_name(Params()) == "embedded-crop_fill-4x4-seed0"
    grpo = Params.model_validate({"rollout": {"n_clean": 8, "n_noisy": 0}, "train": {"seed": 2}})
    assert run_name(grpo) == "embedded-crop_fill-8x0-seed2"
    qwen = Params.model_validate({"model": {"embedded": False, "name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                                  "noise": {"distortion": "tv:GaussianBlur", "alpha0": 0.5}})
    monkeypatch.setenv("DVC_EXP_NAME", "dazed-snip")
    assert run_name(qwen) == "Qwen2.5-VL-7B-Instruct-tv-GaussianBlur-4x4-seed0-dazed-snip"
