"""The trainer on a two-node Ray cluster, on one machine: a head and a second node joining it (`ray start` on
127.0.0.1, one CPU and a custom resource each, so where each learner runs is observable), the 2 learners placed on
different nodes (`cluster.placement=spread`). The run ends bit-identical to the one-node run of the same seed; a node
lost mid-run (its raylet and processes killed) stops the driver within seconds, in one line naming the node and the learner, and `noisyrollout train`
again (on one node) resumes to the uninterrupted run's final parameters. The cluster is torn down by the PIDs this
test started, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.servers import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TOY = ["data.sizes={train: 48, val: 24, test: 24, ood: 24}", "model.tiny.vocab_size=400", "sft.steps=4",
       "sft.batch_size=8", "rollout.n_clean=2", "rollout.n_noisy=2", "rollout.max_new_tokens=8",
       "train.prompts_per_step=4", "train.lr=1e-3", "train.steps=4", "checkpoint.every=1", "tracking.enabled=false"]
PLACED = re.compile(r"^(learner-\d): node (\w+) \(([\d.]+); (node_head|node_worker)\)$", re.M)


def _flags(extra=()):
    return [x for o in (*TOY, *extra) for x in ("-S", o)]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _weights(run: Path) -> bytes:
    return (run / "model/model.safetensors").read_bytes()


class TwoNodeCluster:
    """`ray start --head` and one `ray start --address` on 127.0.0.1, each in the foreground (`--block`) in its own
    session, so that everything it starts can be found and killed by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray 2.60's `ray start --head` turns token authentication on: every process of the cluster and the driver
        # share one token (from the environment, so nothing is written to ~/.ray)
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    # a lost node is declared dead after ~2 s (Ray's defaults: 5 missed checks 3 s apart)
                    "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                    "RAY_health_check_failure_threshold": "4"}
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, *args: str) -> None:
        log = (self.workdir / f"ray-{name}.log").open("w")
        self.procs[name] = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                             "--num-cpus", "1", "--disable-usage-stats", *args], cwd=self.workdir,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> "TwoNodeCluster":
        self._start("head", "--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--resources", '{"node_head": 1}')
        self._wait_nodes(1)
        self._start("worker", "--address", self.address, "--resources", '{"node_worker": 1}')
        self._wait_nodes(2)
        return self

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() < n:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"ray start ({name}) exited: {(self.workdir / f'ray-{name}.log').read_text()[-2000:]}"
            assert time.time() < deadline, f"the cluster did not reach {n} node(s) in {timeout:.0f} s"
            time.sleep(1)

    def descendants(self, name: str) -> list[psutil.Process]:
        """Every live process of the `ray start` session `name` started (children and orphans alike: they keep the
        session id of the process this test started)."""
        leader = self.procs[name].pid
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != leader and os.getsid(p.pid) == leader and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return found

    def kill_worker_node(self) -> None:
        """The second node dies: its raylet first, then every other process of it (its learner among them), as when
        its machine goes down."""
        procs = self.descendants("worker")
        (raylet,) = [p for p in procs if p.name() == "raylet"]
        raylet.send_signal(signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs["worker"].kill()

    def stop(self) -> None:
        """Kill every process this cluster started: each `ray start` session and all its descendants."""
        for name, proc in self.procs.items():
            for victim in self.descendants(name):
                try:
                    victim.kill()
                except psutil.NoSuchProcess:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    old = Path.cwd()
    os.chdir(root)
    try:
        (root / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
        for stage in ("render-data", "prepare", "build-model", "sft"):
            assert CliRunner().invoke(app, [stage, *_flags()], catch_exceptions=False).exit_code == 0
        yield root
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def one_node_run(workdir):
    """The reference: the same seed on a local one-node Ray (placement pack)."""
    run = _train(workdir, {**os.environ, "OMP_NUM_THREADS": "1"}, "runs/one")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir / "runs/one"


@pytest.fixture
def cluster(workdir):
    c = TwoNodeCluster(workdir)
    try:
        yield c.start()
    finally:
        c.stop()
    assert not [p for n in c.procs for p in c.descendants(n)]


def _train(workdir: Path, env: dict, out: str, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "pipelines.cli", "train", *_flags([f"train.output_dir={out}", *extra])]
    if wait:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _placement(output: str) -> dict[str, tuple[str, str]]:
    return {learner: (node, kind) for learner, node, _ip, kind in PLACED.findall(output)}


def test_two_nodes_spread_the_learners_and_match_the_one_node_run(workdir, one_node_run, cluster):
    run = _train(workdir, cluster.env, "runs/two", f"cluster.address={cluster.address}", "cluster.placement=spread")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    placed = _placement(run.stdout)
    print("placement:", placed)
    assert sorted(placed) == ["learner-0", "learner-1"]
    assert len({node for node, _ in placed.values()}) == 2                   # two different nodes
    assert sorted(kind for _, kind in placed.values()) == ["node_head", "node_worker"]
    assert _weights(workdir / "runs/two") == _weights(one_node_run)            # bit-identical parameters
    assert _metrics(workdir / "runs/two") == _metrics(one_node_run)


def test_a_lost_node_stops_the_run_in_one_line_and_resume_finishes_it(workdir, one_node_run, cluster):
    victim = _train(workdir, cluster.env, "runs/lost", f"cluster.address={cluster.address}", "cluster.placement=spread",
                    "cluster.max_restarts=0", wait=False)   # self-healing is tests/reliability/test_self_healing.py
    try:
        deadline = time.time() + 600
        while not list((workdir / "runs/lost/checkpoints").glob("*/step_000001")):
            assert victim.poll() is None and time.time() < deadline, victim.communicate()[1][-3000:]
            time.sleep(0.2)
        cluster.kill_worker_node()
        killed = time.time()
        out, err = victim.communicate(timeout=120)
        stopped = time.time() - killed
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    print(f"driver stopped {stopped:.1f} s after the worker node was killed")
    assert victim.returncode == 2 and stopped < 30
    (on_worker,) = [learner for learner, (_, kind) in _placement(out).items() if kind == "node_worker"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"learner actor '{on_worker}'" in errors[0] and " died;" in errors[0], err[-3000:]
    node = _placement(out)[on_worker][0]
    assert f"node {node}" in errors[0]

    # again, on one node (a local Ray), from the last checkpoint
    resumed = _train(workdir, {**os.environ, "OMP_NUM_THREADS": "1"}, "runs/lost", "cluster.placement=pack")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert _weights(workdir / "runs/lost") == _weights(one_node_run)
    assert _metrics(workdir / "runs/lost") == _metrics(one_node_run)


def test_a_learner_that_cannot_write_the_storage_fails_at_start(workdir):
    run = _train(workdir, {**os.environ, "OMP_NUM_THREADS": "1"}, "runs/nostore", "cluster.storage=/proc/no-such-dir",
                 "cluster.num_learners=1", "train.prompts_per_step=2")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert re.search(r"learner-0: node \w+ \([\d.]+\) cannot write checkpoints to /proc/no-such-dir", errors[0])
