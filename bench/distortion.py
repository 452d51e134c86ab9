"""Micro-benchmark of the gaussian distortion (issue "Performance", item P3).

`python -m bench.distortion` prints {"baseline_s_per_image", "fast_s_per_image", "speedup", "megapixels"}
for `noisyrollout.algo.augment.gaussian_noise` against `gaussian_noise_baseline` on synthetic 1 MP RGB images.
"""

from __future__ import annotations

import statistics
import time

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from noisyrollout.algo.augment import NUM_NOISE_STEPS, gaussian_noise


def gaussian_noise_baseline(image: Image.Image, t: int, generator: torch.Generator | None = None) -> Image.Image:
    """The baseline of P3: the straightforward per-image float64 version.

    Rebuilds the 1000-step sigmoid beta table (float64 sigmoid/linspace/cumprod) on every call and round-trips
    PIL -> CHW uint8 tensor (pil_to_tensor) -> float64 in [0, 1] -> PIL (to_pil_image); eps is float64.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1.0 - betas, dim=0)[t]
    x0 = TF.pil_to_tensor(image.convert("RGB")).to(torch.float64) / 255.0
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    xt = (abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps).clamp(0.0, 1.0)
    return TF.to_pil_image((xt * 255.0).round().to(torch.uint8))


def _synthetic_images(n_images: int, size: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n_images)]


def _median_seconds(fn, images: list[Image.Image], t: int, repeats: int) -> float:
    times = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        for image in images:
            fn(image, t, g)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_gaussian(n_images: int = 8, size: int = 1000, t: int = 500, repeats: int = 3) -> dict:
    """Median (over `repeats`) wall time of distorting all `n_images` synthetic `size`x`size` RGB images."""
    images = _synthetic_images(n_images, size)
    gaussian_noise(images[0], t, torch.Generator().manual_seed(0))            # warm-up (lazy init, allocator)
    gaussian_noise_baseline(images[0], t, torch.Generator().manual_seed(0))
    baseline = _median_seconds(gaussian_noise_baseline, images, t, repeats) / n_images
    fast = _median_seconds(gaussian_noise, images, t, repeats) / n_images
    return {"baseline_s_per_image": baseline, "fast_s_per_image": fast, "speedup": baseline / fast,
            "megapixels": size * size / 1e6}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(bench_gaussian())
