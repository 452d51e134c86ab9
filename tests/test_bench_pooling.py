"""`make bench` pools one side's repeated runs: medians over every timed step of every run."""

from __future__ import annotations

import pytest

from bench.run import pooled


def test_repeated_runs_pool_their_steps():
    runs = [{"step_times": [1.0, 3.0], "step_tokens": [100.0, 300.0], "median_step_s": 2.0, "peak_rss_mb": 10.0,
             "phases_s": {"generate": 0.4}},
            {"step_times": [2.0, 4.0, 5.0], "step_tokens": [100.0, 200.0, 500.0], "median_step_s": 4.0,
             "peak_rss_mb": 12.0, "phases_s": {"generate": 0.6}}]
    out = pooled(runs, rollouts_per_step=10)
    assert out["median_step_s"] == 3.0                       # median of 1, 2, 3, 4, 5
    assert out["rollouts_per_s"] == pytest.approx(10 / 3)
    assert out["tokens_per_s"] == 100.0                      # median of 100, 100, 50, 50, 100
    assert out["mean_completion_tokens"] == pytest.approx(1200 / 50)
    assert out["peak_rss_mb"] == 12.0 and out["run_medians"] == [2.0, 4.0]
    assert out["phases_s"]["generate"] == pytest.approx(0.5)
    one = pooled(runs[:1], rollouts_per_step=10)
    assert one["median_step_s"] == 2.0 and one["run_medians"] == [2.0]
