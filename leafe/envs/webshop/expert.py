"""The WebShop expert (Early Experience's demonstrations): it knows the goal's product.

It searches the goal's instruction words (the instruction without its price clause), pages through
the results to the goal's product, clicks it, clicks each goal option value, and buys. A plan is
returned only when playing it reaches reward 1; it is None when the product is not in the search's
50 results or an option cannot be chosen (two options of the product share the value, so the value's
button selects the other option, as on WebShop's page) -- BENCHMARKS.md counts both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafe.envs.base import Task
from leafe.envs.webshop.goals import Goal
from leafe.envs.webshop.pages import BUY, NEXT, PAGE_SIZE
from leafe.envs.webshop.search import RESULTS

if TYPE_CHECKING:
    from leafe.envs.webshop.env import WebShopEnv


def search_words(goal: Goal) -> str:
    return goal.instruction_text.split(", and price lower than")[0].lower()


def plan_for(env: WebShopEnv, goal: Goal) -> tuple[list[str] | None, str]:
    """The expert's actions for `goal` and, when there are none, why ("not found")."""
    query = search_words(goal)
    results = env.shop.index.search(query, RESULTS)
    if goal.asin not in results:
        return None, "not found"
    position = results.index(goal.asin)
    actions = [f"search[{query}]"] + [f"click[{NEXT}]"] * (position // PAGE_SIZE) + [f"click[{goal.asin.lower()}]"]
    actions += [f"click[{value}]" for _, value in sorted(goal.goal_options.items())]
    return actions + [f"click[{BUY}]"], ""


def expert_plan(env: WebShopEnv, task: Task) -> list[str] | None:
    """The plan, checked by playing it on a snapshot of `env` (restored after): None unless it wins."""
    actions, _ = plan_for(env, Goal.from_spec(task.spec["goal"]))
    if actions is None:
        return None
    saved = env.snapshot() if env.goal is not None else None
    try:
        env.reset(task)
        result = None
        for action in actions:
            result = env.step(action)
            if result.done:
                break
        won = result is not None and result.success
    finally:
        if saved is not None:
            env.restore(saved)
    return actions if won else None
