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
from leafe.envs.webshop.reward import normalize_color, token_set_ratio  # noqa: E402

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


# reward = r_type * (attributes matched + options matched + [price <= bound]) / (n_attributes + n_options + 1)
#
# Goal 0 (product PILLOW, an Ambesonne throw pillow cover): attributes double sided, machine washable,
# printing technology; option size 28" x 28"; price bound $30; query "decorative pillows". Its title has
# 20 noun tokens (en_core_web_sm), 19 distinct ("pillow" twice).
# a) PILLOW, size 28" x 28": the same title -> title_score 19/20 = 0.95 > 0.2 and the query matches ->
#    r_type 1; 3 attributes are in its attribute list (token-set ratio 100); the size is an exact match;
#    $14.95 <= $30. (3 + 1 + 1) / (3 + 1 + 1) = 1.
# b) PILLOW, size 40" x 40": size matches only exactly and "40\" x 40\"" is not in the title, bullets or
#    description -> 0 options. (3 + 0 + 1) / 5 = 0.8.
# c) PILLOW, no option chosen: WebShop counts chosen options only -> 0 options. 4 / 5 = 0.8.
# d) COWHIDE (cowhide pillow covers, $17.99, same query), size 18 x 18-inch: shared nouns {pillow,
#    cushion, cover, square, case, x} -> title_score 6/20 = 0.3, query matches -> r_type 1. Attributes:
#    "double sided" is in its list (ratio 100); "machine washable" (best ratio 29) and "printing
#    technology" (best 39) are not, nor in its text -> 1. The size is not the goal's, nor in its text -> 0.
#    Price ok -> 1. (1 + 0 + 1) / 5 = 0.4.
# e) CANVAS (canvas prints, $100, query "wall art", categories share only "Home & Kitchen"): no noun in
#    common -> title_score 0 -> r_type 0 -> reward 0, whatever else matches.
# Goal 8 (a "100th day of school" T-shirt, 7 attributes, options color/fit type/size, bound $50;
# nouns day, school, football, boy, day, school, t, shirt = 8 tokens):
# f) B017L3XL54 ("14 Day Plain Black Candle", $29.95, query candles): shared nouns {day} -> title_score
#    1/8 = 0.125: not > 0.2, no query or category match -> r_type 0.5 (>= 0.1, so not 0.1). No T-shirt
#    attribute matches, no option chosen, price ok: 0.5 * (0 + 0 + 1) / (7 + 3 + 1) = 0.5 / 11.
# Goal 103 (an Amanti door mirror, attributes space saving + living room, colour "ridge bronze", bound $160):
# g) its product at $147.42, colour "accent bronze": both values normalise to the colour word "bronze"
#    (ratio 100 > 85) -> the option matches; both attributes are in its list; query matches -> r_type 1.
#    (2 + 1 + 1) / (2 + 1 + 1) = 1.
REWARD_CASES = [
    (0, PILLOW, {"size": '28" x 28"'}, 1.0),
    (0, PILLOW, {"size": '40" x 40"'}, 0.8),
    (0, PILLOW, {}, 0.8),
    (0, COWHIDE, {"size": "18 x 18-inch"}, 0.4),
    (0, CANVAS, {"size": '28" x 20"'}, 0.0),
    (8, "B017L3XL54", {}, 0.5 / 11),
    (103, "B07S2Z9KGP", {"color": "accent bronze"}, 1.0),
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


def test_the_expert_wins_499_of_the_500_test_goals(env):
    """The one miss, goal 444: its instruction words ("power amplifier, hands free av receivers &
    amplifiers with usb port") do not bring its product, a car radio, into the search's top 50."""
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
    assert wins == 499 and missed == ["webshop-test-444"]


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
    assert env.step("search[again]").info["invalid"]  # the search box is on the search page only
    page2 = env.step("click[Next >]")
    assert "Page 2 (Total results: 50)" in page2.observation and "click[< prev]" in page2.observation
    env.step("click[< prev]")
    item = env.step(f"click[{PILLOW.lower()}]")
    assert 'size [16" x 16"]' in item.observation and "click[buy now]" in item.observation
    env.step('click[28" x 28"]')
    features = env.step("click[features]")
    assert "Double sided print" in features.observation and "click[buy now]" not in features.observation
    back = env.step("click[< prev]")
    assert 'You have clicked 28" x 28".' in back.observation  # the chosen option survives the sub-page
    assert env.state.chosen == {"size": '28" x 28"'} and env.steps_taken == 10
    env.step("click[back to search]")
    assert env.state.page == "search" and env.state.chosen == {}


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
                               branch_samples=1, max_depth=1)
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
