"""data.dvc on a fresh clone: the embedded corpus re-renders to the recorded hash; a different render or an edited
data/ is refused in one line, never taken as new data. Real DVC in a temporary git repo."""

from __future__ import annotations

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
    from noisyrollout import stages

    stages.render_data(restore_params, log=lambda _: None)
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
