"""Atomic, resumable checkpoints: `<dir>/step_000020/` appears only once everything in it is written.

Layout of one checkpoint:
    hf/                      the policy in HF format (save_pretrained model + processor): loadable as is
    deepspeed/               every learner's DeepSpeed state: weights, optimizer, LR schedule (cluster.trainer=ray)
    torch/state.pt           the same for the one in-process learner (cluster.trainer=local)
    rng_rank<r>.pt           every learner's RNG states (torch, python, the distortion generator)
    trainer_state.json       step counter, per-step metrics so far, MLflow run id

Writers fill `step_000020.tmp/`; `commit` renames it (atomic on one filesystem) and prunes old ones. A folder
a kill left half-written keeps its `.tmp` suffix and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

# Knobs that may change between a run and its resumption; every other parameter must match.
# train.steps is NOT one of them: the noise schedule (u = s / T) and the LR schedule depend on it, so a run with
# another T is another run (it starts fresh in its own folder) instead of silently bending the schedule mid-way.
RESUMABLE_CHANGES = ("train.log_every", "train.output_dir", "checkpoint", "tracking", "eval", "val", "gate",
                     "registry", "reports_dir", "orchestration",
                     "cluster.address", "cluster.dashboard", "cluster.placement", "cluster.placement_timeout_s",
                     "cluster.storage")

STEP_DIR = re.compile(r"^step_(\d{6})$")
STATE_FILE = "trainer_state.json"


def checkpoints_root(params: Any) -> Path:
    """Where a run's checkpoints go: `cluster.storage` (a folder every node reaches), else
    `<train.output_dir>/checkpoints`; one subfolder per parameter set (the driver names it)."""
    storage = params.cluster.storage
    return Path(storage) if storage is not None else Path(params.train.output_dir) / "checkpoints"


def check_writable(folder: Path, who: str) -> None:
    """Raise NoisyRolloutError, one line naming `folder` and `who` (a learner and its node), unless a file can be
    written there: checked by every learner at start, so a node that cannot reach the storage fails at once."""
    from noisyrollout.errors import NoisyRolloutError

    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise NoisyRolloutError(f"{who} cannot write checkpoints to {folder} ({exc.strerror or exc}); every node must "
                                f"reach cluster.storage (a shared filesystem)") from None


def staging_dir(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint after `step` steps."""
    tmp = Path(root) / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write the trainer state last, rename the folder into place, keep the newest `keep_last`."""
    (tmp / STATE_FILE).write_text(json.dumps(state))
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def init_identity(init: str | Path) -> str:
    """What the run starts from: a SHA-256 of every file of a local policy folder (a re-trained SFT policy is another
    start, so its run must not resume checkpoints of the old one), or the hub id as given."""
    root = Path(init)
    if not root.is_dir():
        return str(init)
    h = hashlib.sha256()
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        h.update(str(file.relative_to(root)).encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# The modules a training run executes: the driver, its learners (in-process or Ray/DeepSpeed), their engines.
# `code_identity` hashes their import closure (noisyrollout/sources.py), so CLI help, the registry, the evaluation
# or the README can change without restarting a run, and an edit to anything the trainer runs starts it fresh.
TRAINING_MODULES = ("noisyrollout.train.driver", "noisyrollout.train.launcher", "noisyrollout.train.learner")


def code_identity(root: str | Path | None = None, modules: tuple[str, ...] = TRAINING_MODULES) -> str:
    """A SHA-256 of the training code (the import closure of `modules` under `root`, default this repository):
    after a change to it (`dvc repro` reruns `train`) the run starts fresh instead of resuming the old code's final
    checkpoint."""
    from noisyrollout.sources import REPO_ROOT, code_hash

    return code_hash(modules, Path(root) if root is not None else REPO_ROOT)


def params_fingerprint(params: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A hash of the parameters that decide what a run computes (not where it logs); `ignore` drops more keys."""
    tree = json.loads(json.dumps(params, default=str))
    for dotted in (*RESUMABLE_CHANGES, *ignore):
        node, *rest = dotted.split(".")
        if rest:
            tree.get(node, {}).pop(rest[0], None)
        else:
            tree.pop(node, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
