"""torchvision v2 transforms as NoisyRollout distortions (`noise.distortion: tv:<Name>[:<argument>]`)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from torchvision.transforms import functional as TF

from noisyrollout.algo.augment import distort
from noisyrollout.config import ConfigError, Params


def _image(size: int = 56) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for x in range(0, size, 8):
        draw.rectangle([x, 10, x + 3, size - 10], fill=(30, 60, 200))
    return img


def _pixels(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img).float()


@pytest.mark.parametrize("kind", ["tv:GaussianBlur", "tv:ColorJitter", "tv:RandomErasing", "tv:JPEG",
                                  "tv:ElasticTransform"])
def test_strength_zero_leaves_the_image_and_a_seed_reproduces_it(kind):
    img = _image()
    assert torch.equal(_pixels(distort(img, kind, 0.5, decay=0.0)), _pixels(img))     # annealed to nothing
    strength = 50.0 if kind in ("tv:JPEG", "tv:ElasticTransform") else 0.5
    a = distort(img, kind, strength, 1.0, torch.Generator().manual_seed(3))
    b = distort(img, kind, strength, 1.0, torch.Generator().manual_seed(3))
    assert a.size == img.size and a.mode == "RGB" and torch.equal(_pixels(a), _pixels(b))
    assert not torch.equal(_pixels(a), _pixels(img))


def test_blur_grows_with_strength():
    img = _image()
    spread = [_pixels(distort(img, "tv:GaussianBlur", s, 1.0, torch.Generator().manual_seed(0))).std().item()
              for s in (0.5, 1.0, 2.0, 4.0)]
    assert spread == sorted(spread, reverse=True) and spread[-1] < 0.8 * spread[0]


@pytest.mark.parametrize("strength", [0.1, 0.25, 0.5])
def test_random_erasing_blacks_out_the_strength_as_an_area_fraction(strength):
    img = Image.new("RGB", (56, 56), "white")
    out = _pixels(distort(img, "tv:RandomErasing", strength, 1.0, torch.Generator().manual_seed(1)))
    erased = (out.sum(0) == 0).float().mean().item()
    assert erased == pytest.approx(strength, abs=0.03)


def test_jpeg_strength_is_lower_quality():
    img = _image()
    err = [(_pixels(distort(img, "tv:JPEG", s, 1.0)) - _pixels(img)).abs().mean().item() for s in (10, 60, 95)]
    assert err == sorted(err) and err[0] < err[-1]


def test_any_v2_transform_by_argument_name_matches_torchvision():
    """tv:<Name>:<arg> builds v2.<Name>(arg=strength * decay): the same output as torchvision itself, same seed."""
    img = _image()
    gen = torch.Generator().manual_seed(5)
    ours = distort(img, "tv:ColorJitter:brightness", 0.8, 0.5, gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = v2.ColorJitter(brightness=0.4)(TF.pil_to_tensor(img))
    assert torch.equal(_pixels(ours), reference.float())


@pytest.mark.parametrize("distortion,alpha0,message", [
    ("tv:Nope", 1, "has no transform 'Nope'"),
    ("tv:GaussianBlur:nope", 1, "has no argument 'nope'"),
    ("tv:RandomPosterize", 4, "no adapter for RandomPosterize"),
    ("tv:GaussianBlur:sigma", 1, "also needs kernel_size"),
    ("tv:JPEG", 150, "out of range for tv:JPEG (at most 99)"),
    ("blur", 1, "unknown distortion 'blur'"),
])
def test_a_distortion_that_cannot_be_built_is_refused_at_load(distortion, alpha0, message):
    from noisyrollout.config import load_params

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(None, [f"noise.distortion={distortion}", f"noise.alpha0={alpha0}"])
    assert Params.model_validate({"noise": {"distortion": "tv:RandomPosterize:bits", "alpha0": 4}})
