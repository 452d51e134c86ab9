"""The vLLM engine for real, on vLLM's CPU build: `make test-vllm` (its own venv, .venv-vllm; see docs/training.md).

Everything runs against the embedded tiny Qwen2.5-VL after a short SFT warm start (so greedy answers vary and
rewards are not all zero), a real `VLLMEngine` and the project's own scoring, in fp32. Without vLLM (the normal
.venv) every test here is skipped. The figures (log-prob parity, tensors and bytes per sync, rewards) are printed:
run with `-s` (make test-vllm VLLM_PYTEST_ARGS=-s) to see them.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from noisyrollout.algo.augment import distort
from noisyrollout.config import SYSTEM_PROMPT, Params
from noisyrollout.data.loaders import load_records
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.models.load import load_model, load_processor, vision_tower
from noisyrollout.rollout.chat import encode_prompts
from noisyrollout.rollout.engine import Prompt, SamplingParams
from noisyrollout.rollout.hf_engine import HFEngine
from noisyrollout.train.scoring import pad_responses, response_logprobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (make test-vllm runs these in .venv-vllm with vLLM's CPU build)"),
]

PIXELS = {"min_pixels": 3136, "max_pixels": 3136}
PARITY_GOAL = 1e-4          # mean |delta logp| between vLLM's reported log-probs and the learner's own
SAMPLED = SamplingParams(n=4, temperature=1.0, max_new_tokens=24)
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def platform():
    from noisyrollout.rollout.vllm_engine import require_vllm

    try:
        return require_vllm()
    except NoisyRolloutError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, corpus_dir, tmp_path_factory, platform) -> Path:
    """The tiny model after 80 SFT steps (about 9 s): it writes the answer format most of the time."""
    from noisyrollout.train.sft import run_sft

    params = Params.model_validate({"sft": {"steps": 80, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2}})
    processor = load_processor(tiny_model_dir, **PIXELS)
    model = load_model(tiny_model_dir)
    records = load_records(str(corpus_dir), "train", **PIXELS)
    run_sft(model, processor, records[:params.sft_examples(len(records))], params, progress=False)
    out = tmp_path_factory.mktemp("sft_policy")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(policy_dir):
    from noisyrollout.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(policy_dir, system_prompt=SYSTEM_PROMPT, **PIXELS)
    yield eng
    del eng
    gc.collect()


@pytest.fixture(scope="module")
def processor(policy_dir):
    return load_processor(policy_dir, **PIXELS)


@pytest.fixture(scope="module")
def batch(corpus_dir):
    """Three RL prompts, clean then their distorted copies (gaussian, alpha 500): six prompts in one batch."""
    records = load_records(str(corpus_dir), "train", **PIXELS)[60:63]
    generator = torch.Generator().manual_seed(0)
    images = [r["image"] for r in records] + [distort(r["image"], "gaussian", 500, 1.0, generator) for r in records]
    problems = [r["problem"] for r in records] * 2
    return images, problems


def _prompts(batch) -> list[Prompt]:
    return [Prompt(image, problem) for image, problem in zip(*batch)]


def _fresh_policy(policy_dir, *, freeze_vision: bool):
    model = load_model(policy_dir).eval()
    if freeze_vision:
        vision_tower(model).requires_grad_(False)
    return model


def _parity(model, processor, batch, generations) -> tuple[float, float, dict]:
    """Mean and max |vLLM's logp - the learner's logp| over every sampled token. The learner's are
    `response_logprobs` (the loss's own scoring) conditioned on the image each response was sampled from."""
    rows = [ids for g in generations for ids in g.token_ids]
    reported = [lp for g in generations for lp in g.logprobs]
    n = len(generations[0].token_ids)
    index = [p for p in range(len(generations)) for _ in range(n)]
    pad = processor.tokenizer.pad_token_id
    ids, mask = pad_responses(rows, pad)
    encoded = encode_prompts(processor, batch[0], batch[1], SYSTEM_PROMPT)
    with torch.no_grad():
        ours, _ = response_logprobs(model, encoded, index, ids, mask, pad_id=pad)
    theirs = torch.zeros_like(ours)
    for i, lp in enumerate(reported):
        theirs[i, :len(lp)] = torch.tensor(lp)
    delta = (ours - theirs).abs()[mask]
    return delta.mean().item(), delta.max().item(), {"ids": ids, "mask": mask, "index": index, "encoded": encoded,
                                                     "pad": pad}


def test_clean_and_distorted_prompts_with_n_samples_in_one_batch(engine, policy_dir, processor, batch):
    from noisyrollout.rollout.vllm_engine import SampledGeneration

    engine.sync_weights(_fresh_policy(policy_dir, freeze_vision=False))
    prompts = _prompts(batch)
    gens = engine.generate(prompts, SAMPLED, logprobs=True)
    assert len(gens) == 6 and all(isinstance(g, SampledGeneration) for g in gens)
    tok = processor.tokenizer
    eos = set(engine.stop_token_ids)
    for g in gens:
        assert len(g.token_ids) == SAMPLED.n == len(g.texts) == len(g.logprobs)
        for ids, text, lps in zip(g.token_ids, g.texts, g.logprobs):
            assert 0 < len(ids) <= SAMPLED.max_new_tokens and len(lps) == len(ids)
            assert ids[-1] in eos or len(ids) == SAMPLED.max_new_tokens   # EOS kept, as HFEngine keeps it
            assert not set(ids) & set(engine.suppress_ids)                # no vision token sampled
            assert text == tok.decode(ids, skip_special_tokens=True)
            assert all(lp <= 0 and math.isfinite(lp) for lp in lps)
        assert len({tuple(ids) for ids in g.token_ids}) > 1                # n real samples, not one replicated
    # greedy with n > 1: one decode, replicated (vLLM refuses n > 1 at temperature 0)
    greedy = engine.generate(prompts, SamplingParams(n=3, temperature=0.0, max_new_tokens=8))
    assert all(len(set(map(tuple, g.token_ids))) == 1 and len(g.token_ids) == 3 for g in greedy)


def test_greedy_output_is_hf_generates_token_for_token(engine, policy_dir, processor, batch):
    model = _fresh_policy(policy_dir, freeze_vision=False)
    engine.sync_weights(model)
    prompts = _prompts(batch)
    ours = HFEngine(model, processor, system_prompt=SYSTEM_PROMPT).generate(prompts, GREEDY)
    theirs = engine.generate(prompts, GREEDY)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs))
    print(f"\ngreedy fp32: {same}/{len(prompts)} prompts token-identical to HFEngine "
          f"({sum(len(g.token_ids[0]) for g in ours)} tokens)")
    assert [g.token_ids for g in theirs] == [g.token_ids for g in ours]
    assert [g.texts for g in theirs] == [g.texts for g in ours]
    assert len({t for g in ours for t in g.token_ids[0]}) > 5   # a real answer, not one token repeated


def _update(model, optimizer, data, advantages, steps: int = 2) -> None:
    """`steps` AdamW steps on a policy-gradient loss over the sampled responses (the learner's own scoring)."""
    model.train()
    for _ in range(steps):
        logp, _ = response_logprobs(model, data["encoded"], data["index"], data["ids"], data["mask"],
                                    pad_id=data["pad"])
        loss = -(advantages.unsqueeze(1) * logp).sum() / data["mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_logprobs_match_the_learner_after_every_weight_sync(engine, policy_dir, processor, batch):
    """After each of 3 policy updates, vLLM's log-prob of every token it samples is the learner's (fp32): mean
    |delta| < 1e-4. The same check on a stale engine (update, no sync) fails by orders of magnitude."""
    model = _fresh_policy(policy_dir, freeze_vision=True)
    engine.sync_weights(model, trainable_only=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    prompts = _prompts(batch)
    generator = torch.Generator().manual_seed(0)
    lines = []
    mean, worst, data = _parity(model, processor, batch, engine.generate(prompts, SAMPLED, logprobs=True))
    lines.append(f"before any update: mean {mean:.2e} max {worst:.2e}")
    assert mean < PARITY_GOAL
    for update in range(1, 4):
        advantages = torch.randn(data["ids"].shape[0], generator=generator).sign()
        _update(model, optimizer, data, advantages)
        stale_mean, stale_max, _ = _parity(model, processor, batch, engine.generate(prompts, SAMPLED, logprobs=True))
        engine.sync_weights(model, trainable_only=True)
        mean, worst, data = _parity(model, processor, batch, engine.generate(prompts, SAMPLED, logprobs=True))
        lines.append(f"after update {update}: synced mean {mean:.2e} max {worst:.2e} | stale engine mean "
                     f"{stale_mean:.2e} max {stale_max:.2e}")
        assert mean < PARITY_GOAL and worst < 10 * PARITY_GOAL
        assert stale_mean > 100 * PARITY_GOAL   # the log-probs changed: a missed sync fails this test
    print("\n|logp(vLLM) - logp(learner)| over the sampled tokens, fp32:\n  " + "\n  ".join(lines))


def test_a_sync_with_the_tower_frozen_pushes_the_language_model_only(engine, policy_dir, processor, batch):
    frozen = _fresh_policy(policy_dir, freeze_vision=True)
    trained = _fresh_policy(policy_dir, freeze_vision=False)
    language = {n for n, p in frozen.named_parameters() if p.requires_grad}
    full = engine.sync_weights(trained, trainable_only=True)      # nothing frozen: everything goes
    part = engine.sync_weights(frozen, trainable_only=True)       # what the learner does with freeze_vision
    print(f"\nsync, vision tower trained: {full.tensors} tensors, {full.bytes:,} bytes"
          f"\nsync, vision tower frozen:  {part.tensors} tensors, {part.bytes:,} bytes "
          f"({part.bytes / full.bytes:.0%})")
    assert not [n for n in part.names if n.startswith("visual.")]
    assert any(n.startswith("visual.") for n in full.names)
    assert part.tensors == len(language) < full.tensors and part.bytes < full.bytes
    # vLLM kept its own (unchanged) vision tower: its log-probs are still the learner's, images included
    mean, worst, _ = _parity(frozen, processor, batch, engine.generate(_prompts(batch), SAMPLED, logprobs=True))
    assert mean < PARITY_GOAL


def test_sampling_distribution_is_hf_engines(engine, policy_dir, processor, corpus_dir):
    """256 samples per engine from one policy (8 prompts x 32, temperature 1): the same format rate, length and
    mean log-probability per token, within sampling error."""
    from noisyrollout.algo.reward import score_batch

    model = _fresh_policy(policy_dir, freeze_vision=False)
    engine.sync_weights(model)
    records = load_records(str(corpus_dir), "train", **PIXELS)[60:68]
    prompts = [Prompt(r["image"], r["problem"]) for r in records]
    params = SamplingParams(n=32, temperature=1.0, max_new_tokens=24)
    answers = [r["answer"] for r in records for _ in range(params.n)]
    encoded = encode_prompts(processor, [r["image"] for r in records], [r["problem"] for r in records], SYSTEM_PROMPT)
    pad = processor.tokenizer.pad_token_id
    stats = {}
    for name, eng in (("hf", HFEngine(model, processor, system_prompt=SYSTEM_PROMPT)), ("vllm", engine)):
        torch.manual_seed(0)
        gens = eng.generate(prompts, params)
        rows = [ids for g in gens for ids in g.token_ids]
        ids, mask = pad_responses(rows, pad)
        with torch.no_grad():
            logp, _ = response_logprobs(model, encoded, [p for p in range(8) for _ in range(params.n)], ids, mask,
                                        pad_id=pad)
        scores = score_batch([t for g in gens for t in g.texts], answers, format_weight=0.1, accuracy_only=False)
        stats[name] = {"format": sum(s["format"] for s in scores) / len(scores),
                       "reward": sum(s["overall"] for s in scores) / len(scores),
                       "length": mask.sum().item() / len(rows), "logp_per_token": (logp.sum() / mask.sum()).item()}
    print("\nsampling, 256 samples each: " + json.dumps({k: {m: round(v, 3) for m, v in s.items()}
                                                       for k, s in stats.items()}))
    assert abs(stats["vllm"]["format"] - stats["hf"]["format"]) < 0.08
    assert abs(stats["vllm"]["length"] - stats["hf"]["length"]) < 1.5
    assert abs(stats["vllm"]["logp_per_token"] - stats["hf"]["logp_per_token"]) < 0.05


# ---- training with rollout.engine=vllm ------------------------------------------------------------------------

def _run_params(corpus_dir, out_dir, engine_name: str, trainer: str = "ray") -> Params:
    return Params.model_validate({
        "data": {"prepared_dir": str(corpus_dir), **PIXELS},
        "rollout": {"engine": engine_name, "n_clean": 2, "n_noisy": 2, "max_new_tokens": 24},
        "noise": {"distortion": "gaussian", "alpha0": 500},
        "train": {"prompts_per_step": 8, "steps": 10, "lr": 3e-4, "output_dir": str(out_dir), "log_every": 1},
        "cluster": {"trainer": trainer, "num_learners": 1, "cpus_per_learner": 1},
        "checkpoint": {"every": 0, "resume": "never"},
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def runs(policy_dir, corpus_dir, tmp_path_factory):
    """The same 10-step NoisyRollout run with each engine: the Ray trainer, one DeepSpeed learner (its own
    process, where vLLM runs in-process: about 40 s with vLLM's start-up)."""
    from noisyrollout.train.driver import train_rl

    out = {}
    for name in ("vllm", "hf"):
        folder = tmp_path_factory.mktemp(f"run_{name}")
        result = train_rl(_run_params(corpus_dir, folder, name), policy_dir, progress=False, log=lambda _: None)
        out[name] = result.metrics
    return out


def test_a_ten_step_run_with_the_vllm_engine_gets_the_hf_engines_rewards(runs):
    summary = {}
    for name, metrics in runs.items():
        assert [m.step for m in metrics] == list(range(10))
        assert all(math.isfinite(m.reward_clean) and math.isfinite(m.reward_noisy) for m in metrics)
        summary[name] = {key: sum(getattr(m, key) for m in metrics) / len(metrics)
                         for key in ("reward_clean", "reward_noisy", "format_rate", "response_length")}
        summary[name]["time_generate"] = sum(m.time_generate for m in metrics)
    print("\n10-step run (Ray trainer), mean over steps: " + json.dumps({k: {m: round(v, 3) for m, v in s.items()}
                                                                        for k, s in summary.items()}))
    for name, metrics in runs.items():
        print(f"  {name:4s} reward_clean by step: " + " ".join(f"{m.reward_clean:.2f}" for m in metrics)
              + " | format: " + " ".join(f"{m.format_rate:.2f}" for m in metrics))
    for key in ("reward_clean", "reward_noisy"):   # other samples, the same policy: the same rewards on average
        assert abs(summary["vllm"][key] - summary["hf"][key]) < 0.1, key
    assert summary["vllm"]["format_rate"] > 0.5 and summary["hf"]["format_rate"] > 0.5


def test_resume_pushes_the_checkpoints_weights_to_vllm_before_the_first_step(policy_dir, corpus_dir, batch, processor,
                                                                           tmp_path):
    """A learner (rollout.engine=vllm) takes 5 steps and saves; a new learner, whose fresh vLLM loaded the initial
    weights, loads that checkpoint: before any step its vLLM greedy output equals the HF model loaded from the
    checkpoint, and its log-probs are the resumed learner's (those of the engine before `load` are not)."""
    from noisyrollout.train.batching import batch_indices
    from noisyrollout.train.learner import Learner

    params = _run_params(corpus_dir, tmp_path, "vllm", trainer="local").model_dump(mode="json")
    first = Learner(0, 1, params, str(policy_dir), distributed=False)
    first.setup()
    for step in range(5):
        first.step(step, 10, batch_indices(step, 8, len(first.records), 0))
    first.save(str(tmp_path / "checkpoint"))
    del first
    gc.collect()

    learner = Learner(0, 1, params, str(policy_dir), distributed=False)
    learner.setup()
    engine = learner.rollout_engine
    prompts = _prompts(batch)
    initial = engine.generate(prompts, SAMPLED, logprobs=True)          # the initial weights' samples
    learner.load(str(tmp_path / "checkpoint"))
    saved = HFEngine.from_pretrained(tmp_path / "checkpoint" / "hf", system_prompt=SYSTEM_PROMPT, **PIXELS)
    greedy = [g.token_ids for g in engine.generate(prompts, GREEDY)]
    assert greedy == [g.token_ids for g in saved.generate(prompts, GREEDY)]
    assert engine.last_sync is not None
    assert not [n for n in engine.last_sync.names if n.startswith("visual.")]   # freeze_vision: the LM only
    mean, worst, _ = _parity(learner.model, processor, batch, engine.generate(prompts, SAMPLED, logprobs=True))
    stale_mean, stale_max, _ = _parity(learner.model, processor, batch, initial)
    print(f"\nafter resume: greedy = HF from the checkpoint on {len(prompts)} prompts; |delta logp| mean {mean:.2e} "
          f"max {worst:.2e} (the engine before load: mean {stale_mean:.2e} max {stale_max:.2e})")
    assert mean < PARITY_GOAL
    assert stale_mean > 100 * PARITY_GOAL   # the checkpoint's weights differ: without the push this test fails


MULTIPROCESS_PROBE = '''
import json, sys, torch
from noisyrollout.config import SYSTEM_PROMPT
from noisyrollout.data.loaders import load_records
from noisyrollout.models.load import load_model, load_processor, vision_tower
from noisyrollout.rollout.chat import encode_prompts
from noisyrollout.rollout.engine import Prompt, SamplingParams
from noisyrollout.rollout.vllm_engine import VLLMEngine
from noisyrollout.train.scoring import pad_responses, response_logprobs


def parity(engine, model, processor, records, prompts):
    gens = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16), logprobs=True)
    pad = processor.tokenizer.pad_token_id
    ids, mask = pad_responses([t for g in gens for t in g.token_ids], pad)
    encoded = encode_prompts(processor, [r["image"] for r in records], [r["problem"] for r in records], SYSTEM_PROMPT)
    with torch.no_grad():
        ours, _ = response_logprobs(model, encoded, [p for p in range(len(prompts)) for _ in range(3)], ids, mask,
                                    pad_id=pad)
    theirs = torch.zeros_like(ours)
    for i, lp in enumerate(lp for g in gens for lp in g.logprobs):
        theirs[i, :len(lp)] = torch.tensor(lp)
    return (ours - theirs).abs()[mask].mean().item()


if __name__ == "__main__":   # vLLM's engine core runs in a worker process: a spawn start needs this guard
    policy, corpus = sys.argv[1:3]
    pixels = {"min_pixels": 3136, "max_pixels": 3136}
    engine = VLLMEngine(policy, system_prompt=SYSTEM_PROMPT, **pixels)
    records = load_records(corpus, "train", **pixels)[60:63]
    prompts = [Prompt(r["image"], r["problem"]) for r in records]
    processor = load_processor(policy, **pixels)
    model = load_model(policy).eval()
    vision_tower(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    stale = parity(engine, model, processor, records, prompts)
    stats = engine.sync_weights(model, trainable_only=True)
    synced = parity(engine, model, processor, records, prompts)
    print("RESULT " + json.dumps({"via_disk": engine.sync_via_disk, "stale": stale, "synced": synced,
                                  "tensors": stats.tensors}), flush=True)
'''


def test_the_multi_process_engine_syncs_through_a_saved_file(policy_dir, corpus_dir, tmp_path):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 (vLLM's default; what tensor parallelism uses): the engine core runs in
    its own process, so weights go through a safetensors file (`weights_path`) and the CPU re-pack through the
    worker extension. The log-probs match after the sync."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(MULTIPROCESS_PROBE)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(policy_dir), str(corpus_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"\nmulti-process engine: sync via file, {result['tensors']} tensors; |delta logp| mean "
          f"{result['synced']:.2e} after the sync, {result['stale']:.2e} before it")
    assert result["via_disk"] and result["tensors"] > 0
    assert result["synced"] < PARITY_GOAL < result["stale"] / 100
