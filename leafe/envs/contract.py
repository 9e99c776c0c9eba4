"""`check_env`: the Env contract as a test, for whoever writes an env (a plugin's test calls it).

It plays a few episodes the way leafe's stages do (replies in the model's format, parsed by the env,
the parsed actions recorded and replayed) and raises `ContractError` at the first thing that would
break a stage: tasks that are not reproducible from their seed (a resumed run would explore other
tasks), an empty instruction, a malformed or non-JSON step result (trees.jsonl records it), an
unparseable action that raises instead of being an ordinary step, a success that does not end the
episode, a step after the end that is not refused, a replay of a recorded prefix that does not
reproduce its observations (rollback would branch from the wrong state), a snapshot that does not
restore into a fresh env, an expert whose actions do not succeed. It checks what it can observe; an
env that passes can still be wrong about its own task.

Not a benchmark and not the env's own tests: a few episodes, seconds for a cheap env.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from leafe.envs.base import DataStatus, Env, EnvFault, ReplayDivergence, StepResult, Task, observation_hash, replay
from leafe.prompts import format_reply

#: An action no env understands: it must come back as an ordinary step whose observation says so.
NONSENSE = "xyzzy plugh: not an action"


class ContractError(AssertionError):
    """The env breaks the contract of `leafe.envs.base`; the message names the check and the env."""


@dataclass
class ContractReport:
    """What `check_env` exercised, for a test to assert it covered enough (episodes that ended, a
    replay, a restore where the env has snapshots)."""

    env: str
    tasks: int = 0
    episodes: int = 0
    steps: int = 0
    ended: int = 0
    successes: int = 0
    replays: int = 0
    restores: int = 0


@dataclass
class _Played:
    actions: list[str]
    hashes: list[str]  # of the reset observation, then after each action
    snapshots: list[object]  # after reset and after each step that did not end the episode
    done: bool
    success: bool


def check_env(
    env: Env | Callable[[], Env],
    *,
    tasks: int = 3,
    seed: int = 0,
    actions: Sequence[str] = (),
    max_steps: int = 100,
    rng_seed: int = 0,
) -> ContractReport:
    """Check `env` (an instance, or better a function that makes a fresh one, as rollback makes a fresh
    env to restore or replay into) on `tasks` tasks from `seed`. Each task gets an episode of its
    `expert_actions` (which must succeed) where the env has an expert, and one of random actions, drawn
    from `admissible_actions()` where it lists them, else from `actions` (give some when the env has
    neither). An episode stops at `max_steps` steps if the env has not ended it; at least one must end.
    Raises `ContractError` at the first breach; returns what it exercised."""
    make = env if not isinstance(env, Env) else (lambda: env)
    first = make()
    name = first.name or type(first).__name__
    report = ContractReport(name)
    _check_tasks(first, make, name, tasks, seed)
    _check_data_status(first, name)
    rng = random.Random(rng_seed)

    def drawn(e: Env, t: int) -> tuple[str, str]:
        return "checking the contract.", rng.choice(e.admissible_actions() or list(actions) or [NONSENSE])

    for task in first.make_tasks(tasks, seed):
        report.tasks += 1
        _check_nonsense(first, task, name)
        lists_actions = first.admissible_actions() is not None
        expert = first.expert_actions(task)
        if expert is None and not actions and not lists_actions:
            raise ContractError(f"env {name!r}: check_env needs actions=[...] to play: the env has no "
                                "expert_actions and no admissible_actions")
        if expert is not None:
            def follow(e: Env, t: int, expert: list[str] = expert) -> tuple[str, str] | None:
                return (e.expert_thought(expert[t]), expert[t]) if t < len(expert) else None

            played = _play(first, task, follow, max_steps, name, report)
            if not played.success:
                raise ContractError(f"env {name!r}: the expert_actions of task {task.task_id!r} did not succeed "
                                    f"(played {len(played.actions)} of {len(expert)})")
            _check_episode(first, make, task, played, name, report)
        if actions or lists_actions:
            _check_episode(first, make, task, _play(first, task, drawn, max_steps, name, report), name, report)
    if report.ended == 0:
        raise ContractError(f"env {name!r}: no episode ended within {max_steps} steps; an env ends its episodes "
                            "(give it a max_steps)")
    return report


def _check_episode(env: Env, make: Callable[[], Env], task: Task, played: _Played, name: str,
                   report: ContractReport) -> None:
    if played.done:
        _check_refused_after_end(env, task, name)
    _check_rollback(env, make, task, played, name, report)


def _check_tasks(env: Env, make: Callable[[], Env], name: str, n: int, seed: int) -> None:
    tasks = env.make_tasks(n, seed)
    if len(tasks) != n or not all(isinstance(t, Task) for t in tasks):
        raise ContractError(f"env {name!r}: make_tasks({n}, {seed}) must return {n} Tasks (got {tasks!r:.200})")
    if len({t.task_id for t in tasks}) != n:
        raise ContractError(f"env {name!r}: make_tasks({n}, {seed}) gave repeated task ids")
    for task in tasks:
        if task.env != name:
            raise ContractError(f"env {name!r}: task {task.task_id!r} says env {task.env!r}; "
                                "set Task.env to the env's name")
        _require_json(task.spec, f"env {name!r}: the spec of task {task.task_id!r}")
    if env.make_tasks(n, seed) != tasks or make().make_tasks(n, seed) != tasks:
        raise ContractError(f"env {name!r}: make_tasks({n}, {seed}) differs from one call (or env) to the next; "
                            "tasks must be a function of the seed, or a resumed run explores other tasks")
    if n > 1 and env.make_tasks(n - 1, seed + 1) != tasks[1:]:
        raise ContractError(f"env {name!r}: make_tasks({n - 1}, {seed + 1}) is not make_tasks({n}, {seed})[1:]; "
                            "task i comes from seed + i")


def _check_data_status(env: Env, name: str) -> None:
    status = type(env).data_status()
    if not isinstance(status, DataStatus):
        raise ContractError(f"env {name!r}: data_status() must return a DataStatus (got {status!r:.100})")
    if not status.found and (not status.fix or "\n" in status.fix):
        raise ContractError(f"env {name!r}: data_status() finds no data, so its `fix` must be one line saying "
                            "where to get it")


def _check_nonsense(env: Env, task: Task, name: str) -> None:
    _reset(env, task, name)
    try:
        result = env.step(NONSENSE)
    except EnvFault:
        raise
    except Exception as exc:  # noqa: BLE001 (any exception is the breach)
        raise ContractError(f"env {name!r}: step({NONSENSE!r}) raised {type(exc).__name__}: {exc}; an action the "
                            "env cannot parse is an ordinary step whose observation says so") from exc
    _check_result(result, name, NONSENSE)


def _reset(env: Env, task: Task, name: str) -> str:
    observation = env.reset(task)
    if not isinstance(observation, str):
        raise ContractError(f"env {name!r}: reset must return the first observation as a str "
                            f"(got {observation!r:.100})")
    if not isinstance(env.instruction, str) or not env.instruction.strip():
        raise ContractError(f"env {name!r}: reset({task.task_id!r}) left env.instruction empty; it is the task "
                            "the agent is shown")
    return observation


def _play(env: Env, task: Task, choose: Callable[[Env, int], tuple[str, str] | None], max_steps: int, name: str,
          report: ContractReport) -> _Played:
    """One episode through `Env.submit`, as the rollout plays it: a reply in the model's format with the
    (thought, action) `choose` gives for step t (None: no more), the action the env parses from it
    recorded, with the observation hashes (and snapshots) rollback uses."""
    played = _Played([], [observation_hash(_reset(env, task, name))], [], False, False)
    if env.supports_snapshot:
        played.snapshots.append(env.snapshot())
    for t in range(max_steps):
        chosen = choose(env, t)
        if chosen is None:
            break
        action, result = env.submit(format_reply(*chosen))()
        if not isinstance(action, str):
            raise ContractError(f"env {name!r}: parse_action must return the action as a str (got {action!r:.100})")
        _check_result(result, name, action)
        played.actions.append(action)
        played.hashes.append(observation_hash(result.observation))
        report.steps += 1
        if result.done:
            played.done, played.success = True, result.success
            break
        if env.supports_snapshot:
            played.snapshots.append(env.snapshot())
    report.episodes += 1
    report.ended += played.done
    report.successes += played.success
    return played


def _check_result(result: StepResult, name: str, action: str) -> None:
    where = f"env {name!r}: step({action[:60]!r})"
    if not isinstance(result, StepResult):
        raise ContractError(f"{where} must return a StepResult (got {result!r:.100})")
    if not isinstance(result.observation, str):
        raise ContractError(f"{where} returned a {type(result.observation).__name__} observation, not a str")
    if not isinstance(result.done, bool) or not isinstance(result.success, bool):
        raise ContractError(f"{where}: done and success must be bools (got {result.done!r}, {result.success!r})")
    if not isinstance(result.reward, int | float) or not math.isfinite(result.reward):
        raise ContractError(f"{where}: reward must be a finite number (got {result.reward!r})")
    if result.success and not result.done:
        raise ContractError(f"{where}: success without done; a success ends the episode (the rollout records "
                            "success when the episode ends)")
    _require_json(result.info, f"{where}: info")


def _require_json(value: object, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"{what} must be JSON (it is recorded in trees.jsonl): {exc}") from None


def _check_refused_after_end(env: Env, task: Task, name: str) -> None:
    try:
        env.step(NONSENSE)
    except EnvFault:
        raise
    except Exception:  # noqa: BLE001 (refused, as it should be: RuntimeError by convention)
        return
    raise ContractError(f"env {name!r}: step() after task {task.task_id!r} ended was accepted; refuse it "
                        "(raise RuntimeError: call reset() first)")


def _check_rollback(env: Env, make: Callable[[], Env], task: Task, played: _Played, name: str,
                    report: ContractReport) -> None:
    """Roll a fresh env back to the middle of the episode, by replay and by snapshot where the env has
    them, and check that the next recorded action gives the recorded observation from there."""
    if not played.actions:
        return
    tau = len(played.actions) // 2
    fresh = make()
    try:
        replay(fresh, task, played.actions[:tau], played.hashes[: tau + 1])
    except ReplayDivergence as exc:
        raise ContractError(f"{exc} (check_env replayed {tau} of the {len(played.actions)} actions it "
                            "recorded)") from None
    _check_next(fresh, task, played, tau, name, "reset + replay")
    report.replays += 1
    if env.supports_snapshot:
        # Restored after the episode went on past tau: a snapshot that shares the live state fails here.
        fresh = make()
        fresh.restore(played.snapshots[tau])
        _check_next(fresh, task, played, tau, name, "restore(snapshot())")
        report.restores += 1


def _check_next(env: Env, task: Task, played: _Played, tau: int, name: str, how: str) -> None:
    try:
        got = observation_hash(env.step(played.actions[tau]).observation)
    except EnvFault:
        raise
    except Exception as exc:  # noqa: BLE001 (a step the first episode took must be taken again)
        raise ContractError(f"env {name!r}: after {how} to step {tau} of task {task.task_id!r}, action "
                            f"{played.actions[tau][:60]!r} raised {type(exc).__name__}: {exc}") from exc
    if got != played.hashes[tau + 1]:
        raise ContractError(f"env {name!r}: after {how} to step {tau} of task {task.task_id!r}, action "
                            f"{played.actions[tau][:60]!r} observed something else than the first time; rollback "
                            "would branch from the wrong state")
