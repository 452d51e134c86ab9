"""Optional LLM judge: extracts the final answer from a free-form response.

Any OpenAI-compatible endpoint works (a hosted API, a local vLLM server): the judge calls
`{base_url}/chat/completions` through the official `openai` client and reads
`choices[0].message.content`. It only *extracts* the answer; correctness is still decided by the rule
grader on what it extracted, so a judge cannot mark a wrong answer right by opinion.

Configuration comes from the environment (`Judge.from_env`). The client is built with the base URL and
key explicit, and the judge never sends what the openai client would otherwise take from `OPENAI_API_KEY`,
`OPENAI_ORG_ID` or `OPENAI_PROJECT_ID` (credentials meant for another endpoint).

    NOISYROLLOUT_JUDGE_BASE_URL   e.g. http://127.0.0.1:8000/v1   (unset -> no judge)
    NOISYROLLOUT_JUDGE_MODEL      the model name the endpoint serves
    NOISYROLLOUT_JUDGE_API_KEY    sent as a Bearer token; optional for a local server (none -> no header)
    NOISYROLLOUT_JUDGE_CACHE_DIR  on-disk cache (default ~/.cache/noisyrollout/judge)

Requests run on a bounded thread pool (`max_workers`) sharing one `openai.OpenAI` client, which applies
the timeout (`timeout_s`) and retries (`max_retries`): connection errors, timeouts, a reply cut off
mid-body, HTTP 408/409/429 and 5xx are retried with exponential back-off (0.5 s doubling, at most 8 s,
with jitter), waiting a reply's `Retry-After`/`retry-after-ms` instead when it asks for at most two
minutes; a reply asking for longer, any other HTTP error or a malformed reply fails at once. Every
answer is cached on disk under a hash of (model, messages), so a re-run or a re-grade of the same
predictions makes no request. The API key is held as a `pydantic.SecretStr`: it is never part of
`describe()`, the repr, the cache, a log line or an exception message; nor is a `user:password@` part of the
base URL (masked as `***@` there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import openai
from pydantic import SecretStr

from noisyrollout.progress import progress_bar
from noisyrollout.tracking import safe_uri

log = logging.getLogger("noisyrollout.eval")

ENV_PREFIX = "NOISYROLLOUT_JUDGE_"
DEFAULT_CACHE_DIR = Path("~/.cache/noisyrollout/judge")

SYSTEM_PROMPT = (
    "You extract the final answer from a model's response to a question. Reply with the final "
    "answer only: no explanation, no units unless they are part of the answer. If the question "
    "offers lettered choices, reply with the letter of the chosen choice. If the response gives no "
    "final answer, reply NONE."
)

# Headers the openai client would fill from OPENAI_ORG_ID / OPENAI_PROJECT_ID: never sent to a judge.
_NO_AMBIENT_HEADERS: dict[str, Any] = {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}


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


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint used to pull the final answer out of a response.

    `max_retries` (retries after the first attempt) and `max_workers` (concurrent requests in
    `extract_many`) are plain constructor arguments; `api_key` may be given as a `str`, it is kept as a
    `SecretStr`. `base_url`, `api_key`, `timeout_s` and `max_retries` are read when the client opens (on
    the first request, again after `close()`).
    """

    base_url: str
    model: str
    api_key: SecretStr | None = None
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    max_workers: int = 8
    max_retries: int = 3
    timeout_s: float = 60.0
    max_response_chars: int = 12000
    stats: JudgeStats = field(default_factory=JudgeStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    _client: openai.OpenAI | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if isinstance(self.api_key, str):
            self.api_key = SecretStr(self.api_key)
        if self.api_key is not None and not self.api_key.get_secret_value():
            self.api_key = None
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
        key = os.environ.get(ENV_PREFIX + "API_KEY")
        kwargs: dict[str, Any] = {
            "base_url": base_url,
            "model": model,
            "api_key": SecretStr(key) if key else None,
        }
        if os.environ.get(ENV_PREFIX + "CACHE_DIR"):
            kwargs["cache_dir"] = Path(os.environ[ENV_PREFIX + "CACHE_DIR"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:   # the dataclass's own repr would show the base URL as given
        settings = {**self.describe(), "api_key": self.api_key, "cache_dir": self.cache_dir}   # SecretStr: '*****'
        return f"Judge({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

    def describe(self) -> dict[str, Any]:
        """The judge's settings for a report. Holds no secret (a `user:password@` in the base URL is masked)."""
        return {"base_url": safe_uri(self.base_url), "model": self.model, "max_retries": self.max_retries}

    def _count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- one request ---------------------------------------------------------------------------

    def messages(self, request: JudgeRequest) -> list[dict[str, str]]:
        """The chat messages sent for one sample (responses are cut to their last characters)."""
        response = request.response[-self.max_response_chars:]
        user = f"Question:\n{request.question}\n\nResponse:\n{response}\n\nFinal answer:"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    # The cache stays one JSON file per answer, written by an atomic rename, rather than moving onto diskcache:
    # that is safe for many processes sharing a cache dir on a network file system (where diskcache's SQLite
    # locking is not), readable with any tool, and never unpickles what it reads.
    def _cache_path(self, messages: list[dict[str, str]]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({"model": self.model, "messages": messages}, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _openai(self) -> openai.OpenAI:
        """The shared client (thread-safe), opened on first use."""
        with self._lock:
            if self._client is None:
                key = self.api_key.get_secret_value() if self.api_key is not None else None
                # Every attempt, retries included, passes the request hook: it keeps the counters.
                http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_request]})
                # Without a key the client gets a provider returning "" (never OPENAI_API_KEY from the
                # environment) and `_headers()` drops the Authorization header.
                self._client = openai.OpenAI(base_url=self.base_url, api_key=key or (lambda: ""),
                                             timeout=self.timeout_s, max_retries=self.max_retries,
                                             http_client=http_client)
            return self._client

    def _headers(self) -> dict[str, Any]:
        if self.api_key is not None:
            return _NO_AMBIENT_HEADERS
        return {**_NO_AMBIENT_HEADERS, "Authorization": openai.omit}

    def _on_request(self, request: Any) -> None:
        """httpx request hook, run in the calling thread for each attempt: count it (and a retry)."""
        self._count("http_calls")
        attempts = getattr(self._local, "attempts", 0) + 1
        self._local.attempts = attempts
        if attempts > 1:
            self._count("retries")
            log.debug("judge: retry %d contacting %s", attempts - 1, safe_uri(self.base_url))

    def close(self) -> None:
        """Close the client's connections (a later request opens a new client)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _post(self, messages: list[dict[str, str]]) -> str:
        """POST /chat/completions (the client retries); the reply's text. Raises `JudgeError`."""
        url = safe_uri(f"{self.base_url}/chat/completions")   # for messages: no `user:password@`
        self._local.attempts = 0
        try:
            completion = self._openai().chat.completions.create(
                model=self.model, messages=messages, temperature=0.0, max_tokens=64,  # type: ignore[arg-type]
                extra_headers=self._headers())
        except openai.APIStatusError as exc:
            message = f"HTTP {exc.status_code} from {url}"
        except openai.APIConnectionError as exc:  # a timeout too: the cause says which (ConnectError, ReadTimeout)
            message = f"{type(exc.__cause__ or exc).__name__} contacting {url}"
        except (openai.APIResponseValidationError, json.JSONDecodeError):
            message = f"malformed reply from {url}"
        except openai.OpenAIError as exc:
            message = f"{type(exc).__name__} calling {url}"
        else:
            try:
                return str(completion.choices[0].message.content or "")
            except (AttributeError, IndexError, TypeError):
                message = f"malformed reply from {url}"
        attempts = self._local.attempts
        if attempts > 1:
            message += f"; gave up after {attempts} attempt(s)"
        # `from None`: the openai/httpx error carries the request, Authorization header included
        raise JudgeError(message) from None

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
        """Extract answers for many samples on a bounded thread pool (`max_workers`), in input order.

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
            return list(progress_bar(pool.map(one, requests), total=len(requests), desc=desc, disable=not progress))


def _clean(content: str) -> str | None:
    """The judge's reply as an answer: stripped, a \\boxed{} unwrapped, NONE -> None."""
    text = content.strip().strip("`").strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1].strip()
    text = text.removeprefix("$").removesuffix("$").strip()
    if not text or text.upper().rstrip(".") == "NONE":
        return None
    return text
