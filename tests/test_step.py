"""One NoisyRollout step on the real tiny model: the update conditions on the CLEAN image."""

from __future__ import annotations

import pytest
import torch

from noisyrollout.algo.augment import distort
from noisyrollout.config import Params
from noisyrollout.models.load import load_model, load_processor, vision_tower
from noisyrollout.rollout.chat import cache_image_features, chat_text, encode_prompts
from noisyrollout.rollout.engine import Prompt, SamplingParams
from noisyrollout.rollout.hf_engine import HFEngine
from noisyrollout.data.loaders import load_records
from noisyrollout.train.optim import TorchOptimizer
from noisyrollout.train.scoring import build_sequences, pad_responses, response_logprobs
from noisyrollout.train.step import PromptBatch, noisyrollout_step


def _setup(tiny_model_dir, corpus_dir, **rollout):
    params = Params.model_validate({
        "data": {"train": str(corpus_dir)},
        "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 8, **rollout},
        "noise": {"distortion": "gaussian", "alpha0": 600, "anneal": "none"},
        "train": {"prompts_per_step": 3, "lr": 1e-3},
    })
    processor = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir).train()
    vision_tower(model).requires_grad_(False)
    engine = HFEngine(model, processor, system_prompt=params.model.system_prompt, batch_size=64)
    records = load_records(str(corpus_dir), "train", min_pixels=3136, max_pixels=3136, limit=3)
    batch = PromptBatch(images=[r["image"] for r in records], problems=[r["problem"] for r in records],
                        answers=[r["answer"] for r in records])
    optimizer = TorchOptimizer(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), warmup_steps=0,
                               total_steps=1, max_grad_norm=1.0)
    return params, processor, model, engine, batch, optimizer


def test_old_logprobs_are_conditioned_on_the_clean_image(tiny_model_dir, corpus_dir):
    params, processor, model, engine, batch, optimizer = _setup(tiny_model_dir, corpus_dir)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = noisyrollout_step(0, 10, batch, model=model, processor=processor, engine=engine,
                               optimizer=optimizer, params=params, generator=torch.Generator().manual_seed(0))
    metrics, rollouts, old_logp = result.metrics, result.rollouts, result.old_logp
    assert rollouts.is_noisy.sum().item() == 3 * 2 and (~rollouts.is_noisy).sum().item() == 3 * 2
    assert rollouts.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]   # clean + noisy in one group
    # Recompute with the weights the step used, from the clean and from the distorted images.
    model.load_state_dict(snapshot)
    pad = processor.tokenizer.pad_token_id
    index = rollouts.prompt_index.tolist()
    clean = encode_prompts(processor, batch.images, batch.problems, params.model.system_prompt)
    noisy_images = [distort(img, "gaussian", 600, 1.0, torch.Generator().manual_seed(1)) for img in batch.images]
    noisy = encode_prompts(processor, noisy_images, batch.problems, params.model.system_prompt)
    with torch.no_grad():
        from_clean, _ = response_logprobs(model, clean, index, rollouts.response_ids, rollouts.response_mask, pad_id=pad)
        from_noisy, _ = response_logprobs(model, noisy, index, rollouts.response_ids, rollouts.response_mask, pad_id=pad)
    rows = rollouts.is_noisy
    assert torch.allclose(old_logp, from_clean, atol=1e-6)
    assert not torch.allclose(old_logp[rows], from_noisy[rows], atol=1e-3)
    assert metrics.alpha == 600 and metrics.reward_clean == metrics.reward_clean   # not nan


def test_n_noisy_zero_is_vanilla_grpo(tiny_model_dir, corpus_dir):
    params, processor, model, engine, batch, optimizer = _setup(tiny_model_dir, corpus_dir, n_clean=4, n_noisy=0)
    result = noisyrollout_step(0, 10, batch, model=model, processor=processor, engine=engine,
                               optimizer=optimizer, params=params, generator=torch.Generator().manual_seed(0))
    metrics, rollouts = result.metrics, result.rollouts
    assert not rollouts.is_noisy.any() and len(rollouts.texts) == 12
    assert metrics.reward_noisy != metrics.reward_noisy   # nan: no noisy rollouts


def test_generate_logprobs_match_recomputed_logprobs(tiny_model_dir, corpus_dir):
    """Left-padded prompts + right-padded responses reproduce generate's own token log-probs."""
    params, processor, model, engine, batch, _ = _setup(tiny_model_dir, corpus_dir)
    model.eval()
    prompts = [Prompt(img, q) for img, q in zip(batch.images, batch.problems)]
    gens = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    response, mask = pad_responses([g.token_ids[0] for g in gens], processor.tokenizer.pad_token_id)
    width = response.shape[1]
    enc = encode_prompts(processor, batch.images, batch.problems, params.model.system_prompt)
    with torch.no_grad():
        logp, _ = response_logprobs(model, enc, [0, 1, 2], response, mask, pad_id=processor.tokenizer.pad_token_id)
        # greedy tokens are each position's argmax: compare with the full-distribution maximum
        inputs = build_sequences(
            enc, [0, 1, 2], response, mask, pad_id=processor.tokenizer.pad_token_id,
            image_token_id=model.config.image_token_id)
        logits = model(**inputs, use_cache=False).logits[:, -width - 1:-1].float()
    assert torch.equal(logits.argmax(-1)[mask], response[mask])
    assert torch.allclose(logp[mask], logits.log_softmax(-1).max(-1).values[mask], atol=1e-5)


def test_vision_feature_cache_gives_the_uncached_logprobs(tiny_model_dir, corpus_dir):
    params, processor, model, engine, batch, _ = _setup(tiny_model_dir, corpus_dir)
    model.eval()
    gens = engine.generate([Prompt(img, q) for img, q in zip(batch.images, batch.problems)],
                           SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    index = [p for p in range(3) for _ in range(2)]
    response, mask = pad_responses([ids for g in gens for ids in g.token_ids], processor.tokenizer.pad_token_id)
    pad = processor.tokenizer.pad_token_id
    plain = encode_prompts(processor, batch.images, batch.problems, params.model.system_prompt)
    cached = cache_image_features(model, encode_prompts(processor, batch.images, batch.problems,
                                                        params.model.system_prompt))
    assert cached.features is not None and len(cached.features) == 3
    with torch.no_grad():
        a, _ = response_logprobs(model, plain, index, response, mask, pad_id=pad)
        b, _ = response_logprobs(model, cached, index, response, mask, pad_id=pad)
    assert torch.allclose(a, b, atol=1e-6)
    assert "pixel_values" not in build_sequences(cached, index, response, mask, pad_id=pad,
                                                 image_token_id=model.config.image_token_id)


def test_vision_cache_in_generation_samples_the_same_tokens(tiny_model_dir, corpus_dir):
    params, processor, model, _, batch, _ = _setup(tiny_model_dir, corpus_dir)
    prompts = [Prompt(img, q) for img, q in zip(batch.images, batch.problems)]
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    outs = []
    for cache in (False, True):
        engine = HFEngine(model, processor, system_prompt=params.model.system_prompt, cache_vision=cache)
        torch.manual_seed(0)
        outs.append([g.token_ids for g in engine.generate(prompts, sampling)])
    assert outs[0] == outs[1]


def test_a_checkpoints_generation_config_does_not_change_sampling(tiny_model_dir, corpus_dir):
    """The loss assumes plain temperature sampling: a saved repetition_penalty / no_repeat_ngram_size must not
    reach generate (transformers fills every unset knob from model.generation_config)."""
    params, processor, model, engine, batch, _ = _setup(tiny_model_dir, corpus_dir)
    prompts = [Prompt(img, q) for img, q in zip(batch.images, batch.problems)]
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    torch.manual_seed(0)
    plain = [g.token_ids for g in engine.generate(prompts, sampling)]
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    torch.manual_seed(0)
    configured = [g.token_ids for g in engine.generate(prompts, sampling)]
    assert configured == plain
    assert model.generation_config.repetition_penalty == 50.0     # the model's own config is left as it was


def test_skipping_the_redundant_old_logprob_pass_gives_the_same_update(tiny_model_dir, corpus_dir):
    """With one mini-batch the old log-probs are the update's own (ratio 1): skipping the separate pass changes
    nothing but the time."""
    results = []
    for recompute in (True, False):
        params, processor, model, engine, batch, optimizer = _setup(tiny_model_dir, corpus_dir)
        params = params.model_copy(update={"train": params.train.model_copy(update={"entropy_coef": 0.01})})
        torch.manual_seed(0)
        result = noisyrollout_step(0, 10, batch, model=model, processor=processor, engine=engine, optimizer=optimizer,
                                   params=params, generator=torch.Generator().manual_seed(0),
                                   recompute_old_logp=recompute)
        results.append((result, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (plain, plain_weights), (fast, fast_weights) = results
    assert torch.equal(plain.rollouts.response_ids, fast.rollouts.response_ids)    # same samples
    assert torch.allclose(plain.old_logp, fast.old_logp, atol=1e-5)
    assert plain.metrics.pg_loss == pytest.approx(fast.metrics.pg_loss, abs=1e-6)
    assert plain.metrics.grad_norm == pytest.approx(fast.metrics.grad_norm, rel=1e-4)
    assert torch.allclose(plain_weights, fast_weights, atol=1e-6)


def test_clean_and_noisy_prompts_in_one_generate_call_give_the_two_call_samples(tiny_model_dir, corpus_dir):
    """n_clean == n_noisy: one engine call for both kinds; greedy decoding shows the responses are the same as
    with one call per kind, in the same groups and order."""
    from noisyrollout.train.step import sample_rollouts

    params, processor, model, engine, batch, _ = _setup(tiny_model_dir, corpus_dir)
    noisy = [distort(img, "crop_fill", 0.4, 1.0, torch.Generator().manual_seed(1)) for img in batch.images]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    calls = []
    original = engine._generate_batch   # the batched generate call: count the prompts each one decodes together
    engine._generate_batch = lambda prompts, sp, enc=None: calls.append(len(prompts)) or original(prompts, sp, enc)
    pad = processor.tokenizer.pad_token_id
    together = sample_rollouts(engine, batch, noisy, n_clean=2, n_noisy=2, sampling=greedy, pad_id=pad)
    assert calls == [6]
    clean = sample_rollouts(engine, batch, None, n_clean=2, n_noisy=0, sampling=greedy, pad_id=pad)
    apart = sample_rollouts(engine, PromptBatch(noisy, batch.problems, batch.answers), None, n_clean=2, n_noisy=0,
                            sampling=greedy, pad_id=pad)
    assert calls == [6, 3, 3]
    for p in range(3):
        rows = [t for t, i in zip(together.texts, together.prompt_index.tolist()) if i == p]
        assert rows == [t for t, i in zip(clean.texts, clean.prompt_index.tolist()) if i == p] + \
            [t for t, i in zip(apart.texts, apart.prompt_index.tolist()) if i == p]
    assert together.is_noisy.tolist() == [False, False, True, True] * 3


@pytest.mark.parametrize("frozen_vision", [True, False])
def test_prompts_computed_once_per_group_give_the_plain_logprobs_and_gradient(tiny_model_dir, corpus_dir,
                                                                              frozen_vision):
    """Each prompt run once, its KV cache shared by its responses: the same log-probs, entropies and gradient as
    running every [prompt | response] sequence whole, for partial groups in any order and prompts of different
    lengths (left padding), with the vision tower's features cached or computed in the pass."""
    params, processor, model, engine, batch, _ = _setup(tiny_model_dir, corpus_dir)
    pad = processor.tokenizer.pad_token_id
    prompts = encode_prompts(processor, batch.images, batch.problems, params.model.system_prompt)
    assert len({len(ids) for ids in prompts.input_ids}) > 1            # the prompts need left padding
    if frozen_vision:
        prompts = cache_image_features(model, prompts)
    else:
        vision_tower(model).requires_grad_(True)
    index = [2, 0, 2, 0, 1, 2]                                         # partial groups, in mixed order
    lengths = [8, 3, 5, 8, 1, 6]                                        # responses of different lengths
    words = torch.randint(16, len(processor.tokenizer), (len(index), 8), generator=torch.Generator().manual_seed(0))
    response, mask = pad_responses([words[i, :n].tolist() for i, n in enumerate(lengths)], pad)
    assert mask.sum(-1).tolist() == lengths

    def run(share):
        model.zero_grad()
        logp, entropy = response_logprobs(model, prompts, index, response, mask, pad_id=pad, temperature=0.7,
                                          with_entropy=True, share_prompts=share)
        ((logp * torch.linspace(-1, 1, len(index)).unsqueeze(1)).sum() + entropy.sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return logp.detach(), entropy.detach(), grad

    plain, shared = run(False), run(True)
    assert torch.allclose(shared[0], plain[0], atol=1e-5)
    assert torch.allclose(shared[1], plain[1], atol=1e-5)
    assert (shared[0][~mask] == 0).all()
    assert (shared[2] - plain[2]).norm() <= 1e-5 * plain[2].norm()
    if not frozen_vision:   # the vision tower is trained through the shared prompt too
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision_tower(model).parameters()
                   if p.ndim > 1)


def test_prompt_sharing_keeps_the_step_exact(tiny_model_dir, corpus_dir):
    """A whole step with the shared-prompt passes makes the plain step's update: same samples, loss, weights."""
    results = []
    for share in (False, True):
        params, processor, model, engine, batch, optimizer = _setup(tiny_model_dir, corpus_dir)
        params = params.model_copy(update={"train": params.train.model_copy(update={"mini_batches": 2,
                                                                                          "entropy_coef": 0.01})})
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.manual_seed(0)
        result = noisyrollout_step(0, 10, batch, model=model, processor=processor, engine=engine, optimizer=optimizer,
                                   params=params, generator=torch.Generator().manual_seed(0), share_prompts=share)
        results.append((result, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (plain, plain_weights), (shared, shared_weights) = results
    assert torch.equal(plain.rollouts.response_ids, shared.rollouts.response_ids)
    assert torch.allclose(plain.old_logp, shared.old_logp, atol=1e-5)
    assert plain.metrics.pg_loss == pytest.approx(shared.metrics.pg_loss, abs=1e-6)
    assert torch.allclose(plain_weights, shared_weights, atol=1e-5)   # two AdamW steps of ~1e-3 each
    assert (shared_weights - before).abs().max() > 1e-4                 # the step did move the weights


@pytest.mark.parametrize("freeze_vision,n", [(True, 2), (False, 2), (True, 1)])
def test_a_step_that_encodes_its_prompts_once_makes_the_same_update(tiny_model_dir, corpus_dir, freeze_vision, n):
    """The step encodes its clean and distorted prompts once (processor, frozen vision tower); the engine samples
    from that encoding and the update reuses its clean half. An engine that encodes the prompts itself (as vLLM
    does: accepts_encoded False) gives the same samples, old log-probs and weights. n = 1 takes generate's own
    prefill instead of the shared one."""
    results = []
    for reuse in (False, True):
        params, processor, model, engine, batch, optimizer = _setup(tiny_model_dir, corpus_dir, n_clean=n, n_noisy=n)
        params = params.model_copy(update={"model": params.model.model_copy(update={"freeze_vision": freeze_vision}),
                                           "train": params.train.model_copy(update={"mini_batches": 2})})
        engine = HFEngine(model, processor, system_prompt=params.model.system_prompt, cache_vision=freeze_vision)
        if not reuse:
            engine.accepts_encoded = False
        seen = []
        original = engine._generate_batch
        engine._generate_batch = lambda prompts, sampling, encoded=None: seen.append((prompts, encoded)) or original(
            prompts, sampling, encoded)
        torch.manual_seed(0)
        result = noisyrollout_step(0, 10, batch, model=model, processor=processor, engine=engine, optimizer=optimizer,
                                   params=params, generator=torch.Generator().manual_seed(0))
        (prompts, encoded), = seen                     # one call: the clean and the distorted prompts
        if reuse:   # each prompt's own encoding (its image's pixels), features only with a frozen tower
            own = encode_prompts(processor, [p.image for p in prompts], [p.text for p in prompts],
                                 params.model.system_prompt)
            assert len(encoded) == 6 and (encoded.features is not None) == freeze_vision
            assert all(torch.equal(a, b) for a, b in zip(encoded.input_ids, own.input_ids))
            assert all(torch.equal(a, b) for a, b in zip(encoded.pixel_values, own.pixel_values))
            assert not torch.equal(own.pixel_values[0], own.pixel_values[3])   # prompt 0, clean and distorted
        else:
            assert encoded is None
        results.append((result, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (own, own_weights), (reused, reused_weights) = results
    assert torch.equal(own.rollouts.response_ids, reused.rollouts.response_ids)
    assert len({tuple(r) for r in reused.rollouts.response_ids.tolist()}) > 1
    assert torch.allclose(own.old_logp, reused.old_logp, atol=1e-5)
    assert torch.allclose(own_weights, reused_weights, atol=1e-5)


@pytest.mark.parametrize("cache_vision", [True, False])
def test_prompt_run_once_per_group_in_generation_samples_the_same_tokens(tiny_model_dir, corpus_dir, cache_vision):
    """generate continuing n samples from one prefill of each prompt draws exactly the tokens of
    num_return_sequences=n (same seed), and leaves no M-RoPE state behind for the next call."""
    params, processor, model, _, batch, _ = _setup(tiny_model_dir, corpus_dir)
    prompts = [Prompt(img, q) for img, q in zip(batch.images, batch.problems)]
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
    outs = []
    for share in (False, True):
        engine = HFEngine(model, processor, system_prompt=params.model.system_prompt, cache_vision=cache_vision,
                          share_prompts=share)
        calls = []
        original = engine.prefill_shared
        engine.prefill_shared = lambda inputs, n, room=0: calls.append(n) or original(inputs, n, room=room)
        torch.manual_seed(0)
        outs.append([g.token_ids for g in engine.generate(prompts, sampling)])
        assert calls == ([4] if share else [])
        assert model.model.rope_deltas is None
    assert outs[0] == outs[1]
    assert len({tuple(ids) for ids in outs[1][0]}) > 1      # really sampled: the 4 samples of a prompt differ


def test_common_prompt_prefix_is_computed_once_with_the_plain_numbers(tiny_model_dir, corpus_dir):
    """prompt_cache runs the tokens every prompt shares (system turn, user header) once: the prefix stops at the
    image, and the prompts' last hidden states equal a plain forward of the left-padded batch."""
    from noisyrollout.models.prefix import prompt_cache

    params, processor, model, _, batch, _ = _setup(tiny_model_dir, corpus_dir)
    model.eval()
    enc = processor(text=[chat_text(processor, q, params.model.system_prompt) for q in batch.problems],
                    images=batch.images, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()                           # the prompts differ in length
    with torch.no_grad():
        head = prompt_cache(model, enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"],
                            {"pixel_values": enc["pixel_values"]})
        plain = model.model(**enc, use_cache=False).last_hidden_state[:, -1]
    first = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    assert head.prefix_length == first.index(model.config.vision_start_token_id)
    assert head.prefix_length > 20                                      # the system prompt is shared
    assert torch.allclose(head.last_hidden, plain, atol=1e-5)
    assert head.cache.get_seq_length() == head.input_ids.shape[1]


def _reference_prefix_length(input_ids, attention_mask, stop_ids):
    """The definition, token by token: the longest run every row shares, before a stop token, leaving one token."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    common = 0
    while (common < min(map(len, rows)) - 1 and rows[0][common] not in stop_ids
           and all(r[common] == rows[0][common] for r in rows)):
        common += 1
    return common


def test_common_prefix_layout_matches_the_token_by_token_definition():
    """The vectorised prefix search against the loop it replaced, on random left-padded batches."""
    import random

    from noisyrollout.models.prefix import common_prefix_layout

    rng = random.Random(0)
    lengths_seen = set()
    for _ in range(2000):
        base = [rng.randint(0, 3) for _ in range(rng.randint(1, 8))]
        rows = [base[:rng.randint(1, len(base))] if rng.random() < 0.7 else
                [rng.randint(0, 3) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 5))]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        laid_ids, laid_mask, common = common_prefix_layout(ids, mask, {3})
        assert common == _reference_prefix_length(ids, mask, {3})
        lengths_seen.add(common)
        for i, r in enumerate(rows):   # every row is still its own tokens, prefix first
            assert laid_ids[i][laid_mask[i].bool()].tolist() == r
    assert len(lengths_seen) >= 5      # short, long and no prefix all occurred


def test_twin_prompts_are_tokenized_once_with_the_plain_processor_output(tiny_model_dir, corpus_dir):
    """encode_chats (clean + distorted prompts: the same texts, other pixels) gives the processor's own tensors."""
    from noisyrollout.rollout.chat import encode_chats

    params, processor, _, _, batch, _ = _setup(tiny_model_dir, corpus_dir)
    g = torch.Generator().manual_seed(0)
    noisy = [distort(img, "crop_fill", 0.3, 1.0, g) for img in batch.images]
    processor.tokenizer.padding_side = "left"
    problems, images = batch.problems * 2, batch.images + noisy
    plain = processor(text=[chat_text(processor, q, params.model.system_prompt) for q in problems], images=images,
                      padding=True, return_tensors="pt")
    shared = encode_chats(processor, problems, images, params.model.system_prompt)
    assert set(shared.keys()) == set(plain.keys())
    for key in plain:
        assert torch.equal(shared[key], plain[key]), key
    assert not torch.equal(plain["pixel_values"][:16], plain["pixel_values"][-16:])   # really other pixels
    # a distortion that changes the size (rotate expands the canvas) gets its own tokens
    rotated = [distort(img, "rotate", 30, 1.0, g) for img in batch.images]
    assert rotated[0].size != batch.images[0].size
    images = batch.images + rotated
    plain = processor(text=[chat_text(processor, q, params.model.system_prompt) for q in problems], images=images,
                      padding=True, return_tensors="pt")
    shared = encode_chats(processor, problems, images, params.model.system_prompt)
    for key in plain:
        assert torch.equal(shared[key], plain[key]), key


def test_rl_prompts_exclude_the_sft_examples(tiny_model_dir, corpus_dir):
    """sft.fraction=f: SFT's examples are the split's first round(f N), RL's prompts the rest (none shared, none
    lost); without SFT, or without a fraction, RL prompts with all of them."""
    from noisyrollout.train.learner import Learner

    every = [r["id"] for r in load_records(str(corpus_dir), "train", min_pixels=3136, max_pixels=3136)]
    assert len(every) == 90
    for overrides, first in (({"sft": {"fraction": 1 / 3}}, 30), ({"sft": {"fraction": 1 / 3, "enabled": False}}, 0),
                             ({"sft": {"fraction": None}}, 0)):
        params = Params.model_validate({"data": {"prepared_dir": str(corpus_dir)}, **overrides})
        assert params.rl_first_example(90) == first
        learner = Learner(0, 1, params.model_dump(mode="json"), str(tiny_model_dir), distributed=False)
        assert learner.setup() == 90 - first
        assert [r["id"] for r in learner.records] == every[first:]
    params = Params.model_validate({"sft": {"fraction": 1 / 3}})
    whole = Params.model_validate({"sft": {"fraction": None}})
    assert params.sft_examples(90) == 30 and whole.sft_examples(90) == 90   # SFT's share: the first 30, or all
    assert Params.model_validate({"sft": {"fraction": 2 / 3}}).sft_examples(3000) == 2000
