"""Atomic, resumable checkpoints: `<dir>/step_000020/` appears only once everything in it is written.

Layout of one checkpoint:
    hf/                      the policy in HF format (save_pretrained model + processor): loadable as is
    deepspeed/               every learner's DeepSpeed state: weights, optimizer, LR schedule
    rng_rank<r>.pt           every learner's RNG states (torch, python, the distortion generator)
    trainer_state.json       step counter, per-step metrics so far, MLflow run id

Writers fill `step_000020.tmp/`; `commit` renames it (atomic on one filesystem) and prunes old ones. A folder
a kill left half-written keeps its `.tmp` suffix and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

# Knobs that may change between a run and its resumption; every other parameter must match.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.output_dir", "checkpoint", "tracking", "eval", "val", "gate",
                     "registry", "reports_dir", "orchestration",
                     "cluster.address", "cluster.dashboard")

STEP_DIR = re.compile(r"^step_(\d{6})$")
STATE_FILE = "trainer_state.json"


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


def params_fingerprint(params: dict[str, Any]) -> str:
    """A hash of the parameters that decide what a run computes (not how long it runs or where it logs)."""
    tree = json.loads(json.dumps(params, default=str))
    for dotted in RESUMABLE_CHANGES:
        node, *rest = dotted.split(".")
        if rest:
            tree.get(node, {}).pop(rest[0], None)
        else:
            tree.pop(node, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
