"""The pipeline against a shared MLflow tracking server, for real: `mlflow server` on 127.0.0.1 (sqlite backend, a
local artifact destination, artifacts proxied), and `train`, `evaluate`, `register`, `promote` run with
MLFLOW_TRACKING_URI=http://127.0.0.1:<port>. Runs, versions, tags, aliases and the model artifact land on the server
(nothing in a local mlruns.db or mlartifacts/), and the champion loads back through it. The server is stopped by
the PID this test started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.servers import free_port, running

pytestmark = pytest.mark.slow

TOY = ["data.sizes={train: 48, val: 24, test: 24, ood: 24}", "model.tiny.vocab_size=400", "sft.steps=4",
       "sft.batch_size=8", "train.steps=2", "train.prompts_per_step=2", "rollout.n_clean=2", "rollout.n_noisy=2",
       "rollout.max_new_tokens=8", "val.max_new_tokens=8", "eval.max_new_tokens=8", "cluster.trainer=local"]
MODEL = "noisyrollout-embedded"


@pytest.fixture
def server(tmp_path):
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
    with running(cmd, ready=f"{uri}/health", log=root / "server.log", cwd=root):
        yield uri, root


def test_train_register_promote_land_on_the_server(server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForImageTextToText

    uri, root = server
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (work / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    flags = [x for o in TOY for x in ("-S", o)]
    for stage in ("render-data", "prepare", "validate", "build-model", "sft", "train", "evaluate", "register",
                  "promote"):
        result = CliRunner().invoke(app, [stage, *flags], catch_exceptions=False)
        assert result.exit_code == 0, (stage, result.output[-3000:])
    assert not (work / "mlruns.db").exists() and not (work / "mlartifacts").exists() and not (work / "mlruns").exists()

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("noisyrollout-embedded").experiment_id])
              if r.data.tags.get("mlflow.runName") == "embedded-crop_fill-2x2-seed0"]
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run.info.run_id, "noise/alpha")] == [0, 1]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")           # proxied by the server
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "plots"}
    stored = list((root / "artifacts").rglob("model.safetensors"))
    assert len(stored) == 2, stored   # the run's HF folder and the servable model's copy, in the server's store

    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.version == "1" and version.run_id == run.info.run_id
    assert version.tags["promotion.decision"] == "promoted" and "eval.mean_accuracy" in version.tags
    assert client.get_model_version_by_alias(MODEL, "challenger").version == "1"

    monkeypatch.chdir(tmp_path)
    path = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "champion"))
    model = AutoModelForImageTextToText.from_pretrained(Path(path) / "artifacts/hf")   # the servable model's HF folder
    trained = AutoModelForImageTextToText.from_pretrained(work / "runs/embedded/rl/model")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
