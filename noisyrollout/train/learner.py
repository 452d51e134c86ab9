"""A learner: one process holding the policy, its optimizer and its rollout engine, running NoisyRollout steps on
its shard of whole prompts (so every group, clean and noisy rollouts together, stays on one learner).

Two back-ends behind the same methods, so `driver.py` drives either without knowing which:
    world_size 1, cluster.trainer=local   plain torch AdamW in the calling process (no Ray, no DeepSpeed)
    cluster.trainer=ray                   a DeepSpeed engine (ZeRO stage from params) in a Ray actor; gradients are
                                          averaged across learners, so all end each step with the same parameters

`launcher.py` makes this class a Ray actor; nothing here imports Ray.
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
from noisyrollout.train.batching import seed_everything, shard_prompts
from noisyrollout.train.metrics import RolloutScores, StepMetrics
from noisyrollout.train.optim import DeepSpeedOptimizer, TorchOptimizer, adamw
from noisyrollout.train.step import Collective, PromptBatch, noisyrollout_step


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


def dist_env(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """torch.distributed variables of a learner. LOCAL_RANK is 0: under Ray each GPU actor sees only its own
    device (CUDA_VISIBLE_DEVICES), which is cuda:0 inside the actor whatever the rank."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Learner:
    """One rank. `setup` builds the policy, optimizer and rollout engine (joining the process group when
    distributed); `step` runs one NoisyRollout step on this rank's prompts."""

    def __init__(self, rank: int, world_size: int, params: dict[str, Any], init_dir: str, *,
                 distributed: bool = True) -> None:
        self.rank, self.world_size, self.distributed = rank, world_size, distributed
        self.params = Params.model_validate(params)
        self.init_dir = init_dir
        if distributed:   # a Ray actor: its own process, its own thread budget
            torch.set_num_threads(self.params.cluster.cpus_per_learner)

    def setup(self, master_addr: str | None = None, master_port: int | None = None) -> int:
        """Build the policy and its optimizer (a DeepSpeed engine when distributed); returns the dataset size."""
        params = self.params
        self.generator = seed_everything(params.rl_seed + self.rank)
        self.processor, model, self.ref_model = load_policy(
            self.init_dir, dtype=params.model.dtype, min_pixels=params.data.min_pixels,
            max_pixels=params.data.max_pixels, freeze_vision=params.model.freeze_vision,
            with_reference=params.train.kl_coef > 0)
        train = params.train
        if self.distributed:
            cuda = torch.cuda.is_available() and params.cluster.gpus_per_learner > 0
            if not cuda:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.update(dist_env(self.rank, self.world_size, master_addr or "127.0.0.1", master_port or 0))
            import deepspeed

            if not cuda:
                # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init, used only by its
                # inference engine; training's collectives are gloo's. That compile took 24 s of the learner start
                # whenever torch's extension cache was stale (every other run here). `__compatible_ops__` is the
                # per-launch table DeepSpeed reads (edits persist, deepspeed/ops/__init__.py): mark the op unusable.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
            optimizer, scheduler = adamw(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                         betas=train.adam_betas, warmup_steps=train.warmup_steps,
                                         total_steps=train.steps)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=deepspeed_config(params))
            self.model = self.engine.module
            self.optimizer: Any = DeepSpeedOptimizer(self.engine)
            self.collective = Collective(self.world_size, device=self.engine.device)
        else:
            self.model = model
            self.optimizer = TorchOptimizer(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                            betas=train.adam_betas, warmup_steps=train.warmup_steps,
                                            total_steps=train.steps, max_grad_norm=train.max_grad_norm)
            self.collective = Collective(1)
        self.rollout_engine = self._rollout_engine()
        records = load_records(str(params.data.prepared_dir), "train", min_pixels=params.data.min_pixels,
                               max_pixels=params.data.max_pixels)
        self.records = records[params.rl_first_example(len(records)):]   # the SFT warm start's are not RL prompts
        return len(self.records)

    def _rollout_engine(self) -> Any:
        """HF generate on the live policy (CPU), or vLLM (GPU; its CPU build in `make test-vllm`), which loads the
        initial weights and gets the policy's after every optimizer step and after a resume (`load`)."""
        params, rollout = self.params, self.params.rollout
        if rollout.engine == "vllm":
            from noisyrollout.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(self.init_dir, system_prompt=params.model.system_prompt, dtype=params.model.dtype,
                              seed=params.rl_seed + self.rank, min_pixels=params.data.min_pixels,
                              max_pixels=params.data.max_pixels)
        return HFEngine(self.model, self.processor, system_prompt=params.model.system_prompt,
                        batch_size=params.train.prompts_per_step * (rollout.n_clean + rollout.n_noisy),
                        cache_vision=params.model.freeze_vision)

    def _sync_rollout_weights(self) -> None:
        """A rollout engine with its own copy of the weights (vLLM) gets the policy's current ones: with the vision
        tower frozen only the trainable (language-model) tensors, as the frozen ones never change."""
        if hasattr(self.rollout_engine, "sync_weights"):
            self.rollout_engine.sync_weights(self.model, trainable_only=self.params.model.freeze_vision)

    def step(self, step: int, total_steps: int, indices: list[int]) -> tuple[StepMetrics, RolloutScores]:
        """One NoisyRollout step on this rank's whole prompts of the step's `indices` (see batching.py)."""
        shards = shard_prompts(len(indices), self.world_size, self.params.train.mini_batches)[self.rank]
        chosen = [self.records[indices[i]] for chunk in shards for i in chunk]
        batch = PromptBatch(images=[r["image"] for r in chosen], problems=[r["problem"] for r in chosen],
                            answers=[r["answer"] for r in chosen])
        result = noisyrollout_step(step, total_steps, batch, model=self.model, processor=self.processor,
                                   engine=self.rollout_engine, optimizer=self.optimizer, params=self.params,
                                   generator=self.generator, ref_model=self.ref_model,
                                   mini_batch_sizes=[len(c) for c in shards], collective=self.collective)
        self._sync_rollout_weights()
        return result.metrics, result.scores

    def save(self, checkpoint_dir: str) -> None:
        """Collective: every rank's optimizer state and RNG states; rank 0 also the HF policy."""
        out = Path(checkpoint_dir)
        if self.distributed:
            self.engine.save_checkpoint(str(out / "deepspeed"), tag="state")
        else:
            (out / "torch").mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.optimizer.state_dict(),
                        "scheduler": self.optimizer.scheduler.state_dict()}, out / "torch" / "state.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "generator": self.generator.get_state()}, out / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            self.save_hf(str(out / "hf"))

    def load(self, checkpoint_dir: str) -> None:
        src = Path(checkpoint_dir)
        if self.distributed:
            self.engine.load_checkpoint(str(src / "deepspeed"), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        else:
            state = torch.load(src / "torch" / "state.pt", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.optimizer.load_state_dict(state["optimizer"])
            self.optimizer.scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(src / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["generator"])
        self._sync_rollout_weights()   # else the first resumed step would sample from the initial weights

    def save_hf(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    def digest(self) -> str:
        """SHA-256 of every parameter's bytes: equal across ranks after a step."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def ping(self) -> int:
        return self.rank
