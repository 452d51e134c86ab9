"""data.dvc on a fresh clone: `dvc pull`, or a render of the embedded corpus checked against data.dvc's hash.

`data.dvc` versions the raw data folder `data/`. The repository's default DVC remote, `embedded` (.dvc/config), is
the folder .dvc/storage/, committed with the embedded corpus in it, so `dvc pull && dvc repro` works offline in a
fresh clone. The corpus also renders byte-identically from its seed: `restore` pulls it (any default remote), or,
with no remote or a failed pull, renders it and checks the render against data.dvc. A render that differs is an
error, never taken as new data: it is moved aside and the message says what to do. A folder that exists is only
checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError

Log = Callable[[str], None]


def _tracked_out(repo: Path, dvc_file: str):
    from dvc.repo import Repo

    path = repo / dvc_file
    if not path.is_file():
        raise NoisyRolloutError(f"{path}: not found; restore it with `git checkout -- {dvc_file}` (it versions the raw data)")
    dvc_repo = Repo(str(repo))
    (stage,) = dvc_repo.stage.collect(dvc_file)
    if len(stage.outs) != 1:
        raise NoisyRolloutError(f"{path}: expected one tracked folder, found {len(stage.outs)}")
    return dvc_repo, stage.outs[0]


def _remotes(repo: Path) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return list(dvc_repo.config.get("remote", {}))


def verify(repo: Path = Path("."), dvc_file: str = "data.dvc") -> tuple[Path, str]:
    """(tracked folder, its hash) when the workspace folder matches data.dvc; else a one-line error saying how to
    restore it or how to version the change."""
    dvc_repo, out = _tracked_out(repo, dvc_file)
    try:
        target = Path(out.fs_path)
        if not target.exists():
            raise NoisyRolloutError(f"{out.def_path}: missing; restore it with `noisyrollout restore-data` (renders the "
                                    f"embedded corpus) or `dvc pull {dvc_file}` (from your DVC remote)")
        if out.changed_checksum():
            raise NoisyRolloutError(
                f"{out.def_path} differs from {dvc_file} (recorded {out.hash_info.value}, found {out.get_hash().value}); "
                f"`dvc checkout {dvc_file}` restores the versioned data, or `dvc add {out.def_path}` and commit "
                f"{dvc_file} to version the change")
        return target, str(out.hash_info.value)
    finally:
        dvc_repo.close()


def render(params: Params, log: Log = print) -> Path:
    """Render the synthetic corpus to `data.corpus_dir` (the raw data that data.dvc versions)."""
    from noisyrollout.data.synthetic import build_corpus, save_corpus

    cfg = params.data
    corpus = build_corpus(seed=cfg.seed, image_size=cfg.image_size, tasks=cfg.tasks, sizes=cfg.sizes)
    save_corpus(corpus, Path(cfg.corpus_dir))
    log(f"corpus: {', '.join(f'{s} {len(d)}' for s, d in corpus.items())} -> {cfg.corpus_dir}")
    return Path(cfg.corpus_dir)


def restore(params: Params, repo: Path = Path("."), dvc_file: str = "data.dvc", log: Log = print) -> Path:
    """Make data.dvc's folder present and verified: check it if present, else `dvc pull` it (a remote is
    configured) or render the embedded corpus and check the render against data.dvc."""
    dvc_repo, out = _tracked_out(repo, dvc_file)
    target, recorded, shown = Path(out.fs_path), str(out.hash_info.value), out.def_path
    dvc_repo.close()
    if target.exists():
        verify(repo, dvc_file)
        log(f"data: {shown} matches {dvc_file} ({recorded})")
        return target
    corpus = (repo / params.data.corpus_dir).resolve()
    renderable = corpus.is_relative_to(target.resolve())
    pulled = None
    if _remotes(repo):
        log(f"data: {shown} missing; pulling {dvc_file} from the DVC remote")
        result = subprocess.run([sys.executable, "-m", "dvc", "pull", dvc_file], cwd=repo, capture_output=True, text=True)
        pulled = result.returncode == 0
        if pulled:
            verify(repo, dvc_file)
            log(f"data: pulled {shown}; matches {dvc_file} ({recorded})")
            return target
        last = (result.stderr.strip().splitlines() or ["dvc pull failed"])[-1]
        if not renderable:
            raise NoisyRolloutError(f"dvc pull {dvc_file} failed: {last}")
        log(f"data: dvc pull {dvc_file} failed ({last}); rendering the embedded corpus instead")
    if not renderable:
        raise NoisyRolloutError(f"{shown}: missing, no DVC remote configured, and data.corpus_dir ({params.data.corpus_dir}) "
                                f"is not inside it, so it cannot be rendered; `dvc remote add` + `dvc pull {dvc_file}`")
    if pulled is None:
        log(f"data: {shown} missing and no DVC remote; rendering the embedded corpus from its seed")
    render(params.model_copy(update={"data": params.data.model_copy(update={"corpus_dir": corpus})}), log=log)
    try:
        verify(repo, dvc_file)
    except NoisyRolloutError:
        rejected = target.with_name(f"{target.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(target), str(rejected))
        raise NoisyRolloutError(
            f"the rendered corpus does not match {dvc_file} ({recorded}); it was moved to {rejected.name} and not used. "
            f"The data.* render parameters or the pinned package versions differ from those that made {dvc_file}; to "
            f"version this render instead: mv {rejected.name} {shown} && dvc add {shown} && git commit {dvc_file}") from None
    log(f"data: rendered {shown}; matches {dvc_file} ({recorded})")
    return target
