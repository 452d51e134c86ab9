"""The Ray learner group: builds (or joins) the Ray cluster and drives W DeepSpeed learner actors together.

    learners  = [RayLearner actor for r in range(cluster.num_learners)]   cluster.* in params.yaml
    rendezvous: rank 0's Ray node IP and a free port on it (gloo on CPU, nccl on GPU)
    each call = the same method on every learner; the first failure is reported as the run's error (a peer
                blocked in a collective would otherwise surface later as a timeout), and every actor is killed
    close     = kill the actors (on an external cluster too), shut down a cluster this group started

The batch arithmetic (which learner gets which prompts) is in batching.py, the loss normalisation in step.py.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.errors import NoisyRolloutError
from noisyrollout.timing import overhead
from noisyrollout.train.learner import Learner, free_port
from noisyrollout.train.metrics import StepMetrics


class RayLearner(Learner):
    """A learner as a Ray actor: also reports where it runs (for the rendezvous) and its peak memory."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()   # routable; gethostbyname(gethostname()) may be 127.0.1.1

    def free_port(self) -> int:
        return free_port()

    def peak_rss_mb(self) -> float:
        """This learner process's peak resident memory (MB): what one learner needs."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


class RayGroup:
    """The learner actors of one run, called together; see the module docstring."""

    def __init__(self, params: Params, init_dir: Path, learner_cls: type[RayLearner] = RayLearner) -> None:
        import ray

        self.ray = ray
        with overhead("train: start learners: Ray"):
            self.started = start_ray(params)
        cfg = params.cluster
        run = uuid.uuid4().hex[:8]   # actor names unique per run: two runs can share an external cluster
        self.names = [f"learner-{r}" for r in range(cfg.num_learners)]
        self.actors: list[Any] = []
        try:
            actor = ray.remote(learner_cls)
            with overhead("train: start learners: actor processes"):
                for r, name in enumerate(self.names):
                    self.actors.append(actor.options(
                        name=f"noisyrollout-{run}-{name}", num_cpus=cfg.cpus_per_learner,
                        num_gpus=cfg.gpus_per_learner, max_restarts=0, max_task_retries=0,
                    ).remote(r, cfg.num_learners, params.model_dump(mode="json"), str(init_dir)))
                master_addr, master_port = self._gather([self.actors[0].node_ip.remote(),
                                                         self.actors[0].free_port.remote()], [0, 0])
            with overhead("train: start learners: setup (policy, DeepSpeed, data)"):
                self.num_records = self.call("setup", master_addr, master_port)[0]
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args: Any) -> list[Any]:
        return self._gather([getattr(a, method).remote(*args) for a in self.actors], range(len(self.actors)))

    def _gather(self, refs: list, ranks: Any) -> list[Any]:
        """Results in order; the first learner to fail stops the call with its own error (the root cause)."""
        ray, ranks = self.ray, list(ranks)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                name = self.names[ranks[refs.index(done[0])]]
                self.close()   # peers may be blocked in a collective with the failed learner
                raise self._root_cause(name, exc) from None
        return ray.get(refs)

    def _root_cause(self, name: str, exc: Exception) -> NoisyRolloutError:
        ray = self.ray
        if isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError):
            return NoisyRolloutError(f"learner actor {name!r} died; the run stopped (resume with "
                                     f"checkpoint.resume=auto)")
        cause = getattr(exc, "cause", None)
        if isinstance(cause, NoisyRolloutError):
            return NoisyRolloutError(f"{name}: {cause}")
        if cause is not None:
            return NoisyRolloutError(f"{name} failed: {type(cause).__name__}: {str(cause).strip()[:500]}")
        return NoisyRolloutError(f"{name} failed: {str(exc).strip().splitlines()[-1][:500]}")

    def step(self, step: int, total_steps: int, indices: list[int]) -> StepMetrics:
        parts = self.call("step", step, total_steps, indices)
        return StepMetrics.merge([m for m, _ in parts], [s for _, s in parts])

    def save(self, checkpoint_dir: Path) -> None:
        self.call("save", str(checkpoint_dir))

    def load(self, checkpoint_dir: Path) -> None:
        self.call("load", str(checkpoint_dir))

    def save_hf(self, out_dir: Path) -> None:
        self._gather([self.actors[0].save_hf.remote(str(out_dir))], [0])

    def close(self) -> None:
        """Kill the actors (whatever cluster they run on), then shut down a cluster this group started."""
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:   # already dead
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
