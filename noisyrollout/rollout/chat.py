"""From a dataset problem (text with an `<image>` placeholder) to the chat the processor templates."""

from __future__ import annotations

from typing import Any

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
