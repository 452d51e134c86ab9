"""The Ray learner group: builds (or joins) the Ray cluster and drives W DeepSpeed learner actors together.

    learners  = [RayLearner actor for r in range(cluster.num_learners)]   cluster.* in params.yaml
    placement = one bundle per learner in a placement group: PACK, or STRICT_SPREAD (one learner per node)
    rendezvous: rank 0's Ray node IP and a free port on it (gloo on CPU, nccl on GPU)
    each call = the same method on every learner; the first failure is reported as the run's error (a peer
                blocked in a collective would otherwise surface later as a timeout), and every actor is killed;
                a dead learner raises LearnerLost, which the driver heals (cluster.max_restarts)
    close     = kill the actors (on an external cluster too), shut down a cluster this group started

The batch arithmetic (which learner gets which prompts) is in batching.py, the loss normalisation in step.py.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from noisyrollout.config import Params
from noisyrollout.errors import LearnerLost, NoisyRolloutError
from noisyrollout.timing import overhead
from noisyrollout.train.checkpoint import check_writable, checkpoints_root
from noisyrollout.train.learner import Learner, free_port
from noisyrollout.train.metrics import StepMetrics


ROOT_CAUSE_GRACE_S = 10.0   # how long a failed call waits for a dead learner to be reported (see RayGroup._failure)
# What a learner's error says when a peer in its collective died (gloo/nccl connection reset): then, and only then,
# the failed call waits for Ray to report the dead learner, the root cause.
PEER_LOST = ("connection reset", "connection closed", "connection refused", "broken pipe", "gloo", "nccl", "timed out")


class RayLearner(Learner):
    """A learner as a Ray actor: also reports where it runs (for the rendezvous) and its peak memory."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()   # routable; gethostbyname(gethostname()) may be 127.0.1.1

    def node(self) -> dict[str, str]:
        """Where this learner runs: its Ray node's id and IP; and a check that it can write the checkpoints."""
        import ray

        node = {"node_id": ray.get_runtime_context().get_node_id(), "ip": self.node_ip()}
        check_writable(checkpoints_root(self.params), f"node {node['node_id'][:8]} ({node['ip']})")
        return node

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
    with _loopback_only():
        ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=cfg.dashboard,
                 dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=False, configure_logging=False)
    return True


# Ray's single-node switch (the default on macOS and Windows): the node's IP is 127.0.0.1, so the GCS, raylet, workers
# and agents listen on loopback only instead of on every interface. Set it to 1 yourself to opt out.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local cluster starts: Ray's single-node mode, unless the environment chose. Ray reads the variable at
    import (so the constant is set too, for a driver that imported ray first); the processes the start spawns inherit
    it; afterwards the driver's environment is as it was, so a later `cluster.address` run is not affected."""
    from ray._private import ray_constants

    if SINGLE_NODE_ENV in os.environ:
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.pop(SINGLE_NODE_ENV, None)
        ray_constants.ENABLE_RAY_CLUSTER = before


class RayGroup:
    """The learner actors of one run, called together; see the module docstring."""

    def _place(self, cfg: Any) -> Any:
        """A placement group with one bundle per learner: PACK (`cluster.placement: pack`) or STRICT_SPREAD (`spread`,
        one learner per node). A cluster that cannot hold it stops the run after `cluster.placement_timeout_s`, in one
        line saying what it has."""
        ray = self.ray
        bundle = {"CPU": float(cfg.cpus_per_learner), **({"GPU": float(cfg.gpus_per_learner)} if cfg.gpus_per_learner else {})}
        strategy = "STRICT_SPREAD" if cfg.placement == "spread" else "PACK"
        pg = placement_group([dict(bundle) for _ in range(cfg.num_learners)], strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            alive = [n for n in ray.nodes() if n.get("Alive")]
            have = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU"
                             f"{', %g GPU' % n['Resources']['GPU'] if n['Resources'].get('GPU') else ''})" for n in alive)
            raise NoisyRolloutError(
                f"cannot place {cfg.num_learners} learners with {bundle} each ({strategy}, cluster.placement="
                f"{cfg.placement}) within {cfg.placement_timeout_s:g} s; the cluster has {len(alive)} node(s): {have}")
        return pg

    def _describe_placement(self) -> list[str]:
        """'learner-r: node <id> (<ip>; <custom resources>)' per learner, from Ray's node table."""
        table = {n["NodeID"]: n for n in self.ray.nodes()}
        lines = []
        for name, node in zip(self.names, self.nodes):
            resources = table.get(node["node_id"], {}).get("Resources", {})
            custom = sorted(k for k in resources if k not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not k.startswith(("node:", "accelerator_type:")))
            lines.append(f"{name}: node {node['node_id'][:8]} ({node['ip']}" + (f"; {', '.join(custom)}" if custom else "")
                         + ")")
        return lines

    def __init__(self, params: Params, init_dir: Path, learner_cls: type[RayLearner] = RayLearner) -> None:
        import ray

        self.ray = ray
        with overhead("train: start learners: Ray"):
            self.started = start_ray(params)
        cfg = params.cluster
        run = uuid.uuid4().hex[:8]   # actor names unique per run: two runs can share an external cluster
        self.names = [f"learner-{r}" for r in range(cfg.num_learners)]
        self.actors: list[Any] = []
        self.nodes: list[dict[str, str]] = []
        self.placement: list[str] = []   # one line per learner: where it runs (the driver prints them)
        self.pg = None
        try:
            actor = ray.remote(learner_cls)
            with overhead("train: start learners: actor processes"):
                self.pg = self._place(cfg)
                for r, name in enumerate(self.names):
                    self.actors.append(actor.options(
                        name=f"noisyrollout-{run}-{name}", num_cpus=cfg.cpus_per_learner,
                        num_gpus=cfg.gpus_per_learner, max_restarts=0, max_task_retries=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                    ).remote(r, cfg.num_learners, params.model_dump(mode="json"), str(init_dir)))
                self.nodes = self.call("node")
                self.placement = self._describe_placement()
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
        """Results in order; a failed learner stops the call with its own error (the root cause, see `_failure`)."""
        ray, ranks = self.ray, list(ranks)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                error = self._root_cause(*self._failure(refs, ranks, done[0], exc, pending))
                self.close()   # peers may be blocked in a collective with the failed learner
                raise error from None
        return ray.get(refs)

    def _failure(self, refs: list, ranks: list, first: Any, exc: Exception, pending: list) -> tuple[str, Exception]:
        """(learner, error) to report. A learner that died, or whose node was lost, is the root cause even when a
        peer failed first: a peer in a collective with a dead process fails at once (its connection is reset),
        while Ray reports the death only after its health checks. So the other calls get ROOT_CAUSE_GRACE_S to
        fail too, and a dead learner (or one on a dead node) wins over a task error. An error of the learner's own
        (not a lost peer's symptom, `PEER_LOST`) is reported at once."""
        ray = self.ray
        failures = [(ranks[refs.index(first)], exc)]
        peer_lost = any(word in str(exc).lower() for word in PEER_LOST)
        if pending and isinstance(exc, ray.exceptions.RayTaskError) and peer_lost:
            deadline = time.monotonic() + ROOT_CAUSE_GRACE_S
            while pending and time.monotonic() < deadline:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.01))
                for ref in done:
                    try:
                        ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as other:
                        failures.append((ranks[refs.index(ref)], other))
                if any(not isinstance(e, ray.exceptions.RayTaskError) for _, e in failures) or self._lost_nodes():
                    break
        died = [(r, e) for r, e in failures if not isinstance(e, ray.exceptions.RayTaskError)]
        lost = self._lost_nodes()
        on_lost = [(r, ray.exceptions.RayActorError()) for r, node in enumerate(self.nodes) if node["node_id"] in lost]
        rank, cause = (died or on_lost or failures)[0]
        return self.names[rank], cause

    def _lost_nodes(self) -> set[str]:
        """Ids of the learners' nodes that Ray has declared dead."""
        if not self.nodes:
            return set()
        try:
            alive = {n["NodeID"]: n.get("Alive") for n in self.ray.nodes()}
        except Exception:   # the cluster itself is gone
            return set()
        return {node["node_id"] for node in self.nodes if alive.get(node["node_id"]) is False}

    def _root_cause(self, name: str, exc: Exception) -> NoisyRolloutError:
        ray = self.ray
        if isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError):
            rank = self.names.index(name)
            where = ""
            if rank < len(self.nodes):
                node = self.nodes[rank]
                lost = node["node_id"] in self._lost_nodes() or "its node has died" in str(exc).lower()
                where = f" on node {node['node_id'][:8]} ({node['ip']})" + (", which was lost," if lost else "")
            return LearnerLost(f"learner actor {name!r}{where} died")
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
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:   # the cluster is gone
                pass
            self.pg = None
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
