"""The DVC DAG as one Prefect 3 flow (`noisyrollout-dag`), and a served, scheduled deployment of it.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>` in the repo, in dvc.yaml's order, after
`noisyrollout restore-data`. So DVC's cache, its lock (`.dvc/tmp/rwlock`) and its skip logic are the ones `dvc repro`
uses: a run with nothing changed executes no stage, and the flow is only the orchestration view of the same DAG
(logs, retries, schedule, a summary artifact). Every subprocess line goes to the Prefect run logger.

Failures: a stage that fails raises `StageFailed` whose message is the stage's one-line error (noisyrollout's
`error: ...` line, else DVC's `ERROR: ...` line), so the flow run FAILS with it. `train`, `evaluate`, `register` and
`promote` retry twice (5 s, then 20 s) on transient failures only: a stage that exited with 2 (noisyrollout's exit code
for user / data / config errors) or a stage DVC refused to run (dvc.yaml, params, missing deps) is not retried;
a crash (another exit code, a signal) or DVC refusing because another DVC process runs is: its repo lock ("Unable
to acquire lock", one line) or a stage's files ("'<path>' is busy, it is being blocked by:" then "(PID n): <command>"
lines, folded into one line here). prepare / validate / build_model / sft
never retry (bad data is not transient). DVC releases its lock when the subprocess ends, so the next run starts
cleanly; a cancelled task terminates its `dvc` subprocess before it lets go.

No overlapping runs: `serve_deployment` calls `flow.serve(..., limit=1, global_limit=ConcurrencyLimitConfig(limit=1,
collision_strategy=ENQUEUE))`. In Prefect 3.9 `limit` is the runner's maximum number of concurrently executing flow
runs for that served process; `global_limit` is the deployment's concurrency limit, kept by the Prefect server for
every process serving the deployment (two `noisyrollout deploy` at once, a run started by hand): a run due while one
runs waits in Scheduled/`AwaitingConcurrencySlot` and starts when the slot frees (ENQUEUE: none is dropped). A run
started some other way at the same time (`dvc repro`, `noisyrollout flow`) is still stopped by DVC's repo lock (one
line, "ERROR: Unable to acquire lock ..."; the stage tasks with retries try again).

Servers bind 127.0.0.1 by default (`prefect_env`); a user's `PREFECT_API_URL` and other settings are never overridden.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional


def prefect_env() -> dict[str, str]:
    """Prefect settings defaults for this project (applied with setdefault: a value the user set wins).

    The ephemeral API server takes 13-24 s to start on a loaded 2-core machine; Prefect's default start-up timeout is
    20 s. Servers (API, runner webserver) bind the loopback interface; the server sends no analytics."""
    return {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_RUNNER_SERVER_HOST": "127.0.0.1",
    }


def _apply_prefect_env() -> None:
    """Set `prefect_env()` defaults in os.environ; Prefect reads its settings when it is imported, so when it already
    was and a default was added, refresh its global settings context."""
    added = False
    for key, value in prefect_env().items():
        if key not in os.environ:
            os.environ[key] = value
            added = True
    if added and "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


_apply_prefect_env()   # before prefect is imported

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from pipelines.dag import summary_markdown  # noqa: E402

SUMMARY_KEY = "noisyrollout-summary"
USER_ERROR_EXIT = 2                                        # noisyrollout's exit code for errors a user can act on
RETRYING = frozenset({"train", "evaluate", "register", "promote"})   # stages whose failures may be transient
RETRIES = 2
RETRY_DELAYS = [5, 20]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAN = re.compile(r"Running stage '([\w-]+)'")
_RESTORED = re.compile(r"Stage '([\w-]+)' is cached - skipping run, checking out outputs")
_EXITED = re.compile(r"exited with (-?\d+)")
_BUSY = "is busy, it is being blocked by:"                 # DVC's stage (rwlock) refusal, then "(PID n): cmd" lines
_LOCKED = ("Unable to acquire lock", _BUSY)                # DVC's refusals when another DVC process runs


class StageFailed(RuntimeError):
    """A stage (or restore-data) failed. str() is its one-line error; `transient` says whether a retry may help."""

    def __init__(self, stage: str, message: str, *, returncode: int, transient: bool):
        super().__init__(message)
        self.stage, self.returncode, self.transient = stage, returncode, transient

    def __reduce__(self):   # picklable with its attributes (Prefect may serialise the exception)
        return (_rebuild_stage_failed, (self.stage, str(self), self.returncode, self.transient))


def _rebuild_stage_failed(stage: str, message: str, returncode: int, transient: bool) -> StageFailed:
    return StageFailed(stage, message, returncode=returncode, transient=transient)


def dag_stages(repo: Path) -> list[str]:
    """The stage names of repo/dvc.yaml, in file order (the DAG's topological order)."""
    return list((yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}).get("stages") or {})


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)   # so DVC finds `noisyrollout` (and `dvc`) of this venv
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


def _stream(cmd: list[str], repo: Path, log) -> tuple[int, list[str]]:
    """Run cmd in repo, every output line (stdout and stderr, in order) to `log`; (exit code, lines)."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=repo, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ANSI.sub("", raw.rstrip("\n")).rstrip()
            lines.append(line)
            if line:
                log(line)
        return proc.wait(), lines
    finally:
        if proc.poll() is None:   # interrupted (cancel, crash): stop DVC so its lock is released
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _dvc_errors(lines: list[str]) -> list[str]:
    """DVC's `ERROR: ...` lines, each one line: a stage lock refusal ("'<path>' is busy, it is being blocked by:"
    followed by "  (PID n): <command>" lines) gets its blockers appended to it."""
    out = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line.startswith("ERROR: "):
            continue
        if line.endswith(_BUSY):
            blockers = itertools.takewhile(lambda ln: ln.strip().startswith("(PID "), lines[i + 1:])
            line = " ".join([line, *(b.strip() for b in blockers)])
        out.append(line)
    return out


def _failure(stage: str, returncode: int, lines: list[str]) -> StageFailed:
    """The one-line error of a failed run, and whether it may be transient."""
    ours = [ln.strip() for ln in lines if ln.strip().startswith("error: ")]
    dvcs = _dvc_errors(lines)
    message = (ours or dvcs or [f"{stage}: exited with {returncode}"])[-1]
    exited = [int(m.group(1)) for ln in dvcs for m in [_EXITED.search(ln)] if m]
    if exited:                                  # DVC ran the stage command: its exit code decides
        transient = exited[-1] != USER_ERROR_EXIT   # 2: noisyrollout's user / data / config error; else a crash
    elif ours or returncode == USER_ERROR_EXIT:
        transient = False                       # noisyrollout called directly (restore-data): a user error
    elif any(refusal in ln for ln in dvcs for refusal in _LOCKED):
        transient = True                        # another DVC process holds the repo, or this stage's files
    else:
        transient = returncode < 0              # killed by a signal; else DVC refused the stage (needs a person)
    return StageFailed(stage, message, returncode=returncode, transient=transient)


def retry_if_transient(task_obj, task_run, state) -> bool:
    """retry_condition_fn: retry a failed stage only when its failure may be transient (not a user error)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return bool(getattr(exc, "transient", False)) if isinstance(exc, StageFailed) else True


@task(name="restore-data", task_run_name="restore-data")
def restore_data(repo: str) -> None:
    """`noisyrollout restore-data`: data.dvc's folder present and verified (rendered and checked on a fresh clone)."""
    logger = get_run_logger()
    code, lines = _stream([sys.executable, "-m", "pipelines.cli", "restore-data"], Path(repo), logger.info)
    if code != 0:
        raise _failure("restore-data", code, lines)


@task(name="stage")
def run_stage(repo: str, stage: str) -> str:
    """`dvc repro --single-item <stage>`: "ran" (DVC executed it), "restored" (its outputs checked out from DVC's run
    cache: these dependencies and params were run before) or "skipped" (up to date)."""
    logger = get_run_logger()
    code, lines = _stream([sys.executable, "-m", "dvc", "repro", "--single-item", stage], Path(repo), logger.info)
    if code != 0:
        raise _failure(stage, code, lines)
    text = "\n".join(lines)
    return "ran" if stage in _RAN.findall(text) else "restored" if stage in _RESTORED.findall(text) else "skipped"


def stage_task(stage: str):
    """The task of one stage: retries with backoff for the stages whose failures may be transient."""
    retries = dict(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient) \
        if stage in RETRYING else dict(retries=0)
    return run_stage.with_options(name=stage, task_run_name=stage, **retries)


@task(name="summary", task_run_name="summary")
def publish_summary(repo: str, ran: list[str], restored: list[str]) -> str:
    """The summary as the markdown artifact `noisyrollout-summary` (one per flow run; the UI keeps its history)."""
    markdown = summary_markdown(Path(repo), ran, restored)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_KEY, description="NoisyRollout DAG run summary")
    return markdown


@flow(name="noisyrollout-dag")
def noisyrollout_dag(repo: str = ".", stages: Optional[list[str]] = None) -> dict:
    """restore-data, then `dvc repro --single-item` of each dvc.yaml stage in order; a summary artifact at the end.

    `stages`: only these (still in dvc.yaml's order). Returns {"ran": stages DVC executed, "summary_markdown": ...}."""
    root = Path(repo).resolve()
    order = dag_stages(root)
    if stages is not None:
        unknown = [s for s in stages if s not in order]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
        order = [s for s in order if s in stages]
    restore_data(str(root))
    outcome = {stage: stage_task(stage)(str(root), stage) for stage in order}
    ran = [stage for stage, status in outcome.items() if status == "ran"]
    restored = [stage for stage, status in outcome.items() if status == "restored"]
    get_run_logger().info("stages run: %s%s", ", ".join(ran) or "none (nothing changed)",
                          f"; restored from DVC's run cache: {', '.join(restored)}" if restored else "")
    return {"ran": ran, "summary_markdown": publish_summary(str(root), ran, restored)}


def run_once(repo: Path) -> str:
    """Run the flow once (ephemeral API unless PREFECT_API_URL is set); the final state's type, e.g. COMPLETED."""
    _apply_prefect_env()
    state = noisyrollout_dag(repo=str(Path(repo).resolve()), return_state=True)
    return state.type.value


def serve_deployment(repo: Path, *, name: str, cron: Optional[str], interval_seconds: Optional[int]) -> None:
    """Serve the flow as deployment `noisyrollout-dag/<name>` on a schedule (cron or an interval), at most one run at a
    time: in this process (`limit=1`) and across every process serving the deployment (its concurrency limit 1; a run
    due meanwhile waits, ENQUEUE). Blocks until interrupted. A schedule fires only against a real Prefect server
    (PREFECT_API_URL), not the ephemeral one."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    _apply_prefect_env()
    if cron is not None and interval_seconds is not None:
        raise ValueError("give a cron schedule or an interval, not both")
    noisyrollout_dag.serve(
        name=name,
        cron=cron,
        interval=interval_seconds,
        parameters={"repo": str(Path(repo).resolve())},
        limit=1,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["noisyrollout"],
        description="The NoisyRollout DVC DAG (dvc repro --single-item per stage), one run at a time.",
    )
