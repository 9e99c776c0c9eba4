"""Synthetic WebShop goals, built as WebShop's `get_synthetic_goals` builds them, and the test/train split.

One goal per product that has a synthetic instruction and per combination of its option values
(option names sorted, values in page order): "<instruction> with color: red, and size: large, and
price lower than 40.00 dollars". The price bound is drawn as WebShop draws it: the product's price
(a uniform draw inside a price range), then two of the first four multiples of $10 above it, the
larger one kept; with fewer than two such multiples there is no bound (1e6) and no price text.

Order and split. WebShop builds the goals in product-file order, then shuffles them with
`random.seed(233); random.shuffle(goals)`. WebShop's IL/RL baselines evaluate on goals 0-499 of that
shuffled list (on its human goals), and agent-RL work on the 1000-product synthetic goals takes the
same first 500 as test and the rest as training; we do the same. We reproduce the shuffle exactly
(Python's `Random(233).shuffle` on a list of the same length gives the same permutation), so goal i
here is the product and option combination of WebShop's goal i. The prices are not reproducible:
WebShop draws them from the unseeded global RNG before seeding, so every WebShop process has
different price bounds. We draw them from `Random(PRICE_SEED)` in WebShop's call order, which makes
them fixed across runs (and they travel in each task's spec anyway).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from leafe.envs.base import EnvError
from leafe.envs.webshop.data import Product

SHUFFLE_SEED = 233  # WebShop's
PRICE_SEED = 0  # ours: WebShop leaves this draw unseeded
TEST_GOALS = 500
SPLITS = ("test", "train")
NO_PRICE_BOUND = 1_000_000.0
PRICE_STEPS = [10.0 * i for i in range(1, 100)]


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction_text: str
    attributes: tuple[str, ...]
    goal_options: dict[str, str]  # option name -> value the buyer wants
    price_upper: float
    name: str  # the product's title: the type reward parses its nouns
    query: str
    category: str
    product_category: str

    def to_spec(self) -> dict:
        spec = asdict(self)
        spec["attributes"] = list(self.attributes)
        return spec

    @classmethod
    def from_spec(cls, spec: dict) -> Goal:
        fields = {k: spec[k] for k in cls.__dataclass_fields__}
        return cls(**{**fields, "attributes": tuple(fields["attributes"]), "goal_options": dict(fields["goal_options"])})


def product_prices(products: Sequence[Product], rng: random.Random) -> dict[str, float]:
    """The price each product sells at: its one price, or a uniform draw inside its range."""
    return {p.asin: p.pricing[0] if len(p.pricing) == 1 else rng.uniform(*p.pricing[:2]) for p in products}


def price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    above = [p for p in PRICE_STEPS if p > price][:4]
    if len(above) < 2:
        return NO_PRICE_BOUND, ""
    _, upper = sorted(rng.sample(above, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def synthetic_goals(products: Sequence[Product]) -> tuple[list[Goal], dict[str, float]]:
    """All goals in WebShop's shuffled order, and the price each product sells at."""
    rng = random.Random(PRICE_SEED)
    prices = product_prices(products, rng)
    goals = []
    for product in products:
        if product.instruction is None:
            continue
        upper, price_text = price_bound(prices[product.asin], rng)
        names = sorted(product.options)
        for combination in itertools.product(*(product.options[n] for n in names)):
            chosen = dict(zip(names, combination, strict=True))
            option_text = ", and ".join(f"{k}: {v}" for k, v in chosen.items())
            option_text = f" with {option_text}" if option_text else ""
            goals.append(Goal(
                asin=product.asin, instruction_text=f"{product.instruction}{option_text}{price_text}",
                attributes=product.instruction_attributes, goal_options=chosen, price_upper=upper,
                name=product.title, query=product.query, category=product.category,
                product_category=product.product_category,
            ))
    random.Random(SHUFFLE_SEED).shuffle(goals)
    return goals, prices


def split_indices(n_goals: int, split: str) -> range:
    """Goal indices of a split: test is the first 500 shuffled goals, train the rest."""
    if split not in SPLITS:
        raise EnvError(f"unknown webshop split {split!r}; use one of {', '.join(SPLITS)}")
    return range(0, min(TEST_GOALS, n_goals)) if split == "test" else range(TEST_GOALS, n_goals)
