"""NoisyRollout: GRPO for vision-language models with clean + distorted rollouts (arXiv 2504.13055).

The public API is the algorithm core; everything heavy (models, engines, orchestration) lives in submodules.

    anneal(step, total_steps, mode="sigmoid", coef=30.0, mid_step=40) -> float   decay factor of alpha0
    distort(image, kind="gaussian", strength=500, decay=1.0, generator=None)    -> PIL.Image
    group_advantages(rewards, groups, estimator="grpo")                         -> torch.Tensor
    score(response, ground_truth)                                               -> {"overall", "accuracy", "format"}
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562): `import noisyrollout` alone must not import torch, torchvision and math-verify,
# since every pipeline stage is a fresh `noisyrollout <stage>` process and most stages (prepare, the GX gate, the
# registry) need none of them.
_API = {"anneal": "noisyrollout.algo.schedule", "distort": "noisyrollout.algo.augment",
        "group_advantages": "noisyrollout.algo.advantages", "score": "noisyrollout.algo.reward"}

__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisyrollout' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
