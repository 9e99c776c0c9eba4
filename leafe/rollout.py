"""The rollout engine: many episodes at once through one backend, one batched generate per turn.

Evaluation, exploration, GRPO sampling and Early Experience all run episodes through this module, so
they share prompts, step limits, token accounting and budgets. Episodes are scheduled at turn
granularity: each `step` gives every live episode one turn in a single `generate` call, finished
episodes leave the batch and waiting ones take their place, so the batch stays full.

A `Live` is an episode in progress (env + conversation + record). Exploration makes Lives that start
from an earlier history (`start_from`), optionally with an experience appended; the backend
recognises the shared prefix and does not recompute it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from leafe.backends.base import Backend, Completion, SamplingParams
from leafe.chat import ChatFormat, Conversation
from leafe.envs.base import Env, Task, observation_hash
from leafe.episode import Episode, Step
from leafe.prompts import SYSTEM_PROMPT, first_message, observation_message, parse_action


@dataclass
class Live:
    """An episode in progress."""

    task: Task
    env: Env
    conv: Conversation
    episode: Episode
    #: Env snapshot at each history h_t (index t), kept when the engine is asked to (for rollback).
    snapshots: list[Any] | None
    started: float = field(default_factory=time.perf_counter)
    done: bool = False


@dataclass
class Counters:
    env_steps: int = 0
    generated_tokens: int = 0
    episodes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"env_steps": self.env_steps, "generated_tokens": self.generated_tokens, "episodes": self.episodes}


class RolloutEngine:
    def __init__(
        self,
        backend: Backend,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        max_batch: int = 64,
        seed: int = 0,
        keep_snapshots: bool = False,
        logprobs: bool = False,
        system: str = SYSTEM_PROMPT,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.backend = backend
        self.fmt = ChatFormat(backend.tokenizer)
        self.sampling = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            logprobs=logprobs,
            stop_token_ids=self.fmt.stop_token_ids,
        )
        self.max_batch = max_batch
        self.seed = seed
        self.keep_snapshots = keep_snapshots
        self.system = system
        self.counters = Counters()
        self._calls = 0

    # -- starting episodes ---------------------------------------------------------------------
    def start(self, env: Env, task: Task, meta: dict[str, Any] | None = None) -> Live:
        """Reset `env` to `task` and open the conversation: system prompt, instruction, o_0."""
        observation = env.reset(task)
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": first_message(env.instruction, observation)},
        ]
        conv = Conversation.start(self.fmt, messages)
        episode = Episode(
            task_id=task.task_id,
            env=env.name,
            token_ids=[],
            first_observation=observation,
            first_observation_hash=observation_hash(observation),
            meta=dict(meta or {}),
        )
        snapshots = [env.snapshot()] if self.keep_snapshots and env.supports_snapshot else None
        return Live(task, env, conv, episode, snapshots)

    # -- running -------------------------------------------------------------------------------
    def run(self, lives: Iterable[Live], on_finish: Callable[[Episode], None] | None = None) -> list[Episode]:
        """Run every Live to the end, at most `max_batch` at a time; returns episodes as they ended."""
        finished: list[Episode] = []
        waiting: Iterator[Live] = iter(lives)
        active: list[Live] = []
        while True:
            while len(active) < self.max_batch:
                live = next(waiting, None)
                if live is None:
                    break
                active.append(live)
            if not active:
                return finished
            self.step(active)
            still = []
            for live in active:
                if live.done:
                    episode = self.finish(live)
                    finished.append(episode)
                    if on_finish is not None:
                        on_finish(episode)
                else:
                    still.append(live)
            active = still

    def step(self, lives: list[Live]) -> None:
        """Give every live episode one turn, with one batched generate call."""
        prompts, runnable = [], []
        for live in lives:
            prompt = live.conv.prompt_ids()
            if len(prompt) + self.sampling.max_new_tokens > self.backend.max_context:
                live.done, live.episode.finish = True, "context"
                continue
            prompts.append(prompt)
            runnable.append(live)
        if not runnable:
            return
        completions = self.backend.generate(prompts, replace(self.sampling, seed=self._next_seed()))
        for live, (completion,) in zip(runnable, completions):
            self.apply(live, completion)

    def apply(self, live: Live, completion: Completion) -> None:
        """Append a sampled reply to the history, act on it in the env, and record the step."""
        t = len(live.episode.steps)
        context_len = len(live.conv.ids)
        start, end = live.conv.add_generation(completion.token_ids, completion.finish_reason == "stop")
        action = parse_action(completion.text)
        result = live.env.step(action)
        self.counters.env_steps += 1
        self.counters.generated_tokens += len(completion.token_ids)
        live.episode.steps.append(
            Step(
                index=t,
                context_len=context_len,
                action_start=start,
                action_end=end,
                reply=completion.text,
                action=action,
                finish_reason=completion.finish_reason,
                observation=result.observation,
                observation_hash=observation_hash(result.observation),
                reward=float(result.reward),
                done=result.done,
                success=result.success,
                info=result.info,
                logprobs=completion.logprobs,
            )
        )
        if result.done:
            live.done = True
            live.episode.success = result.success
            live.episode.finish = "success" if result.success else "done"
            return
        live.conv.add_message("user", observation_message(t + 1, result.observation))
        if live.snapshots is not None:
            live.snapshots.append(live.env.snapshot())

    def finish(self, live: Live) -> Episode:
        live.episode.token_ids = list(live.conv.ids)
        live.episode.wall_s = time.perf_counter() - live.started
        self.counters.episodes += 1
        return live.episode

    def _next_seed(self) -> int:
        self._calls += 1
        return (self.seed * 1_000_003 + self._calls) % (2**63)
