"""MLflow tracking for the trainer: one run per training, params, per-step metrics, artifacts (the model registry is
`pipelines/registry.py`'s).

Only the driver process uses this module, and nothing else in the package imports mlflow: mlflow is imported
lazily inside the functions below (its import takes seconds).

Backend: a sqlite store (`<project root>/mlruns.db`: the current directory, or the repository when running in a
queued DVC experiment's temporary workspace; see `project_root`), unless the environment
variable MLFLOW_TRACKING_URI or the `tracking_uri` argument says otherwise). With a local store, artifacts go to an
absolute local folder (default `<project root>/mlartifacts`), set as the experiment's `artifact_location` when the
experiment is created: with a sqlite store MLflow 3.17 would otherwise write them to `./mlruns` of whatever directory
the process runs in. With a tracking server (http(s), Databricks) the server's default artifact location is used,
so `mlflow server --serve-artifacts` receives them (`tracking.artifact_root` does not apply).

Browse with: `mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1` (from the directory that holds
mlruns.db; artifacts are read from the absolute locations recorded in the store).

All calls go through one `MlflowClient` bound to the run id: no global "active run" of the fluent API is ever
left behind. `Tracker` is a context manager that ends the run FINISHED, or FAILED when the block raises (KILLED on
KeyboardInterrupt); a run never finished explicitly is marked KILLED when the interpreter exits.

Nothing from the environment is logged: no environment variables, and parameters whose name looks like a
credential (token, secret, password, api key, ...) are dropped.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import platform
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from noisyrollout.errors import NoisyRolloutError

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0        # check_store: how long an http(s) store may take to answer GET /health

DEFAULT_ARTIFACT_DIR = "mlartifacts"           # <project root>/mlartifacts unless artifact_root is given

# MLflow's limits (mlflow/utils/validation.py): param values are truncated to 6000 characters, tag values to
# 8000, keys are at most 250; a log_batch call takes at most 100 params/tags and 1000 metrics.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
FLUSH_SECONDS = 5.0           # metrics are written at most this long after they are logged (Tracker.log_metrics)

# The project's one secret-name filter (`is_secret_key`): MLflow params and tags here, eval reports'
# configs (`eval.report.redact`). A name component (split on "." then into words: snake_case, kebab-case,
# camelCase) is secret-looking when one of its words is one of these...
_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "apikey",
                           "credential", "credentials", "auth", "authorization", "cookie", "bearer"})
# ...or when it ends with the word "key" (api_key, access_key, private_key, hf_key, key), but not when "key" is in
# the middle (num_key_value_heads stays). "tokens" (max_new_tokens) and "tokenizer" are not "token".
_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")


def project_root(cwd: Path | None = None) -> Path:
    """The folder whose `mlruns.db` / `mlartifacts/` hold this project's runs: the current directory, except inside
    a DVC experiment's temporary workspace (`<repo>/.dvc/tmp/exps/<tmp>/`, where `dvc queue` runs experiments), where
    it is `<repo>`, so that queued experiments log and register into the repository's store instead of a folder
    DVC deletes afterwards."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI if set, else `sqlite:///<project root>/mlruns.db` (the current
    directory, or the repository of a queued DVC experiment: `project_root`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns.db'}"


def is_server(uri: str) -> bool:
    """True for a tracking server (http(s), Databricks): it keeps the artifacts, not a local folder of ours."""
    return urllib.parse.urlsplit(str(uri)).scheme.lower() in ("http", "https", "databricks", "databricks-uc")


def artifact_dir(configured: Path | None = None) -> Path:
    """Absolute artifact folder: `configured` (relative paths are taken from the project root), else
    `<project root>/mlartifacts`."""
    path = Path(configured) if configured is not None else Path(DEFAULT_ARTIFACT_DIR)
    return (path if path.is_absolute() else project_root() / path).expanduser().resolve()


_resolve_tracking_uri = tracking_uri   # Tracker's `tracking_uri` argument shadows the function's name


def run_name(params: Any, experiment: str | None = None) -> str:
    """What a training run is, as its MLflow run name: `<profile>-<distortion>-<n_clean>x<n_noisy>-seed<k>`, e.g.
    `embedded-crop_fill-4x4-seed0` (vanilla GRPO: `...-8x0-...`), then `-<experiment>` under `dvc exp run`
    (`experiment`, default the DVC_EXP_NAME that DVC sets)."""
    model = params.model
    profile = "embedded" if model.embedded else Path(str(model.name_or_path)).name
    distortion = re.sub(r"[^\w.-]+", "-", params.noise.distortion)
    name = f"{profile}-{distortion}-{params.rollout.n_clean}x{params.rollout.n_noisy}-seed{params.rl_seed}"
    experiment = experiment if experiment is not None else os.environ.get("DVC_EXP_NAME")
    return f"{name}-{experiment}" if experiment else name


def is_secret_key(name: str) -> bool:
    """True when any component of a (dotted) parameter name looks like it holds a credential."""
    for part in str(name).split("."):
        words = [w.lower() for w in _WORD_SPLIT.split(part) if w]
        if not words:
            continue
        if any(w in _SECRET_WORDS for w in words) or words[-1] == "key":
            return True
    return False


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings flattened to `section.key`; values `str()`-ed and truncated to MLflow's limit;
    secret-looking names dropped."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_secret_key(name):
            continue
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name))
            continue
        if len(name) > MAX_KEY_LENGTH:
            log.warning("tracking: parameter name longer than %d characters skipped: %s...", MAX_KEY_LENGTH,
                        name[:60])
            continue
        out[name] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return out


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, absolute (None for in-memory databases and other schemes)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


def finite_or_none(value: Any) -> float | None:
    """`value` as a finite float, or None (None, bools, non-numbers, nan, inf)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


class Tracker:
    """One MLflow run of an experiment (created, or resumed from `run_id`).

    >>> with Tracker("noisyrollout-embedded", run_name="rl") as tr:      # doctest: +SKIP
    ...     tr.log_params(cfg.model_dump()); tr.log_system_info()
    ...     for m in steps: tr.log_metrics(m.to_dict(), step=m.step)
    ...     tr.log_artifact_dir(out / "model", "model")
    """

    run_id: str

    def __init__(self, experiment: str, *, run_name: str | None = None, tracking_uri: str | None = None,
                 artifact_root: Path | None = None, run_id: str | None = None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import RunStatus

        self.tracking_uri = tracking_uri or _resolve_tracking_uri()
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.artifact_root = artifact_dir(artifact_root)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._finished = False
        self._pending: list[Any] = []              # metrics not yet written (see log_metrics)

        if run_id is not None:
            run = self.client.get_run(run_id)   # raises MlflowException (RESOURCE_DOES_NOT_EXIST) for a bad id
            self.experiment_id = run.info.experiment_id
            self.run_id = run.info.run_id
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            self.experiment_id = self._experiment_id(experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            self.resumed = False
        self.artifact_uri = run.info.artifact_uri
        self._flushed_at = time.monotonic()
        atexit.register(self._at_exit)

    # -- experiment / run lifecycle --------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                if is_server(self.tracking_uri):   # the server decides (with --serve-artifacts: proxied uploads)
                    return self.client.create_experiment(name)
                self.artifact_root.mkdir(parents=True, exist_ok=True)
                return self.client.create_experiment(name, artifact_location=self.artifact_root.as_uri())
            except MlflowException as e:   # created concurrently by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise e
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        if not is_server(self.tracking_uri) and exp.artifact_location.rstrip("/") != self.artifact_root.as_uri().rstrip("/"):
            log.warning("tracking: experiment %r already exists with artifact location %s (not %s); artifacts go "
                        "there", name, exp.artifact_location, self.artifact_root)
        return exp.experiment_id

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED). A second call does nothing."""
        if self._finished:
            return
        self._finished = True
        atexit.unregister(self._at_exit)
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def _at_exit(self) -> None:
        try:
            self.finish("KILLED")
        except Exception:   # the interpreter is going down: never raise from here
            pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- params, metrics, tags -------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts flattened to `section.key`, values `str()`-ed and truncated to 6000 characters,
        secret-looking names (token, key, secret, password, ...) dropped.

        MLflow params are immutable: on a resumed run, a param already logged with the same value is skipped, and
        one logged with a different value is kept as it was (warning), its new value tagged `param_changed.<key>`.
        """
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        existing = self.client.get_run(self.run_id).data.params
        new: list[Param] = []
        changed: list[RunTag] = []
        for k, v in flat.items():
            if k not in existing:
                new.append(Param(k, v))
            elif existing[k] != v:
                log.warning("tracking: param %s already logged as %r; new value %r kept as tag param_changed.%s",
                            k, existing[k], v, k)
                changed.append(RunTag(f"param_changed.{k}"[:MAX_KEY_LENGTH], v[:MAX_TAG_VALUE_LENGTH]))
        for i in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + _PARAMS_PER_BATCH])
        for i in range(0, len(changed), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=changed[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of one step. nan / inf / None / non-numbers are skipped (MLflow would store nan, and its
        charts break on it; e.g. reward_noisy is nan when n_noisy = 0).

        They are written every FLUSH_SECONDS (and by `flush`, `finish`, or a read of the run's history) in one
        `log_batch` call for all steps since the last write, not one database commit per step (sqlite, 30 metrics:
        0.84 s per 120 steps one by one, 0.40 s buffered). The MLflow UI trails by at most FLUSH_SECONDS; a resumed
        run re-logs what a crash lost.

        Why not MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`): measured here on sqlite, 120
        steps x 30 metrics cost 2.26 s of work on its background thread (the caller blocked 0.08 s), against 0.59 s
        buffered and 1.17 s for one synchronous batch per step; on 2 cores that thread competes with the learners,
        and its queue loses what it holds on a kill just as this buffer does."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending += [Metric(str(k), v, ts, int(step)) for k, raw in metrics.items()
                          if (v := finite_or_none(raw)) is not None]
        if len(self._pending) >= _METRICS_PER_BATCH or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the metrics logged since the last write."""
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i:i + _METRICS_PER_BATCH])
        self._flushed_at = time.monotonic()

    def last_logged_step(self, key: str) -> int:
        """The highest step at which `key` was logged in this run, -1 if never (a resumed run starts after it)."""
        self.flush()
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(str(k)[:MAX_KEY_LENGTH], str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()
                 if not is_secret_key(str(k))]
        for i in range(0, len(batch), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch[i:i + _PARAMS_PER_BATCH])

    def log_system_info(self) -> None:
        """Python / torch / transformers / mlflow versions, platform, CPU count and host name, as `system.*` tags
        (tags, not params: a run resumed on another machine may update them). No environment variables."""
        self.set_tags({
            "system.python": platform.python_version(),
            "system.python_implementation": platform.python_implementation(),
            "system.platform": platform.platform(),
            "system.torch": _package_version("torch"),
            "system.transformers": _package_version("transformers"),
            "system.mlflow": _package_version("mlflow"),
            "system.noisyrollout": _package_version("noisyrollout"),
            "system.cpu_count": os.cpu_count() or 0,
            "system.hostname": socket.gethostname(),
            "system.executable": sys.executable,
        })

    # -- artifacts and the registry ----------------------------------------------------------------------

    def log_artifact_dir(self, path: Path, artifact_path: str) -> None:
        """Every file under `path` (e.g. the final HF model folder) to `<run artifacts>/<artifact_path>/`."""
        path = Path(path)
        if not path.is_dir():
            raise NotADirectoryError(f"not a folder: {path}")
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_figure_png(self, path: Path, artifact_path: str = "plots") -> None:
        """One image file (e.g. training.png) to `<run artifacts>/<artifact_path>/<name>`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        self.client.log_artifact(self.run_id, str(path), artifact_path)


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def safe_uri(uri: str) -> str:
    """The URI (or any text holding URIs, e.g. an MLflow error quoting the URL it called) with every
    `user:password@` part masked as `***@` (for messages)."""
    return _USERINFO.sub("***@", str(uri))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without its `user:password@` part, user, password), the two percent-decoded; (uri, None, None) when
    it has none. A child process given the bare URI and MLFLOW_TRACKING_USERNAME / _PASSWORD authenticates the same
    (HTTP basic auth) and never quotes the credentials in its own messages."""
    parts = urllib.parse.urlsplit(str(uri))
    if "@" not in parts.netloc:
        return str(uri), None, None
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    user = urllib.parse.unquote(parts.username or "")
    password = None if parts.password is None else urllib.parse.unquote(parts.password)
    return bare, user, password


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most `limit` characters, URI credentials masked (`safe_uri`)."""
    text = safe_uri(str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."




def check_store(uri: str) -> None:
    """Raise NoisyRolloutError (one line naming the URI) when the tracking store cannot be reached.

    sqlite: the database file's folder must exist and be writable (and an existing file must be a SQLite
    database); http(s): `GET <uri>/health` must answer 200 within ~5 s (no MLflow retry loop); other schemes: one
    `search_experiments(max_results=1)` call."""
    safe = safe_uri(uri)
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise NoisyRolloutError(f"MLflow store {safe}: not a sqlite:///<path> URI")
        db = sqlite_path(uri)
        if db is None:
            return   # in-memory
        if not db.parent.is_dir():
            raise NoisyRolloutError(f"MLflow store {safe}: folder {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK | os.X_OK):
            raise NoisyRolloutError(f"MLflow store {safe}: folder {db.parent} is not writable")
        if db.exists():
            if not db.is_file() or not os.access(db, os.R_OK | os.W_OK):
                raise NoisyRolloutError(f"MLflow store {safe}: {db} is not a readable and writable file")
            with db.open("rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise NoisyRolloutError(f"MLflow store {safe}: {db} is not a SQLite database")
        return
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        netloc = parts.netloc.rsplit("@", 1)[-1]   # no credentials in the request line
        health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:
            with urllib.request.urlopen(urllib.request.Request(health, method="GET"),
                                        timeout=HEALTH_TIMEOUT_S) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            raise NoisyRolloutError(f"MLflow store {safe}: GET /health answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise NoisyRolloutError(f"MLflow store {safe}: not reachable ({first_line(reason)})") from None
        if status != 200:
            raise NoisyRolloutError(f"MLflow store {safe}: GET /health answered HTTP {status}")
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:   # MLflow, connection and database errors alike: one line naming the store
        raise NoisyRolloutError(f"MLflow store {safe}: not reachable ({first_line(e)})") from None
