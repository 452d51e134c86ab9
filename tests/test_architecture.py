"""Imports run one way: pipelines/ -> eval/ -> noisyrollout/ (the library), and the algorithm core is pure.

The contracts are `[tool.importlinter]` in pyproject.toml, checked by import-linter's real `lint-imports` (grimp
reads every import statement, function-level ones included). The tests also show the check can fail: a copy of the
project with one forbidden import added breaks the contract it should.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}   # the packages under `root`, not the installed ones
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_project_keeps_its_import_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in ("noisyrollout", "pipelines", "eval"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


@pytest.mark.parametrize("file, code, broken", [
    ("noisyrollout/train/step.py", "def _card():\n    from pipelines.registry import model_card\n    return model_card",
     "Layers"),
    ("noisyrollout/rollout/chat.py", "def _grade():\n    from eval.grading import grade_prediction\n    return grade_prediction",
     "Layers"),
    ("eval/report.py", "def _flow():\n    import pipelines.flow\n    return pipelines.flow", "Layers"),
    ("noisyrollout/train/driver.py", "def _gate():\n    import great_expectations\n    return great_expectations",
     "The library imports no orchestrator"),
    ("noisyrollout/train/driver.py", "def _register():\n    import mlflow\n    return mlflow", "In the library only noisyrollout.tracking"),
    ("noisyrollout/algo/loss.py", "def _ray():\n    import ray\n    return ray", "The algorithm core is pure"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, file, code, broken):
    root = _copy(tmp_path)
    _append(root / file, code)
    result = lint(root)
    assert result.returncode != 0
    line = next(line for line in result.stdout.splitlines() if line.startswith(broken))
    assert " BROKEN" in line, result.stdout[-3000:]


def test_the_library_names_neither_pipelines_nor_eval():
    """The text check of the issue: `git grep "from pipelines|import pipelines|from eval|import eval" noisyrollout/`."""
    pattern = re.compile(r"from pipelines|import pipelines|from eval|import eval")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "noisyrollout").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_every_imported_package_is_declared():
    """Each third-party package the shipped code imports (noisyrollout/, eval/, pipelines/, function-level imports
    included) is a dependency in pyproject.toml, or an optional extra's (vllm: `gpu`)."""
    import ast
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()   # noqa: E731
    declared = {norm(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in specs}
    providers = md.packages_distributions()
    imported: dict[str, str] = {}
    for package in ("noisyrollout", "pipelines", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("noisyrollout", "pipelines", "eval"):
                        imported.setdefault(top, str(path.relative_to(ROOT)))
    undeclared = {top: where for top, where in imported.items()
                  if not {norm(d) for d in providers.get(top, [top])} & declared}
    assert undeclared == {}
