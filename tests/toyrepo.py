"""A copy of the project in a temporary git + DVC repo, at toy sizes, for tests that drive the real tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TOY = {
    "data": {"sizes": {"train": 48, "val": 24, "test": 24, "ood": 24}},
    "model": {"tiny": {"vocab_size": 400}},
    "sft": {"steps": 4, "batch_size": 8},
    "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 8},
    "train": {"steps": 2, "prompts_per_step": 2, "entropy_coef": 0.01},   # a gradient even when every reward is 0
    "cluster": {"trainer": "local"},
    "val": {"max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def env(repo: Path) -> dict[str, str]:
    """No MLFLOW_TRACKING_URI: the stages find `<repo>/mlruns.db` themselves, also from DVC's queue workspaces."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


def run(repo: Path, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), cwd=repo, env=env(repo), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def ran(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` executed, in order."""
    return re.findall(r"Running stage '([\w-]+)'", result.stdout + result.stderr)


def set_params(repo: Path, update: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), update), sort_keys=False))


def make_repo(repo: Path, extra: dict | None = None) -> Path:
    """The project's dvc.yaml, params.yaml (toy sizes + `extra`) and code in a fresh git + DVC repo, with data/
    rendered and versioned, all committed."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("noisyrollout", "pipelines", "eval"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    set_params(repo, merge(TOY, extra or {}))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "noisyrollout", "render-data")
    run(repo, "dvc", "add", "-q", "data")
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/runs\n/mlruns.db\n/mlartifacts\n")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "toy pipeline")
    return repo
