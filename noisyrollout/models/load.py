"""Loading a policy exactly as one loads Qwen/Qwen2.5-VL-7B-Instruct: AutoProcessor + AutoModelForImageTextToText."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_processor(path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    from transformers import AutoProcessor

    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = AutoProcessor.from_pretrained(str(path), **kwargs)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(path: str | Path, *, dtype: str = "float32") -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=DTYPES[dtype])


def vision_tower(model: Any) -> torch.nn.Module:
    """The vision encoder of a Qwen2.5-VL-style model (`model.model.visual` in transformers 5)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if tower is None:
        raise AttributeError(f"{type(model).__name__} has no vision tower named `visual`")
    return tower
