"""LEAFE stage 1: explore tasks at a fixed env-step budget, with reflection and rollback.

Three strategies, compared at the same budget: env steps actually taken by the agent per task
(steps replayed to roll an env back are counted apart and never charged).
- `independent`: fresh episodes until the budget is spent.
- `refine`: after each failed episode the model reflects; the next episode starts over with every
  experience so far in its context (linear retries, Reflexion-like).
- `leafe`: every K steps an episode takes and when it fails, the model reflects on its history. A
  reply that names an earlier step tau and an experience e rolls the env back to tau and samples
  branches from h_tau with e appended (the running episode, if any, is abandoned: it is known to be
  off track). A branch counts its K steps from tau, as a root counts from its start: it reflects on
  what it did with e, never on the prefix it inherited. Branch requests are served breadth-first,
  within max depth, max branches per task and the budget; when none is waiting, a fresh root
  episode spends what is left.

A task's search ends when its budget is spent. The paper's stage 1 keeps exploring after a success
(`stop_on_success` off, the default), so the tree yields the branching events of the whole budget for
D_cf; `stop_on_success` ends it at the first success, which measures the same success rate at less
cost: the setting for comparing the strategies at a fixed budget (benchmarks/explore_strategies.py).

`reflector: oracle` is a diagnostic, not the method: the env's solver answers every reflection
(Sokoban: the first irreversible mistake and the move to make there), so a run measures what stage 1
and 2 give when reflections are right, apart from how well the policy reflects.

Many tasks explore at once: each round gives one turn to every live episode of every task in one
batched generate call, then runs every reflection due in one more. A task's tree is appended to
`trees.jsonl` (fsynced) when the task finishes, so a rerun skips finished tasks, and a kill loses
only unfinished ones, which the rerun explores again from scratch.

A step whose env failed in its own machinery (`EnvFault`: the code judge's sandbox) has no outcome,
and a tree built around it would score a failure of the machine as the agent's: the task's search is
dropped and explored again from scratch, and its tree record counts the dropped ones
(`faulted_episodes`, summed in summary.json).

A rollback by replay that does not reproduce the parent's observations (an env that is not
deterministic under reset + replay, such as a remote server that ignores the seed) would start a
branch from a state its parent never was in, so that branch is refused: no node, no episode, no
budget spent. The task's other branches and roots go on; its tree record counts the refusals
(`replay_divergences`, summed in summary.json), and `leafe explore` ends with a warning when any came.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from leafe.backends.base import Backend
from leafe.envs import EnvMaker, make
from leafe.envs.base import EnvFault, ReplayDivergence, Task
from leafe.errors import LeafeError
from leafe.files import append_jsonl, expect, read_jsonl, write_json
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult, Tally, cost
from leafe.passk import bootstrap_ci
from leafe.prompts import experience_message, parse_reflection
from leafe.rollout import Live, RolloutEngine
from leafe.rundir import claim
from leafe.settings import ExploreSettings
from leafe.trees import Node


@dataclass
class _Request:
    parent: Node
    live: Live  # the parent's live episode: its history, snapshots and actions to roll back to
    tau: int
    experience: str
    reflection: str


class _Search:
    """The exploration state of one task."""

    def __init__(self, task: Task, settings: ExploreSettings):
        self.task, self.settings = task, settings
        self.nodes: list[Node] = []
        self.queue: deque[_Request] = deque()
        self.live: dict[int, Live] = {}  # node id -> its running episode, in BFS (id) order
        self.budget_left = settings.budget
        self.success = False
        self.stalled = False  # an episode could not take a single turn (prompt beyond the context)
        self.fault: str | None = None  # the env failed a step: this search is dropped (`abandon`)
        self.experiences: list[str] = []  # refine: everything learnt so far
        self.replay_divergences = 0  # branches refused: their replay did not reach the parent's state
        self.started = time.perf_counter()

    @property
    def stopping(self) -> bool:
        """No more turns for this search: its budget is spent, or a success ends it (`stop_on_success`)."""
        return self.budget_left <= 0 or (self.success and self.settings.stop_on_success)

    @property
    def stop_outcome(self) -> str:
        """The outcome of an episode cut short because the search is `stopping`."""
        return "stopped" if self.success and self.settings.stop_on_success else "budget"

    @property
    def done(self) -> bool:
        return not self.live and (self.stopping or self.stalled or self.fault is not None)

    def abandon(self, fault: str) -> None:
        """Drop this search: a step of it has no outcome (EnvFault), so `explore` runs the task again."""
        self.fault = fault
        self.live.clear()
        self.queue.clear()

    def branches(self) -> int:
        return sum(1 for n in self.nodes if n.parent is not None)

    def can_branch(self, node: Node) -> bool:
        s = self.settings
        return (s.strategy == "leafe" and not self.stopping
                and node.depth < s.max_depth and self.branches() + s.branch_samples * len(self.queue) < s.max_branches)

    def record(self) -> dict[str, Any]:
        branches = [n for n in self.nodes if n.parent is not None]
        reflections = [r for n in self.nodes for r in n.reflections]
        return {
            "task_id": self.task.task_id,
            "strategy": self.settings.strategy,
            "success": self.success,
            "budget": self.settings.budget,
            "env_steps": sum(n.env_steps for n in self.nodes),
            "replayed_steps": sum(n.replayed_steps for n in self.nodes),
            "generated_tokens": sum(n.generated_tokens for n in self.nodes),
            "reflections": len(reflections),
            "reflections_parsed": sum(r["parsed"] for r in reflections),
            "branches": len(branches),
            "branches_succeeded": sum(n.outcome == "success" for n in branches),
            "replay_divergences": self.replay_divergences,
            "wall_s": round(time.perf_counter() - self.started, 3),
            "nodes": [n.to_dict() for n in self.nodes],
        }


class Explorer:
    """Runs the strategy of `settings` over many tasks at once through one RolloutEngine."""

    def __init__(self, backend: Backend, settings: ExploreSettings, envs: EnvMaker = make):
        settings.validate()
        self.settings = settings
        self.envs = envs  # envs.make, or a worker pool's (workers.env_workers)
        self.engine = RolloutEngine(
            backend,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            max_batch=1 << 30,  # `explore` bounds the batch through parallel_tasks
            seed=settings.seed,
            keep_snapshots=settings.snapshots,
            date_string=settings.date_string,
        )
        self.recorder = self.engine.recorder
        # The oracle grades a task from its spec and the actions alone, so one local env serves all.
        self.oracle = make(settings.env, **settings.env_params) if settings.reflector == "oracle" else None

    def _env(self):
        return self.envs(self.settings.env, **self.settings.env_params)

    # -- spawning ------------------------------------------------------------------------------
    def _spawn(self, search: _Search) -> None:
        """Give an idle search its next episodes: queued branches first (a request whose every branch
        was refused gives way to the next), else a fresh root."""
        while search.queue:
            request = search.queue.popleft()
            samples = min(self.settings.branch_samples, self.settings.max_branches - search.branches())
            for _ in range(max(samples, 0)):
                before = self.recorder.counters.replayed_steps
                try:
                    live = self.recorder.branch(request.live, request.tau, request.experience, self._env())
                except ReplayDivergence:  # refused (and counted by the recorder): never from a wrong state
                    search.replay_divergences += 1
                    continue
                node = Node(
                    id=len(search.nodes), parent=request.parent.id, depth=request.parent.depth + 1,
                    tau=request.tau, prefix_len=request.live.episode.steps[request.tau].context_len,
                    experience=request.experience, reflection=request.reflection,
                    replayed_steps=self.recorder.counters.replayed_steps - before,
                )
                self._open(search, node, live)
            if search.live:
                return
        node = Node(id=len(search.nodes))
        live = self.recorder.start(self._env(), search.task)
        if self.settings.strategy == "refine":
            node.context_experiences = list(search.experiences)
            for text in search.experiences:
                live.conv.add_message("user", experience_message(text))
        self._open(search, node, live)

    @staticmethod
    def _open(search: _Search, node: Node, live: Live) -> None:
        live.episode.meta.update({"node": node.id})
        search.nodes.append(node)
        search.live[node.id] = live

    def _close(self, search: _Search, node_id: int, outcome: str) -> None:
        live = search.live.pop(node_id)
        node = search.nodes[node_id]
        node.episode = self.recorder.finish(live)
        node.outcome = outcome
        node.wall_s = round(node.episode.wall_s, 3)

    # -- one round -----------------------------------------------------------------------------
    def round(self, searches: list[_Search]) -> None:
        """One turn for every live episode of every search, then every reflection that is due."""
        for search in searches:
            if not search.live and not search.done:
                try:
                    self._spawn(search)
                except EnvFault as fault:  # a rollback replayed a step that the env failed
                    search.abandon(str(fault))
        stepping: list[tuple[_Search, int, Live]] = []
        for search in searches:
            for i, node_id in enumerate(sorted(search.live)):
                if i >= search.budget_left:  # no budget left for this episode's turn
                    self._close(search, node_id, "budget")
                else:
                    stepping.append((search, node_id, search.live[node_id]))
        before = {id(live): len(live.episode.steps) for _, _, live in stepping}
        self.engine.step([live for _, _, live in stepping])

        due: list[tuple[_Search, int, Live, str]] = []
        for search, node_id, live in stepping:
            if search.fault is not None:
                continue
            if live.episode.finish == "fault":
                search.abandon(live.episode.meta["fault"])
                continue
            node = search.nodes[node_id]
            taken = len(live.episode.steps) - before[id(live)]
            search.budget_left -= taken
            node.env_steps += taken
            if taken:
                node.generated_tokens += live.episode.steps[-1].action_end - live.episode.steps[-1].action_start
            if live.done:
                if live.episode.success:
                    search.success = True
                    self._close(search, node_id, "success")
                elif live.episode.finish == "context":
                    search.stalled = search.stalled or (node.parent is None and node.env_steps == 0)
                    self._close(search, node_id, "context")
                elif not search.stopping and (self.settings.strategy == "refine" or search.can_branch(node)):
                    due.append((search, node_id, live, "failure"))
                else:
                    self._close(search, node_id, "failed")
            # K counts the steps this node took: a branch's first reflection comes K steps after tau.
            elif taken and search.can_branch(node) and node.env_steps % self.settings.reflect_every == 0:
                due.append((search, node_id, live, "interval"))
        due = [entry for entry in due if entry[0].fault is None]
        reflecting = {(id(search), node_id) for search, node_id, _, _ in due}
        for search in searches:
            if search.stopping:
                for node_id in list(search.live):
                    if (id(search), node_id) not in reflecting:
                        self._close(search, node_id, search.stop_outcome)
        if due:
            self._reflect(due)

    def _reflect(self, due: list[tuple[_Search, int, Live, str]]) -> None:
        if self.oracle is not None:
            replies = [(self.oracle.oracle_reflection(live.task, live.episode.actions), 0) for _, _, live, _ in due]
        else:
            prompts = [self.recorder.reflection_prompt(live).prompt_ids() for _, _, live, _ in due]
            generated = self.engine.generate(prompts, max_new_tokens=self.settings.reflection_tokens)
            replies = [(reply.text, len(reply.token_ids)) for (reply,) in generated]
        for (search, node_id, live, why), (text, tokens) in zip(due, replies):
            node = search.nodes[node_id]
            node.generated_tokens += tokens
            t = len(live.episode.steps)
            parsed = parse_reflection(text)
            entry = {"after_step": t, "why": why, "text": text, "parsed": parsed is not None,
                     "step": parsed.step if parsed else None, "experience": parsed.experience if parsed else None,
                     "valid": False, "branched": False}
            node.reflections.append(entry)
            if self.settings.strategy == "refine":
                if parsed is not None:
                    search.experiences.append(parsed.experience)
                    entry["valid"] = True
                self._close(search, node_id, "failed")
                continue
            # leafe: a step in [0, t) and an experience make a branch, when the limits allow one.
            entry["valid"] = parsed is not None and parsed.step is not None and 0 <= parsed.step < t
            if entry["valid"] and search.can_branch(node):
                search.queue.append(_Request(node, live, parsed.step, parsed.experience, text))
                entry["branched"] = True
                self._close(search, node_id, "rolled_back" if why == "interval" else "failed")
            elif why == "failure":
                self._close(search, node_id, "failed")
            elif search.stopping:
                self._close(search, node_id, search.stop_outcome)


def explore(job: Job, settings: ExploreSettings) -> MethodResult:
    """Explore `settings.tasks` tasks with `job.model` (through `job.backend`) into
    `job.out/trees.jsonl`; the result's data is `summary.json` (success rate, tree counts, tokens)."""
    settings.validate()
    backend, out = job.backend, job.out
    if backend is None:
        raise LeafeError("explore samples: give it a backend (Job.backend)")
    out.mkdir(parents=True, exist_ok=True)
    trees_path = out / "trees.jsonl"
    claim(out / "settings.json", resume_fingerprint(settings, job.model), "an exploration")
    keys = ("task_id", "success", "session", *SUMMED)  # what `summarize` reads of earlier trees
    done = {expect(r, dict, trees_path, keys)["task_id"]: r for r in read_jsonl(trees_path)}
    tasks = make(settings.env, **settings.env_params).make_tasks(settings.tasks, settings.task_seed)
    todo = deque(t for t in tasks if t.task_id not in done)
    job.progress.start(len(tasks), len(tasks) - len(todo))
    tally = Tally(job.progress)

    explorer = Explorer(backend, settings, job.envs)
    session, started = uuid.uuid4().hex[:8], time.perf_counter()
    prompt0, prefill0 = backend.stats.prompt_tokens, backend.stats.prefill_tokens
    active: list[_Search] = []
    faulted: dict[str, int] = {}  # task id -> searches dropped because the env failed a step
    while todo or active:
        while todo and len(active) < settings.parallel_tasks:
            active.append(_Search(todo.popleft(), settings))
        explorer.round(active)
        for search in [s for s in active if s.done]:
            active.remove(search)
            if search.fault is not None:  # the env failed, not the agent: the task is explored again, first
                faulted[search.task.task_id] = faulted.get(search.task.task_id, 0) + 1
                todo.appendleft(search.task)
                continue
            record = search.record()
            record["faulted_episodes"] = faulted.pop(search.task.task_id, 0)
            # Session-cumulative work, so a summary over resumed runs adds up each session once.
            record["session"] = {"id": session, "elapsed_s": round(time.perf_counter() - started, 3),
                                 "prompt_tokens": backend.stats.prompt_tokens - prompt0,
                                 "prefill_tokens": backend.stats.prefill_tokens - prefill0}
            append_jsonl(trees_path, record)
            done[record["task_id"]] = record
            tally(record["success"])
            if job.tracker.active:  # summary.json's counters over the tasks finished so far (the last: its own)
                so_far = list(done.values())
                job.tracker.log({**counters(settings, so_far), "successes": sum(r["success"] for r in so_far)},
                                step=len(so_far))
    summary = summarize(settings, [done[t.task_id] for t in tasks])
    write_json(out / "summary.json", summary)
    return MethodResult("explore", job.model, asdict(settings), summary,
                        cost(summary["env_steps"], summary["generated_tokens"], summary["wall_s"]))


#: The counts of a tree record that summary.json sums over the tasks.
SUMMED = ("env_steps", "replayed_steps", "generated_tokens", "reflections", "reflections_parsed", "branches",
          "branches_succeeded", "faulted_episodes", "replay_divergences")


def summarize(settings: ExploreSettings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json from the tree records of every task (of every session that wrote them)."""
    return {"strategy": settings.strategy, **counters(settings, records),
            "ci95": list(bootstrap_ci([(1, int(r["success"])) for r in records], 1))}


def counters(settings: ExploreSettings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's numbers but its interval: what the tracker reports after each task, without
    resampling every finished task again each time."""
    sessions: dict[str, dict[str, Any]] = {}
    for r in records:
        s = r["session"]
        if s["elapsed_s"] >= sessions.get(s["id"], {"elapsed_s": -1.0})["elapsed_s"]:
            sessions[s["id"]] = s
    return {
        "tasks": len(records),
        "budget": settings.budget,
        "success_rate": sum(int(r["success"]) for r in records) / len(records),
        **{k: sum(r[k] for r in records) for k in SUMMED},
        "prompt_tokens": sum(s["prompt_tokens"] for s in sessions.values()),
        "prefill_tokens": sum(s["prefill_tokens"] for s in sessions.values()),
        "wall_s": round(sum(s["elapsed_s"] for s in sessions.values()), 3),
    }
