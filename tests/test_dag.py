"""The DVC DAG as a user drives it: real `dvc repro` in a temporary git repo, at toy sizes.

One module-scoped repo walks through: a full repro; a second repro that does nothing; a changed `train.*` key that
reruns only train and what follows; a changed `eval.*` key that reruns only evaluate and what follows; `dvc metrics
show`; then a corrupted table that the Great Expectations gate stops before `train`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORDER = ["prepare", "validate", "build_model", "sft", "train", "evaluate", "register", "promote"]

TOY = {
    "data": {"sizes": {"train": 48, "val": 24, "test": 24, "ood": 24}},
    "model": {"tiny": {"vocab_size": 400}},
    "sft": {"steps": 4, "batch_size": 8},
    "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 8},
    "train": {"steps": 2, "prompts_per_step": 2, "entropy_coef": 0.01},   # a gradient even when every reward is 0
    "cluster": {"trainer": "local"},
    "val": {"max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns.db'}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def ran(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` executed, in order."""
    return re.findall(r"Running stage '([\w-]+)'", result.stdout + result.stderr)


def set_params(repo: Path, update: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), update), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dag")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("noisyrollout", "pipelines", "eval"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    set_params(repo, TOY)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "noisyrollout", "render-data")
    run(repo, "dvc", "add", "-q", "data")
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/runs\n/mlruns.db\n/mlartifacts\n")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "toy pipeline")
    return repo


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
