"""The Great Expectations gate (`pipelines/gate.py`) on tiny prepared tables, with real GX: a clean table passes
and gets Data Docs; each kind of corrupted row fails exactly the expectation it should, naming exactly those rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.gate import run_gate

MIN_PX, MAX_PX = 784, 4096 * 4096
N_ROWS = 8


def _png(size: int = 56, color: str = "white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows(split: str) -> dict[str, list]:
    png = _png()
    return {
        "id": [f"{split}-count-{i:05d}" for i in range(N_ROWS)],
        "images": [[{"bytes": png, "path": None}] for _ in range(N_ROWS)],
        "problem": [f"<image>How many shapes are in the picture? ({i})" for i in range(N_ROWS)],
        "answer": [str(i % 5) for i in range(N_ROWS)],
        "task": ["count"] * N_ROWS,
    }


def _write(folder: Path, split: str, rows: dict[str, list]) -> Path:
    from datasets import Dataset, Features, Image as HFImage, List, Value
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    features = {"id": Value("string"), "images": List(HFImage()), "problem": Value("string"),
                "answer": Value("string"), "task": Value("string")}
    features = Features({k: v for k, v in features.items() if k in rows})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.parquet"
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        Dataset.from_dict(rows, features=features).to_parquet(str(path))
    finally:
        if not quiet:
            enable_progress_bars()
    return path


def _gate(prepared: Path, splits, tmp_path: Path, **kw):
    return run_gate(prepared, splits, docs_dir=tmp_path / "docs", min_image_pixels=MIN_PX, max_image_pixels=MAX_PX,
                    **kw)


def _failed(result, split: str) -> dict[tuple[str, str | None], list[str]]:
    return {(f["expectation"], f["column"]): f["ids"] for f in result.splits[split]["failures"]}


def test_clean_tables_pass_and_get_data_docs(tmp_path):
    prepared = tmp_path / "prepared"
    for split in ("train", "val"):
        _write(prepared, split, _rows(split))
    result = _gate(prepared, ["train", "val"], tmp_path)
    assert result.success, result.summary()
    assert set(result.splits) == {"train", "val"}
    n = result.splits["train"]["expectations"]
    assert n >= 14
    assert result.splits["train"] == {"rows": N_ROWS, "success": True, "expectations": n, "failures": []}
    summary = result.summary()
    assert f"[train] all {n} expectations passed on {N_ROWS} rows" in summary
    assert f"[val] all {n} expectations passed on {N_ROWS} rows" in summary
    assert result.docs_index == tmp_path / "docs" / "index.html" and result.docs_index.is_file()
    index = result.docs_index.read_text()
    assert "gate_train" in index and "gate_val" in index
    metrics = json.loads(json.dumps(result.to_dict()))
    assert metrics["success"] is True
    assert metrics["splits"]["train"] == {"rows": N_ROWS, "success": True, "expectations": n, "failed": 0}
    # a rerun replaces the site: one validation page per split, not one per run
    result = _gate(prepared, ["train"], tmp_path)
    assert result.success
    assert len(list((tmp_path / "docs" / "validations").rglob("*.html"))) == 1
    assert "gate_val" not in result.docs_index.read_text()


def _bad_image(rows):
    rows["images"][3] = [{"bytes": b"not an image", "path": None}]
    return {("expect_column_values_to_be_in_set", "images_decodable"): [3]}


def _empty_answers(rows):
    rows["answer"][2], rows["answer"][6] = "", "   "
    return {("expect_column_values_to_match_regex", "answer"): [2, 6]}


def _duplicate_id(rows):
    rows["id"][5] = rows["id"][1]
    return {("expect_column_values_to_be_unique", "id"): [1, 5]}


def _missing_placeholder(rows):
    rows["images"][4] = rows["images"][4] + [{"bytes": _png(64, "red"), "path": None}]   # 2 images, 1 <image>
    return {("expect_column_pair_values_to_be_equal", "n_image_placeholders, n_images"): [4],
            ("expect_column_values_to_be_between", "n_images"): [4]}


def _two_images(rows):
    rows["images"][6] = rows["images"][6] + [{"bytes": _png(64, "red"), "path": None}]
    rows["problem"][6] = "<image>" + rows["problem"][6]                                  # 2 images, 2 <image>
    return {("expect_column_values_to_be_between", "n_images"): [6]}


def _tiny_image(rows):
    rows["images"][7] = [{"bytes": _png(10), "path": None}]   # 100 px < 784
    return {("expect_column_values_to_be_between", "min_image_pixels"): [7],
            ("expect_column_values_to_be_between", "max_image_pixels"): [7]}


def _no_image(rows):
    rows["images"][0] = []
    return {("expect_column_values_to_be_between", "n_images"): [0],
            ("expect_column_pair_values_to_be_equal", "n_image_placeholders, n_images"): [0]}


@pytest.mark.parametrize("corrupt", [_bad_image, _empty_answers, _duplicate_id, _missing_placeholder, _tiny_image,
                                     _no_image, _two_images], ids=lambda f: f.__name__.strip("_"))
def test_corrupted_rows_fail_and_are_named(tmp_path, corrupt):
    rows = _rows("train")
    expected_rows = corrupt(rows)
    prepared = tmp_path / "prepared"
    _write(prepared, "train", rows)
    _write(prepared, "val", _rows("val"))
    result = _gate(prepared, ["train", "val"], tmp_path)
    assert not result.success
    assert result.splits["val"]["success"] and not result.splits["train"]["success"]
    expected = {key: [rows["id"][r] for r in rws] for key, rws in expected_rows.items()}
    assert _failed(result, "train") == expected            # exactly these expectations, exactly these rows
    for failure in result.splits["train"]["failures"]:
        assert failure["rows"] == expected_rows[(failure["expectation"], failure["column"])]
        assert failure["unexpected_count"] == len(failure["rows"])
    summary = result.summary()
    for (expectation, column), rws in expected_rows.items():
        assert f"[train] {expectation} on column {column!r}: {len(rws)} row(s)" in summary
        for r in rws:
            assert f"row {r} (id {rows['id'][r]})" in summary
    assert "[val] all" in summary
    metrics = result.to_dict()
    assert metrics["success"] is False and metrics["splits"]["train"]["failed"] == len(expected_rows)
    assert result.docs_index is not None and result.docs_index.is_file()


def test_failure_examples_show_the_offending_values(tmp_path):
    rows = _rows("train")
    rows["answer"][2] = "   "
    rows["images"][3] = [{"bytes": b"not an image", "path": None}]
    rows["images"][5] = [{"bytes": _png(10), "path": None}]
    rows["answer"][0] = rows["answer"][4] = rows["answer"][6] = rows["answer"][7] = ""   # 5 blank answers in all
    rows["answer"][1] = ""
    prepared = tmp_path / "prepared"
    _write(prepared, "train", rows)
    result = _gate(prepared, ["train"], tmp_path, max_examples=3)
    failures = {f["column"]: f for f in result.splits["train"]["failures"]}
    blank = failures["answer"]
    assert blank["unexpected_count"] == 6 and len(blank["ids"]) == 6
    assert blank["examples"] == ["row 0 (id train-count-00000): ''", "row 1 (id train-count-00001): ''",
                                 "row 2 (id train-count-00002): '   '"]
    assert "... and 3 more" in result.summary()
    (decode,) = failures["images_decodable"]["examples"]
    assert decode == "row 3 (id train-count-00003): image 0: UnidentifiedImageError: cannot identify image file (12 bytes)"
    assert failures["min_image_pixels"]["examples"] == ["row 5 (id train-count-00005): 10x10=100 px"]


def test_path_only_images_are_opened_from_the_table_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "ok.png").write_bytes(_png())
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": ["a", "b"],
        "images": pa.array([[{"bytes": None, "path": "ok.png"}], [{"bytes": None, "path": "gone.png"}]],
                           pa.list_(image)),
        "problem": ["<image>q", "<image>q"],
        "answer": ["1", "2"],
    })
    pq.write_table(table, prepared / "train.parquet")
    result = _gate(prepared, ["train"], tmp_path)
    assert _failed(result, "train") == {("expect_column_values_to_be_in_set", "images_decodable"): ["b"]}
    assert "gone.png" in result.summary()


def test_missing_column_fails_with_a_readable_message(tmp_path):
    rows = _rows("train")
    del rows["answer"]
    prepared = tmp_path / "prepared"
    _write(prepared, "train", rows)
    result = _gate(prepared, ["train"], tmp_path)
    assert not result.success
    (failure,) = result.splits["train"]["failures"]
    assert (failure["expectation"], failure["column"]) == ("expect_column_to_exist", "answer")
    summary = result.summary()
    assert "[train] expect_column_to_exist on column 'answer'" in summary
    assert "column 'answer' is missing (the table has: id, images, problem, task)" in summary
    assert "Traceback" not in summary and "Error" not in summary


def test_a_requested_split_without_a_table_fails_naming_the_file(tmp_path):
    prepared = tmp_path / "prepared"
    _write(prepared, "train", _rows("train"))
    result = _gate(prepared, ["train", "ood"], tmp_path)
    assert not result.success
    assert result.splits["train"]["success"]
    assert not result.splits["ood"]["success"] and result.splits["ood"]["rows"] == 0
    assert str(prepared / "ood.parquet") in result.summary()
    assert result.to_dict()["splits"]["ood"] == {"rows": 0, "success": False, "expectations": 1, "failed": 1}
    # nothing to validate at all: a failure, no Data Docs
    empty = _gate(tmp_path / "nowhere", ["train"], tmp_path / "other")
    assert not empty.success and empty.docs_index is None
    assert "train.parquet not found" in empty.summary()


def test_an_unreadable_parquet_fails_instead_of_crashing(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.parquet").write_bytes(b"this is not parquet")
    result = _gate(prepared, ["train"], tmp_path)
    assert not result.success
    (failure,) = result.splits["train"]["failures"]
    assert failure["expectation"] == "table_readable"
    assert "train.parquet" in result.summary()


def test_training_refuses_tables_changed_since_the_gate_passed_them(tmp_path):
    """`validate` records the SHA-256 of each table it passed; `prepare` writing new tables without `validate`
    (a stale passing record) stops training, naming the changed table."""
    from noisyrollout.config import Params
    from noisyrollout.errors import NoisyRolloutError
    from pipelines.stages.common import require_valid_data
    from pipelines.stages.validate import validate

    prepared = tmp_path / "prepared"
    for split in ("train", "val", "test", "ood"):
        _write(prepared, split, _rows(split))
    params = Params.model_validate({"data": {"prepared_dir": str(prepared)}, "reports_dir": str(tmp_path / "reports"),
                                    "gate": {"docs_dir": str(tmp_path / "docs")}})
    assert validate(params, log=lambda _: None)["success"]
    require_valid_data(params)                                    # as validated: fine

    rows = _rows("train")
    rows["answer"][0] = "4"                                       # one answer changed, tables rewritten, no validate
    _write(prepared, "train", rows)
    with pytest.raises(NoisyRolloutError, match=r"the prepared train table\(s\) in .* changed since the gate passed"):
        require_valid_data(params)
    assert validate(params, log=lambda _: None)["success"]       # validated again: fine again
    require_valid_data(params)
