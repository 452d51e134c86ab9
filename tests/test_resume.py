"""Kill -9 mid-training, resume, and end exactly where an uninterrupted run of the same seed ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

pytestmark = pytest.mark.slow

TOY = ["data.sizes={train: 48, val: 24, test: 24, ood: 24}", "model.tiny.vocab_size=400", "sft.steps=4",
       "sft.batch_size=8", "rollout.n_clean=2", "rollout.n_noisy=2", "rollout.max_new_tokens=8",
       "train.prompts_per_step=4", "train.lr=1e-3", "train.steps=5", "checkpoint.every=1", "tracking.enabled=false"]


def _flags(extra=()):
    return [x for o in (*TOY, *extra) for x in ("-S", o)]


def _train_cmd(out: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", *_flags([f"train.output_dir={out}"])]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    for stage in ("render-data", "prepare", "build-model", "sft"):
        assert CliRunner().invoke(app, [stage, *_flags()], catch_exceptions=False).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    full = subprocess.run(_train_cmd("runs/full"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    victim = subprocess.Popen(_train_cmd("runs/part"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list((tmp_path / "runs/part/checkpoints").glob("*/step_000002")):
        assert victim.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)          # the driver and everything it started, mid-training
    victim.wait()
    assert not (tmp_path / "runs/part/model").exists()

    resumed = subprocess.run(_train_cmd("runs/part"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    assert _metrics(tmp_path / "runs/part") == _metrics(tmp_path / "runs/full")
    assert len(_metrics(tmp_path / "runs/full")) == 5
    weights = [(tmp_path / f"runs/{r}/model/model.safetensors").read_bytes() for r in ("full", "part")]
    assert weights[0] == weights[1]
