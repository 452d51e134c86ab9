"""Secrets given by environment never leave it (issue #25, case 7).

A judge key, MLflow / Prefect / cloud credentials and the keys the judge must never send (OPENAI_API_KEY, ...) are set
to fresh random values; then a full toy run: the DAG as a Prefect flow (`noisyrollout flow`: every stage through
`dvc repro --single-item`) in a temporary git + DVC repo, `noisyrollout eval`, `summary` and `params`. The judge points
at a fake OpenAI-compatible server on 127.0.0.1 that answers only the right Bearer key, so the key is live and sent.
Afterwards every file the run produced (the repo with dvc.lock, params.yaml, reports/, runs/, mlruns.db,
mlartifacts/, .dvc/; Prefect's home and database; HOME, TMPDIR, DVC's site cache, the judge caches) and every
captured line of output is searched for each secret: raw, URL-encoded, JSON-escaped, base64 at any alignment, and
each 16-hex-digit third of it (a truncated copy). SQLite files (mlruns.db, prefect.db) are searched byte by byte and
as a full SQL dump; MLflow's params, tags and descriptions are also read back through its client. gzip / zip members
and git's zlib objects are searched inflated.

The search must be able to fail: `test_the_search_finds_a_planted_secret` plants secrets (an MLflow param, a
gzip'd base64 copy, a URL-encoded one) and checks each is found; the full run re-checks its own store that way.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.servers import serving

# Credentials a user may have in the environment while running the pipeline. The judge sends only its own key;
# OPENAI_* are meant for another endpoint; the rest are for stores and clusters this run does not (or only
# locally) use. None of them may be written anywhere.
SECRET_ENV = (
    "NOISYROLLOUT_JUDGE_API_KEY", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN",
    "PREFECT_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
    "HF_TOKEN",
)
JUDGE_KEY = "NOISYROLLOUT_JUDGE_API_KEY"


def new_secret() -> str:
    """Three random 16-hex-digit parts joined by `/` and `+` (characters URL and JSON encoders change)."""
    return f"{secrets.token_hex(8)}/{secrets.token_hex(8)}+{secrets.token_hex(8)}"


def _base64_forms(raw: bytes) -> dict[str, bytes]:
    """The base64 text a secret becomes inside a longer base64-encoded string, at each of the 3 alignments (only
    the 4-character groups that encode the secret alone), standard and URL-safe alphabets."""
    forms: dict[str, bytes] = {}
    for shift in range(3):
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            text = encode(b"\0" * shift + raw)
            first, last = (1 if shift else 0), (shift + len(raw)) // 3
            forms[f"{name}@{shift}"] = text[4 * first:4 * last]
    return forms


def needles(value: str) -> dict[str, bytes]:
    """Every form of `value` the search looks for, by name."""
    forms = {
        "raw": value.encode(),
        "url-encoded": urllib.parse.quote(value, safe="").encode(),
        "url-encoded (+)": urllib.parse.quote_plus(value).encode(),
        "json-escaped": json.dumps(value)[1:-1].replace("/", "\\/").encode(),
        **_base64_forms(value.encode()),
    }
    for i, part in enumerate(re.findall(r"[0-9a-f]{16}", value)):
        forms[f"part {i + 1} of 3"] = part.encode()
    return forms


@dataclass
class Leak:
    secret: str      # the environment variable whose value leaked
    form: str        # which form of it was found
    where: str       # file (and member / table), or the output's name

    def __str__(self) -> str:
        return f"{self.secret} ({self.form}) in {self.where}"


@dataclass
class Secrets:
    """Fresh random values for `names`, and a search for any of them in bytes, files and folders."""

    names: tuple[str, ...] = SECRET_ENV
    values: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = self.values or {name: new_secret() for name in self.names}
        self._needles = {name: needles(value) for name, value in self.values.items()}

    def search(self, data: bytes, where: str) -> list[Leak]:
        return [Leak(name, form, where) for name, forms in self._needles.items()
                for form, needle in forms.items() if needle in data]

    def search_text(self, outputs: Mapping[str, str]) -> list[Leak]:
        return [leak for where, text in outputs.items() for leak in self.search(text.encode(errors="replace"), where)]

    def search_file(self, path: Path) -> list[Leak]:
        """The file's bytes; inflated gzip / zip members and git loose objects; a SQLite database's SQL dump."""
        data = path.read_bytes()
        found = self.search(data, str(path))
        for member, inflated in _inflated(path, data):
            found += self.search(inflated, f"{path} [{member}]")
        if data.startswith(b"SQLite format 3\x00"):
            found += self.search(sqlite_dump(path).encode(errors="replace"), f"{path} [SQL dump]")
        return found

    def search_tree(self, *roots: Path) -> tuple[list[Leak], int, int]:
        """(leaks, files searched, bytes searched) under `roots` (symlinks not followed)."""
        leaks, files, size = [], 0, 0
        for root in roots:
            for path in sorted(_files(root)):
                leaks += self.search_file(path)
                files += 1
                size += path.stat().st_size
        return leaks, files, size


def _files(root: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _inflated(path: Path, data: bytes) -> Iterator[tuple[str, bytes]]:
    if data[:2] == b"\x1f\x8b":
        try:
            yield "gzip", gzip.decompress(data)
        except (OSError, EOFError):
            pass
    elif data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    yield info.filename, archive.read(info)
        except zipfile.BadZipFile:
            pass
    elif "objects" in path.parts and ".git" in path.parts and data[:1] == b"\x78":
        try:
            yield "zlib", zlib.decompress(data)
        except zlib.error:
            pass


def sqlite_dump(path: Path) -> str:
    """Every row of every table as SQL text (what `.dump` prints); '' when the file cannot be opened."""
    try:
        with sqlite3.connect(path) as db:
            return "\n".join(db.iterdump())
    except sqlite3.Error:
        return ""


def user_only_as_mlflow_user(db: Path, user: str, scratch: Path) -> list[str]:
    """Where MLflow's store holds `user` as the `mlflow.user` tag or a user column (`table.column`); raises when a
    copy of the store with those cleared (and vacuumed) still holds it anywhere."""
    import shutil

    s = Secrets(names=("user",), values={"user": user})
    with sqlite3.connect(db) as live:
        live.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    copy = Path(tempfile.mkdtemp(dir=scratch)) / "scrubbed.db"
    shutil.copy(db, copy)
    places = []
    with sqlite3.connect(copy) as store:
        for (table,) in store.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            columns = [row[1] for row in store.execute(f'PRAGMA table_info("{table}")')]
            for key, value in (("key", "value"), ("tag_key", "tag_value")):
                if {key, value} <= set(columns) and store.execute(
                        f'DELETE FROM "{table}" WHERE "{key}" = ? AND "{value}" = ?', ("mlflow.user", user)).rowcount:
                    places.append(f"{table} (mlflow.user)")
            for column in (c for c in columns if c in ("user_id", "last_updated_by", "created_by")):
                if store.execute(f'UPDATE "{table}" SET "{column}" = NULL WHERE "{column}" = ?', (user,)).rowcount:
                    places.append(f"{table}.{column}")
    with sqlite3.connect(copy) as store:
        store.execute("VACUUM")
    leaks = s.search_file(copy)
    shutil.rmtree(copy.parent)
    assert leaks == [], f"MLflow's store holds the tracking user name outside mlflow.user: {leaks}"
    return places


# -- the fake judge ------------------------------------------------------------------------------------------------

class FakeJudge(ThreadingHTTPServer):
    """POST /v1/chat/completions on 127.0.0.1: 200 with the answer NONE when the Authorization header is exactly
    `Bearer <key>`, else 401. Keeps every request's raw headers and body."""

    daemon_threads = True

    def __init__(self, key: str) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.key = key
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def authorized(self) -> int:
        with self.lock:
            return sum(r["authorized"] for r in self.requests)


class _JudgeHandler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        authorized = self.headers.get("Authorization") == f"Bearer {self.server.key}"
        with self.server.lock:
            self.server.requests.append({"headers": bytes(self.headers), "body": body, "authorized": authorized,
                                         "path": self.path})
        if not authorized or self.path != "/v1/chat/completions":
            self.send_error(401 if not authorized else 404)
            return
        reply = json.dumps({"id": "x", "object": "chat.completion", "created": int(time.time()), "model": "judge",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "NONE"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    with serving(FakeJudge(new_secret())) as server:
        yield server


# -- the search can fail ---------------------------------------------------------------------------------------------

def test_the_search_finds_a_planted_secret(tmp_path):
    """A secret written as an MLflow param (sqlite), base64 inside a gzip'd Basic-auth header, URL-encoded in a
    query string, or cut to its first third is found; other files are clean."""
    s = Secrets(names=("A", "B", "C", "D"))
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        db.execute("CREATE TABLE params (key TEXT, value TEXT, run_uuid TEXT)")
        db.execute("INSERT INTO params VALUES ('judge.key', ?, 'r1')", (s.values["A"],))
    (tmp_path / "log.gz").write_bytes(gzip.compress(
        b"Authorization: Basic " + base64.b64encode(f"user:{s.values['B']}".encode())))
    (tmp_path / "url.txt").write_text("GET /?token=" + urllib.parse.quote(s.values["C"], safe="") + " HTTP/1.1")
    (tmp_path / "cut.txt").write_text("key=" + s.values["D"][:20] + "...")
    (tmp_path / "clean.json").write_text(json.dumps({"base_url": "http://127.0.0.1:1/v1", "model": "judge"}))

    leaks, files, _ = s.search_tree(tmp_path)
    found = {(leak.secret, Path(leak.where.split(" [")[0]).name) for leak in leaks}
    assert found == {("A", "mlruns.db"), ("B", "log.gz"), ("C", "url.txt"), ("D", "cut.txt")}, leaks
    assert files == 5
    assert {leak.form for leak in leaks if leak.secret == "B"} & {"base64@0", "base64@1", "base64@2"}
    assert {leak.form for leak in leaks if leak.secret == "C"} >= {"url-encoded", "part 1 of 3"}
    assert s.search_text({"clean": "nothing here", "stderr": f"token {s.values['A']}"}) != []


# -- URIs and URLs with credentials in them ------------------------------------------------------------------------

def test_uri_credentials_are_masked_and_moved_out_of_the_uri():
    from noisyrollout.tracking import first_line, safe_uri, split_credentials

    pw = new_secret()
    quoted = urllib.parse.quote(pw, safe="")
    uri = f"https://alice:{quoted}@mlflow.example.invalid:5000/prefix"
    assert pw not in safe_uri(uri) and quoted not in safe_uri(uri)
    assert safe_uri(uri) == "https://***@mlflow.example.invalid:5000/prefix"
    error = RuntimeError(f"API request to {uri}/api/2.0/mlflow/runs/get failed with exception boom")
    assert quoted not in first_line(error) and "***@mlflow.example.invalid" in first_line(error)
    assert split_credentials(uri) == ("https://mlflow.example.invalid:5000/prefix", "alice", pw)
    assert split_credentials("sqlite:///tmp/mlruns.db") == ("sqlite:///tmp/mlruns.db", None, None)


def test_judge_settings_and_errors_hold_no_url_credentials(tmp_path):
    """A judge base URL with `user:password@` (some gateways take credentials so) is masked in `describe()`, which
    eval reports record, and in the one-line errors that land in `judge_error` of every result."""
    from eval.judge import Judge, JudgeError, JudgeRequest

    pw = new_secret()
    quoted = urllib.parse.quote(pw, safe="")
    judge = Judge(base_url=f"http://bob:{quoted}@127.0.0.1:9/v1", model="m", api_key=new_secret(), cache_dir=None,
                  max_retries=0, timeout_s=2)
    assert quoted not in json.dumps(judge.describe()) and "***@127.0.0.1:9" in judge.describe()["base_url"]
    assert quoted not in repr(judge) and "***@127.0.0.1:9" in repr(judge)
    with pytest.raises(JudgeError) as error:
        judge.extract(JudgeRequest(question="q", response="r"))
    assert quoted not in str(error.value) and "***@127.0.0.1:9" in str(error.value), str(error.value)
    judge.close()


def test_serve_never_prints_tracking_credentials(tmp_path):
    """`noisyrollout serve` against a tracking URI with `user:password@`: its own line and the `mlflow models serve`
    it starts (whose errors quote the URL it calls) print neither part of the credentials; the child gets them as
    MLFLOW_TRACKING_USERNAME / _PASSWORD instead (here the server is absent, so it fails: nothing listens on port 9)."""
    import shutil
    import subprocess
    import sys

    pw = new_secret()
    s = Secrets(names=("password",), values={"password": pw})
    shutil.copy(Path(__file__).parents[2] / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{urllib.parse.quote(pw, safe='')}@127.0.0.1:9/",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    result = subprocess.run([str(Path(sys.executable).parent / "noisyrollout"), "serve", "--port", "9"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "http://***@127.0.0.1:9/" in out, out[-2000:]
    assert "127.0.0.1" in out and "Connection refused" in out, out[-2000:]   # it did call the (absent) server
    assert s.search_text({"noisyrollout serve": out}) == [], out[-2000:]


# -- the full toy run --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_toy_run_writes_and_prints_no_secret(tmp_path, fake_judge, monkeypatch):
    from mlflow import MlflowClient

    from tests.toyrepo import make_repo, run

    s = Secrets(values={**{n: new_secret() for n in SECRET_ENV}, JUDGE_KEY: fake_judge.key})
    home, tmp, prefect_home, dvc_site = (tmp_path / n for n in ("home", "tmp", "prefect_home", "dvc_site"))
    for folder in (home, tmp, prefect_home, dvc_site, tmp_path / "repo"):
        folder.mkdir()
    for name in [k for k in os.environ if k.startswith(("XDG_", "PREFECT_", "HF_HOME", "MPLCONFIGDIR"))]:
        monkeypatch.delenv(name)
    for name, value in s.values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(home))                     # whatever a tool writes to ~ is searched too
    monkeypatch.setenv("TMPDIR", str(tmp))                    # and its temporary files
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(dvc_site))   # DVC's index (else /var/tmp/dvc)
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_BASE_URL", fake_judge.base_url)
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_MODEL", "judge")
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_CACHE_DIR", str(tmp_path / "judge_cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    start = time.monotonic()
    # sampled answers: the toy policy's greedy answers are empty, and the judge is asked only about non-empty ones
    repo = make_repo(tmp_path / "repo", extra={"eval": {"temperature": 1.0}})
    outputs: dict[str, str] = {}
    timings = {"make_repo": time.monotonic() - start}

    def step(name: str, *cmd: str, **env: str) -> None:
        began = time.monotonic()
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            result = run(repo, *cmd)
        timings[name] = time.monotonic() - began
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = result.stdout, result.stderr

    step("noisyrollout flow", "noisyrollout", "flow")
    dag_judged = fake_judge.authorized()
    step("noisyrollout eval", "noisyrollout", "eval", "--datasets", "embedded_test", "--limit", "6",
         "--output-dir", "runs/eval-adhoc", NOISYROLLOUT_JUDGE_CACHE_DIR=str(tmp_path / "judge_cache_adhoc"))
    step("noisyrollout summary", "noisyrollout", "summary")
    step("noisyrollout params", "noisyrollout", "params")
    elapsed = time.monotonic() - start

    # the run happened, through every part searched below
    assert "flow: COMPLETED" in outputs["noisyrollout flow stdout"], outputs["noisyrollout flow stdout"][-3000:]
    assert json.loads((repo / "reports/promotion.json").read_text())["decision"] == "promoted"
    assert (repo / "dvc.lock").is_file() and (repo / "mlruns.db").is_file() and any((repo / "mlartifacts").iterdir())
    with sqlite3.connect(prefect_home / "prefect.db") as db:                        # the stages' lines are in Prefect
        assert db.execute("SELECT count(*) FROM log WHERE message LIKE 'Running stage ''train''%'").fetchone()[0] == 1
    # the key was live: sent as the Bearer token by the DAG's evaluate stage and by `noisyrollout eval`
    assert dag_judged > 0 and fake_judge.authorized() > dag_judged, (dag_judged, fake_judge.authorized())
    assert all(r["authorized"] for r in fake_judge.requests)
    summary = json.loads((repo / "runs/eval-adhoc/summary.json").read_text())
    assert summary["config"]["judge"]["base_url"] == fake_judge.base_url, summary["config"]
    # ... and only the judge key went out, only in the Authorization header
    others = Secrets(values={k: v for k, v in s.values.items() if k != JUDGE_KEY})
    for r in fake_judge.requests:
        assert others.search(r["headers"] + r["body"], "a request to the judge") == []
        assert s.search(r["body"], "a request body to the judge") == []
        assert r["headers"].count(fake_judge.key.encode()) == 1

    # MLflow read back: params, tags, descriptions of every run, model and version
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")
    texts: dict[str, str] = {}
    for exp in client.search_experiments():
        texts[f"experiment {exp.name} tags"] = json.dumps(exp.tags)
        for r in client.search_runs([exp.experiment_id]):
            texts[f"run {r.info.run_name} params"] = json.dumps(r.data.params)
            texts[f"run {r.info.run_name} tags"] = json.dumps(r.data.tags)
    for model in client.search_registered_models():
        texts[f"model {model.name}"] = json.dumps({"description": model.description, "tags": model.tags})
        for v in client.search_model_versions(f"name='{model.name}'"):
            texts[f"model {model.name} v{v.version}"] = json.dumps({"description": v.description, "tags": v.tags})
    params = json.loads(next(t for k, t in texts.items() if k.endswith("params") and '"train.steps"' in t))
    assert params["train.steps"] == "2" and len(params) > 50
    assert any("system.hostname" in t for t in texts.values())
    assert s.search_text(texts) == []

    # every file, every line
    began = time.monotonic()
    leaks, files, size = s.search_tree(tmp_path)
    leaks += s.search_text(outputs)
    timings["search"] = time.monotonic() - began
    # MLflow records the tracking user name as the `mlflow.user` of what it logs (who did it, by design): the one
    # place a user name (an identity, not a credential) may be; nowhere else, and nowhere in the store otherwise
    user_places = user_only_as_mlflow_user(repo / "mlruns.db", s.values["MLFLOW_TRACKING_USERNAME"], tmp_path.parent)
    leaks = [leak for leak in leaks if not (leak.secret == "MLFLOW_TRACKING_USERNAME"
                                            and Path(leak.where.split(" [")[0]).name.startswith("mlruns.db"))]
    assert leaks == [], "\n".join(map(str, leaks))
    print(f"\nfull toy run {elapsed:.0f} s; searched {files} files ({size / 1e6:.1f} MB) and "
          f"{sum(len(t) for t in outputs.values()) / 1e3:.0f} kB of output for {len(s.values)} secrets x "
          f"{len(needles(new_secret()))} forms: no leak; judge requests {len(fake_judge.requests)} "
          f"(DAG {dag_judged}), all with the key; user name only in {user_places}; " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))

    # ... and the same search does see a secret once one is written into the store
    run_id = next(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    client.log_param(run_id, "planted", s.values["MLFLOW_TRACKING_PASSWORD"])
    planted = s.search_file(repo / "mlruns.db")           # its SQL dump reads a write-ahead log too
    # (the user name is found there too, as the mlflow.user checked above)
    assert {leak.secret for leak in planted} - {"MLFLOW_TRACKING_USERNAME"} == {"MLFLOW_TRACKING_PASSWORD"}, planted
