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


def _changed_stages(repo) -> set[str]:
    return set(json.loads(run(repo, "dvc", "status", "--json").stdout or "{}"))


@pytest.mark.parametrize("file, old, new, stage", [
    ("eval/grading.py", "def grade_prediction(", "def _edited():\n    pass\n\n\ndef grade_prediction(", "evaluate"),
    ("noisyrollout/train/sft.py", "from __future__ import annotations",
     "from __future__ import annotations\nEDITED = True", "sft"),
])
def test_an_edit_of_the_code_a_stage_runs_marks_that_stage_changed(repo, file, old, new, stage):
    """The stage's deps are its import closure: an edit of the grader shows `evaluate` changed, an edit of the SFT
    code `sft` (and nothing else until they rerun)."""
    path = repo / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    try:
        assert _changed_stages(repo) == {stage}
    finally:
        path.write_text(text)
    assert _changed_stages(repo) == set()


def test_an_ad_hoc_run_leaves_the_dag_records_alone(repo):
    """README's GRPO-baseline line: an ad-hoc `noisyrollout train` with overrides writes its reports beside its
    output_dir, strict JSON (null for the noisy reward of a run without noisy rollouts), and `dvc status` stays clean."""
    before = run(repo, "dvc", "metrics", "show", "--json").stdout
    run(repo, "noisyrollout", "train", "-S", "rollout.n_noisy=0", "-S", "rollout.n_clean=4",
        "-S", "train.output_dir=runs/grpo")
    assert _changed_stages(repo) == set()
    assert run(repo, "dvc", "metrics", "show", "--json").stdout == before
    text = (repo / "runs/grpo/reports/train.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a metrics file"))
    assert report["train_reward_noisy_first10"] is None and report["steps"] == 2
    assert (repo / "runs/grpo/reports/plots/training.csv").is_file()


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
