"""A learner: one process holding a DeepSpeed-wrapped policy and its rollout engine, running NoisyRollout steps on
its shard of whole prompts (so every group, clean and noisy rollouts together, stays on one learner).

`launcher.py` makes this class a Ray actor; nothing here imports Ray. Gradients are averaged across learners by
DeepSpeed (ZeRO stage from params), so every learner ends each step with the same parameters.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from pathlib import Path
from typing import Any

import torch

from noisyrollout.config import Params
from noisyrollout.data.loaders import load_records
from noisyrollout.models.load import load_policy
from noisyrollout.rollout.hf_engine import HFEngine
from noisyrollout.train.metrics import RolloutScores, StepMetrics
from noisyrollout.train.loop import seed_everything
from noisyrollout.train.optim import adamw
from noisyrollout.train.step import PromptBatch, noisyrollout_step


class DeepSpeedOptimizer:
    """The `backward` / `step` / `lr` trio `noisyrollout_step` drives, on a DeepSpeed engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """All-reduce (ZeRO), clip, step, schedule, zero grads; returns the global pre-clip gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


def deepspeed_config(params: Params) -> dict[str, Any]:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,          # we call backward/step ourselves, once per mini-batch
        "gradient_accumulation_steps": 1,
        "gradient_clipping": params.train.max_grad_norm,
        "zero_optimization": {"stage": params.cluster.zero_stage},
        "zero_allow_untested_optimizer": True,        # a plain torch AdamW: nothing to compile on CPU
        "steps_per_print": 10**9,
    }
    if params.model.dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif params.model.dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


class Learner:
    """One rank. `setup` joins the process group and builds the DeepSpeed engine; `step` runs one step."""

    def __init__(self, rank: int, world_size: int, params: dict[str, Any], init_dir: str) -> None:
        self.rank, self.world_size = rank, world_size
        self.params = Params.model_validate(params)
        self.init_dir = init_dir
        torch.set_num_threads(self.params.cluster.cpus_per_learner)

    @staticmethod
    def rendezvous() -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return socket.gethostbyname(socket.gethostname()), port

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build the policy and its DeepSpeed engine; returns the dataset size."""
        params = self.params
        cuda = torch.cuda.is_available() and params.cluster.gpus_per_learner > 0
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0" if not cuda else str(self.rank))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        self.generator = seed_everything(params.seed + self.rank)
        self.processor, model, self.ref_model = load_policy(
            self.init_dir, dtype=params.model.dtype, min_pixels=params.data.min_pixels,
            max_pixels=params.data.max_pixels, freeze_vision=params.model.freeze_vision,
            with_reference=params.train.kl_coef > 0)
        optimizer, scheduler = adamw(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay,
                                     warmup_steps=params.train.warmup_steps, total_steps=params.train.steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(params))
        self.optimizer = DeepSpeedOptimizer(self.engine)
        self.rollout_engine = self._rollout_engine()
        self.records = load_records(str(params.data.prepared_dir), "train", min_pixels=params.data.min_pixels,
                                    max_pixels=params.data.max_pixels)
        return len(self.records)

    def _rollout_engine(self) -> Any:
        """HF generate on the live policy (CPU), or vLLM (GPU) whose weights `step` syncs after each update."""
        params, rollout = self.params, self.params.rollout
        if rollout.engine == "vllm":
            from noisyrollout.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(self.init_dir, system_prompt=params.model.system_prompt, dtype=params.model.dtype,
                              seed=params.seed + self.rank, min_pixels=params.data.min_pixels,
                              max_pixels=params.data.max_pixels)
        return HFEngine(self.engine.module, self.processor, system_prompt=params.model.system_prompt,
                        batch_size=params.train.prompts_per_step * (rollout.n_clean + rollout.n_noisy),
                        cache_vision=params.model.freeze_vision)

    def step(self, step: int, total_steps: int, indices: list[int]) -> tuple[StepMetrics, RolloutScores]:
        """One NoisyRollout step on this rank's whole prompts: `indices[rank::world_size]`."""
        chosen = [self.records[i] for i in indices[self.rank::self.world_size]]
        batch = PromptBatch(images=[r["image"] for r in chosen], problems=[r["problem"] for r in chosen],
                            answers=[r["answer"] for r in chosen])
        result = noisyrollout_step(step, total_steps, batch, model=self.engine.module, processor=self.processor,
                                   engine=self.rollout_engine, optimizer=self.optimizer, params=self.params,
                                   generator=self.generator, ref_model=self.ref_model)
        if hasattr(self.rollout_engine, "sync_weights"):
            self.rollout_engine.sync_weights(self.engine.module, trainable_only=self.params.model.freeze_vision)
        return result.metrics, result.scores

    def save(self, checkpoint_dir: str) -> None:
        """Collective: DeepSpeed state of every rank, this rank's RNG states; rank 0 also the HF policy."""
        out = Path(checkpoint_dir)
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "generator": self.generator.get_state()}, out / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            self.save_hf(str(out / "hf"))

    def load(self, checkpoint_dir: str) -> None:
        src = Path(checkpoint_dir)
        self.engine.load_checkpoint(str(src / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        rng = torch.load(src / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["generator"])

    def save_hf(self, out_dir: str) -> None:
        self.engine.module.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    def digest(self) -> str:
        """SHA-256 of every parameter's bytes: equal across ranks after a step."""
        h = hashlib.sha256()
        for name, p in sorted(self.engine.module.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def ping(self) -> int:
        return self.rank
