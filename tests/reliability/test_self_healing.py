"""Self-healing training (#25 cases 3 and 4): a learner process killed with SIGKILL mid-run. The driver tears the
group down, starts it again and resumes from the newest whole checkpoint by itself (`cluster.max_restarts`), logs the
restart (a console line, the MLflow tag `restarts`, the metric `cluster/restarts`), and ends with exactly the
parameters and per-step metrics of an uninterrupted run; past the limit it stops, naming the dead learner.

Real Ray (a local cluster the trainer starts) and two DeepSpeed learners on gloo, the tiny model.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import psutil
import pytest

from noisyrollout.config import Params
from noisyrollout.errors import LearnerLost
from tests.reliability.trainjob import metrics, toy, weights

pytestmark = pytest.mark.slow

RAY = {"trainer": "ray", "num_learners": 2, "cpus_per_learner": 1}


def _params(corpus_dir: Path, out: Path, **cluster) -> Params:
    return Params.model_validate(toy(corpus_dir, out, cluster={**RAY, **cluster}))


def _learners() -> list[psutil.Process]:
    """This machine's Ray learner actor processes (their process title is `ray::RayLearner...`)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayLearner"):
            found.append(proc)
    return found


def _kill_a_learner() -> int:
    (victim, *_) = sorted(_learners(), key=lambda p: p.pid)
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


@pytest.fixture(scope="module")
def reference(corpus_dir, tiny_model_dir, tmp_path_factory) -> Path:
    from noisyrollout.train.driver import train_rl

    out = tmp_path_factory.mktemp("heal-ref") / "full"
    train_rl(_params(corpus_dir, out), tiny_model_dir, progress=False)
    return out


def test_a_killed_learner_is_restarted_and_the_run_ends_as_if_never_interrupted(
        corpus_dir, tiny_model_dir, tmp_path, reference, monkeypatch):
    import mlflow

    from noisyrollout.train.driver import train_rl

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    params = Params.model_validate(toy(corpus_dir, tmp_path / "healed", cluster=RAY,
                                       tracking={"enabled": True, "experiment": "heal",
                                                 "artifact_root": str(tmp_path / "artifacts")}))
    lines, killed = [], []

    def kill_during_step_3(m):
        if m.step == 2 and not killed:   # the learner dies a moment into step 3 (or 4: a step here takes ~0.3 s)
            threading.Timer(0.05, lambda: killed.append(_kill_a_learner())).start()

    result = train_rl(params, tiny_model_dir, progress=False, log=lines.append, on_step=kill_during_step_3)
    assert len(killed) == 1
    restarts = [line for line in lines if "restarting the learners" in line]
    assert len(restarts) == 1, lines
    died_at = int(re.search(r"died at step (\d+): restarting the learners \(1 of cluster.max_restarts=2\) from ",
                            restarts[0]).group(1))
    newest = f"step_{died_at // 2 * 2:06d}"                                  # a checkpoint every 2 steps
    assert died_at in (3, 4) and restarts[0].endswith(newest)
    assert any(line.endswith(f"{newest} at step {died_at // 2 * 2}") for line in lines)   # resumed there
    print(restarts[0])
    assert metrics(tmp_path / "healed") == metrics(reference)
    assert weights(tmp_path / "healed") == weights(reference)
    assert not _learners()                                                     # nothing left running

    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1"
    assert "learner-" in run.data.tags["last_restart_cause"]
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "cluster/restarts")
    assert [(m.step, m.value) for m in history] == [(died_at, 1.0)]
    alphas = mlflow.MlflowClient().get_metric_history(result.run_id, "noise/alpha")
    assert sorted(m.step for m in alphas) == list(range(6))                    # every step once, none twice


def test_past_max_restarts_the_run_stops_naming_the_dead_learner(corpus_dir, tiny_model_dir, tmp_path):
    from noisyrollout.train.driver import train_rl

    params = _params(corpus_dir, tmp_path / "doomed", max_restarts=1)
    lines, killed = [], []

    def kill_at_steps_1_and_3(m):
        if m.step in (1, 3) and m.step not in killed:   # once before the restart, once after it
            _kill_a_learner()
            killed.append(m.step)

    with pytest.raises(LearnerLost) as stopped:
        train_rl(params, tiny_model_dir, progress=False, log=lines.append, on_step=kill_at_steps_1_and_3)
    message = str(stopped.value)
    assert killed == [1, 3]
    assert message.startswith("learner actor 'learner-")
    assert "died; the run stopped after 1 restart(s) (cluster.max_restarts=1)" in message
    assert len([line for line in lines if "restarting the learners" in line]) == 1
    assert not _learners()
