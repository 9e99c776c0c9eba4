"""Envs on Ray workers (a local Ray, `ray.init(num_cpus=2)`): evaluation, exploration and GRPO sampling
with workers write exactly what the in-process engine writes; a worker killed mid-run is replaced
and its episodes rebuilt by replay, nothing dropped; a worker that keeps dying fails the run with the
cause; an env's own error comes back as itself."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ScriptedBackend, dancing_explorer, eval_args, free_port, leafe

from leafe.backends.base import Backend
from leafe.envs import EnvError, Task, make
from leafe.method import Job
from leafe.methods.evaluate import evaluate
from leafe.methods.explore import explore
from leafe.scale.workers import EnvPool, RemoteEnv, WorkerError, env_workers
from leafe.settings import EvalSettings, ExploreSettings
from leafe.trees import read_trees

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def pool(local_ray):
    pool = EnvPool(2)
    yield pool
    pool.close()


class KillingBackend(Backend):
    """Wraps a backend; before generate call number `at` (and every later one when `every`) it kills
    worker `slot` of `pool`, so the kill lands mid-episode for every env on it."""

    def __init__(self, inner: Backend, pool: EnvPool, at: int, every: bool = False, slot: int = 0):
        self.inner, self.pool, self.at, self.every, self.slot = inner, pool, at, every, slot
        self.tokenizer, self.max_context, self.stats = inner.tokenizer, inner.max_context, inner.stats
        self.kills = 0

    def generate(self, prompts, sampling):
        calls = self.inner.stats.calls + 1
        if calls == self.at or (self.every and calls > self.at):
            ray.kill(self.pool.actors[self.slot], no_restart=True)
            self.kills += 1
        return self.inner.generate(prompts, sampling)


def episodes(path):
    """The saved episodes without their wall time (the one field allowed to differ)."""
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in path.read_text().splitlines()]


SETTINGS = EvalSettings(tasks=3, samples=4, max_new_tokens=8, task_seed=1000, seed=7)


def test_eval_on_workers_writes_what_the_in_process_engine_writes(tiny_backend, pool, tmp_path):
    local = evaluate(Job("tiny", tmp_path / "local", backend=tiny_backend), SETTINGS, save_episodes=True).data
    remote = evaluate(Job("tiny", tmp_path / "ray", backend=tiny_backend, envs=pool.make), SETTINGS, save_episodes=True).data
    assert remote["tasks"] == local["tasks"] and remote["env_steps"] == local["env_steps"] > 0
    assert episodes(tmp_path / "ray" / "episodes.jsonl") == episodes(tmp_path / "local" / "episodes.jsonl")
    # The steps of a turn went to both workers.
    pids = set(ray.get([a.pid.remote() for a in pool.actors]))
    assert len(pids) == 2


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_dropped(tiny_backend, pool, tmp_path):
    local = evaluate(Job("tiny", tmp_path / "local", backend=tiny_backend), SETTINGS, save_episodes=True).data
    killer = KillingBackend(tiny_backend, pool, at=tiny_backend.stats.calls + 4)  # the 4th turn of the run
    remote = evaluate(Job("tiny", tmp_path / "ray", backend=killer, envs=pool.make), SETTINGS, save_episodes=True).data
    assert killer.kills == 1 and pool.restarts == 1
    assert remote["tasks"] == local["tasks"] and remote["env_steps"] == local["env_steps"]
    assert episodes(tmp_path / "ray" / "episodes.jsonl") == episodes(tmp_path / "local" / "episodes.jsonl")


def test_a_worker_that_keeps_dying_fails_the_run_with_the_cause(tiny_backend, local_ray, tmp_path):
    pool = EnvPool(1, max_restarts=2)
    try:
        killer = KillingBackend(tiny_backend, pool, at=tiny_backend.stats.calls + 1, every=True)
        with pytest.raises(WorkerError, match=r"Ray workers died 2 times; giving up: .*(died|kill)"):
            evaluate(Job("tiny", tmp_path / "ray", backend=killer, envs=pool.make), SETTINGS)
    finally:
        pool.close()


def test_exploration_on_workers_builds_the_same_trees(tiny_tokenizer, pool, tmp_path):
    settings = ExploreSettings(tasks=3, task_seed=40, budget=40, reflect_every=5, branch_samples=2, snapshots=False)
    reply = dancing_explorer("Step: 2\nExperience: stop dancing.")
    local = explore(Job("scripted", tmp_path / "local", backend=ScriptedBackend(tiny_tokenizer, reply)), settings).data
    remote = explore(Job("scripted", tmp_path / "ray", backend=ScriptedBackend(tiny_tokenizer, reply), envs=pool.make), settings).data
    assert local["branches"] > 0 and local["success_rate"] == 1.0
    for key in ("success_rate", "env_steps", "replayed_steps", "branches", "generated_tokens"):
        assert remote[key] == local[key], key

    def nodes(path):
        return [[(n.parent, n.tau, n.outcome, n.episode.token_ids) for n in tree["nodes"]]
                for tree in read_trees(path / "trees.jsonl")]

    assert nodes(tmp_path / "ray") == nodes(tmp_path / "local")


def test_grpo_sampling_on_workers_matches_in_process(tiny_model_dir, pool):
    from leafe.backends.hf import HFBackend
    from leafe.methods.grpo import GRPOTrainer
    from leafe.settings import GRPOSettings

    settings = GRPOSettings(tasks=4, group_size=2, max_new_tokens=8, kl_coef=0.0)
    tasks = make("sokoban").make_tasks(2, 5000)
    runs = []
    for envs in (make, pool.make):
        backend = HFBackend(str(tiny_model_dir), device="cpu")
        trainer = GRPOTrainer(backend.model, backend, settings, None, envs)
        runs.append([(e.task_id, e.token_ids, e.success) for e in trainer.rollout(tasks, step=0)])
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_an_env_error_on_a_worker_comes_back_as_itself(pool):
    env = pool.make("sokoban")
    assert isinstance(env, RemoteEnv)
    with pytest.raises(EnvError, match="Sokoban task .bad. has no .xsb. level") as info:
        env.reset(Task("bad", "sokoban", {"grid": ["#####", "#@$.#", "##"]}))
    assert "ray" not in str(info.value).lower()


def test_in_process_is_the_default_and_workers_are_validated():
    with env_workers(0) as envs:
        assert envs is make
    with pytest.raises(Exception, match="--workers must be >= 0"), env_workers(-1):
        pass


def test_leafe_eval_with_workers_matches_in_process(tiny_model_dir, tmp_path):
    """The CLI path: its own local Ray, started and stopped by the command."""
    assert leafe(*eval_args(tiny_model_dir, tmp_path / "local")).returncode == 0
    run = leafe(*eval_args(tiny_model_dir, tmp_path / "ray", "--workers", 2))
    assert run.returncode == 0, run.stderr[-2000:]
    local, remote = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("local", "ray"))
    assert remote["tasks"] == local["tasks"] and remote["env_steps"] == local["env_steps"]
    bad = leafe(*eval_args(tiny_model_dir, tmp_path / "x", "--workers", 1, "--ray-address", "127.0.0.1:1"))
    assert bad.returncode == 2 and "could not start the Ray cluster at 127.0.0.1:1: nothing answers there" in bad.stderr


def test_leafe_eval_joins_a_ray_cluster_by_address(tiny_model_dir, tmp_path, monkeypatch):
    """A head node started as on a real cluster (`ray start --head`), joined with --ray-address. Ray
    2.60 turns token authentication on by default; on this loopback-only test cluster it is off."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        assert leafe(*eval_args(tiny_model_dir, tmp_path / "local")).returncode == 0
        run = leafe(*eval_args(tiny_model_dir, tmp_path / "ray", "--workers", 2, "--ray-address", f"127.0.0.1:{port}"))
        assert run.returncode == 0, run.stderr[-2000:]
        local, remote = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("local", "ray"))
        assert remote["tasks"] == local["tasks"] and remote["env_steps"] == local["env_steps"]
    finally:
        head.terminate()  # --block: stopping it stops the cluster's processes
        head.wait(timeout=60)
