"""`noisyrollout ablation` end to end at toy size: two arms x one seed through the real DVC queue, from the workspace's
SFT model (restored from the run cache, not retrained), no registry versions, and a report whose paired difference is
the one computed directly from the two experiments' per-sample results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.ablation import read_samples_csv
from tests.toyrepo import make_repo, run

pytestmark = pytest.mark.slow


def test_ablation_queues_runs_and_reports_the_paired_difference(tmp_path):
    repo = make_repo(tmp_path)
    run(repo, "dvc", "repro")
    done = run(repo, "noisyrollout", "ablation", "--seeds", "1", "--arms", "grpo,crop_fill", timeout=1500)
    report = (repo / "ABLATION.md").read_text()
    assert "| crop_fill | 4 + 4 | `crop_fill`, 0.2 |" in report and "| grpo | 8 + 0 |" in report
    assert (repo / "ablation" / "ablation.png").stat().st_size > 10_000

    results = json.loads((repo / "ablation" / "results.json").read_text())
    names = sorted(results["runs"])
    assert [results["runs"][n]["arm"] for n in names] == ["crop_fill", "grpo"]
    show = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    revs = {r["name"]: r["rev"] for b in show for e in (b.get("experiments") or []) for r in e["revs"]}
    samples = {n: read_samples_csv(run(repo, "git", "show", f"{revs[n]}:reports/eval_samples.csv").stdout) for n in names}
    ood = [k for k in samples[names[0]] if k[0] == "embedded_ood"]
    direct = np.mean([samples[names[0]][k][1] - samples[names[1]][k][1] for k in ood])
    assert results["table"]["crop_fill"]["ood"]["diff"] == pytest.approx(direct)
    assert results["table"]["crop_fill"]["ood"]["n"] == len(ood) == 24

    for name in names:   # each run started from the workspace's SFT model and trained its own arm
        logs = run(repo, "dvc", "queue", "logs", name).stdout
        assert "Stage 'sft' is cached - skipping run" in logs and "Running stage 'train'" in logs
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")
    assert len(client.search_model_versions("name='noisyrollout-embedded'")) == 1   # the baseline's; runs register none
    assert "ablation: collected 2 runs" in done.stdout + done.stderr
