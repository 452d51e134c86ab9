"""From a dataset problem (text with an `<image>` placeholder) to the chat the processor templates."""

from __future__ import annotations

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
