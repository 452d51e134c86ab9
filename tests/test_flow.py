"""The DAG as a Prefect 3 flow, with real Prefect (no mocks), on a toy copy of the repo.

One module-scoped toy repo (as in test_dag.py) is reproduced once with `dvc repro`, so the flow's runs are no-ops
unless a test changes a parameter. Runs 1-2 use Prefect's ephemeral API with their own PREFECT_HOME; run 3 serves a
scheduled deployment against a real `prefect server start` and stops both processes (and whatever they started).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.toyrepo import make_repo, ran, run, set_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORDER = ["prepare", "validate", "build_model", "sft", "train", "evaluate", "register", "promote"]
TABLE_HEADER = "| metric | after SFT | after RL | change |"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The toy repo (git + DVC, data.dvc committed), its DAG reproduced once; MLFLOW_TRACKING_URI (a sqlite file in
    it) and DVC_NO_ANALYTICS for every subprocess of the module."""
    repo = make_repo(tmp_path_factory.mktemp("flow"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlruns.db'}")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        assert ran(run(repo, "dvc", "repro")) == ORDER
        yield repo


@pytest.fixture(scope="module")
def ephemeral(tmp_path_factory):
    """Prefect in this process on its ephemeral API, with a PREFECT_HOME of its own; the flow module."""
    home = tmp_path_factory.mktemp("prefect_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.delenv("PREFECT_API_URL", raising=False)
        mp.delenv("PREFECT_PROFILE", raising=False)
        if "prefect.context" in sys.modules:   # Prefect reads its settings at import
            sys.modules["prefect.context"].refresh_global_settings_context()
        import pipelines.flow as flow_module

        from prefect.settings import get_current_settings
        assert get_current_settings().home == home and get_current_settings().api.url is None
        yield flow_module


def _artifacts(key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _task_runs(flow_run_id) -> dict:
    """{task run name: run_count} of one flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.run_count for r in runs}


def _version(repo: Path) -> int:
    return int(json.loads((repo / "reports/register.json").read_text())["version"])


def test_run_once_nothing_changed_publishes_the_summary(repo, ephemeral):
    version = _version(repo)
    start = time.monotonic()
    assert ephemeral.run_once(repo) == "COMPLETED"
    print(f"run_once (ephemeral API start + no-op DAG): {time.monotonic() - start:.1f} s")

    artifacts = _artifacts(ephemeral.SUMMARY_KEY)
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    text = artifacts[0].data
    assert TABLE_HEADER in text
    assert "nothing changed: no stage ran" in text            # the flow's `ran` was []
    assert "mean_accuracy" in text and "decision" in text and "promoted" in text
    val = json.loads((repo / "runs/embedded/rl/val.json").read_text())
    assert f"training run id: `{val['mlflow_run_id']}`" in text
    assert _version(repo) == version                          # the registry did not change

    state = ephemeral.noisyrollout_dag(repo=str(repo), return_state=True)
    assert state.is_completed() and state.result()["ran"] == []
    assert len(_artifacts(ephemeral.SUMMARY_KEY)) == 2        # one summary per flow run


def test_user_errors_fail_the_run_without_retries_then_a_clean_run(repo, ephemeral, monkeypatch):
    version = _version(repo)
    assert "promote" in ephemeral.RETRYING and "validate" not in ephemeral.RETRYING

    # promote (a stage with retries) fails with a user error (exit 2: an MLflow store that cannot exist): not retried
    set_params(repo, {"registry": {"margin": 0.5}})            # a promote-only key, so DVC reruns promote
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent-noisyrollout-dir/mlruns.db")
    start = time.monotonic()
    state = ephemeral.noisyrollout_dag(repo=str(repo), stages=["promote"], return_state=True)
    elapsed = time.monotonic() - start
    assert state.is_failed()
    assert "error: MLflow store sqlite:////nonexistent-noisyrollout-dir/mlruns.db" in state.message, state.message
    assert _task_runs(state.state_details.flow_run_id) == {"restore-data": 1, "promote": 1}
    print(f"promote user error, not retried: {elapsed:.1f} s")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlruns.db'}")
    set_params(repo, {"registry": {"margin": 0.005}})

    # the data gate: the 56x56 images are below gate.min_image_pixels, so validate fails with a user error
    set_params(repo, {"gate": {"min_image_pixels": 100000}})
    start = time.monotonic()
    state = ephemeral.noisyrollout_dag(repo=str(repo), return_state=True)
    assert state.is_failed()
    assert "error: data validation failed on train" in state.message, state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["validate"] == 1 and "build_model" not in runs
    assert json.loads((repo / "reports/gate.json").read_text())["success"] is False
    print(f"validate user error: {time.monotonic() - start:.1f} s")

    # restored: the next run starts cleanly (DVC released its lock); DVC's run cache restores validate's and
    # promote's outputs (these params ran before), so no stage executes and the registry is untouched
    set_params(repo, {"gate": {"min_image_pixels": 784}})
    lock = repo / ".dvc/tmp/rwlock"
    assert not lock.exists() or json.loads(lock.read_text() or "{}") == {}
    start = time.monotonic()
    state = ephemeral.noisyrollout_dag(repo=str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["ran"] == []
    assert "Restored from DVC's run cache (not rerun):** `validate`, `promote`" in result["summary_markdown"]
    assert json.loads((repo / "reports/gate.json").read_text())["success"] is True
    assert json.loads((repo / "reports/promotion.json").read_text())["decision"] == "promoted"
    assert _version(repo) == version
    assert run(repo, "dvc", "status", "--json").stdout.strip() == "{}"
    print(f"clean run after the failures: {time.monotonic() - start:.1f} s")


def test_retry_condition_retries_only_transient_failures(ephemeral):
    """The retry_condition_fn on real Prefect states, from the lines DVC and noisyrollout print."""
    from prefect.states import Failed

    f = ephemeral

    def failed(stage, code, *lines):
        exc = f._failure(stage, code, list(lines))
        return exc, f.retry_if_transient(None, None, Failed(data=exc))

    user = "ERROR: failed to reproduce 'train': failed to run: noisyrollout train, exited with 2"
    exc, retry = failed("train", 255, "Running stage 'train':", "> noisyrollout train", "error: bad knob", user)
    assert str(exc) == "error: bad knob" and not retry and exc.stage == "train"
    exc, retry = failed("train", 255, "Running stage 'train':", "Traceback (most recent call last):",
                        "RuntimeError: boom",
                        "ERROR: failed to reproduce 'train': failed to run: noisyrollout train, exited with 1")
    assert str(exc).startswith("ERROR: failed to reproduce 'train'") and retry
    exc, retry = failed("train", 255, "ERROR: failed to reproduce 'train': failed to run: noisyrollout train, "
                                      "exited with -9")
    assert retry                                                   # killed (e.g. out of memory)
    exc, retry = failed("evaluate", 255, "error: a library's own log line", "Traceback (most recent call last):",
                        "ERROR: failed to reproduce 'evaluate': failed to run: noisyrollout evaluate, exited with 1")
    assert retry                                                   # the exit code decides, not a stray line
    exc, retry = failed("evaluate", 255, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    assert retry
    exc, retry = failed("register", 255, "ERROR: 'params.yaml' does not exist")
    assert not retry and str(exc) == "ERROR: 'params.yaml' does not exist"
    exc, retry = failed("restore-data", 2, "error: data differs from data.dvc")
    assert not retry
    again = pickle.loads(pickle.dumps(exc))
    assert (str(again), again.stage, again.returncode, again.transient) == (str(exc), "restore-data", 2, False)
    assert f.retry_if_transient(None, None, Failed(data=OSError("no such file"))) is True
    assert [s for s in f.dag_stages(ROOT)] == ORDER
    for stage in ORDER:
        options = f.stage_task(stage)
        assert options.retries == (2 if stage in {"train", "evaluate", "register", "promote"} else 0)
        if options.retries:
            assert options.retry_delay_seconds == [5, 20] and options.retry_condition_fn is f.retry_if_transient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and every process below it (a flow run may be in flight), 10 s, then SIGKILL."""
    try:
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    groups = set()
    for pid in family:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                  for p in family if p != proc.pid):
            time.sleep(0.2)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if not any(psutil.pid_exists(p) for p in family if p != proc.pid):
                break
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=10)
    left = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left, f"processes left: {left}"


def test_served_deployment_runs_on_its_schedule(repo, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", PREFECT_UI_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlruns.db'}", DVC_NO_ANALYTICS="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    version = _version(repo)
    try:
        start = time.monotonic()
        with open(logs / "server.log", "w") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with httpx.Client(base_url=api, timeout=5) as http:
            while True:
                assert procs[0].poll() is None, (logs / "server.log").read_text()[-3000:]
                assert time.monotonic() - start < 120, "prefect server did not become healthy in 120 s"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            print(f"server healthy after {time.monotonic() - start:.1f} s")

            code = ("from pathlib import Path; from pipelines.flow import serve_deployment; "
                    "serve_deployment(Path('.'), name='test', cron=None, interval_seconds=10)")
            with open(logs / "serve.log", "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=repo,
                                              env={**env, "PREFECT_API_URL": api}, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            served = time.monotonic()
            completed = None
            while completed is None:
                assert procs[1].poll() is None, (logs / "serve.log").read_text()[-3000:]
                assert time.monotonic() - served < 240, (logs / "serve.log").read_text()[-3000:]
                time.sleep(2)
                response = http.post("/deployments/filter", json={"deployments": {"name": {"any_": ["test"]}}})
                deployments = response.json()
                if not deployments:
                    continue
                deployment = deployments[0]
                runs = http.post("/flow_runs/filter", json={
                    "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()
                failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
                assert not failed, (failed[0]["state"]["message"], (logs / "serve.log").read_text()[-3000:])
                completed = next((r for r in runs if r["state_type"] == "COMPLETED"), None)
            print(f"a scheduled run COMPLETED {time.monotonic() - served:.1f} s after serving")
            spans = sorted((r["start_time"], r["end_time"] or "9999") for r in runs if r["start_time"])
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans    # limit=1: runs never overlap
            assert deployment["schedules"] and deployment["schedules"][0]["schedule"]["interval"] == 10
            assert deployment["parameters"] == {"repo": str(repo.resolve())}
            assert completed["parameters"] == {"repo": str(repo.resolve())}
            assert completed["auto_scheduled"] is True
            artifacts = http.post("/artifacts/filter", json={"artifacts": {
                "key": {"any_": ["noisyrollout-summary"]}, "flow_run_id": {"any_": [completed["id"]]}}}).json()
            assert len(artifacts) == 1 and TABLE_HEADER in artifacts[0]["data"]
            assert "nothing changed: no stage ran" in artifacts[0]["data"]
            assert _version(repo) == version
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert all(proc.poll() is not None for proc in procs)
