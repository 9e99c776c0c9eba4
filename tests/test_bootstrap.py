"""The embedded base agent: a small bootstrap builds a real model directory, deterministically,
and the synthetic data's oracle names the right mistakes."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from leafe.base_agent.bootstrap import build
from leafe.envs import Task, make
from leafe.envs.sokoban.oracle import Expert, first_mistake, oracle_experience, reflection_reply
from leafe.rundir import RUN_FORMAT
from leafe.settings import BootstrapConfig

TINY = BootstrapConfig(fragments=64, reflection_fragments=24, episodes=24, vocab_size=400, hidden_size=32, layers=1, heads=2,
                       intermediate_size=64, batch_size=16, decision_weight=4.0)


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory):
    out = tmp_path_factory.mktemp("agent") / "model"
    return out, build(TINY, out)


def test_bootstrap_writes_a_loadable_model_directory(tiny_agent):
    from leafe.backends.hf import HFBackend
    from leafe.chat import ChatFormat

    out, summary = tiny_agent
    backend = HFBackend(str(out), device="cpu")
    fmt = ChatFormat(backend.tokenizer)
    assert fmt.end_of_turn_id == backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert summary["data"]["episodes"] == 24 - summary["data"]["dropped_over_context"]
    assert 0 < summary["data"]["fragments"] <= 64 + 24
    assert {"fragment", "reflect-fragment"} <= set(summary["data"]["by_kind"])
    assert set(summary["data"]["by_kind"]) <= {"fragment", "reflect-fragment", "demo", "reflect", "experience"}
    assert all(phase["steps"] >= 1 for phase in summary["training"].values())
    assert json.loads((out / "bootstrap.json").read_text())["config_hash"] == TINY.digest()
    assert summary["format"] == RUN_FORMAT  # the run format of the cached agent (also in its digest)
    assert backend.model.config.model_type == "llama"


def test_tokenizer_round_trips_the_env_text(tiny_agent):
    from transformers import AutoTokenizer

    out, _ = tiny_agent
    tok = AutoTokenizer.from_pretrained(out)
    env = make("sokoban")
    texts = [env.reset(t) for t in env.make_tasks(5, 123)] + [env.step("left").observation, "Step: 3\nExperience: x"]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Grid cells and digits are single tokens, so a small model reads a grid cell by cell.
    assert tok.tokenize("#_@$.#") == ["#", "_", "@", "$", ".", "#"]
    assert tok.tokenize("15") == ["1", "5"]


def test_the_pieces_tokenizer_merges_coordinates_numbers_and_roles_and_keeps_the_grid_in_cells():
    from leafe.base_agent.tokenizer import train_tokenizer

    env = make("sokoban")
    texts = [env.reset(t) for t in env.make_tasks(40, 123)] * 5
    texts += ["Thought: push right from (2,1); at (3,1), go up.\nAction: up"] * 50
    pieces, cells = (train_tokenizer(texts, vocab_size=600, style=style) for style in ("pieces", "cells"))
    for tok in (pieces, cells):
        for text in texts[:40]:
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.tokenize("#_@$.#") == ["#", "_", "@", "$", ".", "#"]
    assert pieces.tokenize("you (2,1)") == ["you", "Ġ(2,1)"] and pieces.tokenize(" 15") == ["Ġ15"]
    assert len(cells.tokenize("you (2,1)")) == 7
    prompt = pieces.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert pieces.tokenize(prompt) == ["<|im_start|>", "user", "Ċ", "x", "<|im_end|>", "Ċ", "<|im_start|>",
                                       "assistant", "Ċ"]
    with pytest.raises(ValueError, match="tokenizer style"):
        train_tokenizer(texts, vocab_size=600, style="words")


def test_bootstrap_is_deterministic_for_a_seed(tiny_agent, tmp_path):
    out, _ = tiny_agent
    again = tmp_path / "again"
    build(TINY, again)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_bootstrap_cli_builds_into_out(tmp_path):
    out = tmp_path / "agent"
    run = subprocess.run(
        [sys.executable, "-m", "leafe", "bootstrap", "--out", str(out), "--fragments", "32", "--reflection-fragments", "8", "--episodes", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert (out / "config.json").exists() and (out / "bootstrap.json").exists()
    assert "parameters" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "leafe", "bootstrap", "--out", str(tmp_path / "bad"),
                          "--decision-weight", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--decision-weight must be > 0 (got 0.0)" in bad.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = subprocess.run(
        [sys.executable, "-m", "leafe", "bootstrap", "--out", str(tmp_path / "other"), "--fragments", "32",
         "--reflection-fragments", "8", "--episodes", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode == 2 and "not a leafe model directory" in refused.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_digest_holds_every_knob_but_save_every_the_generator_and_the_run_format(monkeypatch):
    # The default agent is cached under its digest (make demo builds it once): the name changes only
    # when what is built does (a knob, the example generator) or the run format does, and then the
    # agent is built again under the new name. Pinned, so a change to it is never an accident.
    assert BootstrapConfig().digest() == "c758ece03642"
    for knob in ({"decision_weight": 1.0}, {"plans": False}, {"experience_episodes": 1000}, {"tokenizer": "pieces"},
                 {"kv_heads": 1}, {"fragments": 10000}, {"seed": 1}):
        assert replace(BootstrapConfig(), **knob).digest() != BootstrapConfig().digest(), knob
    assert replace(BootstrapConfig(), save_every=7).digest() == BootstrapConfig().digest()  # a resumed build is the same
    from leafe.settings import base_agent

    for name in ("GENERATOR", "RUN_FORMAT"):
        with monkeypatch.context() as patch:
            patch.setattr(base_agent, name, getattr(base_agent, name) + 1)
            assert BootstrapConfig().digest() != "c758ece03642", name


OPEN_ROOM = "######\n#    #\n# $@ #\n#    #\n#.   #\n######"


def expert(xsb: str, max_steps: int = 15) -> Expert:
    return Expert.of(Task("t", "sokoban", {"xsb": xsb}), max_steps)


def test_pushing_the_box_against_the_top_wall_is_the_first_irreversible_mistake():
    # Walking round below the box is harmless; pushing it up into row 1 kills the level
    # (the goal is in row 4 and a box in row 1 can never be pushed down again).
    ex = expert(OPEN_ROOM)
    actions = ["down", "left", "up", "left", "down"]
    assert first_mistake(ex, actions) == 2
    text = oracle_experience(ex, actions, 2)
    assert text.startswith("At step 2, pushing the box up got it stuck for good.")
    assert text.endswith(f"Instead, go {ex.optimal(ex.states(actions)[2])[0]}.")


def test_wasting_moves_is_irreversible_when_the_limit_is_tight():
    corridor = "#######\n#@ $ .#\n#######"
    assert first_mistake(expert(corridor, max_steps=3), ["left", "right", "right"]) == 0
    assert "wasted moves" in oracle_experience(expert(corridor, max_steps=3), ["left", "right"], 0)
    # With moves to spare, the same bump is no mistake at all.
    assert first_mistake(expert(corridor, max_steps=6), ["left", "right", "right", "right"]) is None


def test_optimal_play_has_no_mistake_and_invalid_actions_waste_a_move():
    ex = expert(OPEN_ROOM)
    assert first_mistake(ex, ["left", "up", "left", "down", "down"]) is None
    tight = expert(OPEN_ROOM, max_steps=5)
    assert first_mistake(tight, ["dance", "left", "up", "left", "down"]) == 0


def test_fragments_show_the_env_observation_and_target_an_expert_move():
    import random

    from leafe.base_agent.synthetic import make_fragment

    task = make("sokoban").make_tasks(1, 77)[0]
    rng = random.Random(0)
    fragments = [f for f in (make_fragment(task, 15, rng, 0.25, experience_rate=0.5) for _ in range(40)) if f]
    assert fragments
    ex = expert(task.spec["xsb"])
    for f in fragments:
        assert f.messages[0][0] == "user" and f.messages[0][1].startswith(("Start:\n", "Step "))
        action = f.reply.rsplit("Action: ", 1)[1]
        if len(f.messages) == 2:  # with an experience, the reply does what the experience says
            assert f.messages[1][1].startswith("Experience from an earlier attempt")
            assert f.messages[1][1].rstrip().endswith(f"Instead, go {action}.")
    starts = [f for f in fragments if f.messages[0][1].startswith("Start:")]
    for f in starts:
        assert f.reply.rsplit("Action: ", 1)[1] in ex.optimal(ex.start)


def test_reflection_reply_is_what_the_parser_reads():
    from leafe.prompts import parse_reflection

    assert parse_reflection(reflection_reply(3, "At step 3, do x.")).step == 3
    assert parse_reflection(reflection_reply(None, "Nothing is lost yet.")).step is None


def test_experience_examples_play_the_move_the_experience_names():
    # Where several moves are optimal, the corrected reply must still be the one the experience
    # names, or the model is taught to ignore what it reads.
    import random

    from leafe.base_agent.synthetic import make_script

    rng = random.Random(5)
    scripts = [make_script(t, 15, rng, 0.4, 5) for t in make("sokoban").make_tasks(60, 4242)]
    experience = [s for s in scripts if s.kind == "experience"]
    assert len(experience) >= 5
    for s in experience:
        named = s.experience.rsplit("go ", 1)[1].rstrip(".")
        first = s.continuation[0]
        assert first.endswith(f"Action: {named}")
        assert first.startswith(f"Thought: go {named}")


def test_experience_episodes_are_whole_attempts_with_the_experience_at_the_first_mistake(tiny_agent, tmp_path):
    # `--experience-episodes` adds only experience examples (a level without a failing attempt falls
    # back to a demonstration), each branching at its attempt's first irreversible mistake.
    import random

    from leafe.base_agent.synthetic import make_script

    rng = random.Random(7)
    tasks = make("sokoban").make_tasks(20, 4242)
    scripts = [make_script(t, 15, rng, 0.4, 5, kind="experience") for t in tasks]
    assert {s.kind for s in scripts} <= {"experience", "demo"}
    assert sum(s.kind == "experience" for s in scripts) >= 15
    for s, task in zip(scripts, tasks):
        if s.kind == "experience":
            actions = [r.rsplit("Action: ", 1)[1] for r in s.replies]
            assert s.tau == first_mistake(Expert.of(task, 15), actions)
    # In a build they come on top of everything else, which stays as it was.
    # (Row counts, not tokens: the tokenizer is trained on all of the text.)
    rows = {k: v["rows"] for k, v in tiny_agent[1]["data"]["by_kind"].items()}
    built = build(replace(TINY, experience_episodes=6), tmp_path / "more")
    more = {k: v["rows"] for k, v in built["data"]["by_kind"].items()}
    for kind in ("fragment", "reflect-fragment", "reflect"):
        assert more.get(kind) == rows.get(kind), kind
    assert more["experience"] > rows.get("experience", 0)
    assert more["experience"] + more.get("demo", 0) == rows.get("experience", 0) + rows.get("demo", 0) + 6


def test_reflection_fragments_end_in_the_prompt_and_name_the_step_the_feedback_marks():
    import random

    from leafe.base_agent.synthetic import make_reflection_fragment
    from leafe.prompts import REFLECTION_PROMPT, parse_reflection

    rng = random.Random(2)
    fragments = [f for f in (make_reflection_fragment(t, 15, rng, 0.3) for t in make("sokoban").make_tasks(60, 999))
                 if f]
    assert len(fragments) >= 50
    named = 0
    for f in fragments:
        assert f.messages[-1] == ("user", REFLECTION_PROMPT)
        assert [role for role, _ in f.messages[:-1]] == ["user"] + ["assistant", "user"] * ((len(f.messages) - 2) // 2)
        step = parse_reflection(f.reply).step
        if step is not None:  # the window shows the feedback that marks that step as the losing one
            named += 1
            assert any(f"From step {step} on, the level can no longer be solved" in text for _, text in f.messages)
    # Mostly lost attempts (1 - ON_TRACK_REFLECTIONS): an agent taught on a mix of mostly "none"
    # answered "none" to every reflection, even in this very format.
    assert named >= 0.8 * len(fragments)
    assert named < len(fragments)  # and some attempts still on track


def _pieces(fmt, parts):
    ids, mask = [], []
    for text, trained in parts:
        piece = fmt.encode(text)
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def test_decision_weights_fall_on_the_direction_each_trained_move_names(tiny_agent):
    from transformers import AutoTokenizer

    from leafe.base_agent.synthetic import decision_tokens, decision_weights
    from leafe.chat import ChatFormat

    out, _ = tiny_agent
    fmt = ChatFormat(AutoTokenizer.from_pretrained(out))
    ids, mask = _pieces(fmt, [("Start: a board", 0), ("Thought: go left.\nAction: left", 1), ("Step 0: left", 0),
                              ("Thought: go up to push the box.\nAction: up", 1), ("Thought: go down.", 0)])
    weights = decision_weights(ids, mask, 8.0, **decision_tokens(fmt, plans=False))
    heavy = [fmt.tokenizer.decode([ids[i]]).strip() for i, w in enumerate(weights) if w == 8.0]
    assert heavy == ["left", "up"]  # the untrained turn's direction keeps weight 1
    assert sum(w == 1.0 for w in weights) == len(ids) - 2
    assert decision_weights(ids, mask, 1.0, **decision_tokens(fmt, plans=False)) is None


def test_plan_decision_weights_fall_on_every_direction_and_digit_of_a_trained_reply(tiny_agent):
    from transformers import AutoTokenizer

    from leafe.base_agent.synthetic import decision_tokens, decision_weights
    from leafe.chat import ChatFormat

    out, _ = tiny_agent
    fmt = ChatFormat(AutoTokenizer.from_pretrained(out))
    ids, mask = _pieces(fmt, [("you (1,2); moves left 9", 0),
                              ("Thought: push right from (2,1); at (3,1), go up.\nAction: up", 1),
                              ("Step 4: left", 0), ("Step: 4\nExperience: Instead, go down.", 1)])
    weights = decision_weights(ids, mask, 5.0, **decision_tokens(fmt, plans=True))
    heavy = [fmt.tokenizer.decode([ids[i]]).strip() for i, w in enumerate(weights) if w == 5.0]
    assert heavy == ["right", "2", "1", "3", "1", "up", "up", "4", "down"]


def test_plan_thoughts_name_the_next_push_of_the_optimal_line_and_where_it_is_made():
    import random
    import re

    from leafe.base_agent.synthetic import NoisyExpert
    from leafe.envs.sokoban import ACTIONS, move
    from leafe.envs.sokoban.oracle import thought

    rng = random.Random(3)
    checked = 0
    for task in make("sokoban").make_tasks(30, 777):
        expert = Expert.of(task, 15, plans=True)
        state = expert.start
        for reply in NoisyExpert(expert, rng, 0.3).play(expert.start, 15):
            for action in ACTIONS:
                text = thought(expert, state, action)
                if action not in expert.optimal(state):
                    assert text == f"go {action}."
                    continue
                m = re.fullmatch(r"push (\w+) from \((\d),(\d)\); at \((\d),(\d)\), go (\w+)\.", text)
                assert m, text
                push, stand, at = m.group(1), (int(m.group(2)), int(m.group(3))), (int(m.group(4)), int(m.group(5)))
                assert at == expert.room.coords(state.player) and m.group(6) == action
                # Walk the optimal line from this move: its first push is the named one, from the named cell.
                s, a = state, action
                while (step := move(expert.room, s, a))[1] != "pushed":
                    s, a = step[0], expert.optimal(step[0])[0]
                assert (a, expert.room.coords(s.player)) == (push, stand)
                checked += 1
            state = move(expert.room, state, reply.rsplit("Action: ", 1)[1])[0]
    assert checked > 200
    plain = Expert.of(make("sokoban").make_tasks(1, 777)[0], 15)
    assert thought(plain, plain.start, "up") in ("go up.", "go up to push the box.")



def test_a_plans_build_teaches_plan_thoughts_in_every_kind_of_example():
    import random

    from leafe.base_agent.synthetic import make_fragment, make_reflection_fragment, make_script

    rng = random.Random(4)
    tasks = make("sokoban").make_tasks(20, 4343)
    fragments = [f for f in (make_fragment(t, 15, rng, 0.25, plans=True) for t in tasks) if f]
    assert fragments and all(f.reply.startswith("Thought: push ") for f in fragments)  # targets are optimal moves
    reflections = [f for f in (make_reflection_fragment(t, 15, rng, 0.3, plans=True) for t in tasks) if f]
    scripts = [make_script(t, 15, rng, 0.3, 5, plans=True) for t in tasks]
    for replies in [[text for role, text in f.messages if role == "assistant"] for f in reflections] + [
            s.replies for s in scripts]:
        assert all(r.startswith(("Thought: push ", "Thought: go ")) for r in replies)
    assert any("Thought: push " in r for s in scripts for r in s.replies)
