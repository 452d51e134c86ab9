"""The MLflow model registry stages: `register` a trained policy as a new version (alias `challenger`), and
`promote` it to `champion` only when it beats the current champion on an evaluation metric by a margin.

Everything the promotion rule needs lives in the registry itself, on the model versions:

* `eval.<metric>` version tags (e.g. `eval.mean_accuracy`, `eval.embedded_test.accuracy`), written by `register`
  from the `evaluate` stage's metrics as `repr(float)`;
* the aliases `challenger` (the newest registered version) and `champion` (the version to serve; load it with
  `mlflow.artifacts.download_artifacts("models:/<name>@champion")`);
* every promotion decision, promoted or refused, as `promotion.*` tags on the candidate version (decision, reason,
  compared_to, metric, time), so the history can be read back from the versions.

Crashes and concurrency (tests/reliability/test_registry_faults.py):

* a version is created with its `eval.*` tags in one MLflow call, and `challenger` moves only after, so an alias
  never points at a version without its metrics;
* `promote` writes the decision before it moves `champion`: the `promotion.*` tags with decision `promoting`, then
  the alias, then decision `promoted` (a refusal is one write, decision `refused`). So `champion` always points at a
  version whose eval and promotion tags are present;
* the next `promote` finishes what a crash left (`_repair`): a `promoting` version that holds `champion` becomes
  `promoted`; one that does not (killed before the move), and any version older than the candidate that was never
  judged (its register or promote died), is marked `interrupted` with the reason; `promote --version N` judges it
  again;
* `register`'s create + alias and all of `promote` hold one lock per store (`_registry_lock`: a `flock` next to a
  sqlite database, else in ~/.cache/noisyrollout/locks/), so two promotes on one machine run one after the other and
  the second judges against the champion the first left. The kernel drops the lock when its holder dies, SIGKILL
  included. Two machines promoting against one server are not serialised (MLflow has no compare-and-set on aliases).
* `NOISYROLLOUT_REGISTRY_PAUSE="<point>:<dir>"` (a fault-injection hook for those tests; inert when unset) stops the
  process at one of `PAUSE_POINTS` until `<dir>/<point>.go` exists, after writing `<dir>/<point>.reached`.

MLflow is imported inside the functions (its import takes seconds). Every MLflow or connection failure surfaces
as one `NoisyRolloutError` line naming the tracking URI (with any user:password part of it masked). Nothing from
the environment is logged, and tag names that look like credentials are dropped (`is_secret_key`).

MLflow 3.17 notes: `search_model_versions` returns versions with empty `aliases` (read them from the registered
model, whose `aliases` map values are ints); `download_artifacts(..., tracking_uri=...)` does not set the registry
URI for a `models:/` URI (pass `registry_uri=` too, or set MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from noisyrollout.errors import NoisyRolloutError
from noisyrollout.config import Params
from noisyrollout.tracking import MAX_KEY_LENGTH, MAX_TAG_VALUE_LENGTH, Tracker, check_store, finite_or_none
from noisyrollout.tracking import first_line as _first_line, is_secret_key, safe_uri as _safe_uri, sqlite_path
from noisyrollout.tracking import tracking_uri as default_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
EVAL_PREFIX = "eval."
PROMOTION_TAGS = ("promotion.decision", "promotion.reason", "promotion.compared_to", "promotion.metric",
                  "promotion.time")
PROMOTED, REFUSED, PROMOTING, INTERRUPTED = "promoted", "refused", "promoting", "interrupted"   # promotion.decision
LOCK_TIMEOUT_S = 300.0     # how long register / promote wait for another one on the same store
PAUSE_ENV = "NOISYROLLOUT_REGISTRY_PAUSE"
PAUSE_POINTS = ("register.created",   # the version exists (with its eval tags), `challenger` not yet moved
                "promote.decided",    # under the lock, the decision made, nothing written
                "promote.tagged",     # promotion.* tags written (decision `promoting`), `champion` not yet moved
                "promote.moved")      # `champion` moved, decision still `promoting`


# -- helpers ---------------------------------------------------------------------------------------------------

def _resolve(uri: str | None) -> str:
    return uri or default_tracking_uri()


@contextlib.contextmanager
def _mlflow_errors(uri: str, what: str) -> Iterator[None]:
    """MLflow / connection / database errors as one NoisyRolloutError line naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except NoisyRolloutError:
        raise
    except (MlflowException, OSError, ConnectionError) as e:
        raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: {what} failed: {_first_line(e)}") from e
    except Exception as e:   # sqlalchemy / requests errors MLflow lets through
        mod = type(e).__module__ or ""
        if mod.startswith(("sqlalchemy", "requests", "urllib3", "sqlite3")):
            raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: {what} failed: {_first_line(e)}") from e
        raise


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """MLflow's default store is `uri` for the block (`mlflow.pyfunc.log_model`, and the registry resolving a logged
    model's source), through the environment variables it reads, restored afterwards (mlflow.set_tracking_uri would
    leave the process's store changed)."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, uri))
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pause(point: str) -> None:
    """The fault-injection hook (see the module docstring); nothing unless PAUSE_ENV names `point`."""
    want, _, folder = os.environ.get(PAUSE_ENV, "").partition(":")
    if want != point or not folder:
        return
    (Path(folder) / f"{point}.reached").write_text(str(os.getpid()))
    while not (Path(folder) / f"{point}.go").exists():
        time.sleep(0.02)


def _lock_path(uri: str) -> Path:
    """The registry lock of a store: beside a sqlite database (shared by every checkout and DVC queue workspace
    using it), else one per URI under ~/.cache/noisyrollout/locks."""
    db = sqlite_path(uri)
    if db is not None:
        return db.with_name(f"{db.name}.registry.lock")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "noisyrollout" / "locks" / f"registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def _registry_lock(uri: str, what: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """One register / promote at a time on this store (waits up to `timeout` s, then one NoisyRolloutError line).
    A `flock`: released by the kernel when the holder dies, even by SIGKILL, so a crash never leaves it held."""
    from filelock import FileLock, Timeout

    path = _lock_path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=timeout)
        lock.acquire()
    except Timeout:
        raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: {what}: another register or promote has "
                                f"held {path} for over {timeout:.0f} s") from None
    except OSError as e:
        raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: {what}: cannot lock {path}: "
                                f"{_first_line(e)}") from e
    try:
        yield
    finally:
        lock.release()


def _client(uri: str):
    from mlflow import MlflowClient

    with _mlflow_errors(uri, "connect"):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(e: BaseException) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client, name: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        with _mlflow_errors(uri, f"reading registered model {name!r}"):
            return client.get_registered_model(name)
    except NoisyRolloutError as e:
        if isinstance(e.__cause__, MlflowException) and _not_found(e.__cause__):
            raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: no registered model {name!r} "
                                    f"(run the register stage first)") from None
        raise


def _aliases(registered_model) -> dict[str, str]:
    """alias -> version (as a string: MLflow 3.17 returns ints here)."""
    return {str(a): str(v) for a, v in (registered_model.aliases or {}).items()}


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten_metrics(value, name))
            continue
        v = finite_or_none(value)
        if v is None:
            log.warning("registry: eval metric %s=%r is not a finite number; not tagged", name, value)
            continue
        out[name] = v
    return out


def _require_store_file(uri: str) -> None:
    """For reading stages: a sqlite store whose file does not exist holds nothing (and MLflow would create it)."""
    if uri.startswith("sqlite:///"):
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: no database file {db} "
                                    f"(nothing registered yet; run the register stage first)")


# -- register ----------------------------------------------------------------------------------------------------

def register(*, name: str, model_dir: Path, run_id: str | None, experiment: str, eval_metrics: dict[str, float],
             tags: dict[str, str], description: str, tracking_uri: str | None = None,
             artifact_root: Path | None = None, policy: dict[str, Any] | None = None) -> dict:
    """A new version of registered model `name` (created if absent), alias `challenger`.

    The run: `run_id` when given and that run has artifacts under "model" (the HF folder the trainer logged);
    otherwise a new run in `experiment` (artifacts under `artifact_root`, as `Tracker` does) with `model_dir` logged
    as "model". With `policy` (keyword arguments of `pipelines.serving.log_policy`: system_prompt, max_new_tokens,
    dtype, example) the version's source is the servable MLflow model logged into that run (`models:/<model id>`,
    its HF folder as an artifact); without, the bare HF folder `runs:/<run>/model`. Version tags: `tags`
    (secret-looking names dropped) plus `eval.<key>` = repr(float) per eval metric. Description: `description` (the
    model card).

    Returns {"name", "version", "run_id", "source", "aliases", "tags"}."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    uri = _resolve(tracking_uri)
    if uri.startswith("sqlite:///") and (db := sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)   # as Tracker does
    check_store(uri)
    client = _client(uri)

    version_tags: dict[str, str] = {}
    for key, value in (tags or {}).items():
        key = str(key)
        if is_secret_key(key):
            continue
        if len(key) > MAX_KEY_LENGTH:
            log.warning("registry: tag name longer than %d characters skipped: %s...", MAX_KEY_LENGTH, key[:60])
            continue
        version_tags[key] = str(value)[:MAX_TAG_VALUE_LENGTH]
    metrics = _flatten_metrics(eval_metrics or {})
    for key, value in metrics.items():
        version_tags[f"{EVAL_PREFIX}{key}"[:MAX_KEY_LENGTH]] = repr(float(value))

    source_run = None
    if run_id:
        with _mlflow_errors(uri, f"reading run {run_id}"):
            try:
                client.get_run(run_id)
            except MlflowException as e:
                if not _not_found(e):
                    raise
                raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: no run {run_id}") from None
            if client.list_artifacts(run_id, MODEL_ARTIFACT):
                source_run = run_id
            else:
                log.warning("registry: run %s has no %r artifacts; logging %s in a new run", run_id,
                            MODEL_ARTIFACT, model_dir)

    if source_run is None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir() or not any(model_dir.iterdir()):
            raise NoisyRolloutError(f"{model_dir}: no model folder to register")
        with _mlflow_errors(uri, f"logging {model_dir} as a new run in experiment {experiment!r}"):
            with Tracker(experiment, run_name=f"register-{name}", tracking_uri=uri,
                         artifact_root=artifact_root) as tr:
                run_tags = {"noisyrollout.stage": "register", "noisyrollout.registered_model": name}
                if run_id:
                    run_tags["noisyrollout.training_run_id"] = run_id
                tr.set_tags(run_tags)
                if metrics:
                    tr.log_metrics({f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()}, step=0)
                tr.log_artifact_dir(model_dir, MODEL_ARTIFACT)
            source_run = tr.run_id

    source, model_id = f"runs:/{source_run}/{MODEL_ARTIFACT}", None
    if policy is not None:
        from pipelines.serving import log_policy

        with _mlflow_errors(uri, f"logging the servable model into run {source_run}"), _fluent_store(uri):
            source, model_id = log_policy(Path(model_dir), run_id=source_run, **policy)
    # a logged model's source is resolved through MLflow's default store (not the client's), so that is `uri` here too
    # the version is created with its tags in one call (one transaction), then `challenger` moves: an alias never
    # points at a version without its eval tags; a version left without the alias is marked by the next promote
    with _registry_lock(uri, f"registering {name!r}"), \
            _mlflow_errors(uri, f"registering {name!r} from {source}"), _fluent_store(uri):
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        mv = client.create_model_version(name, source=source, run_id=source_run, tags=version_tags,
                                         description=description, model_id=model_id)
        version = str(mv.version)
        _pause("register.created")
        client.set_registered_model_alias(name, CHALLENGER, version)
        mv = client.get_model_version(name, version)
    log.info("registry: %s version %s (alias %s) from %s", name, version, CHALLENGER, source)
    return {"name": name, "version": version, "run_id": source_run, "source": mv.source,
            "aliases": sorted(str(a) for a in (mv.aliases or [])), "tags": dict(mv.tags or {})}


# -- promote -----------------------------------------------------------------------------------------------------

def _decide(metric: str, margin: float, candidate: str, champion: str | None, cand_value: float | None,
            champ_value: float | None, cand_raw: str | None, champ_raw: str | None) -> tuple[bool, str]:
    tag = f"{EVAL_PREFIX}{metric}"
    if cand_raw is None:
        return False, f"not evaluated: no {tag} tag"
    if cand_value is None:
        return False, f"not evaluated: {tag} tag is not a finite number ({cand_raw!r})"
    if champion is None:
        return True, "no champion yet"
    if champion == candidate:
        return False, "already champion"
    if champ_value is None:
        why = "has no" if champ_raw is None else f"has a non-numeric ({champ_raw!r})"
        return True, f"champion v{champion} {why} {tag} tag; {metric} {cand_value:.4f}"
    delta = cand_value - champ_value
    head = f"{metric} {cand_value:.4f} vs champion v{champion} {champ_value:.4f}: {delta:+.4f}"
    if delta <= 0:
        return False, f"{head} not better"
    if delta >= margin:
        return True, f"{head} >= margin {margin:.4f}"
    return False, f"{head} < margin {margin:.4f}"


def _versions(client, name: str) -> list:
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return client.search_model_versions(f"name = '{escaped}'")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _repair(client, name: str, champion: str | None, candidate: str) -> dict[str, str]:
    """Finish what a killed register / promote left (called under the registry lock, before a decision):

    * decision `promoting` on the version that holds `champion` (killed after the move): `promoted`;
    * decision `promoting` on another version (killed before the move), except the candidate (judged again now):
      `interrupted`;
    * no decision on a version older than the candidate (its register or promote died; a newer one is judged now):
      `interrupted`.

    Returns {version: new decision} of the versions it changed."""
    changed: dict[str, str] = {}
    for mv in _versions(client, name):
        version, tags = str(mv.version), mv.tags or {}
        decision = tags.get("promotion.decision")
        if decision == PROMOTING and version == champion:
            changed[version] = PROMOTED
        elif decision == PROMOTING and version != candidate:
            changed[version] = INTERRUPTED
            client.set_model_version_tag(name, version, "promotion.reason", (
                f"interrupted: promote was killed before {CHAMPION!r} moved ({tags.get('promotion.reason', '')})"
            )[:MAX_TAG_VALUE_LENGTH])
        elif decision is None and version != candidate and int(version) < int(candidate):
            changed[version] = INTERRUPTED
            client.set_model_version_tag(name, version, "promotion.reason",
                                         f"never judged: its register or promote did not finish before v{candidate} "
                                         f"was judged (`noisyrollout promote --version {version}` judges it)")
            client.set_model_version_tag(name, version, "promotion.time", _now())
        else:
            continue
        client.set_model_version_tag(name, version, "promotion.decision", changed[version])
        log.warning("registry: %s v%s left by an interrupted register/promote: marked %s", name, version,
                    changed[version])
    return changed


def promote(*, name: str, metric: str = "mean_accuracy", margin: float = 0.0, version: str | None = None,
            tracking_uri: str | None = None) -> dict:
    """Decide whether the candidate (`version`, else the `challenger`) takes the `champion` alias.

    Never an unevaluated version (no `eval.<metric>` tag); with no champion yet: promoted; otherwise promoted iff
    candidate - champion > 0 and >= margin (a champion with no metric tag loses). Every decision is recorded on
    the candidate version as promotion.* tags, before the alias moves; one promote per store at a time; what a
    killed register / promote left is repaired first (`_repair`).

    Returns {"name", "candidate", "champion_before", "champion_after", "decision", "reason", "metric",
    "candidate_value", "champion_value", "margin"}."""
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise NoisyRolloutError(f"promote: margin must be a finite number >= 0, not {margin}")
    uri = _resolve(tracking_uri)
    check_store(uri)
    _require_store_file(uri)
    client = _client(uri)
    with _registry_lock(uri, f"promoting {name!r}"):
        return _promote_locked(client, uri, name=name, metric=metric, margin=margin, version=version)


def _promote_locked(client, uri: str, *, name: str, metric: str, margin: float, version: str | None) -> dict:
    from mlflow.exceptions import MlflowException

    rm = _registered_model(client, name, uri)
    aliases = _aliases(rm)
    candidate = str(version) if version is not None else aliases.get(CHALLENGER)
    if candidate is None:
        raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: model {name!r} has no {CHALLENGER!r} alias "
                                f"and no version was given: nothing to promote")
    champion = aliases.get(CHAMPION)
    tag = f"{EVAL_PREFIX}{metric}"

    with _mlflow_errors(uri, f"reading {name!r} versions"):
        try:
            cand_mv = client.get_model_version(name, candidate)
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise NoisyRolloutError(f"MLflow registry at {_safe_uri(uri)}: model {name!r} has no version "
                                    f"{candidate}") from None
        champ_mv = client.get_model_version(name, champion) if champion is not None else None
    cand_tags = cand_mv.tags or {}
    cand_raw = cand_tags.get(tag)
    champ_raw = (champ_mv.tags or {}).get(tag) if champ_mv is not None else None
    cand_value, champ_value = finite_or_none(cand_raw), finite_or_none(champ_raw)
    with _mlflow_errors(uri, f"repairing {name!r} versions left by an interrupted run"):
        repaired = _repair(client, name, champion, candidate)
    if repaired.get(candidate) == PROMOTED:   # this very promote was killed after the move: it is done now
        before = cand_tags.get("promotion.compared_to")
        return {"name": name, "candidate": candidate, "champion_before": None if before in (None, "none") else before,
                "champion_after": candidate, "decision": PROMOTED, "reason": cand_tags.get("promotion.reason", ""),
                "metric": cand_tags.get("promotion.metric", metric), "candidate_value": cand_value,
                "champion_value": None, "margin": margin}

    promoted, reason = _decide(metric, margin, candidate, champion, cand_value, champ_value, cand_raw, champ_raw)
    _pause("promote.decided")
    with _mlflow_errors(uri, f"recording the promotion decision on {name!r} v{candidate}"):
        record = {"promotion.reason": reason[:MAX_TAG_VALUE_LENGTH],
                  "promotion.compared_to": champion if champion is not None else "none",
                  "promotion.metric": metric, "promotion.time": _now(),
                  "promotion.decision": PROMOTING if promoted else REFUSED}   # the decision last: a set is complete
        for key, value in record.items():
            client.set_model_version_tag(name, candidate, key, value)
        if promoted:
            _pause("promote.tagged")
            client.set_registered_model_alias(name, CHAMPION, candidate)   # moves it off the old champion
            _pause("promote.moved")
            client.set_model_version_tag(name, candidate, "promotion.decision", PROMOTED)
    decision = PROMOTED if promoted else REFUSED
    log.info("registry: %s v%s %s: %s", name, candidate, decision, reason)
    return {"name": name, "candidate": candidate, "champion_before": champion,
            "champion_after": candidate if promoted else champion, "decision": decision, "reason": reason,
            "metric": metric, "candidate_value": cand_value, "champion_value": champ_value, "margin": margin}


# -- state -------------------------------------------------------------------------------------------------------

def registry_state(*, name: str, tracking_uri: str | None = None) -> dict:
    """{"name", "champion", "challenger", "versions": [{"version", "aliases", "eval.<metric>": float, ...,
    "promotion.decision", "promotion.reason"}, ...]} with the newest version first."""
    uri = _resolve(tracking_uri)
    check_store(uri)
    _require_store_file(uri)
    client = _client(uri)
    aliases = _aliases(_registered_model(client, name, uri))
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):
        by_version.setdefault(v, []).append(alias)
    with _mlflow_errors(uri, f"listing {name!r} versions"):
        found = _versions(client, name)
    versions = []
    for mv in sorted(found, key=lambda m: int(m.version), reverse=True):
        tags = mv.tags or {}
        row: dict[str, Any] = {"version": str(mv.version), "aliases": by_version.get(str(mv.version), [])}
        for key, value in sorted(tags.items()):
            if key.startswith(EVAL_PREFIX):
                v = finite_or_none(value)
                row[key] = v if v is not None else value
        row["promotion.decision"] = tags.get("promotion.decision")
        row["promotion.reason"] = tags.get("promotion.reason")
        versions.append(row)
    return {"name": name, "champion": aliases.get(CHAMPION), "challenger": aliases.get(CHALLENGER),
            "versions": versions}


def format_state(state: dict, decision: dict | None = None, *, limit: int = 5) -> str:
    """A few human lines: who holds champion / challenger, the last decision and why, the newest versions."""
    name = state.get("name", "?")
    champ, chall = state.get("champion"), state.get("challenger")
    lines = [f"registry {name}: champion {'v' + champ if champ else 'none'}, "
             f"challenger {'v' + chall if chall else 'none'}"]
    if decision:
        cand = decision.get("candidate")
        before, after = decision.get("champion_before"), decision.get("champion_after")
        if decision.get("decision") == "promoted":
            moved = f"champion moved {'v' + before if before else 'none'} -> v{after}"
        else:
            moved = f"champion stays {'v' + before if before else 'none'}"
        lines.append(f"decision: v{cand} {decision.get('decision', '?')} ({decision.get('reason', '')}); {moved}")
    metric = (decision or {}).get("metric")
    for row in state.get("versions", [])[:limit]:
        flag = f" [{', '.join(row['aliases'])}]" if row.get("aliases") else ""
        evals = {k: v for k, v in row.items() if k.startswith(EVAL_PREFIX)}
        if metric and f"{EVAL_PREFIX}{metric}" in evals:
            shown = {f"{EVAL_PREFIX}{metric}": evals[f"{EVAL_PREFIX}{metric}"]}
        else:
            shown = {k: v for k, v in evals.items() if k == "eval.mean_accuracy"} or dict(list(evals.items())[:1])
        vals = ", ".join(f"{k.removeprefix(EVAL_PREFIX)} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in shown.items()) or "not evaluated"
        dec = row.get("promotion.decision")
        why = f"; {dec}: {row.get('promotion.reason')}" if dec else ""
        lines.append(f"  v{row['version']}{flag}: {vals}{why}")
    if len(state.get("versions", [])) > limit:
        lines.append(f"  ... {len(state['versions']) - limit} older version(s)")
    return "\n".join(lines)


# -- what a version records: code, data, parameters, and its model card -----------------------------------------

def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def data_hashes(repo: Path = Path(".")) -> dict[str, str]:
    """The versions of the data a model saw: data.dvc's hash, and the prepared tables' hash from dvc.lock."""
    import yaml

    out: dict[str, str] = {}
    if (repo / "data.dvc").is_file():
        spec = yaml.safe_load((repo / "data.dvc").read_text()) or {}
        for o in spec.get("outs", []):
            out[f"data.{o.get('path')}"] = str(o.get("md5"))
    if (repo / "dvc.lock").is_file():
        lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
        for o in lock.get("stages", {}).get("prepare", {}).get("outs", []):
            out[f"prepared.{o.get('path')}"] = str(o.get("md5"))
    return out


KEY_PARAMS = ("seed", "model.base", "rollout.n_clean", "rollout.n_noisy", "noise.distortion", "noise.alpha0",
              "noise.anneal", "train.lr", "train.steps", "train.prompts_per_step", "train.estimator", "sft.enabled")


def key_params(params: Params) -> dict[str, str]:
    out = {}
    for key in KEY_PARAMS:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = str(node)
    return out


def version_tags(params: Params, experiment: str | None = None) -> dict[str, str]:
    """A new version's tags: `git_commit` (`-dirty` with uncommitted changes), `data_hash.*`, `param.*`, and
    `dvc_experiment` under `dvc exp run`."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    hashes = data_hashes()
    tags = {"git_commit": f"{commit}{'-dirty' if dirty else ''}" if commit else "unknown",
            "data_hashes": ", ".join(f"{k}={v}" for k, v in hashes.items()) or "unknown",
            **{f"data_hash.{k}": v for k, v in hashes.items()},
            **{f"param.{k}": v for k, v in key_params(params).items()}}
    if experiment:
        tags["dvc_experiment"] = experiment
    return tags


def model_card(params: Params, metrics: dict[str, Any], tags: dict[str, str]) -> str:
    """The version's description: what the policy is, its data, evaluation, key parameters, and how to load it."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k.endswith("accuracy"))
    knobs = "\n".join(f"| {k} | {v} |" for k, v in key_params(params).items())
    return (f"# {params.registry.model_name}\n\n"
            f"NoisyRollout GRPO policy (arXiv 2504.13055): each prompt's group mixes {params.rollout.n_clean} clean and "
            f"{params.rollout.n_noisy} distorted-image rollouts ({params.noise.distortion}, alpha0 {params.noise.alpha0}, "
            f"{params.noise.anneal} annealing); the update scores every response on the clean image.\n\n"
            f"Base policy: `{params.model.base}`; trained on `{params.data.train}` ({params.data.train_split}).\n"
            f"Code: git {tags.get('git_commit', 'unknown')}; data: {tags.get('data_hashes', 'unknown')}.\n\n"
            f"## Evaluation (greedy)\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            f"## Key parameters\n\n| parameter | value |\n|---|---|\n{knobs}\n\n"
            f"## Load\n\n```python\nimport mlflow\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
            f"mlflow.set_tracking_uri('sqlite:///mlruns.db')  # or your MLFLOW_TRACKING_URI\n"
            f"policy = mlflow.pyfunc.load_model('models:/{params.registry.model_name}@champion')  # .predict(table)\n"
            f"path = mlflow.artifacts.download_artifacts('models:/{params.registry.model_name}@champion') + '/artifacts/hf'\n"
            f"model = AutoModelForImageTextToText.from_pretrained(path)\nprocessor = AutoProcessor.from_pretrained(path)\n```\n\n"
            f"Serve it: `noisyrollout serve` (a REST endpoint on 127.0.0.1: POST /invocations).\n")
