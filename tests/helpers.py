"""Test helpers, one place for what several test modules use: a tiny model on disk, a backend that
replies from a script, the `leafe` command in a subprocess and its one-line errors, the vLLM venv
the probes run in, the shared data folder, a free port.

Imported inside .venv-vllm too (by tests/probes), where there is no pytest: pytest is imported where
it is needed, not here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from leafe.backends.base import Backend, BackendStats, Completion, SamplingParams
from leafe.chat import ChatFormat
from leafe.prompts import REFLECTION_PROMPT

TESTS = Path(__file__).resolve().parent
#: Scripts the tests run in another interpreter, and the tiny real-architecture models (not tests).
PROBES = TESTS / "probes"
#: The project's data outside the repository (real tokenizers, ALFWorld, WebShop, MBPP, APPS); see its README.
SHARED_DATA = Path(os.environ.get("LEAFE_SHARED_DATA", TESTS.parent.parent / "shared" / "data"))
#: vLLM for CPU lives in its own venv (`make vllm-env`): it pins its own torch and transformers.
VLLM_PYTHON = TESTS.parent / ".venv-vllm" / "bin" / "python"


def leafe_command(*args: object, python: object = sys.executable) -> list[str]:
    """The argv of `python -m leafe ARGS`, for tests that start, kill or time the process themselves."""
    return [str(python), "-m", "leafe", *map(str, args)]


def leafe(*args: object, cwd: object = None, env: dict[str, str] | None = None, python: object = sys.executable,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m leafe ARGS` as a user runs it, output captured."""
    return subprocess.run(leafe_command(*args, python=python), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def eval_args(model: object, out: object, *extra: object) -> list[object]:
    """`leafe eval` of 3 tasks x 4 samples of 8 tokens at most: the cheapest evaluation with a Pass@k curve."""
    return ["eval", "--model", model, "--out", out, "--tasks", 3, "--samples", 4, "--max-new-tokens", 8,
            "--task-seed", 1000, *extra]


def one_line_error(result, *fragments: str) -> str:
    """Assert that a command (a finished subprocess, or a CliRunner result) failed with exit status 2
    and one `error:` message on stderr, no traceback, holding every fragment; returns the message."""
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = " ".join(result.stderr.split())  # the console may wrap the one message
    assert line.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


def squashed(text: str) -> str:
    """Text without any whitespace, to find a wrapped line in a listing (a path longer than a line
    is broken across lines)."""
    return "".join(text.split())


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_vllm_venv(script: Path, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a probe (tests/probes) with .venv-vllm's Python, tests/ on its path; skips the test when
    that venv is not built."""
    import pytest

    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: run `make vllm-env` (make test does)")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(VLLM_PYTHON), str(script), *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=TESTS)


def env_texts() -> list[str]:
    """Text the agent sees on Sokoban, to train a test tokenizer on."""
    from leafe.envs import make
    from leafe.prompts import REFLECTION_PROMPT, SYSTEM_PROMPT, experience_message, format_reply

    env = make("sokoban")
    texts = [SYSTEM_PROMPT, env.instruction, REFLECTION_PROMPT, experience_message("push the box left first")]
    for task in env.make_tasks(30, 0):
        texts.append(env.reset(task))
        for action in ("up", "down", "left", "right", "jump"):
            result = env.step(action)
            texts.append(result.observation)
            texts.append(format_reply("the box is right of me", action))
            if result.done:
                break
    return texts


def make_tiny_model(out: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leafe.base_agent.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(env_texts(), vocab_size=512)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def distilled_model(base: Path, out: Path) -> Path:
    """A model directory written by leafe (`leafe distill` of a scripted exploration of `base`) in
    `out`/model, in a few seconds: for tests of what leafe writes (model cards, serving)."""
    from transformers import AutoTokenizer

    from leafe.method import Job
    from leafe.methods.distill import distill
    from leafe.methods.explore import explore
    from leafe.settings import DistillSettings, ExploreSettings, SFTSettings

    def agent(text: str, i: int) -> str:  # dances until it has an experience, then solves
        if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
            return "Step: none\nExperience: fine." if EXPERIENCE_MARK in text else "Step: 1\nExperience: push."
        return solver_reply(text) if EXPERIENCE_MARK in text else "Thought: dance.\nAction: dance"

    backend = ScriptedBackend(AutoTokenizer.from_pretrained(base), agent)
    explore(Job("scripted", out / "explore", backend=backend),
            ExploreSettings(tasks=2, task_seed=40, budget=30, branch_samples=1, max_depth=2, stop_on_success=True))
    distill(Job(str(base), out / "model", inputs=[out / "explore" / "trees.jsonl"]), DistillSettings(reh_fraction=0.5),
            SFTSettings(epochs=1, batch_size=4, learning_rate=1e-3, save_every=0))
    return out / "model"


class ScriptedBackend(Backend):
    """Replies chosen by a function of the decoded prompt; for tests about control flow, not models.

    The reply text is encoded and ended with the template's end-of-turn token, as a model would.
    """

    def __init__(self, tokenizer, policy: Callable[[str, int], str], max_context: int = 100_000):
        self.tokenizer = tokenizer
        self.fmt = ChatFormat(tokenizer)
        self.policy = policy
        self.max_context = max_context
        self.stats = BackendStats()
        self.batches: list[int] = []

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        self.stats.calls += 1
        self.batches.append(len(prompts))
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
            row = []
            for i in range(sampling.n):
                reply = self.policy(text, i)
                ids = self.fmt.encode(reply) + [self.fmt.end_of_turn_id]
                row.append(Completion(ids, reply, "stop", [0.0] * len(ids) if sampling.logprobs else None))
                self.stats.generated_tokens += len(ids)
            out.append(row)
        return out


EXPERIENCE_MARK = "Experience from an earlier attempt"


def dancing_explorer(reflection: str = "Step: 0\nExperience: stop dancing and push the box.",
                     solve_with_experience: bool = True) -> Callable[[str, int], str]:
    """A Sokoban stage-1 agent (for ScriptedBackend): dances (an invalid action) until an experience is
    in context, then plays the solver's moves; asked to reflect, replies `reflection`."""

    def reply(text: str, i: int) -> str:
        on_track = solve_with_experience and EXPERIENCE_MARK in text
        if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
            return "Step: none\nExperience: on track." if on_track else reflection
        if on_track and EXPERIENCE_MARK in text:
            return solver_reply(text)
        return "Thought: let me dance.\nAction: dance"

    return reply


def scripted_explorer(expert_of: Callable[[str], list[str]], idle: str) -> Callable[[str, int], str]:
    """A stage-1 agent for text games: idles until an experience is in context, then plays the expert's
    actions (`expert_of(prompt text)`, for the task in the prompt) from where it is. Its reflection
    names step 1 after a failure and finds nothing wrong once it has an experience."""

    def reply(text: str, i: int) -> str:
        if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
            return "Step: none\nExperience: on track." if EXPERIENCE_MARK in text else "Step: 1\nExperience: act, do not look."
        if EXPERIENCE_MARK in text:
            done = text.split(EXPERIENCE_MARK, 1)[1].count("<|im_start|>assistant") - 1
            return f"Thought: follow the plan.\nAction: {expert_of(text)[done]}"
        return f"Thought: let me look.\nAction: {idle}"

    return reply


def last_board(prompt_text: str):
    """(room, state) of the last grid shown in a decoded prompt."""
    from leafe.envs.sokoban import parse_xsb

    lines = prompt_text.split("\n")
    end = max(k for k, line in enumerate(lines) if line.startswith("#"))
    start = end
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    return parse_xsb("\n".join(line.replace("_", " ") for line in lines[start : end + 1]))


def solver_reply(prompt_text: str) -> str:
    """The optimal next move for the last board in the prompt, as a reply."""
    from leafe.envs.sokoban import solve_state

    moves = solve_state(*last_board(prompt_text))
    return f"Thought: follow the plan.\nAction: {moves[0] if moves else 'up'}"


def solver_policy(tasks=None):
    """A policy that replies with the optimal next move (for ScriptedBackend)."""
    return lambda text, i: solver_reply(text)


def two_rank_config(path: Path) -> Path:
    """An accelerate config that starts 2 ranks on this machine (MULTI_GPU: torchrun; on a CPU-only
    machine the ranks use gloo) on a free loopback port. A MULTI_CPU config would start one process."""
    import yaml

    port = free_port()
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "machine_rank": 0, "main_process_ip": "127.0.0.1",
        "main_process_port": port, "rdzv_backend": "static", "same_network": True, "use_cpu": False}))
    return path


class JSONHandler(BaseHTTPRequestHandler):
    """A test server's request handler that answers JSON (`_send`) and logs nothing."""

    def log_message(self, *args):
        pass

    def _send(self, answer: dict) -> None:
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
