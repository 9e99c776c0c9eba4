"""Stages side by side (`parallel_stages: N`): up to N stages whose inputs are ready run at once, each
in a process of its own with an equal share of the CPU cores.

Why: on a small CPU machine one stage leaves a core idle whenever its Python steps the envs, packs
caches and samples, while the model's kernels use both. So two evaluations of the embedded agent side
by side, one thread each, end sooner than the two one after the other (BENCHMARKS.md, "Stages side by
side").

How:
- A stage process rebuilds the stage graph from the config and runs that one stage with a runner of
  its own (`StageRunner.run_stage`), so a stage does exactly what it does in a sequential run and
  records the same stage.json. Its
  progress comes back over a queue; its stdout and stderr go to `stage.log` in its directory.
- A stage starts once every stage in its `after` has finished. Among the ready ones, the stage with
  the longest chain of stages waiting on it goes first: GRPO before the base evaluation, since LEAFE's
  stages wait for GRPO.
- The cores are shared equally by the stages running, and shared again whenever one starts or ends
  (a stage left alone takes every core back). Favouring the longest chain instead (its stages every
  core, the others one thread at `nice 10`) made GRPO slower beside the evaluations, not faster, and
  the evaluations slower too (BENCHMARKS.md, "The demo study").
- When a stage fails, no new stage starts; those running are left to finish (nothing they compute is
  lost), then the failure is raised, naming the stage and its log.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import traceback
from collections.abc import Callable
from typing import Any

from leafe.errors import LeafeError
from leafe.lock import die_with_parent
from leafe.method import Progress
from leafe.study.stages import Stage, StageGraph

#: Seconds between checks that every stage process is still alive while no message comes.
_POLL_S = 1.0


def cpu_cores() -> int:
    """The threads the stages may use in all: the cores this process may run on (a container's share,
    not the host's count), and no more than OMP_NUM_THREADS when it is set, as torch would."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores, int(cap)) if cap.isdigit() and int(cap) > 0 else cores


class _QueueProgress:
    """A stage process's progress sink: every call goes to the parent as a message. It is also where
    the process takes up the thread count the parent last gave it (`threads`, shared memory): a stage
    reports often, and a count changed between two reports is soon in force."""

    def __init__(self, messages: Any, key: str, threads: Any):
        self.messages, self.key, self.threads = messages, key, threads
        self.using = threads.value

    def _rethread(self) -> None:
        if self.threads.value != self.using:
            import torch

            self.using = self.threads.value
            torch.set_num_threads(self.using)

    def start(self, total: int | None, done: int = 0) -> None:
        self._rethread()
        self.messages.put((self.key, "start", (total, done)))

    def advance(self, n: int = 1, status: str = "") -> None:
        self._rethread()
        self.messages.put((self.key, "advance", (n, status)))


def _stage_process(config: Any, out: str, key: str, threads: Any, messages: Any, parent: int) -> None:
    """One stage in a process of its own (the target of a spawned process)."""
    die_with_parent(parent)  # a stage left running by a killed study would write beside its rerun
    # Before torch is imported: its thread pool starts at this size.
    os.environ["OMP_NUM_THREADS"] = str(threads.value)
    from leafe.study.runner import StageRunner

    graph = StageGraph(config, out)
    runner = StageRunner(graph)
    stage = next(s for s in graph.stages() if s.key == key)
    # A stale directory is emptied before the log opens in it, not after (run_stage then finds it "todo").
    directory = runner.ready_dir(stage, graph.status(stage))
    log = open(directory / "stage.log", "a", buffering=1)  # noqa: SIM115 (it is the process's stdout until exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    code = 0
    try:
        runner.run_stage(stage, graph.status(stage), _QueueProgress(messages, key, threads))
        runner.release()
        messages.put((key, "done", None))
    except BaseException as exc:  # noqa: BLE001 (whatever it is, the parent must hear of it)
        traceback.print_exc()
        line = str(exc) if isinstance(exc, LeafeError) else f"{type(exc).__name__}: {exc}"
        messages.put((key, "error", (line, isinstance(exc, LeafeError))))
        code = 1
    messages.close()
    messages.join_thread()  # the message is in the pipe before the process goes
    # A normal exit (not leafe.scale.stage's os._exit: no process group lives here), so what the
    # stage's libraries made (semaphores, temporary files) is cleaned up behind it.
    sys.exit(code)


def _chain_lengths(stages: list[Stage]) -> dict[str, int]:
    """For each stage, the number of stages on the longest chain that waits on it (itself included)."""
    waiting: dict[str, list[str]] = {s.key: [] for s in stages}
    for s in stages:
        for before in s.after:
            waiting[before].append(s.key)
    memo: dict[str, int] = {}

    def length(key: str) -> int:
        if key not in memo:
            memo[key] = 1 + max((length(k) for k in waiting[key]), default=0)
        return memo[key]

    return {s.key: length(s.key) for s in stages}


def refuse_gpu() -> None:
    """Stages side by side are for a CPU machine: on one with a GPU, every stage process would load
    its own copy of the model onto it (the trainers take the GPU whenever it is there, whatever
    generation.device says), e.g. two 7B copies beside a GRPO trainer, which the planner does not count.

    Checked when the stages are about to run, not in the config's own check: that one also runs for
    `leafe run --dry-run`, which must not load torch.
    """
    import torch

    if torch.cuda.is_available():
        raise LeafeError("parallel_stages > 1 shares CPU cores between stages, and this machine has a GPU, "
                         "which every stage would load its own model onto; set parallel_stages: 1 "
                         "(or hide the GPUs with CUDA_VISIBLE_DEVICES=)")


def run_side_by_side(graph: StageGraph, stages: list[Stage], workers: int,
                     progress_for: Callable[[int, int, Stage, str], Progress],
                     on_finish: Callable[[Stage], None] | None = None) -> None:
    """Run the stages of `graph` not already done, up to `workers` at a time (see the module's text)."""
    index = {s.key: i for i, s in enumerate(stages)}
    states = {s.key: graph.status(s) for s in stages}
    finished = {k for k, state in states.items() if state == "done"}
    for s in stages:
        if s.key in finished:
            progress_for(index[s.key], len(stages), s, "done")
    pending = [s for s in stages if s.key not in finished]
    chain = _chain_lengths(stages)
    cores = cpu_cores()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    messages = context.Queue()
    running: dict[str, tuple[Any, Progress]] = {}
    shares: dict[str, Any] = {}  # stage key -> its thread count, in memory its process reads
    silent: set[str] = set()  # stage processes found dead at the last wait for a message
    failure: tuple[str, str, bool] | None = None
    try:
        while running or (pending and failure is None):
            ready = sorted((s for s in pending if all(k in finished for k in s.after)),
                           key=lambda s: (-chain[s.key], index[s.key]))
            starting = []
            while failure is None and ready and len(running) + len(starting) < workers:
                stage = ready.pop(0)
                pending.remove(stage)
                starting.append(stage)
            if starting or len(running) != len(shares):
                share = max(1, cores // (len(running) + len(starting)))
                shares = {key: threads for key, threads in shares.items() if key in running}
                for threads in shares.values():
                    threads.value = share
            for stage in starting:
                shares[stage.key] = context.Value("i", share, lock=False)
                progress = progress_for(index[stage.key], len(stages), stage, states[stage.key])
                process = context.Process(target=_stage_process, name=f"leafe-stage-{stage.key}",
                                          args=(graph.config, str(graph.out), stage.key, shares[stage.key], messages,
                                                os.getpid()))
                process.start()
                running[stage.key] = (process, progress)
            if not running:
                break  # a failure stopped new stages and the last running one has ended
            try:
                key, kind, data = messages.get(timeout=_POLL_S)
            except queue.Empty:
                for key, (process, _) in list(running.items()):
                    if process.is_alive():
                        continue
                    if key in silent:  # dead at two waits in a row with nothing in the queue from it
                        running.pop(key)
                        failure = failure or (key, f"its process ended with exit code {process.exitcode} "
                                                   f"without a word (killed? out of memory?)", False)
                    silent.add(key)  # its last message may have come after this wait began
                continue
            if key not in running:
                continue
            process, progress = running[key]
            if kind == "start":
                progress.start(*data)
            elif kind == "advance":
                progress.advance(*data)
            else:
                process.join()
                running.pop(key)
                if kind == "done":
                    finished.add(key)
                    if on_finish:
                        on_finish(stages[index[key]])
                else:
                    failure = failure or (key, *data)
    finally:
        for process, _ in running.values():  # Ctrl-C or an error here: stages resume on the next run
            process.terminate()
            process.join()
        messages.close()
        messages.join_thread()
    if failure is not None:
        key, line, is_ours = failure
        log = graph.stage_dir(key) / "stage.log"
        if is_ours:
            raise LeafeError(line)
        raise LeafeError(f"stage {key} failed: {line} (the traceback is in {log})")
