"""The rollout engine: many episodes at once through one backend, one batched generate per turn.

Two layers. `Recorder` is the single place where prompts, env steps and token ids meet: it opens an
episode, applies a reply (sampled or scripted) to the env and the history, builds the reflection
prompt, and branches an episode from an earlier step with an experience (rolling the env back by
snapshot or verified replay). `RolloutEngine` feeds a Recorder from a backend: each `step` gives
every live episode one turn in a single `generate` call; finished episodes leave the batch and
waiting ones take their place, so the batch stays full.

Evaluation, exploration, GRPO, Early Experience and the embedded model's synthetic pretraining data
all go through here, so they share prompts, step limits and token accounting.

A step whose env failed in its own machinery (`EnvFault`: the code judge's sandbox could not run the
program) has no outcome, so it never becomes feedback or a reward: the Recorder ends the episode as
faulted (finish "fault", the message in meta["fault"]), `RolloutEngine.run` runs it again from its
start (meta["faulted_runs"] counts how often), exploration explores its task again. After
`MAX_FAULTS_IN_A_ROW` such steps with no real one between them the stage stops (`EnvUnavailable`).
A reset the env's machinery failed (a remote env's server that is down) is tried again the same way.

A rollback by replay that does not reproduce the recorded observations (`ReplayDivergence`: the env is
not deterministic under reset + replay) is counted in `replay_divergences` and raised to the caller,
which refuses that branch: a branch never starts from a state other than the one its parent was in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from leafe.backends.base import Backend, Completion, SamplingParams
from leafe.chat import ChatFormat, Conversation
from leafe.envs.base import Env, EnvFault, ReplayDivergence, StepResult, Task, observation_hash, replay
from leafe.episode import Episode, Step
from leafe.errors import LeafeError
from leafe.prompts import (
    REFLECTION_PROMPT,
    SYSTEM_PROMPT,
    experience_message,
    first_message,
    observation_message,
)

#: Env steps that may fail in the env's machinery one after another (no real step between them)
#: before the stage stops: a sandbox that fails this often is down, not unlucky.
MAX_FAULTS_IN_A_ROW = 20


class EnvUnavailable(LeafeError, RuntimeError):
    """The env's machinery failed `MAX_FAULTS_IN_A_ROW` steps in a row; the message has its last words."""


@dataclass
class Live:
    """An episode in progress."""

    task: Task
    env: Env
    conv: Conversation
    episode: Episode
    #: Env snapshot at each history h_t (index t), kept when asked (cheap rollback).
    snapshots: list[Any] | None
    started: float = field(default_factory=time.perf_counter)
    done: bool = False


@dataclass
class Counters:
    env_steps: int = 0
    generated_tokens: int = 0
    episodes: int = 0
    replayed_steps: int = 0
    faults: int = 0  # steps the env's machinery failed (EnvFault), never counted as env steps
    replay_divergences: int = 0  # rollbacks refused: the replay did not reproduce the recorded observations

    def as_dict(self) -> dict[str, int]:
        return {
            "env_steps": self.env_steps,
            "generated_tokens": self.generated_tokens,
            "episodes": self.episodes,
            "replayed_steps": self.replayed_steps,
            "faults": self.faults,
            "replay_divergences": self.replay_divergences,
        }


class Recorder:
    """Turns replies into recorded episodes; knows nothing of how replies are produced."""

    def __init__(self, fmt: ChatFormat, system: str = SYSTEM_PROMPT, keep_snapshots: bool = False):
        self.fmt = fmt
        self.system = system
        self.keep_snapshots = keep_snapshots
        self.counters = Counters()
        self.faults_in_a_row = 0

    def start(self, env: Env, task: Task, meta: dict[str, Any] | None = None) -> Live:
        """Reset `env` to `task` and open the conversation: system prompt, instruction, o_0."""
        observation = self._reset(env, task)
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": first_message(env.instruction, observation)},
        ]
        episode = Episode(
            task_id=task.task_id,
            env=env.name,
            token_ids=[],
            first_observation=observation,
            first_observation_hash=observation_hash(observation),
            meta=dict(meta or {}),
        )
        snapshots = [env.snapshot()] if self.keep_snapshots and env.supports_snapshot else None
        return Live(task, env, Conversation.start(self.fmt, messages), episode, snapshots)

    def _reset(self, env: Env, task: Task) -> str:
        """`env.reset(task)`, tried again while the env's machinery fails it (a remote env's server that
        is down or restarting); each failure counts as a fault, so one that stays down stops the stage
        (`EnvUnavailable`) instead of stopping it at the first try or retrying forever."""
        while True:
            try:
                return env.reset(task)
            except EnvFault as fault:
                self.count_fault(fault)

    def apply(self, live: Live, completion: Completion) -> None:
        """Append a reply to the history, act on it in the env, and record the step (or, when the env
        faulted, end the episode as faulted: check `live.episode.finish`)."""
        self.apply_all([live], [completion])

    def apply_all(self, lives: list[Live], completions: list[Completion]) -> None:
        """`apply` for a batch: every env is handed its reply before any is waited for, so envs on
        workers step concurrently; steps are recorded in batch order either way."""
        pending = [_submit(live.env, c.text) for live, c in zip(lives, completions)]
        for live, completion, wait in zip(lives, completions, pending):
            try:
                action, result = wait()
            except EnvFault as fault:
                self._fault(live, fault)
                continue
            self._record(live, completion, action, result)

    def _fault(self, live: Live, fault: EnvFault) -> None:
        """End `live` as faulted: its last step has no outcome, so nothing of it is recorded."""
        live.done = True
        live.episode.finish = "fault"
        live.episode.meta["fault"] = str(fault)
        self.count_fault(fault)

    def count_fault(self, fault: EnvFault) -> None:
        """Count a step the env's machinery failed; `EnvUnavailable` once too many came in a row."""
        self.counters.faults += 1
        self.faults_in_a_row += 1
        if self.faults_in_a_row >= MAX_FAULTS_IN_A_ROW:
            raise EnvUnavailable(f"{self.faults_in_a_row} env steps in a row failed in the env itself, not through "
                                 f"the agent (the last: {fault}); {fault.hint or 'fix the env, then rerun'}") from fault

    def _record(self, live: Live, completion: Completion, action: str, result: StepResult) -> None:
        t = len(live.episode.steps)
        context_len = len(live.conv.ids)
        start, end = live.conv.add_generation(completion.token_ids, completion.finish_reason == "stop")
        self.faults_in_a_row = 0
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
        live.conv.add_message("user", observation_message(t, action, result.observation))
        if live.snapshots is not None:
            live.snapshots.append(live.env.snapshot())

    def scripted(self, text: str) -> Completion:
        """A completion for a reply we wrote ourselves, ended as a model ends its turn."""
        ids = self.fmt.encode(text)
        if self.fmt.end_of_turn_id is not None:
            ids.append(self.fmt.end_of_turn_id)
        return Completion(ids, text, "stop")

    def finish(self, live: Live) -> Episode:
        live.episode.token_ids = list(live.conv.ids)
        live.episode.wall_s = time.perf_counter() - live.started
        self.counters.episodes += 1
        return live.episode

    # -- LEAFE stage 1 building blocks ---------------------------------------------------------
    def reflection_prompt(self, live: Live, prompt: str = REFLECTION_PROMPT) -> Conversation:
        """The history so far (with the last observation) followed by the reflection prompt."""
        conv = live.conv.copy()
        steps = live.episode.steps
        if conv.last_role == "assistant":  # the episode ended: its last observation is not in yet
            last = steps[-1]
            conv.add_message("user", observation_message(last.index, last.action, last.observation))
        conv.add_message("user", prompt)
        return conv

    def branch(self, live: Live, tau: int, experience: str | None, env: Env, meta: dict[str, Any] | None = None) -> Live:
        """A new episode that shares `live`'s first `tau` steps, then continues from h_tau.

        `env` (a fresh instance of the same env) is put in the state of step tau, from the kept
        snapshot when there is one, else by replaying the first tau actions (verified, and counted
        in `replayed_steps`, not in the env-step budget). A replay that diverges raises
        `ReplayDivergence` (counted in `replay_divergences`): the caller refuses the branch. The
        experience message, when given, is appended after h_tau so h_tau stays an exact shared prefix
        of the parent's token ids.
        """
        steps = live.episode.steps
        if not 0 <= tau < len(steps):
            raise ValueError(f"tau must be within [0, {len(steps)}) (got {tau})")
        if live.snapshots is not None and tau < len(live.snapshots):
            env.restore(live.snapshots[tau])
        else:
            try:
                replay(env, live.task, live.episode.actions[:tau], live.episode.observation_hashes[: tau + 1])
            except EnvFault as fault:  # the caller gives up on this branch; counted like any faulted step
                self.count_fault(fault)
                raise
            except ReplayDivergence:  # the env is not where the parent was: this branch must not start
                self.counters.replay_divergences += 1
                raise
            self.counters.replayed_steps += tau
        conv = live.conv.prefix(steps[tau].context_len)
        if experience is not None:
            conv.add_message("user", experience_message(experience))
        parent = live.episode
        episode = Episode(
            task_id=parent.task_id,
            env=parent.env,
            token_ids=[],
            first_observation=parent.first_observation,
            first_observation_hash=parent.first_observation_hash,
            steps=[replace(s) for s in steps[:tau]],
            meta=dict(meta or {}),
        )
        snapshots = None
        if self.keep_snapshots and env.supports_snapshot:
            snapshots = list(live.snapshots[: tau + 1]) if live.snapshots is not None else [env.snapshot()]
        return Live(live.task, env, conv, episode, snapshots)


class RolloutEngine:
    """Runs Lives to the end through a backend, batching one turn of every live episode per call."""

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
        date_string: str | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.backend = backend
        fmt = ChatFormat(backend.tokenizer, date_string=date_string, stop_ids=getattr(backend, "stop_ids", ()))
        self.recorder = Recorder(fmt, system, keep_snapshots)
        self.fmt = self.recorder.fmt
        self.sampling = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            logprobs=logprobs,
            stop_token_ids=self.fmt.stop_token_ids,
        )
        self.max_batch = max_batch
        self.seed = seed
        self._calls = 0

    @property
    def counters(self) -> Counters:
        return self.recorder.counters

    def start(self, env: Env, task: Task, meta: dict[str, Any] | None = None) -> Live:
        return self.recorder.start(env, task, meta)

    def finish(self, live: Live) -> Episode:
        return self.recorder.finish(live)

    def run(self, lives: Iterable[Live], on_finish: Callable[[Episode], None] | None = None) -> list[Episode]:
        """Run every Live (each opened by `start`) to the end, at most `max_batch` at a time; returns
        episodes as they ended. An episode whose env faulted is run again from its start, in place."""
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
                if live.done and live.episode.finish == "fault":
                    still.append(self.rerun(live))
                elif live.done:
                    episode = self.finish(live)
                    finished.append(episode)
                    if on_finish is not None:
                        on_finish(episode)
                else:
                    still.append(live)
            active = still

    def rerun(self, live: Live) -> Live:
        """A fresh start of a faulted episode's task, on the same env, its meta counting the faulted runs."""
        meta = {k: v for k, v in live.episode.meta.items() if k != "fault"}
        meta["faulted_runs"] = meta.get("faulted_runs", 0) + 1
        return self.start(live.env, live.task, meta)

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
        completions = self.generate(prompts)
        self.recorder.apply_all(runnable, [c for (c,) in completions])

    def generate(self, prompts: list[list[int]], n: int = 1, **overrides: Any) -> list[list[Completion]]:
        """One backend call with the engine's sampling settings and the next seed."""
        sampling = replace(self.sampling, n=n, seed=self._next_seed(), **overrides)
        return self.backend.generate(prompts, sampling)

    def _next_seed(self) -> int:
        self._calls += 1
        return (self.seed * 1_000_003 + self._calls) % (2**63)


def _submit(env: Env, reply: str) -> Callable[[], tuple[str, StepResult]]:
    """`env.submit(reply)`; an `EnvFault` raised at once (an env in this process) is raised when its
    turn is waited for, so the other envs of the batch are still heard."""
    try:
        return env.submit(reply)
    except EnvFault as fault:
        error = fault  # `fault` is unbound when the except block ends

        def faulted() -> tuple[str, StepResult]:
            raise error

        return faulted
