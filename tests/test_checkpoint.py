"""Atomic checkpoints: only complete folders are ever found; old ones are pruned."""

from noisyrollout.train import checkpoint


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


def test_code_identity_changes_with_any_source_file(tmp_path):
    package = tmp_path / "pkg"
    (package / "train").mkdir(parents=True)
    (package / "train" / "step.py").write_text("x = 1\n")
    (package / "notes.txt").write_text("not code")
    before = checkpoint.code_identity(package)
    (package / "notes.txt").write_text("still not code")
    assert checkpoint.code_identity(package) == before
    (package / "train" / "step.py").write_text("x = 2\n")
    assert checkpoint.code_identity(package) != before
    assert len(checkpoint.code_identity()) == 64           # the installed package itself
