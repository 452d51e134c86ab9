"""Image distortions for the noisy rollouts (SPEC section 2).

`distort(image, kind, strength, decay, generator)` returns a new RGB PIL image:

    gaussian   strength = alpha0, the diffusion "noise step": t = int(alpha0 * decay) in [0, 999];
               x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * eps on [0, 1] floats, clamped, back to uint8.
    rotate     strength = rotate_max degrees: angle ~ U[-strength * decay, +strength * decay], bilinear,
               canvas expanded.
    crop_fill  strength = crop_size, a fraction of each side: a black rectangle of
               (strength * decay * W, strength * decay * H) at a uniform position.
    tv:Name    a torchvision.transforms.v2 transform, strength -> its arguments through TV_ADAPTERS
               (GaussianBlur sigma, ColorJitter factors, RandomErasing area, JPEG 100 - quality, ElasticTransform
               alpha); tv:Name:arg passes strength * decay to argument `arg` of any v2 transform.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

DistortionKind = Literal["gaussian", "rotate", "crop_fill"]
DISTORTIONS: tuple[str, ...] = ("gaussian", "rotate", "crop_fill")

NUM_NOISE_STEPS = 1000


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD: torch.Tensor = _alphas_cumprod()  # the constant beta table of SPEC section 2, built once


def noise_step(strength: float, decay: float) -> int:
    """The integer diffusion step t = int(alpha0 * decay), clipped to [0, 999]."""
    return min(max(int(strength * decay), 0), NUM_NOISE_STEPS - 1)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def gaussian_noise(image: Image.Image, t: int, generator: torch.Generator | None = None) -> Image.Image:
    """Forward-diffuse `image` to step `t` of the sigmoid beta schedule."""
    # Fast (~6x on 1 MP): float32 eps drawn straight in HWC, in-place math in 0..255 units on the uint8 array,
    # no float64 and no PIL<->CHW tensor round trips; drawing eps (torch.randn) is now most of the time.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    x0 = np.asarray(rgb)                                                   # (H, W, 3) uint8, read-only
    abar = ALPHAS_CUMPROD[t].item()
    scale, sigma = math.sqrt(abar), 255.0 * math.sqrt(1.0 - abar)          # abar >= 0.08, so scale > 0
    xt = torch.randn(x0.shape, generator=generator, dtype=torch.float32)   # eps ~ N(0, 1) per pixel and channel
    out = xt.mul_(sigma / scale).numpy()                                   # shares memory with xt
    np.add(out, x0, out=out)                                               # eps * sigma / scale + x0
    xt.mul_(scale).clamp_(0.0, 255.0).round_()                            # 255 * x_t, clamped, rounded
    return Image.fromarray(out.astype(np.uint8))


def rotate(image: Image.Image, max_degrees: float, generator: torch.Generator | None = None) -> Image.Image:
    angle = _uniform(generator, -max_degrees, max_degrees)
    return TF.rotate(image.convert("RGB"), angle, interpolation=TF.InterpolationMode.BILINEAR, expand=True)


def crop_fill(image: Image.Image, fraction: float, generator: torch.Generator | None = None) -> Image.Image:
    out = image.convert("RGB")  # convert() copies, so the caller's image is untouched
    w, h = out.size
    cw, ch = round(fraction * w), round(fraction * h)
    if cw <= 0 or ch <= 0:
        return out
    cw, ch = min(cw, w), min(ch, h)
    x0 = int(_uniform(generator, 0, w - cw + 1 - 1e-9))
    y0 = int(_uniform(generator, 0, h - ch + 1 - 1e-9))
    out.paste((0, 0, 0), (x0, y0, x0 + cw, y0 + ch))
    return out


# torchvision.transforms.v2 transforms as distortions: `tv:<Name>` uses the adapter below (strength -> the
# transform's keyword arguments, and the largest sensible strength); `tv:<Name>:<arg>` passes the strength to
# keyword `arg` of any v2 transform. To add an adapter: one entry here, strength 0 meaning "no distortion".
TV_ADAPTERS: dict[str, tuple[Callable[[float], dict], float | None]] = {
    "GaussianBlur": (lambda s: {"kernel_size": 2 * math.ceil(3 * s) + 1, "sigma": s}, None),   # sigma in pixels
    "ColorJitter": (lambda s: {"brightness": s, "contrast": s, "saturation": s, "hue": min(s, 1.0) / 2}, 1.0),
    "RandomErasing": (lambda s: {"p": 1.0, "scale": (s, s), "ratio": (1.0, 1.0), "value": 0}, 1.0),   # area fraction
    "JPEG": (lambda s: {"quality": max(1, round(100 - s))}, 99.0),                    # strength = 100 - quality
    "ElasticTransform": (lambda s: {"alpha": s}, None),                              # displacement magnitude
}


def parse_tv(kind: str) -> tuple[str, str | None]:
    """`tv:Name` -> ("Name", None); `tv:Name:arg` -> ("Name", "arg")."""
    parts = kind.split(":")
    if parts[0] != "tv" or len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"unknown distortion {kind!r}; choose one of {', '.join(DISTORTIONS)}, "
                         f"tv:<torchvision v2 transform> or tv:<transform>:<strength argument>")
    return parts[1], parts[2] if len(parts) == 3 else None


def check_distortion(kind: str) -> float | None:
    """Raise ValueError for a distortion that cannot be built; return its largest strength (None: unbounded)."""
    if kind in DISTORTIONS:
        return None
    import inspect

    from torchvision.transforms import v2

    name, arg = parse_tv(kind)
    cls = getattr(v2, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"distortion {kind!r}: torchvision.transforms.v2 has no transform {name!r}")
    if arg is None:
        if name not in TV_ADAPTERS:
            raise ValueError(f"distortion {kind!r}: no adapter for {name}; name the argument that takes the strength, "
                             f"e.g. tv:{name}:<argument> (adapters: {', '.join(sorted(TV_ADAPTERS))})")
        return TV_ADAPTERS[name][1]
    parameters = inspect.signature(cls).parameters
    if arg not in parameters:
        raise ValueError(f"distortion {kind!r}: {name} has no argument {arg!r}")
    required = [p.name for p in parameters.values() if p.default is inspect.Parameter.empty and p.name != arg
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ValueError(f"distortion {kind!r}: {name} also needs {', '.join(required)}; add an adapter to "
                         f"noisyrollout/algo/augment.py:TV_ADAPTERS instead")
    return None


def tv_distort(image: Image.Image, kind: str, strength: float, generator: torch.Generator | None = None) -> Image.Image:
    """A torchvision v2 transform at `strength` (0 = the image unchanged). Its random draws come from `generator`
    (through a seeded fork of torch's global generator, which v2 transforms use)."""
    rgb = image.convert("RGB")
    if strength <= 0:
        return rgb
    from torchvision.transforms import v2

    name, arg = parse_tv(kind)
    kwargs = TV_ADAPTERS[name][0](strength) if arg is None else {arg: strength}
    transform = getattr(v2, name)(**kwargs)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(TF.pil_to_tensor(rgb))                  # uint8 CHW: every v2 transform takes it
    return TF.to_pil_image(out)


def distort(image: Image.Image, kind: DistortionKind | str = "gaussian", strength: float = 500, decay: float = 1.0,
            generator: torch.Generator | None = None) -> Image.Image:
    """A distorted copy of `image` (RGB) at strength `strength * decay`; `generator` makes it reproducible."""
    if kind == "gaussian":
        return gaussian_noise(image, noise_step(strength, decay), generator)
    if kind == "rotate":
        return rotate(image, strength * decay, generator)
    if kind == "crop_fill":
        return crop_fill(image, strength * decay, generator)
    return tv_distort(image, kind, strength * decay, generator)
