"""The project files a module's code runs: its import closure inside the repository.

Two things depend on knowing it exactly: a checkpoint's identity (`train/checkpoint.py:code_identity` hashes the
closure of the trainer, so an edit to CLI help or to the evaluation leaves resume working while an edit to the loss
starts fresh), and each DVC stage's `deps` (tests/test_stage_deps.py checks that they cover the closure of
`pipelines.stages.<stage>`, so that `dvc repro` never says "up to date" on results of stale code).

The closure is found statically, by walking each module's syntax tree: every `import` and `from ... import`
anywhere in the file counts (function-level imports too, which the project uses to keep start-up light). Importing
`a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too, so those are part of it. Not followed: modules imported by
name at run time (`importlib.import_module`), which the project's code uses only for the lazy public API of
`noisyrollout/__init__.py` (nothing inside the project reads it) and for the CLI's dispatch to the stage modules.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of project module `name` under `root` (`a/b.py` or `a/b/__init__.py`), or None if it is not one."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)
def _imports(path: Path, name: str, root: Path) -> tuple[str, ...]:
    """Project modules that the file of module `name` imports, with their parent packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]   # `from a import b`: b may be a module
        for target in targets:
            if target and module_file(target, root) is not None:
                found.update(m for m in _with_parents(target) if module_file(m, root) is not None)
    return tuple(sorted(found))


def import_closure(modules: Iterable[str], root: Path = REPO_ROOT) -> list[Path]:
    """Every project file that importing `modules` runs, sorted (paths under `root`)."""
    seen: set[str] = set()
    todo = [m for name in modules for m in _with_parents(name)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            raise ModuleNotFoundError(f"{name}: not a module of the project under {root}")
        seen.add(name)
        todo.extend(m for m in _imports(path, name, root) if m not in seen)
    return sorted(module_file(m, root) for m in seen)


def code_hash(modules: Iterable[str], root: Path = REPO_ROOT) -> str:
    """A SHA-256 of the files in the import closure of `modules` (their paths relative to `root`, and contents)."""
    h = hashlib.sha256()
    for file in import_closure(modules, root):
        h.update(str(file.relative_to(root)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def covering_paths(files: Iterable[Path], root: Path = REPO_ROOT) -> list[str]:
    """`files` as the fewest paths relative to `root`: a folder stands for its files when every file in it (caches
    aside) is one of `files`. What a DVC stage's code `deps` should list, exactly."""
    files = {Path(f).resolve() for f in files}

    def members(folder: Path) -> set[Path]:
        return {p.resolve() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    out: list[str] = []
    for file in sorted(files):
        folder = file.parent
        while folder != root and folder.parent != root and members(folder.parent) <= files:
            folder = folder.parent
        path = folder if members(folder) <= files else file
        rel = str(path.relative_to(root))
        if not any(rel == o or rel.startswith(o + "/") for o in out):
            out.append(rel)
    return out
