"""The WebShop expert (Early Experience's demonstrations): it knows the goal's product.

It searches the goal's instruction words (the instruction without its price clause), pages through
the results to the goal's product, clicks it, clicks each goal option value, and buys. The env keeps
a plan only when playing it reaches reward 1 (`WebShopEnv.expert_actions`); there is none when the
product is not in the search's 50 results or an option cannot be chosen (two options of the product
share the value, so the value's button selects the other option, as on WebShop's page) --
BENCHMARKS.md counts both.
"""

from __future__ import annotations

from leafe.envs.webshop.goals import Goal
from leafe.envs.webshop.pages import BUY, NEXT, PAGE_SIZE
from leafe.envs.webshop.search import RESULTS, SearchIndex


def search_words(goal: Goal) -> str:
    return goal.instruction_text.split(", and price lower than")[0].lower()


def plan_for(index: SearchIndex, goal: Goal) -> tuple[list[str] | None, str]:
    """The expert's actions for `goal`, searching the shop's `index`, and, when there are none, why
    ("not found"). The env plays a plan before it trusts it (`WebShopEnv.expert_actions`)."""
    query = search_words(goal)
    results = index.search(query, RESULTS)
    if goal.asin not in results:
        return None, "not found"
    position = results.index(goal.asin)
    actions = [f"search[{query}]"] + [f"click[{NEXT}]"] * (position // PAGE_SIZE) + [f"click[{goal.asin.lower()}]"]
    actions += [f"click[{value}]" for _, value in sorted(goal.goal_options.items())]
    return actions + [f"click[{BUY}]"], ""
