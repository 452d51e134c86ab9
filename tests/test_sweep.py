"""Parameter sweeps through DVC experiments, at toy size: a queued 2-point sweep runs, both results come back from
`dvc exp show --json`, and every experiment registers its own version (tagged with its name) in the repository's
MLflow store, with `champion` moved only by the promotion rule."""

from __future__ import annotations

import json
import time

import pytest

from tests.toyrepo import make_repo, run

pytestmark = pytest.mark.slow


def _exp_rows(show: list) -> dict[str, dict]:
    """{experiment name: {"params": {...}, "metrics": {...}}} from `dvc exp show --json` (DVC 3 layout)."""
    rows = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for revision in exp.get("revs") or []:
                data = revision.get("data") or {}
                name = revision.get("name") or exp.get("name")
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {path: (m or {}).get("data", {}) for path, m in (data.get("metrics") or {}).items()}
                rows[name] = {"params": params, "metrics": metrics}
    return rows


def test_queued_sweep_reports_both_points_and_registers_each(tmp_path):
    repo = make_repo(tmp_path)
    run(repo, "dvc", "repro")
    run(repo, "git", "add", "dvc.lock", "reports")
    run(repo, "git", "commit", "-qm", "baseline run")
    queued = run(repo, "dvc", "exp", "run", "--queue", "-S", "train.lr=5e-5,2e-5")
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    run(repo, "dvc", "queue", "start")
    deadline = time.time() + 900
    while True:
        status = run(repo, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status + run(repo, "dvc", "queue", "logs", "--help", check=False).stdout

    rows = _exp_rows(json.loads(run(repo, "dvc", "exp", "show", "--json").stdout))
    assert sorted(r["params"]["train"]["lr"] for r in rows.values()) == [2e-5, 5e-5]
    for row in rows.values():
        evaluation = row["metrics"]["reports/eval.json"]
        assert 0.0 <= evaluation["mean_accuracy"] <= 1.0 and "embedded_ood.accuracy" in evaluation

    # the experiments registered into the repository's store (not their temporary workspaces)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")
    versions = client.search_model_versions("name='noisyrollout-embedded'")
    assert len(versions) == 3
    tagged = sorted(v.tags.get("dvc_experiment", "") for v in versions)
    assert tagged[0] == "" and sorted(tagged[1:]) == sorted(rows)     # the baseline has no experiment name
    champion = client.get_model_version_by_alias("noisyrollout-embedded", "champion")
    for v in versions:
        decision = v.tags["promotion.decision"]
        assert decision in ("promoted", "refused") and v.tags["promotion.reason"]
    assert champion.tags["promotion.decision"] == "promoted"

    # a sweep over train.* starts every experiment from the workspace's SFT model: restored from DVC's run cache,
    # never retrained (a stage with a `cache: false` output gets no run-cache entry, so this guards dvc.yaml)
    for name in rows:
        logs = run(repo, "dvc", "queue", "logs", name).stdout
        assert "Running stage 'train'" in logs and "Running stage 'sft'" not in logs, logs[-2000:]
