"""Evaluation of models while and after they train: reranking held-out queries' candidates (cross-encoders and
bi-encoders) and exact dense retrieval over a whole collection (bi-encoders), as sentence-transformers evaluators the
trainers call at every eval step; under several processes the work is split and every process gets the result. Also
the resumable fp16 embedding cache and the chunked exact top-k that evaluate.py uses at full scale."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from .distributed import all_gather, process_group, split_work
from . import paths
from .data import TREC_DL
from .errors import DataError, ModelError
from .metrics import Qrels, Run, evaluate_run, rank, read_trec_run, str_qrels
from .models import autocast
from .stores import release_pages

if TYPE_CHECKING:
    from .data import MSMarco
    from .stores import TextStore


SPLIT_FILES = {"dev": ("queries.tar.gz", "qrels.dev.small.tsv", "top1000.dev.tar.gz"),
               **{f"dl{y}": files for y, files in TREC_DL.items()}}


def available(data_dir: Path, split: str, candidates: bool = True) -> bool:
    """At full scale every split is downloaded on demand; the bundled sample lacks some (no DL 2019). Without
    `candidates` (a bi-encoder retrieves; a cross-encoder given a run file) the candidate file is not needed."""
    if not paths.is_sample(data_dir):
        return True
    needed = [f for f in SPLIT_FILES[split.split("-")[0]] if candidates or "top1000" not in f]
    return all((Path(data_dir) / f).exists() for f in needed)


@dataclass
class RerankSet:
    """Held-out queries with their candidate passages, ready to score."""
    name: str  # e.g. "dev-tune", "dev-test" or "dl2020"
    qids: list[int]
    queries: list[str]
    candidates: list[np.ndarray]  # pids per query, in the first stage's order
    passages: list[list[str]]
    qrels: Qrels  # string ids, for the metrics
    min_grade: int  # 1 for MS MARCO dev, 2 for TREC DL MRR/recall
    first_stage: str = ""  # where the candidates and their order come from
    ranked: bool = True  # whether that order is a ranking (a first-stage run), not a candidate file's arbitrary order


TUNE_SHARE = 0.4  # share of the dev queries in "dev-tune"
# A BM25 ranking of a split's candidates where a data folder has one (the sample bundles the real runs): the official
# candidate files list each query's candidates in no particular order.
BM25_RUNS = Path("runs") / "bm25"


def first_stage_of(data_dir: Path, first_stage: str) -> str:
    """What a training script reranks: --first_stage if given, else the data folder's BM25 runs (<data_dir>/runs/bm25/
    <split>.run, as evaluate.py reads them) where it has them, else "" (load_rerank_set ranks the official
    candidate files by BM25 itself)."""
    if first_stage:
        return first_stage
    return str(Path(data_dir) / BM25_RUNS) if (Path(data_dir) / BM25_RUNS).is_dir() else ""


def dev_part(qids, part: str) -> list[int]:
    """The dev queries of one fixed part: "tune" (TUNE_SHARE of them, by a hash of the qid) chooses checkpoints and
    settings; "test", the rest, decides nothing and is reported. The same qid is in the same part at every scale."""
    q = np.asarray(sorted(qids), dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (q + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    tune = (h >> np.uint64(40)).astype(np.float64) / float(1 << 24) < TUNE_SHARE
    if part not in ("tune", "test"):
        raise ValueError(f"unknown dev part {part!r}: tune or test")
    return q[tune if part == "tune" else ~tune].astype(np.int64).tolist()


def load_rerank_set(data: "MSMarco", split: str = "dev", max_queries: int | None = None,
                    max_candidates: int | None = None, first_stage: str = "", seed: int = 0) -> RerankSet:
    """Judged queries of `split` with their candidates: "dev" (dev-small; "dev-tune" / "dev-test" for its parts,
    see dev_part) or TREC DL ("dl2019", "dl2020").

    With `first_stage` (a TREC run file, or a folder of <split>.run files such as evaluate.py writes, e.g. a BM25 run)
    the candidates are the run's top `max_candidates` in its order. Without it they come from the split's official
    candidate file (top1000.dev, the DL top-1000), which lists each query's candidates in no particular order: a
    BM25 ranking of them (MSMarco.bm25_run) gives the top `max_candidates`, or they are all reranked
    (`max_candidates` None). `max_queries` takes a seeded random subset, sorted by qid (the training scripts keep
    seed 0: runs of different seeds are compared on the same queries).
    A judged query without candidates stays, with none: it scores 0 for every system, as in the official MS MARCO
    evaluation and evaluate.py, so a first stage that misses queries does not flatter the figures."""
    base = split.split("-")[0]
    if base == "dev":
        queries, qrels_int, official = data.queries("dev"), data.qrels("dev"), data.dev_candidates
        min_grade = 1
    elif base.startswith("dl"):
        queries, qrels_int = data.trec_dl_topics(int(base[2:]))
        official, min_grade = (lambda: data.trec_dl_candidates(int(base[2:]))), 2
    else:
        raise ValueError(f"unknown evaluation split {split!r}: use dev, dev-tune, dev-test, dl2019 or dl2020")
    # every query judged relevant at some grade: nDCG@10 counts it (as trec_eval does), MRR and recall only where a
    # judgment reaches min_grade (msmarco.metrics)
    qids = sorted(q for q in qrels_int if any(g > 0 for g in qrels_int[q].values()))
    if split != base:
        qids = dev_part(qids, split.split("-", 1)[1])
    if max_queries is not None and max_queries < len(qids):
        rng = np.random.default_rng(seed)
        qids = sorted(rng.choice(qids, size=max_queries, replace=False).tolist())
    built = not first_stage and max_candidates is not None  # a prefix of a candidate file would be arbitrary
    if built:
        first_stage = str(data.bm25_run(base))
    if first_stage:
        path = paths.resolve_dir(first_stage)
        path = path / f"{base}.run" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"first-stage run {path} does not exist: give a TREC run file (qid Q0 pid rank score "
                            f"tag) of the {base} queries, or a folder of <split>.run files")
        run = read_trec_run(path, qids=map(str, qids))
        if not run:
            raise DataError(f"first-stage run {path} ranks none of the {len(qids)} judged {split} queries: give a "
                            f"run of the {base} queries")
        cands = {int(q): np.asarray(rank(docs, max_candidates), dtype=np.int64) for q, docs in run.items()}
        source = (f"BM25 of the {base} candidate file (msmarco/bm25.py: {path}), top {max_candidates}" if built else
                  f"{path} (top {max_candidates or 'all'}, in its order)")
    else:  # only now: with a run of one's own the official file is neither downloaded nor read
        cands = official()
        source = f"{base} candidate file, all of each query's candidates (file order is not a ranking)"
    if missing := sum(q not in cands for q in qids):
        print(f"note: {missing} of the {len(qids)} {split} queries have no candidates in the {source}; they score 0")
    collection = data.collection()
    cand_list = [np.asarray(cands[q] if q in cands else (), dtype=np.int64) for q in qids]
    return RerankSet(split, qids, queries.get_many(qids), cand_list, [collection.get_many(c) for c in cand_list],
                     str_qrels({q: qrels_int[q] for q in qids}), min_grade, source, ranked=bool(first_stage))


def evaluation_sets(data: "MSMarco", cfg) -> tuple[RerankSet, list[RerankSet]]:
    """The evaluation sets of a training script: `cfg.eval_queries` dev-tune queries, scored during training to
    choose the checkpoint; and the sets of the final report, which decide nothing: as many dev-test queries and
    every judged query of cfg.report_splits (TREC DL years; those missing from the bundled sample are skipped).
    Candidates: the first stage's top cfg.eval_candidates (first_stage_of; without one, BM25's over the official
    candidate files), or all of them (eval_candidates 0)."""
    first_stage = first_stage_of(data.dir, cfg.first_stage)

    def load(split: str, max_queries: int | None) -> RerankSet:  # the same queries whatever the training seed
        return load_rerank_set(data, split, max_queries, cfg.eval_candidates or None, first_stage)
    reports = [load("dev-test", cfg.eval_queries)]
    reports += [load(s, None) for s in cfg.report_splits if available(data.dir, s)]
    return load("dev-tune", cfg.eval_queries), reports


def candidate_order_run(rs: RerankSet) -> Run:
    """The first stage's own order of the candidates as a run: score = -rank."""
    return {str(q): {str(p): -float(i) for i, p in enumerate(pids)} for q, pids in zip(rs.qids, rs.candidates)}


def check_finite(x, what: str):
    """x (scores, or embeddings a row each, as an array or tensor), or a ModelError if any of it is NaN or infinite:
    torch.topk and sorting would put such scores first (or anywhere), and the metrics would come out as numbers with
    no sign of it."""
    import torch
    if isinstance(x, torch.Tensor):  # reduced on its device: one flag a row crosses to the host
        finite = (torch.isfinite(x).reshape(len(x), -1).all(dim=1) if x.dim() > 1 else torch.isfinite(x)).cpu().numpy()
    else:
        finite = np.isfinite(x)
        finite = finite.reshape(len(finite), -1).all(axis=1) if finite.ndim > 1 else finite
    total, ok = len(finite), int(finite.sum())
    if ok < total:
        raise ModelError(f"{total - ok} of {total} {what} are not finite (NaN or inf). In half precision some models "
                         f"overflow: run evaluate.py with --half=false (a training script: --amp=false). If the "
                         f"weights themselves are not finite, the training diverged: resume from an earlier "
                         f"checkpoint with a smaller --lr")
    return x


def relevance_scores(logits, n: int) -> np.ndarray:
    """A cross-encoder's raw outputs for n pairs as one relevance score each: its one logit, or for a two-label head
    (monoBERT and other *ForSequenceClassification rerankers) the log-odds of label 1, relevant, over label 0."""
    s = np.asarray(logits, dtype=np.float64).reshape(n, -1)
    if s.shape[1] > 2:
        raise ModelError(f"the cross-encoder has {s.shape[1]} output labels; a reranker has one relevance logit, or "
                         f"two labels (not relevant, relevant)")
    return check_finite(s[:, 0] if s.shape[1] == 1 else s[:, 1] - s[:, 0], "cross-encoder scores")


def cross_encoder_run(model, rs: RerankSet, batch_size: int = 64) -> Run:
    """Score every (query, candidate) pair with a CrossEncoder, as raw fp32 logits (a sigmoid, or bf16's three
    significant digits, would tie close candidates and blur the metrics)."""
    import torch
    pairs = [(q, p) for q, ps in zip(rs.queries, rs.passages) for p in ps]
    if not pairs:  # every query of this share without candidates
        return _split_scores(rs, np.zeros(0))
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                           activation_fn=torch.nn.Identity())
    return _split_scores(rs, relevance_scores(scores, len(pairs)))


def bi_encoder_run(model, rs: RerankSet, batch_size: int = 64) -> Run:
    """Rerank the candidates by the bi-encoder's similarity (its own similarity function: cosine or dot)."""
    flat = [p for ps in rs.passages for p in ps]
    if not flat:
        return _split_scores(rs, np.zeros(0))
    q_emb = model.encode_query(rs.queries, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    p_emb = model.encode_document(flat, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    owner = np.repeat(np.arange(len(rs.qids)), [len(c) for c in rs.candidates])
    sims = model.similarity_pairwise(q_emb[owner], p_emb).float().cpu().numpy()
    return _split_scores(rs, check_finite(sims.astype(np.float64), "bi-encoder similarities"))


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
        """MRR@10 and nDCG@10 of the model's reranking (names without the evaluator's prefix), in fp32: under
        mixed precision the trainer (accelerate) wraps the model's forward in autocast in place, which rounds a
        cross-encoder's logits to bf16's grid (steps of 0.03-0.06 at logits 4-16) and ties close candidates, so the
        checkpoint would be chosen on ties broken by pid."""
        was_training = model.training
        wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
        model.eval()
        if wrapped is not None:
            model.forward = model._original_forward
        try:
            return rerank_metrics(rerank_run(self.scorer, model, self.rs, self.batch_size), self.rs)
        finally:
            model.train(was_training)
            if wrapped is not None:
                model.forward = wrapped

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = self.prefix_name_to_metrics(self.metrics(model), self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


def dense_retrieval_run(model, queries: list[str], qids: list[int], collection: "TextStore",
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
        scores, rows = search_embeddings(model, check_finite(q, "query embeddings"), emb, k)
        pids = np.asarray(collection.ids)[rows]
        return {str(qid): {str(p): float(v) for p, v in zip(pids[j], scores[j])} for j, qid in enumerate(qids)}
    q = check_finite(model.encode_query(queries, batch_size=batch_size, convert_to_tensor=True,
                                        show_progress_bar=False), "query embeddings")
    best_s = torch.full((len(queries), k), -torch.inf, device=q.device)
    best_i = torch.zeros((len(queries), k), dtype=torch.long, device=q.device)
    rows = range(len(collection)) if rows is None else rows
    for lo in range(rows.start, rows.stop, chunk):
        part = range(lo, min(lo + chunk, rows.stop))
        p = check_finite(model.encode_document([collection.text_at(r) for r in part], batch_size=batch_size,
                                               convert_to_tensor=True, show_progress_bar=len(rows) > chunk),
                         "passage embeddings")
        with torch.autocast(q.device.type, enabled=False):  # scores in fp32: bf16's 3 digits tie the top ranks
            s = model.similarity(q.float(), p.float())
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
    """The top k of each query over several runs (the shares of a collection searched apart); at a tie on the k-th
    score, trec_eval's order decides (docno descending), not the order of the shares."""
    merged: dict[str, dict[str, float]] = {}
    for run in runs:
        for q, docs in run.items():
            merged.setdefault(q, {}).update(docs)
    return {q: {p: docs[p] for p in rank(docs, k)} for q, docs in merged.items()}


def rerank_table(sets: list[RerankSet], scorer: Callable, models: dict, first_stage: bool = True) -> dict:
    """{set name: {"first_stage": metrics of the candidates' own order, <name>: metrics of models[name]}}: reranking
    each set's candidates with each model (scorer: cross_encoder_run or bi_encoder_run). No first-stage row where the
    candidates come in a file's arbitrary order (no --first_stage run): its metrics would be those of a random order."""
    table = {}
    for rs in sets:
        row = {"first_stage": rerank_metrics(candidate_order_run(rs), rs)} if first_stage and rs.ranked else {}
        for name, model in models.items():
            row[name] = RerankEvaluator(rs, scorer).metrics(model)
        table[rs.name] = row
    return table


class RetrievalEvaluator(BaseEvaluator):
    """Dense retrieval of held-out queries over the whole collection: MRR@10 and Recall@k."""

    def __init__(self, rs: RerankSet, collection: "TextStore", k: int = 100, batch_size: int = 64,
                 name: str | None = None, amp: bool = True):
        super().__init__()
        self.rs, self.collection, self.k, self.batch_size, self.amp = rs, collection, k, batch_size, amp
        self.name = name or f"{rs.name}_retrieval"
        self.primary_metric = "MRR@10"

    def metrics(self, model) -> dict[str, float]:
        """MRR@10 and R@k of retrieval from the whole collection; a multi-GPU run splits the collection
        between its processes (each encodes and searches its share) and merges their top k."""
        rank, world = process_group()
        n = len(self.collection)
        was_training = model.training
        model.eval()
        try:
            # passages encoded in mixed precision where it pays (bf16 or fp16, as fp16 caches are at scale) unless
            # amp is off;
            # their similarities in fp32 (dense_retrieval_run)
            with autocast(model.device) if self.amp else contextlib.nullcontext():
                run = dense_retrieval_run(model, self.rs.queries, self.rs.qids, self.collection, self.k,
                                          self.batch_size, rows=range(n * rank // world, n * (rank + 1) // world))
        finally:
            model.train(was_training)
        if world > 1:
            run = merge_top_k(all_gather(run), self.k)
        m = evaluate_run(run, self.rs.qrels, min_grade=self.rs.min_grade, recall_ks=(self.k,))
        return {"MRR@10": m["MRR@10"], f"R@{self.k}": m[f"R@{self.k}"]}

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = self.prefix_name_to_metrics(self.metrics(model), self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


def write_json_atomic(path: Path, obj) -> None:
    paths.write_atomic(path, json.dumps(obj, indent=1))


def encode_collection(model, collection: "TextStore", cache_dir, batch_size: int = 64,
                      chunk: int = 100_000, progress: bool = True) -> np.ndarray:
    """Passage embeddings of the whole collection (row order), as a read-only memory-mapped (n, dim) fp16 matrix.

    They live in `cache_dir` (embeddings.f16, meta.json, done.json). The matrix is filled `chunk` rows at a time
    and done.json (`done_rows`, replaced atomically) is updated only after each chunk is flushed to disk, so an
    interrupted encoding resumes at the first unfinished chunk and a complete cache is reused as it is. Memory
    holds one chunk of embeddings (8.8M x 768 at full scale is 13.6 GB on disk, none of it in RAM)."""
    cache_dir = Path(cache_dir)
    n = len(collection)
    dim = model.get_embedding_dimension()
    want = {"rows": n, "dim": dim, "dtype": "float16"}
    mat_path = cache_dir / "embeddings.f16"
    if _cached_rows(cache_dir, want) < n:  # a complete cache is read without the lock (a read-only data folder)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with paths.file_lock(cache_dir / "encode.lock"):  # a second evaluation of the model waits, then reuses it
            _fill_cache(model, collection, cache_dir, want, batch_size, chunk, progress)
    if n == 0:
        return np.zeros((0, dim), np.float16)
    return np.memmap(mat_path, dtype=np.float16, mode="r", shape=(n, dim))


def _cached_rows(cache_dir: Path, want: dict) -> int:
    """How many leading rows of the cache in `cache_dir` are encoded: 0 for none, or one of another shape."""
    meta_path, done_path, mat_path = cache_dir / "meta.json", cache_dir / "done.json", cache_dir / "embeddings.f16"
    if meta_path.exists() and json.loads(meta_path.read_text()) == want and mat_path.exists() \
            and mat_path.stat().st_size == want["rows"] * want["dim"] * 2 and done_path.exists():
        return min(int(json.loads(done_path.read_text())["done_rows"]), want["rows"])
    return 0


def _fill_cache(model, collection: "TextStore", cache_dir: Path, want: dict, batch_size: int, chunk: int,
                progress: bool) -> None:
    meta_path, done_path, mat_path = cache_dir / "meta.json", cache_dir / "done.json", cache_dir / "embeddings.f16"
    n, dim = want["rows"], want["dim"]
    done = _cached_rows(cache_dir, want)
    if done == 0:  # a new cache, or one of another shape: start over
        for p in (done_path, mat_path):
            p.unlink(missing_ok=True)
        write_json_atomic(meta_path, want)
        write_json_atomic(done_path, {"done_rows": 0})
    if done < n:
        from tqdm import tqdm
        mm = np.memmap(mat_path, dtype=np.float16, mode="r+" if mat_path.exists() else "w+", shape=(n, dim))
        with tqdm(total=n, initial=done, unit="passage", desc="encoding collection", disable=not progress) as bar:
            for lo in range(done, n, chunk):
                hi = min(lo + chunk, n)
                emb = model.encode_document([collection.text_at(r) for r in range(lo, hi)], batch_size=batch_size,
                                            convert_to_numpy=True, show_progress_bar=False)
                mm[lo:hi] = check_finite(np.asarray(emb, dtype=np.float32).astype(np.float16), "passage embeddings")
                mm.flush()
                release_pages(mm)  # written: out of the resident set (13 GB at full size for 768 dimensions)
                write_json_atomic(done_path, {"done_rows": hi})
                bar.update(hi - lo)
        del mm


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
        if isinstance(embeddings, np.memmap):
            release_pages(embeddings)  # read: out of the resident set, as in encode_collection
    return best_s.cpu().numpy(), best_i.cpu().numpy()
