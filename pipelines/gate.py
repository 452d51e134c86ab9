"""The Great Expectations gate over the prepared tables (`data.prepared_dir/<split>.parquet`).

Each requested split is read with pyarrow (images are never decoded through `datasets`, so a corrupt image cannot
crash the reader), a few columns are derived in pandas (image count, decodability, pixel counts, `<image>`
placeholder count), and the frame is validated by a real GX 1.x Checkpoint (ephemeral context, pandas data source,
one ExpectationSuite per split, result_format COMPLETE, UpdateDataDocsAction). The suite per table:

1. required columns exist: id, images, problem, answer;
2. answers are not null and not blank (regex ``\\S``);
3. problems are not null and not blank;
4. ids are not null and unique;
5. every row has exactly 1 image (the trainer and the engines take one image per prompt), every image decodes (PIL ``load()``), and the smallest / largest image of the row has
   a pixel count (w*h) within ``[min_image_pixels, max_image_pixels]``;
6. the problem holds one ``<image>`` placeholder per image;
7. the problem is at most ``max_problem_chars`` characters long (a 1 MB problem would be a prompt no context holds).

A failed expectation is reported with the rows it failed on, mapped to their ids (``row 12 (id train-00012): ...``):
the summary shows the first few per expectation, and ``docs_dir/bad_rows.csv`` names every one (split, row, id,
expectation, column, detail), as `GateResult.bad_rows()` does; Data Docs (HTML) go to ``docs_dir``. This module is imported lazily (GX takes seconds to import): keep it that way.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")   # before any great_expectations import: no network calls

__all__ = ["GateResult", "run_gate", "REQUIRED_COLUMNS", "PLACEHOLDER", "BAD_ROWS_CSV", "MAX_PROBLEM_CHARS"]

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "images", "problem", "answer")
PLACEHOLDER = "<image>"
BAD_ROWS_CSV = "bad_rows.csv"            # in docs_dir: every row that failed, one line per (row, expectation)
MAX_PROBLEM_CHARS = 16_384               # run_gate's default bound on a problem's length (params: gate.max_problem_chars)
SITE_NAME = "noisyrollout_gate"
_VALUE_CHARS = 60
_GX_OWNED = ("index.html", "expectations", "validations", "static", BAD_ROWS_CSV)   # what a Data Docs site writes in docs_dir
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_DERIVED = ("n_images", "images_decodable", "min_image_pixels", "max_image_pixels", "n_image_placeholders")


@dataclass
class GateResult:
    """Outcome of `run_gate`: overall success, per-split details, and where the Data Docs index is."""

    success: bool
    splits: dict[str, dict] = field(default_factory=dict)
    docs_index: Path | None = None
    bad_rows_file: Path | None = None

    def bad_rows(self) -> list[dict[str, Any]]:
        """Every failed (row, expectation), in split order: split, row, id, expectation, column, detail. A failure
        that is not about rows (a missing table or column) is one entry with row and id None."""
        out = []
        for split, info in self.splits.items():
            for failure in info.get("failures", []):
                rows, ids, details = failure.get("rows", []), failure.get("ids", []), failure.get("details", [])
                if not rows:
                    out.append({"split": split, "row": None, "id": None, "expectation": failure["expectation"],
                                "column": failure.get("column"), "detail": " ".join(failure.get("examples", []))})
                for k, row in enumerate(rows):
                    out.append({"split": split, "row": row, "id": ids[k] if k < len(ids) else None,
                                "expectation": failure["expectation"], "column": failure.get("column"),
                                "detail": details[k] if k < len(details) else ""})
        return out

    def summary(self) -> str:
        """Human-readable, one block per split: every failed expectation with its column, count and example rows,
        or a line saying all expectations passed."""
        lines = [f"validate: {'PASSED' if self.success else 'FAILED'} ({len(self.splits)} table(s) checked)"]
        for split, info in self.splits.items():
            n_exp, rows = info.get("expectations", 0), info.get("rows", 0)
            if info["success"]:
                lines.append(f"  [{split}] all {n_exp} expectations passed on {rows} rows")
                continue
            failures = info["failures"]
            lines.append(f"  [{split}] {len(failures)} of {n_exp} expectations failed on {rows} rows")
            for failure in failures:
                column = f" on column {failure['column']!r}" if failure.get("column") else ""
                count = failure.get("unexpected_count", 0)
                what = f": {count} row(s)" if count else ""
                lines.append(f"    [{split}] {failure['expectation']}{column}{what}")
                examples = failure.get("examples", [])
                lines.extend(f"        {example}" for example in examples)
                if count > len(examples):
                    lines.append(f"        ... and {count - len(examples)} more")
        if not self.success and self.bad_rows_file is not None:
            lines.append(f"  every failed row: {self.bad_rows_file}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able metrics (`reports/gate.json`, read by `dvc metrics show`): scalars only, per split."""
        return {
            "success": bool(self.success),
            "splits": {split: {"rows": int(info.get("rows", 0)), "success": bool(info["success"]),
                               "expectations": int(info.get("expectations", 0)),
                               "failed": len(info.get("failures", []))}
                       for split, info in self.splits.items()},
        }


# ---------------------------------------------------------------------------------------------
# reading + derived columns (no GX here)


def _short_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    text = repr(value)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS - 3] + "..."


def _short_error(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}".rstrip(": ")


class _Undecodable(Exception):
    """An image cell that does not decode; the message says why, in one line."""


def _open_image(item: Any, base_dir: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) of one HF image cell ({bytes, path} struct, or a plain path); raises when it does not decode.
    An image larger than ``max_pixels`` is only sized from its header (not decoded), so the bound reports it."""
    from PIL import Image

    data, path = None, None
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
    elif isinstance(item, (bytes, bytearray)):
        data = item
    elif isinstance(item, str):
        path = item
    else:
        raise _Undecodable(f"not an image cell: {_short_value(item)}")
    if data is not None:
        source: Any = io.BytesIO(bytes(data))
    elif path:
        candidate = Path(path)
        if not candidate.is_file() and not candidate.is_absolute() and (base_dir / candidate).is_file():
            candidate = base_dir / candidate
        if not candidate.is_file():
            raise _Undecodable(f"no bytes, and no file at {path}")
        source = candidate
    else:
        raise _Undecodable("no bytes and no path")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None       # size a huge image from its header instead of refusing it as a "bomb"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as im:
                width, height = im.size
                if width * height <= max_pixels:
                    im.load()
    except Exception as exc:
        # PIL names an in-memory buffer by its repr (<_io.BytesIO object at 0x...>): say what it held instead
        held = f"({len(data)} bytes)" if data is not None else "(file)"
        raise _Undecodable(_BUFFER_REPR.sub(held, _short_error(exc))) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return width, height


def _image_columns(cells: Sequence[Any], base_dir: Path, max_pixels: int) -> tuple[dict[str, list], list[str]]:
    """Derived columns for the images column, plus a per-row description for failure examples."""
    n_images, decodable, min_px, max_px, notes = [], [], [], [], []
    for cell in cells:
        items = [] if cell is None or (isinstance(cell, float) and cell != cell) else list(cell)
        sizes, errors = [], []
        for k, item in enumerate(items):
            try:
                sizes.append(_open_image(item, base_dir, max_pixels))
            except Exception as exc:   # noqa: BLE001 - any decoding failure is a data failure, reported per row
                errors.append(f"image {k}: {exc if isinstance(exc, _Undecodable) else _short_error(exc)}")
        ok = not errors
        pixels = [w * h for w, h in sizes]
        n_images.append(len(items))
        decodable.append(ok)
        min_px.append(min(pixels) if ok and pixels else -1)
        max_px.append(max(pixels) if ok and pixels else -1)
        if errors:
            notes.append("; ".join(errors))
        elif not items:
            notes.append("no images")
        else:
            notes.append(", ".join(f"{w}x{h}={w * h} px" for w, h in sizes))
    columns = {"n_images": n_images, "images_decodable": decodable,
               "min_image_pixels": min_px, "max_image_pixels": max_px}
    return columns, notes


def _read_table(path: Path, max_pixels: int):
    """(frame handed to GX, per-row image notes); raises on an unreadable parquet."""
    import pyarrow.parquet as pq

    frame = pq.read_table(path).to_pandas()
    frame = frame.reset_index(drop=True)
    notes: list[str] = [""] * len(frame)
    if "images" in frame.columns:
        columns, notes = _image_columns(frame["images"].tolist(), path.parent, max_pixels)
        for name, values in columns.items():
            frame[name] = values
        frame["images_decodable"] = frame["images_decodable"].astype(bool)
        if "problem" in frame.columns:
            frame["n_image_placeholders"] = [text.count(PLACEHOLDER) if isinstance(text, str) else 0
                                             for text in frame["problem"].tolist()]
    return frame, notes


# ---------------------------------------------------------------------------------------------
# GX


def _context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               data_docs_sites={SITE_NAME: site}, analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False))
    return gx.get_context(mode="ephemeral", project_config=config)


def _suite(gx, name: str, columns: Sequence[str], min_pixels: int, max_pixels: int, max_problem_chars: int):
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    present = set(columns)
    expectations: list = [gxe.ExpectColumnToExist(column=c) for c in REQUIRED_COLUMNS]
    if "id" in present:
        expectations += [gxe.ExpectColumnValuesToNotBeNull(column="id"), gxe.ExpectColumnValuesToBeUnique(column="id")]
    for text in ("answer", "problem"):
        if text in present:
            expectations += [gxe.ExpectColumnValuesToNotBeNull(column=text),
                             gxe.ExpectColumnValuesToMatchRegex(column=text, regex=r"\S")]
    if "problem" in present:
        expectations.append(gxe.ExpectColumnValueLengthsToBeBetween(column="problem", max_value=max_problem_chars))
    if "n_images" in present:
        measured = Column("min_image_pixels") >= 0     # rows whose images all decoded; the others fail above
        expectations += [
            gxe.ExpectColumnValuesToBeBetween(column="n_images", min_value=1, max_value=1),
            gxe.ExpectColumnValuesToBeInSet(column="images_decodable", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="min_image_pixels", min_value=min_pixels, max_value=max_pixels,
                                              row_condition=measured),
            gxe.ExpectColumnValuesToBeBetween(column="max_image_pixels", min_value=min_pixels, max_value=max_pixels,
                                              row_condition=measured),
        ]
    if "n_image_placeholders" in present:
        expectations.append(gxe.ExpectColumnPairValuesToBeEqual(column_A="n_image_placeholders", column_B="n_images"))
    suite = gx.ExpectationSuite(name=name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _example(frame, notes: list[str], row: Any, value: Any, kind: str, column: str | None, limit: int) -> str:
    if not isinstance(row, int) or not 0 <= row < len(frame):
        return _short_value(value)
    ident = frame["id"].iloc[row] if "id" in frame.columns else None
    head = f"row {row} (id {ident})"
    if column in ("images_decodable", "min_image_pixels", "max_image_pixels", "n_images") and notes[row]:
        detail = notes[row]
        return f"{head}: {detail if len(detail) <= 2 * _VALUE_CHARS else detail[:2 * _VALUE_CHARS - 3] + '...'}"
    if kind == "expect_column_pair_values_to_be_equal":
        placeholders, images = frame["n_image_placeholders"].iloc[row], frame["n_images"].iloc[row]
        return f"{head}: {placeholders} {PLACEHOLDER} placeholder(s) for {images} image(s)"
    if kind == "expect_column_value_lengths_to_be_between" and isinstance(value, str):
        return f"{head}: {len(value)} characters (at most {limit}): {_short_value(value)}"
    return f"{head}: {_short_value(value)}"


def _failures(result, frame, notes: list[str], max_examples: int, max_problem_chars: int) -> tuple[int, list[dict]]:
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kind, kwargs = config.type, config.kwargs
        column = kwargs.get("column") or (f"{kwargs['column_A']}, {kwargs['column_B']}" if "column_A" in kwargs else None)
        info = item.result or {}
        exc = item.exception_info or {}
        if kind == "expect_column_to_exist":
            found = ", ".join(str(c) for c in frame.columns if c not in _DERIVED)
            failures.append({"expectation": kind, "column": column, "unexpected_count": 0, "rows": [], "ids": [],
                             "details": [], "examples": [f"column {column!r} is missing (the table has: {found})"]})
            continue
        if exc.get("raised_exception"):
            failures.append({"expectation": kind, "column": column, "unexpected_count": 0, "rows": [], "ids": [],
                             "details": [], "examples": [f"error: {(exc.get('exception_message') or '').strip()[:200]}"]})
            continue
        rows = list(info.get("unexpected_index_list") or [])
        values = list(info.get("unexpected_list") or info.get("partial_unexpected_list") or [])
        rows = [int(r) if hasattr(r, "__index__") else r for r in rows]
        count = int(info.get("unexpected_count") or len(rows) or len(values))
        if rows:
            details = [_example(frame, notes, r, values[i] if i < len(values) else None, kind, column, max_problem_chars)
                       for i, r in enumerate(rows)]
            examples = details[:max_examples]
        else:
            details, examples = [], [_short_value(v) for v in values[:max_examples]]
        ids = [str(frame["id"].iloc[r]) for r in rows if isinstance(r, int) and "id" in frame.columns]
        failures.append({"expectation": kind, "column": column, "unexpected_count": count, "rows": rows, "ids": ids,
                         "details": details, "examples": examples})
    return len(result.results), failures


def _clear_docs(docs_dir: Path) -> None:
    """Drop the previous run's site, so the index lists this run's validations only."""
    for name in _GX_OWNED:
        target = docs_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_gate(prepared_dir: Path, splits: Sequence[str], *, docs_dir: Path, min_image_pixels: int,
             max_image_pixels: int, max_examples: int = 5, max_problem_chars: int = MAX_PROBLEM_CHARS) -> GateResult:
    """Validate `prepared_dir/<split>.parquet` for every split in `splits` (a missing one fails); write Data Docs and,
    when anything failed, `bad_rows.csv` (every failed row) to `docs_dir`. Never raises for bad data: the result says
    what failed where."""
    prepared_dir, docs_dir = Path(prepared_dir), Path(docs_dir)
    report: dict[str, dict] = {}
    tables: dict[str, tuple[Any, list[str]]] = {}
    for split in splits:
        path = prepared_dir / f"{split}.parquet"
        if not path.is_file():
            report[split] = {"rows": 0, "success": False, "expectations": 1, "failures": [
                {"expectation": "table_exists", "column": None, "unexpected_count": 0, "rows": [], "ids": [],
                 "details": [], "examples": [f"{path} not found (run `noisyrollout prepare`)"]}]}
            continue
        try:
            tables[split] = _read_table(path, max_image_pixels)
        except Exception as exc:   # noqa: BLE001 - an unreadable table is a failed gate, not a crash
            report[split] = {"rows": 0, "success": False, "expectations": 1, "failures": [
                {"expectation": "table_readable", "column": None, "unexpected_count": 0, "rows": [], "ids": [],
                 "details": [], "examples": [f"{path}: {_short_error(exc)}"]}]}

    docs_index: Path | None = None
    if tables:
        docs_index = _validate(tables, report, docs_dir, min_image_pixels, max_image_pixels, max_examples,
                               max_problem_chars)
    else:
        docs_dir.mkdir(parents=True, exist_ok=True)
        _clear_docs(docs_dir)
    ordered = {split: report[split] for split in splits if split in report}
    result = GateResult(success=bool(ordered) and all(info["success"] for info in ordered.values()),
                        splits=ordered, docs_index=docs_index)
    if not result.success:
        result.bad_rows_file = _write_bad_rows(docs_dir / BAD_ROWS_CSV, result.bad_rows())
    return result


def _write_bad_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`bad_rows.csv`: one line per failed (row, expectation), written whole or not at all."""
    import csv

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["split", "row", "id", "expectation", "column", "detail"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def _validate(tables, report, docs_dir: Path, min_pixels: int, max_pixels: int, max_examples: int,
              max_problem_chars: int) -> Path | None:
    gx_logger = logging.getLogger("great_expectations")
    level = gx_logger.level
    gx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import great_expectations as gx
            from great_expectations.checkpoint import UpdateDataDocsAction

            docs_dir.mkdir(parents=True, exist_ok=True)
            _clear_docs(docs_dir)
            context = _context(docs_dir)
            source = context.data_sources.add_pandas(name="prepared")
            for split, (frame, notes) in tables.items():
                name = f"gate_{split}"
                batch = source.add_dataframe_asset(name=split).add_batch_definition_whole_dataframe(name=split)
                suite = context.suites.add(_suite(gx, name, list(frame.columns), min_pixels, max_pixels,
                                                  max_problem_chars))
                definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch,
                                                                                        suite=suite))
                checkpoint = context.checkpoints.add(gx.Checkpoint(
                    name=name, validation_definitions=[definition],
                    actions=[UpdateDataDocsAction(name="data_docs", site_names=[SITE_NAME])],
                    result_format={"result_format": "COMPLETE"}))
                outcome = checkpoint.run(batch_parameters={"dataframe": frame})
                (result,) = outcome.run_results.values()
                n_expectations, failures = _failures(result, frame, notes, max_examples, max_problem_chars)
                report[split] = {"rows": int(len(frame)), "success": not failures, "expectations": n_expectations,
                                 "failures": failures}
    finally:
        gx_logger.setLevel(level)
    index = docs_dir / "index.html"
    return index if index.is_file() else None
