"""Run the evaluation suite: load benchmarks, generate with an engine, grade, write reports.

    summary = run_eval(engine, data_dir=..., corpus_dir=..., datasets="all", output_dir=OUT,
                       sampling=eval_sampling())
    summary = regrade(OUT, OUT_NEW)          # re-score saved predictions; no model needed

All benchmarks are loaded (and their files checked) before the first generation, so a broken data
dir fails in seconds, not after hours. A benchmark whose folder is absent is reported in
`summary["skipped"]` and skipped. Each benchmark's JSON is written as soon as it is graded.

Grading order per response: the last \\boxed{} by rule; when that is not correct and a judge is
given, the judge extracts the answer from the whole response and the rule grades what it extracted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from noisyrollout.errors import DataError
from noisyrollout.progress import progress_bar
from noisyrollout.rollout.engine import Engine, Prompt, SamplingParams

from eval.benchmarks import (
    BENCHMARKS,
    EMBEDDED_SPLITS,
    SUB_ACCURACY_KEY,
    EvalSample,
    load_benchmark,
    locate,
)
from eval.grading import grade_extracted, grade_prediction
from eval.judge import Judge, JudgeError, JudgeRequest
from eval.report import build_summary, compute_metrics, read_benchmark, write_benchmark, write_summary

log = logging.getLogger("noisyrollout.eval")

ALL = "all"
#: Other spellings accepted in --datasets.
ALIASES = {"geometry3k": "geo3k", "hallusionbench": "hallubench", "math_vista": "mathvista",
           "math_verse": "mathverse", "math_vision": "mathvision", "we_math": "wemath"}
#: Fields every result carries (besides the benchmark's extra fields).
RESULT_FIELDS = ("id", "question", "answer", "prediction", "extracted", "accuracy", "correct", "graded_by")


def eval_sampling(max_new_tokens: int = 2048, temperature: float = 0.0, top_p: float = 1.0) -> SamplingParams:
    """The evaluation default: one greedy response per question (authors: 2048 new tokens)."""
    return SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


def resolve_datasets(datasets: Sequence[str] | str, *, data_dir: Path | None,
                     corpus_dir: Path | None) -> tuple[list[str], dict[str, str]]:
    """(names to evaluate, {name: why skipped}) for a `--datasets` value.

    `all` means every paper benchmark found under `data_dir` plus the embedded splits found in
    `corpus_dir`. Unknown names and a data dir that does not exist raise `DataError`; a named
    benchmark whose folder is absent is skipped and reported.
    """
    for label, folder in (("data dir", data_dir), ("corpus dir", corpus_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{label} {folder} does not exist")
    names = [d.strip().lower() for d in datasets.split(",")] if isinstance(datasets, str) else \
        [d.strip().lower() for d in datasets]
    names = [ALIASES.get(n, n) for n in names if n]
    if ALL in names:
        names = list(BENCHMARKS + EMBEDDED_SPLITS)
    unknown = [n for n in names if n not in BENCHMARKS + EMBEDDED_SPLITS]
    if unknown:
        raise DataError(f"unknown dataset(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(BENCHMARKS + EMBEDDED_SPLITS)} or {ALL}")
    chosen, skipped = [], {}
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        reason = locate(name, data_dir=data_dir, corpus_dir=corpus_dir)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
            log.warning("%s: skipped (%s)", name, reason)
    if not chosen:
        detail = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "no dataset named"
        raise DataError(f"nothing to evaluate ({detail})")
    return chosen, skipped


def _model_image(sample: EvalSample, min_pixels: int | None, max_pixels: int | None):
    """The RGB image the model sees, resized into [min_pixels, max_pixels] when both are given."""
    image = sample.open_image()
    if min_pixels is not None and max_pixels is not None:
        try:
            from noisyrollout.data.loaders import fit_pixels
        except ImportError:  # the engine's processor resizes then
            return image
        image = fit_pixels(image, min_pixels, max_pixels)
    return image


def generate(engine: Engine, samples: Sequence[EvalSample], sampling: SamplingParams, *, batch_size: int = 64,
             min_pixels: int | None = None, max_pixels: int | None = None, progress: bool = True,
             desc: str = "generate") -> list[str | None]:
    """One response per sample, in order; None for a sample whose image is unreadable.

    Images are opened per batch (never all at once); an image that fails to decode here marks its
    sample unreadable, like a missing file does at load time.
    """
    batch_size = max(1, batch_size)
    responses: list[str | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if not s.unreadable]
    bar = progress_bar(total=len(todo), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch, prompts = [], []
        for i in todo[start:start + batch_size]:
            try:
                image = _model_image(samples[i], min_pixels, max_pixels)
            except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
                where = samples[i].image_path or "in-memory image"
                samples[i].mark_unreadable(f"unreadable image: {where} ({type(exc).__name__})")
                continue
            batch.append(i)
            prompts.append(Prompt(image=image, text=samples[i].question))
        if prompts:
            outputs = engine.generate(prompts, sampling)
            if len(outputs) != len(prompts):
                raise RuntimeError(f"engine returned {len(outputs)} generations for {len(prompts)} prompts")
            for i, out in zip(batch, outputs):
                responses[i] = (out.texts[0] if out.texts else "").strip()
        bar.update(len(todo[start:start + batch_size]))
    bar.close()
    return responses


def _result(sample: EvalSample, prediction: str | None) -> dict[str, Any]:
    """A result row before grading."""
    row: dict[str, Any] = {
        "id": sample.id,
        "question": sample.question,
        "answer": sample.answer,
        "prediction": prediction,
        "extracted": None,
        "accuracy": 0.0,
        "correct": False,
        "graded_by": None,
        "unreadable": sample.unreadable,
    }
    if sample.unreadable:
        row["error"] = sample.error
    if sample.image_path is not None:
        row["image"] = str(sample.image_path)
    if sample.choices:
        row["choices"] = sample.choices
    row.update(sample.extra)
    return row


def grade_results(results: list[dict[str, Any]], *, judge: Judge | None = None, progress: bool = True,
                  desc: str = "grade") -> list[dict[str, Any]]:
    """Grade result rows in place (prediction vs answer; choices when present); returns them."""
    fallback = []
    for row in progress_bar(results, desc=desc, unit="q", disable=not progress):
        for key in ("judge_answer", "judge_error"):
            row.pop(key, None)
        if row.get("unreadable") or row.get("prediction") is None:
            row.update(extracted=None, accuracy=0.0, correct=False, graded_by=None)
            continue
        grade = grade_prediction(row["prediction"], str(row["answer"]), choices=row.get("choices"))
        row.update(extracted=grade.extracted, accuracy=float(grade.correct), correct=grade.correct,
                   graded_by=grade.graded_by)
        if not grade.correct and row["prediction"].strip():
            fallback.append(row)
    if judge is not None and fallback:
        requests = [JudgeRequest(question=str(r.get("question_for_eval") or r["question"]), response=r["prediction"])
                    for r in fallback]
        answers = judge.extract_many(requests, progress=progress, desc=f"{desc} (judge)")
        for row, answer in zip(fallback, answers):  # rule-grade on the main thread (math-verify timeouts)
            if isinstance(answer, JudgeError):
                row["judge_error"] = str(answer)
                continue
            row["judge_answer"] = answer
            correct, _ = grade_extracted(answer, str(row["answer"]), choices=row.get("choices"))
            if correct:
                row.update(extracted=answer, accuracy=1.0, correct=True, graded_by="judge")
    return results


def _log_metrics(name: str, metrics: Mapping[str, Any]) -> None:
    log.info("%s: accuracy %.4f (%d scored / %d total, %d unreadable)", name, metrics["accuracy"],
             metrics["n_scored"], metrics["n_total"], metrics["n_unreadable"])


def run_eval(engine: Engine, *, data_dir: Path | None, corpus_dir: Path | None, datasets: Sequence[str] | str,
             output_dir: Path, sampling: SamplingParams, judge: Judge | None = None, limit: int | None = None,
             progress: bool = True, batch_size: int = 64, min_pixels: int | None = None,
             max_pixels: int | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `engine` on the chosen benchmarks; write OUT/<name>.json and the summary; return it.

    `limit` keeps the first N samples of each benchmark. `min_pixels`/`max_pixels` resize images
    here (else the engine's processor does). `config` (model path, system prompt, ...) is recorded
    in every output, with secret-looking keys removed.
    """
    output_dir = Path(output_dir)
    names, skipped = resolve_datasets(datasets, data_dir=data_dir, corpus_dir=corpus_dir)
    loaded: dict[str, list[EvalSample]] = {}
    for name in names:  # load everything first: a data error surfaces before any generation
        samples = load_benchmark(name, data_dir=data_dir, corpus_dir=corpus_dir)
        loaded[name] = samples[:limit] if limit is not None else samples
        log.info("%s: %d samples (%d with an unreadable image)", name, len(loaded[name]),
                 sum(s.unreadable for s in loaded[name]))
    run_config = {
        **(config or {}),
        "data_dir": str(data_dir) if data_dir is not None else None,
        "corpus_dir": str(corpus_dir) if corpus_dir is not None else None,
        "datasets": names,
        "sampling": asdict(sampling),
        "limit": limit,
        "batch_size": batch_size,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "engine": type(engine).__name__,
        "judge": judge.describe() if judge is not None else None,
    }
    all_metrics = {}
    for name, samples in loaded.items():
        began = time.perf_counter()
        responses = generate(engine, samples, sampling, batch_size=batch_size, min_pixels=min_pixels,
                             max_pixels=max_pixels, progress=progress, desc=f"{name} generate")
        seconds = time.perf_counter() - began
        results = grade_results([_result(s, r) for s, r in zip(samples, responses)], judge=judge,
                                progress=progress, desc=f"{name} grade")
        metrics = compute_metrics(results, SUB_ACCURACY_KEY.get(name))
        metrics["generate_seconds"] = round(seconds, 3)
        write_benchmark(output_dir, name, results, metrics, {**run_config, "benchmark": name})
        _log_metrics(name, metrics)
        all_metrics[name] = metrics
    summary = build_summary(all_metrics, skipped=skipped, config=run_config)
    write_summary(output_dir, summary)
    return summary


def regrade(predictions_dir: Path, output_dir: Path, *, judge: Judge | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Re-score the predictions saved in `predictions_dir` (OUT/<name>.json) into `output_dir`.

    No model is loaded: each saved result's prediction is graded again against its answer (and
    choices), so a grading fix or a judge can be applied to an old run. Unreadable samples stay
    counted as unreadable.
    """
    predictions_dir, output_dir = Path(predictions_dir), Path(output_dir)
    if not predictions_dir.is_dir():
        raise DataError(f"predictions dir {predictions_dir} does not exist")
    known = BENCHMARKS + EMBEDDED_SPLITS
    files = sorted((p for p in predictions_dir.glob("*.json") if p.stem in known), key=lambda p: known.index(p.stem))
    if not files:
        raise DataError(f"{predictions_dir}: no benchmark results (<benchmark>.json) to re-grade")
    all_metrics, configs = {}, {}
    for path in files:
        name = path.stem
        saved = read_benchmark(path)
        results = grade_results([dict(r) for r in saved["results"]], judge=judge, progress=progress,
                                desc=f"{name} regrade")
        metrics = compute_metrics(results, SUB_ACCURACY_KEY.get(name))
        old_config = saved.get("config") or {}
        configs[name] = old_config
        config = {**old_config, "regraded_from": str(predictions_dir),
                  "judge": judge.describe() if judge is not None else None}
        write_benchmark(output_dir, name, results, metrics, config)
        _log_metrics(name, metrics)
        all_metrics[name] = metrics
    first = {k: v for k, v in configs[files[0].stem].items() if k != "benchmark"}
    summary_config = {**first, "datasets": list(all_metrics), "regraded_from": str(predictions_dir),
                      "judge": judge.describe() if judge is not None else None}
    old_summary = predictions_dir / "summary.json"
    skipped = {}
    if old_summary.is_file():
        try:
            skipped = dict(json.loads(old_summary.read_text(encoding="utf-8")).get("skipped") or {})
        except (OSError, ValueError, AttributeError):
            skipped = {}
    summary = build_summary(all_metrics, skipped=skipped, config=summary_config)
    write_summary(output_dir, summary)
    return summary
