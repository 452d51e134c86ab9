"""VLLMEngine: the GPU rollout engine (vLLM), behind the same `Engine` protocol as `HFEngine`.

Target: vLLM 0.33 (`pip install '.[gpu]'` on a CUDA machine), its offline `vllm.LLM` class, V1 engine.
Importing this module never imports vllm; constructing a `VLLMEngine` does, after `require_vllm()`.

What was verified where:
- The pure glue below (`build_requests`, `sampling_kwargs`, `to_generations`, `state_dict_for_vllm`,
  `require_vllm`) is unit-tested on CPU with the real tiny Qwen2.5-VL (tests/test_vllm_engine.py).
- The calls into vLLM (`LLM(...)`, `LLM.generate`, `collective_rpc("reload_weights")`, the cache resets)
  follow vLLM's API and what was seen working on a CPU build of vLLM 0.32 (shared/STACK-NOTES.md: greedy
  output equal to HF `generate` token for token, weight reload then matching the changed HF model). The
  class itself runs only on a GPU machine and has not been exercised on one here.

Behaviour, matched to `HFEngine`:
- Prompts are templated with `chat_text` (the same string HFEngine feeds its processor) and sent as
  `{"prompt": text, "multi_modal_data": {"image": rgb}}`; vLLM's own copy of the HF processor expands the
  single `<|image_pad|>` into the image's tokens.
- Greedy (`temperature <= 0`): vLLM refuses `n > 1` with temperature 0 ("n must be 1 when using greedy
  sampling"), so one sample is decoded and replicated `n` times, as HFEngine does.
- Token ids: vLLM V1 appends each sampled token before checking the stop conditions, so a response that
  ended on EOS / a stop token id carries that token as its last id (HFEngine keeps EOS the same way); a
  length-capped response ends without one. Texts are vLLM's detokenization with special tokens skipped.
- Vision special tokens (`<|image_pad|>` ...) get a -100 logit bias (vLLM's clamp), the counterpart of
  HFEngine's `suppress_tokens`: a sampled `<|image_pad|>` would break the learner's scoring forward.

Weight sync: vLLM keeps its own copy of the weights, so after each optimiser step the trainer calls
`engine.sync_weights(model)`. With `tensor_parallel_size == 1` the engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by the constructor unless already set) and the learner's tensors
go by reference through `collective_rpc("reload_weights", kwargs={"weights_iterator": [...],
"is_checkpoint_format": True})`; with tensor parallelism they are written to a safetensors file and
reloaded with `weights_path`. Then the encoder, multimodal and prefix caches are reset: they hold results
of the old weights (without the encoder-cache reset the next image request fails with "Encoder cache miss").
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from noisyrollout.errors import NoisyRolloutError
from noisyrollout.rollout.chat import chat_text
from noisyrollout.rollout.engine import Generation, Prompt, SamplingParams
from noisyrollout.rollout.hf_engine import vision_token_ids

# transformers 5 parameter names -> names in a saved checkpoint. `save_pretrained` of a Qwen2.5-VL writes
# the original layout (as in Qwen/Qwen2.5-VL-7B-Instruct): `model.language_model.layers.0...` is saved as
# `model.layers.0...`, `model.visual...` as `visual...`, `lm_head.weight` as is and only when the
# embeddings are untied (a tied lm_head is the embedding Parameter itself, and is not saved). vLLM's
# Qwen2.5-VL loader maps these names (and the transformers-5 ones) onto its own modules.
CHECKPOINT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

SUPPRESS_BIAS = -100.0  # the most negative logit bias vLLM accepts (it clamps to [-100, 100])


def require_vllm() -> None:
    """Raise a one-line, actionable `NoisyRolloutError` unless vLLM is importable and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise NoisyRolloutError("vLLM is not installed: pip install '.[gpu]' on a CUDA machine "
                                "(or use rollout.engine: hf)")
    if not torch.cuda.is_available():
        raise NoisyRolloutError("vLLM needs a CUDA GPU and torch sees none; use rollout.engine: hf on CPU")


def build_requests(processor: Any, prompts: Sequence[Prompt], system_prompt: str | None) -> list[dict[str, Any]]:
    """vLLM prompt dicts: the chat-templated text (with one vision placeholder) and the image in RGB."""
    return [{"prompt": chat_text(processor, p.text, system_prompt),
             "multi_modal_data": {"image": p.image if p.image.mode == "RGB" else p.image.convert("RGB")}}
            for p in prompts]


def sampling_kwargs(params: SamplingParams, *, seed: int | None, stop_token_ids: Sequence[int],
                    suppress_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for our `SamplingParams`.

    Greedy (`temperature <= 0`) asks for a single sample (vLLM refuses n > 1 at temperature 0); the engine
    replicates it. top_k is left at vLLM's default (disabled) and nothing comes from the model's
    generation_config: vLLM applies it only when `generate` gets no sampling parameters. A `seed` makes
    a request reproducible (vLLM gives the i-th of its n samples seed + i); leave it None in training, or
    every call repeats the same random stream.
    """
    greedy = params.temperature <= 0
    kwargs: dict[str, Any] = {
        "n": 1 if greedy else params.n,
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": 1.0 if greedy else float(params.top_p),
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": sorted(set(stop_token_ids)),
        "skip_special_tokens": True,
    }
    if seed is not None:
        kwargs["seed"] = seed
    if suppress_token_ids:
        kwargs["logit_bias"] = {int(t): SUPPRESS_BIAS for t in suppress_token_ids}
    return kwargs


def to_generations(request_outputs: Sequence[Any], n: int) -> list[Generation]:
    """One `Generation` per vLLM `RequestOutput` (in prompt order, as `LLM.generate` returns them).

    Samples are ordered by `CompletionOutput.index`; a single output stands for n greedy samples.
    """
    generations: list[Generation] = []
    for request in request_outputs:
        outputs = sorted(request.outputs, key=lambda o: o.index)
        if len(outputs) == 1 and n > 1:
            outputs = outputs * n
        if len(outputs) != n:
            raise RuntimeError(f"vLLM returned {len(outputs)} samples for a prompt, expected {n}")
        generations.append(Generation(token_ids=[list(o.token_ids) for o in outputs], texts=[o.text for o in outputs]))
    return generations


def checkpoint_name(name: str) -> str:
    """The checkpoint name of a transformers-5 Qwen2.5-VL parameter name (see CHECKPOINT_PREFIXES)."""
    for new, saved in CHECKPOINT_PREFIXES:
        if name.startswith(new):
            return saved + name[len(new):]
    return name


@torch.no_grad()
def state_dict_for_vllm(model: torch.nn.Module, *, trainable_only: bool = False, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights as (checkpoint name, tensor) pairs for vLLM's checkpoint-format loader.

    Names are exactly the keys `save_pretrained` writes (tested against the saved safetensors). Only
    parameters: the rotary `inv_freq` buffers are not saved and vLLM builds its own. Tied weights appear
    once (`named_parameters` skips the second name of a shared Parameter, as `save_pretrained` skips a tied
    lm_head). Tensors are detached and contiguous; with `dtype`/`device` None they stay where the learner
    keeps them and share its storage (no copy): vLLM's loader copies them into its own parameters, casting
    as it goes. `trainable_only` drops frozen parameters (the vision tower in the paper's setting): vLLM
    then keeps its copy of those layers. Freeze whole modules only: vLLM's reload cannot take part of a layer.
    """
    pairs: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        tensor = param.detach()
        if dtype is not None or device is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        pairs.append((checkpoint_name(name), tensor.contiguous()))
    return pairs


def llm_kwargs_for(model_path: str | Path, *, pixels: dict[str, int], **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM`. `generation_config="vllm"`: the checkpoint's generation_config.json (a
    repetition_penalty, top_k, ...) is not loaded, so it can never change the sampling the loss assumes."""
    out = {"model": str(model_path), "limit_mm_per_prompt": {"image": 1, "video": 0}, "generation_config": "vllm",
           **kwargs}
    if pixels:
        out["mm_processor_kwargs"] = pixels
    return out


class VLLMEngine:
    """Engine protocol over a `vllm.LLM` loaded from a model folder (or hub id), with weight sync."""

    def __init__(self, model_path: str | Path, *, system_prompt: str | None, dtype: str = "bfloat16",
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 seed: int = 0, enable_prefix_caching: bool = True, min_pixels: int | None = None,
                 max_pixels: int | None = None, **llm_kwargs: Any) -> None:
        require_vllm()
        if tensor_parallel_size == 1:  # engine core in this process: sync_weights passes tensors by reference
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from transformers import GenerationConfig

        from noisyrollout.models.load import DTYPES, load_processor

        self._vllm = vllm
        self.system_prompt = system_prompt
        self.processor = load_processor(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.llm = vllm.LLM(**llm_kwargs_for(
            model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching, pixels=pixels, **llm_kwargs))
        tok = self.processor.tokenizer
        try:
            eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS
            eos = None
        eos = eos if eos is not None else tok.eos_token_id
        self.stop_token_ids = sorted(set(eos if isinstance(eos, list) else [eos]))
        self.suppress_ids = vision_token_ids(tok)
        self.weight_dtype = DTYPES.get(dtype)  # dtype of the weights written for a disk sync ("auto": as is)
        self.sync_via_disk = tensor_parallel_size > 1 or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        self._sync_dir: Path | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, system_prompt: str | None, **kwargs: Any) -> "VLLMEngine":
        return cls(path, system_prompt=system_prompt, **kwargs)

    accepts_encoded = False   # vLLM runs its own processor and vision tower on the images

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, encoded: Any = None) -> list[Generation]:
        if not prompts:
            return []
        requests = build_requests(self.processor, prompts, self.system_prompt)
        kwargs = sampling_kwargs(params, seed=None, stop_token_ids=self.stop_token_ids,
                                 suppress_token_ids=self.suppress_ids)
        outputs = self.llm.generate(requests, self._vllm.SamplingParams(**kwargs), use_tqdm=False)
        return to_generations(outputs, params.n)

    def sync_weights(self, model: torch.nn.Module, *, trainable_only: bool = False) -> None:
        """Push the learner's current weights into vLLM, then drop every cache computed with the old ones."""
        if self.sync_via_disk:  # worker processes: hand them a safetensors folder instead of tensors
            from safetensors.torch import save_file

            if self._sync_dir is None:
                self._sync_dir = Path(tempfile.mkdtemp(prefix="noisyrollout-vllm-sync-"))
            weights = state_dict_for_vllm(model, trainable_only=trainable_only, dtype=self.weight_dtype, device="cpu")
            save_file(dict(weights), str(self._sync_dir / "model.safetensors"))
            rpc_kwargs: dict[str, Any] = {"weights_path": str(self._sync_dir), "is_checkpoint_format": True}
        else:
            rpc_kwargs = {"weights_iterator": state_dict_for_vllm(model, trainable_only=trainable_only),
                          "is_checkpoint_format": True}
        self.llm.collective_rpc("reload_weights", kwargs=rpc_kwargs)
        self.reset_caches()

    def reset_caches(self) -> None:
        """Reset vLLM's encoder, multimodal-processor and prefix caches (after a weight change)."""
        engine = self.llm.llm_engine
        reset_encoder = getattr(engine, "reset_encoder_cache", None) or getattr(self.llm, "reset_encoder_cache", None)
        if reset_encoder is None:
            warnings.warn("this vLLM has no reset_encoder_cache: image features of the old weights may be reused",
                          stacklevel=2)
        else:
            reset_encoder()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()
