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

Requests are retried (HTTP 429/5xx, connection errors, timeouts) with exponential back-off and run
on a bounded thread pool. Every answer is cached on disk under a hash of (model, messages), so a
re-run or a re-grade of the same predictions makes no request. The API key is held only in memory:
it is never part of `describe()`, the cache, a log line or an exception message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    max_response_chars: int = 12000
    stats: JudgeStats = field(default_factory=JudgeStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

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

    def _post(self, messages: list[dict[str, str]]) -> str:
        """POST /chat/completions with retries; the reply's text. Raises `JudgeError`."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 64})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            self._count("http_calls")
            request = urllib.request.Request(url, data=body.encode("utf-8"), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    payload = json.loads(reply.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} from {url}"
                if exc.code != 429 and exc.code < 500:
                    break  # a client error will not improve on retry
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__} contacting {url}"
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"malformed reply from {url}"
        raise JudgeError(last)

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


def _clean(content: str) -> str | None:
    """The judge's reply as an answer: stripped, a \\boxed{} unwrapped, NONE -> None."""
    text = content.strip().strip("`").strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1].strip()
    text = text.removeprefix("$").removesuffix("$").strip()
    if not text or text.upper().rstrip(".") == "NONE":
        return None
    return text
