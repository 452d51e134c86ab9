"""Atomic checkpoints: only complete folders are ever found; old ones are pruned."""

import shutil
from pathlib import Path

from noisyrollout.sources import import_closure
from noisyrollout.train import checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    done = checkpoint.commit(checkpoint.staging_dir(tmp_path, 2), {"step": 2, "metrics": []}, keep_last=3)
    assert done.name == "step_000002" and checkpoint.latest(tmp_path) == done
    # a kill during writing leaves a .tmp folder; a folder without trainer_state.json is incomplete too
    partial = checkpoint.staging_dir(tmp_path, 3)
    (partial / "deepspeed").mkdir()
    (tmp_path / "step_000004").mkdir()
    assert checkpoint.latest(tmp_path) == done
    assert checkpoint.read_state(done)["step"] == 2


def test_keep_last_prunes_old_and_stale(tmp_path):
    for step in (1, 2, 3):
        checkpoint.commit(checkpoint.staging_dir(tmp_path, step), {"step": step, "metrics": []}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert not list(tmp_path.glob("*.tmp"))


def test_batch_order_is_a_pure_function_of_the_step():
    from noisyrollout.train.batching import batch_indices

    epoch = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=7)]   # 5 steps x 4 = one epoch of 20
    assert sorted(epoch) == list(range(20))
    assert batch_indices(3, 4, 20, seed=7) == batch_indices(3, 4, 20, seed=7) != batch_indices(3, 4, 20, seed=8)
    assert batch_indices(5, 4, 20, seed=7) != batch_indices(0, 4, 20, seed=7)       # a new shuffle next epoch


def test_fingerprint_ignores_logging_but_not_the_algorithm_or_the_run_length():
    from noisyrollout.config import Params

    base = Params().model_dump(mode="json")
    fp = checkpoint.params_fingerprint(base)
    moved = Params.model_validate({"train": {"output_dir": "elsewhere", "log_every": 7}, "tracking": {"enabled": False}})
    assert checkpoint.params_fingerprint(moved.model_dump(mode="json")) == fp
    # the schedules are functions of step / train.steps: a longer run is another run
    longer = Params.model_validate({"train": {"steps": 999}}).model_dump(mode="json")
    assert checkpoint.params_fingerprint(longer) != fp
    assert checkpoint.params_fingerprint(longer, ignore=("train.steps",)) == checkpoint.params_fingerprint(
        base, ignore=("train.steps",))
    other = Params.model_validate({"rollout": {"n_noisy": 0}})
    assert checkpoint.params_fingerprint(other.model_dump(mode="json")) != fp


def _project_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for package in ("noisyrollout", "pipelines", "eval"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


def test_code_identity_is_the_training_code_alone(tmp_path):
    """Resume survives edits to what training does not run (CLI help, the registry's model card, the grader of
    `evaluate`); an edit to the loss is another run."""
    root = _project_copy(tmp_path)
    before = checkpoint.code_identity(root)
    assert before == checkpoint.code_identity(REPO)           # the copy is the project itself
    _edit(root / "pipelines/cli.py", '"""List every parameter', '"""Print every parameter')
    _edit(root / "pipelines/registry.py", "NoisyRollout GRPO policy", "A NoisyRollout GRPO policy")
    _edit(root / "eval/grading.py", "from __future__ import annotations", "from __future__ import annotations  # edited")
    (root / "README.md").write_text("not code")
    assert checkpoint.code_identity(root) == before
    _edit(root / "noisyrollout/algo/loss.py", "from __future__ import annotations",
          "from __future__ import annotations\nCLIP_EDITED = True")
    assert checkpoint.code_identity(root) != before


def test_the_training_closure_holds_the_step_and_not_the_orchestration():
    files = {str(p.relative_to(REPO)) for p in import_closure(checkpoint.TRAINING_MODULES)}
    assert {"noisyrollout/train/step.py", "noisyrollout/algo/loss.py", "noisyrollout/algo/advantages.py",
            "noisyrollout/algo/augment.py", "noisyrollout/algo/reward.py", "noisyrollout/train/scoring.py",
            "noisyrollout/rollout/hf_engine.py", "noisyrollout/config.py"} <= files
    assert not {f for f in files if f.startswith(("pipelines/", "eval/"))}
    assert "noisyrollout/train/sft.py" not in files
