"""A deterministic synthetic visual-reasoning corpus, rendered with Pillow.

Rows follow the authors' Geometry3K schema (``images``: a list with one PIL image, ``problem``:
text starting with the ``<image>`` placeholder, ``answer``: a string) plus ``task``, ``solution``
(the SFT target, ``<think> ... </think> \\boxed{ANSWER}``) and ``id``.

The consumer is a tiny vision tower (patch 14, 56x56 px by default, i.e. 4x4 patches), so every
task is answerable from coarse spatial layout and every answer needs the picture:

- ``count``: 1..6 non-overlapping filled shapes; "how many shapes?" (chance 1/6).
- ``bar``: 3 or 4 vertical bars labelled A..D, a unique tallest bar by >= 15% of its height;
  "which bar is the tallest?" (answer letters are uniform over A..D; chance 1/4).
- ``length``: a light grid (cell = image_size // 7 px) and one thick segment of 1..5 cells on the
  grid lines; "how long is the segment?" (chance 1/5).

Answers are chosen first (uniformly; ``build_corpus`` balances them exactly per split and task),
then the picture is built around them, in one style (white background, one palette, one line width).
The ``ood`` split is the graded out-of-domain testbed: fresh renders, each under one of the shifts of
``noisyrollout.data.shifts`` at one of three strengths (columns ``shift`` and ``level``), spread evenly
over the (shift, level) cells: every cell gets the same number of rows per task, within one.

Everything is a pure function of its arguments: the same seed gives byte-identical images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import datasets
from PIL import Image, ImageDraw, ImageFont

from noisyrollout.data.shifts import CELLS, apply_shift

__all__ = [
    "TASKS",
    "STYLES",
    "PROBLEMS",
    "render_example",
    "build_corpus",
    "save_corpus",
    "is_shifted_split",
    "answer_space",
    "CORPUS_FEATURES",
    "SHIFTED_FEATURES",
]

TASKS: tuple[str, ...] = ("count", "bar", "length")
STYLES: tuple[str, ...] = ("in_domain",)

PROBLEMS: dict[str, str] = {
    "count": "<image>How many shapes are in the image?",
    "bar": "<image>Which bar is the tallest? Answer with its letter.",
    "length": "<image>Each grid square is 1 unit. How long is the segment?",
}

_REASONING: dict[str, str] = {
    "count": "i count {a} shapes",
    "bar": "the tallest bar is {a}",
    "length": "the segment covers {a} squares",
}

MAX_COUNT = 6
BAR_LETTERS = "ABCD"
MAX_LENGTH = 5
GRID_CELLS = 7
BAR_MARGIN = 0.15  # tallest bar exceeds every other bar by at least this fraction of its height

CORPUS_FEATURES = datasets.Features(
    {
        "images": datasets.List(datasets.Image()),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "task": datasets.Value("string"),
        "solution": datasets.Value("string"),
        "id": datasets.Value("string"),
    }
)

#: The ``ood`` split's schema: the corpus columns plus the shift and its level (1 mild - 3 strong).
SHIFTED_FEATURES = datasets.Features({**CORPUS_FEATURES, "shift": datasets.Value("string"),
                                      "level": datasets.Value("int32")})

RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# styles

_IN_DOMAIN = {
    "backgrounds": [(255, 255, 255)],
    "palette": [(220, 40, 40), (40, 80, 220), (30, 150, 60), (240, 140, 20), (140, 60, 180)],
    "outline": (0, 0, 0),
    "outline_widths": [1],  # line widths are px at 56 px, scaled with image_size
    "shape_radius": (0.09, 0.13),  # fraction of image size
    "font_frac": 1 / 7,
    "grid": (200, 200, 200),
    "segment_widths": [3],
    "bar_width_frac": (0.6, 0.6),
}

def _style(style: str) -> dict:
    if style == "in_domain":
        return _IN_DOMAIN
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def is_shifted_split(split: str) -> bool:
    """A split named ``ood`` (or ``ood-...``) holds shifted renders; all others are in-domain."""
    return split == "ood" or split.startswith(("ood-", "ood_"))


def answer_space(task: str) -> tuple[str, ...]:
    """All possible answers of a task (each is drawn uniformly)."""
    if task == "count":
        return tuple(str(n) for n in range(1, MAX_COUNT + 1))
    if task == "bar":
        return tuple(BAR_LETTERS)
    if task == "length":
        return tuple(str(n) for n in range(1, MAX_LENGTH + 1))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font (no dependency on system fonts, so renders match across machines).
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _scaled(width: int, size: int) -> int:
    """A line width given for 56 px images, scaled to ``size`` (0 stays 0)."""
    return 0 if width <= 0 else max(1, round(width * size / 56))


# ---------------------------------------------------------------------------------------------
# tasks


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: RGB,
                outline: RGB, width: int) -> None:
    x0, y0, x1, y1 = box
    ow = outline if width > 0 else None
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=ow, width=width)
    elif kind == "square":
        draw.rectangle(box, fill=fill, outline=ow, width=width)
    else:  # triangle, apex up
        pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
        if width > 0:
            draw.polygon(pts, fill=fill, outline=outline, width=width)
        else:
            draw.polygon(pts, fill=fill)


def _render_count(rng: random.Random, size: int, st: dict, bg: RGB,
                  answer: str | None) -> tuple[Image.Image, str]:
    n = rng.randint(1, MAX_COUNT) if answer is None else int(answer)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    lo, hi = st["shape_radius"]
    r_min = max(2, round(lo * size))
    r_max = max(r_min, round(hi * size))
    gap = max(2, size // 28)
    width = _scaled(rng.choice(st["outline_widths"]), size)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        r = rng.randint(r_min, r_max)
        placed = False
        while not placed:
            for _ in range(200):
                cx = rng.randint(r + 1, size - 2 - r)
                cy = rng.randint(r + 1, size - 2 - r)
                box = (cx - r, cy - r, cx + r, cy + r)
                if all(box[2] + gap < b[0] or b[2] + gap < box[0] or box[3] + gap < b[1]
                       or b[3] + gap < box[1] for b in boxes):
                    boxes.append(box)
                    placed = True
                    break
            else:
                if r <= 2:  # cannot happen for n <= 6 at >= 28 px; guard against an endless loop
                    raise ValueError(f"image_size {size} is too small for {n} shapes")
                r -= 1
    for box in boxes:
        kind = rng.choice(("circle", "square", "triangle"))
        w = min(width, (box[2] - box[0]) // 6)
        _draw_shape(draw, kind, box, rng.choice(st["palette"]), st["outline"], w)
    return img, str(n)


def _render_bar(rng: random.Random, size: int, st: dict, bg: RGB,
                answer: str | None) -> tuple[Image.Image, str]:
    if answer is None:
        answer = rng.choice(BAR_LETTERS)
    k = BAR_LETTERS.index(answer)
    n = 4 if k == 3 else rng.choice((3, 4))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    font = _font(max(6, round(size * st["font_frac"])))
    ink = (0, 0, 0)
    label_h = font.getbbox("ABCD")[3] + 3
    left, right, top = max(3, size // 14), max(2, size // 20), max(3, size // 14)
    base = size - 1 - label_h
    plot_h = base - top
    plot_w = size - left - right
    # heights in whole pixels; the tallest beats every other bar by >= BAR_MARGIN of its height
    tallest = rng.randint(math.ceil(0.75 * plot_h), plot_h)
    cap = math.floor(tallest * (1 - BAR_MARGIN) - 1)
    heights = [rng.randint(max(2, round(0.15 * tallest)), max(2, cap)) for _ in range(n)]
    heights[k] = tallest
    assert tallest - max(h for i, h in enumerate(heights) if i != k) >= BAR_MARGIN * tallest
    slot = plot_w / n
    wf = rng.uniform(*st["bar_width_frac"])
    bar_w = max(2, round(slot * wf))
    width = min(_scaled(rng.choice(st["outline_widths"]), size), bar_w // 4)
    colour = rng.choice(st["palette"])
    for i, h in enumerate(heights):
        cx = left + slot * (i + 0.5)
        x0 = round(cx - bar_w / 2)
        box = (x0, base - h, x0 + bar_w - 1, base)
        draw.rectangle(box, fill=colour, outline=st["outline"] if width > 0 else None, width=width)
        l0, t0, l1, _ = draw.textbbox((0, 0), BAR_LETTERS[i], font=font)
        draw.text((round(cx - (l0 + l1) / 2), base + 2 - t0), BAR_LETTERS[i], fill=ink, font=font)
    draw.line([(left - 2, base), (size - right, base)], fill=ink, width=1)  # x axis
    draw.line([(left - 2, top - 2), (left - 2, base)], fill=ink, width=1)  # y axis
    return img, answer


def _render_length(rng: random.Random, size: int, st: dict, bg: RGB,
                   answer: str | None) -> tuple[Image.Image, str]:
    length = rng.randint(1, MAX_LENGTH) if answer is None else int(answer)
    cell = size // GRID_CELLS
    if cell < 2:
        raise ValueError(f"image_size {size} is too small for a {GRID_CELLS}x{GRID_CELLS} grid")
    off = (size - GRID_CELLS * cell) // 2
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    grid = st["grid"]
    for j in range(GRID_CELLS + 1):
        p = min(off + j * cell, size - 1)
        draw.line([(p, 0), (p, size - 1)], fill=grid, width=1)
        draw.line([(0, p), (size - 1, p)], fill=grid, width=1)
    horizontal = rng.random() < 0.5
    line = rng.randint(1, GRID_CELLS - 1)  # an interior grid line
    start = rng.randint(0, GRID_CELLS - length)
    a = off + start * cell
    b = min(off + (start + length) * cell, size - 1)
    c = off + line * cell
    w = _scaled(rng.choice(st["segment_widths"]), size)
    lo, hi = c - (w - 1) // 2, c + w // 2
    colour = rng.choice(st["palette"])
    box = (a, lo, b, hi) if horizontal else (lo, a, hi, b)
    draw.rectangle(box, fill=colour)
    return img, str(length)


_RENDERERS = {"count": _render_count, "bar": _render_bar, "length": _render_length}


def render_example(task: str, rng: random.Random, *, image_size: int = 56,
                   style: str = "in_domain", answer: str | None = None) -> dict:
    """Render one example: ``{"images": [PIL RGB], "problem", "answer", "task", "solution"}``.

    The answer is drawn uniformly from ``answer_space(task)`` unless ``answer`` fixes it (the
    corpus builder uses that to balance answers exactly); everything else comes from ``rng``.
    """
    if task not in _RENDERERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if answer is not None and answer not in answer_space(task):
        raise ValueError(f"answer {answer!r} is impossible for task {task!r}; "
                         f"expected one of {answer_space(task)}")
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28, got {image_size}")
    st = _style(style)
    bg = rng.choice(st["backgrounds"])
    img, answer = _RENDERERS[task](rng, image_size, st, bg, answer)
    return {
        "images": [img],
        "problem": PROBLEMS[task],
        "answer": answer,
        "task": task,
        "solution": f"<think> {_REASONING[task].format(a=answer)} </think> \\boxed{{{answer}}}",
    }


# ---------------------------------------------------------------------------------------------
# corpus

DEFAULT_SIZES: dict[str, int] = {"train": 3000, "val": 600, "test": 600, "ood": 6300}


def _derived_seed(seed: int, split: str, task: str) -> int:
    digest = hashlib.sha256(f"noisyrollout-synthetic:{seed}:{split}:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _per_task(total: int, tasks: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(tasks))
    return {t: base + (1 if i < extra else 0) for i, t in enumerate(tasks)}


def build_corpus(*, seed: int = 0, image_size: int = 56, tasks: Sequence[str] = TASKS,
                 sizes: Mapping[str, int] = DEFAULT_SIZES,
                 progress: bool = True) -> dict[str, datasets.Dataset]:
    """Render every split. ``sizes`` are totals per split, divided evenly across ``tasks``.

    Within a split each task's answers are uniform and balanced exactly (counts differ by at most
    one; the extra ones go to the first answers of ``answer_space``), in shuffled order. In split
    ``ood`` each row is also given a (shift, level) cell of ``shifts.CELLS``: every cell gets the
    same number of rows per task (within one), drawn independently of the answers. Each (split, task) pair has its
    own random stream derived from ``seed``, so adding a split or a task changes no other rows.
    Rows interleave the tasks (count, bar, length, count, ...); ids look like
    ``train-count-00017``.
    """
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks must not be empty")
    for t in tasks:
        if t not in _RENDERERS:
            raise ValueError(f"unknown task {t!r}; expected one of {TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task in {tasks}")
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"size of split {split!r} must be a non-negative int, got {n!r}")

    total = sum(sizes.values())
    bar = None
    if progress:
        from noisyrollout.progress import progress_bar

        bar = progress_bar(total=total, desc="rendering synthetic corpus", unit="ex")
    corpus: dict[str, datasets.Dataset] = {}
    try:
        for split, n in sizes.items():
            shifted = is_shifted_split(split)
            features = SHIFTED_FEATURES if shifted else CORPUS_FEATURES
            per_task: dict[str, list[dict]] = {}
            for task, count in _per_task(n, tasks).items():
                rng = random.Random(_derived_seed(seed, split, task))
                # uniform answers, balanced exactly: counts differ by at most one, order shuffled
                space = answer_space(task)
                answers = [space[i % len(space)] for i in range(count)]
                rng.shuffle(answers)
                cells: list = [None] * count
                if shifted:   # every (shift, level) cell equally often (within one), in shuffled order
                    cells = [CELLS[i % len(CELLS)] for i in range(count)]
                    rng.shuffle(cells)
                plan = list(zip(cells, answers))
                rows = []
                for i, (cell, answer) in enumerate(plan):
                    ex = render_example(task, rng, image_size=image_size, answer=answer)
                    if cell is not None:
                        shift, level = cell
                        ex["images"] = [apply_shift(ex["images"][0], shift, level, rng)]
                        ex["shift"], ex["level"] = shift, level
                    ex["id"] = f"{split}-{task}-{i:05d}"
                    rows.append(ex)
                    if bar is not None:
                        bar.update(1)
                per_task[task] = rows
            ordered = [per_task[t][i] for i in range(max(map(len, per_task.values()), default=0))
                       for t in tasks if i < len(per_task[t])]
            columns = {k: [r[k] for r in ordered] for k in features}
            info = datasets.DatasetInfo(
                description=json.dumps({
                    "generator": "noisyrollout.data.synthetic",
                    "seed": seed,
                    "image_size": image_size,
                    "tasks": list(tasks),
                    "split": split,
                    "style": "shifted" if shifted else "in_domain",
                }),
                features=features,
            )
            corpus[split] = datasets.Dataset.from_dict(columns, features=features, info=info)
    finally:
        if bar is not None:
            bar.close()
    return corpus


def _meta(ds: datasets.Dataset) -> dict:
    try:
        meta = json.loads(ds.info.description or "{}")
        return meta if isinstance(meta, dict) else {}
    except (TypeError, ValueError):
        return {}


def save_corpus(corpus: Mapping[str, datasets.Dataset], out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/<split>.parquet`` (HF image feature kept) and ``out_dir/manifest.json``.

    Returns ``{split: path, ..., "manifest": path}``.
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    manifest: dict = {"seed": None, "image_size": None, "tasks": [], "sizes": {}, "styles": {},
                      "answer_counts": {}, "files": {}}
    for split, ds in corpus.items():
        table = ds.with_format("arrow")[:]
        table = table.replace_schema_metadata(ds.features.arrow_schema.metadata)
        path = out_dir / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        paths[split] = path

        meta = _meta(ds)
        for key in ("seed", "image_size"):
            if manifest[key] is None and key in meta:
                manifest[key] = meta[key]
        if manifest["image_size"] is None and len(ds):
            manifest["image_size"] = ds[0]["images"][0].width
        cols = ds.column_names
        tasks_col = ds["task"] if "task" in cols else ["all"] * len(ds)
        counts: dict[str, Counter] = {}
        for task, ans in zip(tasks_col, ds["answer"]):
            counts.setdefault(task, Counter())[ans] += 1
        for task in meta.get("tasks", []) + list(counts):
            if task not in manifest["tasks"]:
                manifest["tasks"].append(task)
        manifest["sizes"][split] = len(ds)
        manifest["styles"][split] = meta.get("style", "shifted" if is_shifted_split(split) else "in_domain")
        manifest["answer_counts"][split] = {
            t: dict(sorted(c.items())) for t, c in counts.items()
        }
        manifest["files"][split] = {
            "path": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    mpath = out_dir / "manifest.json"
    tmp = mpath.with_name(f".{mpath.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, mpath)
    paths["manifest"] = mpath
    return paths
