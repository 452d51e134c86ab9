"""Each DVC stage's code `deps` are exactly the project code that stage runs: the import closure of its module
`pipelines.stages.<stage>` (noisyrollout/sources.py), as the fewest paths (`covering_paths`). A file missing from
them would let `dvc repro` say "up to date" on results of stale code; a file too many reruns a stage for nothing.
(tests/test_dag.py shows `dvc status` picking up an edit of the grader and of the SFT code in a real repo.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noisyrollout.sources import covering_paths, import_closure

ROOT = Path(__file__).resolve().parents[1]
CODE = ("noisyrollout/", "pipelines/", "eval/")


def dag() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def drift(stages: dict) -> list[str]:
    """One line per stage whose code deps differ from its import closure, naming the stage and the files."""
    problems = []
    for name, stage in stages.items():
        if stage["cmd"] != f"python -m pipelines.stages.{name}":
            problems.append(f"{name}: cmd is {stage['cmd']!r}, not 'python -m pipelines.stages.{name}'")
            continue
        listed = {d for d in stage.get("deps", []) if d.startswith(CODE)}
        closure = import_closure([f"pipelines.stages.{name}"])
        covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in listed)   # noqa: E731
        missing = [str(f.relative_to(ROOT)) for f in closure if not covered(str(f.relative_to(ROOT)))]
        expected = set(covering_paths(closure))
        extra = sorted(listed - expected) if not missing else []
        problems += [f"{name}: runs {f}, which none of its deps covers" for f in missing]
        problems += [f"{name}: lists {d}, more than the code it runs (expected exactly {sorted(expected)})"
                     for d in extra]
    return problems


def test_every_stage_lists_exactly_the_code_it_runs():
    assert drift(dag()) == []


def test_a_dropped_dep_is_named_with_its_stage():
    stages = dag()
    stages["evaluate"]["deps"].remove("noisyrollout/algo/reward.py")
    stages["sft"]["deps"].remove("noisyrollout/train/sft.py")
    assert drift(stages) == ["sft: runs noisyrollout/train/sft.py, which none of its deps covers",
                             "evaluate: runs noisyrollout/algo/reward.py, which none of its deps covers"]


def test_a_dep_on_code_the_stage_does_not_run_is_named():
    stages = dag()
    stages["prepare"]["deps"].append("noisyrollout/algo/loss.py")
    (line,) = drift(stages)
    assert line.startswith("prepare: lists noisyrollout/algo/loss.py, more than the code it runs")


@pytest.mark.parametrize("stage, runs, not_runs", [
    ("evaluate", ["eval/grading.py", "noisyrollout/algo/reward.py", "pipelines/stages/evaluate.py"],
     ["noisyrollout/train/step.py", "pipelines/registry.py", "pipelines/cli.py"]),
    ("sft", ["noisyrollout/train/sft.py", "noisyrollout/train/scoring.py", "noisyrollout/algo/augment.py"],
     ["noisyrollout/train/step.py", "eval/grading.py"]),
    ("train", ["noisyrollout/train/step.py", "noisyrollout/algo/loss.py", "noisyrollout/config.py"],
     ["noisyrollout/train/sft.py", "eval/grading.py", "pipelines/registry.py", "pipelines/cli.py"]),
    ("register", ["pipelines/registry.py"], ["noisyrollout/train/step.py", "eval/grading.py"]),
])
def test_the_closures_hold_what_the_issue_named(stage, runs, not_runs):
    files = {str(f.relative_to(ROOT)) for f in import_closure([f"pipelines.stages.{stage}"])}
    assert set(runs) <= files and not set(not_runs) & files


def test_stage_deps_command_names_and_fixes_drift(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    spec = tmp_path / "dvc.yaml"
    spec.write_text((ROOT / "dvc.yaml").read_text().replace("      - eval/grading.py\n", "", 1))
    checked = CliRunner().invoke(app, ["stage-deps", "--dvc-yaml", str(spec)])
    assert checked.exit_code == 1 and "evaluate: +eval/grading.py" in checked.output
    fixed = CliRunner().invoke(app, ["stage-deps", "--dvc-yaml", str(spec), "--write"])
    assert fixed.exit_code == 0 and spec.read_text() == (ROOT / "dvc.yaml").read_text()   # comments and style kept
