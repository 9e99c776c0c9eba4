"""The openenv env against a real OpenEnv server: a number line served by openenv-core's own `create_app`
(tests/openenv_numberline_server.py) in a subprocess on a free loopback port. The env plays it over the
server's WebSocket; its failures are EnvFaults and its bad input one EnvError line; `leafe eval`, `leafe
explore` (rollback by verified replay) and `leafe train grpo` run on it; a server that ignores the
seed gets its branches refused and counted, with a warning.

`leafe explore` samples from a scripted OpenAI-compatible completions server (stdlib, in a thread):
the tiny random model would never write a reflection that names a step, so no branch would come.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import JSONHandler, free_port, leafe, scripted_explorer

from leafe.chat import ChatFormat
from leafe.envs import EnvError, make
from leafe.envs import openenv as openenv_module
from leafe.envs.base import EnvFault, Task
from leafe.envs.contract import check_env
from leafe.rollout import MAX_FAULTS_IN_A_ROW, EnvUnavailable, Recorder

SERVER = Path(__file__).with_name("openenv_numberline_server.py")
GOAL = re.compile(r"You are at (\d+)\. The goal is at (\d+)\.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The number-line OpenEnv server's url, for this module; terminated after. Its output goes to a
    file: a pipe nobody reads would fill up and stall it."""
    pytest.importorskip("openenv.core", reason="the test's OpenEnv server needs openenv-core: pip install 'leafe[test]'")
    log = tmp_path_factory.mktemp("openenv") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(SERVER)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (port := re.search(r"^PORT (\d+)$", log.read_text(), re.MULTILINE)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the OpenEnv server did not come up; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_an_episode_is_played_over_the_servers_session_and_a_seed_replays_the_same(server):
    env = make("openenv", url=server, max_steps=8)
    tasks = env.make_tasks(3, 0)
    assert [t.task_id for t in tasks] == ["openenv-0", "openenv-1", "openenv-2"]
    first = env.reset(tasks[0])
    assert first == make("openenv", url=server).reset(tasks[0])  # the seed fixes the episode
    assert len({make("openenv", url=server).reset(t) for t in tasks}) == 3
    start, goal = map(int, GOAL.match(first).groups())
    assert env.instruction.startswith("Act in this environment")
    # The server's own feedback, and an action its Action schema refuses: both ordinary steps.
    assert env.step("jump").observation == "Unknown action 'jump': use left, right or look."
    refused = env.step("right " * 10)
    assert refused.observation == "Invalid action: message: String should have at most 20 characters"
    assert refused.info == {"invalid": True} and not refused.done
    assert env.step("look").observation == f"You are at {start}. The goal is at {goal}."  # not moved
    for _ in range(goal - start):
        result = env.step("right")
    assert (result.observation, result.reward, result.done, result.success) == (
        f"You reached the goal at {goal}.", 1.0, True, True)
    assert env._ws is None  # the ended episode's session is closed, freeing the server's env
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("right")
    # leafe's own step limit ends an episode the server would let run on.
    env.reset(tasks[1])
    results = [env.step("look") for _ in range(8)]
    assert [r.done for r in results] == [False] * 7 + [True] and not results[-1].success
    assert results[-1].observation.endswith("No steps left (8 used): the task was not completed.")


def test_the_adapter_keeps_the_env_contract(server):
    report = check_env(lambda: make("openenv", url=server, max_steps=10), actions=["left", "right", "look"])
    assert report.replays == report.tasks == 3 and report.ended == 3


def test_fields_are_configurable_and_bad_input_is_one_env_error_line(server):
    task = make("openenv", url=server).make_tasks(1, 5)[0]
    env = make("openenv", url=server, observation_field="text", instruction="Walk to the goal.")
    assert GOAL.match(env.reset(task)) and env.instruction == "Walk to the goal."
    env = make("openenv", url=server, instruction_field="text")
    env.reset(task)
    assert GOAL.match(env.instruction)
    with pytest.raises(EnvError, match=r"refused the reset \(noisy: Input should be a valid boolean\): check"):
        make("openenv", url=server, reset_params={"noisy": "very"}).reset(task)
    with pytest.raises(EnvError, match="has no integer seed"):
        env.reset(Task("openenv-x", "openenv", {}))
    cases = [
        (dict(url=""), "needs the address of a running OpenEnv server: --env-param url=http://HOST:PORT"),
        (dict(url="localhost:8000"), "url='localhost:8000' is not an OpenEnv server's address"),
        (dict(url="http://127.0.0.1:notaport"), "is not an OpenEnv server's address"),
        (dict(url=f"http://127.0.0.1:{free_port()}"), r"no OpenEnv server answers at http://127\.0\.0\.1:\d+ \("),
        (dict(url=server, action_field="command"),
         "the Action of the OpenEnv server at .* has no field 'command' \\(it has metadata, message\\)"),
        (dict(url=server, reset_params=[1]), "reset_params must be a JSON object"),
        (dict(url=server, max_steps=0), "max_steps must be >= 1"),
    ]
    for params, error in cases:
        with pytest.raises(EnvError, match=error) as raised:
            make("openenv", **params)
        assert "\n" not in str(raised.value)
    with pytest.raises(EnvError, match="have no field 'prompt' \\(they have text\\): set --env-param observation_field"):
        make("openenv", url=server, observation_field="prompt").reset(task)


def test_failures_of_the_server_are_env_faults_and_one_that_stays_down_stops_in_one_line(
        server, tiny_tokenizer, monkeypatch):
    env = make("openenv", url=server)
    task = env.make_tasks(1, 0)[0]
    env.reset(task)
    with pytest.raises(EnvFault, match="failed a step: the number line broke \\(EXECUTION_ERROR\\)"):
        env.step("crash")
    env.reset(task)  # on a new session: the rollout starts a faulted episode again
    impatient = make("openenv", url=server, timeout_s=1.0)
    impatient.reset(task)
    with pytest.raises(EnvFault, match="did not answer a step within 1s"):
        impatient.step("sleep")  # the server answers after 2 s
    assert impatient._ws is None
    # The server goes away (here: the env is pointed at a port nothing listens on): a reset tries a
    # few times, then faults; the rollout retries the reset until MAX_FAULTS_IN_A_ROW, then stops
    # the stage in one line that names the server.
    monkeypatch.setattr(openenv_module, "CONNECT_BACKOFF_S", 0.0)
    env.close()
    env.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EnvFault, match=f"cannot open a session with the OpenEnv server at {env.url} .* after 3 tries"):
        env.reset(task)
    recorder = Recorder(ChatFormat(tiny_tokenizer))
    with pytest.raises(EnvUnavailable, match=f"{MAX_FAULTS_IN_A_ROW} env steps in a row failed .*{env.url}"):
        recorder.start(env, task)
    assert recorder.counters.faults == MAX_FAULTS_IN_A_ROW


# -- the CLI through the server --------------------------------------------------------------------

def cli_args(command: list, model, out, url, *extra) -> list:
    return [*command, "--model", model, "--out", out, "--env", "openenv", "--env-param", f"url={url}",
            "--tasks", 2, "--task-seed", 0, *extra]


def test_eval_and_train_grpo_run_through_the_server(server, tiny_model_dir, tmp_path):
    trained = tmp_path / "grpo"
    run = leafe(*cli_args(["train", "grpo"], tiny_model_dir, trained, server, "--env-param", "max_steps=2",
                          "--max-new-tokens", 8, "--steps", 1, "--tasks-per-step", 2, "--group-size", 2,
                          "--device", "cpu"))
    assert run.returncode == 0, run.stderr
    assert json.loads((trained / "train.json").read_text())["cost"]["env_steps"] >= 2 * 2
    assert len((trained / "log.jsonl").read_text().splitlines()) == 1
    run = leafe(*cli_args(["eval"], trained, tmp_path / "eval", server, "--env-param", "max_steps=3",
                          "--samples", 2, "--max-new-tokens", 8))
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [t["task_id"] for t in result["tasks"]] == ["openenv-0", "openenv-1"]
    assert all(t["n"] == 2 for t in result["tasks"]) and result["env_steps"] >= 2 * 2


class _Completions(JSONHandler):
    """An OpenAI-compatible completions server whose replies a scripted stage-1 agent writes: it looks
    until told an experience, then walks right to the goal of the prompt's first observation."""

    fmt: ChatFormat
    reply = staticmethod(scripted_explorer(
        lambda text: ["right"] * (lambda p, g: g - p)(*map(int, GOAL.search(text).groups())), "look"))

    def do_GET(self):
        self._send({"data": [{"id": "scripted"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = self.fmt.tokenizer.decode(request["prompt"], skip_special_tokens=False)
        choices = []
        for i in range(request["n"]):
            reply = self.reply(text, i)
            ids = self.fmt.encode(reply) + [self.fmt.end_of_turn_id]
            choices.append({"index": i, "text": reply, "token_ids": ids, "finish_reason": "stop"})
        self._send({"choices": choices})


@pytest.fixture(scope="module")
def scripted_agent(tiny_tokenizer):
    handler = type("Completions", (_Completions,), {"fmt": ChatFormat(tiny_tokenizer)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.mark.parametrize("noisy", [False, True])
def test_explore_rolls_back_by_verified_replay_and_refuses_branches_a_seedless_server_cannot_replay(
        noisy, server, scripted_agent, tiny_model_dir, tmp_path):
    extra = ["--env-param", 'reset_params={"noisy": true}'] if noisy else []
    run = leafe(*cli_args(["explore"], tiny_model_dir, tmp_path, server, "--env-param", "max_steps=6", *extra,
                          "--backend", "openai", "--base-url", scripted_agent, "--max-new-tokens", 48,
                          "--budget", 12, "--reflect-every", 4, "--branch-samples", 1, "--max-depth", 1,
                          "--stop-on-success"))
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    trees = [json.loads(line) for line in (tmp_path / "trees.jsonl").read_text().splitlines()]
    if not noisy:
        # The root looked 4 times and reflected; its branch replayed step 0 on a fresh session and won.
        assert summary["success_rate"] == 1.0 and summary["replay_divergences"] == 0
        assert summary["branches"] == summary["branches_succeeded"] == 2 and summary["replayed_steps"] == 2
        assert "warning" not in run.stderr
        return
    # Every branch's replay met another first observation: refused, counted, reported; no branch ran.
    assert summary["branches"] == summary["replayed_steps"] == 0 and summary["success_rate"] == 0.0
    assert summary["replay_divergences"] == sum(t["replay_divergences"] for t in trees) > 0
    assert all(node["parent"] is None for tree in trees for node in tree["nodes"])
    warning = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{summary['replay_divergences']} branches refused" in warning[0]
