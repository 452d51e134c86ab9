"""The registered version is an MLflow model a user can load and serve (pipelines/serving.py), for real: the toy
pipeline registers and promotes it in a sqlite store; `mlflow.pyfunc.load_model("models:/...@champion")` answers a
question about an image with what `noisyrollout eval` answered for that sample; `noisyrollout serve` (mlflow models
serve on 127.0.0.1) answers a POST to /invocations the same; after a better challenger is promoted, a freshly
started server answers with the new version. Servers are stopped by the PIDs this test started."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.servers import free_port, running

pytestmark = pytest.mark.slow

TOY = ["data.sizes={train: 48, val: 24, test: 24, ood: 24}", "model.tiny.vocab_size=400", "sft.steps=8",
       "sft.batch_size=8", "train.steps=2", "train.prompts_per_step=2", "rollout.n_clean=2", "rollout.n_noisy=2",
       "rollout.max_new_tokens=8", "val.max_new_tokens=8", "eval.max_new_tokens=8", "cluster.trainer=local"]
MODEL = "noisyrollout-embedded"


def _cli(*args: str, extra: tuple[str, ...] = ()):
    result = CliRunner().invoke(app, [*args, *[x for o in (*TOY, *extra) for x in ("-S", o)]], catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output[-3000:])
    return result


def _served(work: Path, request: dict) -> list[dict]:
    """Start `noisyrollout serve` afresh, POST `request` to /invocations, stop the server by its PID."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "noisyrollout"), "serve", "--port", str(port),
           *[x for o in TOY for x in ("-S", o)]]
    with running(cmd, ready=f"http://127.0.0.1:{port}/ping", log=work / f"serve-{port}.log", cwd=work,
                 env=os.environ.copy()):
        post = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as reply:
            return json.loads(reply.read())["predictions"]


def test_the_champion_loads_answers_and_serves_what_eval_answered(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from transformers import AutoModelForImageTextToText

    from noisyrollout.data.loaders import load_records
    from pipelines.payload import encode_image

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    (work / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    for stage in ("render-data", "prepare", "validate", "build-model", "sft", "train", "evaluate", "register",
                  "promote"):
        _cli(stage)

    # one test sample, as `evaluate` saw it, and what it answered
    (sample,) = load_records("runs/prepared", "test", min_pixels=3136, max_pixels=3136, limit=1)
    evaluated = {row["id"]: row for row in json.loads(Path("runs/embedded/eval/embedded_test.json").read_text())["results"]}
    expected = evaluated[sample["id"]]["prediction"]
    table = pd.DataFrame({"image": [encode_image(sample["image"])], "question": [sample["problem"]]})

    policy = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert [i.name for i in policy.metadata.get_input_schema().inputs] == ["image", "question"]
    (got,) = policy.predict(table, params={"max_new_tokens": 8}).to_dict("records")
    assert got["response"] == expected
    # the HF folder stays downloadable and loadable
    hf = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "dl"))) / "artifacts/hf"
    assert AutoModelForImageTextToText.from_pretrained(hf).config.model_type == "qwen2_5_vl"

    request = {"dataframe_split": {"columns": ["image", "question"], "data": table.values.tolist()},
               "params": {"max_new_tokens": 8}}
    (served,) = _served(work, request)
    assert served == got

    # a better challenger (the untrained base model, its evaluation set better by hand: this test is about what is
    # served after a promotion, the rule itself is tests/test_registry.py's) is registered and promoted
    shutil.copytree("runs/embedded/base", "runs/v2/model")
    first = json.loads(Path("runs/embedded/eval/reports/eval.json").read_text())
    better = {**first, "mean_accuracy": first["mean_accuracy"] + 0.5}
    (Path("runs/v2eval/reports")).mkdir(parents=True)
    Path("runs/v2eval/reports/eval.json").write_text(json.dumps(better))
    v2 = ("train.output_dir=runs/v2", "eval.output_dir=runs/v2eval")
    _cli("register", extra=v2)
    assert "promoted" in _cli("promote", extra=v2).output
    new = mlflow.pyfunc.load_model(f"models:/{MODEL}/2").predict(table, params={"max_new_tokens": 8}).to_dict("records")
    assert new[0]["response"] != got["response"]            # the two versions answer differently
    assert _served(work, request) == new                    # and a fresh server serves the new champion
