"""Ranking metrics for MS MARCO / TREC Deep Learning runs, and the benchmark of any saved model.

Command line: the published benchmarks of a saved model folder (bi-encoder or cross-encoder, detected):
    python evaluate.py --model=output/train_bi-encoder-v2/model      # dev-small + TREC DL 2019/2020, one GPU
    python evaluate.py --model=output/train_cross-encoder-v1/model   # rerank the official BM25 top-1000
    python evaluate.py --model=output/train_cross-encoder-v1/model --run_file=output/evaluate/train_bi-encoder-v2
                                                                     # retrieve (bi-encoder runs) then rerank
    python evaluate.py --sample --model=offline:all-MiniLM-L6-v2     # bundled sample, offline, CPU
Outputs: output/evaluate/<model name>/ (<split>.run TREC runs, metrics.json, config.json) and a printed table.
A bi-encoder's collection embeddings are cached (fp16, memory-mapped, resumable) under
<data_dir>/.prepared/embeddings/<model fingerprint>/, so a second evaluation of the same model encodes nothing.

Pure Python (plus numpy) re-implementation of the measures we report, written
to reproduce ``trec_eval`` / ``ir-measures`` exactly (checked to 1e-9 against
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
relevant document (grade >= ``min_grade``; for nDCG: grade > 0).  A query of
that set that is missing from the run scores 0.  This follows the official
MS MARCO evaluation script, which divides by the number of judged queries.
Note that trec_eval's default (and hence ir-measures) instead *skips* queries
absent from the run, so the two agree only when the run covers every judged
query.  Queries that appear only in the run are ignored.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

import msmarco_data
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

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


def _judged_queries(qrels: Qrels, min_grade: int) -> list[str]:
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
    return sum(1 for pid in ranked if pid in relevant) / len(relevant)


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10, min_grade: int = 1) -> float:
    """Mean reciprocal rank of the first doc with grade >= min_grade in the top k (else 0)."""
    return _mean([
        _reciprocal_rank(rank(run.get(qid, {}), k), qrels[qid], min_grade)
        for qid in _judged_queries(qrels, min_grade)
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
    """|relevant (grade >= min_grade) in top k| / |relevant|, averaged over queries."""
    return _mean([
        _recall(rank(run.get(qid, {}), k), qrels[qid], min_grade)
        for qid in _judged_queries(qrels, min_grade)
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
        has_positive = any(g > 0 for g in judged.values())
        has_relevant = any(g >= min_grade for g in judged.values())
        if not (has_positive or has_relevant):
            continue
        ranked = rank(run.get(qid, {}), depth)
        if has_positive:
            ndcg.append(_ndcg(ranked[:10], judged, 10))
        if has_relevant:
            rr.append(_reciprocal_rank(ranked[:10], judged, min_grade))
            for k in recall_ks:
                recall[k].append(_recall(ranked[:k], judged, min_grade))
    metrics = {"MRR@10": _mean(rr), "nDCG@10": _mean(ndcg)}
    for k in recall_ks:
        metrics[f"R@{k}"] = _mean(recall[k])
    return metrics


def read_trec_run(path) -> Run:
    """Read a TREC run file ``qid Q0 pid rank score tag`` (whitespace-separated).

    The rank column is ignored (order comes from the scores, like trec_eval).
    A (qid, pid) pair listed twice raises ``ValueError``.
    """
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 fields, got {len(fields)}: {line!r}")
            qid, _, pid, _, score, _ = fields
            docs = run.setdefault(qid, {})
            if pid in docs:
                raise ValueError(f"{path}:{lineno}: duplicate document {pid} for query {qid}")
            docs[pid] = float(score)
    return run


def write_trec_run(run: Run, path, tag: str, k: int | None = None) -> None:
    """Write ``run`` as ``qid Q0 pid rank score tag`` lines, ranks 1..n in ``rank()`` order.

    Queries keep the run's order; ``k`` keeps only the top k per query.  Scores are
    written with ``repr`` so that reading the file back gives the same floats.
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be a non-empty string without whitespace: {tag!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for i, pid in enumerate(rank(docs, k), start=1):
                f.write(f"{qid} Q0 {pid} {i} {float(docs[pid])!r} {tag}\n")


def read_qrels(path) -> Qrels:
    """Read ``qid 0 pid grade`` lines, tab- or space-separated (TREC and MS MARCO formats), as string ids."""
    return str_qrels(msmarco_data.read_qrels(Path(path)))


def str_qrels(qrels: dict[int, dict[int, int]]) -> Qrels:
    """The data layer's int-keyed judgments in the metrics' string-keyed form (trec_eval breaks ties on docno strings)."""
    return {str(q): {str(p): int(g) for p, g in docs.items()} for q, docs in qrels.items()}


# --------------------------------------------------------------------------------------------
# Reranking and retrieval evaluation of models, shared by the training scripts and the CLI below.
# --------------------------------------------------------------------------------------------
@dataclass
class RerankSet:
    """Held-out queries with their candidate passages, ready to score."""
    name: str  # e.g. "dev" or "dl2020"
    qids: list[int]
    queries: list[str]
    candidates: list[np.ndarray]  # pids per query, in the candidate file's (BM25) order
    passages: list[list[str]]
    qrels: Qrels  # string ids, for the metrics
    min_grade: int  # 1 for MS MARCO dev, 2 for TREC DL MRR/recall


def load_rerank_set(data: "msmarco_data.MSMarco", split: str = "dev", max_queries: int | None = None,
                    max_candidates: int | None = None, include_positives: bool = True, seed: int = 0) -> RerankSet:
    """Dev (dev-small qrels + top1000.dev) or TREC DL ("dl2019", "dl2020") queries with their candidates.

    `max_queries` takes a seeded random subset (sorted by qid for a stable order); with `include_positives`
    judged positives missing from a query's candidates are appended after them, so a reranker can be scored
    on them (the candidate order itself still ranks them last)."""
    if split == "dev":
        queries, qrels_int, cands = data.queries("dev"), data.qrels("dev"), data.dev_candidates()
        min_grade = 1
    elif split.startswith("dl"):
        queries, qrels_int, cands = data.trec_dl(int(split[2:]))
        min_grade = 2
    else:
        raise ValueError(f"unknown evaluation split {split!r}: use dev, dl2019 or dl2020")
    qids = sorted(q for q in qrels_int if q in cands and any(g >= min_grade for g in qrels_int[q].values()))
    if max_queries is not None and max_queries < len(qids):
        rng = np.random.default_rng(seed)
        qids = sorted(rng.choice(qids, size=max_queries, replace=False).tolist())
    collection = data.collection()
    texts, cand_list, passages = [], [], []
    for q in qids:
        pids = cands[q][:max_candidates] if max_candidates else cands[q]
        if include_positives:
            missing = [p for p, g in sorted(qrels_int[q].items()) if g >= min_grade and p not in set(pids.tolist())]
            missing = [p for p in missing if p in collection]
            pids = np.concatenate([pids, np.asarray(missing, dtype=pids.dtype)])
        cand_list.append(pids)
        passages.append(collection.get_many(pids))
        texts.append(queries[q])
    return RerankSet(split, qids, texts, cand_list, passages, str_qrels({q: qrels_int[q] for q in qids}), min_grade)


def candidate_order_run(rs: RerankSet) -> Run:
    """The candidates' own order (BM25 for top1000 files) as a run: score = -rank."""
    return {str(q): {str(p): -float(i) for i, p in enumerate(pids)} for q, pids in zip(rs.qids, rs.candidates)}


def cross_encoder_run(model, rs: RerankSet, batch_size: int = 64) -> Run:
    """Score every (query, candidate) pair with a CrossEncoder, as raw fp32 logits (a sigmoid, or bf16's three
    significant digits, would tie close candidates and blur the metrics)."""
    import torch
    pairs = [(q, p) for q, ps in zip(rs.queries, rs.passages) for p in ps]
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                           activation_fn=torch.nn.Identity())
    return _split_scores(rs, np.asarray(scores, dtype=np.float64).reshape(len(pairs), -1)[:, 0])


def bi_encoder_run(model, rs: RerankSet, batch_size: int = 64) -> Run:
    """Rerank the candidates by the bi-encoder's similarity (its own similarity function: cosine or dot)."""
    flat = [p for ps in rs.passages for p in ps]
    q_emb = model.encode_query(rs.queries, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    p_emb = model.encode_document(flat, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    owner = np.repeat(np.arange(len(rs.qids)), [len(c) for c in rs.candidates])
    sims = model.similarity_pairwise(q_emb[owner], p_emb).float().cpu().numpy()
    return _split_scores(rs, sims.astype(np.float64))


def _split_scores(rs: RerankSet, scores: np.ndarray) -> Run:
    run, i = {}, 0
    for q, pids in zip(rs.qids, rs.candidates):
        run[str(q)] = {str(p): float(s) for p, s in zip(pids, scores[i:i + len(pids)])}
        i += len(pids)
    return run


def rerank_metrics(run: Run, rs: RerankSet) -> dict[str, float]:
    m = evaluate_run(run, rs.qrels, min_grade=rs.min_grade, recall_ks=())
    return {"MRR@10": m["MRR@10"], "nDCG@10": m["nDCG@10"]}


def subset(rs: RerankSet, idx: list[int]) -> RerankSet:
    """The queries `idx` of a RerankSet (in that order)."""
    qids = [rs.qids[i] for i in idx]
    return RerankSet(rs.name, qids, [rs.queries[i] for i in idx], [rs.candidates[i] for i in idx],
                     [rs.passages[i] for i in idx], {str(q): rs.qrels.get(str(q), {}) for q in qids}, rs.min_grade)


# Multi-GPU (torchrun, accelerate launch): every process calls the evaluators at the same time; each does its share
# of the work and all of them get the whole result, so checkpoint choice agrees and nothing is computed twice.
def _all_gather(obj) -> list:
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_work(fn: Callable[[list], list], items: list) -> list:
    """fn(items), one result per item, computed across the processes of a multi-GPU run: process r takes
    items[r::world] and every process gets all results back in the items' order. One process alone: fn(items)."""
    rank, world = msmarco_data.process_group()
    if world == 1:
        return list(fn(items))
    out: list = [None] * len(items)
    for r, part in enumerate(_all_gather(list(fn(items[rank::world])) if items[rank::world] else [])):
        out[r::world] = part
    return out


def rerank_run(scorer: Callable, model, rs: RerankSet, batch_size: int = 64) -> Run:
    """scorer(model, rs, batch_size), its queries split across the processes of a multi-GPU run."""
    return dict(split_work(lambda idx: list(scorer(model, subset(rs, idx), batch_size).items()),
                           list(range(len(rs.qids)))))


class RerankEvaluator(BaseEvaluator):
    """A sentence-transformers evaluator over a RerankSet, computed with this module's metrics;
    its primary metric (MRR@10) picks the best checkpoint."""

    def __init__(self, rs: RerankSet, scorer: Callable, batch_size: int = 64, name: str | None = None):
        super().__init__()
        self.rs, self.scorer, self.batch_size = rs, scorer, batch_size
        self.name = name or rs.name
        self.primary_metric = "MRR@10"

    def metrics(self, model) -> dict[str, float]:
        """MRR@10 and nDCG@10 of the model's reranking (names without the evaluator's prefix)."""
        was_training = model.training
        model.eval()
        try:
            return rerank_metrics(rerank_run(self.scorer, model, self.rs, self.batch_size), self.rs)
        finally:
            model.train(was_training)

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = self.prefix_name_to_metrics(self.metrics(model), self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


def dense_retrieval_run(model, queries: list[str], qids: list[int], collection: "msmarco_data.TextStore",
                        k: int = 100, batch_size: int = 64, chunk: int = 100_000, cache_dir=None,
                        rows: range | None = None) -> Run:
    """Exact top-k dense retrieval over the whole collection: passages are encoded chunk by chunk and each
    chunk's scores merged into a running top-k, so memory holds one chunk of embeddings, not 8.8M of them.

    With `cache_dir` the passage embeddings are kept there instead (see `encode_collection`: fp16, memory-mapped,
    resumable) and searched by `search_embeddings`, so a later call with the same model encodes nothing.
    Without it, `rows` limits the search to those collection rows (one process's share of a multi-GPU run)."""
    import torch
    if cache_dir is not None:
        if rows is not None:
            raise ValueError("rows= is for the uncached search; the embedding cache covers the whole collection")
        emb = encode_collection(model, collection, cache_dir, batch_size=batch_size, chunk=chunk)
        q = model.encode_query(queries, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        scores, rows = search_embeddings(model, q, emb, k)
        pids = np.asarray(collection.ids)[rows]
        return {str(qid): {str(p): float(v) for p, v in zip(pids[j], scores[j])} for j, qid in enumerate(qids)}
    q = model.encode_query(queries, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    best_s = torch.full((len(queries), k), -torch.inf, device=q.device)
    best_i = torch.zeros((len(queries), k), dtype=torch.long, device=q.device)
    rows = range(len(collection)) if rows is None else rows
    for lo in range(rows.start, rows.stop, chunk):
        part = range(lo, min(lo + chunk, rows.stop))
        p = model.encode_document([collection.text_at(r) for r in part], batch_size=batch_size,
                                  convert_to_tensor=True, show_progress_bar=len(rows) > chunk)
        s = model.similarity(q, p).to(best_s.dtype)
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(lo, lo + len(part), device=q.device)
                                                     .expand(len(queries), -1)], 1)
        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    pids = np.asarray(collection.ids)[best_i.cpu().numpy()]
    scores = best_s.float().cpu().numpy()
    keep = np.isfinite(scores)  # a share smaller than k leaves -inf slots
    return {str(qid): {str(p): float(v) for p, v, ok in zip(pids[j], scores[j], keep[j]) if ok}
            for j, qid in enumerate(qids)}


def merge_top_k(runs: Iterable[Run], k: int) -> Run:
    """The top k of each query over several runs (the shares of a collection searched apart)."""
    merged: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        for q, docs in run.items():
            merged.setdefault(q, []).extend(docs.items())
    return {q: dict(heapq.nlargest(k, items, key=lambda d: d[1])) for q, items in merged.items()}


class RetrievalEvaluator(BaseEvaluator):
    """Dense retrieval of held-out queries over the whole collection: MRR@10 and Recall@k."""

    def __init__(self, rs: RerankSet, collection: "msmarco_data.TextStore", k: int = 100, batch_size: int = 64,
                 name: str | None = None):
        super().__init__()
        self.rs, self.collection, self.k, self.batch_size = rs, collection, k, batch_size
        self.name = name or f"{rs.name}_retrieval"
        self.primary_metric = "MRR@10"

    def metrics(self, model) -> dict[str, float]:
        """MRR@10 and R@k of retrieval from the whole collection; a multi-GPU run splits the collection
        between its processes (each encodes and searches its share) and merges their top k."""
        rank, world = msmarco_data.process_group()
        n = len(self.collection)
        was_training = model.training
        model.eval()
        try:
            with msmarco_data.autocast(model.device):  # encoding the collection in bf16, as fp16 caches do at scale
                run = dense_retrieval_run(model, self.rs.queries, self.rs.qids, self.collection, self.k,
                                          self.batch_size, rows=range(n * rank // world, n * (rank + 1) // world))
        finally:
            model.train(was_training)
        if world > 1:
            run = merge_top_k(_all_gather(run), self.k)
        m = evaluate_run(run, self.rs.qrels, min_grade=self.rs.min_grade, recall_ks=(self.k,))
        return {"MRR@10": m["MRR@10"], f"R@{self.k}": m[f"R@{self.k}"]}

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = self.prefix_name_to_metrics(self.metrics(model), self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


# --------------------------------------------------------------------------------------------
# Full-scale dense retrieval: a resumable fp16 embedding cache and exact top-k by chunked matrix products.
# --------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def encode_collection(model, collection: "msmarco_data.TextStore", cache_dir, batch_size: int = 64,
                      chunk: int = 100_000, progress: bool = True) -> np.ndarray:
    """Passage embeddings of the whole collection (row order), as a read-only memory-mapped (n, dim) fp16 matrix.

    They live in `cache_dir` (embeddings.f16, meta.json, done.json). The matrix is filled `chunk` rows at a time
    and done.json (`done_rows`, replaced atomically) is updated only after each chunk is flushed to disk, so an
    interrupted encoding resumes at the first unfinished chunk and a complete cache is reused as it is. Memory
    holds one chunk of embeddings (8.8M x 768 at full scale is 13.6 GB on disk, none of it in RAM)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(collection)
    dim = model.get_embedding_dimension()
    want = {"rows": n, "dim": dim, "dtype": "float16"}
    meta_path, done_path, mat_path = cache_dir / "meta.json", cache_dir / "done.json", cache_dir / "embeddings.f16"
    done = 0
    if meta_path.exists() and json.loads(meta_path.read_text()) == want and mat_path.exists() \
            and mat_path.stat().st_size == n * dim * 2 and done_path.exists():
        done = min(int(json.loads(done_path.read_text())["done_rows"]), n)
    else:  # a new cache, or one of another shape: start over
        for p in (done_path, mat_path):
            p.unlink(missing_ok=True)
        _write_json_atomic(meta_path, want)
        _write_json_atomic(done_path, {"done_rows": 0})
    if done < n:
        from tqdm import tqdm
        mm = np.memmap(mat_path, dtype=np.float16, mode="r+" if mat_path.exists() else "w+", shape=(n, dim))
        with tqdm(total=n, initial=done, unit="passage", desc="encoding collection", disable=not progress) as bar:
            for lo in range(done, n, chunk):
                hi = min(lo + chunk, n)
                emb = model.encode_document([collection.text_at(r) for r in range(lo, hi)], batch_size=batch_size,
                                            convert_to_numpy=True, show_progress_bar=False)
                mm[lo:hi] = np.asarray(emb, dtype=np.float32).astype(np.float16)
                mm.flush()
                _write_json_atomic(done_path, {"done_rows": hi})
                bar.update(hi - lo)
        del mm
    if n == 0:
        return np.zeros((0, dim), np.float16)
    return np.memmap(mat_path, dtype=np.float16, mode="r", shape=(n, dim))


def search_embeddings(model, queries, embeddings: np.ndarray, k: int, chunk: int | None = None,
                      query_block: int = 1024, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over `embeddings` (rows of a possibly memory-mapped matrix) by the model's own
    similarity: float32 matrix products of `query_block` queries x `chunk` rows on the queries' device (the GPU
    when the model is on one), merged into a running top-k. Returns (scores float32, rows int64), (nq, k) each,
    best first."""
    import torch
    from tqdm import tqdm
    q = torch.as_tensor(queries).float()
    dev = q.device
    n, nq = len(embeddings), len(q)
    k = min(k, n)
    chunk = chunk or (262_144 if dev.type == "cuda" else 65_536)
    best_s = torch.full((nq, k), -torch.inf, device=dev)
    best_i = torch.zeros((nq, k), dtype=torch.long, device=dev)
    for lo in tqdm(range(0, n, chunk), desc="searching", unit="chunk", disable=not progress):
        hi = min(lo + chunk, n)
        p = torch.from_numpy(np.array(embeddings[lo:hi], dtype=np.float32)).to(dev)
        idx = torch.arange(lo, hi, device=dev)
        for a in range(0, nq, query_block):
            b = min(a + query_block, nq)
            s = model.similarity(q[a:b], p).float()
            s = torch.cat([best_s[a:b], s], 1)
            i = torch.cat([best_i[a:b], idx.expand(b - a, -1)], 1)
            best_s[a:b], pos = s.topk(k, dim=1)
            best_i[a:b] = i.gather(1, pos)
        del p
    return best_s.cpu().numpy(), best_i.cpu().numpy()


# --------------------------------------------------------------------------------------------
# The benchmark CLI: `python evaluate.py --model=<saved model folder>`.
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    model: str = ""  # saved model folder (bi-encoder or cross-encoder, detected), hub name or offline:<name>
    sample: bool = False  # run on data/sample (its dev queries, DL 2020 and 28k-passage collection)
    data_dir: str = "data"  # MS MARCO folder, relative to the repository; missing files are downloaded into it
    splits: tuple[str, ...] = ("dev", "dl2019", "dl2020")  # dev = dev-small (6,980 queries); dl<year> = TREC DL passage
    run_file: str = ""  # cross-encoder: a TREC run (or a folder of <split>.run) to rerank instead of the BM25 top-1000
    depth: int = 1000  # bi-encoder: passages retrieved per query; cross-encoder: candidates reranked per query
    batch_size: int = 128  # texts (bi-encoder) or pairs (cross-encoder) per forward pass
    max_length: int = -1  # tokens per text (bi-encoder) / per query+passage (cross-encoder); -1: the model's own
    half: bool = True  # on a GPU run the model in fp16 (2-3x faster); ignored on a CPU
    encode_chunk: int = 100_000  # bi-encoder: passages encoded between two checkpoints of the embedding cache
    max_queries: int = -1  # evaluate a seeded random subset of each split's judged queries (-1: all)
    seed: int = 0  # the subset choice of max_queries
    output_dir: str = ""  # default output/evaluate/<model name>/


SAMPLE = dict(data_dir="data/sample", batch_size=64)

SPLIT_FILES = {"dev": ("queries.tar.gz", "qrels.dev.small.tsv", "top1000.dev.tar.gz"),
               **{f"dl{y}": files for y, files in msmarco_data.TREC_DL.items()}}
# Which metrics each split reports, and the grade that counts as relevant for MRR and recall.
SPLIT_METRICS = {"dev": (1, ("MRR@10", "R@100", "R@1000")), "dl": (2, ("nDCG@10", "MRR@10", "R@100", "R@1000"))}
# Published BM25 (Anserini regressions, k1=0.9 b=0.4; TREC DL recall at grade >= 2), printed beside full-scale runs.
PUBLISHED_BM25 = {"dev": {"MRR@10": 0.184, "R@1000": 0.853}, "dl2019": {"nDCG@10": 0.506, "R@1000": 0.750},
                  "dl2020": {"nDCG@10": 0.480, "R@1000": 0.786}}


def model_kind(folder) -> str:
    """"bi-encoder" or "cross-encoder" for a saved model folder, from what sentence-transformers writes there:
    config_sentence_transformers.json's model_type (v4+), else a Pooling module in modules.json (bi-encoder) or a
    *ForSequenceClassification architecture in config.json (older cross-encoders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: model folder {folder} does not exist")
    st_cfg = folder / "config_sentence_transformers.json"
    if st_cfg.exists():
        kind = json.loads(st_cfg.read_text()).get("model_type")
        if kind in ("SentenceTransformer", "CrossEncoder"):
            return "bi-encoder" if kind == "SentenceTransformer" else "cross-encoder"
        if kind:
            raise SystemExit(f"error: {folder} holds a {kind} model; evaluate.py takes a SentenceTransformer "
                             "(bi-encoder) or a CrossEncoder")
    if (folder / "modules.json").exists():
        types = [m.get("type", "") for m in json.loads((folder / "modules.json").read_text())]
        if any(t.endswith("Pooling") for t in types):
            return "bi-encoder"
    if (folder / "config.json").exists():
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "cross-encoder"
    raise SystemExit(f"error: {folder} is neither a SentenceTransformer (bi-encoder: modules.json with a Pooling "
                     "module) nor a CrossEncoder (a sequence-classification head); pass the model/ folder a "
                     "training script saved, e.g. --model=output/train_bi-encoder-v2/model")


def _model_folder(name: str) -> Path:
    path = msmarco_data.resolve_model(name)
    if Path(path).is_dir():
        return Path(path)
    try:  # a hub name: its snapshot folder (downloaded unless offline)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path))
    except Exception as e:
        raise SystemExit(f"error: {name!r} is not a model folder and could not be fetched from the hub: {e}") from None


def model_label(name: str, folder: Path) -> str:
    """A short name for outputs: a training script's output/<script>/model -> <script>; checkpoint-N keeps it."""
    if name.startswith("offline:"):
        return name.split(":", 1)[1]
    if folder.name == "model":
        return folder.parent.name
    if folder.name.startswith("checkpoint-"):
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


def embedding_fingerprint(folder: Path, model, collection: "msmarco_data.TextStore") -> str:
    """Key of a bi-encoder's embedding cache: the model folder's files (sizes and mtimes), its max_seq_length and
    weight dtype, and the collection store's own fingerprint."""
    import hashlib
    files = {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "README.md" and ".cache" not in p.parts}
    meta = Path(getattr(collection, "folder", "")) / "meta.json"
    coll = json.loads(meta.read_text()).get("fingerprint") if meta.is_file() else len(collection)
    key = json.dumps({"files": files, "max_seq_length": model.max_seq_length,
                      "dtype": str(next(model.parameters()).dtype), "collection": coll}, sort_keys=True)
    return f"{model_label('', folder)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


@dataclass
class BenchmarkSplit:
    """One benchmark split: its judged queries (all, or a subset), judgments and candidate lists."""
    name: str
    qids: list[int]
    queries: list[str]
    qrels: Qrels
    min_grade: int
    metrics: tuple[str, ...]
    candidates: Callable[[int], np.ndarray | None]  # qid -> candidate pids in order (None: no candidates)


def load_benchmark_split(data: "msmarco_data.MSMarco", name: str, max_queries: int = -1,
                         seed: int = 0) -> BenchmarkSplit:
    """Every judged query of dev-small (qrels.dev.small) or TREC DL <year>, with the official candidates.
    Unlike load_rerank_set no passage text is loaded: at full scale there are 7M candidates."""
    if name == "dev":
        queries, qrels_int, cands = data.queries("dev"), data.qrels("dev"), data.dev_candidates()
    else:
        queries, qrels_int, cands = data.trec_dl(int(name[2:]))
    min_grade, metrics = SPLIT_METRICS["dev" if name == "dev" else "dl"]
    qids = sorted(q for q, d in qrels_int.items() if any(g >= min_grade for g in d.values()))
    if 0 <= max_queries < len(qids):
        rng = np.random.default_rng(seed)
        qids = sorted(rng.choice(qids, size=max_queries, replace=False).tolist())
    return BenchmarkSplit(name, qids, [queries[q] for q in qids], str_qrels({q: qrels_int[q] for q in qids}),
                          min_grade, metrics, lambda q: cands[q] if q in cands else None)


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
            floor = 1 if metric == "nDCG@10" else self.min_grade
            vals = [self.values[q][metric] if q in self.values else 0.0
                    for q, judged in self.qrels.items() if any(g >= floor for g in judged.values())]
            out[metric] = _mean(vals)
        return out


def _run_lines(qid: str, docs: dict[str, float], tag: str, k: int | None = None) -> str:
    """One query's lines in write_trec_run's format."""
    return "".join(f"{qid} Q0 {pid} {i} {float(docs[pid])!r} {tag}\n" for i, pid in enumerate(rank(docs, k), start=1))


def _recall_ks(depth: int) -> tuple[int, ...]:
    return tuple(k for k in (100, 1000) if k <= depth) or (depth,)


def _evaluate_stream(split: BenchmarkSplit, ranked: Iterable[tuple[int, dict[str, float]]], run_path: Path,
                     tag: str, depth: int) -> dict[str, float]:
    """Write each query's ranking to the run file (renamed into place when complete) and measure it."""
    ks = _recall_ks(depth)
    metrics = StreamingMetrics(split.qrels, split.min_grade, ks)
    run_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_path.with_name(run_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for qid, docs in ranked:
            f.write(_run_lines(str(qid), docs, tag, depth))
            metrics.add(str(qid), docs)
    os.replace(tmp, run_path)
    return _select(metrics.result(), split.metrics)


def _select(m: dict[str, float], names: Iterable[str]) -> dict[str, float]:
    """The split's metrics; recall at every measured depth (R@100 and R@1000 at depth 1000, R@<depth> below 100)."""
    return {k: m[k] for k in [n for n in names if not n.startswith("R@")] + [n for n in m if n.startswith("R@")]}


def _candidate_lists(split: BenchmarkSplit, run_file: str, depth: int) -> tuple[dict[int, np.ndarray], str]:
    """qid -> candidate pids (top `depth`) from the official candidates or a TREC run file / folder of runs."""
    if not run_file:
        out = {}
        for q in split.qids:
            c = split.candidates(q)
            if c is not None:
                out[q] = np.asarray(c[:depth], dtype=np.int64)
        return out, "BM25 top-1000"
    path = msmarco_data.resolve_dir(run_file)
    if path.is_dir():
        path = path / f"{split.name}.run"
    if not path.is_file():
        raise SystemExit(f"error: run file {path} does not exist")
    run = read_trec_run(path)
    out = {q: np.asarray(rank(run[str(q)], depth), dtype=np.int64) for q in split.qids if str(q) in run}
    if not out:
        raise SystemExit(f"error: {path} ranks none of the {len(split.qids)} judged queries of split {split.name}")
    return out, str(path)


def _bi_encoder_splits(model, folder: Path, data, splits: list[BenchmarkSplit], cfg: Config, out: Path, tag: str):
    coll = data.collection()
    cache = data.dir / msmarco_data.PREPARED / "embeddings" / embedding_fingerprint(folder, model, coll)
    print(f"collection: {len(coll):,} passages; embedding cache {cache}")
    emb = encode_collection(model, coll, cache, batch_size=cfg.batch_size, chunk=cfg.encode_chunk)
    texts = [t for s in splits for t in s.queries]  # every split's queries in one pass over the embeddings
    q = model.encode_query(texts, batch_size=cfg.batch_size, convert_to_tensor=True, show_progress_bar=False)
    scores, rows = search_embeddings(model, q, emb, cfg.depth, progress=len(coll) > 1_000_000)
    ids = np.asarray(coll.ids)
    results, start = {}, 0
    for s in splits:
        sl = slice(start, start + len(s.qids))
        start += len(s.qids)
        pids, sc = ids[rows[sl]], scores[sl]
        ranked = ((q, {str(p): float(v) for p, v in zip(pids[j], sc[j])}) for j, q in enumerate(s.qids))
        results[s.name] = {"mode": "dense retrieval", "queries": len(s.qids), "run": f"{s.name}.run",
                           "model": _evaluate_stream(s, ranked, out / f"{s.name}.run", tag, cfg.depth)}
    return results


def _cross_encoder_ranked(model, split: BenchmarkSplit, cands: dict[int, np.ndarray], collection,
                          batch_size: int, pairs_per_step: int = 16_384):
    """(qid, {pid: raw logit}) per query, scoring a few queries' candidates at a time (bounded memory)."""
    import torch
    from tqdm import tqdm
    order = [(q, t) for q, t in zip(split.qids, split.queries) if q in cands and len(cands[q])]
    bar = tqdm(total=sum(len(cands[q]) for q, _ in order), unit="pair", desc=f"reranking {split.name}",
               disable=len(order) < 200)
    i = 0
    while i < len(order):
        group, n = [], 0
        while i < len(order) and (not group or n + len(cands[order[i][0]]) <= pairs_per_step):
            group.append(order[i]); n += len(cands[order[i][0]]); i += 1
        pairs = [(t, p) for q, t in group for p in collection.get_many(cands[q])]
        scores = model.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                               show_progress_bar=False, convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(pairs), -1)[:, 0]
        j = 0
        for q, _ in group:
            pids = cands[q]
            yield q, {str(p): float(v) for p, v in zip(pids, scores[j:j + len(pids)])}
            j += len(pids)
        bar.update(n)
    bar.close()


def _available(data_dir: Path, split: str) -> bool:
    """At full scale every split is downloaded on demand; the bundled sample lacks some (no DL 2019)."""
    if data_dir.resolve() != msmarco_data.SAMPLE_DIR.resolve():
        return True
    return all((data_dir / f).exists() for f in SPLIT_FILES[split])


def print_results(results: dict, cand_header: str, published: bool) -> None:
    cols = ["model", cand_header] + (["BM25 (Anserini)"] if published else [])
    print(f"\n{'split':8}{'metric':10}" + "".join(f"{c:>17}" for c in cols))
    for name, r in results.items():
        for metric, v in r["model"].items():
            row = [v, r.get("candidates", {}).get(metric), PUBLISHED_BM25.get(name, {}).get(metric)][:len(cols)]
            print(f"{name:8}{metric:10}" + "".join(f"{x:17.4f}" if x is not None else f"{'':>17}" for x in row))


def main(cfg: Config) -> dict:
    import torch
    if not cfg.model:
        raise SystemExit("error: which model? pass a saved model folder, e.g.\n"
                         "  python evaluate.py --model=output/train_bi-encoder-v2/model\n"
                         "  python evaluate.py --sample --model=offline:all-MiniLM-L6-v2")
    unknown = [s for s in cfg.splits if s not in SPLIT_FILES]
    if unknown:
        raise SystemExit(f"error: unknown split(s) {unknown}; choose from {', '.join(SPLIT_FILES)}")
    folder = _model_folder(cfg.model)
    kind = model_kind(folder)
    label = model_label(cfg.model, folder)
    out = msmarco_data.resolve_dir(cfg.output_dir or msmarco_data.OUTPUT_DIR / "evaluate" / label)
    msmarco_data.save_config(cfg, out)
    data = msmarco_data.MSMarco(cfg.data_dir)
    is_sample = data.dir.resolve() == msmarco_data.SAMPLE_DIR.resolve()
    if kind == "bi-encoder" and cfg.run_file:
        raise SystemExit("error: --run_file gives candidates for a cross-encoder to rerank; a bi-encoder retrieves "
                         "from the whole collection")
    names = []
    for s in cfg.splits:
        if _available(data.dir, s):
            names.append(s)
        else:
            print(f"note: split {s} skipped: its files are not in the bundled sample ({', '.join(SPLIT_FILES[s])})")
    splits = [load_benchmark_split(data, s, cfg.max_queries, cfg.seed) for s in names]
    print(f"{label}: {kind} from {folder}; splits " + ", ".join(f"{s.name} ({len(s.qids)} queries)" for s in splits))

    # 1. Model, on the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "bi-encoder":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(str(folder), device=device)
        if cfg.max_length > 0:
            model.max_seq_length = cfg.max_length
    else:
        from sentence_transformers import CrossEncoder
        model = CrossEncoder(str(folder), device=device, max_length=cfg.max_length if cfg.max_length > 0 else None)
    if cfg.half and device == "cuda":
        model.half()
    model.eval()
    tag = "".join(c if c.isalnum() or c in "-_.:" else "_" for c in label) or "model"

    # 2. Runs and their metrics: dense retrieval over the collection, or reranking of candidates.
    with torch.inference_mode():
        if kind == "bi-encoder":
            results = _bi_encoder_splits(model, folder, data, splits, cfg, out, tag)
        else:
            results, coll = {}, data.collection()
            for s in splits:
                cands, source = _candidate_lists(s, cfg.run_file, cfg.depth)
                missing = len(s.qids) - len(cands)
                if missing:
                    print(f"note: {missing} of the {len(s.qids)} {s.name} queries have no candidates; they score 0")
                ranked = _cross_encoder_ranked(model, s, cands, coll, cfg.batch_size)
                results[s.name] = {"mode": f"rerank {source}", "queries": len(s.qids), "run": f"{s.name}.run",
                                   "model": _evaluate_stream(s, ranked, out / f"{s.name}.run", tag, cfg.depth)}

    # 3. The candidates' own order beside the model (BM25 rank order on the sample and in the TREC DL files).
    for s in splits:
        cands, _ = _candidate_lists(s, cfg.run_file if kind == "cross-encoder" else "", cfg.depth)
        m = StreamingMetrics(s.qrels, s.min_grade, _recall_ks(cfg.depth))
        for q, pids in cands.items():
            m.add(str(q), {str(p): -float(i) for i, p in enumerate(pids)})
        results[s.name]["candidates"] = _select(m.result(), s.metrics)

    report = {"model": str(folder), "model_type": kind, "data_dir": str(data.dir), "depth": cfg.depth,
              "candidates": cfg.run_file or "official BM25 top-1000", "splits": results}
    _write_json_atomic(out / "metrics.json", report)
    cand_header = "candidates" if cfg.run_file else ("BM25" if is_sample else "BM25 file order")
    print_results(results, cand_header, published=not is_sample and not cfg.run_file)
    if not is_sample and not cfg.run_file and "dev" in results:
        print("(top1000.dev is not in BM25 rank order: its MRR@10 understates BM25; recall is unaffected)")
    print(f"runs and metrics.json in {out}")
    return report


if __name__ == "__main__":
    main(msmarco_data.script_config(Config(), SAMPLE))
