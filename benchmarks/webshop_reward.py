"""How far WebShop's reward moves with the noun tagger, and whether rapidfuzz scores equal thefuzz's.

    python benchmarks/webshop_reward.py [--data ../shared/data/webshop] [--out benchmarks/results/webshop_reward.json]

The type reward counts a goal title's nouns (spaCy NOUN/PROPN) in the bought title. WebShop loads
en_core_web_sm (here its PyPI mirror, the default); it is compared with the "rule"
fallback (every non-stop-word a noun) are compared on the 500 test goals, for two purchases each:
the expert's (goal product, goal options) and a random one (a product drawn from the 50 results of the
goal's instruction words, random option values; seed 0). Also: every fuzzy ratio those rewards
compute, by rapidfuzz (leafe) and by thefuzz when it is installed. WebShop pins thefuzz 0.19.0, which
(without python-Levenshtein) scores with difflib; thefuzz >= 0.20 is rapidfuzz inside. The stored
result compares against 0.19.0, installed apart and put first on the path:

    pip install --no-deps --target /tmp/tf019 thefuzz==0.19.0
    PYTHONPATH=/tmp/tf019:$PWD python benchmarks/webshop_reward.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from leafe.envs import make
from leafe.envs.webshop.expert import search_words
from leafe.envs.webshop.reward import NounParser, normalize_color, reward, token_set_ratio

MODELS = ("en_core_web_sm", "rule")


def purchases(env, rng: random.Random) -> list[tuple[int, str, dict]]:
    out = []
    for i in range(500):
        goal = env.shop.goals[i]
        out.append((i, goal.asin, dict(goal.goal_options)))
        asin = rng.choice(env.shop.index.search(search_words(goal)) or [goal.asin])
        options = {name: rng.choice(values) for name, values in env.shop.products[asin].options.items()}
        out.append((i, asin, options))
    return out


def fuzz_pairs(env, bought: list[tuple[int, str, dict]]) -> list[tuple]:
    """Every (have, want) the rewards score: attributes, and chosen values against goal (name, value) pairs."""
    pairs = set()
    for i, asin, options in bought:
        goal, product = env.shop.goals[i], env.shop.products[asin]
        pairs.update((have, want) for want in goal.attributes for have in product.attributes)
        wanted = [normalize_color(pair) for pair in goal.goal_options.items()]
        pairs.update((normalize_color(v), w) for v in options.values() for w in wanted)
    return sorted(pairs, key=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/webshop"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/webshop_reward.json"))
    args = parser.parse_args()
    env = make("webshop", data_dir=str(args.data), spacy_model="rule")
    bought = purchases(env, random.Random(0))
    rewards = {}
    for model in MODELS:
        nouns = NounParser(model)
        rewards[model] = np.array([reward(env.shop.products[a], env.shop.goals[i], env.shop.prices[a], o, nouns).reward
                                   for i, a, o in bought])
    report: dict = {"purchases": len(bought), "models": list(MODELS), "by_kind": {}}
    for kind, rows in (("expert", slice(0, None, 2)), ("random", slice(1, None, 2))):
        sm, rule = rewards["en_core_web_sm"][rows], rewards["rule"][rows]
        diff = np.abs(sm - rule)
        report["by_kind"][kind] = {
            "mean_reward": {m: round(float(rewards[m][rows].mean()), 4) for m in MODELS},
            "reward_1": {m: int((rewards[m][rows] >= 1 - 1e-9).sum()) for m in MODELS},
            "changed": int((diff > 1e-9).sum()), "mean_abs_diff": round(float(diff.mean()), 4),
            "max_abs_diff": round(float(diff.max()), 4),
        }
    pairs = fuzz_pairs(env, bought)
    check: dict = {"pairs": len(pairs)}
    try:
        from thefuzz import __version__ as thefuzz_version
        from thefuzz import fuzz as thefuzz

        same = sum(token_set_ratio(a, b) == thefuzz.token_set_ratio(a, b) for a, b in pairs)
        flips = sum((token_set_ratio(a, b) > 85) != (thefuzz.token_set_ratio(a, b) > 85) for a, b in pairs)
        check.update({"thefuzz": thefuzz_version, "equal_scores": same, "threshold_flips": flips})
    except ImportError:
        check["thefuzz"] = "not installed"
    report["fuzzy_ratio_check"] = check
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
