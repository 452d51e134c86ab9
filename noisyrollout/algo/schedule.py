"""Noise annealing: the decay factor that scales the distortion strength over training.

alpha_t = alpha0 * decay(step, total_steps). With u = step / total_steps (SPEC section 3):

    none     1
    linear   1 - u
    pow      1 - u ** coef
    exp      1 - coef ** (total_steps - step)
    sigmoid  1 - 1 / (1 + exp(-coef * (u - mid_step / total_steps)))   (the paper's choice; coef 30, mid 40)
"""

from __future__ import annotations

import math
from typing import Literal

AnnealMode = Literal["none", "linear", "pow", "exp", "sigmoid"]
ANNEAL_MODES: tuple[str, ...] = ("none", "linear", "pow", "exp", "sigmoid")


def anneal(step: int, total_steps: int, mode: AnnealMode = "sigmoid", coef: float = 30.0,
           mid_step: float = 40) -> float:
    """Decay factor in [0, 1] at `step` of `total_steps` (multiply it by alpha0)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    u = step / total_steps
    if mode == "none":
        return 1.0
    if mode == "linear":
        return 1.0 - u
    if mode == "pow":
        return 1.0 - u**coef
    if mode == "exp":
        return 1.0 - coef ** (total_steps - step)
    if mode == "sigmoid":
        z = -coef * (u - mid_step / total_steps)
        # 1 - sigmoid(-z) written to stay finite for large |z|
        return 1.0 - 1.0 / (1.0 + math.exp(z)) if z < 700 else 1.0
    raise ValueError(f"unknown anneal mode {mode!r}; choose one of {', '.join(ANNEAL_MODES)}")
