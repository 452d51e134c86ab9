"""run_eval and regrade end to end on the fixture benchmarks, with a dictionary standing in for the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS
from eval.fixtures import write_fixture_data
from eval.runner import eval_sampling, regrade, run_eval
from noisyrollout.errors import DataError
from noisyrollout.rollout.engine import Generation, Prompt, SamplingParams


class DictEngine:
    """Answers each prompt from a dict keyed by its text; records the batches it was given."""

    def __init__(self, responses: dict[str, str], default: str = "I do not know.") -> None:
        self.responses = responses
        self.default = default
        self.batches: list[list[Prompt]] = []
        self.params: list[SamplingParams] = []

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        self.batches.append(list(prompts))
        self.params.append(params)
        for prompt in prompts:
            assert prompt.image.mode == "RGB"
        return [Generation(token_ids=[[0]], texts=[self.responses.get(p.text, self.default)]) for p in prompts]


WRONG = {("mathverse", "3"): "<think>hm</think> \\boxed{13}", ("hallubench", "3_0_2"): "\\boxed{yes}"}


@pytest.fixture()
def fixture(tmp_path: Path) -> tuple[Path, dict, DictEngine]:
    data = tmp_path / "data"
    expected = write_fixture_data(data)
    responses = {q.question: WRONG.get((name, q.id), q.response) for name, qs in expected.items() for q in qs}
    return data, expected, DictEngine(responses)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_run_eval_writes_results_metrics_and_summary(fixture: tuple[Path, dict, DictEngine], tmp_path: Path) -> None:
    data, expected, engine = fixture
    out = tmp_path / "out"
    summary = run_eval(engine, data_dir=data, corpus_dir=None, datasets="all", output_dir=out,
                       sampling=eval_sampling(max_new_tokens=32), progress=False, batch_size=2,
                       config={"model": "dict", "api_key": "must-not-appear"})

    # generation: greedy, batched, unreadable samples never sent to the engine
    assert all(p.temperature == 0.0 and p.max_new_tokens == 32 for p in engine.params)
    assert max(len(b) for b in engine.batches) == 2
    readable = sum(q.readable for qs in expected.values() for q in qs)
    assert sum(len(b) for b in engine.batches) == readable

    for name in BENCHMARKS:
        saved = _read(out / f"{name}.json")
        results, metrics = saved["results"], saved["metrics"]
        assert [r["id"] for r in results] == [q.id for q in expected[name]]
        for row in results:
            assert {"id", "question", "answer", "prediction", "accuracy", "correct"} <= set(row)
        n_unreadable = sum(not q.readable for q in expected[name])
        n_wrong = sum((name, q.id) in WRONG for q in expected[name])
        assert metrics["n_total"] == len(expected[name])
        assert metrics["n_unreadable"] == n_unreadable
        assert metrics["n_scored"] == len(expected[name]) - n_unreadable
        assert metrics["accuracy"] == pytest.approx((metrics["n_scored"] - n_wrong) / metrics["n_scored"])
        unreadable_rows = [r for r in results if r["unreadable"]]
        assert all(r["prediction"] is None and not r["correct"] and r["error"] for r in unreadable_rows)
        assert saved["config"]["sampling"] == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32}
        assert "api_key" not in saved["config"] and saved["config"]["model"] == "dict"

    wemath = _read(out / "wemath.json")["results"]
    assert wemath[0]["graded_by"] == "choice" and wemath[0]["choices"] == ["3", "4", "5", "6"]
    verse = _read(out / "mathverse.json")
    assert verse["results"][0]["problem_version"] == "Text Dominant"
    assert verse["metrics"]["sub_accuracies"] == {"Text Dominant": 1.0, "Vision Only": 0.5}
    hallu = _read(out / "hallubench.json")["metrics"]["sub_accuracies"]
    assert hallu == {"chart": 0.5, "illusion": 1.0}
    assert set(_read(out / "mathvista.json")["metrics"]["sub_accuracies"]) == {
        "figure question answering", "geometry problem solving"}
    assert set(_read(out / "mathvision.json")["metrics"]["sub_accuracies"]) == {"counting", "metric geometry - area"}

    assert summary == _read(out / "summary.json")
    assert list(summary["benchmarks"]) == list(BENCHMARKS)
    assert set(summary["skipped"]) == {"embedded_test", "embedded_ood"}
    assert summary["benchmarks"]["geo3k"]["n_unreadable"] == 1
    md = (out / "summary.md").read_text()
    assert "| mathverse | 66.7 | 3 | 3 | 0 |" in md and "embedded_test" in md
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "must-not-appear" not in "".join(p.read_text(errors="ignore") for p in out.iterdir())


def test_limit_and_image_failing_to_decode_at_generation(fixture: tuple[Path, dict, DictEngine], tmp_path: Path) -> None:
    data, _, engine = fixture
    png = data / "hallubench/images/hallusion_bench/VD/illusion/0_0.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png)
    png.write_bytes(png.read_bytes()[:60])  # the header opens, the pixels do not decode
    summary = run_eval(engine, data_dir=data, corpus_dir=None, datasets=["hallubench"], output_dir=tmp_path / "o",
                       sampling=eval_sampling(), limit=2, progress=False, min_pixels=784, max_pixels=3136)
    [[prompt]] = engine.batches
    # the 16 x 12 fixture image, resized as the Qwen2-VL processor would: whole 28-pixel blocks, in the pixel range
    assert prompt.image.size == (56, 28) and 784 <= prompt.image.width * prompt.image.height <= 3136
    metrics = _read(tmp_path / "o" / "hallubench.json")["metrics"]
    assert (metrics["n_total"], metrics["n_unreadable"], metrics["n_scored"]) == (2, 1, 1)
    assert summary["benchmarks"]["hallubench"]["accuracy"] == 1.0
    assert summary["benchmarks"]["hallubench"]["accuracy_all"] == 0.5


def test_regrade_rescores_saved_predictions_without_a_model(fixture: tuple[Path, dict, DictEngine],
                                                            tmp_path: Path) -> None:
    data, _, engine = fixture
    old, new = tmp_path / "old", tmp_path / "new"
    first = run_eval(engine, data_dir=data, corpus_dir=None, datasets="mathverse,hallubench,geo3k", output_dir=old,
                     sampling=eval_sampling(), progress=False)
    again = regrade(old, new, progress=False)
    assert {n: b["accuracy"] for n, b in again["benchmarks"].items()} == \
        {n: b["accuracy"] for n, b in first["benchmarks"].items()}
    assert again["benchmarks"]["geo3k"]["n_unreadable"] == 1
    assert _read(new / "mathverse.json")["config"]["regraded_from"] == str(old)

    # a saved prediction that the grader now reads differently: regrade picks the change up
    saved = _read(old / "mathverse.json")
    saved["results"][2]["prediction"] = "\\boxed{12}"
    (old / "mathverse.json").write_text(json.dumps(saved))
    fixed = regrade(old, tmp_path / "fixed", progress=False)
    assert fixed["benchmarks"]["mathverse"]["accuracy"] == 1.0
    assert (tmp_path / "fixed" / "summary.png").is_file()

    with pytest.raises(DataError, match="no benchmark results"):
        regrade(tmp_path / "fixed" / "..", tmp_path / "x")  # tmp_path holds no <benchmark>.json


def test_embedded_splits(tmp_path: Path) -> None:
    from noisyrollout.data.synthetic import build_corpus, save_corpus

    corpus = tmp_path / "corpus"
    save_corpus(build_corpus(sizes={"test": 6, "ood": 3}, progress=False), corpus)

    class EchoEngine:  # answers "0" to everything: right only where the answer is 0
        def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
            assert all(not p.text.startswith("<image>") for p in prompts)
            return [Generation(token_ids=[[0]], texts=["\\boxed{0}"]) for _ in prompts]

    summary = run_eval(EchoEngine(), data_dir=None, corpus_dir=corpus, datasets="all", output_dir=tmp_path / "o",
                       sampling=eval_sampling(), progress=False)
    assert list(summary["benchmarks"]) == ["embedded_test", "embedded_ood"]
    assert set(summary["skipped"]) == set(BENCHMARKS) and summary["average"] is None
    saved = _read(tmp_path / "o" / "embedded_test.json")
    assert saved["metrics"]["n_total"] == 6 and saved["metrics"]["n_unreadable"] == 0
    assert set(saved["metrics"]["sub_accuracies"]) == {r["task"] for r in saved["results"]}
    assert [r["id"] for r in saved["results"]][0].startswith("test-")


def test_engine_returning_too_few_generations_is_an_error(fixture: tuple[Path, dict, DictEngine],
                                                          tmp_path: Path) -> None:
    data, _, _ = fixture

    class Broken:
        def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
            return []

    with pytest.raises(RuntimeError, match="0 generations for"):
        run_eval(Broken(), data_dir=data, corpus_dir=None, datasets="geo3k", output_dir=tmp_path / "o",
                 sampling=eval_sampling(), progress=False)


def test_redact_drops_secret_keys_only() -> None:
    from eval.report import redact

    config = {"api_key": "s", "apiKey": "s", "hf-token": "s", "max_new_tokens": 8, "judge": {"auth": "s", "model": "m"}}
    assert redact(config) == {"max_new_tokens": 8, "judge": {"model": "m"}}
