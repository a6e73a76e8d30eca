"""One rater backend for the model-rated methods (``alpagasus``, ``autods``, the judges): a local causal LM or an
OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, a hosted API).

* ``--rater NAME`` (a built-in name, a local folder or a hub id) runs the model here: greedy or sampled generation
  after the tokenizer's chat template, and the log-probabilities of the first answer token from its logits.
* ``--rater URL --rater-model NAME`` posts to ``URL/chat/completions``, the key read from the environment variable
  ``--rater-key-env`` (default ``OPENAI_API_KEY``), sent in the ``Authorization`` header and never written anywhere;
  ``logprobs``/``top_logprobs`` are asked for when a method reads them (servers that do not give them leave them
  out, and the method says so).

Every request is answered once: answers are cached in a SQLite file (``RUN/raters/cache.sqlite``) under the SHA-256 of
(backend, model, request), so a rerun or a resumed run makes no call it made before. Calls run ``--rater-concurrency``
at a time (threads: the work is waiting on the network), each retried ``--rater-retries`` times with exponential
backoff (and the server's ``Retry-After``) on timeouts, connection errors, 429 and 5xx; 401, 403 and 404 (a wrong
key, model or URL: every call would fail) stop the command with the server's message, queued calls cancelled; any
other error of one request (400: too long, filtered) makes that answer unscorable. An answer that is refused
(``refusal``, ``finish_reason: content_filter``) or empty is kept as such with its reason: the methods record it as
unscorable, never as a zero.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import setting
from ..errors import InfluenceError
from ..progress import progress_bar

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(kw_only=True)
class RaterSettings:
    """Which model rates, and how it is called (shared by every rater method)."""

    rater: str | None = setting(None, "The rating model: a built-in name, local folder or hub id run here, or the URL "
                                      "of an OpenAI-compatible endpoint (http(s)://host/v1).")
    rater_model: str | None = setting(None, "The endpoint's model name (with --rater URL).")
    rater_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (read at run "
                                                   "time, never written).")
    rater_concurrency: int = setting(4, "Endpoint calls in flight at once.", min=1)
    rater_retries: int = setting(4, "Retries of a call that timed out or got 429/5xx (exponential backoff).", min=0)
    rater_timeout: float = setting(60.0, "Seconds one endpoint call may take.", min=0, min_open=True)
    rater_price: float | None = setting(None, "Price per 1,000 tokens (prompt and answer), for the cost estimate.",
                                        min=0)
    prompt_file: str | None = setting(None, "A file whose text replaces the method's prompt template (the same "
                                            "{placeholders}).", path={"dir_okay": False, "exists": True})
    rater_dry_run: bool = setting(False, "Print the calls, tokens and cost the rating would take, and stop.")


@dataclass(frozen=True)
class Request:
    """One chat request: a user message (and a system one), how many answers and how long, and whether the
    log-probabilities of the first answer token's ``top_logprobs`` alternatives are wanted."""

    prompt: str
    system: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    n: int = 1
    top_logprobs: int = 0
    seed: int = 0


@dataclass
class Answer:
    """The answers' texts, the first token's log-probabilities (token -> logprob, where asked and given), or why
    there is no usable answer (``error``)."""

    texts: list[str] = field(default_factory=list)
    first_token_logprobs: dict[str, float] | None = None
    error: str | None = None


def approximate_tokens(text: str) -> int:
    """Tokens of a text for the cost estimate: about four characters each (English, common BPE vocabularies)."""
    return max(1, len(text) // 4)


class AnswerCache:
    """Answers by key in a SQLite file, safe across the backend's threads (one connection per thread)."""

    def __init__(self, path: Path | None):
        self.path, self.local = path, threading.local()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path)
            try:
                with connection:
                    connection.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT)")
            finally:
                connection.close()

    def _connection(self) -> sqlite3.Connection:
        if not hasattr(self.local, "connection"):
            self.local.connection = sqlite3.connect(self.path, timeout=60)
        return self.local.connection

    def get(self, key: str) -> Answer | None:
        if self.path is None:
            return None
        row = self._connection().execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return Answer(**json.loads(row[0])) if row else None

    def put(self, key: str, answer: Answer) -> None:
        if self.path is not None:
            with self._connection() as connection:
                connection.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(asdict(answer))))


class Backend(ABC):
    """Answers requests, through the cache (see the module docstring)."""

    identity: str

    def __init__(self, settings: RaterSettings, cache: Path | None):
        self.settings, self.cache = settings, AnswerCache(cache)
        self.calls = 0  # made by this process (not answered from the cache)
        self._count = threading.Lock()

    def key(self, request: Request) -> str:
        return hashlib.sha256(json.dumps([self.identity, asdict(request)], sort_keys=True).encode()).hexdigest()

    def missing(self, requests: list[Request]) -> list[Request]:
        """The requests the cache cannot answer (deduplicated)."""
        seen, out = set(), []
        for request in requests:
            key = self.key(request)
            if key not in seen and self.cache.get(key) is None:
                seen.add(key)
                out.append(request)
        return out

    def estimate(self, requests: list[Request], what: str) -> str:
        """The calls, tokens and cost of the requests the cache cannot answer."""
        todo = self.missing(requests)
        prompt = sum(approximate_tokens((r.system or "") + r.prompt) for r in todo)
        answer = sum(r.max_tokens * r.n for r in todo)
        price = self.settings.rater_price
        cost = f", ~{(prompt + answer) / 1000 * price:.2f} at {price:g} per 1k tokens" if price is not None else ""
        return (f"{what}: {len(requests)} requests to {self.identity}, {len(requests) - len(todo)} answered from the "
                f"cache, {len(todo)} to make: ~{prompt} prompt tokens and at most {answer} answer tokens{cost}")

    def answer(self, requests: list[Request], progress: bool = True, desc: str = "rating") -> list[Answer]:
        """Every request's answer, from the cache or asked (then cached)."""
        todo = self.missing(requests)
        bar = progress_bar(total=len(todo), desc=desc, unit="call", disable=not progress)
        asked: dict[str, Answer] = {}

        def ask(request: Request) -> None:
            answer = self._ask(request)
            with self._count:
                self.calls += 1
            asked[self.key(request)] = answer
            self.cache.put(self.key(request), answer)
            bar.update(1)

        self._run(todo, ask)
        bar.close()
        return [asked.get(key) or self.cache.get(key) or Answer(error="not answered")
                for key in map(self.key, requests)]

    def _run(self, todo: list[Request], ask: Callable[[Request], None]) -> None:
        for request in todo:
            ask(request)

    @abstractmethod
    def _ask(self, request: Request) -> Answer:
        """One request's answer, asked of the model (the cache is the caller's)."""


class EndpointBackend(Backend):
    """An OpenAI-compatible chat-completions endpoint."""

    def __init__(self, settings: RaterSettings, cache: Path | None):
        if not settings.rater_model:
            raise InfluenceError("--rater URL needs --rater-model (the endpoint's model name)")
        self.url = settings.rater.rstrip("/") + "/chat/completions"
        self.identity = f"{settings.rater.rstrip('/')} {settings.rater_model}"
        super().__init__(settings, cache)

    def _run(self, todo: list[Request], ask: Callable[[Request], None]) -> None:
        pool = ThreadPoolExecutor(self.settings.rater_concurrency)
        try:
            for future in [pool.submit(ask, request) for request in todo]:
                future.result()  # the first failure stops the command (what was answered is cached)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, the queued calls are not made

    def _body(self, request: Request) -> dict:
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + \
            [{"role": "user", "content": request.prompt}]
        body = {"model": self.settings.rater_model, "messages": messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "n": request.n, "seed": request.seed}
        if request.top_logprobs:
            body.update(logprobs=True, top_logprobs=request.top_logprobs)
        return body

    def _ask(self, request: Request) -> Answer:
        key = os.environ.get(self.settings.rater_key_env, "")
        data = json.dumps(self._body(request)).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        for attempt in range(self.settings.rater_retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data=data, headers=headers, method="POST"),
                                            timeout=self.settings.rater_timeout) as response:
                    return parse_completion(json.loads(response.read()))
            except urllib.error.HTTPError as err:
                message = err.read().decode(errors="replace")[:300]
                if err.code in (401, 403, 404):  # the key, the model or the URL is wrong: every call would fail
                    hint = f" (is ${self.settings.rater_key_env} set to a valid key?)" if err.code in (401, 403) else ""
                    raise InfluenceError(f"--rater {self.url}: HTTP {err.code} {message}{hint}") from None
                if err.code not in RETRIED_STATUS:  # this request only (too long, filtered): unscorable
                    return Answer(error=f"HTTP {err.code}: {message}")
                if attempt == self.settings.rater_retries:
                    raise InfluenceError(f"--rater {self.url}: HTTP {err.code} after {attempt + 1} tries: {message}") \
                        from None
                wait = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                if attempt == self.settings.rater_retries:
                    raise InfluenceError(f"--rater {self.url}: no answer after {attempt + 1} tries ({err})") from None
                wait = 0.0
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return Answer(error=f"unreadable answer ({type(err).__name__}: {err})")
            time.sleep(max(wait, min(60.0, 0.5 * 2**attempt) * (1 + random.random() / 2)))
        raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (seconds, or an HTTP date; 0 when absent or unreadable)."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return 0.0


def parse_completion(payload: dict) -> Answer:
    """An :class:`Answer` from a chat-completions response (refusals and empty answers as errors)."""
    choices = payload.get("choices") or []
    if not choices:
        return Answer(error=f"no choices in the answer ({str(payload)[:200]})")
    texts, first = [], None
    for choice in choices:
        message = choice.get("message") or {}
        if message.get("refusal"):
            return Answer(error=f"refused: {message['refusal']}")
        if choice.get("finish_reason") == "content_filter":
            return Answer(error="refused: content filter")
        texts.append(message.get("content") or "")
    content = ((choices[0].get("logprobs") or {}).get("content") or [])
    if content:
        first = {alt["token"]: float(alt["logprob"]) for alt in content[0].get("top_logprobs") or []}
        first.setdefault(content[0]["token"], float(content[0]["logprob"]))
    if not any(t.strip() for t in texts):
        return Answer(texts=texts, first_token_logprobs=first, error="empty answer")
    return Answer(texts=texts, first_token_logprobs=first)


class LocalBackend(Backend):
    """A causal LM run here (greedy at temperature 0, else sampled with the request's seed)."""

    def __init__(self, settings: RaterSettings, cache: Path | None, device: str | None = None):
        from .loading import load_base_model, parse_device

        self.identity = f"local {settings.rater}"
        super().__init__(settings, cache)
        self.device = parse_device(device)
        self.model, self.tokenizer = load_base_model(settings.rater, device=self.device)
        self.model.to(self.device).eval()

    def _text(self, request: Request) -> str:
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + \
            [{"role": "user", "content": request.prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    @torch.no_grad()
    def _ask(self, request: Request) -> Answer:
        ids = self.tokenizer(self._text(request), add_special_tokens=False, return_tensors="pt")["input_ids"][:, -4096:]
        ids = ids.to(self.device)
        first = None
        if request.top_logprobs:
            logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, -1].float(), dim=-1)
            values, tokens = logprobs.topk(request.top_logprobs)
            first = {self.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, tokens)}
        texts = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for k in range(request.n):
            sample = request.temperature > 0
            with torch.random.fork_rng(devices=[]):  # the request's seed, the caller's random state untouched
                torch.manual_seed(request.seed + k)
                out = self.model.generate(ids, max_new_tokens=request.max_tokens, do_sample=sample,
                                          temperature=request.temperature if sample else None, top_p=None, top_k=None,
                                          pad_token_id=pad)
            texts.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        if not any(t.strip() for t in texts):
            return Answer(texts=texts, first_token_logprobs=first, error="empty answer")
        return Answer(texts=texts, first_token_logprobs=first)


def make_backend(settings: RaterSettings, cache: Path | None, device: str | None = None) -> Backend:
    """The backend ``--rater`` names (checked before any model is loaded or call made)."""
    if not settings.rater:
        raise InfluenceError("this method needs a rating model: give --rater (a local model, or an OpenAI-compatible "
                             "URL with --rater-model)")
    if settings.rater.startswith(("http://", "https://")):
        return EndpointBackend(settings, cache)
    return LocalBackend(settings, cache, device)


def prompt_template(default: str, settings: RaterSettings, required: tuple[str, ...]) -> str:
    """The method's template, or ``--prompt-file``'s text, which must keep the ``required`` placeholders."""
    if settings.prompt_file is None:
        return default
    text = Path(settings.prompt_file).read_text(encoding="utf-8")
    absent = [p for p in required if "{" + p + "}" not in text]
    if absent:
        raise InfluenceError(f"--prompt-file {settings.prompt_file}: the template lacks "
                             + ", ".join("{" + p + "}" for p in absent))
    return text


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
