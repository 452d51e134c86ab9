"""Reliability case 1, bad data: a generated hostile corpus (tests/reliability/badcorpus.py) in every split and every
benchmark folder, through the real `prepare` and `validate` stages (Great Expectations), the training loaders, the
real Qwen2.5-VL processor of the tiny model, the `train` refusal (CLI, exit code 2) and `eval`'s counts.

Promises:
- the gate names every bad row: split + id + rule, each planted (row, rule) exactly and nothing else;
- convertible modes (RGBA, P, L, CMYK, I;16, EXIF orientation) come out upright RGB with the reference colours, in
  training and in evaluation, and the processor takes them;
- training never starts on failed data (nor on data never validated);
- evaluation counts every unreadable or unscorable sample and drops none.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from noisyrollout.config import Params, load_params
from noisyrollout.errors import DataError, NoisyRolloutError
from tests.reliability import badcorpus as bc

REPO = Path(__file__).resolve().parents[2]
JPEG_TOLERANCE = 6          # solid colours through JPEG (CMYK, EXIF) come back within a few levels
MIN_PX, MAX_PX = 784, 12544  # pixel bounds every converted image (56x56, upright EXIF 28x56) already lies in


def _overrides(root: Path) -> list[str]:
    src = root / "src"
    return [*(f"data.{s}={src}" for s in bc.SPLITS), f"data.prepared_dir={root / 'prepared'}",
            f"gate.docs_dir={root / 'docs'}", f"reports_dir={root / 'reports'}", "tracking.enabled=false",
            f"train.output_dir={root / 'rl'}", f"sft.output_dir={root / 'sft'}", f"eval.output_dir={root / 'eval'}"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Params, dict[str, list[bc.Row]]]:
    """The hostile source written and prepared by the real `prepare` stage: (root, params, planted rows)."""
    from pipelines.stages.prepare import prepare

    root = tmp_path_factory.mktemp("bad_data")
    planted = bc.write_source(root / "src")
    params = load_params(REPO / "params.yaml", _overrides(root))
    prepare(params, log=lambda _: None, adhoc=True)
    return root, params, planted


@pytest.fixture(scope="module")
def gated(prepared) -> tuple[Path, Params, dict[str, list[bc.Row]], list[str], DataError]:
    """The prepared tables judged by the real `validate` stage (ad hoc: its gate.json goes to
    `<docs_dir>/reports/`): (root, params, planted rows, validate's log, its error)."""
    from pipelines.stages.validate import validate

    lines: list[str] = []
    with pytest.raises(DataError) as failed:
        validate(prepared[1], log=lines.append, adhoc=True)
    return (*prepared, lines, failed.value)


# ---------------------------------------------------------------------------------------------
# the gate


def test_gate_names_every_bad_row_in_every_split(gated) -> None:
    root, params, planted, lines, error = gated
    with (root / "docs" / "bad_rows.csv").open(encoding="utf-8") as f:
        named = [(r["split"], r["id"], r["expectation"], r["column"]) for r in csv.DictReader(f)]
    assert set(named) == bc.bad_rows(planted)          # every planted (row, rule), nothing else
    assert len(named) == len(set(named)) + 4           # the duplicate id's two rows share (split, id): one per split
    assert len(bc.bad_rows(planted)) == 4 * 16
    good = {(s, r.id) for s, rows in planted.items() for r in rows if not r.bad}
    assert {(s, i) for s, i, _, _ in named}.isdisjoint(good)
    assert {r.kind for r in planted["train"] if not r.bad} == {"clean", *bc.CONVERTIBLE, "answer_number", "unicode_rtl"}
    print(f"\ngate: {len(named)} rows of bad_rows.csv = the {len(bc.bad_rows(planted))} planted (row, rule) pairs of "
          f"{len(planted)} splits (+4 for the duplicate id's second row); none of the "
          f"{len(good)} good rows named")

    gate = json.loads((root / "docs" / "reports" / "gate.json").read_text())
    assert gate["success"] is False
    assert gate["splits"] == {s: {"rows": 24, "success": False, "expectations": 16, "failed": 8} for s in bc.SPLITS}
    assert str(error) == (f"data validation failed on train, val, test, ood (details above; Data Docs in "
                          f"{root / 'docs'}); nothing downstream runs on this data")
    summary = "\n".join(lines)
    for split in bc.SPLITS:
        assert f"row 1 (id {split}-png_truncated): image 0: OSError: image file is truncated" in summary
        assert f"row 6 (id {split}-huge): 20000x20000=400000000 px" in summary
        assert f"row 16 (id {split}-answer_bool): null" in summary
        assert f"row 23 (id {split}-problem_1mb): 1048576 characters (at most 16384)" in summary
        assert f"row 21 (id {split}-two_placeholders): 2 <image> placeholder(s) for 1 image(s)" in summary
    assert f"every failed row: {root / 'docs' / 'bad_rows.csv'}" in summary


def test_prepare_keeps_text_exact_and_numbers_become_answers(prepared) -> None:
    import pyarrow.parquet as pq

    root, *_ = prepared
    rows = {r["id"]: r for r in pq.read_table(root / "prepared" / "val.parquet").to_pylist()}
    assert len(rows) == 23                                           # 24 rows, one id twice
    assert (rows["val-unicode_rtl"]["problem"], rows["val-unicode_rtl"]["answer"]) == (bc.RTL_PROBLEM, "٣")
    assert rows["val-answer_number"]["answer"] == "3"
    assert [rows[f"val-{k}"]["answer"] for k in ("answer_missing", "answer_bool", "answer_list")] == [None] * 3
    assert len(rows["val-problem_1mb"]["problem"]) == bc.MB_PROBLEM_CHARS
    assert rows["val-zero_byte"]["images"][0]["bytes"] == b""


def test_a_strict_load_names_the_first_non_string_answer(prepared) -> None:
    from noisyrollout.data.loaders import load_examples

    root, *_ = prepared
    source = root / "src" / "train.jsonl"
    with pytest.raises(DataError) as caught:
        load_examples(str(source))
    assert str(caught.value) == f"{source}: row 16 (line 17) (id 'train-answer_bool'): 'answer' must be a string (got bool)"


# ---------------------------------------------------------------------------------------------
# convertible modes


def _colour(image, fx: float, fy: float) -> tuple[int, int, int]:
    return image.getpixel((int(fx * image.width), int(fy * image.height)))


def _close(got: tuple[int, ...], want: tuple[int, ...], tolerance: int) -> bool:
    return max(abs(a - b) for a, b in zip(got, want)) <= tolerance


def test_convertible_modes_become_rgb_and_the_processor_takes_them(tmp_path, tiny_model_dir) -> None:
    from PIL import Image

    from noisyrollout.data.loaders import load_examples, load_records, to_rgb
    from noisyrollout.models.load import load_processor
    from noisyrollout.rollout.chat import encode_chats

    planted = bc.write_source(tmp_path, ("train",), kinds=bc.CONVERTIBLE)["train"]
    modes = [Image.open(next((tmp_path / "images" / "train").glob(f"*-{k}.*"))).mode for k in bc.CONVERTIBLE]
    assert modes == ["RGBA", "P", "L", "CMYK", "I;16", "RGB"]       # what the files hold (the EXIF one is rotated)
    records = load_records(str(tmp_path), "train", min_pixels=MIN_PX, max_pixels=MAX_PX)
    raw = load_examples(str(tmp_path), split="train")
    assert [r["id"] for r in records] == [row.id for row in planted]
    for record, row, example in zip(records, planted, raw):
        image = record["image"]
        tolerance = JPEG_TOLERANCE if row.kind in ("cmyk", "exif") else 0
        assert image.mode == "RGB", row.kind
        assert to_rgb(example["images"][0]).size == row.size, row.kind          # EXIF: 28x56 upright, not 56x28
        for fx, fy, want in row.colours:
            assert _close(_colour(image, fx, fy), want, tolerance), (row.kind, _colour(image, fx, fy), want)

    processor = load_processor(tiny_model_dir, min_pixels=MIN_PX, max_pixels=MAX_PX)
    images = [r["image"] for r in records]
    encoded = encode_chats(processor, [r["problem"] for r in records], images, Params().model.system_prompt)
    grids = encoded["image_grid_thw"].tolist()
    assert grids == [[1, im.height // 14, im.width // 14] for im in images]
    # the solid ones give the processor exactly the pixels of a reference image of their colour
    for k, row in enumerate(planted):
        if len(row.colours) != 1:
            continue
        reference = Image.new("RGB", images[k].size, row.colours[0][2])
        want = processor.image_processor(images=[reference], return_tensors="pt")["pixel_values"]
        got = processor.image_processor(images=[images[k]], return_tensors="pt")["pixel_values"]
        assert float((got - want).abs().max()) <= (0.1 if row.kind == "cmyk" else 1e-6), row.kind


# ---------------------------------------------------------------------------------------------
# training refuses


def _adhoc_params_file(root: Path) -> Path:
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in _overrides(root):
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path


def test_training_never_starts_on_failed_data(gated) -> None:
    from pipelines.stages.common import require_valid_data

    root, params, *_ = gated
    record = root / "docs" / "reports" / "gate.json"
    with pytest.raises(NoisyRolloutError, match="the prepared data failed validation"):
        require_valid_data(params, adhoc=True)
    # the CLI: one line, exit code 2, and Ray never imported
    probe = ("import atexit, sys; atexit.register(lambda: print('ray imported:', 'ray' in sys.modules)); "
             "from pipelines.cli import main; sys.argv = ['noisyrollout', 'train', '--params', sys.argv[1]]; main()")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe, str(_adhoc_params_file(root))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: the prepared data failed validation ({record}); fix the data, then run `noisyrollout prepare` and "
        f"`noisyrollout validate` (or `dvc repro`)"]
    assert done.stdout.strip().splitlines()[-1] == "ray imported: False"


def test_training_never_starts_on_data_never_validated(prepared, tmp_path) -> None:
    from pipelines.stages.train import train

    root, params, _ = prepared
    unvalidated = params.model_copy(update={
        "reports_dir": tmp_path / "reports", "gate": params.gate.model_copy(update={"docs_dir": tmp_path / "docs"})})
    with pytest.raises(DataError) as caught:
        train(unvalidated, log=lambda _: None, adhoc=True)
    assert str(caught.value).startswith(f"{root / 'prepared' / 'train.parquet'}: row 1 (id 'train-png_truncated'): "
                                        "images[0]: image")
    assert "cannot be decoded (OSError: image file is truncated" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# evaluation counts


class AnswerEngine:
    """Answers 3 to every question (yes to HallusionBench's): every planted answer, so each scored sample is right."""

    def __init__(self) -> None:
        self.images: list = []

    def generate(self, prompts, params):
        from eval.benchmarks import HALLUBENCH_SUFFIX
        from noisyrollout.rollout.engine import Generation

        self.images += [p.image for p in prompts]
        return [Generation(token_ids=[[0]], texts=["<think>x</think> \\boxed{yes}" if p.text.endswith(HALLUBENCH_SUFFIX)
                                                   else "<think>x</think> \\boxed{3}"]) for p in prompts]


def test_every_benchmark_loader_keeps_every_sample(tmp_path, prepared) -> None:
    from eval.benchmarks import BENCHMARKS, load_benchmark

    root, _, planted_rows = prepared
    planted = bc.write_benchmarks(tmp_path)
    embedded = {f"embedded_{s}": bc.embedded_samples(planted_rows[s]) for s in ("test", "ood")}
    for name in (*BENCHMARKS, *embedded):
        samples = load_benchmark(name, data_dir=tmp_path, corpus_dir=root / "prepared")
        expect = planted.get(name) or embedded[name]
        assert [(s.id, s.unreadable) for s in samples] == [(p.id, not p.scored and not p.late) for p in expect], name
        for sample, plan in zip(samples, expect):
            assert plan.late or plan.reason in (sample.error or ""), (name, plan.kind, sample.error)
            if plan.colours:                                       # converted as training converts
                image = sample.open_image()
                tolerance = JPEG_TOLERANCE if plan.kind in ("cmyk", "exif") else 0
                assert image.mode == "RGB"
                assert all(_close(_colour(image, fx, fy), want, tolerance) for fx, fy, want in plan.colours), \
                    (name, plan.kind)


def test_eval_report_counts_every_planted_sample(tmp_path, prepared) -> None:
    from eval.report import load_results, write_samples_csv
    from eval.runner import eval_sampling, run_eval

    root, _, planted_rows = prepared
    planted = bc.write_benchmarks(tmp_path / "data")
    planted |= {f"embedded_{s}": bc.embedded_samples(planted_rows[s]) for s in ("test", "ood")}
    engine = AnswerEngine()
    summary = run_eval(engine, data_dir=tmp_path / "data", corpus_dir=root / "prepared", datasets="all",
                       output_dir=tmp_path / "out", sampling=eval_sampling(max_new_tokens=8), progress=False,
                       min_pixels=784, max_pixels=3136)
    counts = {name: {k: row[k] for k in ("n_total", "n_unreadable", "n_scored", "n_correct")}
              for name, row in summary["benchmarks"].items()}
    want = {name: {"n_total": len(p), "n_unreadable": sum(not s.scored for s in p),
                   "n_scored": sum(s.scored for s in p), "n_correct": sum(s.scored for s in p)}
            for name, p in planted.items()}
    assert counts == want
    assert want["mathverse"] == {"n_total": 25, "n_unreadable": 10, "n_scored": 15, "n_correct": 15}
    assert want["embedded_test"] == {"n_total": 24, "n_unreadable": 9, "n_scored": 15, "n_correct": 15}
    results = load_results(tmp_path / "out", planted)
    for name, samples in planted.items():
        assert [(r["id"], r["unreadable"]) for r in results[name]] == [(s.id, not s.scored) for s in samples], name
        for row, plan in zip(results[name], samples):
            assert plan.reason in (row.get("error") or ""), (name, plan.kind, row.get("error"))
    assert all(im.mode == "RGB" and 784 <= im.width * im.height <= 3136 for im in engine.images)
    assert len(engine.images) == sum(w["n_scored"] for w in want.values())
    with write_samples_csv(results, tmp_path / "samples.csv").open(encoding="utf-8") as f:
        assert sum(1 for _ in csv.DictReader(f)) == sum(w["n_total"] for w in want.values())   # no id merged
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "| mathverse | 100.0 | 15 | 25 | 10 |" in md
    total = {k: sum(w[k] for w in want.values()) for k in ("n_total", "n_unreadable", "n_scored")}
    print(f"\neval over {len(want)} benchmarks: {total['n_total']} samples, {total['n_unreadable']} counted unreadable, "
          f"{total['n_scored']} scored, none dropped")
