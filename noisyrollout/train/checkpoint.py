"""Atomic, resumable checkpoints: `<dir>/step_000020/` appears only once everything in it is written.

Layout of one checkpoint:
    hf/                      the policy in HF format (save_pretrained model + processor): loadable as is
    deepspeed/               every learner's DeepSpeed state: weights, optimizer, LR schedule (cluster.trainer=ray)
    torch/state.pt           the same for the one in-process learner (cluster.trainer=local)
    rng_rank<r>.pt           every learner's RNG states (torch, python, the distortion generator)
    trainer_state.json       step counter, per-step metrics so far, MLflow run id, every file's size

Writers fill `step_000020.tmp/`; `commit` flushes it to disk, writes the trainer state last and renames the folder
(atomic on one filesystem), then prunes old ones. A folder a kill left half-written keeps its `.tmp` suffix and is
never loaded; a complete one whose files no longer have their recorded sizes is skipped (`newest_whole`). A full disk
fails the write with one line (`save`) and leaves the older checkpoints intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

# Knobs that may change between a run and its resumption; every other parameter must match.
# train.steps is NOT one of them: the noise schedule (u = s / T) and the LR schedule depend on it, so a run with
# another T is another run (it starts fresh in its own folder) instead of silently bending the schedule mid-way.
RESUMABLE_CHANGES = ("train.log_every", "train.output_dir", "checkpoint", "tracking", "eval", "val", "gate",
                     "registry", "reports_dir", "orchestration",
                     "cluster.address", "cluster.dashboard", "cluster.placement", "cluster.placement_timeout_s",
                     "cluster.storage", "cluster.max_restarts")

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


def save(root: Path, step: int, write: Callable[[Path], None], state: dict[str, Any], keep_last: int) -> Path:
    """The checkpoint after `step` steps: `write(tmp)` fills a staging folder (the learners' states), then `commit`.
    A write that fails on I/O (a full disk, a learner's OSError) removes the staging folder, leaves the older
    checkpoints as they were, and raises NoisyRolloutError naming the folder, the cause and the free space."""
    from noisyrollout.errors import LearnerLost, NoisyRolloutError

    tmp = staging_dir(root, step)
    try:
        write(tmp)
        return commit(tmp, state, keep_last)
    except LearnerLost:
        raise
    except (OSError, RuntimeError, NoisyRolloutError) as exc:
        # torch.save reports a full disk as a RuntimeError of its zip writer, a Ray learner's error arrives wrapped:
        # the disk itself says whether it is full
        cause = _io_cause(exc) or _disk_full(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None and not isinstance(exc, (OSError, NoisyRolloutError)):
            raise
        free = shutil.disk_usage(root).free / 2**20
        raise NoisyRolloutError(f"writing checkpoint {tmp.name} to {root} failed: {cause or exc}; {free:.1f} MiB "
                                f"free there; the older checkpoints are intact, and `noisyrollout train` resumes "
                                f"from the newest once there is room") from None


def _io_cause(exc: BaseException) -> str | None:
    """'No space left on device (ENOSPC)' for an OSError with an errno, else None."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return None


def _disk_full(folder: Path, probe_bytes: int = 1 << 20) -> str | None:
    """The I/O error a 1 MiB write into `folder` raises now (e.g. ENOSPC), None if it succeeds."""
    probe = Path(folder) / ".space-probe"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * probe_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        return None
    except OSError as exc:
        return _io_cause(exc)
    finally:
        probe.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest(folder: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `folder`: recorded at commit, checked before a load."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def commit(tmp: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Record every file's size in the trainer state, write it last, flush all to disk, rename the folder into
    place, keep the newest `keep_last`."""
    files = manifest(tmp)
    for name in files:
        _fsync(tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files}))
    _fsync(tmp / STATE_FILE)
    _fsync(tmp)
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


def damage(checkpoint: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be loaded (a file missing, or of another size than was written:
    truncated or overwritten), None when it is whole."""
    try:
        files = read_state(checkpoint).get("files")
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    if files is None:   # written before sizes were recorded
        return None
    for name, size in files.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def newest_whole(root: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint whose files are all as written; a damaged one is skipped, saying why."""
    for path in reversed(complete_checkpoints(root)):
        why = damage(path)
        if why is None:
            return path
        log(f"not loading {path}: {why}")
    return None


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
