"""WebShop, written here: WebShop's products, synthetic goals, pages, search and reward, read from the
user's copy of WebShop's data. `leafe.envs.make("webshop", data_dir=...)` (or $WEBSHOP_DATA) builds it.

data.py reads and cleans the item files, goals.py builds the goals and the test/train split,
search.py the BM25 index, reward.py the purchase reward, pages.py the pages and buttons, env.py the
env, expert.py the expert for Early Experience.
"""

from leafe.envs.webshop.data import ENV_VAR, Product, load_products
from leafe.envs.webshop.env import INSTRUCTION, WebShopEnv
from leafe.envs.webshop.goals import Goal, synthetic_goals
from leafe.envs.webshop.reward import RewardParts, normalize_color, reward
from leafe.envs.webshop.search import SearchIndex

__all__ = [
    "ENV_VAR", "INSTRUCTION", "Goal", "Product", "RewardParts", "SearchIndex", "WebShopEnv", "load_products",
    "normalize_color", "reward", "synthetic_goals",
]
