"""data.dvc on a fresh clone: the embedded corpus re-renders to the recorded hash; a different render or an edited
data/ is refused in one line, never taken as new data. Real DVC in a temporary git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from noisyrollout.config import load_params
from noisyrollout.errors import NoisyRolloutError
from pipelines.data import restore, verify

SIZES = "data.sizes={train: 12, val: 6, test: 6, ood: 6}"


def dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "config", "core.analytics", "false")
    restore_params = load_params(None, [SIZES])
    from pipelines.data import render

    render(restore_params, log=lambda _: None)
    dvc(tmp_path, "add", "-q", "data")
    shutil.rmtree(tmp_path / ".dvc" / "cache")          # a fresh clone: data.dvc in git, no cache, no remote
    shutil.rmtree(tmp_path / "data")
    return tmp_path


def test_fresh_clone_renders_the_recorded_data(repo):
    lines: list[str] = []
    restore(load_params(None, [SIZES]), repo, log=lines.append)
    assert (repo / "data/corpus/train.parquet").is_file()
    assert "matches data.dvc" in lines[-1]
    target, recorded = verify(repo)
    assert recorded in (repo / "data.dvc").read_text()
    restore(load_params(None, [SIZES]), repo, log=lines.append)     # present: only checked
    assert lines[-1].startswith("data: data matches data.dvc")


def test_a_different_render_is_refused_and_moved_aside(repo):
    with pytest.raises(NoisyRolloutError) as err:
        restore(load_params(None, ["data.sizes={train: 13, val: 6, test: 6, ood: 6}"]), repo, log=lambda _: None)
    message = str(err.value)
    assert "does not match data.dvc" in message and "\n" not in message
    assert not (repo / "data").exists()
    (rejected,) = repo.glob("data.rejected-*")
    assert rejected.name in message and (rejected / "corpus/train.parquet").is_file()


def test_edited_data_is_refused_with_how_to_restore_or_version_it(repo):
    restore(load_params(None, [SIZES]), repo, log=lambda _: None)
    (repo / "data/corpus/manifest.json").write_text("{}")
    with pytest.raises(NoisyRolloutError, match=r"differs from data.dvc .*dvc checkout data.dvc.*dvc add data"):
        verify(repo)


def test_missing_data_dvc_names_how_to_restore_it(repo):
    (repo / "data.dvc").unlink()
    with pytest.raises(NoisyRolloutError, match=r"data.dvc: not found; restore it with `git checkout -- data.dvc`"):
        restore(load_params(None, [SIZES]), repo, log=lambda _: None)


def test_dvc_pull_then_repro_works_in_a_fresh_clone(tmp_path, monkeypatch):
    """What a user who knows DVC types after `git clone`: `dvc pull` fetches data/ from the repository's default
    remote (.dvc/storage, committed) offline, and `dvc repro` runs on it (here up to the gate)."""
    root = Path(__file__).resolve().parents[1]
    origin = tmp_path / "origin"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):   # the working tree as committed, without a local run's dvc.lock and reports/
        if (root / name).is_file() and name != "dvc.lock" and not name.startswith("reports/"):
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, origin / name)
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run([*git, *cmd], cwd=origin, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], check=True, capture_output=True)
    clone = tmp_path / "clone"
    assert not (clone / "data").exists()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    # plain `dvc pull` fetches data/, then exits 1 naming the stage outputs that have no hash yet (no dvc.lock in
    # a clone that never ran the pipeline: DVC's known behaviour, treeverse/dvc#5913); --allow-missing exits 0
    plain = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert "A       data/" in plain.stdout, plain.stdout + plain.stderr
    missing = plain.stderr.split("Checkout failed for following targets:")[-1].split("Is your cache")[0].split()
    assert plain.returncode == 0 or (missing and all(m.startswith("runs/") for m in missing)), plain.stderr
    shutil.rmtree(clone / "data")
    pull = subprocess.run(["dvc", "pull", "--allow-missing"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    monkeypatch.chdir(clone)
    target, recorded = verify(clone)
    assert recorded in (clone / "data.dvc").read_text()
    assert sorted(p.name for p in (clone / "data/corpus").iterdir()) == [
        "manifest.json", "ood.parquet", "test.parquet", "train.parquet", "val.parquet"]
    repro = subprocess.run(["dvc", "repro", "validate"], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert json.loads((clone / "reports/gate.json").read_text())["success"] is True
