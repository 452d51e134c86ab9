"""Registry and pipeline faults (#25 case 5), with the real tools: a real MLflow sqlite store or `mlflow server` on
127.0.0.1, `noisyrollout promote` processes killed with SIGKILL, real `dvc repro`, a real Prefect server.

Promises:
* `champion` (and `challenger`) always point at a complete, evaluated version: its `eval.*` tags and a
  `promotion.decision` tag present, whatever point a register / promote was killed at;
* a crash leaves no version undecided for good: the next `promote` marks it (`promoted` when it holds `champion`,
  else `interrupted`, with the reason), and a retried promote ends as the uninterrupted one would have;
* two promotes at once run one after the other (the registry lock): the second judges against the first's champion;
* a second `dvc repro` in a repo where one runs is refused with DVC's one line, and the first is unaffected;
* a served deployment never runs the DAG twice at once, even served by two processes (runs wait their turn);
* an MLflow server that dies mid-`register` gives one `error:` line naming the server; nothing half-registered is
  ever aliased, and the next promote marks the orphan.

The kill points are the documented hook of pipelines/registry.py (NOISYROLLOUT_REGISTRY_PAUSE="<point>:<dir>": the
process writes <dir>/<point>.reached and waits for <dir>/<point>.go), so each SIGKILL lands at that exact point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from noisyrollout.tracking import Tracker
from pipelines.registry import PAUSE_ENV, PAUSE_POINTS, promote, register
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARGIN = 0.005        # params.yaml's registry.margin, which `noisyrollout promote` uses
DECISIONS = {"promoted", "refused", "promoting", "interrupted"}


# -- helpers -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A real MLflow sqlite store (migrated once), a stand-in model folder, and a working folder with params.yaml."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry_faults")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    with Tracker("warmup", tracking_uri=uri, artifact_root=root / "artifacts"):
        pass
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "stub"}')
    work = root / "work"
    work.mkdir()
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return {"uri": uri, "root": root, "model": model, "work": work,
            "client": MlflowClient(tracking_uri=uri, registry_uri=uri)}


def _register(store: dict, name: str, accuracy: float | None) -> str:
    metrics = {} if accuracy is None else {"mean_accuracy": accuracy}
    return register(name=name, model_dir=store["model"], run_id=None, experiment="faults", eval_metrics=metrics,
                    tags={}, description=f"# {name}", tracking_uri=store["uri"],
                    artifact_root=store["root"] / "artifacts")["version"]


def _env(store_uri: str, pause: tuple[str, Path] | None = None) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(PAUSE_ENV, None)
    if pause is not None:
        point, folder = pause
        assert point in PAUSE_POINTS
        env[PAUSE_ENV] = f"{point}:{folder}"
    return env


def _promote_proc(store: dict, name: str, version: str | None = None,
                  pause: tuple[str, Path] | None = None) -> subprocess.Popen:
    """`noisyrollout promote` (the shipped command) in its own session, on model `name`."""
    cmd = [str(BIN / "noisyrollout"), "promote", "-S", f"registry.model_name={name}"]
    if version is not None:
        cmd += ["--version", version]
    return subprocess.Popen(cmd, cwd=store["work"], env=_env(store["uri"], pause), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (proc.returncode, out[-2000:], err[-2000:])
    return out, err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Seconds until `path` exists (the process reached its pause point); fails if the process ends first."""
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended before {path.name}: {out[-1500:]} {err[-1500:]}")
        assert time.monotonic() - start < timeout, f"{path.name} not reached in {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _tags(client, name: str) -> dict[str, dict[str, str]]:
    return {str(mv.version): dict(mv.tags) for mv in client.search_model_versions(f"name = '{name}'")}


def _assert_aliases_complete(client, name: str) -> dict[str, str]:
    """Every alias points at a version with its eval metric; `champion` also at one with a decision tag."""
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    tags = _tags(client, name)
    for alias, version in aliases.items():
        assert "eval.mean_accuracy" in tags[version], (alias, version, tags[version])
        if alias == "champion":
            assert tags[version].get("promotion.decision") in DECISIONS, (version, tags[version])
    return aliases


def _champion_at(store: dict, name: str, accuracy: float) -> str:
    v1 = _register(store, name, accuracy)
    assert promote(name=name, tracking_uri=store["uri"], margin=MARGIN)["decision"] == "promoted"
    return v1


# -- promote killed between deciding and moving the alias --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", ["promote.tagged", "promote.moved"])
def test_promote_killed_then_retried_ends_as_uninterrupted(store, tmp_path, point):
    """SIGKILL after the decision is written / after `champion` moved: the aliases stay on complete versions, and
    the retried promote (Prefect retries a killed stage) records what an uninterrupted one records."""
    client, name = store["client"], f"kill-{point.split('.')[1]}"
    v1 = _champion_at(store, name, 0.80)
    v2 = _register(store, name, 0.85)

    proc = _promote_proc(store, name, pause=(point, tmp_path))
    _wait_for(tmp_path / f"{point}.reached", proc)
    _kill(proc)
    aliases = _assert_aliases_complete(client, name)
    assert aliases["champion"] == (v1 if point == "promote.tagged" else v2)
    assert _tags(client, name)[v2]["promotion.decision"] == "promoting"   # the crash is visible, not a lie

    start = time.monotonic()
    out, _ = _finish(_promote_proc(store, name))                          # the retry
    retry_s = time.monotonic() - start
    tags = _tags(client, name)[v2]
    assert _assert_aliases_complete(client, name) == {"champion": v2, "challenger": v2}
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_to"] == v1
    assert tags["promotion.reason"] == f"mean_accuracy 0.8500 vs champion v{v1} 0.8000: +0.0500 >= margin 0.0050"
    assert f"decision: v{v2} promoted" in out and f"champion moved v{v1} -> v{v2}" in out, out
    assert _tags(client, name)[v1]["promotion.decision"] == "promoted"     # the old champion's record untouched
    print(f"{point}: killed, retry promote {retry_s:.1f} s (process start included)")


@pytest.mark.slow
def test_killed_promote_and_killed_register_are_marked_by_the_next_promote(store, tmp_path):
    """A promote killed before the move and never retried, and a register killed before `challenger` moved: the
    next promote (of a newer version) marks both `interrupted`, with the reason; none is left undecided."""
    client, name = store["client"], "orphans"
    v1 = _champion_at(store, name, 0.80)
    v2 = _register(store, name, 0.90)
    proc = _promote_proc(store, name, pause=("promote.tagged", tmp_path))
    _wait_for(tmp_path / "promote.tagged.reached", proc)
    _kill(proc)

    code = textwrap.dedent(f"""
        from pathlib import Path
        from pipelines.registry import register
        register(name={name!r}, model_dir=Path({str(store['model'])!r}), run_id=None, experiment="faults",
                 eval_metrics={{"mean_accuracy": 0.95}}, tags={{}}, description="# x", tracking_uri={store['uri']!r},
                 artifact_root=Path({str(store['root'] / 'artifacts')!r}))
    """)
    reg = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(store["uri"], ("register.created", tmp_path)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(tmp_path / "register.created.reached", reg)
    _kill(reg)
    v3 = str(int(v2) + 1)
    assert "eval.mean_accuracy" in _tags(client, name)[v3]                    # created with its tags, in one call
    assert _assert_aliases_complete(client, name) == {"champion": v1, "challenger": v2}   # v3 never aliased

    v4 = _register(store, name, 0.82)
    _finish(_promote_proc(store, name))
    tags = _tags(client, name)
    assert _assert_aliases_complete(client, name) == {"champion": v4, "challenger": v4}
    assert {v: t.get("promotion.decision") for v, t in tags.items()} == {
        v1: "promoted", v2: "interrupted", v3: "interrupted", v4: "promoted"}
    assert tags[v2]["promotion.reason"].startswith("interrupted: promote was killed before 'champion' moved (")
    assert tags[v3]["promotion.reason"] == (f"never judged: its register or promote did not finish before v{v4} "
                                            f"was judged (`noisyrollout promote --version {v3}` judges it)")
    # judged again by hand, by the same rule: v3 (0.95) beats v4 (0.82)
    _finish(_promote_proc(store, name, version=v3))
    assert _assert_aliases_complete(client, name)["champion"] == v3
    assert _tags(client, name)[v3]["promotion.compared_to"] == v4


# -- two promotes at once ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_promotes_at_once_run_one_after_the_other(store, tmp_path):
    """A (the worse candidate v3) decides and stops holding the lock; B (the better v2) starts meanwhile and must
    wait. Without the lock B would promote v2 over v1 and A would then move `champion` back to the worse v3."""
    client, name = store["client"], "race"
    v1 = _champion_at(store, name, 0.80)
    v2 = _register(store, name, 0.85)
    v3 = _register(store, name, 0.83)

    a = _promote_proc(store, name, version=v3, pause=("promote.decided", tmp_path))
    _wait_for(tmp_path / "promote.decided.reached", a)
    b = _promote_proc(store, name, version=v2)
    db = Path(store["uri"].removeprefix("sqlite:///")).resolve()
    deadline = time.monotonic() + 120
    while not any(Path(f.path) == db for f in psutil.Process(b.pid).open_files()):   # B has opened the store,
        assert b.poll() is None, b.communicate()                                     # the step before the lock
        assert time.monotonic() < deadline, "B never opened the store"
        time.sleep(0.05)
    time.sleep(3.0)                                           # a promote takes well under 1 s once started
    assert b.poll() is None, "B did not wait for A"
    released = time.monotonic()
    (tmp_path / "promote.decided.go").touch()
    _finish(a)
    _finish(b)
    print(f"B finished {time.monotonic() - released:.1f} s after A was released")

    tags = _tags(client, name)
    assert (tags[v3]["promotion.decision"], tags[v3]["promotion.compared_to"]) == ("promoted", v1)
    assert (tags[v2]["promotion.decision"], tags[v2]["promotion.compared_to"]) == ("promoted", v3)
    assert tags[v2]["promotion.reason"] == f"mean_accuracy 0.8500 vs champion v{v3} 0.8300: +0.0200 >= margin 0.0050"
    assert _assert_aliases_complete(client, name)["champion"] == v2


# -- two `dvc repro` at once ---------------------------------------------------------------------------------------

DVC_LOCK_LINE = ("ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated "
                 "abruptly. Check the page <https://dvc.org/doc/user-guide/troubleshooting#lock-issue> for other "
                 "possible reasons and to learn how to resolve this.")


@pytest.mark.slow
def test_second_dvc_repro_is_refused_and_the_first_is_unaffected(tmp_path):
    """A `dvc repro` while another runs a stage: refused by DVC's stage lock (DVC prints three lines: the ERROR line,
    the blocker's PID and command, a hint), which the flow folds into one line (and retries); while the other holds
    the repo lock: DVC's one line. The first run ends as it would alone, and the lock is released after it."""
    from dvc.repo import Repo

    from pipelines.flow import _failure
    from tests.toyrepo import env, make_repo, ran, run

    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([str(BIN / "dvc"), "repro", "validate"], cwd=repo, env=env(repo), stdout=out,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Running stage 'prepare'" not in log.read_text():
        assert first.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    second = run(repo, str(BIN / "dvc"), "repro", check=False)
    refused_s = time.monotonic() - start
    assert first.poll() is None, "the first run ended before the second was refused: no overlap tested"
    lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
    assert second.returncode == 255 and len(lines) == 3, lines
    assert lines[0] == f"ERROR: failed to reproduce 'data.dvc': '{repo / 'data'}' is busy, it is being blocked by:"
    assert lines[1].startswith(f"  (PID {first.pid}): ") and lines[1].endswith("dvc repro validate"), lines
    assert lines[2].startswith("If there are no processes with such PIDs, you can manually remove"), lines
    failed = _failure("prepare", second.returncode, (second.stdout + second.stderr).splitlines())
    assert str(failed) == f"{lines[0]} {lines[1].strip()}" and failed.transient    # the flow's one line; retried

    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert ran(subprocess.CompletedProcess([], 0, log.read_text(), "")) == ["prepare", "validate"]
    again = run(repo, str(BIN / "dvc"), "repro", "validate")          # the locks were released: a clean no-op
    assert ran(again) == [] and "Data and pipelines are up to date." in again.stdout

    with Repo(str(repo)).lock:                                         # DVC's repo lock, as a DVC command holds it
        start = time.monotonic()
        third = run(repo, str(BIN / "dvc"), "repro", check=False)
        locked_s = time.monotonic() - start
    lines = [ln for ln in (third.stdout + third.stderr).splitlines() if ln.strip()]
    assert third.returncode != 0 and lines == [DVC_LOCK_LINE], (third.returncode, lines)
    assert _failure("prepare", third.returncode, lines).transient
    print(f"second dvc repro refused by the stage lock after {refused_s:.1f} s, by the repo lock after "
          f"{locked_s:.1f} s (process start included)")


# -- overlapping scheduled Prefect runs ---------------------------------------------------------------------------

HOLD = ("import os, sys, time; f = open('hold.log', 'a'); f.write(f'start {time.time()} {os.getppid()}\\n'); "
        "f.flush(); time.sleep(6); f.write(f'end {time.time()} {os.getppid()}\\n')")


@pytest.mark.slow
def test_scheduled_runs_never_overlap_even_with_two_serving_processes(tmp_path):
    """The real deployment (`serve_deployment`) served by two processes on an interval shorter than a run: runs
    wait for the deployment's one slot (its concurrency limit), all COMPLETE, and no two overlap. The repo is the
    toy project with dvc.yaml reduced to one stage that takes 6 s (the orchestration is what is under test)."""
    import httpx
    import yaml

    from tests.toyrepo import make_repo, run

    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"hold": {
        "cmd": f"{sys.executable} -c \"{HOLD}\"", "always_changed": True}}}))
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/hold.log\n")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "one stage")

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_RUNNER_POLL_FREQUENCY="2", OMP_NUM_THREADS="1",
               DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    code = ("from pathlib import Path; from pipelines.flow import serve_deployment; "
            "serve_deployment(Path('.'), name='overlap', cron=None, interval_seconds=4)")
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(server_cmd, ready=f"{api}/health", log=tmp_path / "server.log", cwd=tmp_path, env=env):
        serve_env = {**env, "PREFECT_API_URL": api}
        with running([sys.executable, "-c", code], ready=f"{api}/health", log=tmp_path / "serve1.log", cwd=repo,
                     env=serve_env), \
                running([sys.executable, "-c", code], ready=f"{api}/health", log=tmp_path / "serve2.log", cwd=repo,
                        env=serve_env), httpx.Client(base_url=api, timeout=10) as http:
            start, runs, deployment = time.monotonic(), [], None
            while sum(r["state_type"] == "COMPLETED" for r in runs) < 3:
                assert time.monotonic() - start < 300, ((tmp_path / "serve1.log").read_text()[-2000:], runs)
                time.sleep(2)
                found = http.post("/deployments/filter", json={"deployments": {"name": {"any_": ["overlap"]}}}).json()
                if not found:
                    continue
                deployment = found[0]
                runs = http.post("/flow_runs/filter", json={
                    "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()
                bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
                assert not bad, (bad[0]["state"]["message"], (tmp_path / "serve1.log").read_text()[-2000:])
            waited = set()
            for r in runs:
                states = http.get("/flow_run_states/", params={"flow_run_id": r["id"]}).json()
                if any(s["name"] == "AwaitingConcurrencySlot" for s in states):
                    waited.add(r["id"])
    done = [r for r in runs if r["state_type"] == "COMPLETED"]
    spans = sorted((r["start_time"], r["end_time"]) for r in done)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert deployment["global_concurrency_limit"]["limit"] == 1, deployment   # concurrency_limit: deprecated, None
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE", deployment
    assert waited, "no run had to wait: the limit was not exercised"
    holds = [ln.split() for ln in (repo / "hold.log").read_text().splitlines()]
    assert [h[0] for h in holds[: 2 * len(done)]] == ["start", "end"] * len(done), holds   # strictly alternating
    print(f"{len(done)} runs completed in {time.monotonic() - start:.0f} s, {len(waited)} waited for the slot; "
          f"spans {spans}")


# -- an MLflow server that goes away mid-register ------------------------------------------------------------------

@pytest.mark.slow
def test_server_killed_mid_register_one_line_then_repaired(store, tmp_path, monkeypatch):
    """`register` against a real `mlflow server`, the server SIGKILLed after the version was created and before
    `challenger` moved: one `error:` line naming the server; restarted on the same store, nothing half-registered
    is aliased and the next register + promote mark the orphan."""
    from mlflow import MlflowClient

    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from noisyrollout.errors import NoisyRolloutError
        from pipelines.registry import register
        try:
            register(name="srv", model_dir=Path({str(store['model'])!r}), run_id=None, experiment="faults",
                     eval_metrics={{"mean_accuracy": 0.7}}, tags={{}}, description="# srv", tracking_uri={uri!r})
        except NoisyRolloutError as e:
            print(f"error: {{e}}", file=sys.stderr)
            sys.exit(2)
    """)
    # MLflow retries a refused connection 7 times with backoff (about 4 min) before it gives up; 2 quick retries here
    env = {**_env(uri, ("register.created", tmp_path)), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    with running(cmd, ready=f"{uri}/health", log=root / "server1.log", cwd=root) as server:
        reg = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        _wait_for(tmp_path / "register.created.reached", reg, timeout=180)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        start = time.monotonic()
        (tmp_path / "register.created.go").touch()
        out, err = reg.communicate(timeout=300)
        failed_s = time.monotonic() - start
    assert reg.returncode == 2, (out, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow registry at {uri}: registering 'srv'"), err
    assert f"port={port}" in errors[0] or uri in errors[0].split(":", 3)[-1], errors[0]
    print(f"dead server: register failed {failed_s:.1f} s after the kill: {errors[0][:200]}")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # the registry lock of an http store
    with running(cmd, ready=f"{uri}/health", log=root / "server2.log", cwd=root):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        assert client.get_registered_model("srv").aliases == {}                # v1 exists, never aliased
        assert _tags(client, "srv")["1"]["eval.mean_accuracy"] == "0.7"
        v2 = register(name="srv", model_dir=store["model"], run_id=None, experiment="faults",
                      eval_metrics={"mean_accuracy": 0.75}, tags={}, description="# srv", tracking_uri=uri)["version"]
        decision = promote(name="srv", tracking_uri=uri, margin=MARGIN)
        assert (v2, decision["decision"], decision["reason"]) == ("2", "promoted", "no champion yet")
        assert _assert_aliases_complete(client, "srv") == {"champion": "2", "challenger": "2"}
        assert _tags(client, "srv")["1"]["promotion.decision"] == "interrupted"
