"""The DVC DAG as a user drives it: real `dvc repro` in a temporary git repo, at toy sizes.

One module-scoped repo walks through: a full repro; a second repro that does nothing; a changed `train.*` key that
reruns only train and what follows; a changed `eval.*` key that reruns only evaluate and what follows; `dvc metrics
show`; then a corrupted table that the Great Expectations gate stops before `train`.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.toyrepo import make_repo, ran, run, set_params

pytestmark = pytest.mark.slow

ORDER = ["prepare", "validate", "build_model", "sft", "train", "evaluate", "register", "promote"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("dag"))


def test_repro_runs_every_stage_then_nothing(repo):
    first = run(repo, "dvc", "repro")
    assert ran(first) == ORDER
    assert "champion" in (repo / "reports/promotion.json").read_text()
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["decision"] == "promoted" and promotion["champion_after"] == promotion["candidate"]

    again = run(repo, "dvc", "repro")
    assert ran(again) == []
    assert run(repo, "dvc", "status", "--json").stdout.strip() == "{}"

    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    flat = json.dumps(metrics)
    evaluation = json.loads((repo / "reports/eval.json").read_text())
    assert set(evaluation) >= {"mean_accuracy", "embedded_test.accuracy", "embedded_ood.accuracy"}
    assert evaluation["mean_accuracy"] == pytest.approx(
        (evaluation["embedded_test.accuracy"] + evaluation["embedded_ood.accuracy"]) / 2)
    assert str(round(evaluation["mean_accuracy"], 6))[:6] in flat


def test_changed_train_param_reruns_train_and_what_follows(repo):
    set_params(repo, {"train": {"lr": 5e-5}})
    result = run(repo, "dvc", "repro")
    assert ran(result) == ["train", "evaluate", "register", "promote"]
    assert int(json.loads((repo / "reports/register.json").read_text())["version"]) == 2
    assert run(repo, "dvc", "status", "--json").stdout.strip() == "{}"


def test_changed_eval_param_reruns_only_evaluate_and_what_follows(repo):
    set_params(repo, {"eval": {"max_new_tokens": 7}})
    result = run(repo, "dvc", "repro")
    # evaluate reruns; register/promote follow only if its metrics changed (an untrained toy model scores 0 either way)
    assert ran(result) in (["evaluate"], ["evaluate", "register", "promote"])
    register = json.loads((repo / "reports/register.json").read_text())
    assert int(register["version"]) == (3 if "register" in ran(result) else 2)


def test_gate_stops_a_corrupted_table_before_train(repo):
    train = repo / "data/corpus/train.parquet"
    table = pq.read_table(train)
    answers = table.column("answer").to_pylist()
    ids = table.column("id").to_pylist()
    answers[3] = ""
    ids[5] = ids[4]
    table = table.set_column(table.schema.get_field_index("answer"), "answer", pa.array(answers))
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids))
    pq.write_table(table, train)
    run(repo, "dvc", "add", "-q", "data")
    set_params(repo, {"train": {"lr": 2e-5}})   # train would rerun if the gate let it
    result = run(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert ran(result) == ["prepare", "validate"]
    out = result.stdout + result.stderr
    assert "data validation failed on train" in out
    assert ids[4] in out                              # the duplicate id is named
    assert "train-" in out and "answer" in out
    gate = json.loads((repo / "reports/gate.json").read_text())
    assert gate["success"] is False
    # run outside DVC, the stage refuses too
    direct = run(repo, "noisyrollout", "train", check=False)
    assert direct.returncode == 2 and "failed validation" in direct.stderr
