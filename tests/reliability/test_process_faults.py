"""Process faults (#25 case 3): SIGKILL of the driver mid-step and mid-checkpoint-write, a full disk while a
checkpoint is written. Promise: no checkpoint is ever half-loaded, the error names the cause, and resuming ends with
exactly the uninterrupted run's final parameters and per-step metrics. (A killed *learner*: test_self_healing.py.)

Each run is its own process (tests/reliability/trainjob.py: the in-process trainer, `cluster.trainer=local`, whose
checkpoint protocol is the driver's, the same for Ray learners), killed with SIGKILL as a whole session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from noisyrollout.train import checkpoint
from tests.reliability.trainjob import ROOT, command, metrics, toy, weights

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _params_file(tmp: Path, name: str, corpus_dir: Path, **sections) -> tuple[Path, Path]:
    run = tmp / name
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(toy(corpus_dir, run, **sections)))
    return path, run


def _run(params_file: Path, init_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(params_file, init_dir), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def _start(params_file: Path, init_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(command(params_file, init_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(victim: subprocess.Popen, ready, timeout: float = 300.0, poll: float = 0.001) -> None:
    """SIGKILL the victim's whole session as soon as `ready()` holds (polled every `poll` s)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if victim.poll() is not None or time.monotonic() > deadline:
            out, err = victim.communicate()
            raise AssertionError(f"the run ended (or stalled) before the kill point: {err[-2000:]}")
        time.sleep(poll)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def reference(corpus_dir, tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, a checkpoint every 2."""
    params_file, run = _params_file(tmp_path_factory.mktemp("reference"), "full", corpus_dir)
    done = _run(params_file, tiny_model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(metrics(run)) == 6
    return run


def _ckpt_root(run: Path) -> Path:
    (root,) = (run / "checkpoints").iterdir()   # one parameter set
    return root


def _resume_and_compare(params_file: Path, run: Path, init_dir: Path, reference: Path, expect_from: str) -> str:
    resumed = _run(params_file, init_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"/{expect_from} at step {int(expect_from[5:])}" in resumed.stdout, resumed.stdout[-2000:]
    assert metrics(run) == metrics(reference)
    assert weights(run) == weights(reference)
    return resumed.stdout


def test_driver_killed_mid_step_resumes_to_the_uninterrupted_result(corpus_dir, tiny_model_dir, tmp_path, reference):
    params_file, run = _params_file(tmp_path, "part", corpus_dir)
    victim = _start(params_file, tiny_model_dir)
    # steps 0-2 done (checkpoint after step 2 of 6 written): the driver is inside step 3 (index 3 writes none)
    _kill_when(victim, lambda: _lines(run / "metrics.jsonl") >= 3)
    assert _lines(run / "metrics.jsonl") == 3 and not (run / "model").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(_ckpt_root(run))] == ["step_000002"]
    _resume_and_compare(params_file, run, tiny_model_dir, reference, "step_000002")


@pytest.mark.parametrize("kill_point", ["staging folder created", "weights file being written"])
def test_driver_killed_mid_checkpoint_write_never_loads_it(corpus_dir, tiny_model_dir, tmp_path, reference, kill_point):
    params_file, run = _params_file(tmp_path, "part", corpus_dir)
    victim = _start(params_file, tiny_model_dir)

    def writing() -> bool:
        tmp = next(iter(run.glob("checkpoints/*/step_000004.tmp")), None)
        if tmp is None:
            return False
        return kill_point == "staging folder created" or any(tmp.glob("hf/*.safetensors"))

    _kill_when(victim, writing)
    root = _ckpt_root(run)
    assert (root / "step_000004.tmp").is_dir()                      # killed while writing it,
    assert not (root / "step_000004.tmp" / checkpoint.STATE_FILE).exists()   # before its commit
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000002"]
    _resume_and_compare(params_file, run, tiny_model_dir, reference, "step_000002")
    assert not list(root.glob("*.tmp"))                             # the half-written folder was cleared


def test_a_damaged_checkpoint_is_skipped_not_loaded(corpus_dir, tiny_model_dir, tmp_path, reference):
    """A complete checkpoint whose file lost bytes after the commit (a disk fault, a partial copy) is not loaded:
    the run resumes from the one before and says why."""
    params_file, run = _params_file(tmp_path, "part", corpus_dir, train={"steps": 6})
    victim = _start(params_file, tiny_model_dir)
    _kill_when(victim, lambda: _lines(run / "metrics.jsonl") >= 5, poll=0.01)   # checkpoints 2 and 4 written
    root = _ckpt_root(run)
    weights_file = root / "step_000004" / "torch" / "state.pt"
    size = weights_file.stat().st_size
    with weights_file.open("r+b") as fh:
        fh.truncate(size // 2)
    out = _resume_and_compare(params_file, run, tiny_model_dir, reference, "step_000002")
    assert f"not loading {root / 'step_000004'}: torch/state.pt has {size // 2} bytes, {size} were written" in out


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.strip()}")


def test_a_full_disk_fails_the_checkpoint_in_one_line_and_resume_finishes(corpus_dir, tiny_model_dir, tmp_path,
                                                                           reference):
    """The checkpoint storage is a real size-limited tmpfs with room for one checkpoint and a half: the second
    write hits ENOSPC. The run stops naming the cause, the first checkpoint stays whole, and after the disk is
    enlarged the rerun resumes from it to the uninterrupted result."""
    one = sum(checkpoint.manifest(checkpoint.latest(_ckpt_root(reference))).values())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, int(one * 1.5))
    try:
        params_file, run = _params_file(tmp_path, "part", corpus_dir, cluster={"storage": str(disk)})
        failed = _run(params_file, tiny_model_dir)
        assert failed.returncode == 2, failed.stderr[-3000:]
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert "writing checkpoint step_000004.tmp" in errors[0] and "No space left on device (ENOSPC)" in errors[0]
        (root,) = disk.iterdir()
        assert [p.name for p in root.iterdir()] == ["step_000002"]   # the staging folder was removed
        assert checkpoint.damage(root / "step_000002") is None
        print(f"checkpoint {one / 2**20:.2f} MiB, disk {int(one * 1.5) / 2**20:.2f} MiB: {errors[0]}")

        subprocess.run(["mount", "-o", f"remount,size={one * 4}", str(disk)], check=True)
        _resume_and_compare(params_file, run, tiny_model_dir, reference, "step_000002")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
