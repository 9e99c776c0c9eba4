"""The rollout engine's control flow, with a scripted backend."""

from helpers import ScriptedBackend, solver_policy

from leafe.envs import make, observation_hash
from leafe.envs.sokoban import solve
from leafe.rollout import RolloutEngine


def test_a_solver_policy_solves_every_task_in_optimal_steps(tiny_tokenizer):
    env = make("sokoban")
    tasks = env.make_tasks(5, 100)
    backend = ScriptedBackend(tiny_tokenizer, solver_policy(tasks))
    engine = RolloutEngine(backend, max_batch=3)
    lives = [engine.start(make("sokoban"), t, {"sample": 0}) for t in tasks]
    episodes = engine.run(lives)
    assert all(e.success and e.finish == "success" for e in episodes)
    by_task = {e.task_id: e for e in episodes}
    for t in tasks:
        assert len(by_task[t.task_id].steps) == len(solve(t.spec["xsb"]))
    assert engine.counters.env_steps == sum(len(e.steps) for e in episodes)
    assert engine.counters.generated_tokens == sum(e.generated_tokens for e in episodes)
    assert max(backend.batches) <= 3  # never more than max_batch episodes in one call


def test_failing_episodes_run_to_the_step_limit_and_record_everything(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, lambda text, i: "Thought: hmm\nAction: dance")
    engine = RolloutEngine(backend, max_batch=8)
    env = make("sokoban", max_steps=4)
    task = env.make_tasks(1, 0)[0]
    (episode,) = engine.run([engine.start(env, task)])
    assert not episode.success and episode.finish == "done"
    assert len(episode.steps) == 4
    assert all(s.action == "dance" and s.info["invalid"] for s in episode.steps)
    assert episode.observation_hashes[1] == observation_hash(episode.steps[0].observation)
    assert [s.index for s in episode.steps] == [0, 1, 2, 3]
    # The result of action t is shown to the agent labelled with t and the action it took.
    text = tiny_tokenizer.decode(episode.token_ids)
    assert "Step 2: dance\nInvalid action" in text


def test_episodes_that_outgrow_the_context_end_cleanly(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, lambda text, i: "Action: left", max_context=600)
    engine = RolloutEngine(backend, max_new_tokens=64)
    env = make("sokoban", max_steps=50)
    (episode,) = engine.run([engine.start(env, env.make_tasks(1, 3)[0])])
    assert episode.finish == "context"
    assert 0 < len(episode.steps) < 50
    assert len(episode.token_ids) + 64 > 600 - 100


def test_snapshots_are_kept_per_history_when_asked(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, lambda text, i: "Action: up")
    engine = RolloutEngine(backend, keep_snapshots=True)
    env = make("sokoban", max_steps=3)
    live = engine.start(env, env.make_tasks(1, 0)[0])
    engine.run([live])
    assert len(live.snapshots) == len(live.episode.steps)  # h_0 .. h_{T-1}; none after the last step
