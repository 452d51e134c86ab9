"""A hostile corpus, generated: every kind of bad row the pipeline can be handed, in every split and every benchmark.

Two layouts:

- `write_source(folder)`: a raw data folder in the layout `prepare` reads (`<split>.jsonl` + image files, one per
  row, under `images/<split>/`), for the splits train, val, test and ood. `prepare` turns it into the prepared tables
  the gate and the trainer read (`<prepared_dir>/<split>.parquet`). A jsonl source is used because a per-row
  non-string answer, a missing answer key and a zero-byte image file cannot be written in one typed parquet table.
- `write_benchmarks(data_dir)`: the six paper-benchmark folders `eval` reads (eval/benchmarks.py), each with the same
  kinds of bad rows in its own layout.

Each function returns what must happen to each row (`Row` / `Sample`), so a test compares with exact values.

The kinds (`KINDS`): truncated PNG and JPEG, a zero-byte file, a 0x0 image (a PNG whose IHDR says 0x0, with valid
CRCs: the PNG format forbids a zero side, so Pillow does not identify it) and the nearest valid one, 1x1; a
20000x20000 1-bit PNG (4e8 pixels: over twice Pillow's MAX_IMAGE_PIXELS, so `Image.open` raises
DecompressionBombError; 48 kB on disk); RGBA (half transparent), palette (P), grayscale (L), CMYK (JPEG), 16-bit
(I;16 PNG) and an EXIF-rotated JPEG (Orientation 6); missing, empty and non-string answers (a number is converted to
its text, a bool and a list are not answers); duplicate ids; a problem without its `<image>` placeholder and one with
two; unicode and RTL text; a 1 MB problem.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SPLITS: tuple[str, ...] = ("train", "val", "test", "ood")
SIDE = 56                                   # the embedded corpus' image side: 3136 px, inside every pixel bound
HUGE_SIDE = 20_000                          # 4e8 px: above 2 * Image.MAX_IMAGE_PIXELS (a DecompressionBombError)
MB_PROBLEM_CHARS = 1 << 20                  # the "1 MB problem"
RTL_PROBLEM = ("<image>كم عدد الأشكال في الصورة؟ \u202eright-to-left override\u202c שלום 数学 ✓ e\u0301 "
               "👩\u200d👩\u200d👧 How many shapes?")

# reference colours of the convertible images (what the loaders must give back as RGB)
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
PALETTE_COLOUR = (0, 128, 255)
GRAY = 77
I16_VALUE = 0x8080                          # 32896 of 65535: 128 of 255 (the top byte), not clipped to 255

# the gate's rules, as (expectation, column) the way pipelines/gate.py reports them
DECODES = ("expect_column_values_to_be_in_set", "images_decodable")
MIN_PX = ("expect_column_values_to_be_between", "min_image_pixels")
MAX_PX = ("expect_column_values_to_be_between", "max_image_pixels")
PIXELS = (MIN_PX, MAX_PX)                   # a one-image row has its smallest image = its largest
ANSWER_NULL = ("expect_column_values_to_not_be_null", "answer")
ANSWER_BLANK = ("expect_column_values_to_match_regex", "answer")
UNIQUE_ID = ("expect_column_values_to_be_unique", "id")
PLACEHOLDERS = ("expect_column_pair_values_to_be_equal", "n_image_placeholders, n_images")
PROBLEM_LENGTH = ("expect_column_value_lengths_to_be_between", "problem")


@dataclass(frozen=True)
class Row:
    """One planted row of a split: its id, its kind, the gate rules it must fail (none: it must pass) and, for a
    convertible image, the RGB colour the loaders must give at (x, y) fractions of the converted image."""

    id: str
    kind: str
    rules: tuple[tuple[str, str], ...] = ()
    colours: tuple[tuple[float, float, tuple[int, int, int]], ...] = ()
    size: tuple[int, int] | None = None     # the converted image's (width, height) before resizing

    @property
    def bad(self) -> bool:
        return bool(self.rules)


@dataclass(frozen=True)
class Sample:
    """One planted benchmark sample: its id (as the loader names it), its kind, whether evaluation can score it, and a
    fragment of the reason it records when it cannot."""

    id: str
    kind: str
    scored: bool
    reason: str = ""
    colours: tuple[tuple[float, float, tuple[int, int, int]], ...] = field(default=(), compare=False)

    @property
    def late(self) -> bool:
        """Found unreadable only when decoded for the model (its header opens; loaders read headers only)."""
        return self.kind in LATE


# ---------------------------------------------------------------------------------------------
# image bytes


def _save(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(seed: int = 0) -> Image.Image:
    """Incompressible pixels, so a cut falls inside the pixel data and not in a header."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), "RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def zero_size_png() -> bytes:
    """A PNG with a 0x0 IHDR and valid CRCs (the format forbids zero sides; Pillow cannot write one)."""
    return _png(0, 0, 8, 2, zlib.compress(b""))


_HUGE: bytes | None = None


def huge_png() -> bytes:
    """A valid 20000x20000 1-bit black PNG, compressed row by row (50 MB of pixel data, 48 kB on disk)."""
    global _HUGE
    if _HUGE is None:
        row = bytes(1 + HUGE_SIDE // 8)                 # filter byte 0 + 2500 bytes of black
        packer = zlib.compressobj(9)
        idat = b"".join(packer.compress(row) for _ in range(HUGE_SIDE)) + packer.flush()
        _HUGE = _png(HUGE_SIDE, HUGE_SIDE, 1, 0, idat)
    return _HUGE


def rgba_png() -> bytes:
    """Left half opaque red, right half fully transparent (blue underneath): RGB gives red | white."""
    image = Image.new("RGBA", (SIDE, SIDE), (*BLUE, 0))
    image.paste((*RED, 255), (0, 0, SIDE // 2, SIDE))
    return _save(image, "PNG")


def palette_png() -> bytes:
    image = Image.new("P", (SIDE, SIDE), 3)
    image.putpalette([0, 0, 0] * 3 + list(PALETTE_COLOUR) + [0, 0, 0] * 252)
    return _save(image, "PNG")


def cmyk_jpeg() -> bytes:
    """Pure red in CMYK (C=0, M=Y=255, K=0)."""
    return _save(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), "JPEG", quality=95)


def i16_png() -> bytes:
    """16-bit grayscale at 0x8080: 128 of 255 once scaled to 8 bits (clipping would make it 255)."""
    return _save(Image.new("I;16", (SIDE, SIDE), I16_VALUE), "PNG")


def exif_jpeg() -> bytes:
    """Stored 56x28, left half red and right half blue, with EXIF Orientation 6 (display rotated 90 degrees
    clockwise): shown upright it is 28x56, red on top, blue below."""
    image = Image.new("RGB", (SIDE, SIDE // 2), BLUE)
    image.paste(RED, (0, 0, SIDE // 2, SIDE // 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, "JPEG", quality=95, exif=exif.tobytes())


def image_bytes() -> dict[str, tuple[str, bytes]]:
    """{kind: (file suffix, bytes)} of every image kind."""
    png, jpeg = _save(_noise(), "PNG"), _save(_noise(1), "JPEG", quality=90)
    return {
        "clean": (".png", _save(Image.new("RGB", (SIDE, SIDE), (30, 60, 90)), "PNG")),
        "png_truncated": (".png", png[: len(png) // 2]),
        "jpeg_truncated": (".jpg", jpeg[: len(jpeg) * 3 // 5]),
        "zero_byte": (".png", b""),
        "zero_size": (".png", zero_size_png()),
        "one_pixel": (".png", _save(Image.new("RGB", (1, 1), RED), "PNG")),
        "huge": (".png", huge_png()),
        "rgba": (".png", rgba_png()),
        "palette": (".png", palette_png()),
        "gray": (".png", _save(Image.new("L", (SIDE, SIDE), GRAY), "PNG")),
        "cmyk": (".jpg", cmyk_jpeg()),
        "i16": (".png", i16_png()),
        "exif": (".jpg", exif_jpeg()),
    }


#: what each convertible image must look like as RGB: (x, y) fractions -> colour, and the upright size
CONVERTED: dict[str, tuple[tuple[tuple[float, float, tuple[int, int, int]], ...], tuple[int, int]]] = {
    "rgba": (((0.25, 0.5, RED), (0.75, 0.5, WHITE)), (SIDE, SIDE)),
    "palette": (((0.5, 0.5, PALETTE_COLOUR),), (SIDE, SIDE)),
    "gray": (((0.5, 0.5, (GRAY, GRAY, GRAY)),), (SIDE, SIDE)),
    "cmyk": (((0.5, 0.5, RED),), (SIDE, SIDE)),
    "i16": (((0.5, 0.5, (128, 128, 128)),), (SIDE, SIDE)),
    "exif": (((0.5, 0.25, RED), (0.5, 0.75, BLUE)), (SIDE // 2, SIDE)),
}
CONVERTIBLE = tuple(CONVERTED)
LATE = ("png_truncated", "jpeg_truncated")
BROKEN_IMAGES = ("png_truncated", "jpeg_truncated", "zero_byte", "zero_size")   # do not decode at all
KINDS: tuple[str, ...] = (
    "clean", *BROKEN_IMAGES, "one_pixel", "huge", *CONVERTIBLE,
    "answer_missing", "answer_empty", "answer_number", "answer_bool", "answer_list",
    "duplicate_id", "no_placeholder", "two_placeholders", "unicode_rtl", "problem_1mb",
)


# ---------------------------------------------------------------------------------------------
# the raw source folder (what `prepare` reads)


def _source_rows(split: str) -> list[tuple[dict[str, Any], Row, str]]:
    """(jsonl object without `images`, expected Row, image kind) for every planted row of one split."""
    out: list[tuple[dict[str, Any], Row, str]] = []

    def add(kind: str, rules: tuple = (), *, image: str = "clean", problem: str | None = None,
            answer: Any = "3", drop_answer: bool = False, ident: str | None = None) -> None:
        obj: dict[str, Any] = {"id": ident or f"{split}-{kind}", "problem": problem or
                               f"<image>How many shapes are in the picture? ({split}, {kind})", "task": "count"}
        if not drop_answer:
            obj["answer"] = answer
        colours, size = CONVERTED.get(image, ((), None))
        out.append((obj, Row(obj["id"], kind, tuple(rules), colours, size), image))

    add("clean")
    for kind in BROKEN_IMAGES:
        add(kind, (DECODES,), image=kind)
    add("one_pixel", PIXELS, image="one_pixel")
    add("huge", PIXELS, image="huge")
    for kind in CONVERTIBLE:
        add(kind, image=kind)
    add("answer_missing", (ANSWER_NULL,), drop_answer=True)
    add("answer_empty", (ANSWER_BLANK,), answer="")
    add("answer_number", answer=3)                       # converted to "3": passes
    add("answer_bool", (ANSWER_NULL,), answer=True)      # not an answer: stored as null, named by the not-null rule
    add("answer_list", (ANSWER_NULL,), answer=[1, 2])
    add("duplicate_id", (UNIQUE_ID,), ident=f"{split}-dup")
    add("duplicate_id", (UNIQUE_ID,), ident=f"{split}-dup")
    add("no_placeholder", (PLACEHOLDERS,), problem="How many shapes are in the picture?")
    add("two_placeholders", (PLACEHOLDERS,), problem="<image><image>How many shapes are in the two pictures?")
    add("unicode_rtl", problem=RTL_PROBLEM, answer="٣")
    add("problem_1mb", (PROBLEM_LENGTH,), problem="<image>" + "x" * (MB_PROBLEM_CHARS - len("<image>")))
    return out


def write_source(folder: Path, splits: tuple[str, ...] = SPLITS,
                 kinds: tuple[str, ...] | None = None) -> dict[str, list[Row]]:
    """Write `<folder>/<split>.jsonl` and its images for every split (only the rows of `kinds` when given); return
    the planted rows per split, in order."""
    folder = Path(folder)
    images = image_bytes()
    planted: dict[str, list[Row]] = {}
    for split in splits:
        lines, rows = [], []
        for n, (obj, row, image) in enumerate(_source_rows(split)):
            if kinds is not None and row.kind not in kinds:
                continue
            suffix, data = images[image]
            rel = Path("images") / split / f"{n:02d}-{image}{suffix}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            lines.append(json.dumps({**obj, "images": [rel.as_posix()]}, ensure_ascii=False))
            rows.append(row)
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        planted[split] = rows
    return planted


def bad_rows(planted: dict[str, list[Row]]) -> set[tuple[str, str, str, str]]:
    """{(split, id, expectation, column)}: every (row, rule) the gate must name."""
    return {(split, row.id, exp, col) for split, rows in planted.items() for row in rows for exp, col in row.rules}


#: how `eval` must treat each kind of row of a prepared split (embedded_test / embedded_ood): (scored?, reason)
_EMBEDDED_OUTCOME: dict[str, tuple[bool, str]] = {
    "png_truncated": (False, "unreadable image"), "jpeg_truncated": (False, "unreadable image"),
    "zero_byte": (False, "unreadable image"), "zero_size": (False, "unreadable image"),
    "huge": (False, "unreadable image"), "answer_missing": (False, "no ground-truth answer"),
    "answer_bool": (False, "no ground-truth answer"), "answer_list": (False, "no ground-truth answer"),
    "answer_empty": (False, "no ground-truth answer (blank)"),
}


def embedded_samples(rows: list[Row]) -> list[Sample]:
    """What `eval` must make of a prepared split written from `write_source` (`prepare` stored a bool or list
    answer as null): one sample per row, the second duplicate renamed `<id>#2`."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        seen[row.id] = seen.get(row.id, 0) + 1
        scored, reason = _EMBEDDED_OUTCOME.get(row.kind, (True, ""))
        ident = row.id if seen[row.id] == 1 else f"{row.id}#{seen[row.id]}"
        out.append(Sample(ident, row.kind, scored, reason, row.colours))
    return out


# ---------------------------------------------------------------------------------------------
# the six benchmark folders (what `eval` reads)

#: image kinds -> (scored?, reason fragment). Truncated files open (header) and fail when decoded for the model.
_IMAGE_OUTCOME: dict[str, tuple[bool, str]] = {
    "clean": (True, ""), "png_truncated": (False, "unreadable image"), "jpeg_truncated": (False, "unreadable image"),
    "zero_byte": (False, "unreadable image"), "zero_size": (False, "unreadable image"), "one_pixel": (True, ""),
    "huge": (False, "DecompressionBombError"), "missing_file": (False, "missing image"),
    **{kind: (True, "") for kind in CONVERTIBLE},
}
#: answer kinds -> (raw value or a marker to drop the field, scored?, reason fragment)
_DROP = object()
_ANSWER_OUTCOME: dict[str, tuple[Any, bool, str]] = {
    "answer_missing": (_DROP, False, "no ground-truth answer"),
    "answer_empty": ("", False, "no ground-truth answer"),
    "answer_number": (3, True, ""),
    "answer_bool": (True, False, "not text"),
    "answer_list": ([1, 2], False, "not text"),
}
_TEXT_KINDS = ("unicode_rtl", "problem_1mb", "no_placeholder", "two_placeholders")


def _question(kind: str, n: int) -> str:
    if kind == "unicode_rtl":
        return RTL_PROBLEM.removeprefix("<image>")
    if kind == "problem_1mb":
        return "x" * MB_PROBLEM_CHARS
    if kind == "two_placeholders":
        return "<image><image>Which shape is larger"
    return f"Question {n}: how many shapes are there"      # no '?': HallusionBench cuts a question at its first


def _plan(answers: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(kind, image kind, answer kind) of every planted sample; answer kind '' = a good answer."""
    plan = [(kind, kind, "") for kind in _IMAGE_OUTCOME]
    plan += [(kind, "clean", kind) for kind in answers]
    plan += [(kind, "clean", "") for kind in _TEXT_KINDS]
    plan += [("duplicate_id", "clean", ""), ("duplicate_id", "clean", "")]
    return plan


def _outcome(kind: str, image: str, answer: str) -> tuple[bool, str]:
    if answer:
        return _ANSWER_OUTCOME[answer][1:]
    return _IMAGE_OUTCOME[image] if image in _IMAGE_OUTCOME else (True, "")


def write_benchmarks(data_dir: Path) -> dict[str, list[Sample]]:
    """Write the six benchmark folders under `data_dir`, each holding every kind its layout can carry; return the
    planted samples per benchmark, in the order the loader returns them. The duplicate id comes back as `<id>` and
    `<id>#2`. Answer kinds a layout cannot carry are left out: MathVision's TSV holds text only (a missing answer is
    an empty cell), Geometry3K's answer is a choice letter and HallusionBench's a 0/1 `gt_answer` (a number, a bool or a
    list there is a malformed benchmark, refused by name)."""
    root = Path(data_dir)
    images = image_bytes()
    writers = {"geo3k": _geo3k, "wemath": _wemath, "mathvista": _mathvista, "mathverse": _mathverse,
               "mathvision": _mathvision, "hallubench": _hallubench}
    return {name: write(root, images) for name, write in writers.items()}


def _put(path: Path, images: dict[str, tuple[str, bytes]], image: str) -> None:
    if image == "missing_file":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(images[image][1])


def _samples(plan: list[tuple[str, str, str]], ids: list[str]) -> list[Sample]:
    seen: dict[str, int] = {}
    out = []
    for (kind, image, answer), ident in zip(plan, ids):
        seen[ident] = seen.get(ident, 0) + 1
        scored, reason = _outcome(kind, image, answer)
        colours = CONVERTED.get(image, ((), None))[0]
        out.append(Sample(ident if seen[ident] == 1 else f"{ident}#{seen[ident]}", kind, scored, reason, colours))
    return out


def _ids(plan: list[tuple[str, str, str]], first: int = 1) -> list[str]:
    """Numeric ids in plan order; both duplicate rows get the id of the first of them."""
    ids, dup = [], None
    for n, (kind, _, _) in enumerate(plan, first):
        if kind == "duplicate_id":
            dup = dup or str(n)
            ids.append(dup)
        else:
            ids.append(str(n))
    return ids


def _answer_field(row: dict[str, Any], key: str, answer: str, good: Any) -> None:
    value = _ANSWER_OUTCOME[answer][0] if answer else good
    if value is not _DROP:
        row[key] = value


def _geo3k(root: Path, images: dict) -> list[Sample]:
    plan = _plan(("answer_missing", "answer_empty"))
    ids = _ids(plan)
    for n, ((kind, image, answer), ident) in enumerate(zip(plan, ids), 1):
        row: dict[str, Any] = {"id": int(ident), "annotat_text": _question(kind, n), "choices": ["1", "2", "3", "4"]}
        _answer_field(row, "answer", answer, "C")
        folder = root / "geometry3k" / "test" / str(n)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
        _put(folder / "img_diagram.png", images, image)
    return _samples(plan, ids)


def _json_rows(plan, ids, make) -> list[dict[str, Any]]:
    return [make(n, kind, image, answer, ident) for n, ((kind, image, answer), ident) in enumerate(zip(plan, ids), 1)]


def _wemath(root: Path, images: dict) -> list[Sample]:
    plan = _plan(tuple(_ANSWER_OUTCOME))
    ids = _ids(plan)

    def make(n, kind, image, answer, ident):
        name = f"{n}-{image}{images.get(image, ('.png', b''))[0]}"
        _put(root / "wemath" / "images" / name, images, image)
        row = {"ID": ident, "key": "1step", "question": _question(kind, n), "option": "A. 1; B. 2; C. 3",
               "image_path": name}
        _answer_field(row, "answer", answer, "C")
        return row

    rows = _json_rows(plan, ids, make)
    (root / "wemath" / "testmini.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return _samples(plan, [f"{i}@1step" for i in ids])


def _mathvista(root: Path, images: dict) -> list[Sample]:
    plan = _plan(tuple(_ANSWER_OUTCOME))
    ids = _ids(plan)

    def make(n, kind, image, answer, ident):
        name = f"images/{n}-{image}{images.get(image, ('.png', b''))[0]}"
        _put(root / "mathvista" / name, images, image)
        row = {"pid": ident, "image": name, "question": _question(kind, n), "query": _question(kind, n),
               "question_type": "free_form", "answer_type": "integer", "metadata": {"task": "math word problem"}}
        _answer_field(row, "answer", answer, "3")
        return row

    rows = _json_rows(plan, ids, make)
    (root / "mathvista" / "testmini.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return _samples(plan, ids)


def _mathverse(root: Path, images: dict) -> list[Sample]:
    plan = _plan(tuple(_ANSWER_OUTCOME))
    ids = _ids(plan)

    def make(n, kind, image, answer, ident):
        name = f"{n}-{image}{images.get(image, ('.png', b''))[0]}"
        _put(root / "mathverse" / "images" / name, images, image)
        row = {"sample_index": ident, "problem_index": ident, "problem_version": "Vision Only", "image": name,
               "query_cot": _question(kind, n), "question_for_eval": _question(kind, n)}
        _answer_field(row, "answer", answer, "3")
        return row

    rows = _json_rows(plan, ids, make)
    (root / "mathverse" / "testmini.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return _samples(plan, ids)


def _mathvision(root: Path, images: dict) -> list[Sample]:
    plan = _plan(("answer_missing", "answer_number"))     # a TSV cell is text: missing = an empty cell
    ids = _ids(plan)
    lines = ["index\tquestion\tanswer\tcategory"]
    for n, ((kind, image, answer), ident) in enumerate(zip(plan, ids), 1):
        # images/<index>.jpg: the duplicate rows share one file (the second row's image wins; both are clean)
        _put(root / "mathvision" / "images" / f"{ident}.jpg", images, image)
        value = {"answer_missing": "", "answer_number": "3"}.get(answer, "3")
        lines.append("\t".join([ident, _question(kind, n), value, "algebra"]))
    (root / "mathvision").mkdir(parents=True, exist_ok=True)
    (root / "mathvision" / "MathVision.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return _samples(plan, ids)


def _hallubench(root: Path, images: dict) -> list[Sample]:
    plan = _plan(("answer_missing", "answer_empty"))
    ids = _ids(plan)

    def make(n, kind, image, answer, ident):
        name = f"hallusion_bench/VS/chart/{n}-{image}{images.get(image, ('.png', b''))[0]}"
        _put(root / "hallubench" / "images" / name, images, image)
        row = {"set_id": ident, "figure_id": "0", "question_id": "0", "category": "VS", "subcategory": "chart",
               "question": _question(kind, n), "filename": f"./{name}"}
        _answer_field(row, "gt_answer", answer, "1")
        return row

    rows = _json_rows(plan, ids, make)
    (root / "hallubench").mkdir(parents=True, exist_ok=True)
    (root / "hallubench" / "HallusionBench.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return _samples(plan, [f"{i}_0_0" for i in ids])
