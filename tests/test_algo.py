"""The NoisyRollout formulas against hand-computed values (SPEC sections 1-3)."""

import math

import pytest
import torch
from PIL import Image

import noisyrollout
from noisyrollout.algo.advantages import group_advantages
from noisyrollout.algo.augment import ALPHAS_CUMPROD, distort, noise_step
from noisyrollout.algo.loss import low_var_kl, policy_loss
from noisyrollout.algo.schedule import anneal


# ----------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("mode,step,total,coef,mid,expected", [
    ("none", 37, 100, 30, 40, 1.0),
    ("linear", 25, 100, 30, 40, 0.75),
    ("linear", 100, 100, 30, 40, 0.0),
    ("pow", 50, 100, 2.0, 40, 0.75),            # 1 - 0.5**2
    ("pow", 50, 100, 0.5, 40, 1 - 0.5 ** 0.5),
    ("exp", 8, 10, 0.5, 40, 0.75),              # 1 - 0.5**(10-8)
    ("exp", 10, 10, 0.5, 40, 0.0),
    ("sigmoid", 40, 100, 30, 40, 0.5),          # the midpoint
    ("sigmoid", 0, 100, 30, 40, math.exp(12) / (1 + math.exp(12))),   # 1 - 1/(1+e^12)
    ("sigmoid", 60, 100, 30, 40, 1 - 1 / (1 + math.exp(-6))),          # 1 - sigmoid(6)
    ("sigmoid", 10, 20, 30, 5, 1 - 1 / (1 + math.exp(-7.5))),          # u=0.5, mid/T=0.25
])
def test_anneal_hand_values(mode, step, total, coef, mid, expected):
    assert anneal(step, total, mode, coef, mid) == pytest.approx(expected, abs=1e-12)


def test_anneal_public_api_defaults_are_the_papers_sigmoid():
    assert noisyrollout.anneal(40, 100) == pytest.approx(0.5)
    assert noisyrollout.anneal(0, 100) > 0.9999
    assert noisyrollout.anneal(100, 100) == pytest.approx(1 - 1 / (1 + math.exp(-18)))


def test_anneal_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown anneal mode"):
        anneal(1, 10, "cosine")


# ----------------------------------------------------------------------------------------------- advantages
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.1, 0.1, 0.5]
GROUPS = ["a", "a", "a", "a", "b", "b", "c"]   # a: 2 clean + 2 noisy; b: all equal; c: a group of one


def test_grpo_mixed_group_hand_values():
    adv = group_advantages(REWARDS, GROUPS, "grpo")
    # group a: mean 0.75, unbiased std sqrt(0.75/3) = 0.5
    a = [0.25 / (0.5 + 1e-6), -0.75 / (0.5 + 1e-6), 0.25 / (0.5 + 1e-6), 0.25 / (0.5 + 1e-6)]
    expected = a + [0.0, 0.0, 0.5 / (1 + 1e-6)]    # b: std 0 -> 0; c: mean 0, std 1
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_std_is_unbiased_like_torch_std():
    r = torch.tensor([0.0, 1.0, 1.0])
    adv = group_advantages(r, [0, 0, 0])
    assert adv.tolist() == pytest.approx(((r - r.mean()) / (r.std() + 1e-6)).tolist(), abs=1e-6)


def test_rloo_hand_values():
    adv = group_advantages(REWARDS, GROUPS, "rloo")
    # group a, n=4: r*4/3 - 0.75*4/3
    assert adv[:4].tolist() == pytest.approx([1 / 3, -1.0, 1 / 3, 1 / 3], abs=1e-6)
    assert adv[4:6].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert adv[6].item() == pytest.approx(0.5)


def test_dr_grpo_has_no_std_division():
    adv = group_advantages(REWARDS, GROUPS, "dr_grpo")
    assert adv[:4].tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25], abs=1e-6)


def test_reinforce_pp_whitens_the_batch():
    adv = group_advantages(REWARDS, GROUPS, "reinforce_pp")
    r = torch.tensor(REWARDS, dtype=torch.float64)
    assert adv.tolist() == pytest.approx(((r - r.mean()) / (r.var() + 1e-8).sqrt()).tolist(), abs=1e-5)


def test_groups_are_ids_not_positions():
    """Interleaved ids give the same advantages as contiguous ones."""
    adv = group_advantages([1.0, 5.0, 0.0, 7.0], ["x", "y", "x", "y"])
    ref = group_advantages([1.0, 0.0, 5.0, 7.0], ["x", "x", "y", "y"])
    assert adv.tolist() == pytest.approx([ref[0].item(), ref[2].item(), ref[1].item(), ref[3].item()])


def test_noisy_rollouts_share_the_clean_groups_statistics():
    """n_noisy = 0 is vanilla GRPO: a group of only clean rewards gives the usual GRPO advantage, and adding
    noisy rollouts changes the baseline for everyone in the group."""
    clean = [1.0, 0.0, 0.0]
    vanilla = group_advantages(clean, [0, 0, 0])
    mixed = group_advantages(clean + [1.0, 1.0], [0] * 5)
    assert vanilla.tolist() != pytest.approx(mixed[:3].tolist())
    assert mixed.mean().item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- loss
def test_clip_loss_at_known_ratios():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    up = torch.full((1, 2), math.log(1.5))     # ratio 1.5
    # A > 0, ratio 1.5: max(-1.5, -1.2) = -1.2, clipped branch taken
    out = policy_loss(up, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-1.2)
    assert out.clip_frac.item() == pytest.approx(1.0)
    # A < 0, ratio 1.5: max(1.5, 1.2) = 1.5, unclipped (the pessimistic bound)
    out = policy_loss(up, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(1.5)
    assert out.clip_frac.item() == pytest.approx(0.0)
    # A > 0, ratio 0.5: max(-0.5, -0.8) = -0.5
    down = torch.full((1, 2), math.log(0.5))
    assert policy_loss(down, old, torch.tensor([1.0]), mask).loss.item() == pytest.approx(-0.5)


def test_loss_is_token_mean_over_masked_tokens():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    out = policy_loss(logp, logp, torch.tensor([1.0, -1.0]), mask)   # ratio 1: per token -A
    assert out.loss.item() == pytest.approx((3 * -1.0 + 1 * 1.0) / 4)
    seq = policy_loss(logp, logp, torch.tensor([1.0, -1.0]), mask, agg="seq-mean-token-sum-norm", norm_length=3)
    assert seq.loss.item() == pytest.approx(((-3.0) / 3 + 1.0 / 3) / 2)


def test_entropy_bonus_and_low_var_kl():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = low_var_kl(logp, ref)
    x = math.log(0.5)                                   # ref - logp on the first token
    assert kl[0, 0].item() == pytest.approx(math.exp(x) - x - 1)
    assert kl[0, 1].item() == pytest.approx(0.0)
    assert low_var_kl(torch.tensor([0.0]), torch.tensor([50.0])).item() == 10.0   # clamped
    mask = torch.ones(1, 2)
    ent = torch.tensor([[2.0, 4.0]])
    base = policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask)
    full = policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, entropy=ent, entropy_coef=1e-3,
                       ref_logp=ref, kl_coef=1e-2)
    assert full.loss.item() == pytest.approx(base.loss.item() - 1e-3 * 3.0 + 1e-2 * kl.mean().item())


# ----------------------------------------------------------------------------------------------- distortions
def test_beta_table_matches_spec():
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    assert torch.allclose(ALPHAS_CUMPROD, torch.cumprod(1 - betas, 0))
    assert noise_step(500, 0.5) == 250 and noise_step(2000, 1.0) == 999 and noise_step(500, -1) == 0


def test_gaussian_distortion_has_the_right_mean_and_variance():
    x0 = 128 / 255
    img = Image.new("RGB", (256, 256), (128, 128, 128))
    out = distort(img, "gaussian", strength=400, decay=0.5, generator=torch.Generator().manual_seed(0))  # t = 200
    x = torch.tensor(list(out.getdata()), dtype=torch.float64) / 255
    abar = ALPHAS_CUMPROD[200]
    assert x.mean().item() == pytest.approx((abar.sqrt() * x0).item(), abs=2e-3)
    assert x.std().item() == pytest.approx((1 - abar).sqrt().item(), abs=2e-3)


def test_distortions_are_reproducible_and_keep_the_input():
    img = Image.new("RGB", (56, 56), "white")
    for kind, strength in (("gaussian", 500), ("rotate", 15), ("crop_fill", 0.3)):
        a = distort(img, kind, strength, 1.0, torch.Generator().manual_seed(3))
        b = distort(img, kind, strength, 1.0, torch.Generator().manual_seed(3))
        assert a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_rotate_expands_canvas_and_crop_fill_blacks_a_rectangle():
    img = Image.new("RGB", (100, 50), "white")
    rotated = distort(img, "rotate", 15, 1.0, torch.Generator().manual_seed(1))
    assert rotated.size[0] >= 100 and rotated.size[1] > 50
    filled = distort(img, "crop_fill", 0.5, 1.0, torch.Generator().manual_seed(1))
    black = sum(1 for p in filled.getdata() if p == (0, 0, 0))
    assert black == 50 * 25
    assert distort(img, "crop_fill", 0.5, 0.0).tobytes() == img.tobytes()   # annealed to nothing


def test_decay_zero_means_no_distortion_for_rotate():
    img = Image.new("RGB", (40, 40), "white")
    assert distort(img, "rotate", 15, 0.0, torch.Generator().manual_seed(0)).size == (40, 40)
