"""Tests for the synthetic corpus (noisyrollout.data.synthetic) and loaders (noisyrollout.data.loaders)."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from noisyrollout.data import loaders
from noisyrollout.data.loaders import (
    IMAGE_FACTOR,
    fit_pixels,
    load_examples,
    load_records,
    parse_hub_spec,
    validate_examples,
)
from noisyrollout.data.shifts import CELLS
from noisyrollout.data.synthetic import (
    PROBLEMS,
    TASKS,
    answer_space,
    build_corpus,
    render_example,
    save_corpus,
)
from noisyrollout.errors import DataError

WHITE = (255, 255, 255)
SOLUTION_RE = re.compile(r"^<think> [A-Za-z0-9 ]+ </think> \\boxed\{([^{}]+)\}$")


def _png_bytes(ds: datasets.Dataset) -> list[bytes]:
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return [row["images"][0]["bytes"] for row in raw]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _mode_colour(img: Image.Image) -> tuple[int, int, int]:
    px = _pixels(img).reshape(-1, 3)
    values, counts = np.unique(px, axis=0, return_counts=True)
    return tuple(int(v) for v in values[counts.argmax()])


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return n


@pytest.fixture(scope="module")
def small_corpus() -> dict[str, datasets.Dataset]:
    return build_corpus(seed=3, sizes={"train": 60, "val": 30, "ood": 30}, progress=False)


# --------------------------------------------------------------------------- synthetic: rows


@pytest.mark.parametrize("task", TASKS)
def test_render_example_schema(task: str, style: str = "in_domain") -> None:
    rng = random.Random(0)
    for _ in range(20):
        ex = render_example(task, rng, style=style)
        assert set(ex) == {"images", "problem", "answer", "task", "solution"}
        (img,) = ex["images"]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (56, 56)
        assert ex["problem"] == PROBLEMS[task] and ex["problem"].startswith("<image>")
        assert ex["task"] == task
        assert ex["answer"] in answer_space(task)
        m = SOLUTION_RE.match(ex["solution"])
        assert m and m.group(1) == ex["answer"], ex["solution"]


def test_render_example_other_size_and_bad_args() -> None:
    ex = render_example("count", random.Random(1), image_size=112)
    assert ex["images"][0].size == (112, 112)
    with pytest.raises(ValueError, match="unknown task"):
        render_example("colour", random.Random(0))
    with pytest.raises(ValueError, match="unknown style"):
        render_example("count", random.Random(0), style="sepia")
    with pytest.raises(ValueError, match="impossible"):
        render_example("count", random.Random(0), answer="7")


def test_solution_vocabulary_is_small() -> None:
    rng = random.Random(5)
    words = set()
    for task in TASKS:
        for _ in range(50):
            sol = render_example(task, rng)["solution"]
            words.update(re.sub(r"\\boxed\{.*\}", "", sol).split())
    # <think>, </think>, 10 template words, digits 1-6 and letters A-D
    assert len(words) <= 22, sorted(words)


# --------------------------------------------------------------------------- synthetic: pictures


def test_count_picture_has_answer_many_shapes(style: str = "in_domain") -> None:
    rng = random.Random(11)
    for n in answer_space("count") * 5:
        ex = render_example("count", rng, style=style, answer=n)
        img = ex["images"][0]
        bg = np.array(_mode_colour(img), dtype=np.int16)
        mask = np.abs(_pixels(img) - bg).sum(axis=2) > 0
        assert _components(mask) == int(n)


def test_bar_picture_tallest_is_answer_with_margin(style: str = "in_domain") -> None:
    rng = random.Random(12)
    for letter in "ABCD" * 6:
        ex = render_example("bar", rng, style=style, answer=letter)
        px = _pixels(ex["images"][0])
        bg = np.array(_mode_colour(ex["images"][0]), dtype=np.int16)
        black = (px == 0).all(axis=2)
        axis_row = int(black.sum(axis=1).argmax())  # the x axis; letters are below it
        axis_col = int(black[:axis_row].sum(axis=0).argmax())  # the y axis
        body = (np.abs(px - bg).sum(axis=2) > 0) & ~black  # bars: fill and outline
        body[axis_row:] = False
        body[:, : axis_col + 1] = False
        cols = np.nonzero(body.any(axis=0))[0]
        runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
        assert len(runs) in (3, 4)
        # height of a bar = its tallest column of body-or-outline pixels above the axis
        heights = []
        for run in runs:
            rows = np.nonzero(body[:, run].any(axis=1))[0]
            heights.append(rows.max() - rows.min() + 1)
        k = int(np.argmax(heights))
        assert "ABCD"[k] == letter
        second = sorted(heights)[-2]
        assert heights[k] - second >= 0.15 * heights[k] - 2  # outline pixels may blur by 1-2 px


def test_length_picture_segment_spans_answer_cells() -> None:
    rng = random.Random(13)
    size = 56
    cell = size // 7
    for length in answer_space("length") * 6:
        ex = render_example("length", rng, answer=length)
        px = _pixels(ex["images"][0])
        sat = px.max(axis=2) - px.min(axis=2) > 40  # the coloured segment, not the grey grid
        ys, xs = np.nonzero(sat)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min())
        end_clipped = xs.max() == size - 1 or ys.max() == size - 1
        assert extent == int(length) * cell - (1 if end_clipped else 0)
        # it lies on a grid line: its centre line is a multiple of the cell size
        thin = ys if xs.max() - xs.min() > ys.max() - ys.min() else xs
        assert int(np.median(thin)) % cell == 0


# --------------------------------------------------------------------------- synthetic: corpus


def test_build_corpus_structure(small_corpus: dict[str, datasets.Dataset]) -> None:
    assert list(small_corpus) == ["train", "val", "ood"]
    train = small_corpus["train"]
    assert len(train) == 60
    assert train.column_names == ["images", "problem", "answer", "task", "solution", "id"]
    assert train["task"][:6] == ["count", "bar", "length"] * 2  # interleaved
    assert train["id"][:3] == ["train-count-00000", "train-bar-00000", "train-length-00000"]
    assert len(set(train["id"])) == 60
    assert all(re.fullmatch(r"(train|val|ood)-(count|bar|length)-\d{5}", i)
               for ds in small_corpus.values() for i in ds["id"])
    assert Counter(train["task"]) == {"count": 20, "bar": 20, "length": 20}
    img = train[0]["images"][0]
    assert isinstance(img, Image.Image) and img.size == (56, 56)
    # uneven totals are split as evenly as possible
    odd = build_corpus(seed=0, sizes={"x": 10}, progress=False)["x"]
    assert sorted(Counter(odd["task"]).values()) == [3, 3, 4]
    only = build_corpus(seed=0, sizes={"t": 4}, tasks=("length",), progress=False)["t"]
    assert set(only["task"]) == {"length"}


def test_build_corpus_ood_split_is_shifted_renders_in_balanced_cells() -> None:
    corpus = build_corpus(seed=5, sizes={"val": 21, "ood": 2 * 3 * len(CELLS)}, progress=False)
    ood = corpus["ood"]
    assert ood.column_names == ["images", "problem", "answer", "task", "solution", "id", "shift", "level"]
    assert "shift" not in corpus["val"].column_names
    # every (task, shift, level) cell exactly twice; levels 1-3 of known shifts
    assert Counter(zip(ood["task"], ood["shift"], ood["level"])) == {
        (t, s, lv): 2 for t in TASKS for s, lv in CELLS}
    # each row is an in-domain render under its shift: a white-background picture, changed
    for row in ood.select(range(0, len(ood), 7)):
        img = np.asarray(row["images"][0], dtype=np.int16)
        assert img.shape == (56, 56, 3)
        if row["shift"] not in ("tint", "fade"):   # the two shifts that recolour the background
            assert (np.abs(img - 255).sum(axis=2) <= 30).mean() > 0.5, row["id"]


def test_build_corpus_deterministic() -> None:
    sizes = {"train": 30, "ood": 15}
    a = build_corpus(seed=7, sizes=sizes, progress=False)
    b = build_corpus(seed=7, sizes=sizes, progress=False)
    c = build_corpus(seed=8, sizes=sizes, progress=False)
    for split in sizes:
        assert _png_bytes(a[split]) == _png_bytes(b[split])
        assert a[split]["answer"] == b[split]["answer"]
        assert _png_bytes(a[split]) != _png_bytes(c[split])
    # a split's rows do not depend on which other splits are built
    alone = build_corpus(seed=7, sizes={"ood": 15}, progress=False)
    assert _png_bytes(alone["ood"]) == _png_bytes(a["ood"])


def test_render_example_deterministic_for_rng_state() -> None:
    for task in TASKS:
        x = render_example(task, random.Random(99))
        y = render_example(task, random.Random(99))
        assert x["images"][0].tobytes() == y["images"][0].tobytes() and x["answer"] == y["answer"]


def test_answers_in_range_and_balanced() -> None:
    corpus = build_corpus(seed=1, sizes={"train": 360, "ood": 120}, progress=False)
    for ds in corpus.values():
        by_task: dict[str, Counter] = {}
        for task, ans in zip(ds["task"], ds["answer"]):
            by_task.setdefault(task, Counter())[ans] += 1
        for task, counts in by_task.items():
            assert set(counts) == set(answer_space(task)), (task, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)
    # render_example's own draws (no fixed answer) are roughly uniform too
    rng = random.Random(2)
    for task in TASKS:
        space = answer_space(task)
        counts = Counter(render_example(task, rng)["answer"] for _ in range(120 * len(space)))
        assert set(counts) == set(space)
        assert all(70 <= c <= 170 for c in counts.values()), (task, counts)


def test_bar_answer_d_only_with_four_bars_and_three_bar_charts_exist() -> None:
    rng = random.Random(4)
    n_bars = Counter()
    for letter in "ABCD" * 10:
        px = _pixels(render_example("bar", rng, answer=letter)["images"][0])
        sat = (px.max(axis=2) - px.min(axis=2) > 40).any(axis=0)
        cols = np.nonzero(sat)[0]
        n = len(np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1))
        n_bars[n] += 1
        if letter == "D":
            assert n == 4
    assert n_bars[3] > 0 and n_bars[4] > 0


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path: Path, small_corpus: dict[str, datasets.Dataset]) -> None:
    paths = save_corpus(small_corpus, tmp_path / "corpus")
    assert set(paths) == {"train", "val", "ood", "manifest"}
    for split in ("train", "val", "ood"):
        assert paths[split] == tmp_path / "corpus" / f"{split}.parquet" and paths[split].is_file()
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["seed"] == 3 and manifest["image_size"] == 56
    assert manifest["tasks"] == list(TASKS)
    assert manifest["sizes"] == {"train": 60, "val": 30, "ood": 30}
    assert manifest["styles"]["ood"] == "shifted" and manifest["styles"]["val"] == "in_domain"
    assert sum(manifest["answer_counts"]["val"]["bar"].values()) == 10
    assert manifest["answer_counts"]["train"]["count"] == dict(
        sorted(Counter(a for a, t in zip(small_corpus["train"]["answer"],
                                         small_corpus["train"]["task"]) if t == "count").items()))

    val = load_examples(str(tmp_path / "corpus"), split="val")
    assert len(val) == 30
    assert val["answer"] == small_corpus["val"]["answer"]
    assert val["id"] == small_corpus["val"]["id"]
    assert val["solution"] == small_corpus["val"]["solution"]
    row = val[0]
    assert isinstance(row["images"][0], Image.Image)
    assert row["images"][0].tobytes() == small_corpus["val"][0]["images"][0].tobytes()
    # the parquet file itself loads too
    direct = load_examples(str(paths["ood"]))
    assert direct["answer"] == small_corpus["ood"]["answer"]


def test_folder_split_selection_errors(tmp_path: Path, small_corpus) -> None:
    save_corpus(small_corpus, tmp_path)
    with pytest.raises(DataError, match=r"pass split="):
        load_examples(str(tmp_path))
    with pytest.raises(DataError, match=r"no test\.parquet or test\.jsonl"):
        load_examples(str(tmp_path), split="test")
    one = tmp_path / "one"
    one.mkdir()
    (tmp_path / "val.parquet").rename(one / "val.parquet")
    assert len(load_examples(str(one))) == 30  # the folder's only data file
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .parquet or .jsonl"):
        load_examples(str(empty))


def test_folder_with_hub_style_shards(tmp_path: Path, small_corpus) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train = small_corpus["train"]
    train.select(range(20)).to_parquet(data / "train-00000-of-00002.parquet")
    train.select(range(20, 60)).to_parquet(data / "train-00001-of-00002.parquet")
    ds = load_examples(str(tmp_path), split="train")
    assert ds["id"] == train["id"]


def test_parquet_without_hf_metadata_and_with_path_strings(tmp_path: Path) -> None:
    img = render_example("count", random.Random(0))["images"][0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    raw = pa.table({
        "images": [[{"bytes": buf.getvalue(), "path": None}]],
        "problem": ["<image>How many shapes are in the image?"],
        "answer": [3],
    })
    pq.write_table(raw, tmp_path / "raw.parquet")
    ds = load_examples(str(tmp_path / "raw.parquet"))
    assert isinstance(ds[0]["images"][0], Image.Image) and ds[0]["answer"] == "3"

    (tmp_path / "imgs").mkdir()
    img.save(tmp_path / "imgs" / "a.png")
    pq.write_table(pa.table({"images": [["imgs/a.png"]], "problem": ["<image>q"],
                             "answer": ["x"]}), tmp_path / "paths.parquet")
    ds = load_examples(str(tmp_path / "paths.parquet"))
    assert ds[0]["images"][0].tobytes() == img.tobytes()


# --------------------------------------------------------------------------- jsonl


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _save_png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), colour).save(path)
    return path


def test_jsonl_relative_and_absolute_paths(tmp_path: Path) -> None:
    d = tmp_path / "set"
    _save_png(d / "img" / "a.png", (10, 20, 30))
    absolute = _save_png(tmp_path / "elsewhere" / "b.png", (40, 50, 60))
    jl = _write_jsonl(d / "train.jsonl", [
        {"images": ["img/a.png"], "problem": "<image>What?", "answer": "A", "source": "s1"},
        "",
        {"images": [str(absolute)], "problem": "<image>Why?", "answer": 7},
    ])
    for src, kw in ((str(jl), {}), (str(d), {"split": "train"}), (str(d), {})):
        ds = load_examples(src, **kw)
        assert len(ds) == 2
        assert ds["answer"] == ["A", "7"]
        assert ds["source"] == ["s1", None]  # extra columns kept
        im0, im1 = ds[0]["images"][0], ds[1]["images"][0]
        assert isinstance(im0, Image.Image) and im0.convert("RGB").getpixel((0, 0)) == (10, 20, 30)
        assert im1.convert("RGB").getpixel((3, 3)) == (40, 50, 60)
    # the images are embedded: the dataset survives the files being removed
    (d / "img" / "a.png").unlink()
    assert ds[0]["images"][0].size == (20, 10)


def _assert_data_error(src: str, file_part: str, row: int | None, *pieces: str, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_examples(src, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert file_part in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    for p in pieces:
        assert p in msg, msg
    return msg


def test_bad_inputs_raise_one_line_data_error(tmp_path: Path) -> None:
    good = _save_png(tmp_path / "ok.png")
    png = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    ok = {"images": ["ok.png"], "problem": "<image>q", "answer": "1"}

    cases = {
        "missing_col.jsonl": ([{"images": ["ok.png"], "problem": "<image>q"}] * 2, None,
                              ("missing required column 'answer'",)),
        "missing_answer.jsonl": ([ok, {"images": ["ok.png"], "problem": "<image>q"}], 1,
                                 ("'answer' is missing",)),
        "no_image.jsonl": ([ok, ok, {**ok, "images": []}], 2, ("no image",)),
        "null_images.jsonl": ([ok, {**ok, "images": None}], 1, ("no image",)),
        "truncated.jsonl": ([ok, {**ok, "images": ["trunc.png"]}], 1, ("cannot be decoded",)),
        "garbage.jsonl": ([{**ok, "images": ["garbage.png"]}], 0,
                          ("image 'garbage.png' cannot be decoded",)),
        "missing_file.jsonl": ([ok, ok, ok, {**ok, "images": ["nope.png"]}], 3,
                               ("nope.png", "line 4")),
        "blank_answer.jsonl": ([ok, {**ok, "answer": "   "}], 1, ("'answer' is empty",)),
        "empty_problem.jsonl": ([ok, {**ok, "problem": ""}], 1, ("'problem'",)),
        "null_problem.jsonl": ([ok, ok, {**ok, "problem": None}], 2, ("'problem'",)),
        "bad_json.jsonl": ([ok, "{not json"], 1, ("invalid JSON", "line 2")),
    }
    for name, (rows, row, pieces) in cases.items():
        src = _write_jsonl(tmp_path / name, rows)
        _assert_data_error(str(src), name, row, *pieces)

    # a column whose rows mix types cannot become a table: still one line naming the file
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [ok, {**ok, "problem": {"a": 1}}])
    _assert_data_error(str(mixed), "mixed.jsonl", None)


def test_bad_parquet_inputs(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    feats = datasets.Features({"images": datasets.List(datasets.Image()),
                               "problem": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": [[img]], "problem": ["<image>q"]},
                               features=feats).to_parquet(tmp_path / "noans.parquet")
    _assert_data_error(str(tmp_path / "noans.parquet"), "noans.parquet", None,
                       "missing required column 'answer'")

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    full = datasets.Features({"images": datasets.List(datasets.Image()),
                              "problem": datasets.Value("string"),
                              "answer": datasets.Value("string")})
    good = {"bytes": buf.getvalue(), "path": None}
    bad = {"bytes": buf.getvalue()[:30], "path": None}
    datasets.Dataset.from_dict({"images": [[good], [bad]], "problem": ["<image>q"] * 2,
                                "answer": ["1", "2"]},
                               features=full).to_parquet(tmp_path / "badimg.parquet")
    msg = _assert_data_error(str(tmp_path / "badimg.parquet"), "badimg.parquet", 1)
    assert "images[0]" in msg

    (tmp_path / "notparquet.parquet").write_bytes(b"hello")
    _assert_data_error(str(tmp_path / "notparquet.parquet"), "notparquet.parquet", None,
                       "cannot read parquet")
    _assert_data_error(str(tmp_path / "absent.jsonl"), "absent.jsonl", None, "no such file")


def test_validate_examples_direct() -> None:
    img = Image.new("RGB", (8, 8))
    ints = datasets.Dataset.from_dict(
        {"images": [[img], [img]], "problem": [1, 2], "answer": ["1", "2"]},
        features=datasets.Features({"images": datasets.List(datasets.Image()),
                                    "problem": datasets.Value("int64"),
                                    "answer": datasets.Value("string")}))
    with pytest.raises(DataError, match=r"^mem: row 0: 'problem' must be a non-empty string "
                                        r"\(got int\)$"):
        validate_examples(ints, "mem")
    no_problem = datasets.Dataset.from_dict({"images": [[img]], "answer": ["1"]})
    with pytest.raises(DataError, match=r"^mem: missing required column 'problem'"):
        validate_examples(no_problem, "mem")
    ok = datasets.Dataset.from_dict({"images": [[img]], "problem": ["<image>q"], "answer": ["1"]})
    validate_examples(ok, "mem")
    # a shuffled / selected view is checked in its own row order
    shuffled = datasets.Dataset.from_dict(
        {"images": [[img], [img], [img]], "problem": ["<image>q"] * 3, "answer": ["1", " ", "3"]}
    ).select([2, 0, 1])
    with pytest.raises(DataError, match=r"^mem: row 2: 'answer' is empty$"):
        validate_examples(shuffled, "mem")


# --------------------------------------------------------------------------- hub specs


def test_hub_spec_parsing() -> None:
    assert parse_hub_spec("hiyouga/geometry3k@train") == ("hiyouga/geometry3k", "train")
    assert parse_hub_spec("hiyouga/geometry3k", "test") == ("hiyouga/geometry3k", "test")
    assert parse_hub_spec("o/n@train[:10]") == ("o/n", "train[:10]")
    for spec, kw, piece in [
        ("owner/name@", {}, "no split after '@'"),
        ("owner/name@a@b", {}, "more than one '@'"),
        ("@train", {}, "bad hub dataset id"),
        ("just-a-name@train", {}, "bad hub dataset id"),
    ]:
        msg = _assert_data_error(spec, spec, None, piece, "owner/name@split", **kw)
        assert msg.startswith(spec + ":"), msg
    for spec, kw, piece in [
        ("o/n@train", {"split": "test"}, "split 'train' in the spec conflicts with split='test'"),
    ]:
        msg = _assert_data_error(spec, spec, None, piece, **kw)
        assert msg.startswith(spec + ":"), msg
    _assert_data_error("hiyouga/geometry3k", "hiyouga/geometry3k", None, "needs a split")
    _assert_data_error("not-a-thing", "not-a-thing", None, "owner/name@split")


def test_hub_dispatch_normalises(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    img = Image.new("RGB", (8, 8), (9, 9, 9))

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"image": [img, img], "problem": ["<image>a", "<image>b"],
                                           "answer": [3, 4]})

    monkeypatch.setattr(loaders.datasets, "load_dataset", fake_load_dataset)
    ds = load_examples("owner/name@train")
    assert calls == [("owner/name", "train")]
    assert ds["answer"] == ["3", "4"]
    assert ds[0]["images"][0].getpixel((0, 0)) == (9, 9, 9)

    def offline(name, split=None, **kw):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)\n"
                              "more details")

    monkeypatch.setattr(loaders.datasets, "load_dataset", offline)
    _assert_data_error("owner/name@test", "owner/name@test", None, "cannot load hub dataset",
                       "ConnectionError")


# --------------------------------------------------------------------------- fit_pixels


SIZES = [(640, 480), (56, 56), (10, 10), (4000, 3000), (2000, 2000), (3000, 20), (333, 777), (29, 1000),
         (1000, 29), (57, 83)]
BOUNDS = [(262144, 1000000), (3136, 12544), (784, 3136), (3136, 3136), (3136, 200704)]


def _smart(size: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    """transformers' smart_resize on a (w, h) size, as (w, h)."""
    h, w = smart_resize(size[1], size[0], factor=28, min_pixels=bounds[0], max_pixels=bounds[1])
    return w, h


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bounds", BOUNDS)
def test_fit_pixels_is_smart_resize(size: tuple[int, int], bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    out = fit_pixels(Image.new("L", size, 128), lo, hi)
    w, h = out.size
    assert out.mode == "RGB" and w % 28 == 0 and h % 28 == 0
    first = _smart(size, bounds)
    if lo <= first[0] * first[1] <= hi:
        assert out.size == first  # smart_resize's size, which the processor keeps
    elif _smart(out.size, bounds) == out.size:
        assert lo <= w * h <= hi  # smart_resize again, to a size the processor keeps
    else:
        assert out.size == first  # there is none in so narrow a range: smart_resize's size


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bounds", BOUNDS[:3])
def test_the_processor_keeps_what_fit_pixels_made(size: tuple[int, int], bounds: tuple[int, int]) -> None:
    from transformers import Qwen2VLImageProcessor

    lo, hi = bounds
    processor = Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi, patch_size=14, merge_size=2, temporal_patch_size=2)
    original = Image.new("RGB", size, (200, 30, 30))
    resized = fit_pixels(original, lo, hi)
    w, h = resized.size
    grid = processor(images=[resized], return_tensors="pt")["image_grid_thw"].tolist()
    assert grid == [[1, h // 14, w // 14]]
    if resized.size == _smart(size, bounds):  # the grid the processor gives the original image too
        assert processor(images=[original], return_tensors="pt")["image_grid_thw"].tolist() == grid


def test_fit_pixels_details() -> None:
    assert IMAGE_FACTOR == 28
    assert fit_pixels(Image.new("RGB", (4000, 3000)), 262144, 1000000).size == (1148, 840)
    assert fit_pixels(Image.new("RGB", (2000, 2000)), 262144, 1000000).size == (980, 980)
    assert fit_pixels(Image.new("RGB", (10, 10)), 262144, 1000000).size == (532, 532)
    # the embedded default (3136 = 56 x 56 pixels): a 56 x 56 corpus image is kept as it is
    kept = Image.new("RGB", (56, 56), (1, 2, 3))
    assert fit_pixels(kept, 3136, 3136) is kept
    assert fit_pixels(Image.new("RGB", (112, 112)), 3136, 3136).size == (56, 56)
    # a side pinned to one block: smart_resize's 1344 x 28 is over max_pixels, the processor would shrink it again
    assert _smart((3000, 20), (3136, 12544)) == (1344, 28)
    assert fit_pixels(Image.new("RGB", (3000, 20)), 3136, 12544).size == (448, 28)
    # no 4:3 size in whole blocks has exactly 3136 pixels: smart_resize's answer, under the bound
    assert fit_pixels(Image.new("RGB", (640, 480)), 3136, 3136).size == (56, 28)
    assert fit_pixels(Image.new("RGB", (200, 200)), 1024, 4096, factor=32).size == (64, 64)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert fit_pixels(rgba, 1, 1000).getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    with pytest.raises(ValueError):
        fit_pixels(Image.new("RGB", (4, 4)), 100, 50)
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_pixels(Image.new("RGB", (3000, 10)), 3136, 3136)


# --------------------------------------------------------------------------- one image per row


def test_multi_image_rows_are_rejected_at_load_time(tmp_path: Path) -> None:
    d = tmp_path / "set"
    _save_png(d / "a.png")
    _save_png(d / "b.png")
    rows = [{"id": "r0", "images": ["a.png"], "problem": "<image>q", "answer": "1"},
            {"id": "r1", "images": ["a.png", "b.png"], "problem": "<image><image>q", "answer": "2"}]
    jl = _write_jsonl(d / "train.jsonl", rows)
    msg = _assert_data_error(str(d), "train.jsonl", 1, "(id 'r1')", "2 images",
                             "multi-image rows are not supported", split="train")
    assert msg == f"{jl}: row 1 (id 'r1'): 2 images; multi-image rows are not supported (one image per row)"
    with pytest.raises(DataError, match="multi-image rows are not supported"):
        load_records(str(d), "train", min_pixels=3136, max_pixels=3136)

    img = Image.new("RGB", (8, 8))
    feats = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": [[img], [img], [img, img, img]], "problem": ["<image>q"] * 3,
                                "answer": ["1", "2", "3"]}, features=feats).to_parquet(tmp_path / "val.parquet")
    _assert_data_error(str(tmp_path / "val.parquet"), "val.parquet", 2, "3 images",
                       "multi-image rows are not supported")


def test_load_records_gives_one_resized_image_per_row(tmp_path: Path) -> None:
    d = tmp_path / "set"
    d.mkdir()
    Image.new("RGB", (112, 112)).save(d / "a.png")
    Image.new("RGB", (3000, 10)).save(d / "wide.png")
    _write_jsonl(d / "train.jsonl", [{"id": "r0", "images": ["a.png"], "problem": "<image>q", "answer": "1"}])
    [record] = load_records(str(d), "train", min_pixels=3136, max_pixels=3136)
    assert "images" not in record and record["id"] == "r0" and record["image"].size == (56, 56)
    _write_jsonl(d / "train.jsonl", [{"images": ["a.png"], "problem": "<image>q", "answer": "1"},
                                     {"images": ["wide.png"], "problem": "<image>q", "answer": "2"}])
    with pytest.raises(DataError, match=r"^.*set \[train\]: row 1: image 3000x10: absolute aspect ratio"):
        load_records(str(d), "train", min_pixels=3136, max_pixels=3136)
