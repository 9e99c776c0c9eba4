"""The WebShop env: find and buy the product a synthetic instruction describes, on WebShop's pages.

Tasks are goals of a split ("test": WebShop's first 500 shuffled goals, "train": the rest; see
goals.py); task i of `make_tasks(n, seed)` is goal seed+i of the split, and its spec carries the whole
goal (so a saved task keeps its price bound). Actions are `search[keywords]` on the search page and
`click[button]` with a button of the current page; anything else is an ordinary step whose
observation says why it did nothing. `search[...]` works from any page, as in WebShop's text env (its
`step` searches whatever the page; only the search page lists it among the valid actions, as
`get_available_actions` reports a search bar there only). Buying ends the episode with
WebShop's reward in `StepResult.reward` and its parts in `info`; success is a reward of 1.
Rollback is by snapshot: the page state is one immutable object.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.registry import register
from leafe.envs.webshop import pages
from leafe.envs.webshop.data import Product, data_status, load_products, resolve_data_dir
from leafe.envs.webshop.expert import plan_for
from leafe.envs.webshop.goals import Goal, split_indices, synthetic_goals
from leafe.envs.webshop.pages import PageState
from leafe.envs.webshop.reward import DEFAULT_SPACY_MODEL, NounParser, RewardParts, reward
from leafe.envs.webshop.search import SearchIndex

INSTRUCTION = (
    "WebShop: you are shopping online. Find the product the instruction below describes, choose the "
    "options it asks for on the product's page, and buy it. Actions: search[keywords] on the search "
    "page, and click[button] with the text of a button on the current page (e.g. click[b07xyz1234], "
    "click[next >], click[large], click[buy now]); each page ends with its valid actions."
)
_ACTION = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
SUCCESS = 1.0 - 1e-9  # the reward is a ratio of small integers times r_type: 1 means 1


@dataclass(frozen=True)
class Shop:
    """What every env on one data set shares: products, goals, prices and the search index."""

    products: dict[str, Product]
    goals: tuple[Goal, ...]
    prices: dict[str, float]
    index: SearchIndex


@functools.lru_cache(maxsize=2)
def open_shop(data_dir: Path, products: str) -> Shop:
    items = load_products(data_dir, products)
    goals, prices = synthetic_goals(items)
    return Shop({p.asin: p for p in items}, tuple(goals), prices, SearchIndex(items))


@functools.lru_cache(maxsize=4)
def noun_parser(model: str) -> NounParser:
    """One parser per model per process: its title cache serves every env and episode."""
    return NounParser(model)


def parse(action: str) -> tuple[str, str] | None:
    """('search'|'click', lower-cased argument), or None for anything else."""
    m = _ACTION.match(action)
    return (m.group(1).lower(), m.group(2).strip().lower()) if m else None


@register
class WebShopEnv(Env):
    """WebShop on the user's copy of its item files, with a step limit; rollback by snapshot."""

    name = "webshop"
    supports_snapshot = True

    def __init__(self, data_dir: str | None = None, split: str = "test", products: str = "1000",
                 spacy_model: str = DEFAULT_SPACY_MODEL, max_steps: int = 15):
        """`data_dir`: the folder with WebShop's item files (else $WEBSHOP_DATA). `split`: test (the first
        500 goals) or train (the rest). `products`: "1000"
        (items_*_1000.json, the set agent papers use) or "all" (the full files). `spacy_model`: the
        tagger of the type reward, or "rule" (see reward.py). `max_steps`: 15, as ReAct's runs."""
        split_indices(0, split)  # an unknown split fails here, before the data loads
        if max_steps < 1:
            raise EnvError(f"webshop max_steps must be >= 1 (got {max_steps})")
        self.data_dir, self.products_size = resolve_data_dir(data_dir, str(products)), str(products)
        self.split, self.max_steps = split, max_steps
        self.shop = open_shop(self.data_dir, self.products_size)
        self.nouns = noun_parser(spacy_model)  # fails now, naming the install, when the model is missing
        self.goal: Goal | None = None
        self.state = PageState()
        self._steps, self._done = 0, False
        self.last_reward: RewardParts | None = None

    @classmethod
    def data_status(cls, data_dir: str | None = None, products: str = "1000", **_: object) -> DataStatus:
        return data_status(data_dir, str(products))

    # -- tasks ---------------------------------------------------------------------------------
    def goal_indices(self) -> range:
        return split_indices(len(self.shop.goals), self.split)

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Goals seed..seed+n-1 of the split (goal indices offset by 500 for train)."""
        indices = self.goal_indices()
        if seed < 0 or n < 0 or seed + n > len(indices):
            raise EnvError(f"webshop split {self.split!r} has {len(indices)} goals; asked for {n} from {seed} "
                          f"(the task seed is the first goal's index in the split: --task-seed 0)")
        return [self.task(indices[seed + i]) for i in range(n)]

    def task(self, goal_index: int) -> Task:
        goal = self.shop.goals[goal_index]
        return Task(task_id=f"webshop-{self.split}-{goal_index}", env=self.name,
                    spec={"goal_index": goal_index, "goal": goal.to_spec()})

    def expert_actions(self, task: Task) -> list[str] | None:
        """The expert's plan (`leafe.envs.webshop.expert`), checked by playing it on a snapshot of this
        env (restored after): None unless it wins."""
        actions, _ = plan_for(self.shop.index, Goal.from_spec(task.spec["goal"]))
        if actions is None:
            return None
        saved = self.snapshot() if self.goal is not None else None
        try:
            self.reset(task)
            result = None
            for action in actions:
                result = self.step(action)
                if result.done:
                    break
            won = result is not None and result.success
        finally:
            if saved is not None:
                self.restore(saved)
        return actions if won else None

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        if "goal" not in task.spec:
            raise EnvError(f"webshop task {task.task_id!r} has no 'goal' in its spec")
        self.goal = Goal.from_spec(task.spec["goal"])
        if self.goal.asin not in self.shop.products:
            raise EnvError(f"webshop task {task.task_id!r} wants {self.goal.asin}, which {self.data_dir} lacks")
        self.instruction = f"{INSTRUCTION}\n\nInstruction: {self.goal.instruction_text}"
        self.state, self._steps, self._done, self.last_reward = PageState(), 0, False, None
        return self._render()

    def step(self, action: str) -> StepResult:
        self.check_running(started=self.goal is not None, ended=self._done, what="goal")
        self._steps += 1
        problem = self._apply(action)
        info: dict = {"invalid": problem is not None, "page": self.state.page}
        if self.state.page == "done":
            parts = self.last_reward
            info.update(asdict(parts))
            self._done = True
            text = (f"Thank you for shopping with us! You bought {self.state.asin} with options "
                    f"{self.state.chosen or 'none'}. Your score (min 0.0, max 1.0): {parts.reward:.2f}")
            return StepResult(text, parts.reward, True, parts.reward >= SUCCESS, info)
        text = self._render() if problem is None else f"Invalid action: {problem}. Nothing changed.\n{self._render()}"
        if self._steps >= self.max_steps:
            self._done = True
            text += f"\nNo steps left ({self.max_steps} used): nothing was bought."
        return StepResult(text, 0.0, self._done, False, info)

    def _apply(self, action: str) -> str | None:
        """Move to the page `action` leads to; a reason when it is not a valid action here."""
        parsed = parse(action)
        shown = (action.strip().splitlines() or [""])[0][:60]
        if parsed is None:
            return f"{shown!r} is neither search[...] nor click[...]"
        verb, arg = parsed
        state = self.state
        if verb == "search":
            if not arg:
                return "search[...] needs keywords"
            self.state = PageState(page="results", query=arg, results=tuple(self.shop.index.search(arg)),
                                   visited=state.visited)
            return None
        buttons = pages.clickables(state, self._product())
        if arg not in buttons:
            return f"there is no {arg!r} button on this page"
        kind, target = buttons[arg]
        if kind == "back":
            self.state = PageState(visited=state.visited)
        elif kind == "page":
            self.state = replace(state, page_no=int(target))
        elif kind == "item":  # a product link, or "< prev" from a sub-page
            self.state = replace(state, page="item", asin=target, sub_page=None, visited=state.visited | {target})
        elif kind == "results":  # WebShop re-runs the search: the chosen options go
            self.state = replace(state, page="results", asin=None, options=(), sub_page=None)
        elif kind == "option":
            self.state = state.choose(target, arg)
        elif kind == "sub":
            self.state = replace(state, page="sub", sub_page=target)
        elif kind == "buy":
            self.last_reward = self.score(state.asin, state.chosen)
            self.state = replace(state, page="done")
        return None

    def score(self, asin: str, chosen: dict[str, str]) -> RewardParts:
        """WebShop's reward for buying `asin` with options `chosen` under the current goal."""
        return reward(self.shop.products[asin], self.goal, self.shop.prices[asin], chosen, self.nouns)

    def _product(self) -> Product | None:
        return self.shop.products.get(self.state.asin) if self.state.asin else None

    def _render(self) -> str:
        return pages.render(self.state, self.shop.products, self.goal.instruction_text)

    @property
    def steps_taken(self) -> int:
        return self._steps

    # -- rollback ------------------------------------------------------------------------------
    def snapshot(self) -> tuple:
        self.check_running(started=self.goal is not None, what="goal")
        return (self.goal, self.instruction, self.state, self._steps, self._done, self.last_reward)

    def restore(self, snapshot: tuple) -> None:
        self.goal, self.instruction, self.state, self._steps, self._done, self.last_reward = snapshot
