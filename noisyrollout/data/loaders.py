"""Load a training or evaluation set into the authors' schema and check it.

Every loader returns a ``datasets.Dataset`` with ``images`` (a list of images, HF ``Image``
feature, decoded to PIL on access), ``problem`` (str) and ``answer`` (str), plus any extra columns.
Validation accepts exactly one image per row: the policy and its prompts take one image.

Sources (``load_examples``):

- ``owner/name@split`` (or ``owner/name`` with ``split=``): ``datasets.load_dataset(name, split=)``;
- a ``.parquet`` file (HF image features kept; a plain ``{bytes, path}`` struct list or a list of
  image paths relative to the file's folder also work);
- a ``.jsonl`` file: one object per line with ``images`` (image paths relative to the jsonl
  file's folder, or absolute), ``problem``, ``answer``; image bytes are read into the dataset;
- a folder holding ``<split>.parquet`` / ``<split>.jsonl`` (or HF shards ``<split>-*.parquet``,
  also under ``data/``), or exactly one parquet/jsonl file.

Anything unusable raises ``DataError`` with one line naming the file and the row.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from noisyrollout.errors import DataError

__all__ = ["load_examples", "load_records", "validate_examples", "fit_pixels", "to_rgb", "parse_hub_spec",
           "REQUIRED_COLUMNS", "IMAGE_FACTOR"]

REQUIRED_COLUMNS: tuple[str, ...] = ("images", "problem", "answer")
_IMAGE_LIST = datasets.List(datasets.Image())
_IMAGE_LIST_ARROW = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SUFFIXES = (".parquet", ".jsonl")
# Qwen2-VL / Qwen2.5-VL: 14-pixel patches merged 2 x 2 into one token, so the processor makes both sides multiples of 28
IMAGE_FACTOR = 28
_RESIZE_PASSES = 16  # smart_resize passes before giving up on a size the processor keeps (a few suffice)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------
# dispatch


def parse_hub_spec(source: str, split: str | None = None) -> tuple[str, str]:
    """``"owner/name@split"`` -> ``("owner/name", "split")``; ``split=`` may supply the split."""
    name, at, spec_split = source.partition("@")
    name, spec_split = name.strip(), spec_split.strip()
    expected = "expected owner/name@split, e.g. hiyouga/geometry3k@train"
    if not _HUB_NAME.match(name):
        raise DataError(f"{source}: bad hub dataset id {name!r}; {expected}")
    if at and not spec_split:
        raise DataError(f"{source}: hub spec has no split after '@'; {expected}")
    if "@" in spec_split:
        raise DataError(f"{source}: hub spec has more than one '@'; {expected}")
    if spec_split and split and spec_split != split:
        raise DataError(f"{source}: split {spec_split!r} in the spec conflicts with "
                        f"split={split!r}")
    final = spec_split or split
    if not final:
        raise DataError(f"{source}: no such file or folder; as a hub dataset it needs a split "
                        f"({expected})")
    return name, final


def load_examples(source: str, *, split: str | None = None, validate: bool = True) -> datasets.Dataset:
    """Load ``source`` (hub spec, .parquet, .jsonl or folder) into the schema and (unless ``validate=False``,
    as the `prepare` stage does before the Great Expectations gate) check every row."""
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        files = _folder_files(path, split)
        parts = [_load_file(f, strict=validate) for f in files]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        label = str(files[0]) if len(files) == 1 else f"{path} ({split} shards)"
    elif path.is_file():
        ds, label = _load_file(path, strict=validate), str(path)
    elif path.suffix.lower() in _SUFFIXES or src.startswith((".", "/", "~")):
        raise DataError(f"{src}: no such file or folder")
    elif "@" in src or _HUB_NAME.match(src):
        name, hub_split = parse_hub_spec(src, split)
        ds, label = _load_hub(name, hub_split), f"{name}@{hub_split}"
    else:
        raise DataError(f"{src}: no such file or folder, and not a hub spec "
                        "(expected a .parquet/.jsonl file, a folder, or owner/name@split)")
    if validate:
        validate_examples(ds, label)
    return ds


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    def data_files(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES
                      and not p.name.startswith("."))

    if split:
        for d in (folder, folder / "data"):
            if not d.is_dir():
                continue
            for suffix in _SUFFIXES:
                if (d / f"{split}{suffix}").is_file():
                    return [d / f"{split}{suffix}"]
            shards = sorted(d.glob(f"{_glob_escape(split)}-*.parquet"))
            if shards:
                return shards
        found = [p.name for p in data_files(folder)]
        raise DataError(f"{folder}: no {split}.parquet or {split}.jsonl "
                        f"(found: {', '.join(found) or 'no parquet/jsonl files'})")
    found = data_files(folder)
    if len(found) == 1:
        return found
    if not found:
        raise DataError(f"{folder}: no .parquet or .jsonl file in the folder")
    raise DataError(f"{folder}: {len(found)} data files ({', '.join(p.name for p in found)}); "
                    "pass split= to choose one")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _load_file(path: Path, strict: bool = True) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _load_parquet(path)
    if suffix == ".jsonl":
        return _load_jsonl(path, strict=strict)
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .parquet or .jsonl)")


def _load_hub(name: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown repo, unknown split, ...
        raise DataError(f"{name}@{split}: cannot load hub dataset ({_short(exc)})") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{name}@{split}: load_dataset did not return one split")
    return _normalise(ds)


def _load_parquet(path: Path) -> datasets.Dataset:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read parquet ({_short(exc)})") from exc
    col_type = table.schema.field("images").type if "images" in table.column_names else None
    if col_type is not None and pa.types.is_list(col_type) and (
            pa.types.is_string(col_type.value_type)
            or pa.types.is_large_string(col_type.value_type)):
        # image paths relative to the parquet file's folder: embed the bytes
        refs = table.column("images").to_pylist()
        embedded = [None if r is None else
                    [_read_image_bytes(x, path.parent, f"{path}: row {i}") for x in r]
                    for i, r in enumerate(refs)]
        table = table.set_column(table.schema.get_field_index("images"), "images",
                                 pa.array(embedded, type=_IMAGE_LIST_ARROW))
        return _normalise(_dataset_with_image_list(table))
    try:
        ds = datasets.Dataset(table)  # HF features come back from the schema metadata
    except Exception as exc:
        raise DataError(f"{path}: cannot read parquet ({_short(exc)})") from exc
    return _normalise(ds)


def _read_image_bytes(ref: Any, base: Path | None, where: str) -> dict:
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"{where}: image entry must be a path string, got {type(ref).__name__}")
    p = Path(ref).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    try:
        return {"bytes": p.read_bytes(), "path": str(p)}
    except OSError as exc:
        raise DataError(f"{where}: cannot read image {ref!r} ({_short(exc)})") from exc


def _load_jsonl(path: Path, strict: bool = True) -> datasets.Dataset:
    """Rows of a jsonl file. An answer that is neither text nor a number (a bool, a list, an object) cannot share the
    table's string column: ``strict`` refuses it naming the row; otherwise (`prepare`, before the gate) it is stored
    as null, so the gate names the row."""
    rows: list[dict] = []
    keys: dict[str, None] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read jsonl ({_short(exc)})") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: row {len(rows)} (line {lineno})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "images" not in obj and "image" in obj:
            obj["images"] = obj.pop("image")
        imgs = obj.get("images")
        if isinstance(imgs, str):
            imgs = [imgs]
        if imgs is not None:
            if not isinstance(imgs, list):
                raise DataError(f"{where}: 'images' must be a list of image paths")
            obj["images"] = [_read_image_bytes(r, path.parent, where) for r in imgs]
        if "answer" in obj:
            obj["answer"] = _answer_text(obj["answer"])
            if obj["answer"] is not None and not isinstance(obj["answer"], str):
                if strict:
                    ident = f" (id {obj['id']!r})" if obj.get("id") is not None else ""
                    raise DataError(f"{where}{ident}: 'answer' must be a string (got {type(obj['answer']).__name__})")
                obj["answer"] = None
        keys.update(dict.fromkeys(obj))
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in keys]
    if missing:
        raise DataError(f"{path}: missing required column {missing[0]!r} "
                        f"(columns: {', '.join(keys)})")
    columns = {k: [r.get(k) for r in rows] for k in keys}
    try:
        table = pa.table({k: pa.array(v, type=_IMAGE_LIST_ARROW if k == "images" else None)
                          for k, v in columns.items()})
    except (pa.ArrowException, TypeError, ValueError) as exc:  # e.g. a column mixing types
        raise DataError(f"{path}: cannot build a table from the rows ({_short(exc)})") from exc
    return _dataset_with_image_list(table)


def _dataset_with_image_list(table: pa.Table,
                             feats: datasets.Features | None = None) -> datasets.Dataset:
    """A Dataset over ``table`` whose ``images`` column (list<struct<bytes, path>>) is
    ``List(Image())``. Built at the Arrow level: ``Image.encode_example`` would drop the bytes of
    any image whose path exists on disk, leaving the dataset tied to the files."""
    table = table.replace_schema_metadata(None)
    if feats is None:
        feats = datasets.Features.from_arrow_schema(table.schema)
    feats = datasets.Features(dict(feats))
    feats["images"] = _IMAGE_LIST
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=feats))


def _answer_text(value: Any) -> Any:
    """Numbers become strings (``3`` -> ``"3"``); anything else is left for validation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    return value


def _normalise(ds: datasets.Dataset) -> datasets.Dataset:
    """Bring ``images`` to ``List(Image())`` and numeric answers to strings, at the Arrow level.

    Handles a single ``image`` / ``images`` image column (-> a list of one; null -> empty, which
    validation then reports) and a plain list of ``{bytes, path}`` structs (parquet written
    without HF metadata).
    """
    if "images" not in ds.column_names and "image" in ds.column_names:
        ds = ds.rename_column("image", "images")
    feats = datasets.Features(dict(ds.features))
    img, ans = feats.get("images"), feats.get("answer")
    single = isinstance(img, datasets.Image)
    raw = (img is not None and not _is_image_list(img)
           and _is_raw_image_struct(getattr(img, "feature", None)))
    numeric = isinstance(ans, datasets.Value) and ans.dtype.startswith(("int", "uint", "float"))
    if not (single or raw or numeric):
        return ds
    table = ds.with_format("arrow")[:]  # rows in the dataset's logical order
    if single or raw:
        values = table.column("images").to_pylist()
        if single:
            values = [[v] if v is not None else [] for v in values]
        table = table.set_column(table.schema.get_field_index("images"), "images",
                                 pa.array(values, type=_IMAGE_LIST_ARROW))
        feats["images"] = _IMAGE_LIST
    if numeric:
        answers = [_answer_text(a) for a in table.column("answer").to_pylist()]
        table = table.set_column(table.schema.get_field_index("answer"), "answer",
                                 pa.array(answers, type=pa.string()))
        feats["answer"] = datasets.Value("string")
    return _dataset_with_image_list(table, feats)


def _is_image_list(feature: Any) -> bool:
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(
        feature.feature, datasets.Image)


def _is_raw_image_struct(feature: Any) -> bool:
    return isinstance(feature, dict) and set(feature) == {"bytes", "path"}


# ---------------------------------------------------------------------------------------------
# validation


def _raw_rows(ds: datasets.Dataset, columns: list[str], batch: int = 512) -> Iterator[dict]:
    """Rows with images left undecoded (``{"bytes", "path"}`` dicts), in dataset order."""
    arrow = ds.select_columns(columns).with_format("arrow")
    for start in range(0, len(ds), batch):
        yield from arrow[start:start + batch].to_pylist()


def _decode_check(ref: Any) -> str | None:
    """None if the image decodes, else a short reason."""
    if ref is None:
        return "image is null"
    if isinstance(ref, Image.Image):
        return None
    if not isinstance(ref, dict):
        return f"image entry of type {type(ref).__name__}"
    data, path = ref.get("bytes"), ref.get("path")
    try:
        if data is not None:
            src: Any = io.BytesIO(data)
        elif path:
            src = path
        else:
            return "image has neither bytes nor path"
        with Image.open(src) as im:
            im.load()
    except Exception as exc:
        name = f" {Path(path).name!r}" if path else ""
        why = ("not a recognised image format" if isinstance(exc, UnidentifiedImageError)
               else _short(exc))
        return f"image{name} cannot be decoded ({why})"
    return None


def validate_examples(ds: datasets.Dataset, source: str) -> None:
    """Raise ``DataError`` (one line naming ``source`` and the row) for the first unusable row.

    Checks: required columns present; ``images`` is a list of images holding exactly one image in
    every row (multi-image rows are not supported), which decodes; ``problem`` is a non-empty
    string; ``answer`` is a non-blank string. A row is named by its index, and its ``id`` if any.
    """
    cols = ds.column_names
    for c in REQUIRED_COLUMNS:
        if c not in cols:
            raise DataError(f"{source}: missing required column {c!r} (columns: {', '.join(cols)})")
    img_feat = ds.features["images"]
    if not _is_image_list(img_feat):
        raise DataError(f"{source}: column 'images' must be a list of images, "
                        f"got feature {img_feat}")
    columns = [*REQUIRED_COLUMNS, "id"] if "id" in cols else list(REQUIRED_COLUMNS)
    for i, row in enumerate(_raw_rows(ds, columns)):
        where = f"{source}: row {i}" + (f" (id {row['id']!r})" if row.get("id") is not None else "")
        problem, answer, images = row["problem"], row["answer"], row["images"]
        if not isinstance(problem, str) or not problem.strip():
            got = "empty string" if isinstance(problem, str) else type(problem).__name__
            raise DataError(f"{where}: 'problem' must be a non-empty string (got {got})")
        if answer is None:
            raise DataError(f"{where}: 'answer' is missing")
        if not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string (got {type(answer).__name__})")
        if not answer.strip():
            raise DataError(f"{where}: 'answer' is empty")
        if not images:
            raise DataError(f"{where}: row has no image")
        if len(images) > 1:
            raise DataError(f"{where}: {len(images)} images; multi-image rows are not supported "
                            "(one image per row)")
        for j, ref in enumerate(images):
            reason = _decode_check(ref)
            if reason:
                raise DataError(f"{where}: images[{j}]: {reason}")


# ---------------------------------------------------------------------------------------------
# resizing


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as the model sees it: upright (EXIF Orientation applied), RGB. Transparent pixels become white (not
    black); 16-bit grayscale keeps its top byte (Pillow's own conversion clips every value above 255 to white);
    palette, grayscale and CMYK go through Pillow's conversion. An upright RGB image is returned as it is."""
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) != 1:   # Orientation: 1 = upright
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        import numpy as np

        top = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(top, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent -> white, not black
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def fit_pixels(image: Image.Image, min_pixels: int, max_pixels: int, *,
               factor: int = IMAGE_FACTOR) -> Image.Image:
    """Upright RGB image (`to_rgb`) resized, bicubic, to the size the Qwen2-VL image
    processor would give it (transformers' ``smart_resize``): sides multiples of ``factor``,
    ``min_pixels <= w*h <= max_pixels``, the aspect ratio as close as whole blocks permit. The
    processor runs ``smart_resize`` on what it is handed and keeps this size, so its patch grid is
    ``(1, h / 14, w / 14)``.

    Where the first answer is still out of bounds (a side pinned to one block by an extreme aspect
    ratio), ``smart_resize`` is applied again until the processor would keep the size. A range too
    narrow for whole blocks can have no such size: the first answer is returned then (and the
    processor resizes it once more). An image already at its size is only converted to RGB.

    Raises ``ValueError`` for bounds with ``max_pixels < min_pixels`` and for an aspect ratio above
    200 (which the processor rejects too).
    """
    # transformers is imported here: loading and validating data does not need it
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    image = to_rgb(image)
    first = size = smart_resize(image.height, image.width, factor=factor, min_pixels=min_pixels,
                                max_pixels=max_pixels)
    for _ in range(_RESIZE_PASSES):
        again = smart_resize(*size, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        if again == size:
            break
        size = again
    else:
        size = first
    height, width = size
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def load_records(source: str, split: str | None, *, min_pixels: int, max_pixels: int,
                 limit: int | None = None) -> list[dict]:
    """Examples as plain dicts (all columns but `images`) with their one RGB `image` resized by `fit_pixels`."""
    ds = load_examples(source, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    records = []
    for i, row in enumerate(ds):
        record = {k: v for k, v in row.items() if k != "images"}
        [image] = row["images"]  # validated: one image per row
        try:
            record["image"] = fit_pixels(image, min_pixels, max_pixels)
        except ValueError as exc:  # an aspect ratio the processor rejects
            label = f"{source} [{split}]" if split else source
            raise DataError(f"{label}: row {i}: image {image.width}x{image.height}: {exc}") from None
        records.append(record)
    return records
