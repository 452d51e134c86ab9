"""Shared fixtures: a small rendered corpus and a freshly built tiny Qwen2.5-VL (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from noisyrollout.data.synthetic import build_corpus, save_corpus

    out = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(seed=0, image_size=56, sizes={"train": 90, "val": 30, "test": 30, "ood": 30}, progress=False)
    save_corpus(corpus, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_dir) -> Path:
    from noisyrollout.config import SYSTEM_PROMPT, TinyModelConfig
    from noisyrollout.data.loaders import load_examples
    from noisyrollout.models.tiny import create_embedded_model

    train = load_examples(str(corpus_dir), split="train")
    texts = [SYSTEM_PROMPT, *train["problem"], *train["solution"]]
    out = tmp_path_factory.mktemp("tiny_model")
    create_embedded_model(texts, TinyModelConfig(vocab_size=400), out, seed=0)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray for one test module; the trainer sees it as an external cluster (it did not start it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()
