"""A BM25 ranking of an official candidate file (top1000.dev, the TREC DL top-1000s), which lists each query's
candidates in no particular order, so that the training scripts' evaluation reranks a real BM25 top-k at full scale
as it does on the sample (whose data folder bundles Anserini's BM25 runs in runs/bm25/); without it each dev-tune
evaluation reranked all ~1,000 candidates of 500 queries: 480k pairs, against 160k trained between two (v1).

Lucene's BM25 with the parameters of Anserini's MS MARCO passage baseline (k1 0.9, b 0.4), its analysis up to the
stemmer (StandardTokenizer's words, a possessive 's dropped, lowercased, Lucene's English stop words dropped) and
Lucene's EnglishMinimalStemmer where Anserini stems with Porter's. Lengths are scored as Lucene stores them, in one
byte. On the sample it gives Lucene's own scores of the same candidates (to float32's rounding) and the same top 10
for every query (tests/test_bm25.py, against tests/data/lucene-bm25-sample.tsv from scripts/lucene_bm25/): dev
MRR@10 0.307 against Anserini's run's 0.334 (BM25's top 20 of 100 queries), DL 2020 nDCG@10 0.480 against 0.480
(top 100); Anserini counts over the whole 8.8M passages and stems with Porter. Document frequencies and the mean
document length come from one pass over the whole collection, counted only for the terms of the split's judged
queries; then each candidate is read once more. On one core: 55 s for 884k synthetic passages and 658k candidates
(benchmarks/README.md), so about 7 minutes for dev-small and 3 for a TREC DL year at full size, once.
MSMarco.bm25_run keeps the run as a store of the data folder, built once per setting:
`<data_dir>/.prepared/bm25-<split>-<setting>/<split>.run`, a TREC run."""
from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from pathlib import Path

from .metrics import write_trec_run
from .stores import release_pages

K1, B = 0.9, 0.4
# Lucene's EnglishAnalyzer stop words (the ones Anserini drops by default)
STOP_WORDS = frozenset(b"a an and are as at be but by for if in into is it no not of on or such that the their then "
                       b"there these they this to was will with".split())


def _class(*categories: str) -> str:
    """A regular-expression character class of the Basic Multilingual Plane's characters in the Unicode categories
    (or their first letters: "L" is every letter), less Han ideographs, hiragana and the zero-width space (which
    breaks words where other format characters do not): one class, so that a run of them is matched as fast as
    ASCII's [a-z]+ (Python's re has no \\p{...})."""
    spans, start = [], None
    for c in range(0x10001):
        cat = unicodedata.category(chr(c)) if c < 0x10000 else ""
        inside = (cat in categories or cat[:1] in categories) and not _SINGLE.match(chr(c)) and c != 0x200B
        if inside and start is None:
            start = c
        elif not inside and start is not None:
            spans.append(f"\\u{start:04x}-\\u{c - 1:04x}")
            start = None
    return "[" + "".join(spans) + "]"


# Lucene's StandardTokenizer (Unicode word boundaries, UAX #29), for what MS MARCO holds. A word is a run of
# letters, combining marks, format characters, decimal digits and _ (not fractions or superscripts: 2½ -> 2,
# km² -> km), joined across . ' and its curly form between two letters or two digits (don't, u.s, 3.5), : and the
# middle dot between letters, , and ; between digits (70,000). Each Han ideograph and hiragana is a word of its own,
# and so are © ® ™.
_SINGLE = re.compile("[\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u00a9\u00ae\u2122]")


@functools.cache
def _word() -> re.Pattern:
    """The word pattern, built on first use (its classes take ~0.1 s: not at every script's import)."""
    letter, alnum = _class("L", "M", "Cf"), _class("L", "M", "Cf", "Nd", "Nl", "Pc")  # Cf: a format character
    start = _class("L", "Nd", "Nl", "Pc")  # a mark or format character after a break belongs to no word
    join = f"(?<={letter})[.'\u2019:\u00b7](?={letter})|(?<=\\d)[.'\u2019,;](?=\\d)"
    return re.compile(f"{start}{alnum}*(?:(?:{join}){alnum}+)*|{_SINGLE.pattern}")
_POSSESSIVE = ("'s", "\u2019s", "\uff07s")  # what EnglishPossessiveFilter strips from a word's end
_JOINERS = b".':,;"  # the ASCII characters that can join two runs into one word
_BREAKS = bytes(c for c in string.punctuation.encode() if c not in _JOINERS + b"_")  # all other ASCII punctuation
_TO_SPACE = bytes.maketrans(_BREAKS, b" " * len(_BREAKS))
TAG = "bm25-candidates"
VERSION = 2  # of the ranking: part of its store's name, with K1 and B, so a change builds a new one


def unicode_words(text: str) -> list[str]:
    """Lucene's analysis before its stop words and stemmer: StandardTokenizer's words, less a possessive 's
    (EnglishPossessiveFilter), lowercased (LowerCaseFilter)."""
    return [w[:-2] if w.endswith(_POSSESSIVE) else w for w in _word().findall(text.lower()) if w.strip("_")]


def words(text: bytes) -> list[bytes]:
    """unicode_words of UTF-8 text, 2x as fast: the text is cut at white space and the ASCII punctuation that always
    ends a word, and only a piece that is not then plain ASCII letters and digits goes through the regular
    expression (16 against 33 us a passage on the sample, 4 with the bytes split alone; the same words)."""
    out = []
    for piece in text.lower().translate(_TO_SPACE).split():
        piece = piece.strip(_JOINERS)  # a joiner at either end joins nothing
        if piece.isalnum():  # bytes.isalnum: ASCII letters and digits only
            out.append(piece)
        elif piece:
            out += [w.encode() for w in unicode_words(piece.decode("utf-8", "replace"))]
    return out


def lucene_length(n: int) -> int:
    """A document's length as Lucene scores it: stored in one byte (SmallFloat.intToByte4), exact up to 31 terms,
    then keeping 4 significant bits of n - 24 (41 -> 40, 100 -> 96)."""
    m = n - 24
    if m < 8:
        return n
    shift = m.bit_length() - 4
    return 24 + (m >> shift << shift)


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
    return Counter(minimal_stem(w.decode()) for w in words(text.encode()) if w not in STOP_WORDS)


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
    """Lucene's BM25 of one document for a bag of query terms: its length as Lucene stores it, the mean exact."""
    tf, norm = Counter(matched), K1 * (1 - B + B * lucene_length(length) / mean_len)
    return sum(q * math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] / (tf[t] + norm)
               for t, q in query.items() if tf[t])


def write_run(path: Path, queries, qrels: dict[int, dict[int, int]], candidates, collection) -> dict:
    """Rank the candidates of every judged query (a grade > 0) that has some by BM25 and write them as a TREC run."""
    qids = [q for q in sorted(qrels) if any(g > 0 for g in qrels[q].values()) and q in candidates]
    bags = {q: query_terms(t) for q, t in zip(qids, queries.get_many(qids))}
    forms = surface_forms(set().union(*bags.values()))
    df, total, n_docs = dict.fromkeys(forms.values(), 0), 0, 0
    for row in range(len(collection)):  # one pass: the document frequencies of the query terms and the mean length
        length, matched = doc_terms(collection.bytes_at(row), forms)
        total, n_docs = total + length, n_docs + (length > 0)  # Lucene counts the documents with a term
        for t in set(matched):
            df[t] += 1
        if row % 100_000 == 99_999:  # the text read so far leaves the resident set (3 GB at full size otherwise)
            release_pages(collection)
    mean_len = max(total / max(n_docs, 1), 1.0)

    def ranked():  # one query at a time: the whole dev run as Python dicts would take ~700 MB
        for i, q in enumerate(qids):
            pids = candidates[q]
            yield str(q), {str(p): score(bags[q], *doc_terms(collection.bytes_at(int(r)), forms), df, n_docs, mean_len)
                           for p, r in zip(pids.tolist(), collection.rows_of(pids))}
            if i % 5 == 4:  # ~5k random reads, each faulting in 64 KB around it: < 320 MB of pages
                release_pages(collection)
    write_trec_run(ranked(), path, TAG)
    return {"queries": len(qids), "passages": n_docs, "mean_terms": round(mean_len, 2)}
