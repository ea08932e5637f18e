"""BM25 over the official candidate files (msmarco/bm25.py), which list each query's candidates in no order: the
words, the stemmer, the word matching, the score, and the run on the sample against Lucene's own BM25 scores of the
same candidates (tests/data/lucene-bm25-sample.tsv, written by scripts/lucene_bm25/make_reference.sh) and Anserini's
runs."""
import dataclasses
import math
import shutil
from collections import Counter

import pytest

from conftest import ROOT, SAMPLE
from msmarco import bm25, metrics
from msmarco.data import MSMarco
from msmarco.evaluation import candidate_order_run, load_rerank_set


# Each line's terms as Lucene 9's analysis gives them (StandardTokenizer, EnglishPossessiveFilter, LowerCaseFilter,
# the stop words, EnglishMinimalStemFilter): `java LuceneBM25 words` of scripts/lucene_bm25/, run on these lines.
LUCENE_TERMS = [
    ("The hygienist’s salary in the U.S. is $70,000.", "hygienist salary u. 70,000"),
    ("what is reba mcentire's net worth", "what reba mcentire net worth"),
    ("don't 2½ km² 黒木 su²x ___ a_b ®™ Никола́й thread.sleep end.The a.1 3.5 v1.2 it's ITS",
     "don't 2 km 黒 木 su x a_b ® ™ никола́й thread.sleep end.the 1 3.5 v1.2 it"),
    ("tx\u200fverified \u200evice e.g. 1;2 a:b 3:4 a,b boxes cities", "tx\u200fverified vice e.g 1;2 a:b 3 4 b boxe city"),
]


@pytest.mark.parametrize("text, terms", LUCENE_TERMS)
def test_terms_are_lucenes(text, terms):
    """Words as Lucene's StandardTokenizer cuts them (joined across . ' , : between letters or digits, a possessive
    's dropped, fractions and superscripts not part of a number, one word per Han ideograph)."""
    stems = [bm25.minimal_stem(w.decode()) for w in bm25.words(text.encode()) if w not in bm25.STOP_WORDS]
    assert " ".join(stems) == terms
    assert list(bm25.query_terms(text).elements()) == sorted(terms.split(), key=terms.split().index)


def test_the_fast_path_cuts_the_sample_as_the_regular_expression_does():
    coll = MSMarco(SAMPLE).collection()
    for row in range(len(coll)):
        assert bm25.words(coll.bytes_at(row)) == [w.encode() for w in bm25.unicode_words(coll.text_at(row))], row


@pytest.mark.parametrize("n, stored", [(0, 0), (23, 23), (24, 24), (31, 31), (40, 40), (41, 40), (59, 56), (100, 96),
                                       (150, 144)])
def test_lengths_are_scored_as_lucene_stores_them(n, stored):
    """SmallFloat.byte4ToInt(SmallFloat.intToByte4(n)) in Lucene 9 (its norms keep a length in one byte)."""
    assert bm25.lucene_length(n) == stored


@pytest.mark.parametrize("word, stem", [("dogs", "dog"), ("cities", "city"), ("boxes", "boxe"), ("glass", "glass"),
                                        ("bus", "bus"), ("shoes", "shoes"), ("goes", "goes"), ("as", "as"),
                                        ("cost", "cost"), ("days", "day"), ("keys", "key"), ("plays", "play")])
def test_minimal_stem(word, stem):
    assert bm25.minimal_stem(word) == stem


def test_surface_forms_are_the_words_that_stem_to_a_query_term():
    """The collection is matched by a dict of surface forms instead of stemming every word: the same matches."""
    coll = MSMarco(SAMPLE).collection()
    words = {w.decode() for row in range(0, len(coll), 7) for w in bm25.words(coll.bytes_at(row))
             if w not in bm25.STOP_WORDS}  # a stop word is dropped before stemming: no match (the test below)
    stems = {bm25.minimal_stem(w) for w in sorted(words)[::50]}
    forms = bm25.surface_forms(stems)
    assert len(words) > 10_000 and len(stems) > 200
    for w in words:
        assert (w.encode() in forms) == (bm25.minimal_stem(w) in stems), w
        if w.encode() in forms:
            assert forms[w.encode()] == bm25.minimal_stem(w)


def test_a_stop_word_is_never_a_match():
    """Lucene drops stop words before stemming: "its" in a query stems to "it", which matches "its" in a passage
    but not its stop word "it"."""
    forms = bm25.surface_forms(bm25.query_terms("what is its purpose"))
    assert b"its" in forms and b"it" not in forms
    assert bm25.doc_terms(b"It is big. It was its own.", forms) == (3, ["it"])  # big, its, own


def test_score_by_hand():
    df, n, mean = {"dog": 10, "walk": 100}, 1000, 8.0
    query = bm25.query_terms("How to walk the dogs?")  # "how", "walk", "dog": "to" and "the" are stop words
    assert query == Counter({"how": 1, "walk": 1, "dog": 1})
    length, matched = bm25.doc_terms(b"The dog walks a dog, in the park.", bm25.surface_forms(query))
    assert length == 4 and sorted(matched) == ["dog", "dog", "walk"]  # "the" twice, "a", "in" dropped; "park" no term
    norm = 0.9 * (1 - 0.4 + 0.4 * 4 / mean)
    idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
    expected = idf["dog"] * 2 / (2 + norm) + idf["walk"] * 1 / (1 + norm)
    assert bm25.score(query, length, matched, {**df, "how": 5}, n, mean) == pytest.approx(expected)


def lucene_scores(split: str) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for line in (ROOT / "tests" / "data" / "lucene-bm25-sample.tsv").read_text().splitlines():
        s, q, p, score = line.split("\t")
        if s == split:
            run.setdefault(q, {})[p] = float(score)
    return run


@pytest.mark.parametrize("split, depth, metric, anserini", [("dev", 20, "MRR@10", 0.334),
                                                            ("dl2020", 100, "nDCG@10", 0.480)])
def test_the_sample_ranked_by_bm25_is_lucenes_ranking(copy, split, depth, metric, anserini):
    """Every judged query with candidates is ranked, each with all its candidates, as Lucene ranks them: the same
    scores (Lucene adds in float32) and the same top 10 for every query. Anserini's runs of the same candidates
    score 0.334 and 0.480 (they stem with Porter's stemmer and count over the whole collection); the candidate
    file's own order 0.127 and 0.164."""
    data = MSMarco(copy)
    path = data.bm25_run(split)
    run, lucene = metrics.read_trec_run(path), lucene_scores(split)
    cands = data.dev_candidates() if split == "dev" else data.trec_dl_candidates(2020)
    qrels = data.qrels("dev") if split == "dev" else data.trec_dl_topics(2020)[1]
    judged = {q for q, j in qrels.items() if any(g > 0 for g in j.values()) and q in cands}
    assert {int(q) for q in run} == judged and set(run) == set(lucene)
    for q in judged:
        assert sorted(map(int, run[str(q)])) == sorted(cands[q].tolist())
        assert metrics.rank(run[str(q)], 10) == metrics.rank(lucene[str(q)], 10), q
        for p, score in run[str(q)].items():
            assert score == pytest.approx(lucene[str(q)][p], rel=1e-3, abs=1e-5), (q, p)
    rs = load_rerank_set(data, split, None, depth, str(path))
    ours = metrics.evaluate_run(candidate_order_run(rs), rs.qrels, min_grade=rs.min_grade, recall_ks=())[metric]
    theirs = metrics.evaluate_run(lucene, metrics.str_qrels(qrels), min_grade=rs.min_grade, recall_ks=())[metric]
    assert ours == pytest.approx(theirs, abs=1e-4) and abs(ours - anserini) < 0.03
    built = path.stat().st_mtime_ns
    assert MSMarco(copy).bm25_run(split) == path and path.stat().st_mtime_ns == built  # a store: built once


def test_without_a_run_the_scripts_rerank_bm25s_top_of_the_candidate_files(copy):
    """A data folder without runs/bm25 (the full downloads): the evaluation sets take BM25's top eval_candidates of
    the official candidate files, not an arbitrary prefix of them; eval_candidates 0 keeps all, unranked."""
    from test_scripts import tiny_config
    shutil.rmtree(copy / "runs")
    mod, cfg = tiny_config("train_cross-encoder-v1", copy / "out", f"--data_dir={copy}", "--eval_candidates=5",
                           "--report_splits=dl2020")
    tune, reports = mod.evaluation_sets(MSMarco(copy), cfg)
    for rs in [tune, *reports]:
        assert rs.ranked and "BM25 of the" in rs.first_stage and "top 5" in rs.first_stage
        run = metrics.read_trec_run(MSMarco(copy).bm25_run(rs.name.split("-")[0]))
        for q, pids in zip(rs.qids, rs.candidates):
            assert [str(p) for p in pids] == metrics.rank(run[str(q)], 5)
    every = mod.evaluation_sets(MSMarco(copy), dataclasses.replace(cfg, eval_candidates=0))[0]
    assert not every.ranked and "all of each query's candidates" in every.first_stage
