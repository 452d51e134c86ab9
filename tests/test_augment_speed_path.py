"""The fast gaussian distortion (issue "Performance", P3) against the float64 baseline of bench/distortion.py.

Value checks only, never timings: eps is drawn differently (float32 HWC vs float64 CHW), so the two agree in
distribution, not pixel by pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bench.distortion import gaussian_noise_baseline
from noisyrollout.algo.augment import ALPHAS_CUMPROD, distort, gaussian_noise

IMPLS = {"fast": gaussian_noise, "baseline": gaussian_noise_baseline}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _test_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)                 # values in [20, 235]: the t=0 noise never reaches the bounds
    return Image.fromarray(rng.integers(20, 236, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", IMPLS)
def test_t0_is_an_almost_exact_copy(name):
    # abar[0] = 1 - beta[0] ~ 1 - 2.2e-5: the signal is kept to 0.003 grey levels, and the noise has a std of
    # 255 * sqrt(1 - abar[0]) ~ 1.2 grey levels (the schedule has no exactly noiseless step), so most pixels
    # come back within 1 level and none moves far.
    img = _test_image()
    before = img.tobytes()
    out = IMPLS[name](img, 0, torch.Generator().manual_seed(0))
    assert out.mode == "RGB" and out.size == img.size
    diff = _pixels(out) - _pixels(img)
    sigma = 255 * math.sqrt(1 - ALPHAS_CUMPROD[0].item())
    assert sigma < 1.25
    assert abs(diff.mean()) < 0.05
    assert diff.std() == pytest.approx(math.hypot(sigma, 1 / math.sqrt(12)), abs=0.1)  # noise + rounding
    assert np.mean(np.abs(diff) <= 1) > 0.7
    assert np.abs(diff).max() <= 8                 # ~6.5 sigma: a bound over 12k draws
    assert img.tobytes() == before                 # the input is untouched


def test_t0_fast_and_baseline_agree():
    img = _test_image()
    fast = _pixels(gaussian_noise(img, 0, torch.Generator().manual_seed(1)))
    base = _pixels(gaussian_noise_baseline(img, 0, torch.Generator().manual_seed(1)))
    assert np.abs(fast - base).mean() < 2.0
    assert (fast - base).mean() == pytest.approx(0.0, abs=0.1)


def test_mid_t_matches_the_analytic_mean_and_std():
    t, grey = 300, 128
    x0 = grey / 255
    abar = ALPHAS_CUMPROD[t].item()
    mean, std = math.sqrt(abar) * x0, math.sqrt(1 - abar)      # ~0.49 and ~0.19: 2.5 std from either bound
    img = Image.new("RGB", (64, 64), (grey, grey, grey))
    stats = {}
    for name, fn in IMPLS.items():
        x = _pixels(fn(img, t, torch.Generator().manual_seed(0))) / 255   # (64, 64, 3)
        ch_mean, ch_std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
        # 4096 draws per channel: standard error of the mean ~0.003, of the std ~0.002 (clamping ~0.6% tails)
        np.testing.assert_allclose(ch_mean, mean, atol=0.012, err_msg=name)
        np.testing.assert_allclose(ch_std, std, atol=0.012, err_msg=name)
        stats[name] = (ch_mean, ch_std)
    np.testing.assert_allclose(stats["fast"][0], stats["baseline"][0], atol=0.02)
    np.testing.assert_allclose(stats["fast"][1], stats["baseline"][1], atol=0.012)


def test_mid_t_through_distort():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    a = distort(img, "gaussian", strength=600, decay=0.5, generator=torch.Generator().manual_seed(5))  # t = 300
    b = gaussian_noise(img, 300, torch.Generator().manual_seed(5))
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", IMPLS)
def test_same_seed_same_output(name):
    img = _test_image()
    a = IMPLS[name](img, 500, torch.Generator().manual_seed(7))
    b = IMPLS[name](img, 500, torch.Generator().manual_seed(7))
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", IMPLS)
def test_different_seeds_differ(name):
    img = _test_image()
    a = IMPLS[name](img, 500, torch.Generator().manual_seed(7))
    b = IMPLS[name](img, 500, torch.Generator().manual_seed(8))
    assert a.tobytes() != b.tobytes()


def test_fast_path_converts_non_rgb_inputs():
    for mode, colour in (("L", 128), ("RGBA", (128, 128, 128, 255))):
        img = Image.new(mode, (32, 16), colour)
        out = gaussian_noise(img, 300, torch.Generator().manual_seed(0))
        assert out.mode == "RGB" and out.size == (32, 16)
        assert img.mode == mode                    # the input is untouched
