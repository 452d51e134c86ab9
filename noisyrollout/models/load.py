"""Loading a policy exactly as one loads Qwen/Qwen2.5-VL-7B-Instruct: AutoProcessor + AutoModelForImageTextToText."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from noisyrollout.errors import NoisyRolloutError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_model(path: str | Path) -> None:
    """A local folder or a hub id (owner/name); anything else fails at once, before a download is tried."""
    if not Path(path).exists() and not HUB_ID.match(str(path)):
        raise NoisyRolloutError(f"{path}: no such model folder (and not a hub id owner/name); run the previous stage first")


def _load(loader: Any, path: str | Path, **kwargs: Any) -> Any:
    require_model(path)
    try:
        return loader.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NoisyRolloutError(f"{path}: cannot load a model/processor from here ({first})") from None


def load_processor(path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    from transformers import AutoProcessor

    processor = _load(AutoProcessor, path)
    image_processor = processor.image_processor
    if min_pixels is not None or max_pixels is not None:  # Qwen2-VL processors: size = pixel-count bounds
        size = dict(image_processor.size)
        size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
        size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
        image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(path: str | Path, *, dtype: str = "float32") -> Any:
    from transformers import AutoModelForImageTextToText

    return _load(AutoModelForImageTextToText, path, dtype=DTYPES[dtype])


def vision_tower(model: Any) -> torch.nn.Module:
    """The vision encoder of a Qwen2.5-VL-style model (`model.model.visual` in transformers 5)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if tower is None:
        raise AttributeError(f"{type(model).__name__} has no vision tower named `visual`")
    return tower


def load_policy(path: str | Path, *, dtype: str, min_pixels: int | None, max_pixels: int | None,
                freeze_vision: bool, with_reference: bool) -> tuple[Any, Any, Any | None]:
    """(processor, policy in train mode, frozen copy as reference or None) for RL from `path`."""
    import copy

    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    model = load_model(path, dtype=dtype).train()
    if freeze_vision:
        vision_tower(model).requires_grad_(False)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if with_reference else None
    return processor, model, reference
