"""Properties of the algorithm core (issue #25, item 8), for any input in bounds, not only hand-picked ones: the
advantage estimators, the PPO-clip loss and the schedules (noise annealing, learning rate) against SPEC's formulas
(/work/shared/SPEC.md sections 1 and 3) and their invariants. Hypothesis, derandomized, a bounded number of examples.

Reward bounds: any finite reward of magnitude up to 1e6 (the reward itself lies in [0, 1]); where an identity is
checked exactly the rewards are multiples of 1/8 (binary-exact, so the float rounding is not what is measured).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noisyrollout.algo.advantages import EPS, ESTIMATORS, group_advantages
from noisyrollout.algo.loss import policy_loss
from noisyrollout.algo.schedule import ANNEAL_MODES, anneal
from noisyrollout.config import ANNEAL_COEFS

PROPS = settings(derandomize=True, max_examples=80, deadline=None, database=None)
GROUPED = ("grpo", "rloo", "dr_grpo")   # the estimators that use the groups

finite_reward = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
exact_reward = st.integers(-800, 800).map(lambda k: k / 8)


@st.composite
def batches(draw: st.DrawFn, reward: st.SearchStrategy[float] = finite_reward,
            min_group: int = 1) -> tuple[list[float], list[int]]:
    """(rewards, group ids): 1-5 prompts of `min_group`-8 responses each, the groups interleaved as a batch may."""
    sizes = draw(st.lists(st.integers(min_group, 8), min_size=1, max_size=5))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(groups))))
    groups = [groups[i] for i in order]
    return [draw(reward) for _ in groups], groups


def _members(groups: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


# ------------------------------------------------------------------------------------------------------ advantages
@PROPS
@given(batches(), st.sampled_from(ESTIMATORS))
def test_advantages_are_finite_float32_one_per_response(batch, estimator):
    rewards, groups = batch
    adv = group_advantages(rewards, groups, estimator)
    assert adv.dtype == torch.float32 and adv.shape == (len(rewards),)
    assert torch.isfinite(adv).all(), (rewards, groups, adv)


equal_groups = st.lists(st.tuples(finite_reward, st.integers(2, 12)), min_size=1, max_size=5)


def _equal_groups(spec: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
    return [r for r, n in spec for _ in range(n)], [g for g, (_, n) in enumerate(spec) for _ in range(n)]


@PROPS
@given(equal_groups, st.sampled_from(GROUPED))
def test_an_all_equal_group_of_float32_rewards_has_zero_advantage(spec, estimator):
    """Every response of a group scored the same: nothing to learn, advantage exactly 0 (no NaN from std 0). The
    step hands over float32 rewards (`torch.tensor` of the scores), whose group sums are exact in float64."""
    rewards, groups = _equal_groups(spec)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), groups, estimator)
    assert adv.tolist() == [0.0] * len(rewards)


@PROPS
@given(equal_groups, st.sampled_from(GROUPED))
def test_an_all_equal_group_of_float64_rewards_is_zero_up_to_rounding(spec, estimator):
    """Python floats (float64): the group mean is rounded, and GRPO divides that rounding by eps = 1e-6 (measured:
    12 rewards of 0.9 give |A| = 2.2e-10): at most n ulps of the reward over eps, never NaN."""
    rewards, groups = _equal_groups(spec)
    adv = group_advantages(rewards, groups, estimator)
    for (r, n), idx in zip(spec, _members(groups).values()):
        bound = n * math.ulp(r) / (EPS if estimator == "grpo" else 1.0)
        assert all(abs(a) <= bound for a in adv[idx].tolist()), (r, n, adv[idx])


@PROPS
@given(equal_groups)
def test_an_all_equal_group_of_float64_rewards_has_exactly_zero_grpo_advantage(spec):
    rewards, groups = _equal_groups(spec)
    assert group_advantages(rewards, groups, "grpo").tolist() == [0.0] * len(rewards)


@PROPS
@given(batches(min_group=2))
def test_grpo_is_zero_mean_and_unit_std_per_group_up_to_eps(batch):
    """SPEC 1.4: A = (r - mean) / (std + 1e-6), std unbiased: per group mean 0 and std s / (s + 1e-6) (1 unless the
    group is (nearly) constant)."""
    rewards, groups = batch
    adv = group_advantages(rewards, groups, "grpo").double()
    r = torch.tensor(rewards, dtype=torch.float64)
    for idx in _members(groups).values():
        a, s = adv[idx], float(r[idx].std())
        # the group mean is rounded by up to n ulps of the largest reward, and the division by s + eps scales that
        rounding = 1e-5 + 4 * len(idx) * math.ulp(max(abs(rewards[i]) for i in idx)) / (s + EPS)
        assert abs(float(a.mean())) <= rounding, (rewards, groups)
        assert float(a.std()) == pytest.approx(s / (s + EPS), abs=rounding)


@PROPS
@given(batches(exact_reward, min_group=2))
def test_grpo_is_unit_std_for_a_group_that_is_not_constant(batch):
    rewards, groups = batch
    adv = group_advantages(rewards, groups, "grpo").double()
    for idx in _members(groups).values():
        if len({rewards[i] for i in idx}) > 1:   # spread >= 1/8: eps changes the std by < 1e-5
            assert float(adv[idx].std()) == pytest.approx(1.0, abs=2e-5)


@PROPS
@given(batches())
def test_a_group_of_one_gets_mean_0_and_std_1(batch):
    """SPEC 1.4: a group of size 1 is scored against mean 0, std 1 (GRPO), keeps r (RLOO), r - 0 (Dr. GRPO)."""
    rewards, groups = batch
    alone = [i for idx in _members(groups).values() if len(idx) == 1 for i in idx]
    for estimator, expected in (("grpo", lambda r: r / (1 + EPS)), ("rloo", lambda r: r), ("dr_grpo", lambda r: r)):
        adv = group_advantages(rewards, groups, estimator)
        for i in alone:
            assert float(adv[i]) == pytest.approx(expected(rewards[i]), rel=1e-6, abs=1e-6)


@PROPS
@given(batches(min_group=2))
def test_rloo_is_the_leave_one_out_baseline(batch):
    """A_i = r_i * n/(n-1) - mean * n/(n-1) is r_i minus the mean of the other n-1 rewards of its group."""
    rewards, groups = batch
    adv = group_advantages(rewards, groups, "rloo").double()
    for idx in _members(groups).values():
        for i in idx:
            others = [rewards[j] for j in idx if j != i]
            expected = rewards[i] - math.fsum(others) / len(others)
            scale = max(abs(rewards[j]) for j in idx)
            assert float(adv[i]) == pytest.approx(expected, rel=1e-6, abs=1e-9 * scale + 1e-30)


@PROPS
@given(batches())
def test_dr_grpo_is_reward_minus_group_mean(batch):
    rewards, groups = batch
    adv = group_advantages(rewards, groups, "dr_grpo").double()
    for idx in _members(groups).values():
        mean = math.fsum(rewards[i] for i in idx) / len(idx) if len(idx) > 1 else 0.0
        for i in idx:
            assert float(adv[i]) == pytest.approx(rewards[i] - mean, rel=1e-6, abs=1e-9 * abs(mean) + 1e-30)


@PROPS
@given(batches(exact_reward, min_group=2), st.lists(exact_reward, min_size=5, max_size=5), st.sampled_from(GROUPED))
def test_adding_a_constant_to_a_group_changes_nothing(batch, shifts, estimator):
    rewards, groups = batch
    shifted = [r + shifts[g] for r, g in zip(rewards, groups)]
    assert group_advantages(shifted, groups, estimator).tolist() == pytest.approx(
        group_advantages(rewards, groups, estimator).tolist(), abs=1e-5)


@PROPS
@given(batches(exact_reward), exact_reward)
def test_reinforce_pp_ignores_groups_and_a_batch_wide_constant(batch, shift):
    rewards, groups = batch
    adv = group_advantages(rewards, groups, "reinforce_pp")
    assert adv.tolist() == group_advantages(rewards, [0] * len(rewards), "reinforce_pp").tolist()
    assert group_advantages([r + shift for r in rewards], groups, "reinforce_pp").tolist() == pytest.approx(
        adv.tolist(), abs=1e-4)


@PROPS
@given(batches(exact_reward, min_group=2), st.sampled_from([-4.0, -1.5, -0.25, 0.5, 2.0, 8.0]))
def test_scaling_the_rewards(batch, k):
    """rloo and dr_grpo are linear (A(k r) = k A(r)); grpo is scale-free up to eps (A(k r) = sign(k) A(r)) on groups
    that are not constant, and 0 on those that are."""
    rewards, groups = batch
    scaled = [k * r for r in rewards]
    for estimator in ("rloo", "dr_grpo"):
        assert group_advantages(scaled, groups, estimator).tolist() == pytest.approx(
            (k * group_advantages(rewards, groups, estimator)).tolist(), rel=1e-6, abs=1e-6)
    assert group_advantages(scaled, groups, "grpo").tolist() == pytest.approx(
        (math.copysign(1.0, k) * group_advantages(rewards, groups, "grpo")).tolist(), rel=1e-4, abs=1e-4)


@PROPS
@given(st.lists(st.tuples(st.lists(exact_reward, min_size=0, max_size=6), st.lists(exact_reward, max_size=6))
                .filter(lambda cn: len(cn[0]) + len(cn[1]) > 0), min_size=1, max_size=4),
       st.sampled_from(ESTIMATORS), st.randoms(use_true_random=False))
def test_clean_and_noisy_rollouts_of_a_prompt_are_one_group(prompts, estimator, rnd):
    """SPEC 1.4: one group per prompt = its n_clean + n_noisy responses, in whatever order the batch holds them (the
    step's group id is the prompt index): the same advantages as the prompt's rewards scored as one list, and with
    n_noisy = 0 the vanilla GRPO of the clean ones."""
    rows = [(p, r) for p, (clean, noisy) in enumerate(prompts) for r in [*clean, *noisy]]
    rnd.shuffle(rows)   # the clean and noisy responses of a prompt interleaved with other prompts'
    adv = group_advantages([r for _, r in rows], [p for p, _ in rows], estimator)
    for p, (clean, noisy) in enumerate(prompts):
        mine = [i for i, (q, _) in enumerate(rows) if q == p]
        alone = group_advantages([rows[i][1] for i in mine], [0] * len(mine), estimator)
        if estimator != "reinforce_pp":   # batch-wide: its groups are ignored by definition
            assert adv[mine].tolist() == pytest.approx(alone.tolist(), abs=1e-6)
        if not noisy and estimator == "grpo" and len(clean) > 1:
            r = torch.tensor(clean, dtype=torch.float64)
            vanilla = (r - r.mean()) / (r.std() + 1e-6)
            assert sorted(adv[mine].tolist()) == pytest.approx(sorted(vanilla.tolist()), abs=1e-6)


# ------------------------------------------------------------------------------------------------------------ loss
@st.composite
def loss_inputs(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """A batch of B responses of T tokens: log-probs in [-20, 0], advantages in [-10, 10], any 0/1 mask."""
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))

    def tensor(lo: float, hi: float, shape: tuple[int, ...]) -> torch.Tensor:
        values = draw(st.lists(st.floats(lo, hi), min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(values, dtype=torch.float64).reshape(shape)

    mask = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=b * t, max_size=b * t)),
                        dtype=torch.float64).reshape(b, t)
    return {"logp": tensor(-20, 0, (b, t)), "old_logp": tensor(-20, 0, (b, t)), "advantages": tensor(-10, 10, (b,)),
            "mask": mask, "entropy": tensor(0, 10, (b, t)), "ref_logp": tensor(-20, 0, (b, t))}


def _reference(x: dict[str, torch.Tensor], eps: float, agg: str, entropy_coef: float,
               kl_coef: float) -> tuple[float, float]:
    """SPEC 1.6, token by token in plain Python floats: (the loss, the same sum over absolute values, for the
    tolerance of a sum that cancels)."""
    b, t = x["logp"].shape
    def reduce(per_token: list[list[float]]) -> float:
        mask = x["mask"].tolist()
        if agg == "token-mean":
            n = sum(map(sum, mask))
            return math.fsum(v * m for row, mrow in zip(per_token, mask) for v, m in zip(row, mrow)) / max(n, 1.0)
        return math.fsum(math.fsum(v * m for v, m in zip(row, mrow)) / t for row, mrow in zip(per_token, mask)) / b
    pg, kl = [], []
    for i in range(b):
        a = float(x["advantages"][i])
        pg_row, kl_row = [], []
        for j in range(t):
            ratio = math.exp(float(x["logp"][i, j] - x["old_logp"][i, j]))
            pg_row.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
            d = float(x["ref_logp"][i, j] - x["logp"][i, j])
            kl_row.append(min(max(math.exp(d) - d - 1, -10.0), 10.0))
        pg.append(pg_row)
        kl.append(kl_row)
    value = reduce(pg) - entropy_coef * reduce(x["entropy"].tolist()) + kl_coef * reduce(kl)
    def absolute(rows: list[list[float]]) -> list[list[float]]:
        return [[abs(v) for v in row] for row in rows]
    return value, reduce(absolute(pg)) + entropy_coef * reduce(x["entropy"].tolist()) + kl_coef * reduce(absolute(kl))


@PROPS
@given(loss_inputs(), st.floats(0.01, 0.5), st.sampled_from(["token-mean", "seq-mean-token-sum-norm"]),
       st.sampled_from([0.0, 1e-3, 0.5]), st.sampled_from([0.0, 1e-2, 1.0]))
def test_the_loss_is_specs_formula_and_finite(x, eps, agg, entropy_coef, kl_coef):
    out = policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], clip_eps=eps, entropy=x["entropy"],
                      entropy_coef=entropy_coef, ref_logp=x["ref_logp"], kl_coef=kl_coef, agg=agg)
    expected, magnitude = _reference(x, eps, agg, entropy_coef, kl_coef)
    assert math.isfinite(float(out.loss))
    assert float(out.loss) == pytest.approx(expected, abs=1e-12 * magnitude + 1e-15)
    assert 0.0 <= float(out.clip_frac) <= 1.0


@PROPS
@given(loss_inputs(), st.floats(0.01, 0.5))
def test_the_gradient_is_zero_exactly_where_the_clip_holds(x, eps):
    """d loss / d logp per token: 0 where the clipped branch is the max (A > 0 and ratio > 1 + eps, A < 0 and
    ratio < 1 - eps) or off the mask, and -A * ratio / n_tokens elsewhere (token-mean)."""
    logp = x["logp"].clone().requires_grad_(True)
    policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], clip_eps=eps).loss.backward()
    ratio = torch.exp(x["logp"] - x["old_logp"])
    a = x["advantages"].unsqueeze(-1).expand_as(ratio)
    clipped = ((a > 0) & (ratio > 1 + eps)) | ((a < 0) & (ratio < 1 - eps))
    near_edge = ((ratio - (1 + eps)).abs() < 1e-9) | ((ratio - (1 - eps)).abs() < 1e-9)
    n = max(float(x["mask"].sum()), 1.0)
    expected = torch.where(clipped, torch.zeros_like(ratio), -a * ratio * x["mask"] / n)
    keep = ~near_edge
    assert torch.allclose(logp.grad[keep], expected[keep], rtol=1e-9, atol=1e-12)
    assert (logp.grad[clipped & keep] == 0).all()


# -------------------------------------------------------------------------------------------------- noise schedule
def _spec_decay(s: int, t: int, mode: str, coef: float, mid: float) -> float:
    """SPEC section 3, written out."""
    u = s / t
    if mode == "none":
        return 1.0
    if mode == "linear":
        return 1 - u
    if mode == "pow":
        return 1 - u ** coef
    if mode == "exp":
        return 1 - coef ** (t - s)
    try:
        return 1 - 1 / (1 + math.exp(-coef * (u - mid / t)))
    except OverflowError:   # exp(-coef * ...) beyond a float: 1 / (1 + inf) = 0
        return 1.0


@st.composite
def schedules(draw: st.DrawFn) -> tuple[str, float, float, int, float]:
    """(mode, a valid coefficient for it (config.ANNEAL_COEFS), midpoint, total steps, alpha0)."""
    mode = draw(st.sampled_from(ANNEAL_MODES))
    coef = {"pow": st.floats(0.05, 20), "exp": st.floats(0.01, 0.999), "sigmoid": st.floats(0.1, 200)}.get(
        mode, st.just(1.0))
    value = draw(coef)
    if mode in ANNEAL_COEFS:
        assert ANNEAL_COEFS[mode][1](value)
    return mode, value, draw(st.floats(-50, 500)), draw(st.integers(1, 2000)), draw(st.floats(0, 999))


@PROPS
@given(schedules())
def test_alpha_t_is_monotone_within_0_alpha0_and_matches_spec(schedule):
    mode, coef, mid, total, alpha0 = schedule
    steps = sorted({0, total, *range(0, total + 1, max(1, total // 50))})
    alpha = [alpha0 * anneal(s, total, mode, coef, mid) for s in steps]
    assert all(a >= b for a, b in zip(alpha, alpha[1:])), (schedule, alpha)
    assert all(0.0 <= a <= alpha0 for a in alpha), (schedule, alpha)
    for s, a in zip(steps, alpha):
        assert a == pytest.approx(alpha0 * _spec_decay(s, total, mode, coef, mid), rel=1e-12, abs=1e-12)
    if mode in ("none", "linear", "pow"):   # alpha_0 = alpha0 exactly; exp and sigmoid start below it (SPEC)
        assert alpha[0] == alpha0


@PROPS
@given(st.integers(1, 500), st.floats(0.1, 200), st.floats(-50, 500))
def test_the_sigmoid_starts_at_alpha0_only_as_far_as_its_midpoint_allows(total, coef, mid):
    """SPEC's sigmoid at step 0 is 1 - 1/(1 + exp(coef * mid / T)): within 1e-4 of 1 when coef * mid / T >= 9.3 (the
    paper's 30 x 40 / T for T <= 128), 0.5 at mid = 0."""
    start = anneal(0, total, "sigmoid", coef, mid)
    assert start == pytest.approx(_spec_decay(0, total, "sigmoid", coef, mid), rel=1e-12)
    if coef * mid / total >= 9.3:
        assert start >= 1 - 1e-4


# ----------------------------------------------------------------------------------------------------- LR schedule
@settings(derandomize=True, max_examples=40, deadline=None, database=None)
@given(st.integers(1, 60), st.integers(0, 60), st.floats(1e-6, 1e-2), st.sampled_from(["constant", "cosine"]),
       st.floats(0, 1))
def test_the_learning_rate_schedule(total, warmup, lr, schedule, min_lr_rate):
    """optim.py: optimizer step s runs at the schedule's value at s + 1: a linear warm-up lr * (s + 1) / warmup,
    then constant, or a cosine decay that reaches min_lr_rate * lr at the last step; never 0, never above lr."""
    from noisyrollout.train.optim import adamw

    warmup = min(warmup, total)
    optimizer, scheduler = adamw([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=0.0, betas=(0.9, 0.99),
                                 warmup_steps=warmup, total_steps=total, schedule=schedule,
                                 min_lr_rate=min_lr_rate)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for s, rate in enumerate(rates):
        k = s + 1
        if k < warmup:
            expected = lr * k / warmup
        elif schedule == "constant":
            expected = lr
        else:
            progress = (k - warmup) / max(1, total - warmup)
            expected = lr * (min_lr_rate + (1 - min_lr_rate) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert rate == pytest.approx(expected, rel=1e-9), (s, rates)
        assert 0 < rate <= lr * (1 + 1e-12) or (rate == 0 and schedule == "cosine" and min_lr_rate == 0)
    peak = min(warmup, total) - 1 if warmup else 0
    assert all(a <= b for a, b in zip(rates[:peak + 1], rates[1:peak + 1]))   # warm-up rises
    assert all(a >= b - 1e-18 for a, b in zip(rates[peak:], rates[peak + 1:]))   # then never rises
    if schedule == "cosine" and total > warmup:
        assert rates[-1] == pytest.approx(min_lr_rate * lr, rel=1e-9)
