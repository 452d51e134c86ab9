"""The distributed trainer: builds (or joins) the Ray cluster, starts the learner actors, drives the steps.

    learners  = [Learner actor "learner-<r>" for r in range(num_learners)]   cluster.* in params.yaml
    each step = every learner runs noisyrollout_step on its whole prompts; DeepSpeed averages the gradients
    driver    = merges step metrics, logs them (metrics.jsonl, MLflow), writes atomic checkpoints

Global batch arithmetic: `train.prompts_per_step` prompts per step, split across learners by whole prompts
(learner r takes prompts r, r + W, r + 2W, ...); each prompt gets n_clean + n_noisy responses, all on one learner,
so group statistics stay local. Each learner splits its prompts into `train.mini_batches` updates; per update the
loss is the token-mean over that learner's responses and DeepSpeed averages gradients over the W learners.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.train import checkpoint
from noisyrollout.train.learner import Learner
from noisyrollout.train.loop import RLResult, batch_indices
from noisyrollout.train.metrics import MetricsLog, StepMetrics


class LearnerGroup:
    """The learner actors, called together; a dead actor surfaces as one error that names it."""

    def __init__(self, params: Params, init_dir: Path) -> None:
        import ray

        self.ray = ray
        cfg = params.cluster
        actor = ray.remote(Learner)
        self.names = [f"learner-{r}" for r in range(cfg.num_learners)]
        self.actors = [
            actor.options(name=name, num_cpus=cfg.cpus_per_learner, num_gpus=cfg.gpus_per_learner,
                          max_restarts=0, max_task_retries=0).remote(r, cfg.num_learners,
                                                                     params.model_dump(mode="json"), str(init_dir))
            for r, name in enumerate(self.names)
        ]
        master_addr, master_port = self.call_one(0, "rendezvous")
        self.num_records = self.call("setup", master_addr, master_port)[0]

    def call_one(self, rank: int, method: str, *args: Any) -> Any:
        return self._gather([getattr(self.actors[rank], method).remote(*args)], [rank])[0]

    def call(self, method: str, *args: Any) -> list[Any]:
        return self._gather([getattr(a, method).remote(*args) for a in self.actors], range(len(self.actors)))

    def _gather(self, refs: list, ranks: Sequence[int]) -> list[Any]:
        ray = self.ray
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            dead = [self.names[r] for r in range(len(self.actors)) if not self._alive(r)]
            if dead:
                raise NoisyRolloutError(f"learner actor {', '.join(repr(d) for d in dead)} died; the run stopped "
                                        f"(resume with checkpoint.resume=auto)") from None
            cause = getattr(exc, "cause", None)
            if isinstance(cause, NoisyRolloutError):
                raise NoisyRolloutError(str(cause)) from None
            first = str(exc).strip().splitlines()[-1][:500]
            raise NoisyRolloutError(f"a learner failed: {first}") from exc

    def _alive(self, rank: int) -> bool:
        try:
            self.ray.get(self.actors[rank].ping.remote(), timeout=10)
            return True
        except Exception:
            return False


def start_ray(params: Params) -> bool:
    """Join or start the cluster; True when this call started a local one (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    cfg = params.cluster
    env = {"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_learner), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                        "TOKENIZERS_PARALLELISM": "false"}}
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=env, log_to_driver=False)
        return False
    need = cfg.num_learners * cfg.cpus_per_learner
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1",
             runtime_env=env, log_to_driver=False, configure_logging=False)
    return True


def _resume_point(params: Params, root: Path, fingerprint: str) -> Path | None:
    """The checkpoint to continue from, if any; one written with other parameters is refused, never mixed in."""
    mode = params.checkpoint.resume
    if mode == "never":
        shutil.rmtree(root, ignore_errors=True)   # start over: this run's checkpoints replace the old ones
        return None
    path = checkpoint.latest(root) if mode == "auto" else Path(mode)
    if path is None:
        return None
    if not (path / checkpoint.STATE_FILE).is_file():
        raise NoisyRolloutError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    if checkpoint.read_state(path).get("fingerprint") != fingerprint:
        raise NoisyRolloutError(f"{path} was written with other parameters; choose another train.output_dir, or "
                                f"-S checkpoint.resume=never to start over (its checkpoints are then replaced)")
    return path


def _tracker(params: Params, run_id: str | None) -> Any:
    if not params.tracking.enabled:
        return None
    from noisyrollout.tracking import Tracker

    tracker = Tracker(params.tracking.experiment, run_name=Path(params.train.output_dir).name, run_id=run_id,
                      artifact_root=params.tracking.artifact_root)
    if run_id is None:
        tracker.log_params(params.model_dump(mode="json"))
        tracker.log_system_info()
    return tracker


def train_distributed(params: Params, init_dir: Path, *, progress: bool = True, log: Callable[[str], None] = print,
                      on_step: Callable[[StepMetrics], None] | None = None) -> RLResult:
    """NoisyRollout with `cluster.num_learners` DeepSpeed learners on Ray; resumable from checkpoints."""
    cfg = params.train
    if cfg.prompts_per_step < params.cluster.num_learners:
        raise NoisyRolloutError(f"train.prompts_per_step ({cfg.prompts_per_step}) must be at least "
                                f"cluster.num_learners ({params.cluster.num_learners}): learners take whole prompts")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl")
    fingerprint = checkpoint.params_fingerprint(params.model_dump(mode="json"))
    # one folder per parameter set: a sweep or a changed knob (dvc repro) starts fresh beside the old checkpoints
    # instead of mixing them in, and switching back resumes the old set
    ckpt_root = out_dir / "checkpoints" / fingerprint[:12]
    resume_from = _resume_point(params, ckpt_root, fingerprint)   # checked before any cluster starts
    started = start_ray(params)
    tracker = None
    try:
        group = LearnerGroup(params, init_dir)
        history: list[dict[str, Any]] = []
        start, run_id = 0, None
        if resume_from is not None:
            group.call("load", str(resume_from))
            state = checkpoint.read_state(resume_from)
            start, history, run_id = state["step"], state["metrics"], state.get("mlflow_run_id")
            log(f"resumed from {resume_from} at step {start}")
        metrics_log.rewrite(history)
        tracker = _tracker(params, run_id)
        bar = tqdm(range(start, cfg.steps), desc="rl", disable=not progress, initial=start, total=cfg.steps)
        for step in bar:
            indices = batch_indices(step, cfg.prompts_per_step, group.num_records, params.seed)
            parts = group.call("step", step, cfg.steps, indices)
            metrics = StepMetrics.merge([m for m, _ in parts], [s for _, s in parts])
            metrics_log.append(metrics)
            history.append(asdict(metrics))
            if tracker is not None:
                tracker.log_metrics(metrics.to_dict(), step=step)
            if on_step is not None:
                on_step(metrics)
            bar.set_postfix(clean=f"{metrics.reward_clean:.2f}", noisy=f"{metrics.reward_noisy:.2f}")
            if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
                (bar.write if progress else log)(metrics.line())
            every = params.checkpoint.every
            if every and ((step + 1) % every == 0 or step + 1 == cfg.steps):   # the last step too: rerun = no-op
                tmp = checkpoint.staging_dir(ckpt_root, step + 1)
                group.call("save", str(tmp))
                state = {"step": step + 1, "metrics": history, "time": time.time(), "fingerprint": fingerprint,
                         "mlflow_run_id": tracker.run_id if tracker is not None else None}
                checkpoint.commit(tmp, state, params.checkpoint.keep_last)
        model_dir = out_dir / "model"
        group.call_one(0, "save_hf", str(model_dir))
        run_id = None
        if tracker is not None:
            from noisyrollout.tracking import plot_metrics

            tracker.log_figure_png(plot_metrics(history, out_dir / "training.png"))
            tracker.log_artifact_dir(model_dir, "model")
            tracker.finish()
            run_id = tracker.run_id
        return RLResult(model_dir=model_dir, metrics=[StepMetrics(**m) for m in history], run_id=run_id)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
