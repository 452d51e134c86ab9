"""Correct at any scale: the update is the batch token-mean whatever the split over learners and micro-batches,
uneven shards complete, a failing learner is reported as itself, and actors are cleaned up."""

from __future__ import annotations

import shutil

import pytest
import torch

from noisyrollout.config import Params
from noisyrollout.data.loaders import load_records
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.models.load import load_policy
from tests.gradprobe import ProbeLearner, fixed_batch, local_gradient

G = 4   # responses per prompt


def scale_params(corpus_dir, out_dir, **sections) -> Params:
    base = {
        "data": {"prepared_dir": str(corpus_dir), "min_pixels": 3136, "max_pixels": 3136},
        "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 24},
        "noise": {"distortion": "crop_fill", "alpha0": 0.2},
        "sft": {"fraction": None},   # the learners' prompts are the first train records, as the one-process side's
        "train": {"prompts_per_step": 3, "steps": 2, "lr": 1e-30, "max_grad_norm": 1e9, "output_dir": str(out_dir)},
        "cluster": {"num_learners": 2, "cpus_per_learner": 1},
        "checkpoint": {"every": 0, "resume": "never"},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Params.model_validate(base)


def _local(tiny_model_dir, corpus_dir, params, responses, rewards):
    torch.manual_seed(0)
    processor, model, _ = load_policy(tiny_model_dir, dtype="float32", min_pixels=3136, max_pixels=3136,
                                      freeze_vision=True, with_reference=False)
    records = load_records(str(corpus_dir), "train", min_pixels=3136, max_pixels=3136, limit=len(responses))
    return local_gradient(model, processor, records, params, responses, rewards)


def test_micro_batches_and_mini_batch_split_give_the_whole_batch_gradient(tiny_model_dir, corpus_dir, tmp_path):
    responses, rewards = fixed_batch(3, G, vocab=300)
    whole = _local(tiny_model_dir, corpus_dir, scale_params(corpus_dir, tmp_path), responses, rewards)
    micro = _local(tiny_model_dir, corpus_dir, scale_params(corpus_dir, tmp_path, train={"micro_batch_size": 1}),
                   responses, rewards)
    assert whole.shape[0] == micro.shape[0] == 1 and whole.abs().sum() > 0
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-7)


CASES = [  # (train overrides): the W=2 side also splits into micro-batches of one response (zero-weight padding)
    {"estimator": "grpo", "loss_agg": "token-mean"},
    {"estimator": "reinforce_pp", "loss_agg": "seq-mean-token-sum-norm"},
    {"estimator": "grpo", "loss_agg": "token-mean", "micro_batch_size": 1},
    # uneven micro-batches: one learner's last one holds a single response (or is zero-weight padding), another's
    # several prompts; ZeRO sums gradients in arrival order, so both must run the same passes
    {"estimator": "grpo", "loss_agg": "token-mean", "micro_batch_size": 3},
]


@pytest.mark.slow
def test_two_ray_learners_compute_the_one_learner_gradient(ray_cluster, tiny_model_dir, corpus_dir, tmp_path):
    from noisyrollout.train.launcher import RayGroup

    responses, rewards = fixed_batch(3, G, vocab=300)   # 3 prompts on 2 learners: 2 + 1, uneven token counts
    group = RayGroup(scale_params(corpus_dir, tmp_path), tiny_model_dir, learner_cls=ProbeLearner)
    try:
        for case in CASES:
            params = scale_params(corpus_dir, tmp_path, train=case)
            one = _local(tiny_model_dir, corpus_dir, params, responses, rewards)
            two = group.call("gradient", {"train": case}, [0, 1, 2], responses, rewards)
            torch.testing.assert_close(two[0], two[1])                     # ZeRO gathers the same full gradient
            torch.testing.assert_close(two[0], one, rtol=1e-4, atol=1e-7), case
            # the old rule (each learner its own token-mean, averaged over learners) is measurably different here
            if case.get("micro_batch_size") is None:
                naive = sum(_shard_mean_gradient(tiny_model_dir, corpus_dir, params, responses, rewards, r) for r in (0, 1)) / 2
                assert (naive - one).norm() > 1e-3 * one.norm(), case
    finally:
        group.close()
    assert not [a for a in ray_cluster.util.list_named_actors() if "learner" in a]


def _shard_mean_gradient(tiny_model_dir, corpus_dir, params, responses, rewards, rank):
    """One learner's prompts alone, normalised by its own counts (the pre-fix effective loss of that learner)."""
    from noisyrollout.train.batching import shard_prompts

    mine = shard_prompts(3, 2, 1)[rank][0]
    pruned = params.model_copy(update={"train": params.train.model_copy(update={"prompts_per_step": len(mine)})})
    torch.manual_seed(0)
    processor, model, _ = load_policy(tiny_model_dir, dtype="float32", min_pixels=3136, max_pixels=3136,
                                      freeze_vision=True, with_reference=False)
    records = load_records(str(corpus_dir), "train", min_pixels=3136, max_pixels=3136, limit=3)
    return local_gradient(model, processor, [records[i] for i in mine], pruned, [responses[i] for i in mine],
                          [rewards[i] for i in mine])


class FailingLearner(ProbeLearner):
    """Rank 1 fails before the step's first collective; rank 0 then waits in that collective."""

    def step(self, step, total_steps, indices):
        if self.rank == 1:
            raise ValueError("boom on rank 1")
        return super().step(step, total_steps, indices)


@pytest.mark.slow
def test_uneven_shards_complete_and_a_failing_learner_is_the_reported_cause(ray_cluster, tiny_model_dir, corpus_dir,
                                                                            tmp_path):
    import time

    from noisyrollout.train.driver import train_rl
    from noisyrollout.train.launcher import RayGroup

    # 3 prompts on 2 learners (2 + 1), micro-batches of one response: learner 1 pads with zero-weight backwards
    params = scale_params(corpus_dir, tmp_path, train={"lr": 1e-3, "micro_batch_size": 1, "entropy_coef": 0.01},
                          rollout={"max_new_tokens": 6})
    group = RayGroup(params, tiny_model_dir)
    try:
        assert ray_cluster.get(group.actors[0].node_ip.remote()) == ray_cluster.util.get_node_ip_address()
        before = group.call("digest")
        metrics = group.step(0, 2, [0, 1, 2])
        after = group.call("digest")
        assert after[0] == after[1] != before[0]
        assert metrics.grad_norm > 0 and 0 <= metrics.clip_frac <= 1
    finally:
        group.close()

    start = time.monotonic()
    with pytest.raises(NoisyRolloutError, match="learner-1 failed: ValueError: boom on rank 1"):
        train_rl(params, tiny_model_dir, progress=False,
                 group_factory=lambda p, d: RayGroup(p, d, learner_cls=FailingLearner))
    assert time.monotonic() - start < 120          # not the collective's timeout
    # the cluster was not started by the run (an "external" one): its actors are gone all the same
    assert not [a for a in ray_cluster.util.list_named_actors() if "learner" in a]


@pytest.mark.parametrize("overrides, key", [
    (["noise.anneal=exp", "noise.anneal_coef=30"], "noise.anneal_coef=30 is invalid for noise.anneal=exp"),
    (["noise.anneal=sigmoid", "noise.anneal_coef=-1"], "noise.anneal_coef=-1"),
    (["data.min_pixels=5000", "data.max_pixels=4000"], "data.min_pixels=5000 must not exceed data.max_pixels"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["noise.distortion=crop_fill", "noise.alpha0=1.5"], "noise.alpha0=1.5 is out of range for crop_fill"),
    (["noise.distortion=gaussian", "noise.alpha0=1500"], "noise.alpha0=1500"),
    (["cluster.zero_stage=3"], "cluster.zero_stage"),
    (["train.prompts_per_step=1", "cluster.num_learners=2"], "train.prompts_per_step=1 is too small"),
    (["train.prompts_per_step=3", "cluster.num_learners=2", "train.mini_batches=2"], "at least 4"),
])
def test_settings_that_would_run_wrong_are_one_line_errors(overrides, key):
    from noisyrollout.config import load_params
    from noisyrollout.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_each_schedule_gets_a_valid_default_coefficient():
    from noisyrollout.algo.schedule import anneal
    from noisyrollout.config import load_params

    for mode, coef in (("exp", 0.9), ("pow", 2.0), ("sigmoid", 30.0)):
        noise = load_params(None, [f"noise.anneal={mode}"]).noise
        assert noise.anneal_coef is None and noise.resolved_anneal_coef == coef   # params keep the null
        values = [anneal(s, 5000, mode, noise.resolved_anneal_coef, noise.anneal_mid_step) for s in range(5001)]
        assert all(1.0 >= a >= b >= 0.0 for a, b in zip(values, values[1:])), mode   # no negative alpha, no overflow
        assert values[0] > 0.5 and values[-1] < 1e-6, mode
    # a local trainer has one learner, whatever cluster.num_learners says
    assert load_params(None, ["train.prompts_per_step=1", "cluster.trainer=local"]).world_size == 1


def test_local_driver_checkpoints_resumes_and_logs_each_step_once(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from noisyrollout.train.driver import train_rl

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = scale_params(corpus_dir, tmp_path / "rl", train={"steps": 3, "lr": 1e-3, "prompts_per_step": 2},
                          rollout={"max_new_tokens": 6}, cluster={"trainer": "local"},
                          checkpoint={"every": 1, "resume": "auto"}, tracking={"enabled": True, "experiment": "t",
                                                                              "artifact_root": str(tmp_path / "art")})

    def crash_after_step_1(metrics):   # step 1 is logged to MLflow, its checkpoint is not written
        if metrics.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_rl(params, tiny_model_dir, progress=False, on_step=crash_after_step_1)
    lines: list[str] = []
    result = train_rl(params, tiny_model_dir, progress=False, log=lines.append)
    assert any("resumed from" in line and "step_000001" in line for line in lines)
    assert [m.step for m in result.metrics] == [0, 1, 2]
    history = MlflowClient(uri).get_metric_history(result.run_id, "noise/alpha")
    assert sorted(m.step for m in history) == [0, 1, 2]            # step 1 once, though it ran twice

    # a longer run changes the schedules (u = step / train.steps): it starts over, and says why
    longer = params.model_copy(update={"train": params.train.model_copy(update={"steps": 4})})
    lines.clear()
    result = train_rl(longer, tiny_model_dir, progress=False, log=lines.append)
    assert any("written for train.steps=3" in line for line in lines)
    assert [m.step for m in result.metrics] == [0, 1, 2, 3]

    # other starting weights (a re-trained SFT policy) are another run too: never resumed from the old checkpoints
    other_init = tmp_path / "other_init"
    shutil.copytree(result.model_dir, other_init)
    lines.clear()
    result = train_rl(longer, other_init, progress=False, log=lines.append)
    assert not any("resumed from" in line for line in lines)
    assert [m.step for m in result.metrics] == [0, 1, 2, 3]


def test_learner_env_uses_local_rank_zero_under_ray():
    from noisyrollout.train.learner import dist_env

    env = dist_env(3, 4, "10.0.0.7", 29500)
    assert env == {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}


class _RecordingEngine:
    """Stands in for vLLM's separate copy of the weights (no vLLM on CPU): records what `sync_weights` got."""

    def __init__(self) -> None:
        self.synced: dict[str, torch.Tensor] | None = None

    def sync_weights(self, model, *, trainable_only: bool = False) -> None:
        self.synced = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_resumed_learner_pushes_the_loaded_weights_to_its_rollout_engine(tiny_model_dir, corpus_dir, tmp_path):
    from noisyrollout.train.learner import Learner

    params = scale_params(corpus_dir, tmp_path, train={"lr": 1e-3, "entropy_coef": 0.01, "prompts_per_step": 2},
                          rollout={"max_new_tokens": 6}, cluster={"trainer": "local"}).model_dump(mode="json")
    trained = Learner(0, 1, params, str(tiny_model_dir), distributed=False)
    trained.setup()
    trained.step(0, 2, [0, 1])
    (tmp_path / "ckpt").mkdir()
    trained.save(str(tmp_path / "ckpt"))

    resumed = Learner(0, 1, params, str(tiny_model_dir), distributed=False)
    resumed.setup()
    resumed.rollout_engine = engine = _RecordingEngine()
    assert resumed.digest() != trained.digest()
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.digest() == trained.digest()
    assert engine.synced is not None
    for name, p in trained.model.named_parameters():
        assert torch.equal(engine.synced[name], p.detach()), name


@pytest.mark.slow
def test_sft_disabled_trains_the_base_model_and_reports_without_sft(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    toy = ["data.sizes={train: 24, val: 12, test: 12, ood: 12}", "model.tiny.vocab_size=400", "sft.enabled=false",
           "rollout.n_clean=2", "rollout.n_noisy=2", "rollout.max_new_tokens=6", "train.prompts_per_step=2",
           "train.steps=1", "cluster.trainer=local", "tracking.enabled=false", "checkpoint.every=0"]
    flags = [x for o in toy for x in ("-S", o)]
    for stage in ("render-data", "prepare", "validate", "build-model", "sft", "train"):
        result = CliRunner().invoke(app, [stage, *flags], catch_exceptions=False)
        assert result.exit_code == 0, (stage, result.output)
    assert not (tmp_path / "runs/embedded/sft/model/model.safetensors").exists()   # nothing fine-tuned
    report = (tmp_path / "runs/embedded/rl/report.md").read_text()
    assert "(no SFT)" in report
    assert not (tmp_path / "reports").exists()   # an ad-hoc run (-S overrides): its reports lie beside its outputs
    assert json.loads((tmp_path / "runs/embedded/sft/reports/sft.json").read_text()) == {"enabled": False}
