"""The graded out-of-domain shifts of the embedded corpus' `ood` split.

Each shift is an image-to-image function of a strength; each is applied at three strengths (levels 1-3)
to fresh in-domain renders, so accuracy falls off gradually and every (shift, level) cell is reported on
its own. The strengths were set once, from the embedded SFT model's greedy accuracy on fresh renders (300 per
strength), so that its accuracy falls from about 0.6-0.75 (level 1) to 0.4-0.6 (level 3), against 0.82 on
clean images and about 0.2 by chance; no RL run was looked at. They are small by human standards (a 1.5
degree rotation, a 3% colour cast): the tiny vision tower, trained on exact white-background renders, is that
brittle. Shifts it failed on at every strength (a 1-pixel translation, any rescaling) or shrugged off (a hue
rotation) are left out because they cannot show a graded difference.

Two groups:

- ``dev`` shifts are the ones a NoisyRollout distortion resembles (gaussian -> ``noise``, rotate ->
  ``rotate``, crop_fill -> ``occlusion``, tv:GaussianBlur -> ``blur``). An arm trained with a distortion
  is trained toward its matched shift; choosing an arm's ``alpha0`` may look at these.
- ``heldout`` shifts resemble no training distortion and no tuning looks at them: the generalisation
  test (``tint``: a colour cast over the white background, ``fade``: lower contrast, ``jpeg``: compression
  artefacts).

All shifts are pure functions of (image, strength, rng): the corpus renders byte-identically.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["Shift", "SHIFTS", "CELLS", "apply_shift", "cell_name"]

WHITE = (255, 255, 255)


def _noise(img: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    """Additive gaussian pixel noise, `sigma` in 0-255 units, independent per pixel and channel."""
    x = np.asarray(img, dtype=np.float32)
    eps = np.random.default_rng(rng.getrandbits(64)).standard_normal(x.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(x + sigma * eps), 0, 255).astype(np.uint8))


def _blur(img: Image.Image, radius: float, rng: random.Random) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius))


def _rotate(img: Image.Image, degrees: float, rng: random.Random) -> Image.Image:
    """Rotation by +-`degrees` about the centre, same canvas, white fill."""
    angle = degrees if rng.random() < 0.5 else -degrees
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)


def _occlusion(img: Image.Image, fraction: float, rng: random.Random) -> Image.Image:
    """A mid-grey square of `fraction` of the image side at a uniform position."""
    out = img.copy()
    w, h = out.size
    side = max(1, round(fraction * min(w, h)))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    out.paste((128, 128, 128), (x0, y0, x0 + side, y0 + side))
    return out


_TINTS = ((0.0, 0.35, 1.0), (1.0, 0.45, 0.0), (0.7, 0.0, 0.7), (0.9, 0.9, 0.0))  # yellow, blue, green, violet casts


def _tint(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """A colour cast: channel c is multiplied by 1 - strength * tint[c] (white becomes a coloured background)."""
    tint = np.asarray(rng.choice(_TINTS), dtype=np.float32)
    x = np.asarray(img, dtype=np.float32) * (1.0 - strength * tint)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _fade(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Lower contrast: every pixel moves `strength` of the way to white."""
    x = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(255.0 - (255.0 - x) * (1.0 - strength)), 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: float, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@dataclass(frozen=True)
class Shift:
    name: str
    apply: Callable[[Image.Image, float, random.Random], Image.Image]
    levels: tuple[float, float, float]   # strengths of levels 1, 2, 3 (mild to strong)
    group: str                           # "dev" or "heldout"
    unit: str


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("noise", _noise, (2.0, 4.0, 8.0), "dev", "pixel sigma (0-255)"),
    Shift("blur", _blur, (0.4, 0.6, 0.7), "dev", "gaussian radius (px)"),
    Shift("rotate", _rotate, (0.5, 1.0, 1.5), "dev", "degrees"),
    Shift("occlusion", _occlusion, (0.1, 0.15, 0.2), "dev", "square side / image side"),
    Shift("tint", _tint, (0.01, 0.02, 0.03), "heldout", "cast strength"),
    Shift("fade", _fade, (0.6, 0.7, 0.75), "heldout", "fraction of the way to white"),
    Shift("jpeg", _jpeg, (90.0, 70.0, 50.0), "heldout", "JPEG quality"),
)}

#: Every (shift, level) cell, in report order.
CELLS: tuple[tuple[str, int], ...] = tuple((name, level) for name in SHIFTS for level in (1, 2, 3))


def cell_name(shift: str, level: int) -> str:
    """A cell's name, e.g. "blur-2": the OOD split's sub-accuracy groups and the ablation's subsets use it."""
    return f"{shift}-{level}"


def apply_shift(img: Image.Image, shift: str, level: int, rng: random.Random) -> Image.Image:
    """`img` (RGB) under `shift` at `level` (1-3), drawing any randomness from `rng`."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {', '.join(SHIFTS)}")
    if level not in (1, 2, 3):
        raise ValueError(f"shift level must be 1, 2 or 3, got {level!r}")
    s = SHIFTS[shift]
    return s.apply(img.convert("RGB"), s.levels[level - 1], rng)

