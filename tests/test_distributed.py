"""The Ray + DeepSpeed trainer for real (CPU, gloo, 2 learners, the tiny model)."""

from __future__ import annotations

import pytest

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError

pytestmark = pytest.mark.slow


def toy_params(corpus_dir, out_dir, **train) -> Params:
    return Params.model_validate({
        "data": {"prepared_dir": str(corpus_dir), "min_pixels": 3136, "max_pixels": 3136},
        "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 8},
        "noise": {"distortion": "crop_fill", "alpha0": 0.2},
        "train": {"prompts_per_step": 4, "steps": 3, "lr": 1e-3, "output_dir": str(out_dir), "log_every": 1, **train},
        "cluster": {"num_learners": 2, "cpus_per_learner": 1},
        "checkpoint": {"every": 0, "resume": "never"},
        "tracking": {"enabled": False},
    })


def test_two_learners_end_a_step_with_identical_parameters(ray_cluster, corpus_dir, tiny_model_dir, tmp_path):
    from noisyrollout.train.batching import batch_indices
    from noisyrollout.train.launcher import RayGroup

    # an untrained model scores 0 on everything (zero advantages): the entropy bonus makes the gradient non-zero
    group = RayGroup(toy_params(corpus_dir, tmp_path, entropy_coef=0.01), tiny_model_dir)
    try:
        before = group.call("digest")
        assert before[0] == before[1]
        parts = group.call("step", 0, 3, batch_indices(0, 4, group.num_records, 0))
        after = group.call("digest")
        assert after[0] == after[1] != before[0]          # updated, and bit-identical across ranks
        assert [len(s.rewards) for _, s in parts] == [8, 8]   # 2 whole prompts x (2 clean + 2 noisy) each
    finally:
        group.close()


def test_a_killed_learner_stops_the_run_and_is_named(ray_cluster, corpus_dir, tiny_model_dir, tmp_path):
    from noisyrollout.train.driver import train_rl

    def kill_learner_1(metrics):
        if metrics.step == 0:
            name = next(a for a in ray_cluster.util.list_named_actors() if a.endswith("learner-1"))
            ray_cluster.kill(ray_cluster.get_actor(name))

    with pytest.raises(NoisyRolloutError, match=r"learner actor 'learner-1' on node \w+ \([\d.]+\) died"):
        params = toy_params(corpus_dir, tmp_path, steps=5)
        params.cluster.max_restarts = 0   # stop at once (restarts: tests/reliability/test_self_healing.py)
        train_rl(params, tiny_model_dir, progress=False, on_step=kill_learner_1)
    assert not [a for a in ray_cluster.util.list_named_actors() if "learner" in a]
