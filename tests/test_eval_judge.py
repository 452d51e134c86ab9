"""The optional LLM judge against a tiny OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import pytest
from pydantic import SecretStr

from eval.fixtures import write_fixture_data
from eval.judge import Judge, JudgeError, JudgeRequest
from eval.runner import eval_sampling, regrade, run_eval
from noisyrollout.errors import ConfigError
from noisyrollout.rollout.engine import Generation, Prompt, SamplingParams
from tests.servers import serving

KEY = "sk-test-0123456789-SECRET"


class FakeChatServer(ThreadingHTTPServer):
    """POST /chat/completions: answers with the text after 'ANSWER=' in the user message, or NONE.

    `fail_next` makes the next N requests fail with `fail_status` (and a `Retry-After: retry_after` header when
    set); `truncate_next` makes the next N replies close the connection halfway through the body; `slow_next` makes
    the next N replies wait `delay` seconds first; `malformed_next` makes the next N replies valid JSON without
    `choices`. Every request is recorded with its headers and arrival time.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.fail_next = 0
        self.fail_status = 500
        self.retry_after: str | None = None
        self.truncate_next = 0
        self.slow_next = 0
        self.delay = 0.0
        self.malformed_next = 0
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up before a slow reply: expected, keep test output quiet

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeChatServer

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _take(self, name: str) -> bool:
        """Use up one of the server's `name` counter (under its lock): whether this request gets that treatment."""
        left = getattr(self.server, name)
        setattr(self.server, name, max(0, left - 1))
        return left > 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "time": time.monotonic()})
            fail, truncate, slow, malformed = (self._take(name) for name in ("fail_next", "truncate_next",
                                                                             "slow_next", "malformed_next"))
        if slow:
            time.sleep(self.server.delay)
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        if fail:
            self.send_response(self.server.fail_status)
            if self.server.retry_after is not None:
                self.send_header("Retry-After", self.server.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        found = re.search(r"ANSWER=(\S+)", body["messages"][-1]["content"])
        reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                     "content": found.group(1) if found else "NONE"}}]}
                           if not malformed else {"object": "error"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        # a truncated reply: half the promised body, then the connection closes (httpx: RemoteProtocolError)
        self.wfile.write(reply[:len(reply) // 2] if truncate else reply)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeChatServer]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with serving(FakeChatServer()) as srv:
        yield srv


def _judge(server: FakeChatServer, cache: Path | None, **kw: object) -> Judge:
    settings: dict[str, object] = {"api_key": KEY, "max_workers": 2, "timeout_s": 5, **kw}
    return Judge(base_url=server.base_url, model="judge-model", cache_dir=cache, **settings)  # type: ignore[arg-type]


def test_answers_and_sends_only_its_own_settings(server: FakeChatServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-OTHER-SECRET")  # meant for another endpoint: never sent
    monkeypatch.setenv("OPENAI_ORG_ID", "org-ambient")
    judge = Judge(base_url=server.base_url + "/", model="judge-model", api_key=SecretStr(KEY), cache_dir=None)
    assert judge.extract(JudgeRequest("What?", "so ANSWER=\\boxed{12} it is")) == "12"
    assert judge.extract(JudgeRequest("What?", "no answer here")) is None  # NONE
    [request, _] = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0.0
    assert request["body"]["messages"] == judge.messages(JudgeRequest("What?", "so ANSWER=\\boxed{12} it is"))
    assert "openai-organization" not in request["headers"]
    assert judge.stats.http_calls == 2 and judge.stats.retries == 0

    keyless = Judge(base_url=server.base_url, model="judge-model", cache_dir=None)  # a local server: no header
    assert keyless.api_key is None and keyless.extract(JudgeRequest("q", "ANSWER=3")) == "3"
    assert server.requests[-1]["auth"] is None
    judge.close()
    keyless.close()
    assert judge.extract(JudgeRequest("q", "ANSWER=4")) == "4"  # a closed judge opens a new client


def test_the_key_never_shows(server: FakeChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger (openai, httpx2, ours) at its most verbose
    for key in (KEY, SecretStr(KEY)):
        judge = _judge(server, tmp_path / "cache", api_key=key, max_retries=1)
        assert isinstance(judge.api_key, SecretStr) and judge.api_key.get_secret_value() == KEY
        assert KEY not in repr(judge) and KEY not in str(judge) and KEY not in json.dumps(judge.describe())
    server.fail_next = 1
    assert judge.extract(JudgeRequest("q", "ANSWER=8")) == "8"  # a retry, at debug level
    server.fail_next, server.fail_status = 1, 403
    [failed] = judge.extract_many([JudgeRequest("q", "ANSWER=9")])  # a failure, logged as a warning
    assert isinstance(failed, JudgeError) and KEY not in str(failed) and KEY not in repr(failed)
    assert server.requests[-1]["auth"] == f"Bearer {KEY}"
    assert "judge: HTTP 403" in caplog.text and KEY not in caplog.text
    assert KEY not in repr(judge) and "**********" in repr(judge)


def test_a_second_ask_is_answered_from_the_cache(server: FakeChatServer, tmp_path: Path) -> None:
    judge = _judge(server, tmp_path / "cache")
    request = JudgeRequest("q", "ANSWER=11")
    assert judge.extract(request) == "11" and len(server.requests) == 1
    assert judge.extract(request) == "11" and len(server.requests) == 1
    assert judge.stats.cache_hits == 1 and judge.stats.http_calls == 1
    fresh = _judge(server, tmp_path / "cache")  # another process later: the same files
    assert fresh.extract_many([request, request]) == ["11", "11"] and len(server.requests) == 1
    [entry] = (tmp_path / "cache").rglob("*.json")
    assert json.loads(entry.read_text()) == {"model": "judge-model", "content": "11"}
    entry.write_text("{not json")  # a damaged entry is asked again
    assert fresh.extract(request) == "11" and len(server.requests) == 2
    uncached = _judge(server, None)
    assert uncached.extract(request) == "11" and uncached.extract(request) == "11" and len(server.requests) == 4


def test_retries_a_500_then_succeeds(server: FakeChatServer, tmp_path: Path) -> None:
    server.fail_next = 2
    judge = _judge(server, tmp_path / "cache", max_retries=3)
    assert judge.extract(JudgeRequest("What?", "so ANSWER=42 it is")) == "42"
    assert len(server.requests) == 3 and judge.stats.retries == 2
    assert server.requests[-1]["auth"] == f"Bearer {KEY}"
    assert server.requests[-1]["body"]["model"] == "judge-model"


def test_gives_up_after_retries_and_on_client_errors(server: FakeChatServer, tmp_path: Path) -> None:
    judge = _judge(server, tmp_path / "cache", max_retries=2)
    server.fail_next = 10
    with pytest.raises(JudgeError, match="HTTP 500") as info:
        judge.extract(JudgeRequest("q", "ANSWER=1"))
    assert len(server.requests) == 3 and KEY not in str(info.value)
    server.fail_next, server.fail_status = 10, 401
    [result] = judge.extract_many([JudgeRequest("q", "ANSWER=2")])
    assert isinstance(result, JudgeError) and len(server.requests) == 4  # a 401 is not retried


def test_retries_a_reply_cut_off_mid_body(server: FakeChatServer, tmp_path: Path) -> None:
    server.truncate_next = 1
    judge = _judge(server, tmp_path / "cache", max_retries=2)
    [answer] = judge.extract_many([JudgeRequest("q", "ANSWER=7")])
    assert answer == "7"
    assert len(server.requests) == 2 and judge.stats.retries == 1 and judge.stats.failures == 0


@pytest.mark.parametrize("status", [429, 503])
def test_waits_for_retry_after(server: FakeChatServer, tmp_path: Path, status: int) -> None:
    server.fail_next, server.fail_status, server.retry_after = 1, status, "1"
    judge = _judge(server, tmp_path / "cache", max_retries=2)  # back-off alone would wait ~1 ms
    assert judge.extract(JudgeRequest("q", "ANSWER=5")) == "5"
    assert len(server.requests) == 2
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.95


def test_a_retry_after_beyond_two_minutes_fails_at_once(server: FakeChatServer, tmp_path: Path) -> None:
    server.fail_next, server.fail_status, server.retry_after = 1, 429, "3600"
    judge = _judge(server, tmp_path / "cache", max_retries=3)
    started = time.monotonic()
    with pytest.raises(JudgeError, match="^HTTP 429 from "):
        judge.extract(JudgeRequest("q", "ANSWER=6"))
    assert len(server.requests) == 1 and time.monotonic() - started < 5


def test_a_timeout_is_retried_then_fails(server: FakeChatServer, tmp_path: Path) -> None:
    server.slow_next, server.delay = 1, 1.5
    judge = _judge(server, tmp_path / "cache", max_retries=1, timeout_s=0.3)
    assert judge.extract(JudgeRequest("q", "ANSWER=13")) == "13"  # one timeout, then an answer in time
    assert len(server.requests) == 2 and judge.stats.retries == 1
    server.slow_next = 10
    started = time.monotonic()
    with pytest.raises(JudgeError, match="Timeout contacting .*gave up after 2 attempt") as info:
        judge.extract(JudgeRequest("q", "ANSWER=14"))
    assert len(server.requests) == 4 and time.monotonic() - started < 1.5 + 2  # did not wait for the replies
    assert KEY not in str(info.value) and info.value.__suppress_context__


def test_a_malformed_reply_fails_at_once(server: FakeChatServer, tmp_path: Path) -> None:
    server.malformed_next = 1
    judge = _judge(server, tmp_path / "cache", max_retries=3)
    [result] = judge.extract_many([JudgeRequest("q", "ANSWER=15")])
    assert isinstance(result, JudgeError) and str(result).startswith("malformed reply from ")
    assert len(server.requests) == 1 and judge.stats.failures == 1 and not list((tmp_path / "cache").rglob("*"))


def test_a_400_fails_at_once(server: FakeChatServer, tmp_path: Path) -> None:
    server.fail_next, server.fail_status = 10, 400
    judge = _judge(server, tmp_path / "cache", max_retries=3)
    with pytest.raises(JudgeError, match="^HTTP 400 from ") as info:
        judge.extract(JudgeRequest("q", "ANSWER=1"))
    assert len(server.requests) == 1 and judge.stats.retries == 0 and KEY not in str(info.value)


def test_connection_refused_gives_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = Judge(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, cache_dir=tmp_path / "cache",
                  max_retries=2, timeout_s=5)
    with pytest.raises(JudgeError, match="ConnectError contacting .*gave up after 3 attempt") as info:
        judge.extract(JudgeRequest("q", "ANSWER=1"))
    assert judge.stats.http_calls == 3 and KEY not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


class NoBoxEngine:
    """Responds without \\boxed{}: only the judge can find the answer (written as ANSWER=<x>)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        return [Generation(token_ids=[[0]], texts=[f"I think ANSWER={self.answers.get(p.text, 'x')}"])
                for p in prompts]


def test_judge_in_eval_caches_and_never_writes_the_key(server: FakeChatServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    expected = write_fixture_data(data)
    answers = {q.question: q.answer for q in expected["hallubench"] + expected["mathverse"]}
    answers[expected["mathverse"][2].question] = "99"  # a wrong extraction stays wrong
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_BASE_URL", server.base_url)
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_CACHE_DIR", str(tmp_path / "cache"))
    judge = Judge.from_env()
    assert judge is not None and judge.max_retries == 3 and judge.max_workers == 8
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.describe())

    server.fail_next = 1  # one transient failure inside the run: retried
    out = tmp_path / "out"
    summary = run_eval(NoBoxEngine(answers), data_dir=data, corpus_dir=None, datasets="hallubench,mathverse",
                       output_dir=out, sampling=eval_sampling(), judge=judge, progress=False)
    assert summary["benchmarks"]["hallubench"]["accuracy"] == 1.0
    assert summary["benchmarks"]["mathverse"]["accuracy"] == pytest.approx(2 / 3)
    rows = json.loads((out / "hallubench.json").read_text())["results"]
    assert all(r["graded_by"] == "judge" and r["judge_answer"] == r["answer"] for r in rows)
    calls = len(server.requests)
    assert calls == 7 + 1  # 4 + 3 questions, one retry

    # a re-grade of the same predictions costs nothing: every answer comes from the cache
    again = regrade(out, tmp_path / "again", judge=Judge.from_env(), progress=False)
    assert len(server.requests) == calls
    assert again["benchmarks"] == summary["benchmarks"]

    written = [p for d in (out, tmp_path / "again", tmp_path / "cache") for p in d.rglob("*") if p.is_file()]
    assert written and all(KEY.encode() not in p.read_bytes() for p in written)
    config = json.loads((out / "mathverse.json").read_text())["config"]
    assert config["judge"] == {"base_url": server.base_url, "model": "judge-model", "max_retries": 3}


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOISYROLLOUT_JUDGE_BASE_URL", raising=False)
    assert Judge.from_env() is None
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_BASE_URL", "http://127.0.0.1:1/v1/")
    monkeypatch.delenv("NOISYROLLOUT_JUDGE_MODEL", raising=False)
    with pytest.raises(ConfigError, match="MODEL"):
        Judge.from_env()
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_MODEL", "m")
    judge = Judge.from_env(cache_dir=None, max_retries=5, max_workers=2)
    assert judge is not None and judge.base_url == "http://127.0.0.1:1/v1" and judge.api_key is None
    assert (judge.max_retries, judge.max_workers) == (5, 2)
    monkeypatch.setenv("NOISYROLLOUT_JUDGE_API_KEY", KEY)
    judge = Judge.from_env()
    assert judge is not None and isinstance(judge.api_key, SecretStr) and judge.api_key.get_secret_value() == KEY
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.describe())
