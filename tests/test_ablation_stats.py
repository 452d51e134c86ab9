"""The ablation's statistics against references: bootstrap intervals against the normal approximation, paired
differences against their direct computation, subsets against the OOD split's cells, and the report's verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.ablation import (
    Run,
    bootstrap_mean,
    correctness,
    markdown_tables,
    read_curve_csv,
    read_samples_csv,
    reward_gap,
    sample_subsets,
    summarise,
    verdicts,
)
from noisyrollout.data.shifts import CELLS


def test_bootstrap_interval_matches_the_normal_approximation_for_one_seed() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random(4000) < 0.6).astype(float)[None, :]            # one seed: only samples vary
    mean, low, high = bootstrap_mean(x, reps=4000, seed=1)
    se = math.sqrt(mean * (1 - mean) / x.shape[1])
    assert mean == pytest.approx(x.mean())
    assert low == pytest.approx(mean - 1.96 * se, abs=0.004) and high == pytest.approx(mean + 1.96 * se, abs=0.004)


def test_bootstrap_interval_widens_with_seed_spread() -> None:
    rng = np.random.default_rng(2)
    same = np.stack([(rng.random(2000) < 0.5).astype(float)] * 3)
    spread = np.stack([(rng.random(2000) < p).astype(float) for p in (0.35, 0.5, 0.65)])
    _, lo1, hi1 = bootstrap_mean(same, reps=1000)
    _, lo2, hi2 = bootstrap_mean(spread, reps=1000)
    assert hi2 - lo2 > 3 * (hi1 - lo1)
    with pytest.raises(ValueError):
        bootstrap_mean(np.zeros((0, 3)))


def _keys_groups() -> tuple[list, list]:
    keys = [("embedded_test", f"t{i}") for i in range(30)]
    groups = ["count"] * 30
    for i, (shift, level) in enumerate(CELLS * 10):
        keys.append(("embedded_ood", f"o{i}"))
        groups.append(f"{shift}-{level}")
    return keys, groups


def test_subsets_follow_the_cells_and_groups() -> None:
    keys, groups = _keys_groups()
    subsets = sample_subsets(keys, groups)
    assert list(subsets)[:4] == ["test", "ood", "ood-dev", "ood-heldout"]
    assert len(subsets["test"]) == 30 and len(subsets["ood"]) == 210
    assert len(subsets["ood-dev"]) == 4 * 3 * 10 and len(subsets["ood-heldout"]) == 3 * 3 * 10
    assert len(subsets["shift:blur"]) == 30 and len(subsets["cell:blur-2"]) == 10
    assert all(groups[i] == "jpeg-3" for i in subsets["cell:jpeg-3"])


def test_paired_difference_equals_the_direct_computation_and_verdicts_follow_the_interval() -> None:
    keys, groups = _keys_groups()
    subsets = sample_subsets(keys, groups)
    rng = np.random.default_rng(3)
    n = len(keys)
    runs = []
    for seed in range(3):
        base = (rng.random(n) < 0.5).astype(float)
        better = base.copy()
        flip = np.where(base == 0)[0][:60]                         # arm "up" answers 60 more samples right
        better[flip] = 1
        worse = base.copy()
        worse[subsets["test"]] = 0                                 # arm "down" loses the in-domain test split
        runs += [Run("grpo", seed, base), Run("up", seed, better), Run("down", seed, worse)]
    table = summarise(runs, subsets, reps=500)
    for arm in ("up", "down"):
        for subset, idx in subsets.items():
            direct = np.mean([r.correct[idx].mean() for r in runs if r.arm == arm]) - np.mean(
                [r.correct[idx].mean() for r in runs if r.arm == "grpo"])
            assert table[arm][subset]["diff"] == pytest.approx(direct)
    assert table["grpo"]["test"]["per_seed"] == {s: pytest.approx(runs[3 * s].correct[subsets["test"]].mean())
                                                 for s in range(3)}
    assert "diff" not in table["grpo"]["test"]
    assert table["up"]["ood"]["diff_low"] > 0                      # strictly better everywhere it changed
    assert table["down"]["test"]["diff_high"] < 0
    words = "\n".join(verdicts(table))
    assert "up is better than GRPO on OOD, all shifts" in words
    assert "down is worse than GRPO on in-domain test" in words
    assert "down is not distinguishable from GRPO on OOD, all shifts: +0.0" in words
    md = markdown_tables(table, {"test": 0.5}, reward_gap(runs))
    assert md.count("\n| up |") == 3 and "| SFT start | 50.0 |" in md


def test_csv_readers_and_missing_samples() -> None:
    samples = read_samples_csv("benchmark,id,group,correct\nembedded_ood,a,blur-1,1\nembedded_test,b,count,0\n")
    assert samples == {("embedded_ood", "a"): ("blur-1", 1), ("embedded_test", "b"): ("count", 0)}
    assert correctness(samples, [("embedded_test", "b"), ("embedded_ood", "a")]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="same samples"):
        correctness(samples, [("embedded_test", "zzz")])
    curve = read_curve_csv("step,reward_clean,reward_noisy\n0,0.5,0.25\n1,0.75,\n")
    assert curve[0] == {"step": 0.0, "reward_clean": 0.5, "reward_noisy": 0.25} and math.isnan(curve[1]["reward_noisy"])


def test_reward_gap_per_step_mean_over_seeds() -> None:
    curve = lambda gap: [{"reward_clean": 0.8, "reward_noisy": 0.8 - g} for g in gap]  # noqa: E731
    runs = [Run("crop_fill", 0, np.zeros(1), curve([0.4] * 12)), Run("crop_fill", 1, np.zeros(1), curve([0.2] * 12)),
            Run("grpo", 0, np.zeros(1), [{"reward_clean": 0.8, "reward_noisy": math.nan}] * 12)]
    gaps = reward_gap(runs)
    assert gaps["crop_fill"]["first"] == pytest.approx(0.3) and len(gaps["crop_fill"]["per_step"]) == 12
    assert math.isnan(gaps["grpo"]["first"])
