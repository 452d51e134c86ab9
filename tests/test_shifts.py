"""The graded OOD shifts: each one against a reference computation, and stronger levels change the picture more."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from noisyrollout.data.shifts import CELLS, SHIFTS, apply_shift, cell_name
from noisyrollout.data.synthetic import TASKS, render_example


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = random.Random(3)
    return [render_example(TASKS[i % 3], rng)["images"][0] for i in range(12)]


def test_cells_are_seven_shifts_by_three_levels_in_two_groups() -> None:
    assert len(CELLS) == 21 and cell_name("blur", 2) == "blur-2"
    assert {s.group for s in SHIFTS.values()} == {"dev", "heldout"}
    assert [n for n, s in SHIFTS.items() if s.group == "heldout"] == ["tint", "fade", "jpeg"]


def test_fade_and_tint_are_their_formulas(pictures) -> None:
    img = pictures[0]
    x = np.asarray(img, dtype=np.float64)
    faded = _arr(apply_shift(img, "fade", 2, random.Random(0)))
    assert np.array_equal(faded, np.rint(255 - (255 - x) * (1 - 0.7)).astype(np.int16))
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    tinted = {tuple(_arr(apply_shift(white, "tint", 3, random.Random(seed)))[0, 0]) for seed in range(40)}
    # the four casts of strength 0.03 on white: channel c = round(255 * (1 - 0.03 * tint[c]))
    expected = {tuple(int(round(255 * (1 - 0.03 * t))) for t in tint)
                for tint in ((0.0, 0.35, 1.0), (1.0, 0.45, 0.0), (0.7, 0.0, 0.7), (0.9, 0.9, 0.0))}
    assert tinted == expected


def test_noise_has_the_level_sigma(pictures) -> None:
    grey = Image.new("RGB", (200, 200), (128, 128, 128))
    for level, sigma in enumerate(SHIFTS["noise"].levels, start=1):
        d = _arr(apply_shift(grey, "noise", level, random.Random(level))) - 128
        assert abs(d.std() - sigma) < 0.05 * sigma + 0.3 and abs(d.mean()) < 0.1


def test_blur_rotate_jpeg_match_pillow(pictures) -> None:
    img = pictures[1]
    assert np.array_equal(_arr(apply_shift(img, "blur", 1, random.Random(0))),
                          _arr(img.filter(ImageFilter.GaussianBlur(0.4))))
    rotated = _arr(apply_shift(img, "rotate", 3, random.Random(0)))
    options = [_arr(img.rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))) for a in (1.5, -1.5)]
    assert any(np.array_equal(rotated, o) for o in options)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=50)
    assert np.array_equal(_arr(apply_shift(img, "jpeg", 3, random.Random(0))), _arr(Image.open(io.BytesIO(buf.getvalue()))))


def test_occlusion_is_one_grey_square_of_the_level_side() -> None:
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    for level, fraction in enumerate(SHIFTS["occlusion"].levels, start=1):
        out = _arr(apply_shift(white, "occlusion", level, random.Random(level)))
        grey = (out == 128).all(axis=2)
        side = round(fraction * 56)
        rows, cols = np.nonzero(grey)
        assert grey.sum() == side * side and np.ptp(rows) + 1 == side and np.ptp(cols) + 1 == side
        assert ((out == 255).all(axis=2) | grey).all()


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_stronger_levels_change_the_picture_more(shift: str, pictures) -> None:
    change = []
    for level in (1, 2, 3):
        rng = random.Random(11)
        change.append(np.mean([np.abs(_arr(apply_shift(p, shift, level, rng)) - _arr(p)).mean() for p in pictures]))
    assert 0 < change[0] < change[1] < change[2], change


def test_same_rng_same_picture_and_bad_arguments(pictures) -> None:
    for shift, level in CELLS:
        a = apply_shift(pictures[2], shift, level, random.Random(5))
        b = apply_shift(pictures[2], shift, level, random.Random(5))
        assert a.tobytes() == b.tobytes() and a.size == (56, 56) and a.mode == "RGB"
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(pictures[0], "sepia", 1, random.Random(0))
    with pytest.raises(ValueError, match="level"):
        apply_shift(pictures[0], "blur", 4, random.Random(0))
