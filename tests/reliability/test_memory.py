"""Memory over a long run (#25 case 6): the resident memory of the driver and of each Ray learner, sampled twice a
second while the embedded profile trains (16 prompts x (4 clean + 4 noisy) rollouts per step, 2 DeepSpeed learners,
MLflow on, a checkpoint every 20 steps). Promise: after warm-up, growth under 5%.

    test_memory_stays_flat_in_ci          60 steps (marker slow: .ci/run)
    test_memory_stays_flat_over_300_steps 300 steps (marker soak: `make test-soak`, which .ci/run runs; 3 min here)

Growth = (highest RSS over the last fifth of the steps - RSS at the end of warm-up) / RSS at the end of warm-up, where
warm-up is the first fifth of the steps (the allocator, the vision cache and the first checkpoint settle there); the
final save after the last step (the HF model, the plot, the MLflow upload) is not training and not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability.trainjob import ROOT, command

MAX_GROWTH = 0.05


def _sample(driver: psutil.Process, steps_file: Path, stop: threading.Event, out: list) -> None:
    """(step, driver RSS, [learner RSS, ...]) every 0.2 s; step = steps finished so far (a step takes ~0.4 s)."""
    while not stop.wait(0.2):
        try:
            learners = [p for p in driver.children(recursive=True)
                        if (p.cmdline() or [""])[0].startswith("ray::RayLearner")]
            rss = driver.memory_info().rss, sorted(p.memory_info().rss for p in learners)
        except psutil.Error:
            continue
        steps = len(steps_file.read_text().splitlines()) if steps_file.is_file() else 0
        out.append((steps, rss[0], rss[1]))


def _growth(samples: list, steps: int, pick) -> tuple[float, float, float]:
    """(RSS at the end of warm-up, highest RSS over the last fifth, growth) of the series `pick(sample)`, in MiB.
    The end of warm-up is the last sample taken with `steps // 5` steps done, or one fewer (a fast step can fall
    between two samples)."""
    warm_end = steps // 5
    at_warm = [pick(s) for s in samples if warm_end - 1 <= s[0] <= warm_end]
    late = [pick(s) for s in samples if steps - steps // 5 <= s[0] < steps]   # training, not the final save
    assert at_warm and late, f"no samples at step {warm_end - 1} or {warm_end}, or after step {steps - steps // 5}"
    base, top = at_warm[-1] / 2**20, max(late) / 2**20
    return base, top, (top - base) / base


def _measure(corpus_dir: Path, model_dir: Path, tmp: Path, steps: int) -> dict[str, tuple[float, float, float]]:
    run = tmp / "rl"
    params = {"data": {"prepared_dir": str(corpus_dir)},
              "train": {"steps": steps, "output_dir": str(run), "log_every": 1000},
              "tracking": {"enabled": True, "experiment": "memory", "artifact_root": str(tmp / "artifacts")}}
    params_file = tmp / "params.json"
    params_file.write_text(json.dumps(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}"}
    proc = subprocess.Popen(command(params_file, model_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(psutil.Process(proc.pid), run / "metrics.jsonl", stop, samples))
    sampler.start()
    try:
        out, err = proc.communicate(timeout=3600)
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert all(len(s[2]) == 2 for s in samples if 0 < s[0] < steps), "expected 2 learners in every sample"
    (tmp / "rss.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    figures = {"driver": _growth(samples, steps, lambda s: s[1])}
    for r in range(2):
        figures[f"learner (rank-sorted by RSS) {r}"] = _growth([s for s in samples if len(s[2]) == 2], steps,
                                                                lambda s, r=r: s[2][r])
    for who, (base, top, growth) in figures.items():
        print(f"{steps} steps, {who}: {base:.0f} MiB after warm-up, {top:.0f} MiB at most later, "
              f"growth {100 * growth:+.2f}%")
    return figures


def _check(figures: dict[str, tuple[float, float, float]]) -> None:
    grown = {who: f"{100 * g:+.2f}%" for who, (_, _, g) in figures.items() if g >= MAX_GROWTH}
    assert not grown, f"resident memory grew by more than {100 * MAX_GROWTH:.0f}% after warm-up: {grown}"


@pytest.mark.slow
def test_memory_stays_flat_in_ci(corpus_dir, tiny_model_dir, tmp_path):
    _check(_measure(corpus_dir, tiny_model_dir, tmp_path, steps=60))


@pytest.mark.soak
def test_memory_stays_flat_over_300_steps(corpus_dir, tiny_model_dir, tmp_path):
    _check(_measure(corpus_dir, tiny_model_dir, tmp_path, steps=300))
