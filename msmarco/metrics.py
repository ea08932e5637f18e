"""Ranking metrics for MS MARCO / TREC Deep Learning runs, and TREC run files.

Written to reproduce ``trec_eval`` / ``ir-measures`` exactly (checked to 1e-9 against
ir-measures 0.4.3 + pytrec_eval in ``tests/test_metrics.py``).

Data model
----------
``Run``   : ``{qid: {pid: score}}`` -- higher score means better.
``Qrels`` : ``{qid: {pid: grade}}`` -- integer relevance grades (TREC DL: 0..3).

Ranking order
-------------
Documents are ordered by score descending; ties are broken like trec_eval,
i.e. by docno *descending* as strings (``"9" > "10"``, ``"b" > "a"``).  The
original rank column of a TREC run file is ignored, exactly as trec_eval does.

Which queries count
-------------------
Every mean is taken over the queries of ``qrels`` that have at least one
document of grade > 0; for MRR and recall at ``min_grade`` 2 (TREC DL) a query
of that set with no document of grade >= 2 scores 0, as under trec_eval -l 2.
A query of that set that is missing from the run scores 0.  This follows the official
MS MARCO evaluation script, which divides by the number of judged queries, and
ir-measures 0.4.3 does the same.  Unlike ir-measures, a query judged only grade 0
is left out (ir-measures averages it in as a 0): the official sets hold none (the
dev qrels are all grade 1, each of DL 2020's 54 judged queries has a grade >= 2),
so there the two agree.  Queries that appear only in the run are ignored.
"""
from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from . import formats
from .errors import DataError

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

__all__ = [
    "Run",
    "Qrels",
    "rank",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "evaluate_run",
    "read_trec_run",
    "write_trec_run",
    "read_qrels",
]


def _order_key(item: tuple[str, float]) -> tuple[float, str]:
    pid, score = item
    return (score, pid)


def rank(run_for_query: dict[str, float], k: int | None = None) -> list[str]:
    """Doc ids of one query, best first (score desc, ties: docno desc), cut at ``k``.

    ``k=None`` returns the whole ranking.
    """
    items = run_for_query.items()
    if k is None or k >= len(run_for_query):
        ranked = sorted(items, key=_order_key, reverse=True)
    else:
        if k <= 0:
            return []
        # Same order as the full sort (keys are unique because pids are), but
        # O(n log k): this keeps 7,000 x 1,000 runs well under a second per metric.
        ranked = heapq.nlargest(k, items, key=_order_key)
    return [pid for pid, _ in ranked]


def _judged_queries(qrels: Qrels, min_grade: int = 1) -> list[str]:
    """Queries with at least one document of grade >= min_grade."""
    return [qid for qid, docs in qrels.items() if any(g >= min_grade for g in docs.values())]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


# Per-query measures.  ``ranked`` is the query's ranking (best first) already cut at k.

def _reciprocal_rank(ranked: list[str], judged: dict[str, int], min_grade: int) -> float:
    for i, pid in enumerate(ranked, start=1):
        if judged.get(pid, 0) >= min_grade:
            return 1.0 / i
    return 0.0


def _dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(i + 1) for i, g in enumerate(gains, start=1))


def _ndcg(ranked: list[str], judged: dict[str, int], k: int) -> float:
    gains = [max(judged.get(pid, 0), 0) for pid in ranked]
    ideal = sorted((max(g, 0) for g in judged.values()), reverse=True)[:k]
    return _dcg(gains) / _dcg(ideal)


def _recall(ranked: list[str], judged: dict[str, int], min_grade: int) -> float:
    relevant = {pid for pid, g in judged.items() if g >= min_grade}
    return sum(1 for pid in ranked if pid in relevant) / len(relevant) if relevant else 0.0


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10, min_grade: int = 1) -> float:
    """Mean reciprocal rank of the first doc with grade >= min_grade in the top k (else 0), over every query with a
    grade > 0: as trec_eval -l 2 does on TREC DL, a judged query with no doc of min_grade counts, with 0."""
    return _mean([
        _reciprocal_rank(rank(run.get(qid, {}), k), qrels[qid], min_grade)
        for qid in _judged_queries(qrels, 1)
    ])


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """trec_eval ``ndcg_cut.k``: linear gain = grade, discount log2(rank + 1).

    The ideal DCG ranks *all* judged grades of the query in descending order
    (negative grades count as 0).  Unjudged retrieved documents have gain 0.
    Queries count when they have at least one grade > 0.
    """
    return _mean([
        _ndcg(rank(run.get(qid, {}), k), qrels[qid], k)
        for qid in _judged_queries(qrels, 1)
    ])


def recall_at_k(run: Run, qrels: Qrels, k: int = 100, min_grade: int = 1) -> float:
    """|relevant (grade >= min_grade) in top k| / |relevant|, averaged over the queries with a grade > 0 (0 where none
    reaches min_grade, as in trec_eval)."""
    return _mean([
        _recall(rank(run.get(qid, {}), k), qrels[qid], min_grade)
        for qid in _judged_queries(qrels, 1)
    ])


def evaluate_run(
    run: Run, qrels: Qrels, min_grade: int = 1, recall_ks: Iterable[int] = (100, 1000)
) -> dict[str, float]:
    """``{"MRR@10", "nDCG@10", "R@<k>" for k in recall_ks}``.

    ``min_grade`` applies to MRR and recall (use 2 for TREC DL, 1 for MS MARCO
    dev); nDCG always uses the graded labels.  Gives exactly the values of
    ``mrr_at_k`` / ``ndcg_at_k`` / ``recall_at_k`` but ranks each query only once.
    """
    recall_ks = list(recall_ks)
    depth = max([10, *recall_ks])
    rr, ndcg, recall = [], [], {k: [] for k in recall_ks}
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        ranked = rank(run.get(qid, {}), depth)
        ndcg.append(_ndcg(ranked[:10], judged, 10))
        rr.append(_reciprocal_rank(ranked[:10], judged, min_grade))
        for k in recall_ks:
            recall[k].append(_recall(ranked[:k], judged, min_grade))
    metrics = {"MRR@10": _mean(rr), "nDCG@10": _mean(ndcg)}
    for k in recall_ks:
        metrics[f"R@{k}"] = _mean(recall[k])
    return metrics


def read_trec_run(path, qids: Iterable[str] | None = None) -> Run:
    """Read a TREC run file ``qid Q0 pid rank score tag`` (whitespace-separated).

    The rank column is ignored (order comes from the scores, like trec_eval).
    A malformed line or a (qid, pid) pair listed twice raises ``DataError`` (a
    ``ValueError``) naming the line.  ``qids`` keeps only those
    queries: a full dev run is ~7M lines, about 0.7 GB as dicts, of which an
    evaluation of 500 queries needs 1/14.
    """
    keep = None if qids is None else set(qids)
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise DataError(f"{path}:{lineno}: expected 6 fields (qid Q0 pid rank score tag), got "
                                f"{len(fields)}: {line!r}; fix or regenerate the run file")
            qid, _, pid, _, score, _ = fields
            if keep is not None and qid not in keep:
                continue
            docs = run.setdefault(qid, {})
            if pid in docs:
                raise DataError(f"{path}:{lineno}: duplicate document {pid} for query {qid}")
            try:
                docs[pid] = float(score)
            except ValueError:
                raise DataError(f"{path}:{lineno}: the score {score!r} is not a number") from None
    return run


def write_trec_run(run: Run | Iterable[tuple[str, dict[str, float]]], path, tag: str, k: int | None = None) -> None:
    """Write ``run`` as ``qid Q0 pid rank score tag`` lines, ranks 1..n in ``rank()`` order.

    ``run`` is a Run or (qid, docs) pairs, one query at a time (a generator keeps a large run out of memory).
    Queries keep the run's order; ``k`` keeps only the top k per query.  Scores are
    written with ``repr`` so that reading the file back gives the same floats.
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be a non-empty string without whitespace: {tag!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in (run.items() if isinstance(run, dict) else run):
            for i, pid in enumerate(rank(docs, k), start=1):
                f.write(f"{qid} Q0 {pid} {i} {float(docs[pid])!r} {tag}\n")


def read_qrels(path) -> Qrels:
    """Read ``qid 0 pid grade`` lines, tab- or space-separated (TREC and MS MARCO formats), as string ids."""
    return str_qrels(formats.read_qrels(Path(path)))


def str_qrels(qrels: dict[int, dict[int, int]]) -> Qrels:
    """The data layer's int-keyed judgments in the metrics' string-keyed form (trec_eval breaks ties on docnos)."""
    return {str(q): {str(p): int(g) for p, g in docs.items()} for q, docs in qrels.items()}


class StreamingMetrics:
    """evaluate_run over a run that arrives one query at a time and is never held whole (7M (qid, pid) scores at
    full scale): per-query values are kept, and queries of the qrels that never arrive score 0, exactly as in
    evaluate_run (same values, same order of summation)."""

    def __init__(self, qrels: Qrels, min_grade: int, recall_ks: Iterable[int]):
        self.qrels, self.min_grade, self.recall_ks = qrels, min_grade, tuple(recall_ks)
        self.values: dict[str, dict[str, float]] = {}

    def add(self, qid: str, docs: dict[str, float]) -> None:
        if qid in self.qrels:
            self.values[qid] = evaluate_run({qid: docs}, {qid: self.qrels[qid]}, self.min_grade, self.recall_ks)

    def result(self) -> dict[str, float]:
        out = {}
        for metric in ("MRR@10", "nDCG@10", *(f"R@{k}" for k in self.recall_ks)):
            vals = [self.values[q][metric] if q in self.values else 0.0
                    for q, judged in self.qrels.items() if any(g > 0 for g in judged.values())]
            out[metric] = _mean(vals)
        return out
