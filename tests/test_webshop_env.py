"""The webshop env on WebShop's 1000-product data (../shared/data/webshop, read in place): hand-worked
rewards, goals in WebShop's order, the expert's count on the test split, pages and invalid actions,
rollback, LEAFE stage 1 and `leafe eval` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("Stemmer")
pytest.importorskip("spacy")

from leafe.envs import EnvError, make  # noqa: E402
from leafe.envs.webshop.reward import normalize_color, options_matched, token_set_ratio  # noqa: E402

DATA = Path(os.environ.get("LEAFE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")) / "webshop"
if not (DATA / "items_shuffle_1000.json").is_file():
    pytest.skip(f"WebShop's 1000-product data is not at {DATA} (set LEAFE_SHARED_DATA)", allow_module_level=True)
try:
    from leafe.envs.webshop.reward import load_spacy

    load_spacy("en_core_web_sm")
except EnvError as exc:
    pytest.skip(str(exc), allow_module_level=True)

PILLOW, COWHIDE, CANVAS = "B0743JKHBV", "B08K7LDM7Q", "B09P58VY9G"


@pytest.fixture(scope="module")
def env():
    return make("webshop", data_dir=str(DATA))


# WebShop's get_reward (master, web_agent_site/engine/goal.py), worked by hand from its code:
# reward = r_type * (attributes matched + goal options matched + [price <= bound]) / (n_attributes + n_goal_options + 1)
# A goal option is its (name, value) pair, which thefuzz scores as text ("size 28 x 28"), unless the value
# is exactly a colour word; a chosen value is cut to the first colour word it contains (a substring);
# a goal option matches when some chosen value has token-set ratio > 85 with it. Token-set ratio is 100
# whenever one side's tokens are a subset of the other's.
#
# Goal 0 (product PILLOW, an Ambesonne throw pillow cover): attributes double sided, machine washable,
# printing technology; option size 28" x 28"; price bound $30; query "decorative pillows". Its title has
# 20 noun tokens (en_core_web_sm), 19 distinct ("pillow" twice).
# a) PILLOW, size 28" x 28": the same title -> title_score 19/20 = 0.95 > 0.2 and the query matches ->
#    r_type 1; 3 attributes are in its attribute list (token-set ratio 100); {28, x} is a subset of the
#    goal pair's {size, 28, x} -> 100; $14.95 <= $30. (3 + 1 + 1) / (3 + 1 + 1) = 1.
# b) PILLOW, size 40" x 40": {40, x} against {size, 28, x}: only "x" shared, best ratio 40 -> 0 options.
#    (3 + 0 + 1) / 5 = 0.8.
# c) PILLOW, size 16" x 16": a value in the product's own text ("16\" x 16\"" is in its bullets) does not
#    count for an option (only attributes are looked up in the text) -> 0.8.
# d) PILLOW, no option chosen: nothing to match the goal's size -> 4 / 5 = 0.8.
# e) COWHIDE (cowhide pillow covers, $17.99, same query), size 18 x 18-inch: shared nouns {pillow,
#    cushion, cover, square, case, x} -> title_score 6/20 = 0.3, query matches -> r_type 1. Attributes:
#    "double sided" is in its list (ratio 100); "machine washable" (best ratio 29) and "printing
#    technology" (best 39) are not, nor in its text -> 1. {18, x, inch} vs {size, 28, x} -> 0. Price ok.
#    (1 + 0 + 1) / 5 = 0.4.
# f) CANVAS (canvas prints, $100, query "wall art", categories share only "Home & Kitchen"): no noun in
#    common -> title_score 0 -> r_type 0 -> reward 0, whatever else matches.
# Goal 8 (a "100th day of school" T-shirt, 7 attributes, options color/fit type/size, bound $50;
# nouns day, school, football, boy, day, school, t, shirt = 8 tokens):
# g) B017L3XL54 ("14 Day Plain Black Candle", $29.95, query candles): shared nouns {day} -> title_score
#    1/8 = 0.125: not > 0.2, no query or category match -> r_type 0.5 (>= 0.1, so not 0.1). No T-shirt
#    attribute matches, no option chosen, price ok: 0.5 * (0 + 0 + 1) / (7 + 3 + 1) = 0.5 / 11.
# Goal 103 (an Amanti door mirror, attributes space saving + living room, colour "ridge bronze", bound $160):
# h) its product at $147.42, colour "accent bronze": the chosen value becomes "bronze"; the goal pair is
#    not a colour word, so it stays "color ridge bronze", whose tokens include "bronze" -> 100. Both
#    attributes in its list, query matches. (2 + 1 + 1) / (2 + 1 + 1) = 1.
# Goal 1 (leggings: 4 attributes, color black, size 3x-large):
# i) its product with color black and size "large": {large} is a subset of {size, 3x, large} -> the size
#    matches although it is the wrong size (WebShop has no exact rule for sizes). (4 + 2 + 1) / 7 = 1.
# Goal 20 (a shoe: 4 attributes, color "r.brown2070", size 7):
# j) its own product and options: "r.brown2070" is cut to "brown", which is no token of the goal pair
#    {color, r, brown2070} (the pair is not cut: "brown" is not the whole value) -> the colour fails,
#    the size matches. (4 + 1 + 1) / (4 + 2 + 1) = 6/7: the right purchase scores under 1.
# Goal 28 (a rug: attributes dining room + living room, color "navy | red", item shape "rectangular",
# size "1 ft 9 in x 7 ft 2 in"):
# k) its own product and options: "navy | red" -> "navy", a token of {color, navy, red} -> match; but
#    "rectangular" contains "tan" and is cut to it -> no match; the size matches. (2 + 2 + 1) / 6 = 5/6.
# Goal 132 (shoes, attributes non slip + rubber sole, no options, bound $120):
# l) B09HH6P68W (walking shoes, $100, same query: title_score 0.25) with size "6" chosen: a chosen
#    option with no goal option adds nothing (per goal option, at most 1 each) -> (2 + 0 + 1) / 3 = 1.
#    Counting per chosen option, and "6" in its text, gave 4/3 here.
REWARD_CASES = [
    (0, PILLOW, {"size": '28" x 28"'}, 1.0),
    (0, PILLOW, {"size": '40" x 40"'}, 0.8),
    (0, PILLOW, {"size": '16" x 16"'}, 0.8),
    (0, PILLOW, {}, 0.8),
    (0, COWHIDE, {"size": "18 x 18-inch"}, 0.4),
    (0, CANVAS, {"size": '28" x 20"'}, 0.0),
    (8, "B017L3XL54", {}, 0.5 / 11),
    (103, "B07S2Z9KGP", {"color": "accent bronze"}, 1.0),
    (1, "B09QCP4579", {"color": "black", "size": "large"}, 1.0),
    (20, "B07S7HDC88", {"color": "r.brown2070", "size": "7"}, 6 / 7),
    (28, "B07FKGQKZ1", {"color": "navy | red", "item shape": "rectangular", "size": "1 ft 9 in x 7 ft 2 in"}, 5 / 6),
    (132, "B09HH6P68W", {"size": "6"}, 1.0),
]


@pytest.mark.parametrize(("goal", "asin", "options", "expected"), REWARD_CASES)
def test_reward_matches_the_hand_worked_formula(env, goal, asin, options, expected):
    env.reset(env.task(goal))
    assert env.score(asin, options).reward == pytest.approx(expected)


def test_colours_normalise_to_webshops_first_colour_word_and_ratios_round_like_thefuzz():
    assert normalize_color("accent bronze") == normalize_color("ridge bronze") == "bronze"
    assert normalize_color("style1-black") == "black" and normalize_color("28 x 28") == "28 x 28"
    assert token_set_ratio("Machine-Washable", "machine washable") == 100  # thefuzz's processing
    assert isinstance(token_set_ratio("tea tree oil", "tea tree"), int)
    # A goal's (name, value) pair maps only when its value is exactly a colour word; a chosen value on a substring.
    assert normalize_color(("color", "black")) == "black" and normalize_color("rectangular") == "tan"
    assert normalize_color(("color", "ridge bronze")) == ("color", "ridge bronze")
    # thefuzz scores a pair as its str(): repr escapes a no-break space ("xa0green": no "green" token),
    # and force_ascii drops code points 128-255 only.
    assert token_set_ratio("green", ("color", "b17-army\xa0green")) < 85 and token_set_ratio("green", "army green") == 100
    assert token_set_ratio("green", "army\xa0green") < 85  # dropped, not made a space: one token "armygreen"
    assert token_set_ratio("caf\u00e9", "caf") == 100 and token_set_ratio("t\u014dky\u014d", "tky") < 85
    # (each of these equals thefuzz 0.22's fuzz.token_set_ratio on the same arguments)


@pytest.mark.parametrize(("goal_options", "chosen", "matched"), [
    ({"color": "black", "size": "large"}, {"color": "black", "size": "large", "fit": "large"}, 2),  # each goal option once
    ({}, {"size": "6"}, 0),  # a chosen option with no goal option adds nothing
    ({"size": "x-large"}, {"size": "large"}, 1),  # {large} is a subset of {size, x, large}
    ({"size": "large"}, {"size": "x-large"}, 0),  # {x, large} against {size, large}: ratio under 85
    ({"color": "navy blue"}, {"style": "navy blue"}, 1),  # names are not compared: any chosen value may match
    ({"color": "standard"}, {"color": "standard"}, 0),  # "standard" is cut to "tan"
])
def test_goal_options_are_matched_per_goal_option_as_webshop_does(goal_options, chosen, matched):
    assert options_matched(goal_options, chosen) == matched


def test_goals_are_webshops_shuffled_synthetic_goals_and_the_first_500_are_test(env):
    goals = env.shop.goals
    assert len(goals) == 6910  # one per product with an instruction and per combination of its options
    assert goals[0].asin == PILLOW and goals[0].instruction_text == (
        'Find me double sided, machine washable decorative pillows with printing technology with size: 28" x 28", '
        "and price lower than 30.00 dollars")
    test, train = env.make_tasks(500, 0), make("webshop", data_dir=str(DATA), split="train").make_tasks(2, 0)
    assert test[0].task_id == "webshop-test-0" and test[-1].task_id == "webshop-test-499"
    assert [t.task_id for t in train] == ["webshop-train-500", "webshop-train-501"]
    with pytest.raises(EnvError, match="has 500 goals"):
        env.make_tasks(2, 499)
    # The spec carries the whole goal, price bound included.
    assert test[0].spec["goal"]["price_upper"] == 30.0 and json.loads(json.dumps(test[0].spec)) == test[0].spec


#: Test goals where WebShop's reward gives under 1 to the goal's own product with the goal's options
#: (a chosen value cut to a colour word the goal pair does not hold as a token: cases j and k above).
UNWINNABLE = [20, 28, 73, 149, 150, 155, 205, 236, 269, 315, 328, 334, 358, 388, 403, 410, 429, 458, 459, 465]


def test_the_expert_wins_479_of_the_500_test_goals(env):
    """Misses: goal 444, whose instruction words ("power amplifier, hands free av receivers & amplifiers
    with usb port") do not bring its product, a car radio, into the search's top 50; and the 20 goals
    nothing can win under WebShop's reward (UNWINNABLE)."""
    tasks = env.make_tasks(500, 0)
    wins, missed = 0, []
    for task in tasks:
        plan = env.expert_actions(task)
        if plan is None:
            missed.append(task.task_id)
            continue
        env.reset(task)
        results = [env.step(a) for a in plan]
        assert results[-1].done and all(not r.done for r in results[:-1])
        wins += results[-1].success and results[-1].reward == 1.0
    assert wins == 479 and missed == sorted((f"webshop-test-{i}" for i in [*UNWINNABLE, 444]), key=lambda t: int(t[13:]))
    for goal in UNWINNABLE[:3]:
        env.reset(env.task(goal))
        right = env.score(env.goal.asin, env.goal.goal_options)
        assert 0.5 < right.reward < 1.0 and right.options_matched < len(env.goal.goal_options)


def test_pages_buttons_and_invalid_actions(env):
    task = env.task(0)
    first = env.reset(task)
    assert first.endswith("Valid actions: search[<your query>]") and env.instruction.endswith(
        task.spec["goal"]["instruction_text"])
    bad = env.step("buy the pillow")
    assert bad.info["invalid"] and not bad.done and bad.observation.startswith("Invalid action")
    assert env.step("click[buy now]").info["invalid"]  # no such button on the search page
    results = env.step("search[Decorative Pillows]")
    assert not results.info["invalid"] and "Page 1 (Total results: 50)" in results.observation
    assert "click[next >]" in results.observation and "click[< prev]" not in results.observation
    assert all(line.startswith("Instruction: ") for line in (first.splitlines()[1], results.observation.splitlines()[0]))
    page2 = env.step("click[Next >]")
    assert "Page 2 (Total results: 50)" in page2.observation and "click[< prev]" in page2.observation
    env.step("click[< prev]")
    item = env.step(f"click[{PILLOW.lower()}]")
    assert 'size [16" x 16"]' in item.observation and "click[buy now]" in item.observation
    assert "Rating: N.A." in item.observation  # WebShop's loader reads no ratings
    env.step('click[28" x 28"]')
    features = env.step("click[features]")
    assert "Double sided print" in features.observation and "click[buy now]" not in features.observation
    back = env.step("click[< prev]")
    assert 'You have clicked 28" x 28".' in back.observation  # the chosen option survives the sub-page
    assert env.state.chosen == {"size": '28" x 28"'} and env.steps_taken == 9
    env.step("click[back to search]")
    assert env.state.page == "search" and env.state.chosen == {}
    # search[...] works from any page, as in WebShop's text env, and starts over (no product, no options).
    env.step("search[decorative pillows]")
    env.step(f"click[{PILLOW.lower()}]")
    env.step('click[28" x 28"]')
    again = env.step("search[cowhide pillow]")
    assert not again.info["invalid"] and env.state.page == "results" and env.state.chosen == {}
    assert env.state.query == "cowhide pillow" and f"Instruction: {task.spec['goal']['instruction_text']}" in again.observation


def test_the_episode_ends_at_max_steps_without_a_purchase():
    env = make("webshop", data_dir=str(DATA), max_steps=2)
    env.reset(env.task(0))
    assert not env.step("look").done
    last = env.step("look")
    assert last.done and not last.success and last.reward == 0.0 and "nothing was bought" in last.observation


def test_snapshot_restores_page_query_results_and_options(env):
    env.reset(env.task(0))
    for action in ("search[decorative pillows]", "click[next >]", "click[< prev]"):
        env.step(action)
    saved, before = env.snapshot(), env._render()
    env.step(f"click[{COWHIDE.lower()}]")
    env.step("click[18 x 18-inch]")
    bought = env.step("click[buy now]")
    assert bought.done and bought.reward == pytest.approx(0.4) and bought.info["attributes_matched"] == 1
    other = make("webshop", data_dir=str(DATA))
    for target in (env, other):  # in place, and into a fresh env (how stage 1 branches)
        target.restore(saved)
        assert target._render() == before and target.state.page_no == 1 and target.steps_taken == 3
        assert target.state.query == "decorative pillows" and len(target.state.results) == 50
        assert target.step(f"click[{PILLOW.lower()}]").info["page"] == "item"


def test_missing_data_and_spacy_model_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("WEBSHOP_DATA", raising=False)
    with pytest.raises(EnvError, match=r"items_shuffle_1000.json.*WEBSHOP_DATA"):
        make("webshop")
    with pytest.raises(EnvError, match=r"has no items_shuffle_1000.json, items_ins_v2_1000.json: get"):
        make("webshop", data_dir=str(tmp_path))
    with pytest.raises(EnvError, match=r"has no items_shuffle.json"):
        make("webshop", data_dir=str(DATA), products="all")
    with pytest.raises(EnvError, match=r"spaCy model 'en_core_web_nope' is not installed: pip install"):
        make("webshop", data_dir=str(DATA), spacy_model="en_core_web_nope")
    monkeypatch.setenv("WEBSHOP_DATA", str(DATA))
    assert make("webshop", spacy_model="rule").make_tasks(1, 0)[0].spec["goal"]["asin"] == PILLOW


def test_an_unknown_split_is_an_env_error_before_the_data_loads(tmp_path):
    from leafe.envs.webshop.goals import split_indices

    with pytest.raises(EnvError, match="unknown webshop split 'dev'; use one of test, train"):
        split_indices(600, "dev")
    with pytest.raises(EnvError, match="unknown webshop split 'dev'"):
        make("webshop", data_dir=str(tmp_path), split="dev")  # an empty folder: the split is refused first
    assert split_indices(600, "train") == range(500, 600)


def test_leafe_stage1_rolls_back_webshop_and_the_branch_buys_the_goal(tiny_tokenizer, tmp_path, monkeypatch):
    from helpers import ScriptedBackend, scripted_explorer

    from leafe.method import Job
    from leafe.methods.explore import explore
    from leafe.settings import ExploreSettings
    from leafe.trees import read_trees

    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    params = {"data_dir": str(DATA), "max_steps": 6}
    env = make("webshop", **params)
    task = env.make_tasks(1, 0)[0]
    expert = env.expert_actions(task)
    assert len(expert) == 4  # search, the product, its size, buy: fits the 5 steps left after step 0

    # Idles on the features page until an experience is in context, then plays the expert's actions.
    reply = scripted_explorer(lambda text: expert, idle="click[features]")

    settings = ExploreSettings(env="webshop", env_params=params, tasks=1, task_seed=0, budget=20, reflect_every=6,
                               branch_samples=1, max_depth=1, stop_on_success=True)
    explore(Job("scripted", tmp_path / "explore", backend=ScriptedBackend(tiny_tokenizer, reply)), settings)
    (tree,) = read_trees(tmp_path / "explore" / "trees.jsonl")
    assert tree["success"] and tree["branches"] == tree["branches_succeeded"] == 1
    root, branch = tree["nodes"][:2]
    assert not root.episode.success and [s.action for s in root.episode.steps] == ["click[features]"] * 6
    assert branch.tau == 1 and branch.episode.success and branch.replayed_steps == 0  # restored by snapshot
    assert [s.action for s in branch.episode.steps] == ["click[features]"] + expert


def test_leafe_eval_runs_webshop_end_to_end(tiny_model_dir, tmp_path):
    # spacy_model=rule: this is about the CLI's plumbing, and importing spaCy costs the subprocess ~6 s.
    out = tmp_path / "eval"
    run = subprocess.run(
        [sys.executable, "-m", "leafe", "eval", "--env", "webshop", "--env-param", f"data_dir={DATA}",
         "--env-param", "max_steps=2", "--env-param", "spacy_model=rule", "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "2",
         "--samples", "1", "--max-new-tokens", "8", "--task-seed", "0"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "eval.json").read_text())
    assert result["env"] == "webshop" and [t["task_id"] for t in result["tasks"]] == ["webshop-test-0", "webshop-test-1"]
    assert result["env_steps"] >= 2
