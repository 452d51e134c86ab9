"""NoisyRollout: GRPO for vision-language models with clean + distorted rollouts (arXiv 2504.13055).

The public API is the algorithm core; everything heavy (models, engines, orchestration) lives in submodules.

    anneal(step, total_steps, mode="sigmoid", coef=30.0, mid_step=40) -> float   decay factor of alpha0
    distort(image, kind="gaussian", strength=500, decay=1.0, generator=None)    -> PIL.Image
    group_advantages(rewards, groups, estimator="grpo")                         -> torch.Tensor
    score(response, ground_truth)                                               -> {"overall", "accuracy", "format"}
"""

from noisyrollout.algo.advantages import group_advantages
from noisyrollout.algo.augment import distort
from noisyrollout.algo.reward import score
from noisyrollout.algo.schedule import anneal

__all__ = ["anneal", "distort", "group_advantages", "score"]
__version__ = "0.1.0"
