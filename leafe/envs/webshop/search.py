"""WebShop's search engine rebuilt: BM25 over the text WebShop indexes, ranked as Lucene ranks.

WebShop searches a Lucene index (pyserini, BM25 k1=0.9 b=0.4) whose one field per product is
title + description + first bullet point + "name: v1, v2, and name2: ..." options, lower-cased, and
returns the top 50. Pyserini needs Java and a prebuilt index, so we index the same text with bm25s
(`method="lucene"`: Lucene's idf and length normalisation) behind an analyzer close to Lucene's
English one (word tokens, possessive 's dropped, Lucene's English stop words, Porter stemming).
Differences left: Lucene stores document lengths in one lossy byte and its tokenizer is UAX#29, so
close scores can order differently; benchmarks/webshop_search.py measures the agreement with an exact
implementation of Lucene's formula and why bm25s was chosen over rank-bm25.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from leafe.envs.base import EnvError
from leafe.envs.webshop.data import Product

RESULTS = 50  # WebShop's SEARCH_RETURN_N
K1, B = 0.9, 0.4  # pyserini's BM25 defaults, which WebShop's searcher uses
#: Lucene's EnglishAnalyzer stop words.
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split()
)
_TOKEN = re.compile(r"[^\W_]+(?:[.'][^\W_]+)*")


def _stemmer():
    try:
        import Stemmer
    except ImportError:
        raise EnvError("the webshop env's search needs PyStemmer: pip install 'leafe[webshop]'") from None
    return Stemmer.Stemmer("porter")


def product_text(product: Product) -> str:
    """The text WebShop indexes for a product (its `contents` field)."""
    options = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product.options.items())
    first_bullet = product.bullet_points[0] if product.bullet_points else ""
    return " ".join([product.title, product.description, first_bullet, options]).lower()


class Analyzer:
    """Lower-case word tokens without possessives and stop words, Porter-stemmed (cached per word)."""

    def __init__(self):
        self._stem = _stemmer().stemWord
        self._cache: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        out = []
        for token in _TOKEN.findall(text.lower()):
            if token.endswith("'s"):
                token = token[:-2]
            if token in STOP_WORDS or not token:
                continue
            stem = self._cache.get(token)
            if stem is None:
                stem = self._cache[token] = self._stem(token)
            out.append(stem)
        return out


class SearchIndex:
    """BM25 over the products; `search` gives the ASINs of the top matches, best first."""

    def __init__(self, products: Sequence[Product]):
        try:
            import bm25s
        except ImportError:
            raise EnvError("the webshop env's search needs bm25s: pip install 'leafe[webshop]'") from None
        self.asins = [p.asin for p in products]
        self.analyze = Analyzer()
        self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
        self._bm25.index([self.analyze(product_text(p)) for p in products], show_progress=False)

    def search(self, query: str, k: int = RESULTS) -> list[str]:
        """Products matching at least one query term, by score; ties keep index order, as Lucene's do."""
        tokens = self.analyze(query)
        if not tokens:
            return []
        scores = self._bm25.get_scores(tokens)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.asins[i] for i in order if scores[i] > 0]
