"""The rollout-engine interface: what the trainer and the evaluator ask of a generator.

An engine turns chat prompts (one image + one question each) into sampled responses. Engines do
not know about rewards, groups or noise: the trainer decides which images (clean or distorted) go
in and how many samples each prompt gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from PIL import Image

if TYPE_CHECKING:
    from noisyrollout.rollout.chat import EncodedPrompts


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Prompt:
    """One multimodal prompt: an image and the user text (with or without an `<image>` placeholder)."""

    image: Image.Image
    text: str


@dataclass
class Generation:
    """The `n` responses of one prompt, as token ids (EOS included when emitted) and decoded text."""

    token_ids: list[list[int]]
    texts: list[str]


class Engine(Protocol):
    """Anything that can sample responses for a batch of prompts."""

    # True: `generate` samples from `encoded` when given (the trainer then encodes each step's prompts once and
    # reuses the encoding in its log-prob passes); False: it encodes the prompts itself and ignores `encoded`.
    accepts_encoded: bool

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 encoded: "EncodedPrompts | None" = None) -> list[Generation]:
        """Return one `Generation` per prompt, each with `params.n` responses. `encoded`: the same prompts, in
        order, already through the processor (and the frozen vision tower)."""
        ...
