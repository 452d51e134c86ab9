"""From a dataset problem (text with an `<image>` placeholder) to the chat the processor templates, and from there
to model inputs.

A step encodes its prompts once (`encode_prompts`: the processor, then the frozen vision tower with
`cache_image_features`); generation samples from that encoding and the log-prob passes reuse its clean half
(`prompt_batch` builds the left-padded model inputs of any subset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

IMAGE_PLACEHOLDER = "<image>"


def chat_messages(problem: str, system_prompt: str | None) -> list[dict[str, Any]]:
    """System + user turn; the image goes where `<image>` stands (first, if the problem has none)."""
    content: list[dict[str, Any]] = []
    parts = problem.split(IMAGE_PLACEHOLDER)
    if len(parts) == 1:
        content.append({"type": "image"})
    for i, part in enumerate(parts):
        if i > 0:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def chat_text(processor: Any, problem: str, system_prompt: str | None) -> str:
    """The templated prompt string, ending with the assistant header (generation prompt)."""
    return processor.apply_chat_template(chat_messages(problem, system_prompt), add_generation_prompt=True,
                                         tokenize=False)


def encode_chats(processor: Any, problems: Sequence[str], images: Sequence[Any], system_prompt: str | None) -> Any:
    """`processor(text=<chat of each problem>, images=images, padding=True)` (left padding as the tokenizer is set),
    templating and tokenizing each distinct (problem, image size) once.

    A noisy prompt is its clean twin's text with a distorted image of the same size: the same tokens (the image's
    token count depends only on its size), other pixels. The twins are tokenized once and only their images are
    processed apart, which gives the plain call's tensors (tests/test_step.py compares them).
    """
    from transformers import BatchFeature

    texts: dict[str, str] = {}
    for p in problems:
        if p not in texts:
            texts[p] = chat_text(processor, p, system_prompt)

    def plain() -> Any:
        return processor(text=[texts[p] for p in problems], images=list(images), padding=True, return_tensors="pt")

    keys = [(p, img.size) for p, img in zip(problems, images)]
    first: dict[tuple[str, tuple[int, int]], int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        return plain()
    reps = list(first.values())
    others = [i for i in range(len(keys)) if first[keys[i]] != i]
    enc = processor(text=[texts[problems[i]] for i in reps], images=[images[i] for i in reps], padding=True,
                    return_tensors="pt")
    extra = processor.image_processor(images=[images[i] for i in others], return_tensors="pt")
    grid = {i: g for i, g in zip(reps, enc["image_grid_thw"])} | {i: g for i, g in zip(others, extra["image_grid_thw"])}
    if any(not torch.equal(grid[i], grid[first[keys[i]]]) for i in others):   # a size-dependent processor: no sharing
        return plain()
    pixels = dict(zip(reps, torch.split(enc["pixel_values"], enc["image_grid_thw"].prod(-1).tolist())))
    pixels |= dict(zip(others, torch.split(extra["pixel_values"], extra["image_grid_thw"].prod(-1).tolist())))
    slot = {i: row for row, i in enumerate(reps)}                 # a representative's row in `enc`
    row = torch.tensor([slot[first[key]] for key in keys])
    out = {k: v[row] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw")}   # per-prompt rows
    out["pixel_values"] = torch.cat([pixels[i] for i in range(len(keys))])
    out["image_grid_thw"] = torch.stack([grid[i] for i in range(len(keys))])
    return BatchFeature(out)


@dataclass
class EncodedPrompts:
    """Processor output for a list of prompts, kept per prompt so responses can pick their prompt."""

    input_ids: list[torch.Tensor]       # one unpadded 1-D tensor per prompt
    pixel_values: list[torch.Tensor]    # one (patches, dim) tensor per prompt
    image_grid_thw: torch.Tensor        # (n_prompts, 3)
    features: list[torch.Tensor] | None = None   # cached vision-tower output per prompt (frozen tower only)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, index: Sequence[int]) -> "EncodedPrompts":
        """The prompts `index`, in that order (tensors shared, not copied)."""
        index = list(index)
        return EncodedPrompts(input_ids=[self.input_ids[i] for i in index],
                              pixel_values=[self.pixel_values[i] for i in index],
                              image_grid_thw=self.image_grid_thw[index],
                              features=None if self.features is None else [self.features[i] for i in index])


def cache_image_features(model: Any, prompts: EncodedPrompts) -> EncodedPrompts:
    """Run the (frozen) vision tower once per image; generation, every response of the prompt and every pass
    of the step (old log-probs, each update) then reuse the features instead of re-encoding the image."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.model.get_image_features(torch.cat(prompts.pixel_values).to(device),
                                             prompts.image_grid_thw.to(device), return_dict=True)
    prompts.features = [f.detach() for f in out.pooler_output]
    return prompts


def encode_prompts(processor: Any, images: Sequence[Any], problems: Sequence[str],
                   system_prompt: str | None) -> EncodedPrompts:
    """`encode_chats`, kept per prompt (unpadded ids, each image's patches)."""
    processor.tokenizer.padding_side = "left"
    enc = encode_chats(processor, problems, images, system_prompt)
    ids = [row[mask.bool()] for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    grid = enc["image_grid_thw"]
    pixels = list(torch.split(enc["pixel_values"], grid.prod(-1).tolist()))
    return EncodedPrompts(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)


def prompt_batch(prompts: EncodedPrompts, prompt_index: Sequence[int], *, pad_id: int,
                 image_token_id: int) -> dict[str, Any]:
    """Model inputs for the prompts `prompt_index`, left-padded to one width (no responses)."""
    width = max(len(prompts.input_ids[p]) for p in prompt_index)
    ids = torch.full((len(prompt_index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_index), width), dtype=torch.long)
    for row, p in enumerate(prompt_index):
        seq = prompts.input_ids[p]
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_token_id).int(),
                              "image_grid_thw": prompts.image_grid_thw[list(prompt_index)]}
    if prompts.features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[prompts.features[p] for p in prompt_index])}
    else:
        inputs["pixel_values"] = torch.cat([prompts.pixel_values[p] for p in prompt_index])
    return inputs


def to_device(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    """`inputs` with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
