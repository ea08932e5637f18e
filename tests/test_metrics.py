"""Tests for the ranking metrics (MRR@k, nDCG@k, Recall@k, TREC run / qrels I/O).

The reference is trec_eval, through ir-measures (test-only dependency).  Two facts
about ir-measures 0.4.3 shape these tests:

* ir-measures, like our metrics and the official MS MARCO eval, counts a judged
  query missing from the run as 0, but it also averages in a query judged only
  grade 0 (as 0), which ours leave out.  The real-data comparisons assert first
  that each run covers every judged query; the real qrels hold no query judged
  only 0 (test_a_query_judged_only_zero_is_left_out shows the difference).
* ``RR@10`` has no trec_eval equivalent (trec_eval's ``recip_rank`` has no
  cutoff), so ir-measures' default pipeline computes ``RR(rel=2)@10`` with its
  ``msmarco`` provider, which breaks score ties by docno *ascending*, whereas
  trec_eval (and our ``rank``) break them by docno *descending*.  On the real runs
  no tie straddles a first relevant document, so the values agree; on the tie
  tests we compare with trec_eval itself (``ir_measures.pytrec_eval``).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msmarco.metrics import (evaluate_run, mrr_at_k, ndcg_at_k, rank, read_qrels, read_trec_run, recall_at_k, write_trec_run)  # noqa: E402

# The real DL 2020 judgments and BM25 run are bundled (data/sample, bytes unchanged); the other real runs (TAS-B,
# SPLADE++, ...) only where the source folder of the sample sits beside the repository, as in CI.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "msmarco-sample"
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "sample"
DL20_QRELS = BUNDLED / "2020qrels-pass.txt"
BM25_RUN = BUNDLED / "runs" / "bm25" / "dl2020.run"
# the source's other runs (its dl20.BM25.trec is the bundled run's bytes); each skips, saying so, where it is absent
RUN_FILES = [BM25_RUN, *(SHARED / "runs" / f"dl20.{name}.trec"
                         for name in ("BM25_RM3", "D_BERT_KD_TASB", "OPEN_AI_ADA2", "SPLADE_P_P_ENSEMBLE_DISTIL"))]
TOL = 1e-9


@pytest.fixture(scope="module")
def irm():
    import ir_measures  # requirements-dev.txt: a missing reference must fail the tests, not skip them

    return ir_measures


@pytest.fixture(scope="module")
def dl20_qrels():
    return read_qrels(DL20_QRELS)


def _our_values(run, qrels):
    return {
        "nDCG@10": ndcg_at_k(run, qrels, k=10),
        "RR(rel=2)@10": mrr_at_k(run, qrels, k=10, min_grade=2),
        "R(rel=2)@100": recall_at_k(run, qrels, k=100, min_grade=2),
        "R(rel=1)@100": recall_at_k(run, qrels, k=100, min_grade=1),
    }


def _their_values(irm, run, qrels):
    from ir_measures import R, RR, nDCG

    measures = {"nDCG@10": nDCG @ 10, "RR(rel=2)@10": RR(rel=2) @ 10,
                "R(rel=2)@100": R(rel=2) @ 100, "R(rel=1)@100": R(rel=1) @ 100}
    agg = irm.calc_aggregate(list(measures.values()), qrels, run)
    return {name: agg[m] for name, m in measures.items()}


# 1. + 2. Real TREC DL 2020 runs against ir-measures ---------------------------------------

def test_dl20_bm25_reference_figures(irm, dl20_qrels):
    from ir_measures import R, RR, nDCG

    run = read_trec_run(BM25_RUN)
    # 54 judged queries, all with a grade >= 2 doc, all in the run: ir-measures (which
    # skips queries absent from the run) and we average over the same 54 queries.
    assert len(dl20_qrels) == 54
    assert all(any(g >= 2 for g in docs.values()) for docs in dl20_qrels.values())
    assert set(dl20_qrels) <= set(run)
    assert len({m.query_id for m in irm.iter_calc([nDCG @ 10], dl20_qrels, run)}) == 54

    ndcg = ndcg_at_k(run, dl20_qrels, k=10)
    mrr = mrr_at_k(run, dl20_qrels, k=10, min_grade=2)
    recall = recall_at_k(run, dl20_qrels, k=100, min_grade=2)
    assert round(ndcg, 4) == 0.4796
    assert round(mrr, 4) == 0.6533

    agg = irm.calc_aggregate([nDCG @ 10, RR(rel=2) @ 10, R(rel=2) @ 100], dl20_qrels, run)
    assert ndcg == pytest.approx(agg[nDCG @ 10], abs=TOL)
    assert mrr == pytest.approx(agg[RR(rel=2) @ 10], abs=TOL)
    assert recall == pytest.approx(agg[R(rel=2) @ 100], abs=TOL)

    assert evaluate_run(run, dl20_qrels, min_grade=2, recall_ks=(100,)) == {
        "MRR@10": mrr, "nDCG@10": ndcg, "R@100": recall}


@pytest.mark.parametrize("run_file", RUN_FILES, ids=lambda p: p.stem)
def test_dl20_runs_agree_with_ir_measures(irm, dl20_qrels, run_file):
    if not run_file.exists():
        pytest.skip(f"{run_file} is not here: the source folder of the sample sits beside the repository in CI only")
    run = read_trec_run(run_file)
    assert set(dl20_qrels) <= set(run), "run must cover every judged query (see module docstring)"
    ours, theirs = _our_values(run, dl20_qrels), _their_values(irm, run, dl20_qrels)
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=TOL), name


# 3. Ties -----------------------------------------------------------------------------------

def _tie_run_and_qrels():
    """Deterministic run full of score ties (3 score values over 40 docs per query)."""
    import random

    rng = random.Random(13)
    run, qrels = {}, {}
    for q in range(60):
        qid = f"q{q}"
        pids = list(dict.fromkeys(str(rng.randrange(1, 3000)) for _ in range(70)))[:60]
        run[qid] = {pid: float(rng.choice([1, 2, 3])) for pid in pids[:40]}
        qrels[qid] = {pid: rng.choice([0, 0, 1, 2, 3]) for pid in pids[15:] + pids[:5]}
        qrels[qid][pids[0]] = 2  # every query has a relevant doc at both levels
    return run, qrels


def _assert_agrees_with_trec_eval(irm, run, qrels):
    """Compare with trec_eval itself (pytrec_eval), including RR@10 with ties."""
    from ir_measures import R, RR, nDCG

    pte = irm.pytrec_eval
    for k in (5, 10, 20):
        assert ndcg_at_k(run, qrels, k) == pytest.approx(pte.calc_aggregate([nDCG @ k], qrels, run)[nDCG @ k], abs=TOL)
    for rel in (1, 2):
        for k in (5, 20, 100):
            expected = pte.calc_aggregate([R(rel=rel) @ k], qrels, run)[R(rel=rel) @ k]
            assert recall_at_k(run, qrels, k, min_grade=rel) == pytest.approx(expected, abs=TOL)
        # trec_eval's recip_rank has no cutoff: RR@k = RR if the first hit is within k, else 0.
        full_rr = {m.query_id: m.value for m in pte.iter_calc([RR(rel=rel)], qrels, run)}
        assert mrr_at_k(run, qrels, k=10**9, min_grade=rel) == pytest.approx(
            sum(full_rr.values()) / len(full_rr), abs=TOL)
        for k in (1, 3, 10):
            expected = sum(v if v >= 1.0 / k - 1e-12 else 0.0 for v in full_rr.values()) / len(full_rr)
            assert mrr_at_k(run, qrels, k=k, min_grade=rel) == pytest.approx(expected, abs=TOL)


def test_ties_agree_with_trec_eval(irm):
    run, qrels = _tie_run_and_qrels()
    _assert_agrees_with_trec_eval(irm, run, qrels)
    # ir-measures' default pipeline agrees wherever trec_eval computes the measure.
    from ir_measures import R, nDCG

    agg = irm.calc_aggregate([nDCG @ 10, R(rel=2) @ 20], qrels, run)
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(agg[nDCG @ 10], abs=TOL)
    assert recall_at_k(run, qrels, 20, min_grade=2) == pytest.approx(agg[R(rel=2) @ 20], abs=TOL)


def test_real_run_with_rounded_scores_agrees_with_trec_eval(irm, dl20_qrels):
    """Real BM25 scores rounded to one decimal: many ties, at every depth."""
    run = read_trec_run(BM25_RUN)
    rounded = {qid: {pid: round(s, 1) for pid, s in docs.items()} for qid, docs in run.items()}
    n_scores = sum(len(set(docs.values())) for docs in rounded.values())
    assert n_scores < sum(len(docs) for docs in rounded.values()) / 2  # really full of ties
    _assert_agrees_with_trec_eval(irm, rounded, dl20_qrels)


def test_tie_break_is_docno_descending(irm):
    from ir_measures import RR

    assert rank({"a": 1.0, "b": 1.0, "c": 2.0}) == ["c", "b", "a"]
    assert rank({"9": 0.5, "10": 0.5, "100": 0.5}) == ["9", "100", "10"]  # strings, not numbers
    assert rank({"a": 1.0, "b": 1.0, "c": 2.0}, k=2) == ["c", "b"]
    run, qrels = {"q": {"a": 1.0, "b": 1.0}}, {"q": {"a": 1}}
    assert mrr_at_k(run, qrels, k=10) == 0.5
    assert irm.pytrec_eval.calc_aggregate([RR], qrels, run)[RR] == 0.5  # trec_eval: b first
    # ir-measures' msmarco provider (its default for RR@k) breaks ties the other way:
    assert irm.calc_aggregate([RR @ 10], qrels, run)[RR @ 10] == 1.0


# 4. Hand-made cases ------------------------------------------------------------------------

def test_query_missing_from_run_counts_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2}}
    run = {"q1": {"d1": 3.0, "x": 1.0}}  # q2 absent
    assert mrr_at_k(run, qrels, k=10) == 0.5
    assert ndcg_at_k(run, qrels, k=10) == 0.5
    assert recall_at_k(run, qrels, k=100) == 0.5
    assert evaluate_run(run, qrels, recall_ks=(100,)) == {"MRR@10": 0.5, "nDCG@10": 0.5, "R@100": 0.5}
    assert mrr_at_k({}, qrels) == 0.0


def test_query_without_relevant_doc_is_excluded():
    run = {"q1": {"d1": 3.0}, "q2": {"d2": 3.0}, "q3": {"d3": 1.0}}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 0, "d9": 0}, "q3": {"d3": 1, "d4": 2}}
    assert mrr_at_k(run, qrels, min_grade=1) == 1.0  # q2 excluded, not 0
    assert recall_at_k(run, qrels, min_grade=1) == pytest.approx((1 + 0.5) / 2)  # q1: 1/1, q3: 1/2
    assert ndcg_at_k({"q1": {"d1": 3.0}, "q2": {"d2": 3.0}}, qrels) == 0.5  # q1: 1, q3 (absent): 0, q2 excluded
    # min_grade=2: only q3 has a relevant doc (d4, not retrieved)
    assert mrr_at_k(run, qrels, min_grade=2) == 0.0
    assert recall_at_k(run, qrels, min_grade=2) == 0.0
    assert mrr_at_k(run, {"q2": {"d2": 0}}) == 0.0  # nothing judged relevant at all


def test_a_query_judged_only_zero_is_left_out(irm):
    """A judged query missing from the run scores 0 here as in ir-measures; a query judged only grade 0 is left out
    here, where ir-measures averages it in as 0: without it the two agree."""
    from ir_measures import RR, nDCG

    qrels = {"1": {"a": 2}, "3": {"p": 0}, "4": {"m": 2}}  # 4 is missing from the run, 3 is judged only 0
    run = {"1": {"a": 1.0}, "3": {"p": 1.0}}
    measures = [RR(rel=2) @ 10, nDCG @ 10]
    ours = evaluate_run(run, qrels, min_grade=2, recall_ks=())
    assert ours == {"MRR@10": 0.5, "nDCG@10": 0.5}
    assert irm.pytrec_eval.calc_aggregate(measures, qrels, run) == pytest.approx({m: 1 / 3 for m in measures})
    without = irm.pytrec_eval.calc_aggregate(measures, {q: j for q, j in qrels.items() if q != "3"}, run)
    assert ours == pytest.approx({"MRR@10": without[RR(rel=2) @ 10], "nDCG@10": without[nDCG @ 10]}, abs=TOL)


def test_judged_query_without_a_grade_2_doc_counts_zero_as_in_trec_eval(irm):
    """TREC DL's MRR and recall (grade >= 2) over every judged query: one judged only 1 and 0 scores 0 there, as
    under trec_eval -l 2, rather than leaving the mean (which would lift it)."""
    from ir_measures import R, RR, nDCG

    qrels = {"1": {"a": 2}, "2": {"b": 1, "c": 0}}
    run = {"1": {"a": 1.0}, "2": {"b": 1.0}}
    agg = irm.pytrec_eval.calc_aggregate([RR(rel=2) @ 10, R(rel=2) @ 100, nDCG @ 10], qrels, run)
    assert mrr_at_k(run, qrels, min_grade=2) == pytest.approx(agg[RR(rel=2) @ 10], abs=TOL) == 0.5
    assert recall_at_k(run, qrels, k=100, min_grade=2) == pytest.approx(agg[R(rel=2) @ 100], abs=TOL) == 0.5
    assert evaluate_run(run, qrels, min_grade=2, recall_ks=(100,)) == pytest.approx(
        {"MRR@10": 0.5, "nDCG@10": agg[nDCG @ 10], "R@100": 0.5})


def test_mrr_cutoff():
    docs = {f"d{i:02d}": 100.0 - i for i in range(1, 21)}  # d01 at rank 1 ... d20 at rank 20
    run, qrels = {"q": docs}, {"q": {"d11": 1}}
    assert rank(docs, 11)[-1] == "d11"
    assert mrr_at_k(run, qrels, k=10) == 0.0
    assert mrr_at_k(run, qrels, k=11) == pytest.approx(1 / 11)
    assert mrr_at_k(run, {"q": {"d11": 1, "d05": 0, "d07": 2}}, k=10, min_grade=2) == pytest.approx(1 / 7)


def test_recall_half():
    run = {"q": {"a": 2.0, "b": 1.0}}
    qrels = {"q": {"a": 1, "z": 3, "b": 0}}
    assert recall_at_k(run, qrels, k=100) == 0.5
    assert recall_at_k(run, qrels, k=100, min_grade=2) == 0.0
    assert recall_at_k({"q": {"b": 2.0, "a": 1.0}}, qrels, k=1) == 0.0


def test_ndcg_by_hand():
    import math

    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"a": 1, "b": 0, "c": 3, "d": 2, "e": -1}}
    dcg = 1 / math.log2(2) + 0 + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)  # all judged grades, negatives as 0
    assert ndcg_at_k(run, qrels, k=10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(run, qrels, k=1) == pytest.approx(1 / 3)


# 5. I/O ------------------------------------------------------------------------------------

def test_trec_run_round_trip(tmp_path):
    run = {
        "q2": {"p1": 0.1, "p2": 1 / 3, "p10": 1 / 3, "p9": -2.5e-7, "p3": 12345.678901234567},
        "q1": {"x": 1.0},
    }
    path = tmp_path / "sub" / "run.trec"
    write_trec_run(run, path, tag="my-run")
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["q2", "Q0", "p3", "1", repr(12345.678901234567), "my-run"]
    assert [line.split()[3] for line in lines[:5]] == ["1", "2", "3", "4", "5"]
    back = read_trec_run(path)
    assert back == run  # same floats, bit for bit
    assert list(back) == list(run)
    for qid in run:
        assert rank(back[qid]) == rank(run[qid])
        assert [line.split()[2] for line in lines if line.split()[0] == qid] == rank(run[qid])

    write_trec_run(run, path, tag="top2", k=2)
    back = read_trec_run(path)
    assert back["q2"] == {"p3": run["q2"]["p3"], "p2": 1 / 3}
    with pytest.raises(ValueError):
        write_trec_run(run, path, tag="bad tag")


def test_read_trec_run_ignores_rank_column(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q Q0 a 1 0.5 t\nq Q0 b 2 0.9 t\n\n")
    assert rank(read_trec_run(path)["q"]) == ["b", "a"]
    path.write_text("q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_trec_run(path)


def test_read_qrels_tab_and_space(tmp_path):
    expected = {"1": {"7": 1, "8": 0}, "2": {"9": 3}}
    tab = tmp_path / "qrels.tsv"
    tab.write_text("1\t0\t7\t1\n1\t0\t8\t0\n2\t0\t9\t3\n")  # MS MARCO style
    space = tmp_path / "qrels.txt"
    space.write_text("1 0 7 1\n1 0 8 0\n\n2 Q0 9 3\n")  # TREC style
    assert read_qrels(tab) == expected
    assert read_qrels(space) == expected
    assert all(isinstance(g, int) for docs in read_qrels(tab).values() for g in docs.values())


def test_read_real_qrels(dl20_qrels):
    assert sum(len(d) for d in dl20_qrels.values()) == 11386
    assert {g for d in dl20_qrels.values() for g in d.values()} == {0, 1, 2, 3}
