"""HFEngine: batched sampling with transformers `generate` (KV cache), the CPU rollout engine.

It holds a reference to the policy model itself (colocated with the learner), so it always samples from
the current weights and needs no weight sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from noisyrollout.rollout.chat import EncodedPrompts, encode_chats, prompt_batch, to_device
from noisyrollout.rollout.engine import Generation, Prompt, SamplingParams

# Sampling one of these would break the next forward ("image features and image tokens do not match").
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def trim_response(ids: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Cut a generated row after its first EOS (kept) and drop trailing padding."""
    out: list[int] = []
    for tok in ids:
        out.append(tok)
        if tok in eos_ids:
            return out
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


def neutral_generation_config(config: Any) -> Any:
    """A GenerationConfig with only `config`'s special tokens: nothing in it changes the sampling distribution."""
    from transformers import GenerationConfig

    return GenerationConfig(**{k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


class HFEngine:
    """Engine protocol over a transformers image-text-to-text model and its processor."""

    accepts_encoded = True

    def __init__(self, model: Any, processor: Any, *, system_prompt: str | None, batch_size: int = 64,
                 cache_vision: bool = False, share_prompts: bool = True) -> None:
        """`cache_vision` (for a frozen vision tower): encode each prompt's image once and hand the features to
        `generate`, instead of letting it encode the image again for each of the n samples.
        `share_prompts`: with n > 1 samples per prompt, run each prompt once and start all n samples from its KV
        cache (`prefill_shared`), instead of letting `generate` run the prompt n times."""
        self.model = model
        self.cache_vision = cache_vision
        self.share_prompts = share_prompts
        self.processor = processor
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        tok = processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))
        self.suppress_ids = vision_token_ids(tok)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, system_prompt: str | None, min_pixels: int | None = None,
                        max_pixels: int | None = None, batch_size: int = 32, dtype: str = "float32") -> "HFEngine":
        from noisyrollout.models.load import load_model, load_processor

        processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
        model = load_model(path, dtype=dtype).eval()
        return cls(model, processor, system_prompt=system_prompt, batch_size=batch_size)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 encoded: EncodedPrompts | None = None) -> list[Generation]:
        """`encoded` (optional): the prompts already encoded (`rollout/chat.py:encode_prompts`), in order."""
        if encoded is not None and len(encoded) != len(prompts):
            raise ValueError(f"encoded holds {len(encoded)} prompts for {len(prompts)} prompts")
        if params.temperature <= 0 and params.n > 1:  # greedy: n identical answers, decode once
            once = self.generate(prompts, SamplingParams(1, params.temperature, params.top_p, params.max_new_tokens),
                                 encoded)
            return [Generation(token_ids=g.token_ids * params.n, texts=g.texts * params.n) for g in once]
        out: list[Generation] = []
        per_call = max(1, self.batch_size // max(params.n, 1))
        for start in range(0, len(prompts), per_call):
            chunk = range(start, min(start + per_call, len(prompts)))
            out.extend(self._generate_batch(prompts[start:start + per_call], params,
                                            None if encoded is None else encoded.select(chunk)))
        return out

    def _model_inputs(self, prompts: Sequence[Prompt], encoded: EncodedPrompts | None) -> dict[str, Any]:
        """Left-padded inputs of `prompts`: from their encoding when given, else through the processor."""
        if encoded is not None:
            inputs = prompt_batch(encoded, range(len(encoded)), pad_id=self.pad_id,
                                  image_token_id=self.model.config.image_token_id)
            return to_device(inputs, self.model.device)
        self.processor.tokenizer.padding_side = "left"
        inputs = encode_chats(self.processor, [p.text for p in prompts], [p.image for p in prompts], self.system_prompt)
        return dict(inputs.to(self.model.device))

    def _generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams,
                        encoded: EncodedPrompts | None = None) -> list[Generation]:
        tok = self.processor.tokenizer
        inputs = self._model_inputs(prompts, encoded)
        if self.cache_vision and "pixel_values" in inputs:
            with torch.no_grad():
                features = self.model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                               return_dict=True)
            inputs["mm_encoder_outputs"] = {"image": features}
        greedy = params.temperature <= 0
        sampling = {} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        was_training = self.model.training
        saved_config = self.model.generation_config
        # transformers fills every knob we leave unset from the checkpoint's generation_config (a repetition_penalty,
        # top_k, min_p, bad_words_ids, ...). The loss assumes plain temperature / top-p sampling, so generate
        # sees a config holding only the special tokens.
        self.model.generation_config = neutral_generation_config(saved_config)
        self.model.eval()
        try:
            n = params.n
            if self.share_prompts and n > 1:
                inputs, n = self.prefill_shared(inputs, n, room=params.max_new_tokens), 1
            sequences = self.model.generate(
                **inputs, do_sample=not greedy, num_return_sequences=n, max_new_tokens=params.max_new_tokens,
                suppress_tokens=self.suppress_ids or None, pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids), use_cache=True, **sampling,
            )
        finally:
            self.model.generation_config = saved_config
            self.model.train(was_training)
            self.model.model.rope_deltas = None   # set by prefill_shared or generate: never reuse it across calls
        generated = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        rows = [trim_response(ids, self.eos_ids, self.pad_id) for ids in generated]
        texts_out = tok.batch_decode(rows, skip_special_tokens=True)
        return [Generation(token_ids=rows[i * params.n:(i + 1) * params.n], texts=texts_out[i * params.n:(i + 1) * params.n])
                for i in range(len(prompts))]

    @torch.no_grad()
    def prefill_shared(self, inputs: dict[str, Any], n: int, room: int = 0) -> dict[str, Any]:
        """Run each (left-padded) prompt once, all but its last token, the batch's common prefix once
        (`models/prefix.py`), and return `generate` inputs for its n samples that continue from that KV cache: the
        same tokens as `num_return_sequences=n`, with the prompts computed once instead of n times. With `room`
        the cache's layers grow in place by up to that many tokens instead of being copied at each step
        (`models/kv_cache.py`).

        This is transformers' documented continuation from a cache: `generate` gets the full prompt ids and mask,
        runs only the uncached last token, and, for Qwen2.5-VL, takes the M-RoPE offsets of text after the image
        from `model.model.rope_deltas`, which we set as its own prefill would.
        """
        from noisyrollout.models.kv_cache import make_room
        from noisyrollout.models.prefix import prompt_cache

        vision = {k: inputs[k] for k in ("pixel_values", "mm_encoder_outputs") if k in inputs}
        head = prompt_cache(self.model, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], vision,
                            drop_last=True)
        cache = head.cache
        cache.batch_repeat_interleave(n)
        if room:
            make_room(cache, room)
        self.model.model.rope_deltas = head.rope_deltas.repeat_interleave(n, dim=0)
        return {"input_ids": head.input_ids.repeat_interleave(n, dim=0),
                "attention_mask": head.attention_mask.repeat_interleave(n, dim=0), "cache": cache}
