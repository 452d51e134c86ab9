"""Nothing listens beyond this machine unless told to (issue #25, case 7).

Each server is started for real and the listening sockets of its whole process tree are read with psutil: the MLflow
UI as the docs start it (`mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1`, and with no --host),
the Prefect API server (`prefect server start` with the project's Prefect defaults, and the ephemeral one that
`noisyrollout flow` starts), and the local Ray cluster the trainer starts with `cluster.dashboard: true`
(`launcher.start_ray`). Every address must be loopback (127.0.0.0/8, ::1, ::ffff:127.x), never 0.0.0.0, :: or the
host's own address. The documented ways to bind elsewhere (`mlflow ui --host 0.0.0.0`, PREFECT_SERVER_API_HOST)
must still work. The Ray start runs with the secrets of test_secrets in its environment, and Ray's session folder
and HOME are searched for them afterwards.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability.test_secrets import Secrets
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket in LISTEN and every bound UDP socket of `pid` and all the
    processes below it."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            for c in proc.net_connections(kind="inet"):
                if c.laddr and (c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr)):
                    found.append((name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(set(found))


def exposed(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [s for s in sockets if not is_loopback(s[1])]


def _env(**extra: str) -> dict[str, str]:
    """This environment without the variables that would choose a host for the servers under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "OMP_NUM_THREADS": "1", **extra}


# -- MLflow UI -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("host, loopback", [(None, True), ("127.0.0.1", True), ("0.0.0.0", False)],
                         ids=["default", "docs", "told-otherwise"])
def test_mlflow_ui_binds_loopback_unless_told_otherwise(tmp_path, host, loopback):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlruns.db'}", "--port", str(port),
           "--workers", "1", *(["--host", host] if host else [])]
    start = time.monotonic()
    with running(cmd, ready=f"http://127.0.0.1:{port}/health", log=tmp_path / "ui.log", cwd=tmp_path,
                 env=_env()) as proc:
        sockets = listening(proc.pid)
    print(f"\nmlflow ui --host {host}: {time.monotonic() - start:.1f} s to healthy; {sockets}")
    assert any(p == port for _, _, p in sockets), sockets
    if loopback:
        assert exposed(sockets) == [], sockets
    else:
        assert [ip for _, ip, p in sockets if p == port] == ["0.0.0.0"], sockets


# -- Prefect -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefect_server_binds_loopback(tmp_path):
    """`prefect server start` (no --host) with the settings the project's flow applies (`pipelines.flow.prefect_env`)."""
    from pipelines.flow import prefect_env

    port = free_port()
    env = _env(**prefect_env(), PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_UI_ENABLED="false")
    start = time.monotonic()
    with running([str(BIN / "prefect"), "server", "start", "--port", str(port)], ready=f"http://127.0.0.1:{port}/api/health",
                 log=tmp_path / "server.log", cwd=tmp_path, env=env) as proc:
        sockets = listening(proc.pid)
    print(f"\nprefect server start: {time.monotonic() - start:.1f} s to healthy; {sockets}")
    assert any(p == port for _, _, p in sockets) and exposed(sockets) == [], sockets


EPHEMERAL = textwrap.dedent("""
    import json, os, psutil
    import pipelines.flow   # the project's Prefect defaults, as `noisyrollout flow` applies them
    from prefect import get_client
    with get_client(sync_client=True) as client:
        client.hello()
        me = psutil.Process()
        sockets = [(p.name(), c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
                   for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        print("SOCKETS " + json.dumps({"api": str(client.api_url), "sockets": sockets}))
""")


@pytest.mark.slow
def test_the_ephemeral_prefect_server_of_noisyrollout_flow_binds_loopback(tmp_path):
    result = subprocess.run([sys.executable, "-c", EPHEMERAL], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=_env(PREFECT_HOME=str(tmp_path / "prefect_home")))
    line = next((x for x in result.stdout.splitlines() if x.startswith("SOCKETS ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(line[len("SOCKETS "):])
    sockets = [tuple(s) for s in report["sockets"]]
    print(f"\nephemeral Prefect API ({report['api']}): {sockets}")
    assert sockets and exposed(sockets) == [], sockets


def test_a_prefect_host_the_user_set_wins_over_the_projects_default():
    """Told otherwise: PREFECT_SERVER_API_HOST / PREFECT_RUNNER_SERVER_HOST set by the user are kept by
    `pipelines.flow` (its defaults are applied only where unset)."""
    code = ("import os, pipelines.flow; from prefect.settings import get_current_settings as s; "
            "print(os.environ['PREFECT_SERVER_API_HOST'], s().server.api.host, s().runner.server.host)")
    told = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(PREFECT_SERVER_API_HOST="0.0.0.0", PREFECT_RUNNER_SERVER_HOST="0.0.0.0"))
    default = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=_env())
    assert told.stdout.split() == ["0.0.0.0"] * 3, told.stderr[-2000:]
    assert default.stdout.split() == ["127.0.0.1"] * 3, default.stderr[-2000:]


# -- Ray -----------------------------------------------------------------------------------------------------------

RAY = textwrap.dedent("""
    import json, sys, time, psutil, ray
    from noisyrollout.config import load_params
    from noisyrollout.train.launcher import start_ray
    params = load_params("params.yaml", ["cluster.dashboard=true", "cluster.num_learners=1"])
    assert start_ray(params)
    dashboard = ray._private.worker.get_dashboard_url()   # host:port
    time.sleep(3)   # the dashboard agent and the runtime-env agent start after ray.init returns
    me = psutil.Process()
    sockets = sorted({(p.name(), c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
                      for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
    print("RAY " + json.dumps({"dashboard": dashboard, "sockets": sockets}), flush=True)
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray cluster started by `start_ray` with the dashboard on, in a subprocess whose environment holds
    secrets, its session folder (RAY_TMPDIR) and HOME in a temporary folder; what it listened on."""
    s = Secrets()
    home = tmp_path_factory.mktemp("ray_home")
    ray_tmp = Path(tempfile.mkdtemp(prefix="nr-ray-"))   # short: Ray's socket paths must fit in 107 characters
    env = _env(**s.values, HOME=str(home), RAY_TMPDIR=str(ray_tmp), DS_ACCELERATOR="cpu")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", RAY], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RAY ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(line[4:])
    report.update(secrets=s, roots=(home, ray_tmp), output=result.stdout + result.stderr,
                  seconds=time.monotonic() - start)
    yield report
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_dashboard_binds_loopback(local_ray):
    host, port = local_ray["dashboard"].rsplit(":", 1)
    on_port = [ip for _, ip, p in local_ray["sockets"] if p == int(port)]
    print(f"\nRay dashboard {local_ray['dashboard']} ({local_ray['seconds']:.0f} s): listening on {on_port}")
    assert host == "127.0.0.1" and on_port == ["127.0.0.1"], local_ray["sockets"]


@pytest.mark.slow
def test_a_local_ray_cluster_listens_only_on_loopback(local_ray):
    wide = exposed([tuple(s) for s in local_ray["sockets"]])
    print(f"\nlocal Ray: {len(local_ray['sockets'])} listening sockets, {len(wide)} not loopback: {wide}")
    assert wide == []


@pytest.mark.slow
def test_ray_writes_no_secret_from_the_environment(local_ray):
    s: Secrets = local_ray["secrets"]
    leaks, files, size = s.search_tree(*local_ray["roots"])
    leaks += s.search_text({"the Ray start's output": local_ray["output"]})
    print(f"\nRay session + HOME: {files} files, {size / 1e6:.1f} MB searched for {len(s.values)} secrets")
    assert files > 10 and leaks == [], "\n".join(map(str, leaks))
