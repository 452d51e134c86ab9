"""The vLLM engine's glue, on CPU without vLLM: requests, sampling mapping, outputs, weight names, the guard.

The engine class itself needs vLLM: a CUDA GPU with the official wheel, or vLLM's CPU build, where
tests/test_vllm_cpu.py runs it for real (`make test-vllm`). Here only what it is built from is exercised, with
the real tiny Qwen2.5-VL. The stand-in output classes below mimic the fields of vLLM's RequestOutput /
CompletionOutput that the engine reads, nothing else.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from noisyrollout.errors import NoisyRolloutError
from noisyrollout.models.load import load_model, load_processor, vision_tower
from noisyrollout.rollout import vllm_engine
from noisyrollout.rollout.engine import Prompt, SamplingParams
from noisyrollout.rollout.hf_engine import vision_token_ids
from noisyrollout.rollout.vllm_engine import (
    SampledGeneration,
    VLLMEngine,
    build_requests,
    llm_kwargs_for,
    platform_settings,
    require_vllm,
    sampling_kwargs,
    state_dict_for_vllm,
    to_generations,
)

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class FakeLogprob:  # stands in for vllm.logprobs.Logprob
    logprob: float


@dataclass
class FakeCompletion:  # stands in for vllm.outputs.CompletionOutput
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class FakeRequestOutput:  # stands in for vllm.outputs.RequestOutput
    outputs: list[FakeCompletion] = field(default_factory=list)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


def _saved_keys(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_requests_carry_the_chat_text_and_an_rgb_image(processor):
    gray = Image.new("L", (56, 56), 128)
    rgba = Image.new("RGBA", (56, 56), (255, 0, 0, 255))
    prompts = [Prompt(gray, "<image>How many shapes?"), Prompt(rgba, "Which colour is the largest shape?")]
    requests = build_requests(processor, prompts, "SYSTEM")
    assert len(requests) == 2
    for request, prompt in zip(requests, prompts):
        text = request["prompt"]
        assert text.count(VISION_BLOCK) == 1 and text.count("<|image_pad|>") == 1  # vLLM expands the pad itself
        assert text.startswith("<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.text.replace("<image>", "") in text
        image = request["multi_modal_data"]["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (56, 56)
    assert requests[1]["multi_modal_data"]["image"].getpixel((0, 0)) == (255, 0, 0)
    rgb = Image.new("RGB", (56, 56))
    assert build_requests(processor, [Prompt(rgb, "q")], None)[0]["multi_modal_data"]["image"] is rgb


def test_sampling_kwargs_sampled_and_greedy(processor):
    params = SamplingParams(n=6, temperature=1.0, top_p=0.9, max_new_tokens=32)
    assert sampling_kwargs(params, seed=7, stop_token_ids=[5, 3, 5]) == {
        "n": 6, "temperature": 1.0, "top_p": 0.9, "max_tokens": 32, "stop_token_ids": [3, 5],
        "skip_special_tokens": True, "seed": 7,
    }
    greedy = sampling_kwargs(SamplingParams(n=4, temperature=0.0, top_p=0.5, max_new_tokens=8), seed=None,
                             stop_token_ids=[3])
    assert greedy["n"] == 1 and greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and "seed" not in greedy
    suppress = vision_token_ids(processor.tokenizer)
    assert len(suppress) == 4
    biased = sampling_kwargs(params, seed=None, stop_token_ids=[3], suppress_token_ids=suppress)
    assert biased["logit_bias"] == {t: -100.0 for t in suppress}
    assert "logprobs" not in biased
    assert sampling_kwargs(params, seed=None, stop_token_ids=[3], logprobs=True)["logprobs"] == 0  # the sampled token's


def test_to_generations_orders_samples_and_replicates_greedy():
    sampled = [FakeRequestOutput([FakeCompletion(1, (7, 8, 2), "b"), FakeCompletion(0, (5, 2), "a")]),
               FakeRequestOutput([FakeCompletion(0, (9,), "c"), FakeCompletion(1, (4, 4), "d")])]
    gens = to_generations(sampled, 2)
    assert [g.token_ids for g in gens] == [[[5, 2], [7, 8, 2]], [[9], [4, 4]]]
    assert [g.texts for g in gens] == [["a", "b"], ["c", "d"]]
    assert all(isinstance(ids, list) for g in gens for ids in g.token_ids)
    greedy = to_generations([FakeRequestOutput([FakeCompletion(0, (5, 2), "a")])], 3)
    assert greedy[0].token_ids == [[5, 2]] * 3 and greedy[0].texts == ["a"] * 3
    assert to_generations([], 2) == []
    with pytest.raises(RuntimeError, match="2 samples"):
        to_generations([FakeRequestOutput([FakeCompletion(0, (1,), "x"), FakeCompletion(1, (2,), "y")])], 3)


def test_to_generations_carries_each_sampled_tokens_logprob():
    steps = [{7: FakeLogprob(-0.5)}, {8: FakeLogprob(-1.25), 3: FakeLogprob(-0.1)}]   # the sampled token + others
    outputs = [FakeRequestOutput([FakeCompletion(1, (9,), "b", [{9: FakeLogprob(-2.0)}]),
                                  FakeCompletion(0, (7, 8), "a", steps)])]
    gens = to_generations(outputs, 2, logprobs=True)
    assert isinstance(gens[0], SampledGeneration)
    assert gens[0].token_ids == [[7, 8], [9]] and gens[0].logprobs == [[-0.5, -1.25], [-2.0]]
    assert not isinstance(to_generations(outputs, 2)[0], SampledGeneration)
    with pytest.raises(RuntimeError, match="no logprobs"):
        to_generations([FakeRequestOutput([FakeCompletion(0, (1,), "x")])], 1, logprobs=True)


def test_weight_names_are_the_saved_checkpoint_keys(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    pairs = state_dict_for_vllm(model)
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names))
    saved = _saved_keys(tiny_model_dir)
    assert set(names) == set(saved)
    # and after one more save_pretrained round trip of the loaded (transformers-5 named) model
    model.save_pretrained(tmp_path)
    resaved = _saved_keys(tmp_path)
    assert set(names) == set(resaved)
    assert any(n.startswith("model.layers.0.") for n in names) and any(n.startswith("visual.") for n in names)
    assert "lm_head.weight" not in names  # tied to the embeddings: sent (and saved) once
    for name, tensor in pairs:
        assert not tensor.requires_grad and tensor.is_contiguous()
        assert torch.equal(tensor, resaved[name])
    embed = dict(pairs)["model.embed_tokens.weight"]
    assert embed.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # no copy by default
    cast = dict(state_dict_for_vllm(model, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in cast.values()) and set(cast) == set(names)


def test_trainable_only_drops_the_frozen_vision_tower(tiny_model_dir):
    model = load_model(tiny_model_dir)
    all_names = {n for n, _ in state_dict_for_vllm(model)}
    vision_tower(model).requires_grad_(False)
    names = {n for n, _ in state_dict_for_vllm(model, trainable_only=True)}
    assert names == {n for n in all_names if not n.startswith("visual.")}
    assert len(names) < len(all_names) and {n for n, _ in state_dict_for_vllm(model)} == all_names


def test_require_vllm_explains_what_to_do(monkeypatch, tiny_model_dir):
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(NoisyRolloutError, match=r"pip install '\.\[gpu\]'"):
            require_vllm()
        with pytest.raises(NoisyRolloutError, match="not installed"):
            VLLMEngine(tiny_model_dir, system_prompt=None)
    # vllm present but no GPU and not a CPU build (an official wheel on a CPU machine): the CPU hint, one line
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_engine, "vllm_platform", lambda: None)
    with pytest.raises(NoisyRolloutError, match="rollout.engine: hf") as err:
        require_vllm()
    assert "\n" not in str(err.value) and "make test-vllm" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the official wheel with a GPU
    assert require_vllm() == "cuda"
    monkeypatch.setattr(vllm_engine, "vllm_platform", lambda: "cpu")  # vLLM's CPU build: allowed, with or without GPU
    assert require_vllm() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert require_vllm() == "cpu"


def test_vllm_platform_is_none_without_a_usable_vllm(monkeypatch):
    if importlib.util.find_spec("vllm") is None:
        assert vllm_engine.vllm_platform() is None
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)   # present but broken: `from vllm.platforms` fails
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    assert vllm_engine.vllm_platform() is None


def test_platform_settings_keep_the_gpu_defaults_and_fit_the_cpu_build():
    gpu, gpu_env = platform_settings("cuda", dtype=None, max_model_len=None, enforce_eager=None,
                                     gpu_memory_utilization=0.5)
    assert gpu == {"dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.5} and gpu_env == {}
    eager, _ = platform_settings("cuda", dtype="float32", max_model_len=2048, enforce_eager=True,
                                 gpu_memory_utilization=0.7)
    assert eager == {"dtype": "float32", "max_model_len": 2048, "gpu_memory_utilization": 0.7, "enforce_eager": True}
    cpu, cpu_env = platform_settings("cpu", dtype=None, max_model_len=None, enforce_eager=None,
                                     gpu_memory_utilization=0.5)
    assert cpu == {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                   "worker_extension_cls": "noisyrollout.rollout.vllm_engine.WorkerExtension"}
    assert cpu_env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    given, _ = platform_settings("cpu", dtype="bfloat16", max_model_len=512, enforce_eager=False,
                                 gpu_memory_utilization=0.5)
    assert given["dtype"] == "bfloat16" and given["max_model_len"] == 512 and given["enforce_eager"] is False
    assert callable(vllm_engine.WorkerExtension.repack_cpu_vocab_matrices)


def test_module_import_does_not_import_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` now raises ImportError
    spec = importlib.util.spec_from_file_location("vllm_engine_probe", vllm_engine.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm_engine_probe", module)   # dataclasses look their module up there
    spec.loader.exec_module(module)  # a fresh copy of the module imports cleanly
    assert callable(module.require_vllm)


def test_llm_ignores_the_checkpoints_generation_config():
    kwargs = llm_kwargs_for("m", pixels={"max_pixels": 4096}, dtype="bfloat16", seed=3)
    assert kwargs["generation_config"] == "vllm"     # vLLM defaults; generation_config.json is not loaded
    assert kwargs["model"] == "m" and kwargs["mm_processor_kwargs"] == {"max_pixels": 4096} and kwargs["seed"] == 3
