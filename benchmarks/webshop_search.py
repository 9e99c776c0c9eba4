"""Which BM25 library the webshop env searches with: speed, and agreement with Lucene's ranking.

    python benchmarks/webshop_search.py [--data ../shared/data/webshop] [--out benchmarks/results/webshop_search.json]

WebShop ranks with pyserini (Lucene BM25, k1=0.9, b=0.4). Pyserini needs Java plus its own jar and a
prebuilt index, none of which this machine has, so the reference here is Lucene's BM25 formula written
out exactly (idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b dl / avgdl)), no
(k1 + 1) factor), in two forms: with exact document lengths, and with lengths rounded through Lucene's
one-byte norm encoding (SmallFloat.intToByte4), as a real Lucene index stores them. Every candidate
gets the same tokens (leafe's analyzer: words, Lucene's English stop words, Porter stems), so this
measures scoring and ranking, not the tokenizer (Lucene's UAX#29 tokenizer is not compared).

Queries: the 500 test goals' instruction words (what the expert searches) and the 500 products'
own `query` fields that those goals come from (short queries like "decorative pillows").
Agreement: mean overlap of the top 10 and top 50 with the reference, the share of queries whose
top 10 is identical in order, and whether the goal's product is in the top 50.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np

from leafe.envs.webshop.data import load_products
from leafe.envs.webshop.expert import search_words
from leafe.envs.webshop.goals import synthetic_goals
from leafe.envs.webshop.search import K1, RESULTS, Analyzer, B, product_text

# Lucene's SmallFloat int4 encoding of norms (Lucene 8+): lengths below 24 are exact, above that
# 3 bits of mantissa.
_FREE = 24


def _long_to_int4(i: int) -> int:
    bits = i.bit_length()
    if bits < 4:
        return i
    shift = bits - 4
    return ((i >> shift) & 0x07) | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
    bits, shift = i & 0x07, (i >> 3) - 1
    return bits if shift == -1 else (bits | 0x08) << shift


def lucene_length(n: int) -> int:
    """A document length as Lucene's norm byte gives it back."""
    if n < _FREE:
        return n
    return _FREE + _int4_to_long(_long_to_int4(n - _FREE))


class LuceneReference:
    """Lucene's BM25 scores over token lists, exact or with Lucene's quantized lengths."""

    def __init__(self, docs: list[list[str]], quantized: bool):
        self.n = len(docs)
        self.tf = [Counter(d) for d in docs]
        self.df = Counter(t for d in docs for t in set(d))
        self.avgdl = sum(len(d) for d in docs) / self.n  # Lucene: sumTotalTermFreq / docCount, exact
        lengths = [lucene_length(len(d)) if quantized else len(d) for d in docs]
        self.norm = np.array([K1 * (1 - B + B * dl / self.avgdl) for dl in lengths])
        self.postings = {t: [(i, tf[t]) for i, tf in enumerate(self.tf) if t in tf] for t in self.df}

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n)
        for term in query:  # a repeated query term counts again, as in Lucene's BooleanQuery of terms
            if term not in self.df:
                continue
            idf = math.log(1 + (self.n - self.df[term] + 0.5) / (self.df[term] + 0.5))
            for i, tf in self.postings[term]:
                out[i] += idf * tf / (tf + self.norm[i])
        return out


def ranked(scores: np.ndarray, k: int = RESULTS) -> list[int]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(i) for i in order if scores[i] > 0]


def measure(name: str, build, queries: list[list[str]]) -> tuple[dict, list[list[int]]]:
    started = time.perf_counter()
    score = build()
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    rankings = [ranked(np.asarray(score(q), dtype=float)) for q in queries]
    query_ms = 1000 * (time.perf_counter() - started) / len(queries)
    return {"engine": name, "index_build_s": round(build_s, 3), "query_ms": round(query_ms, 3)}, rankings


def agreement(rankings: list[list[int]], reference: list[list[int]], targets: list[int]) -> dict:
    top10 = [len(set(r[:10]) & set(f[:10])) / max(1, min(10, len(f))) for r, f in zip(rankings, reference)]
    top50 = [len(set(r) & set(f)) / max(1, len(f)) for r, f in zip(rankings, reference)]
    same10 = [r[:10] == f[:10] for r, f in zip(rankings, reference)]
    found = [t in r for r, t in zip(rankings, targets)]
    return {"top10_overlap": round(float(np.mean(top10)), 4), "top50_overlap": round(float(np.mean(top50)), 4),
            "top10_identical": round(float(np.mean(same10)), 4), "goal_in_top50": int(sum(found))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/webshop"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/webshop_search.json"))
    args = parser.parse_args()
    products = load_products(args.data, "1000")
    goals = synthetic_goals(products)[0][:500]
    analyze = Analyzer()
    docs = [analyze(product_text(p)) for p in products]
    asin_index = {p.asin: i for i, p in enumerate(products)}
    by_asin = {p.asin: p for p in products}
    query_sets = {
        "goal_instructions": [search_words(g) for g in goals],
        "product_queries": [by_asin[g.asin].query for g in goals],
    }
    targets = [asin_index[g.asin] for g in goals]

    def bm25s_engine():
        import bm25s

        model = bm25s.BM25(k1=K1, b=B, method="lucene")
        model.index(docs, show_progress=False)
        return model.get_scores

    def rank_bm25_engine():
        from rank_bm25 import BM25Okapi

        model = BM25Okapi(docs, k1=K1, b=B)
        return model.get_scores

    engines = {
        "lucene_formula_quantized": lambda: LuceneReference(docs, quantized=True).scores,
        "lucene_formula_exact": lambda: LuceneReference(docs, quantized=False).scores,
        "bm25s (method=lucene)": bm25s_engine,
        "rank-bm25 (BM25Okapi)": rank_bm25_engine,
    }
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
              "products": len(products), "queries_per_set": len(goals), "k1": K1, "b": B, "sets": {}}
    for set_name, texts in query_sets.items():
        queries = [analyze(t) for t in texts]
        results, rankings = [], {}
        for name, build in engines.items():
            row, rankings[name] = measure(name, build, queries)
            results.append(row)
        for row in results:
            for ref in ("lucene_formula_quantized", "lucene_formula_exact"):
                row[f"vs_{ref}"] = agreement(rankings[row["engine"]], rankings[ref], targets)
        report["sets"][set_name] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
