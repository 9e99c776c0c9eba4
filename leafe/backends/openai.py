"""A backend for any OpenAI-compatible completions server (vLLM, SGLang, TGI, llama.cpp's server).

Prompts go out as token ids (the completions API accepts a list of ints as `prompt`), so the server
sees exactly the ids our chat layer built. What comes back depends on the server:
- vLLM returns the sampled ids (`return_token_ids`), and log-probs per sampled token;
- a server that returns text only is served by re-encoding that text with the model's tokenizer.
  Those ids may differ from the ones the model sampled (a word split another way), which breaks
  "the ids the model generated are the ids we train on"; every such completion is counted in
  `stats.retokenized` and a warning says so once.

Requests for the prompts of one call run concurrently (the server batches them), spread over the
servers given (prompt i goes to server i mod N first). Servers misbehave, so every try is bounded and
checked before anything of it is used:
- a try that gets no whole answer within `timeout_s` (a server that hangs, or stalls mid-answer), an
  answer cut short, a 5xx, 408 or 429 (after its Retry-After), and an answer that is not JSON of the
  completions API's shape (no choices, no text, no log-probs when asked) are tried again, up to
  `retries` times with exponential backoff; a server still failing is set aside and its requests go to
  the others, so a run goes on while one server answers;
- any other 4xx is our request's fault: it fails at once with what the server said;
- when every try failed, one BackendError names the server, what went wrong last and how many tries.
A call returns only when every prompt has its whole, well-formed answer; a call that fails returns
nothing (its other requests are abandoned), so no caller ever records an episode from half an answer.
Each request carries its own seed, so which server answers, or which try, does not change what is
sampled (on servers of the same build and hardware).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, request_seed
from leafe.chat import generation_stop_ids

_CHECK_SERVER = "is it an OpenAI-compatible completions server (vLLM, SGLang, TGI)?"


@dataclass
class OpenAIStats(BackendStats):
    retokenized: int = 0  # completions whose ids were re-encoded from text (the server sent no ids)
    retries: int = 0

    def reset(self) -> None:
        super().reset()
        self.retokenized = self.retries = 0

    def as_dict(self) -> dict[str, int]:
        return {**super().as_dict(), "retokenized": self.retokenized, "retries": self.retries}


class OpenAIBackend(Backend):
    """`model`: a local directory with the served model's tokenizer (the chat layer needs it);
    `base_url`: the server, e.g. http://127.0.0.1:8000/v1, or several serving the same model;
    `served_model`: the name the servers know the model by (default: the first model listed);
    `timeout_s`: how long one try may take, from connecting to the answer's last byte;
    `retries`: tries after the first, per server, waiting `backoff_s` x 2^i between them (or what a
    Retry-After asks), never more than `max_backoff_s`;
    `max_concurrency`: requests in flight at once (None: one per prompt of a call, i.e. every
    episode in flight)."""

    def __init__(self, model: str, *, base_url: str | Sequence[str], served_model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_concurrency: int | None = None):
        from transformers import AutoTokenizer

        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise BackendError("the openai backend needs a server's address: --base-url http://HOST:PORT/v1")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise BackendError(f"--base-url must be an http:// or https:// address, e.g. "
                                   f"http://127.0.0.1:8000/v1 (got {url!r})")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise BackendError(f"the openai backend needs timeout_s > 0 and retries, backoff_s, max_backoff_s >= 0 "
                               f"(got {timeout_s}, {retries}, {backoff_s}, {max_backoff_s})")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.api_key, self.timeout_s = api_key, timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.max_concurrency = max_concurrency
        self.stats = OpenAIStats()
        self._counting = threading.Lock()  # the stats are counted from the request threads
        self._calls = 0
        self._warned = False
        self._down: set[str] = set()  # servers that failed every retry; tried again only when all are down
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as exc:
            raise BackendError(f"the openai backend needs the model's tokenizer in a local directory; "
                               f"could not load it from {model}: {exc}") from exc
        self.stop_ids = generation_stop_ids(model)
        entries = {}
        for url in self.base_urls:
            try:
                entries[url] = self._served(url, served_model)
            except _ServerFailed as exc:
                if len(self.base_urls) == 1:
                    raise BackendError(str(exc)) from None
                self._down.add(url)
                warnings.warn(f"{exc}; going on with the other servers", stacklevel=2)
        if not entries:
            raise BackendError(f"none of the servers answers ({', '.join(self.base_urls)}); start them "
                               f"(e.g. `vllm serve MODEL`) or fix --base-url")
        names = {entry["id"] for entry in entries.values()}
        if len(names) > 1:
            raise BackendError(f"the servers serve different models ({', '.join(sorted(names))}); "
                               f"give servers of one model, or name it")
        entry = next(iter(entries.values()))
        self.served_model = entry["id"]
        # vLLM reports its context; otherwise trust the tokenizer's, then a conservative default.
        tokenizer_max = getattr(self.tokenizer, "model_max_length", 0)
        self.max_context = int(min(e.get("max_model_len") or 10**9 for e in entries.values()) if any(
            e.get("max_model_len") for e in entries.values()) else (tokenizer_max if 0 < tokenizer_max < 10**7 else 4096))
        self.name = f"{', '.join(self.base_urls)} ({self.served_model})"

    @property
    def base_url(self) -> str:
        return self.base_urls[0]

    def _served(self, url: str, served_model: str | None) -> dict[str, Any]:
        """The /models entry of the model `url` serves (the one named, or its first)."""
        listed = self._request(url, "GET", "/models", parse=_model_list)
        names = [m["id"] for m in listed]
        if served_model is not None and served_model not in names:
            raise BackendError(f"the server at {url} serves {', '.join(map(str, names))}, not {served_model!r}")
        return listed[names.index(served_model)] if served_model is not None else listed[0]

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, url: str, method: str, path: str, body: dict[str, Any] | None = None, *,
                 parse: Callable[[Any], Any], abort: threading.Event | None = None) -> Any:
        """`parse` of one server's JSON answer, tried again while the server fails; `_ServerFailed`
        when every try failed, `_Abandoned` when `abort` is set (another request of the call failed)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{url}{path}", data, headers, method=method)
        abort = abort or threading.Event()
        failure = None
        for attempt in range(self.retries + 1):
            if failure is not None:
                wait_s = max(self.backoff_s * 2 ** (attempt - 1), failure.retry_after or 0.0)
                if abort.wait(min(wait_s, self.max_backoff_s)):
                    raise _Abandoned()
                with self._counting:
                    self.stats.retries += 1
            if abort.is_set():
                raise _Abandoned()
            try:
                return parse(self._try(request))
            except _Failure as exc:
                failure = exc
        tries = f"{self.retries + 1} {'try' if self.retries == 0 else 'tries'}"
        if failure.unreachable:
            raise _ServerFailed(f"cannot reach an OpenAI-compatible server at {url} ({failure}) after {tries}; "
                                f"start it (e.g. `vllm serve MODEL`) or fix --base-url")
        raise _ServerFailed(f"the server at {url} gave no usable answer to {method} {path} in {tries} "
                            f"(last: {failure}); {failure.advice}")

    def _try(self, request: urllib.request.Request) -> Any:
        """One try: the decoded JSON answer, `_Failure` when another try may fare better, BackendError
        when the server refuses the request itself."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = _read_whole(response, deadline)
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code >= 500 or exc.code in (408, 429):  # the server's trouble, or its "not now"
                raise _Failure(f"HTTP {exc.code}: {detail}", "it is overloaded or rate-limiting: lower --max-concurrency"
                               if exc.code == 429 else "see the server's log",
                               retry_after=_retry_after(exc.headers.get("Retry-After"))) from None
            raise BackendError(f"{request.get_method()} {request.full_url} was refused (HTTP {exc.code}): "
                               f"{detail}") from None
        except urllib.error.URLError as exc:  # connecting or sending, before any answer
            if isinstance(exc.reason, TimeoutError):
                raise _Failure(f"no connection within {self.timeout_s:g} s", unreachable=True) from None
            raise _Failure(_one_line(str(exc.reason)), unreachable=True) from None
        except TimeoutError:
            raise _Failure(f"timeout: no whole answer within {self.timeout_s:g} s",
                           "it is stuck or overloaded: give it longer (--request-timeout-s) or lower "
                           "--max-concurrency") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise _Failure(f"the connection dropped mid-answer ({type(exc).__name__})", "see the server's log") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Failure(f"malformed JSON: {raw[:120]!r}", _CHECK_SERVER) from None

    def _post(self, path: str, body: dict[str, Any], first: int, parse: Callable[[Any], Any],
              abort: threading.Event) -> Any:
        """POST to server `first` (mod N), moving on to the others while servers fail."""
        order = self.base_urls[first % len(self.base_urls):] + self.base_urls[:first % len(self.base_urls)]
        order = [u for u in order if u not in self._down] + [u for u in order if u in self._down]
        errors = []
        for url in order:
            try:
                answer = self._request(url, "POST", path, body, parse=parse, abort=abort)
            except _ServerFailed as exc:
                if url not in self._down and len(self.base_urls) > 1:
                    warnings.warn(f"{exc}; its requests go to the other servers", stacklevel=2)
                self._down.add(url)
                errors.append(str(exc))
                continue
            self._down.discard(url)
            return answer
        raise BackendError(errors[0] if len(errors) == 1 else f"every server failed: {'; '.join(errors)}")

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        self.check_prompts(prompts, sampling)
        self.stats.calls += 1
        self._calls += 1  # not stats.calls: a stats.reset() must not make request seeds repeat
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        call = self._calls
        # All or nothing: once a request fails for good, the rest of the call is abandoned (queued
        # requests never start, running ones stop before their next try) and none of it is returned.
        abort = threading.Event()

        def complete(i: int) -> list[Completion]:
            if abort.is_set():
                raise _Abandoned()
            try:
                return self._complete(list(prompts[i]), sampling, request_seed(sampling.seed, call, i), i, abort)
            except BaseException:
                abort.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency or len(prompts), len(prompts))) as pool:
            futures = [pool.submit(complete, i) for i in range(len(prompts))]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed:
                for future in futures:
                    future.cancel()
                raise next((e for e in failed if not isinstance(e, _Abandoned)), failed[0])
            results = [f.result() for f in futures]
        self.stats.prefill_tokens += sum(len(p) for p in prompts)  # the server's own cache is not visible
        self.stats.generated_tokens += sum(len(c.token_ids) for row in results for c in row)
        return results

    def _complete(self, prompt: list[int], sampling: SamplingParams, seed: int, server: int,
                  abort: threading.Event) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.served_model, "prompt": prompt, "n": sampling.n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed,
            # vLLM's extensions (other servers ignore unknown fields): ids out, stop ids, stop kept.
            "return_token_ids": True, "skip_special_tokens": True, "include_stop_str_in_output": True,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.logprobs:
            body["logprobs"] = 0  # the sampled token's own log-prob only
        parsed = self._post("/completions", body, server, lambda answer: self._completions(answer, sampling), abort)
        retokenized = sum(not from_ids for _, from_ids in parsed)
        if retokenized:
            with self._counting:
                self.stats.retokenized += retokenized
                warn, self._warned = not self._warned, True
            if warn:
                warnings.warn(f"{self.base_url} returns text, not token ids: completions are re-tokenized, so the "
                              f"trained ids may differ from the sampled ones (counted in stats.retokenized)",
                              stacklevel=2)
        return [completion for completion, _ in parsed]

    def _completions(self, answer: Any, sampling: SamplingParams) -> list[tuple[Completion, bool]]:
        """The n completions of a /completions answer, each with whether its ids came from the server;
        `_Failure` for an answer that is not whole (checked before any of it is used)."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != sampling.n or not all(isinstance(c, dict) for c in choices):
            got = len(choices) if isinstance(choices, list) else "no"
            raise _Failure(f"{got} choices for n={sampling.n}: {_one_line(json.dumps(answer))[:200]}", _CHECK_SERVER)
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        if [c.get("index", i) for i, c in enumerate(choices)] != list(range(sampling.n)):
            raise _Failure(f"choices indexed {[c.get('index') for c in choices]} for n={sampling.n}", _CHECK_SERVER)
        return [self._completion(c, sampling) for c in choices]

    def _completion(self, choice: dict[str, Any], sampling: SamplingParams) -> tuple[Completion, bool]:
        text = choice.get("text")
        if not isinstance(text, str):
            raise _Failure(f"a choice without text: {_one_line(json.dumps(choice))[:200]}", _CHECK_SERVER)
        ids = choice.get("token_ids")
        from_ids = ids is not None
        if from_ids:
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise _Failure(f"token_ids that are not a list of ints: {_one_line(json.dumps(ids))[:200]}",
                               _CHECK_SERVER)
            # Text from our own tokenizer, as the hf backend does: servers hold back the bytes of an
            # unfinished character, so their text can end differently from the ids.
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        stopped = choice.get("finish_reason") == "stop"
        if stopped and sampling.stop_token_ids and (not ids or ids[-1] not in sampling.stop_token_ids):
            # A stop id ended it but the server left it out: our contract keeps it as the last id.
            ids = list(ids) + [sampling.stop_token_ids[0]]
        logprobs = None
        if sampling.logprobs:
            raw = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(raw, list) or len(raw) > len(ids) or not all(
                    x is None or isinstance(x, (int, float)) for x in raw):
                raise _Failure(f"no log-probs (one per token) although they were asked for: "
                               f"{_one_line(json.dumps(choice.get('logprobs')))[:200]}", _CHECK_SERVER)
            # None where the server gave none (an appended stop id too): never a made-up 0.0
            logprobs = [float(x) if x is not None else None for x in raw]
            logprobs += [None] * (len(ids) - len(logprobs))
        return Completion([int(i) for i in ids], text, "stop" if stopped else "length", logprobs), from_ids


def _model_list(answer: Any) -> list[dict[str, Any]]:
    """The entries of a /models answer; `_Failure` when it lists none."""
    listed = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(listed, list) or not listed or not all(isinstance(m, dict) and "id" in m for m in listed):
        raise _Failure(f"/models lists no model: {_one_line(json.dumps(answer))[:200]}", _CHECK_SERVER)
    return listed


def _read_whole(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """The whole body, or TimeoutError past `deadline`: the socket's timeout bounds each wait, and
    this bounds a server that trickles its answer. A body cut short raises IncompleteRead."""
    chunks = []
    while chunk := response.read1(65536):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError
    raw = b"".join(chunks)
    expected = response.headers.get("Content-Length")
    if expected is not None and expected.isdigit() and len(raw) < int(expected):
        raise http.client.IncompleteRead(raw, int(expected) - len(raw))
    return raw


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """What an error answer says, on one line; what could be read of it if it stalls."""
    try:
        return _one_line(exc.read().decode(errors="replace"))[:300]
    except (OSError, http.client.HTTPException):
        return "(its body could not be read)"


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Failure(Exception):
    """One try went wrong in a way another try may not: what went wrong, what to do if it persists,
    how long the server asked us to wait, and whether it never answered at all."""

    def __init__(self, what: str, advice: str = "", *, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(what)
        self.advice, self.retry_after, self.unreachable = advice, retry_after, unreachable


class _ServerFailed(BackendError):
    """A server gave no usable answer after every retry (the others may)."""


class _Abandoned(BackendError):
    """Another request of the same call failed, so this one stopped (never reaches a caller)."""
