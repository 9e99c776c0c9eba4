"""A backend for any OpenAI-compatible completions server (vLLM, SGLang, llama.cpp's server).

Prompts go out as token ids (the completions API accepts a list of ints as `prompt`), so the server
sees exactly the ids our chat layer built. What comes back depends on the server:
- vLLM returns the sampled ids (`return_token_ids`), and log-probs per sampled token;
- a server that returns text only is served by re-encoding that text with the model's tokenizer.
  Those ids may differ from the ones the model sampled (a word split another way), which breaks
  "the ids the model generated are the ids we train on"; every such completion is counted in
  `stats.retokenized` and a warning says so once.

Requests for the prompts of one call run concurrently (the server batches them), spread over the
servers given (prompt i goes to server i mod N first). Connection errors, timeouts and 5xx answers are
retried with exponential backoff; a server still failing is set aside and its requests go to the
others, so a run goes on while one server answers. A 4xx answer or a malformed body fails at once with
what the server said. Each request carries its own seed, so which server answers does not change what
is sampled (on servers of the same build and hardware).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, request_seed
from leafe.chat import generation_stop_ids


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
    `max_concurrency`: requests in flight at once (None: one per prompt of a call, i.e. every
    episode in flight)."""

    def __init__(self, model: str, *, base_url: str | Sequence[str], served_model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.5,
                 max_concurrency: int | None = None):
        from transformers import AutoTokenizer

        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise BackendError("the openai backend needs a server's address: --base-url http://HOST:PORT/v1")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.api_key, self.timeout_s = api_key, timeout_s
        self.retries, self.backoff_s, self.max_concurrency = retries, backoff_s, max_concurrency
        self.stats = OpenAIStats()
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
            except _Unreachable as exc:
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
        listed = self._request(url, "GET", "/models").get("data")
        if not isinstance(listed, list) or not listed:
            raise BackendError(f"{url}/models lists no model; is this an OpenAI-compatible server?")
        names = [m.get("id") for m in listed]
        if served_model is not None and served_model not in names:
            raise BackendError(f"the server at {url} serves {', '.join(map(str, names))}, not {served_model!r}")
        return listed[names.index(served_model)] if served_model is not None else listed[0]

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request to one server, retried with backoff; `_Unreachable` when every try failed."""
        full = f"{url}{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(full, data, headers, method=method),
                                            timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                if exc.code < 500:  # our request is wrong: retrying cannot help
                    raise BackendError(f"{method} {full} was refused ({exc.code}): {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise BackendError(f"{method} {full} answered with something that is not JSON: {raw[:200]!r}") from None
        raise _Unreachable(f"cannot reach an OpenAI-compatible server at {url} ({last}) after "
                           f"{self.retries + 1} tries; start it (e.g. `vllm serve MODEL`) or fix --base-url")

    def _post(self, path: str, body: dict[str, Any], first: int) -> dict[str, Any]:
        """POST to server `first` (mod N), moving on to the others while servers fail."""
        order = self.base_urls[first % len(self.base_urls):] + self.base_urls[:first % len(self.base_urls)]
        order = [u for u in order if u not in self._down] + [u for u in order if u in self._down]
        errors = []
        for url in order:
            try:
                answer = self._request(url, "POST", path, body)
            except _Unreachable as exc:
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
        self.stats.calls += 1
        self._calls += 1  # not stats.calls: a stats.reset() must not make request seeds repeat
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        call = self._calls
        workers = min(self.max_concurrency or len(prompts), len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda i: self._complete(list(prompts[i]), sampling, request_seed(sampling.seed, call, i), i),
                                    range(len(prompts))))
        self.stats.prefill_tokens += sum(len(p) for p in prompts)  # the server's own cache is not visible
        self.stats.generated_tokens += sum(len(c.token_ids) for row in results for c in row)
        return results

    def _complete(self, prompt: list[int], sampling: SamplingParams, seed: int, server: int) -> list[Completion]:
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
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
        answer = self._post("/completions", body, server)
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != sampling.n:
            raise BackendError(f"/completions answered {len(choices) if isinstance(choices, list) else 'no'} "
                               f"choices for n={sampling.n}: {json.dumps(answer)[:200]}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [self._completion(c, sampling) for c in choices]

    def _completion(self, choice: dict[str, Any], sampling: SamplingParams) -> Completion:
        text = choice.get("text")
        if not isinstance(text, str):
            raise BackendError(f"/completions answered a choice without text: {json.dumps(choice)[:200]}")
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            # Text from our own tokenizer, as the hf backend does: servers hold back the bytes of an
            # unfinished character, so their text can end differently from the ids.
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            self.stats.retokenized += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.base_url} returns text, not token ids: completions are re-tokenized, so the "
                              f"trained ids may differ from the sampled ones (counted in stats.retokenized)",
                              stacklevel=3)
        stopped = choice.get("finish_reason") == "stop"
        if stopped and sampling.stop_token_ids and (not ids or ids[-1] not in sampling.stop_token_ids):
            # A stop id ended it but the server left it out: our contract keeps it as the last id.
            ids = list(ids) + [sampling.stop_token_ids[0]]
        logprobs = None
        if sampling.logprobs:
            raw = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(raw, list):
                raise BackendError(f"{self.base_url} returned no log-probs although they were asked for")
            # None where the server gave none (an appended stop id too): never a made-up 0.0
            logprobs = [float(x) if x is not None else None for x in raw]
            logprobs += [None] * (len(ids) - len(logprobs))
        return Completion([int(i) for i in ids], text, "stop" if stopped else "length", logprobs)


class _Unreachable(BackendError):
    """A server did not answer after every retry (the others may)."""
