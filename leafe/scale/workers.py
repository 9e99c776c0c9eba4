"""Envs on Ray workers: `--workers N` / `--ray-address ADDR`.

The rollout engine keeps generation where the backend is (one batched call per turn) and sends env
work to a pool of Ray actors, each hosting many env instances. `EnvPool.make` has `envs.make`'s
signature and returns a `RemoteEnv`, a stand-in that forwards every call to its worker, so the
evaluation, exploration, GRPO and baseline code paths do not change. Within one turn the engine
submits every episode's action before it waits for any (`Env.submit`), so the steps of a batch run
concurrently on the workers: what pays off for envs whose steps are expensive (the code judge, the
JVM of ScienceWorld, PDDL planning) and lets a run spread its envs over many machines.

Same seeds, same results: sampling is untouched (the same backend calls in the same order), and each
env is a deterministic function of its task and actions wherever it runs, so a run with workers
writes what the in-process engine writes. Rollback on a worker replays the action prefix (verified
against recorded observation hashes, as `envs.replay` does); worker-side snapshots would ship env
state across processes.

A worker that dies (its process killed, its machine lost) is replaced by a new actor, and every env it
hosted is rebuilt there on first use by replaying its episode so far, then the failed call is retried:
nothing is dropped, and a worker that keeps dying fails the run with the cause.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from leafe.envs import Env, EnvMaker, StepResult, Task, make, observation_hash, replay
from leafe.errors import LeafeError

log = logging.getLogger(__name__)

class WorkerError(LeafeError, RuntimeError):
    """The Ray workers could not be started or kept alive; the message names the cause."""


class EnvHost:
    """The body of one Ray actor: env instances by key, driven by the RemoteEnvs of the driver."""

    def __init__(self) -> None:
        self.envs: dict[int, Env] = {}

    def pid(self) -> int:
        return os.getpid()

    def open(self, key: int, name: str, params: dict[str, Any]) -> None:
        self.envs[key] = make(name, **params)

    def close(self, key: int) -> None:
        self.envs.pop(key, None)

    def reset(self, key: int, task: Task) -> tuple[str, str]:
        env = self.envs[key]
        observation = env.reset(task)
        return observation, env.instruction

    def act(self, key: int, reply: str) -> tuple[str, StepResult]:
        env = self.envs[key]
        action = env.parse_action(reply)
        return action, env.step(action)

    def step(self, key: int, action: str) -> StepResult:
        return self.envs[key].step(action)

    def goto(self, key: int, task: Task, actions: list[str], hashes: list[str]) -> str:
        """Put the env in the state after `actions` (verified replay); returns its instruction."""
        env = self.envs[key]
        replay(env, task, actions, hashes)
        return env.instruction

    def call(self, key: int, method: str, *args: Any) -> Any:
        return getattr(self.envs[key], method)(*args)


class EnvPool:
    """N Ray actors hosting envs; `make(name, **params)` places a new env on the next worker."""

    def __init__(self, workers: int, *, address: str | None = None, max_restarts: int = 3):
        try:
            import ray
        except ImportError:
            raise WorkerError("--workers needs Ray: pip install 'leafe[ray]'") from None
        self.ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if address:
                _check_reachable(address)
            try:
                if address:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
                else:  # a local Ray sized for the workers (each asks for one CPU)
                    ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                             log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, ValueError here)
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise WorkerError(f"could not start {where}: {exc}") from None
        if workers < 1:  # --ray-address without --workers: one worker per CPU of the cluster
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.size = workers
        self.max_restarts = max_restarts
        self._actor_class = ray.remote(num_cpus=1)(EnvHost)
        self.actors = [self._spawn() for _ in range(workers)]
        self.generations = [0] * workers
        self.restarts = 0
        self._keys = itertools.count()
        self._lock = threading.Lock()
        ray.get([a.pid.remote() for a in self.actors])  # fail here, not mid-run, if workers cannot start

    def _spawn(self):
        # SPREAD places the workers over the cluster's machines rather than packing one.
        return self._actor_class.options(scheduling_strategy="SPREAD").remote()

    def make(self, name: str, **params: Any) -> RemoteEnv:
        key = next(self._keys)
        return RemoteEnv(self, key % self.size, key, name, params)

    def revive(self, slot: int, generation: int, cause: BaseException) -> None:
        """Replace worker `slot` if it is still the one that failed at `generation`."""
        with self._lock:
            if self.generations[slot] != generation:
                return  # another env already replaced it
            if self.restarts >= self.max_restarts * self.size:
                raise WorkerError(f"Ray workers died {self.restarts} times; giving up: {cause}")
            with suppress(Exception):  # already gone
                self.ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._spawn()
            self.generations[slot] += 1
            self.restarts += 1
            log.warning("env worker %d died (%s); restarted it, its envs are replayed", slot, cause)

    def close(self) -> None:
        for actor in self.actors:
            with suppress(Exception):
                self.ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at a HOST:PORT address: Ray itself waits minutes for it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise WorkerError(f"could not start the Ray cluster at {address}: nothing answers there ({exc}); "
                          f"start one with `ray start --head` or fix --ray-address") from None


class RemoteEnv(Env):
    """An env that lives on a worker. It keeps its episode so far (task, actions, observation
    hashes) to rebuild itself on a new worker if its own dies. Rollback replays (no snapshots)."""

    supports_snapshot = False

    def __init__(self, pool: EnvPool, slot: int, key: int, name: str, params: dict[str, Any]):
        self.pool, self.slot, self.key = pool, slot, key
        self.name, self.params = name, dict(params)
        self.instruction = ""
        self._generation: int | None = None  # the worker generation this env is open on
        self._task: Task | None = None
        self._actions: list[str] = []
        self._hashes: list[str] = []

    # -- talking to the worker -----------------------------------------------------------------
    def _actor(self):
        """The worker, with this env open on it (rebuilt by replay after a restart)."""
        generation = self.pool.generations[self.slot]
        actor = self.pool.actors[self.slot]
        if self._generation != generation:
            self.pool.ray.get(actor.open.remote(self.key, self.name, self.params))
            if self._task is not None:
                self.pool.ray.get(actor.goto.remote(self.key, self._task, self._actions, self._hashes))
            self._generation = generation
        return actor

    def _wait(self, send: Callable[[Any], Any]) -> Callable[[], Any]:
        """Send a call now; the returned function waits for its answer, reviving a dead worker and
        resending the call as often as the pool allows. An exception raised by the env itself comes
        back as that exception."""
        ray = self.pool.ray
        state = {"ref": None, "generation": None}

        def dispatch() -> None:
            try:  # rebuilding the env on a new worker may itself fail: reported by wait()
                actor = self._actor()
                state["ref"], state["generation"] = send(actor), self._generation
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                state["ref"], state["error"] = None, exc

        def wait() -> Any:
            while True:
                try:
                    if state["ref"] is None:
                        raise state.pop("error")
                    return ray.get(state["ref"])
                except ray.exceptions.RayActorError as exc:
                    self.pool.revive(self.slot, self.pool.generations[self.slot] if state["generation"] is None
                                     else state["generation"], exc)
                    dispatch()
                except ray.exceptions.RayTaskError as exc:  # the env raised: re-raise its own error
                    raise exc.cause from None

        dispatch()
        return wait

    def _call(self, send: Callable[[Any], Any]) -> Any:
        return self._wait(send)()

    # -- the Env contract ----------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        observation, self.instruction = self._call(lambda a: a.reset.remote(self.key, task))
        self._task, self._actions, self._hashes = task, [], [observation_hash(observation)]
        return observation

    def step(self, action: str) -> StepResult:
        result = self._call(lambda a: a.step.remote(self.key, action))
        self._record(action, result)
        return result

    def submit(self, reply: str) -> Callable[[], tuple[str, StepResult]]:
        wait = self._wait(lambda a: a.act.remote(self.key, reply))

        def result() -> tuple[str, StepResult]:
            action, step = wait()
            self._record(action, step)
            return action, step

        return result

    def _record(self, action: str, result: StepResult) -> None:
        self._actions.append(action)
        self._hashes.append(observation_hash(result.observation))

    def parse_action(self, reply: str) -> str:
        return self._call(lambda a: a.call.remote(self.key, "parse_action", reply))

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        return self._call(lambda a: a.call.remote(self.key, "make_tasks", n, seed))

    def expert_actions(self, task: Task) -> list[str] | None:
        return self._call(lambda a: a.call.remote(self.key, "expert_actions", task))

    def expert_thought(self, action: str) -> str:
        return self._call(lambda a: a.call.remote(self.key, "expert_thought", action))

    def admissible_actions(self) -> list[str] | None:
        return self._call(lambda a: a.call.remote(self.key, "admissible_actions"))

    def __del__(self) -> None:
        # Free the worker's instance; best effort (the pool or Ray may already be gone).
        with suppress(Exception):
            if self._generation == self.pool.generations[self.slot]:
                self.pool.actors[self.slot].close.remote(self.key)


@contextmanager
def env_workers(workers: int = 0, address: str | None = None) -> Iterator[EnvMaker]:
    """`envs.make` when `workers` is 0 and no address is given (in process), else a pool's `make`."""
    if workers < 0:
        raise LeafeError(f"--workers must be >= 0 (got {workers})")
    if not workers and not address:
        yield make
        return
    pool = EnvPool(workers, address=address)
    try:
        yield pool.make
    finally:
        pool.close()
