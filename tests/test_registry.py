"""pipelines.registry against a real MLflow 3.17 sqlite store in tmp (no mocks). One store for the module: its first
migration takes seconds."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from noisyrollout.errors import NoisyRolloutError
from noisyrollout.tracking import Tracker
from pipelines.registry import check_store, format_state, promote, register, registry_state


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    check_store(uri)   # folder exists, no db file yet: fine
    with Tracker("warmup", tracking_uri=uri, artifact_root=root / "artifacts"):
        pass
    return {"uri": uri, "artifacts": root / "artifacts", "root": root,
            "client": MlflowClient(tracking_uri=uri, registry_uri=uri)}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A stand-in model folder for the promotion-rule tests (the tiny HF model is used where loading matters)."""
    d = tmp_path_factory.mktemp("small_model")
    (d / "config.json").write_text('{"model_type": "stub"}')
    return d


def _reg(store, name: str, model_dir: Path, metrics: dict, **kw) -> dict:
    args = dict(name=name, model_dir=model_dir, run_id=None, experiment="registry-test", eval_metrics=metrics,
                tags={}, description=f"# {name}", tracking_uri=store["uri"], artifact_root=store["artifacts"])
    args.update(kw)
    return register(**args)


def _promote(store, name: str, **kw) -> dict:
    return promote(name=name, tracking_uri=store["uri"], **kw)


def test_register_tiny_model_then_load_champion(store, tiny_model_dir, tmp_path, monkeypatch):
    import mlflow
    import torch
    from transformers import AutoModelForImageTextToText

    client = store["client"]
    card = "# tiny\n\nA **model card** with `code`.\n\n| metric | value |\n|---|---|\n| mean_accuracy | 0.5 |\n"
    tags = {"git_commit": "abc123-dirty", "data_hashes": "data=md5:1", "param.train.lr": "0.0001",
            "hf_token": "hf_SECRET", "judge.api_key": "sk-SECRET"}
    info = _reg(store, "tiny", tiny_model_dir,
                {"mean_accuracy": 0.5, "embedded_test.accuracy": 0.25, "embedded_ood.accuracy": 1 / 3},
                tags=tags, description=card)

    assert info["name"] == "tiny" and info["version"] == "1" and info["aliases"] == ["challenger"]
    assert info["source"] == f"runs:/{info['run_id']}/model"
    expected_tags = {"git_commit": "abc123-dirty", "data_hashes": "data=md5:1", "param.train.lr": "0.0001",
                     "eval.mean_accuracy": "0.5", "eval.embedded_test.accuracy": "0.25",
                     "eval.embedded_ood.accuracy": repr(1 / 3)}
    assert info["tags"] == expected_tags
    mv = client.get_model_version("tiny", "1")
    assert mv.tags == expected_tags and mv.description == card and mv.source == info["source"]
    assert mv.run_id == info["run_id"]
    assert client.get_registered_model("tiny").aliases == {"challenger": 1}   # 3.17: int versions here
    run = client.get_run(info["run_id"])   # a new run, in the named experiment, FINISHED, no secrets
    assert client.get_experiment(run.info.experiment_id).name == "registry-test"
    assert run.info.status == "FINISHED" and run.data.metrics["eval.mean_accuracy"] == 0.5
    assert not any("SECRET" in v for v in [*run.data.tags.values(), *mv.tags.values()])
    assert run.info.artifact_uri.startswith(store["artifacts"].as_uri())

    decision = _promote(store, "tiny")
    assert decision["decision"] == "promoted" and decision["reason"] == "no champion yet"
    # MLflow 3.17 resolves a models:/ URI with the global registry URI, ignoring download_artifacts'
    # tracking_uri / registry_uri arguments (it would create ./mlflow.db): set it through the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.chdir(tmp_path)
    path = mlflow.artifacts.download_artifacts("models:/tiny@champion", dst_path=str(tmp_path / "dl"))
    assert not (tmp_path / "mlflow.db").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    (pname, p0), = list(original.named_parameters())[:1]
    assert torch.equal(dict(loaded.named_parameters())[pname], p0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))


def test_promotion_rules(store, small_model):
    client = store["client"]
    name = "rules"

    v1 = _reg(store, name, small_model, {"mean_accuracy": 0.81})["version"]
    d = _promote(store, name, margin=0.01)
    assert (d["candidate"], d["decision"], d["champion_before"], d["champion_after"]) == (v1, "promoted", None, v1)
    assert d["reason"] == "no champion yet" and d["candidate_value"] == 0.81 and d["champion_value"] is None
    tags = client.get_model_version(name, v1).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.reason"] == "no champion yet"
    assert tags["promotion.compared_to"] == "none" and tags["promotion.metric"] == "mean_accuracy"
    assert tags["promotion.time"].endswith("+00:00")

    # promoting the champion again: refused, still champion
    d = _promote(store, name, version=v1)
    assert d["decision"] == "refused" and d["reason"] == "already champion" and d["champion_after"] == v1

    v2 = _reg(store, name, small_model, {"mean_accuracy": 0.80})["version"]   # worse
    d = _promote(store, name, margin=0.01)
    assert d["candidate"] == v2 and d["decision"] == "refused" and d["champion_after"] == v1
    assert d["reason"] == f"mean_accuracy 0.8000 vs champion v{v1} 0.8100: -0.0100 not better"
    assert client.get_registered_model(name).aliases == {"champion": int(v1), "challenger": int(v2)}

    v3 = _reg(store, name, small_model, {"mean_accuracy": 0.81})["version"]   # equal
    d = _promote(store, name, margin=0.0)
    assert d["decision"] == "refused" and d["reason"].endswith("+0.0000 not better")

    v4 = _reg(store, name, small_model, {"mean_accuracy": 0.812})["version"]   # better, by less than the margin
    d = _promote(store, name, margin=0.01)
    assert d["decision"] == "refused" and d["champion_after"] == v1
    assert d["reason"] == f"mean_accuracy 0.8120 vs champion v{v1} 0.8100: +0.0020 < margin 0.0100"
    tags = client.get_model_version(name, v4).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.reason"] == d["reason"]
    assert tags["promotion.compared_to"] == v1

    v5 = _reg(store, name, small_model, {"mean_accuracy": 0.825})["version"]   # better by >= margin
    d = _promote(store, name, margin=0.01)
    assert (d["decision"], d["champion_before"], d["champion_after"]) == ("promoted", v1, v5)
    assert d["reason"] == f"mean_accuracy 0.8250 vs champion v{v1} 0.8100: +0.0150 >= margin 0.0100"
    assert client.get_registered_model(name).aliases == {"champion": int(v5), "challenger": int(v5)}
    assert client.get_model_version(name, v5).tags["promotion.compared_to"] == v1

    v6 = _reg(store, name, small_model, {})["version"]   # not evaluated
    d = _promote(store, name)
    assert d["decision"] == "refused" and d["reason"] == "not evaluated: no eval.mean_accuracy tag"
    assert d["champion_after"] == v5

    # another metric: the champion lacks it -> the candidate that has it wins
    v7 = _reg(store, name, small_model, {"mean_accuracy": 0.5, "embedded_ood.accuracy": 0.3})["version"]
    d = _promote(store, name, metric="embedded_ood.accuracy")
    assert d["decision"] == "promoted" and d["champion_after"] == v7
    assert d["reason"].startswith(f"champion v{v5} has no eval.embedded_ood.accuracy tag")

    state = registry_state(name=name, tracking_uri=store["uri"])
    assert state["champion"] == v7 and state["challenger"] == v7
    assert [r["version"] for r in state["versions"]] == [v7, v6, v5, v4, v3, v2, v1]
    rows = {r["version"]: r for r in state["versions"]}
    assert rows[v7]["aliases"] == ["challenger", "champion"] and rows[v7]["eval.embedded_ood.accuracy"] == 0.3
    assert rows[v6]["promotion.decision"] == "refused" and "eval.mean_accuracy" not in rows[v6]
    assert rows[v3]["eval.mean_accuracy"] == 0.81 and rows[v1]["promotion.decision"] == "refused"   # last: "already"
    text = format_state(state, d)
    assert f"champion v{v7}" in text and f"champion moved v{v5} -> v{v7}" in text and "not evaluated" in text
    # what stages.py writes to promotion.json (a subset of the keys) also formats
    assert "refused" in format_state(state, {"candidate": v6, "decision": "refused", "reason": "x",
                                             "champion_before": v5, "champion_after": v5, "metric": "mean_accuracy"})


def test_unevaluated_never_promoted_even_without_champion(store, small_model):
    v = _reg(store, "unevaluated", small_model, {})["version"]
    d = _promote(store, "unevaluated")
    assert d["decision"] == "refused" and d["reason"] == "not evaluated: no eval.mean_accuracy tag"
    assert d["champion_before"] is None and d["champion_after"] is None
    assert store["client"].get_registered_model("unevaluated").aliases == {"challenger": int(v)}
    assert store["client"].get_model_version("unevaluated", v).tags["promotion.decision"] == "refused"
    assert registry_state(name="unevaluated", tracking_uri=store["uri"])["champion"] is None


def test_register_from_existing_run_artifacts(store, small_model):
    with Tracker("training", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as tr:
        tr.log_artifact_dir(small_model, "model")
    info = _reg(store, "from-run", Path("/nonexistent/not/needed"), {"mean_accuracy": 0.4}, run_id=tr.run_id)
    assert info["run_id"] == tr.run_id and info["source"] == f"runs:/{tr.run_id}/model"
    assert store["client"].get_model_version("from-run", info["version"]).run_id == tr.run_id

    # a run without "model" artifacts: model_dir logged in a new run instead
    with Tracker("training", tracking_uri=store["uri"], artifact_root=store["artifacts"]) as empty:
        pass
    info = _reg(store, "from-run", small_model, {"mean_accuracy": 0.4}, run_id=empty.run_id)
    assert info["run_id"] != empty.run_id and info["source"] == f"runs:/{info['run_id']}/model"
    assert store["client"].get_run(info["run_id"]).data.tags["noisyrollout.training_run_id"] == empty.run_id


def test_errors_name_the_uri(store, small_model, tmp_path):
    with pytest.raises(NoisyRolloutError, match="no registered model 'missing'"):
        _promote(store, "missing")
    with pytest.raises(NoisyRolloutError, match="has no version 99"):
        _reg(store, "errs", small_model, {"mean_accuracy": 0.1})
        _promote(store, "errs", version="99")
    with pytest.raises(NoisyRolloutError, match="margin"):
        _promote(store, "errs", margin=-0.1)
    with pytest.raises(NoisyRolloutError, match="no run deadbeef"):
        _reg(store, "errs", small_model, {}, run_id="deadbeef")
    with pytest.raises(NoisyRolloutError, match="no model folder"):
        _reg(store, "errs", tmp_path / "nope", {})
    missing_db = f"sqlite:///{tmp_path / 'empty' / 'mlruns.db'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoisyRolloutError, match="no database file"):   # reading stages never create a store
        registry_state(name="x", tracking_uri=missing_db)
    assert not (tmp_path / "empty" / "mlruns.db").exists()


def test_check_store_fails_fast(tmp_path):
    bad_sqlite = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'mlruns.db'}"
    t0 = time.monotonic()
    with pytest.raises(NoisyRolloutError) as err:
        check_store(bad_sqlite)
    assert bad_sqlite in str(err.value) and "\n" not in str(err.value)

    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http_uri = f"http://127.0.0.1:{port}"
    with pytest.raises(NoisyRolloutError) as err:
        check_store(http_uri)
    assert http_uri in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NoisyRolloutError) as err:   # credentials never echoed
        check_store(f"http://user:pa55word@127.0.0.1:{port}")
    assert "pa55word" not in str(err.value)
    with pytest.raises(NoisyRolloutError, match="127.0.0.1"):   # register / promote check the store first
        promote(name="x", tracking_uri=http_uri)
    assert time.monotonic() - t0 < 20

    not_db = tmp_path / "garbage.db"
    not_db.write_text("not a database")
    with pytest.raises(NoisyRolloutError, match="not a SQLite database"):
        check_store(f"sqlite:///{not_db}")
