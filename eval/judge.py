"""Optional LLM judge: extracts the final answer from a free-form response.

Any OpenAI-compatible endpoint works (a hosted API, a local vLLM server): the judge POSTs
`{base_url}/chat/completions` and reads `choices[0].message.content`. It only *extracts* the answer;
correctness is still decided by the rule grader on what it extracted, so a judge cannot mark a
wrong answer right by opinion.

Configuration comes from the environment (`Judge.from_env`):

    NOISYROLLOUT_JUDGE_BASE_URL   e.g. http://127.0.0.1:8000/v1   (unset -> no judge)
    NOISYROLLOUT_JUDGE_MODEL      the model name the endpoint serves
    NOISYROLLOUT_JUDGE_API_KEY    sent as a Bearer token; optional for a local server
    NOISYROLLOUT_JUDGE_CACHE_DIR  on-disk cache (default ~/.cache/noisyrollout/judge)

Requests run on a bounded thread pool sharing one `httpx.Client`. Transient failures (connection
errors, timeouts, a reply cut off mid-body, HTTP 429 and 5xx) are retried by tenacity with
exponential back-off, waiting at least a 429/503 reply's `Retry-After` seconds (both capped at
`max_wait_s`); any other HTTP error or a malformed reply fails at once. Every answer is cached on
disk under a hash of (model, messages), so a re-run or a re-grade of the same predictions makes no
request. The API key is held only in memory: it is never part of `describe()`, the cache, a log line
or an exception message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import tenacity
from tqdm import tqdm

log = logging.getLogger("noisyrollout.eval")

ENV_PREFIX = "NOISYROLLOUT_JUDGE_"
DEFAULT_CACHE_DIR = Path("~/.cache/noisyrollout/judge")

SYSTEM_PROMPT = (
    "You extract the final answer from a model's response to a question. Reply with the final "
    "answer only: no explanation, no units unless they are part of the answer. If the question "
    "offers lettered choices, reply with the letter of the chosen choice. If the response gives no "
    "final answer, reply NONE."
)


@dataclass(frozen=True)
class JudgeRequest:
    """What the judge sees for one sample."""

    question: str
    response: str


@dataclass
class JudgeStats:
    """Counters for one `extract_many` call (and cumulative on the judge)."""

    requests: int = 0
    cache_hits: int = 0
    http_calls: int = 0
    retries: int = 0
    failures: int = 0


class JudgeError(Exception):
    """A judge request failed for good (after retries); the message never contains the key."""


class _RetryableStatus(Exception):
    """An HTTP 429/5xx reply: retried, after at least `retry_after` seconds when the server gave one."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# Worth another attempt: the server was busy or failing, or the connection broke (refused, reset, timed out, or a
# reply cut off mid-body). Not: a bad URL scheme, a proxy misconfiguration, a request httpx refuses to send.
_TRANSIENT = (_RetryableStatus, httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint used to pull the final answer out of a response."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    max_workers: int = 8
    max_retries: int = 3
    timeout_s: float = 60.0
    backoff_s: float = 1.0
    max_wait_s: float = 60.0
    max_response_chars: int = 12000
    stats: JudgeStats = field(default_factory=JudgeStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _client: httpx.Client | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()

    @classmethod
    def from_env(cls, **overrides: Any) -> "Judge | None":
        """A judge configured by `NOISYROLLOUT_JUDGE_*` variables, or None when no base URL is set."""
        base_url = os.environ.get(ENV_PREFIX + "BASE_URL", "").strip()
        if not base_url:
            return None
        model = os.environ.get(ENV_PREFIX + "MODEL", "").strip()
        if not model:
            from noisyrollout.errors import ConfigError

            raise ConfigError(f"{ENV_PREFIX}BASE_URL is set but {ENV_PREFIX}MODEL is not")
        kwargs: dict[str, Any] = {
            "base_url": base_url,
            "model": model,
            "api_key": os.environ.get(ENV_PREFIX + "API_KEY") or None,
        }
        if os.environ.get(ENV_PREFIX + "CACHE_DIR"):
            kwargs["cache_dir"] = Path(os.environ[ENV_PREFIX + "CACHE_DIR"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        """The judge's settings for a report. Holds no secret."""
        return {"base_url": self.base_url, "model": self.model, "max_retries": self.max_retries}

    def _count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- one request ---------------------------------------------------------------------------

    def messages(self, request: JudgeRequest) -> list[dict[str, str]]:
        """The chat messages sent for one sample (responses are cut to their last characters)."""
        response = request.response[-self.max_response_chars:]
        user = f"Question:\n{request.question}\n\nResponse:\n{response}\n\nFinal answer:"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _cache_path(self, messages: list[dict[str, str]]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({"model": self.model, "messages": messages}, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _http(self) -> httpx.Client:
        """The shared HTTP client (thread-safe), opened on first use."""
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout_s)
            return self._client

    def close(self) -> None:
        """Close the HTTP client's connections (a later request opens a new client)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next attempt: exponential back-off with jitter, at least a given Retry-After."""
        backoff = tenacity.wait_exponential_jitter(initial=self.backoff_s, max=self.max_wait_s,
                                                   jitter=0.25 * self.backoff_s)(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = exc.retry_after if isinstance(exc, _RetryableStatus) else None
        return min(self.max_wait_s, max(backoff, retry_after or 0.0))

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        """Count a retry; say why and how long it waits at debug level."""
        self._count("retries")
        if state.outcome is not None and state.next_action is not None:
            log.debug("judge: %s; attempt %d failed, retrying in %.1fs", _describe(state.outcome.exception(),
                      state.args[0]), state.attempt_number, state.next_action.sleep)

    def _attempt(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> str:
        """One POST; the reply's text. Raises a `_TRANSIENT` error to retry, `JudgeError` to stop."""
        self._count("http_calls")
        reply = self._http().post(url, json=payload, headers=headers)
        if reply.status_code == 429 or reply.status_code >= 500:
            retry_after = _retry_after(reply) if reply.status_code in (429, 503) else None
            raise _RetryableStatus(f"HTTP {reply.status_code} from {url}", retry_after)
        if not reply.is_success:
            raise JudgeError(f"HTTP {reply.status_code} from {url}")  # a client error will not improve on retry
        try:
            return str(reply.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"malformed reply from {url}") from None

    def _post(self, messages: list[dict[str, str]]) -> str:
        """POST /chat/completions with retries; the reply's text. Raises `JudgeError`."""
        payload = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 64}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = f"{self.base_url}/chat/completions"
        attempts = self.max_retries + 1
        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts), wait=self._wait,
                                     retry=tenacity.retry_if_exception_type(_TRANSIENT),
                                     before_sleep=self._before_sleep, reraise=True)
        try:
            return retrying(self._attempt, url, payload, headers)
        except _TRANSIENT as exc:
            # `from None`: the httpx error carries the request, Authorization header included
            raise JudgeError(f"{_describe(exc, url)}; gave up after {attempts} attempt(s)") from None

    def extract(self, request: JudgeRequest) -> str | None:
        """The judge's extracted answer (None for NONE). Cached; raises `JudgeError` on failure."""
        self._count("requests")
        messages = self.messages(request)
        path = self._cache_path(messages)
        if path is not None and path.is_file():
            try:
                self._count("cache_hits")
                return _clean(json.loads(path.read_text(encoding="utf-8"))["content"])
            except (OSError, ValueError, KeyError):
                self._count("cache_hits", -1)  # a damaged entry: ask again
        content = self._post(messages)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{id(request)}.tmp")
            tmp.write_text(json.dumps({"model": self.model, "content": content}, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        return _clean(content)

    # -- many requests -------------------------------------------------------------------------

    def extract_many(self, requests: Sequence[JudgeRequest], *, progress: bool = False,
                     desc: str = "judge") -> list[str | None | JudgeError]:
        """Extract answers for many samples on a bounded thread pool, in input order.

        A failed request yields its `JudgeError` in place of an answer; the others still complete.
        """

        def one(request: JudgeRequest) -> str | None | JudgeError:
            try:
                return self.extract(request)
            except JudgeError as exc:
                self._count("failures")
                log.warning("judge: %s", exc)
                return exc

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(tqdm(pool.map(one, requests), total=len(requests), desc=desc, disable=not progress))


def _describe(exc: BaseException | None, url: str) -> str:
    """A failed attempt in one line: the HTTP status, or the kind of connection failure (never a header)."""
    if isinstance(exc, _RetryableStatus):
        return str(exc)
    return f"{type(exc).__name__} contacting {url}"


def _retry_after(reply: httpx.Response) -> float | None:
    """A reply's Retry-After in seconds (the delta-seconds form), or None when absent or unreadable."""
    try:
        seconds = float(reply.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _clean(content: str) -> str | None:
    """The judge's reply as an answer: stripped, a \\boxed{} unwrapped, NONE -> None."""
    text = content.strip().strip("`").strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1].strip()
    text = text.removeprefix("$").removesuffix("$").strip()
    if not text or text.upper().rstrip(".") == "NONE":
        return None
    return text
