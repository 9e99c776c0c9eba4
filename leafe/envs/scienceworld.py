"""ScienceWorld: elementary-science tasks in a text world (boil water, grow a plant, build a circuit).

Wraps the simulator the `scienceworld` package ships as a jar (it needs Java). A task is a task
name, a variation and a simplification string; tasks are drawn from one split (train / dev / test
variations, as ScienceWorld defines them). Success is the simulator's score reaching 100 with its
completed flag; a negative score (the agent ruined the task, e.g. focused on the wrong thing) ends
the episode as a failure.

Rollback replays: the simulator has no save/restore, so `base.replay` reloads the task and re-plays
the prefix, checking every observation's hash. Two things make the stock simulator differ from load
to load, and both are pinned here (checked once on the gold paths of all 30 tasks; a test replays
two of them, one with random pollination, while another episode steps in the same JVM):
- object order (what a room lists, which flower a bee visits) follows Java identity hashes, which
  differ per load; the JVM runs with `-XX:hashCode=2` (one constant identity hash), so the order is
  insertion order, the same on every load;
- bees, wandering animals and plant genetics draw from Scala's one global, unseeded `Random`; it is
  seeded before every step from (task, step index), under a lock, so an episode's randomness depends
  on its own history only, not on other episodes stepping in the same JVM.

One JVM per process serves every env instance: the rollout engine builds one env per episode, and a
JVM each (seconds to start, hundreds of MB) would not scale. Each instance gets its own simulator object in
that JVM, so episodes never share state.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import zlib
from collections.abc import Sequence
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.registry import register

SPLITS = ("train", "dev", "test")
INSTALL_HINT = "pip install 'leafe[scienceworld]'"
JAVA_HINT = "ScienceWorld runs on Java: install a JRE (Debian: apt-get install default-jre-headless)"
PACKAGE_MISSING = f"the scienceworld env needs the scienceworld package: {INSTALL_HINT}"
JAVA_MISSING = f"no `java` on PATH. {JAVA_HINT}"

#: Constant identity hashes: the simulator's set/map orders become insertion order (see above).
JAVA_OPTIONS = ["-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2"]

_LOCK = threading.RLock()  # guards the JVM's start and every seed-then-act pair
_GATEWAY: Any = None
_RANDOM: Any = None  # Scala's global Random in that JVM, looked up once (each lookup is a round trip)
_TASK_NAMES: list[str] = []
_VARIATIONS: dict[tuple[str, str], list[int]] = {}
_GOLD: dict[tuple[str, int, str], list[str]] = {}


def _gateway() -> Any:
    """This process's JVM running the simulator jar the `scienceworld` package ships (started once)."""
    global _GATEWAY, _RANDOM
    with _LOCK:
        if _GATEWAY is None:
            try:
                from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
                from scienceworld.constants import BASEPATH, JAR_PATH
            except ImportError:
                raise EnvError(PACKAGE_MISSING) from None
            if shutil.which("java") is None:
                raise EnvError(JAVA_MISSING)
            port, process = launch_gateway(classpath=JAR_PATH, javaopts=JAVA_OPTIONS, cwd=BASEPATH,
                                           die_on_exit=True, return_proc=True)
            _GATEWAY = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port),
                                   java_process=process)
            _RANDOM = getattr(getattr(_GATEWAY.jvm.scala.util, "Random$"), "MODULE$")
        return _GATEWAY


def _new_simulator() -> Any:
    """A fresh simulator in the shared JVM (the class the `scienceworld` wrapper drives)."""
    return _gateway().jvm.scienceworld.runtime.pythonapi.PythonInterface()


def _seed(*key: Any) -> None:
    """Seed the simulator's global Random from `key`; call under `_LOCK` right before acting."""
    _gateway()
    _RANDOM.setSeed(zlib.crc32("/".join(map(str, key)).encode()))


def task_names() -> list[str]:
    """The simulator's task names (asked once per process: it costs a new simulator object)."""
    if not _TASK_NAMES:
        _TASK_NAMES.extend(str(name) for name in _new_simulator().getTaskNames())
    return list(_TASK_NAMES)


def variations(task_name: str, split: str) -> list[int]:
    """The variation indexes of `task_name` in `split` (asks the simulator once per process)."""
    key = (task_name, split)
    if key not in _VARIATIONS:
        simulator = _new_simulator()
        simulator.load(task_name, 0, "", False)
        getter = {"train": simulator.getVariationsTrain, "dev": simulator.getVariationsDev,
                  "test": simulator.getVariationsTest}[split]
        _VARIATIONS[key] = [int(v) for v in getter()]
    return _VARIATIONS[key]


def gold_path(task_name: str, variation: int, simplification: str) -> list[str]:
    """The simulator's gold action sequence (generating it takes seconds, so it is cached)."""
    key = (task_name, variation, simplification)
    if key not in _GOLD:
        simulator = _new_simulator()
        with _LOCK:
            _seed(task_name, variation, simplification, "load")
            simulator.load(task_name, variation, simplification, True)
        _GOLD[key] = [str(a) for a in simulator.getGoldActionSequence()]
    return _GOLD[key]


@register
class ScienceWorldEnv(Env):
    """ScienceWorld with a step limit; rollback by verified replay (the simulator cannot copy state)."""

    name = "scienceworld"
    supports_snapshot = False

    def __init__(self, tasks: str | Sequence[str] = "all", split: str = "train", simplification: str = "easy",
                 max_steps: int = 50, valid_action_hints: bool = False):
        """`tasks`: task names (a list or comma-separated), or "all" (the 30 tasks). `split`: train, dev or
        test variations. `max_steps`: steps before the episode ends unsolved. `simplification`:
        ScienceWorld's comma-separated simplifications; "easy" (teleporting, open doors, no electrical
        actions where a task allows, self-watering plants) is the usual LLM-agent setting.
        `valid_action_hints`: list the currently valid actions under each observation."""
        if split not in SPLITS:
            raise EnvError(f"ScienceWorld split must be one of {', '.join(SPLITS)} (got {split!r})")
        if max_steps < 1:
            raise EnvError(f"ScienceWorld max_steps must be >= 1 (got {max_steps})")
        self.data_status().require()
        self.tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
        self.split, self.simplification = split, simplification
        self.max_steps, self.valid_action_hints = max_steps, bool(valid_action_hints)
        self._simulator: Any = None
        self._key: tuple[str, int, str] | None = None
        self._steps = 0
        self._done = False

    @classmethod
    def data_status(cls, **_: object) -> DataStatus:
        """The tasks ship in the `scienceworld` package's jar, which runs on Java."""
        spec = importlib.util.find_spec("scienceworld")
        if spec is None or spec.origin is None:
            return DataStatus(False, "the scienceworld package is not installed", PACKAGE_MISSING)
        java = shutil.which("java")
        if java is None:
            return DataStatus(False, "no java on PATH", JAVA_MISSING)
        return DataStatus(True, f"the scienceworld package's jar ({os.path.dirname(spec.origin)}), java at {java}")

    # -- tasks ---------------------------------------------------------------------------------
    def _task_names(self) -> list[str]:
        known = task_names()
        if self.tasks == ["all"]:
            return known
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise EnvError(f"unknown ScienceWorld task {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return self.tasks

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Tasks seed..seed+n-1 of the split, interleaved (every task's first variation, then every
        task's second, ...) so that a small n already covers many kinds of task."""
        names = self._task_names()
        per_task = {name: variations(name, self.split) for name in names}
        order = [(name, per_task[name][j]) for j in range(max(map(len, per_task.values())))
                 for name in names if j < len(per_task[name])]
        if seed < 0 or seed + n > len(order):
            raise EnvError(f"ScienceWorld {self.split} split of {len(names)} task(s) has {len(order)} variations; "
                           f"asked for {n} from index {seed}")
        return [Task(task_id=f"scienceworld-{name}-{variation}", env=self.name,
                     spec={"task_name": name, "variation": variation, "simplification": self.simplification})
                for name, variation in order[seed:seed + n]]

    def expert_actions(self, task: Task) -> list[str] | None:
        spec = _spec(task)
        return gold_path(spec["task_name"], spec["variation"], spec["simplification"])

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        spec = _spec(task)
        if self._simulator is None:
            self._simulator = _new_simulator()
        self._key = (spec["task_name"], spec["variation"], spec["simplification"])
        # A fresh load is as fast as the simulator's own reset and never carries state over.
        with _LOCK:
            _seed(*self._key, "load")
            self._simulator.load(*self._key, False)
            observation = str(self._simulator.step("look around"))
        self._steps, self._done = 0, False
        description = str(self._simulator.freeActionTaskDesc()).replace("Task Description:", "").strip()
        templates = ", ".join(str(a) for a in self._simulator.getPossibleActions())
        self.instruction = (f"{description}\nCommands (OBJ is an object you can see): {templates}.\n"
                            "When the simulator asks which object you meant, answer with its number.")
        return self._with_hints(observation)

    def step(self, action: str) -> StepResult:
        self.check_running(started=self._simulator is not None, ended=self._done, what="task")
        self._steps += 1
        # The simulator itself, not the wrapper's step(): that one lists every valid action on each
        # call (about a thousand strings over the gateway), many times the cost of the step itself.
        with _LOCK:
            _seed(*self._key, self._steps)
            observation = str(self._simulator.step(action.strip()))
        score = float(self._simulator.getScore())
        success = bool(self._simulator.getCompleted()) and score >= 1.0
        failed = score < 0
        self._done = success or failed or self._steps >= self.max_steps
        if success:
            observation += "\nTask completed!"
        elif failed:
            observation += "\nThe task can no longer be completed: it has failed."
        elif self._done:
            observation += f"\nNo steps left ({self.max_steps} used): the task was not completed."
        info = {"score": round(100 * score)}
        return StepResult(self._with_hints(observation), 1.0 if success else 0.0, self._done, success, info)

    def _with_hints(self, observation: str) -> str:
        if not self.valid_action_hints or self._done:
            return observation
        return f"{observation}\nValid actions: {', '.join(self.admissible_actions())}"

    def admissible_actions(self) -> list[str] | None:
        """The simulator's valid action-object combinations in the current state, sorted."""
        self.check_running(started=self._simulator is not None, what="task")
        return sorted(str(a) for a in self._simulator.getValidActionObjectCombinations())


def _spec(task: Task) -> dict[str, Any]:
    missing = {"task_name", "variation", "simplification"} - set(task.spec)
    if missing:
        raise EnvError(f"ScienceWorld task {task.task_id!r} lacks {', '.join(sorted(missing))} in its spec")
    return task.spec
