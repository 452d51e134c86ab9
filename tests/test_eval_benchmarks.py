"""Benchmark loaders on small fixtures written in each of the six layouts of `eval_data.zip`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks import (
    BENCHMARKS,
    HALLUBENCH_SUFFIX,
    hallubench_question,
    load_benchmark,
    load_geo3k,
    load_hallubench,
    load_mathvision,
    load_mathvista,
    locate,
    parse_choices,
)
from eval.fixtures import write_fixture_data
from eval.runner import resolve_datasets
from noisyrollout.errors import DataError


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval_data")
    return root, write_fixture_data(root)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_loader_reads_each_layout(fixture_dir: tuple[Path, dict], name: str) -> None:
    root, expected = fixture_dir
    samples = load_benchmark(name, data_dir=root)
    assert [s.id for s in samples] == [e.id for e in expected[name]]
    assert [s.question for s in samples] == [e.question for e in expected[name]]
    assert [s.answer for s in samples] == [e.answer for e in expected[name]]
    assert [not s.unreadable for s in samples] == [e.readable for e in expected[name]]
    for sample, exp in zip(samples, expected[name]):
        assert {k: sample.extra[k] for k in exp.extra} == exp.extra
        if not sample.unreadable:
            image = sample.open_image()
            assert image.mode == "RGB" and image.size == (16, 12)
        else:
            assert sample.error and ("missing image" in sample.error or "unreadable image" in sample.error)


def test_geo3k_answer_is_the_lettered_choice_and_folders_sort_numerically(fixture_dir: tuple[Path, dict]) -> None:
    root, _ = fixture_dir
    samples = load_geo3k(root)
    assert [s.id for s in samples] == ["1", "2", "10"]
    assert samples[0].answer == "4\\sqrt{3}" and samples[0].extra["answer_letter"] == "B"
    assert samples[0].choices is None  # the authors' prompt does not show the choices


def test_geo3k_bad_letter_is_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "geometry3k" / "test" / "5"
    folder.mkdir(parents=True)
    (folder / "data.json").write_text(json.dumps({"id": 5, "annotat_text": "x", "choices": ["1", "2"], "answer": "E"}))
    with pytest.raises(DataError, match=r"data.json: answer 'E'"):
        load_geo3k(tmp_path)


def test_hallubench_question_cut_at_first_question_mark() -> None:
    assert hallubench_question("Is A red? Answer yes or no?") == "Is A red" + HALLUBENCH_SUFFIX
    assert hallubench_question("Is A red") == "Is A red" + HALLUBENCH_SUFFIX
    assert HALLUBENCH_SUFFIX == "? You final answer can only be \\boxed{yes} or \\boxed{no}."


def test_hallubench_skips_text_only_and_maps_gt(fixture_dir: tuple[Path, dict]) -> None:
    root, _ = fixture_dir
    samples = load_hallubench(root)
    assert len(samples) == 4  # the fifth question has an empty filename
    assert [s.answer for s in samples] == ["yes", "no", "yes", "no"]
    assert samples[0].image_path == root / "hallubench/images/hallusion_bench/VD/illusion/0_0.png"
    assert samples[2].extra == {"subcategory": "chart", "category": "VS"}


def test_hallubench_bad_gt_answer(tmp_path: Path) -> None:
    (tmp_path / "hallubench").mkdir()
    row = {"set_id": 0, "figure_id": 0, "question_id": 0, "question": "Is it?", "gt_answer": "2", "filename": "a.png"}
    (tmp_path / "hallubench" / "HallusionBench.json").write_text(json.dumps([row]))
    with pytest.raises(DataError, match="gt_answer '2' is not 0 or 1"):
        load_hallubench(tmp_path)


def test_mathvista_json_keyed_by_pid(tmp_path: Path) -> None:
    expected = write_fixture_data(tmp_path, mathvista_format="json")
    samples = load_mathvista(tmp_path)
    assert [(s.id, s.answer) for s in samples] == [(e.id, e.answer) for e in expected["mathvista"]]
    assert samples[0].choices == ["red", "blue", "green"]


def test_mathvista_hub_snapshot_and_embedded_image_bytes(tmp_path: Path) -> None:
    import io

    import pandas as pd

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, format="PNG")
    row = {"pid": "7", "image": "images/7.jpg", "query": "Q?", "question_type": "multi_choice",
           "choices": ["1", "2"], "answer": "2", "metadata": {"task": "math word problem"},
           "decoded_image": {"bytes": buffer.getvalue(), "path": "7.jpg"}}
    (tmp_path / "mathvista" / "data").mkdir(parents=True)
    pd.DataFrame([row]).to_parquet(tmp_path / "mathvista" / "data" / "testmini-00000-of-00001.parquet")
    [sample] = load_mathvista(tmp_path)
    assert (sample.id, sample.answer, sample.extra["task"]) == ("7", "B", "math word problem")
    assert not sample.unreadable and sample.open_image().size == (8, 8)  # file absent: bytes used


def test_mathvista_without_metadata_is_skipped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "mathvista" / "images").mkdir(parents=True)
    assert "no testmini metadata" in locate("mathvista", data_dir=tmp_path, corpus_dir=None)
    with pytest.raises(DataError, match="nothing to evaluate"):
        resolve_datasets("all", data_dir=tmp_path, corpus_dir=None)


def test_mathvision_answers_stay_text(fixture_dir: tuple[Path, dict]) -> None:
    root, _ = fixture_dir
    samples = load_mathvision(root)
    assert samples[2].answer == "0.50"  # not the float 0.5
    assert samples[1].choices == ["1/2", "1/3", "1/4"]


def test_unreadable_images_are_counted_not_dropped(fixture_dir: tuple[Path, dict]) -> None:
    root, _ = fixture_dir
    counts = {name: sum(s.unreadable for s in load_benchmark(name, data_dir=root)) for name in BENCHMARKS}
    assert counts == {"geo3k": 1, "wemath": 1, "mathvista": 0, "mathverse": 0, "mathvision": 1, "hallubench": 0}


def test_missing_benchmark_folders_are_reported_and_skipped(tmp_path: Path) -> None:
    write_fixture_data(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "wemath")
    names, skipped = resolve_datasets("all", data_dir=tmp_path, corpus_dir=None)
    assert names == ["geo3k", "mathvista", "mathverse", "mathvision", "hallubench"]
    assert set(skipped) == {"wemath", "embedded_test", "embedded_ood"}
    assert "not found" in skipped["wemath"]
    names, skipped = resolve_datasets("wemath, HalluBench", data_dir=tmp_path, corpus_dir=None)
    assert names == ["hallubench"] and list(skipped) == ["wemath"]


def test_bad_dataset_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data dir .* does not exist"):
        resolve_datasets("all", data_dir=tmp_path / "nope", corpus_dir=None)
    with pytest.raises(DataError, match="unknown dataset"):
        resolve_datasets("geo3k,mmmu", data_dir=tmp_path, corpus_dir=None)
    with pytest.raises(DataError, match="nothing to evaluate"):
        resolve_datasets("geo3k", data_dir=tmp_path, corpus_dir=None)


def test_broken_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "wemath").mkdir()
    (tmp_path / "wemath" / "testmini.json").write_text("[{")
    with pytest.raises(DataError, match=r"wemath/testmini.json: not valid JSON"):
        load_benchmark("wemath", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("text", "choices"),
    [
        ("Q\nChoices:\n(A) red\n(B) dark blue\n(C) 3", ["red", "dark blue", "3"]),
        ("Q\n\nOptions: A. 3; B. 4; C. 5", ["3", "4", "5"]),
        ("Q\nChoices:\nA:30°\nB:Point B.\nC:90°", ["30°", "Point B.", "90°"]),
        ("Q with A. and B. but no header", None),
        ("Choices: (A) only one", None),
    ],
)
def test_parse_choices(text: str, choices: list[str] | None) -> None:
    assert parse_choices(text) == choices
