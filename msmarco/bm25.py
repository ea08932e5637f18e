"""A BM25 ranking of an official candidate file (top1000.dev, the TREC DL top-1000s), which lists each query's
candidates in no particular order, so that the training scripts' evaluation reranks a real BM25 top-k at full scale
as it does on the sample (whose data folder bundles Anserini's BM25 runs in runs/bm25/); without it each dev-tune
evaluation reranked all ~1,000 candidates of 500 queries: 480k pairs, against 160k trained between two (v1).

Lucene's BM25 with the parameters of Anserini's MS MARCO passage baseline (k1 0.9, b 0.4) over lowercased words
less Lucene's English stop words, plurals stemmed (Anserini stems with Porter's stemmer). On the sample it ranks
a little below Anserini's runs: dev MRR@10 0.295 against 0.334 (BM25's top 20 of 100 queries), DL 2020 nDCG@10
0.476 against 0.480 (top 100). Document frequencies and the mean document length come from one pass over the whole
collection, counted only for the terms of the split's judged queries; then each candidate is read once more. On one
core: 46 s for 884k synthetic passages and 658k candidates (benchmarks/README.md), so about 5 minutes for dev-small
and 2 for a TREC DL year at full size, once.
MSMarco.bm25_run keeps the run as a store of the data folder, built once per setting:
`<data_dir>/.prepared/bm25-<split>-<setting>/<split>.run`, a TREC run."""
from __future__ import annotations

import math
import string
from collections import Counter
from pathlib import Path

from .metrics import write_trec_run
from .stores import release_pages

K1, B = 0.9, 0.4
# Lucene's EnglishAnalyzer stop words (the ones Anserini drops by default)
STOP_WORDS = frozenset(b"a an and are as at be but by for if in into is it no not of on or such that the their then "
                       b"there these they this to was will with".split())
_PUNCTUATION = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
TAG = "bm25-candidates"
VERSION = 1  # of the ranking: part of its store's name, with K1 and B, so a change builds a new one


def words(text: bytes) -> list[bytes]:
    """Lowercased words of UTF-8 text, split at white space and ASCII punctuation: bytes operations only, 2.4x the
    speed of a regular expression over decoded text (9 against 22 us a passage on the development machine)."""
    return text.lower().translate(_PUNCTUATION).split()


def minimal_stem(word: str) -> str:
    """English plurals to singular, as Lucene's EnglishMinimalStemmer (an S-stemmer): dogs -> dog, cities -> city,
    boxes -> boxe; kept: glass, bus, shoes' -oes and the like."""
    n = len(word)
    if n < 3 or word[-1] != "s" or word[-2] in "us":
        return word
    if word[-2] == "e":
        if n > 3 and word[-3] == "i" and word[-4] not in "ae":
            return word[:-3] + "y"
        if word[-3] in "iaoe":
            return word
    return word[:-1]


def query_terms(text: str) -> Counter:
    """The stemmed terms of a query, with their counts (a repeated term counts again, as in Lucene)."""
    return Counter(minimal_stem(w.decode("utf-8", "replace")) for w in words(text.encode()) if w not in STOP_WORDS)


def surface_forms(stems) -> dict[bytes, str]:
    """Every word that stems to one of `stems`, mapped to it: a document's words are then matched by a dict lookup
    each, with no stemming of the collection's millions of distinct words (an S-stemmer only strips an s)."""
    forms = ((form, stem) for stem in stems
             for form in (stem, stem + "s", stem[:-1] + "ies" if stem[-1:] == "y" else ""))
    return {form.encode(): stem for form, stem in forms
            if form and form.encode() not in STOP_WORDS and minimal_stem(form) == stem}  # its -> it, but not it


def doc_terms(text: bytes, forms: dict[bytes, str]) -> tuple[int, list[str]]:
    """(the document's length in terms, less stop words; its words that are query terms, as stems)"""
    ws = words(text)
    return len(ws) - sum(map(STOP_WORDS.__contains__, ws)), [forms[w] for w in ws if w in forms]


def score(query: Counter, length: int, matched: list[str], df: dict[str, int], n_docs: int, mean_len: float) -> float:
    """Lucene's BM25 of one document for a bag of query terms."""
    tf, norm = Counter(matched), K1 * (1 - B + B * length / mean_len)
    return sum(q * math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] / (tf[t] + norm)
               for t, q in query.items() if tf[t])


def write_run(path: Path, queries, qrels: dict[int, dict[int, int]], candidates, collection) -> dict:
    """Rank the candidates of every judged query (a grade > 0) that has some by BM25 and write them as a TREC run."""
    qids = [q for q in sorted(qrels) if any(g > 0 for g in qrels[q].values()) and q in candidates]
    bags = {q: query_terms(t) for q, t in zip(qids, queries.get_many(qids))}
    forms = surface_forms(set().union(*bags.values()))
    df, total = dict.fromkeys(forms.values(), 0), 0
    for row in range(len(collection)):  # one pass: the document frequencies of the query terms and the mean length
        length, matched = doc_terms(collection.bytes_at(row), forms)
        total += length
        for t in set(matched):
            df[t] += 1
        if row % 100_000 == 99_999:  # the text read so far leaves the resident set (3 GB at full size otherwise)
            release_pages(collection)
    n_docs, mean_len = len(collection), max(total / max(len(collection), 1), 1.0)

    def ranked():  # one query at a time: the whole dev run as Python dicts would take ~700 MB
        for i, q in enumerate(qids):
            pids = candidates[q]
            yield str(q), {str(p): score(bags[q], *doc_terms(collection.bytes_at(int(r)), forms), df, n_docs, mean_len)
                           for p, r in zip(pids.tolist(), collection.rows_of(pids))}
            if i % 5 == 4:  # ~5k random reads, each faulting in 64 KB around it: < 320 MB of pages
                release_pages(collection)
    write_trec_run(ranked(), path, TAG)
    return {"queries": len(qids), "passages": n_docs, "mean_terms": round(mean_len, 2)}
