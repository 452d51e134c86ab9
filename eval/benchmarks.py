"""Benchmark loaders: the authors' `eval_data.zip` layouts and the embedded corpus splits.

Every loader returns a list of `EvalSample`, sorted by a stable order, with the question text the
model sees, the ground-truth answer and the fields a report groups by (`extra`). Images are not
decoded here: a loader records where the image is and checks only that it exists and that its
header opens, so a benchmark of thousands of images does not sit in memory. A sample that cannot be
scored is kept with `unreadable=True` and a reason, and the report counts it: its image is missing or
does not decode (truncated, zero bytes, a decompression bomb over twice Pillow's MAX_IMAGE_PIXELS),
or it has no ground-truth answer (missing, null, blank, or a bool / list / object instead of text or a
number). A malformed answer (a letter naming no choice, a HallusionBench `gt_answer` other than 0/1)
is a broken benchmark and raises `DataError`. Two samples of one benchmark with the same id are both
kept; the later ones are renamed `<id>#2`, `<id>#3`, ... with a warning, so no per-sample record
(eval_samples.csv) merges them. An image is given to the model upright and RGB, converted as the
training loaders convert it (`noisyrollout.data.loaders.to_rgb`).

Layouts (SPEC section 6), all under one data dir:

    geometry3k/test/<id>/{img_diagram.png,data.json}
    wemath/testmini.json            + wemath/images/<image_path>
    mathvista/<testmini metadata>   + mathvista/<image>          (e.g. images/1.jpg)
    mathverse/testmini.json         + mathverse/images/<image>
    mathvision/MathVision.tsv       + mathvision/images/<index>.jpg
    hallubench/HallusionBench.json  + hallubench/images/<filename>

MathVista's metadata is read from local files only (no hub download): the first of
`mathvista/testmini.json` (a list, or a dict keyed by pid as in the MathVista repository),
`testmini.jsonl`, `testmini.parquet`, or the hub snapshot's `data/testmini-*.parquet`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from noisyrollout.errors import DataError

log = logging.getLogger("noisyrollout.eval")

#: The six benchmarks of the paper, in the order the reports list them.
BENCHMARKS: tuple[str, ...] = ("geo3k", "wemath", "mathvista", "mathverse", "mathvision", "hallubench")
#: The embedded corpus' held-out splits (`<corpus_dir>/test.parquet`, `<corpus_dir>/ood.parquet`).
EMBEDDED_SPLITS: tuple[str, ...] = ("embedded_test", "embedded_ood")

#: The folder each benchmark lives in under the data dir.
BENCHMARK_FOLDERS: dict[str, str] = {
    "geo3k": "geometry3k",
    "wemath": "wemath",
    "mathvista": "mathvista",
    "mathverse": "mathverse",
    "mathvision": "mathvision",
    "hallubench": "hallubench",
}

#: The field each benchmark's sub-accuracies are grouped by (SPEC section 6).
SUB_ACCURACY_KEY: dict[str, str] = {
    "mathvista": "task",
    "mathverse": "problem_version",
    "mathvision": "category",
    "hallubench": "subcategory",
    "embedded_test": "task",
    "embedded_ood": "group",    # the (shift, level) cell of the graded OOD split; the task on other data
}

HALLUBENCH_SUFFIX = "? You final answer can only be \\boxed{yes} or \\boxed{no}."
CHOICE_LETTERS = "ABCDEFGH"


@dataclass
class EvalSample:
    """One benchmark question.

    `image` holds an in-memory image (embedded splits), `image_bytes` an encoded one (an image
    stored inside a parquet/tsv), `image_path` an on-disk one; `open_image()` decodes it when the
    sample is generated. `choices` are the options
    shown to the model, in letter order (A, B, ...), when the question displays them; grading uses
    them to match an answer given as the text of a choice. `extra` holds the per-benchmark fields
    copied into the results (task, problem_version, subcategory, category, ...).
    """

    id: str
    question: str
    answer: str
    image: Image.Image | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    image_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    choices: list[str] | None = None
    unreadable: bool = False
    error: str | None = None

    def open_image(self) -> Image.Image:
        """The sample's image, upright and RGB as training sees it (`to_rgb`: EXIF orientation applied, transparent ->
        white, 16-bit scaled). Raises `OSError` (or `ValueError`) when it cannot be read."""
        from noisyrollout.data.loaders import to_rgb

        if self.image is not None:
            rgb = to_rgb(self.image)
            return rgb.copy() if rgb is self.image else rgb
        if self.image_bytes is not None:
            source: Any = io.BytesIO(self.image_bytes)
        elif self.image_path is not None:
            source = self.image_path
        else:
            raise FileNotFoundError("no image")
        with Image.open(source) as im:
            im.load()
            rgb = to_rgb(im)
            return rgb.copy() if rgb is im else rgb

    def mark_unreadable(self, reason: str) -> None:
        """Record that the image cannot be used; the sample is reported, not generated."""
        self.unreadable = True
        self.error = reason


# ----------------------------------------------------------------------------------------------
# Helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def _text(value: Any) -> str:
    """A field as text: None -> '', floats that are whole numbers lose their '.0'."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _answer_issue(value: Any) -> str | None:
    """Why `value` cannot be a ground-truth answer (None when it can): missing, null, blank, or not text / a number."""
    if value is None or (isinstance(value, float) and value != value):
        return "no ground-truth answer"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"ground-truth answer is a {type(value).__name__}, not text"
    if not _text(value).strip():
        return "no ground-truth answer (blank)"
    return None


def _check_answer(sample: EvalSample, value: Any, where: str) -> None:
    """Mark the sample unscorable when its answer field cannot be graded against."""
    issue = _answer_issue(value)
    if issue is not None:
        sample.answer = ""
        sample.mark_unreadable(f"{issue} in {where}")


def _check_image_file(sample: EvalSample, path: Path) -> None:
    """Point the sample at `path`, or mark it unreadable when the file is missing or not an image."""
    sample.image_path = path
    if sample.unreadable:
        return
    if not path.is_file():
        sample.mark_unreadable(f"missing image: {path}")
        return
    try:
        with Image.open(path) as im:  # reads the header only
            im.size
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
        sample.mark_unreadable(f"unreadable image: {path} ({type(exc).__name__})")


def _use_image_bytes(sample: EvalSample, data: bytes) -> None:
    """Fall back on an image stored in the metadata file when the image file is not usable."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            im.size
    except Exception:  # noqa: BLE001 - keep the file's reason
        return
    sample.image_bytes = data
    sample.unreadable, sample.error = False, None


_CHOICE_HEADER = re.compile(r"(?:choices|options)\s*[:：]", re.IGNORECASE)
_CHOICE_MARKER = re.compile(r"(?<![A-Za-z0-9])(?:\(([A-H])\)|([A-H])\s*[.:：)])")


def parse_choices(text: str) -> list[str] | None:
    """The options a question displays after 'Choices:' / 'Options:', in letter order, or None.

    Understands `(A) x (B) y`, `A. x; B. y`, `A: x` and `A) x` markers, one per line or inline.
    Markers must run A, B, C, ... in order, so a stray capital letter in an option is not taken
    for a marker. Fewer than two options -> None.
    """
    headers = list(_CHOICE_HEADER.finditer(text))
    if not headers:
        return None
    body = text[headers[-1].end():]
    marks: list[tuple[int, int]] = []  # (start, end) of each accepted marker
    expected = 0
    for m in _CHOICE_MARKER.finditer(body):
        letter = m.group(1) or m.group(2)
        if expected < len(CHOICE_LETTERS) and letter == CHOICE_LETTERS[expected]:
            marks.append((m.start(), m.end()))
            expected += 1
    if len(marks) < 2:
        return None
    choices = []
    for i, (_, end) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(body)
        choices.append(body[end:stop].strip().rstrip(";,").strip())
    return choices


# ----------------------------------------------------------------------------------------------
# The six benchmarks


def load_geo3k(data_dir: Path) -> list[EvalSample]:
    """Geometry3K test: `annotat_text`; answer = the text of the choice the letter names (A-D)."""
    root = Path(data_dir) / "geometry3k" / "test"
    if not root.is_dir():
        raise DataError(f"geo3k: folder {root} not found")
    folders = [p for p in root.iterdir() if p.is_dir()]
    folders.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    samples = []
    for folder in folders:
        json_path = folder / "data.json"
        if not json_path.is_file():
            log.warning("geo3k: %s has no data.json; not a sample", folder)
            continue
        row = _read_json(json_path)
        _require(row, ("annotat_text", "choices"), str(json_path))
        issue = _answer_issue(row.get("answer"))
        letter = "" if issue else _text(row["answer"]).strip().upper()
        choices = [_text(c) for c in row["choices"]]
        index = "ABCD".find(letter) if len(letter) == 1 else -1
        if issue is None and (index < 0 or index >= len(choices)):
            raise DataError(f"{json_path}: answer {row['answer']!r} does not name one of {len(choices)} choices (A-D)")
        sample = EvalSample(
            id=_text(row.get("id", folder.name)),
            question=_text(row["annotat_text"]),
            answer=choices[index] if issue is None else "",
            # The choices are not shown to the model (the authors' prompt is the bare problem), so
            # they are kept for the report but not used to match answers.
            extra={"answer_letter": letter, "all_choices": choices},
        )
        _check_answer(sample, row.get("answer"), str(json_path))
        _check_image_file(sample, folder / "img_diagram.png")
        samples.append(sample)
    return samples


def load_wemath(data_dir: Path) -> list[EvalSample]:
    """WeMath testmini: `question` + "\\n\\nOptions: " + `option`; id `ID@key`."""
    folder = Path(data_dir) / "wemath"
    path = folder / "testmini.json"
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of questions")
    samples = []
    for i, row in enumerate(rows):
        _require(row, ("ID", "key", "question", "option", "image_path"), f"{path} row {i}")
        question = f"{_text(row['question'])}\n\nOptions: {_text(row['option'])}"
        extra = {k: row[k] for k in ("key", "knowledge concept") if k in row}
        sample = EvalSample(
            id=f"{_text(row['ID'])}@{_text(row['key'])}",
            question=question,
            answer=_text(row.get("answer")).strip(),
            extra=extra,
            choices=parse_choices(question),
        )
        _check_answer(sample, row.get("answer"), f"{path} row {i}")
        _check_image_file(sample, folder / "images" / _text(row["image_path"]))
        samples.append(sample)
    return samples


_MATHVISTA_HINT = (
    "expected testmini.json, testmini.jsonl, testmini.parquet or data/testmini-*.parquet "
    "from the AI4Math/MathVista dataset"
)


def _mathvista_metadata(folder: Path) -> list[Path]:
    """The local testmini metadata files, best first (see the module doc); empty when none."""
    candidates = [folder / "testmini.json", folder / "testmini.jsonl", folder / "testmini.parquet"]
    if (folder / "data").is_dir():
        candidates += sorted((folder / "data").glob("testmini-*.parquet"))
    return [p for p in candidates if p.is_file()]


def _mathvista_rows(folder: Path) -> list[dict[str, Any]]:
    """The testmini metadata rows from the first local file found."""
    found = _mathvista_metadata(folder)
    if not found:
        raise DataError(f"mathvista: no testmini metadata in {folder} ({_MATHVISTA_HINT})")
    path = found[0]
    if path.suffix == ".json":
        data = _read_json(path)
        rows = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of questions or a dict keyed by pid")
        return rows
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
        return rows
    import pandas as pd  # parquet, possibly several shards of the hub snapshot

    parquet = [path] if path.name == "testmini.parquet" else [p for p in found if p.suffix == ".parquet"]
    try:
        frame = pd.concat([pd.read_parquet(p) for p in parquet], ignore_index=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as parquet ({exc})") from None
    return frame.to_dict(orient="records")


def load_mathvista(data_dir: Path) -> list[EvalSample]:
    """MathVista testmini: `query`; a multi_choice answer becomes the letter of its choice index."""
    folder = Path(data_dir) / "mathvista"
    if not folder.is_dir():
        raise DataError(f"mathvista: folder {folder} not found")
    samples = []
    for i, row in enumerate(_mathvista_rows(folder)):
        where = f"mathvista row {i}"
        _require(row, ("pid", "image", "query", "question_type"), where)
        metadata = row.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        issue = _answer_issue(row.get("answer"))
        answer = "" if issue else _text(row["answer"])
        choices = None
        if row["question_type"] == "multi_choice" and issue is None:
            choices = [_text(c) for c in (row.get("choices") if row.get("choices") is not None else [])]
            if answer not in choices or len(choices) > len(CHOICE_LETTERS):
                raise DataError(f"{where} (pid {row['pid']}): answer {answer!r} is not one of its choices")
            answer = CHOICE_LETTERS[choices.index(answer)]
        sample = EvalSample(
            id=_text(row["pid"]),
            question=_text(row["query"]),
            answer=answer,
            extra={
                "task": metadata.get("task", "unknown"),
                "question_type": row["question_type"],
                **({"answer_type": row["answer_type"]} if "answer_type" in row else {}),
            },
            choices=choices,
        )
        _check_answer(sample, row.get("answer"), where)
        _check_image_file(sample, folder / _text(row["image"]))
        decoded = row.get("decoded_image")
        if sample.unreadable and sample.answer and isinstance(decoded, dict) and decoded.get("bytes"):
            # The hub parquet carries the image bytes too: use them when the file is not there.
            _use_image_bytes(sample, decoded["bytes"])
        samples.append(sample)
    samples.sort(key=lambda s: (0, int(s.id), "") if s.id.isdigit() else (1, 0, s.id))
    return samples


def load_mathverse(data_dir: Path) -> list[EvalSample]:
    """MathVerse testmini: `query_cot` is asked; `question_for_eval` and `problem_version` kept."""
    folder = Path(data_dir) / "mathverse"
    path = folder / "testmini.json"
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of questions")
    samples = []
    for i, row in enumerate(rows):
        _require(row, ("sample_index", "query_cot", "question_for_eval", "problem_version", "image"), f"{path} row {i}")
        question_for_eval = _text(row["question_for_eval"])
        sample = EvalSample(
            id=_text(row["sample_index"]),
            question=_text(row["query_cot"]),
            answer=_text(row.get("answer")).strip(),
            extra={"problem_version": _text(row["problem_version"]), "question_for_eval": question_for_eval},
            choices=parse_choices(_text(row["query_cot"])) or parse_choices(question_for_eval),
        )
        _check_answer(sample, row.get("answer"), f"{path} row {i}")
        if sample.unreadable:
            pass
        elif not row["image"]:
            sample.mark_unreadable("no image named in testmini.json")
        else:
            _check_image_file(sample, folder / "images" / _text(row["image"]))
        samples.append(sample)
    return samples


def load_mathvision(data_dir: Path) -> list[EvalSample]:
    """MathVision: `MathVision.tsv` rows (`index`, `question`, `answer`, `category`), images/<index>.jpg."""
    import pandas as pd

    folder = Path(data_dir) / "mathvision"
    path = folder / "MathVision.tsv"
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as TSV ({exc})") from None
    missing = [c for c in ("index", "question", "answer") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    samples = []
    for row in frame.to_dict(orient="records"):
        question = row["question"]
        choices = parse_choices(question)
        if choices is None:  # VLMEvalKit-style TSVs may hold the options in columns A..E
            columns = [row.get(letter, "") for letter in CHOICE_LETTERS]
            shown = [c for c in columns if c]
            choices = shown if len(shown) >= 2 and columns[: len(shown)] == shown else None
        sample = EvalSample(
            id=row["index"],
            question=question,
            answer=row["answer"].strip(),
            extra={"category": row.get("category") or "unknown"},
            choices=choices,
        )
        _check_answer(sample, row["answer"], f"{path} (index {row['index']})")
        _check_image_file(sample, folder / "images" / f"{row['index']}.jpg")
        if sample.unreadable and sample.answer and len(row.get("image", "")) > 100:
            # Some MathVision.tsv files embed the image as base64: use it when the file is absent.
            try:
                _use_image_bytes(sample, base64.b64decode(row["image"]))
            except ValueError:
                pass
        samples.append(sample)
    return samples


def hallubench_question(question: str) -> str:
    """The authors' HallusionBench prompt: the question up to its first '?', then the yes/no suffix."""
    return question.split("?", 1)[0] + HALLUBENCH_SUFFIX


def load_hallubench(data_dir: Path) -> list[EvalSample]:
    """HallusionBench: visual questions only (empty `filename` skipped); `gt_answer` 1 -> yes, 0 -> no."""
    folder = Path(data_dir) / "hallubench"
    path = folder / "HallusionBench.json"
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of questions")
    samples = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        _require(row, ("set_id", "figure_id", "question_id", "question", "filename"), where)
        if not row["filename"]:
            continue  # a text-only question: not part of the visual benchmark
        issue = _answer_issue(row.get("gt_answer"))
        try:
            gt = int(row["gt_answer"]) if issue is None else -1
        except (TypeError, ValueError):
            gt = -1
        if issue is None and gt not in (0, 1):
            raise DataError(f"{where}: gt_answer {row['gt_answer']!r} is not 0 or 1")
        filename = _text(row["filename"])
        filename = filename[2:] if filename.startswith("./") else filename
        sample = EvalSample(
            id=f"{_text(row['set_id'])}_{_text(row['figure_id'])}_{_text(row['question_id'])}",
            question=hallubench_question(_text(row["question"])),
            answer="yes" if gt == 1 else "no",
            extra={"subcategory": _text(row.get("subcategory")), "category": _text(row.get("category"))},
        )
        _check_answer(sample, row.get("gt_answer"), where)
        _check_image_file(sample, folder / "images" / filename)
        samples.append(sample)
    return samples


# ----------------------------------------------------------------------------------------------
# The embedded corpus


def _embedded_extra(row: dict[str, Any]) -> dict[str, Any]:
    """`task`, and on shifted rows (the graded OOD split) `shift`, `level` and `cell` (e.g. "blur-2"). `group` is what
    the split's sub-accuracies are grouped by: the cell when there is one, else the task."""
    from noisyrollout.data.shifts import cell_name

    extra: dict[str, Any] = {"task": _text(row.get("task")) or "unknown"}
    if row.get("shift") not in (None, ""):
        shift, level = _text(row["shift"]), int(row["level"])
        extra.update(shift=shift, level=level, cell=cell_name(shift, level))
    extra["group"] = extra.get("cell", extra["task"])
    return extra


def _load_embedded(corpus_dir: Path, split: str) -> list[EvalSample]:
    """Every row of the split, judged one by one (the table is read without the loaders' all-or-nothing check): a row
    whose image is absent, not one, or does not open, or whose answer is missing, is kept and marked unreadable. The
    image stays encoded until it is generated, like the benchmarks' files."""
    from noisyrollout.data.loaders import load_examples  # imports `datasets`: only when needed

    dataset = load_examples(str(corpus_dir), split=split, validate=False)
    rows = dataset.with_format("arrow")[:].to_pylist()   # images as {bytes, path}: nothing decoded here
    where = f"{corpus_dir} [{split}]"
    samples = []
    for i, row in enumerate(rows):
        question = _text(row.get("problem"))
        if question.startswith("<image>"):
            question = question[len("<image>"):].lstrip()
        sample = EvalSample(
            id=_text(row["id"]) if row.get("id") is not None else str(i),
            question=question,
            answer=_text(row.get("answer")),
            extra=_embedded_extra(row),
            choices=parse_choices(question),
        )
        _check_answer(sample, row.get("answer"), f"{where} row {i}")
        images = [im for im in row.get("images") or [] if im is not None]
        if sample.unreadable:
            pass
        elif len(images) != 1:
            sample.mark_unreadable(f"{len(images)} images in {where} row {i} (one expected)")
        else:
            _embedded_image(sample, images[0], f"{where} row {i}")
        samples.append(sample)
    return samples


def _embedded_image(sample: EvalSample, cell: dict[str, Any], where: str) -> None:
    """Keep the row's encoded image on the sample, or mark it unreadable when it has none or its header does not
    open (a zero-byte or unknown file, a decompression bomb)."""
    data, path = cell.get("bytes"), cell.get("path")
    if data is None:
        if path and Path(path).is_file():
            data = Path(path).read_bytes()
        else:
            sample.mark_unreadable(f"missing image: {path or 'no bytes and no path'} ({where})")
            return
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            im.size
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
        sample.mark_unreadable(f"unreadable image: {where} ({type(exc).__name__})")
        return
    sample.image_bytes = data


def load_embedded_test(corpus_dir: Path) -> list[EvalSample]:
    """The embedded corpus' in-domain test split (`<corpus_dir>/test.parquet`)."""
    return _load_embedded(corpus_dir, "test")


def load_embedded_ood(corpus_dir: Path) -> list[EvalSample]:
    """The embedded corpus' out-of-domain split (`<corpus_dir>/ood.parquet`)."""
    return _load_embedded(corpus_dir, "ood")


LOADERS: dict[str, Callable[[Path], list[EvalSample]]] = {
    "geo3k": load_geo3k,
    "wemath": load_wemath,
    "mathvista": load_mathvista,
    "mathverse": load_mathverse,
    "mathvision": load_mathvision,
    "hallubench": load_hallubench,
    "embedded_test": load_embedded_test,
    "embedded_ood": load_embedded_ood,
}


def locate(name: str, *, data_dir: Path | None, corpus_dir: Path | None) -> str | None:
    """Why benchmark `name` cannot be loaded from these folders, or None when it is there."""
    if name in EMBEDDED_SPLITS:
        if corpus_dir is None:
            return "no corpus dir given"
        split = name.removeprefix("embedded_")
        if any((Path(corpus_dir) / f"{split}{suffix}").is_file() for suffix in (".parquet", ".jsonl")):
            return None
        return f"{Path(corpus_dir) / f'{split}.parquet'} not found"
    if name not in BENCHMARK_FOLDERS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS + EMBEDDED_SPLITS)}")
    if data_dir is None:
        return "no data dir given"
    folder = Path(data_dir) / BENCHMARK_FOLDERS[name]
    if not folder.is_dir():
        return f"folder {folder} not found"
    if name == "mathvista" and not _mathvista_metadata(folder):
        return f"no testmini metadata in {folder} ({_MATHVISTA_HINT})"
    return None


def load_benchmark(name: str, *, data_dir: Path | None = None, corpus_dir: Path | None = None) -> list[EvalSample]:
    """Load one benchmark or embedded split by name. Raises `DataError` when it is absent or broken."""
    reason = locate(name, data_dir=data_dir, corpus_dir=corpus_dir)
    if reason is not None:
        raise DataError(f"{name}: {reason}")
    source = corpus_dir if name in EMBEDDED_SPLITS else data_dir
    assert source is not None
    return unique_ids(name, LOADERS[name](Path(source)))


def unique_ids(name: str, samples: list[EvalSample]) -> list[EvalSample]:
    """Rename the second, third, ... sample of an id to `<id>#2`, `<id>#3`, ... (logged), so every sample keeps its
    own record; the order is kept."""
    seen: dict[str, int] = {}
    renamed = []
    for sample in samples:
        seen[sample.id] = seen.get(sample.id, 0) + 1
        if seen[sample.id] > 1:
            renamed.append(sample.id)
            sample.id = f"{sample.id}#{seen[sample.id]}"
    if renamed:
        log.warning("%s: %d duplicate id(s) renamed <id>#<n>: %s", name, len(renamed),
                    ", ".join(dict.fromkeys(renamed)))
    return samples
