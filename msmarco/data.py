"""One MS MARCO data folder as the scripts see it (`MSMarco`): each accessor fetches its source if missing, builds its
store once, and opens it. Also the id-only datasets the trainers draw batches from (texts are looked up per batch)."""
from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path

import numpy as np

from . import bm25, paths
from .errors import DataError
from .formats import bad_line, iter_id_text, iter_lines, iter_qrels, read_qrels
from .hard_negatives import HardNegatives, filter_negatives
from .sources import fetch
from .stores import (TEACHER_DTYPE, Grouped, GroupedWriter, ScoreStore, TextStore, build_teacher, build_triples,
                     load_array, prepared, release_pages)
from .tokens import TokenStore, tokenizer_key


TREC_DL = {2019: ("msmarco-test2019-queries.tsv.gz", "2019qrels-pass.txt", "msmarco-passagetest2019-top1000.tsv.gz"),
           2020: ("msmarco-test2020-queries.tsv.gz", "2020qrels-pass.txt", "msmarco-passagetest2020-top1000.tsv.gz")}


class MSMarco:
    """The MS MARCO passage data of one folder (data/ for the full downloads, data/sample/ for the miniature).

    Each accessor fetches its source if missing, converts it once into a memory-mapped store under
    <folder>/.prepared/, and opens that store. Stores whose ids are checked against the collection are
    rebuilt when the collection changes too. Ids are ints throughout."""

    def __init__(self, data_dir: str | Path = paths.DATA_DIR):
        self.dir = paths.resolve_dir(data_dir)
        self._cache: dict = {}

    def __reduce__(self):  # pickled as its folder: its stores are files to reopen, not data to copy (TextStore)
        return MSMarco, (self.dir,)

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def path(self, name: str) -> Path:
        return fetch(name, self.dir)

    # --- texts
    def collection(self) -> TextStore:
        def make():
            src = self.path("collection.tar.gz")
            folder = prepared(self.dir, "collection", [src], lambda d: TextStore.build(
                d, iter_id_text(src, "collection.tsv"), f"{src}:collection.tsv"))
            return TextStore(folder, "passage")
        return self._once("collection", make)

    def queries(self, split: str) -> TextStore:
        """split: train | dev (all of queries.dev.tsv; dev-small is the subset in qrels.dev.small.tsv) | eval."""
        def make():
            src = self.path("queries.tar.gz")
            member = f"queries.{split}.tsv"
            folder = prepared(self.dir, f"queries.{split}", [src], lambda d: TextStore.build(
                d, iter_id_text(src, member), f"{src}:{member}"))
            return TextStore(folder, "query")
        return self._once(("queries", split), make)

    def qrels(self, split: str) -> dict[int, dict[int, int]]:
        """split: train | dev (the dev-small judgments)."""
        name = {"train": "qrels.train.tsv", "dev": "qrels.dev.small.tsv"}[split]
        return self._once(("qrels", split), lambda: read_qrels(self.path(name)))

    # --- candidates
    def _top1000(self, key: str, src: Path, member: str | None) -> Grouped:
        def build(d: Path) -> dict:
            # int64 arrays, not lists: top1000.dev's 6.7M pids as Python ints would take ~250 MB, here ~55 MB
            groups: dict[int, array] = {}
            for lineno, line in iter_lines(src, member):
                parts = line.split(b"\t", 2)
                if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                    raise bad_line(src, lineno, line, "`qid<TAB>pid<TAB>query<TAB>passage`")
                groups.setdefault(int(parts[0]), array("q")).append(int(parts[1]))
            coll = self.collection()
            for q, pids in groups.items():
                try:
                    coll.rows_of(pids)
                except DataError as e:
                    raise DataError(f"{src}: candidates of qid {q}: {e}") from None
            Grouped.write(d, "cand", groups)
            return {"queries": len(groups), "pairs": sum(map(len, groups.values()))}
        return Grouped(prepared(self.dir, key, [src, self.path("collection.tar.gz")], build), "cand")

    def dev_candidates(self) -> Grouped:
        """qid -> BM25 candidate pids of top1000.dev, in file order."""
        return self._once("dev_cand", lambda: self._top1000(
            "top1000.dev", self.path("top1000.dev.tar.gz"), "top1000.dev"))

    def trec_dl(self, year: int) -> tuple[TextStore, dict[int, dict[int, int]], Grouped]:
        """TREC DL `year` passage task: (queries, graded qrels, BM25 top-1000 candidates)."""
        return (*self.trec_dl_topics(year), self.trec_dl_candidates(year))

    def trec_dl_topics(self, year: int) -> tuple[TextStore, dict[int, dict[int, int]]]:
        """TREC DL `year`: (queries, graded qrels), without the candidate file (a run of one's own replaces it)."""
        qname, rname, _ = TREC_DL[year]

        def make():
            qsrc = self.path(qname)
            queries = TextStore(prepared(self.dir, f"dl{year}.queries", [qsrc],
                                         lambda d: TextStore.build(d, iter_id_text(qsrc), str(qsrc))), "query")
            return queries, read_qrels(self.path(rname))
        return self._once(("dl", year), make)

    def trec_dl_candidates(self, year: int) -> Grouped:
        """qid -> BM25 top-1000 candidate pids of TREC DL `year`, in file order."""
        return self._once(("dl_cand", year), lambda: self._top1000(
            f"dl{year}.top1000", self.path(TREC_DL[year][2]), None))

    def bm25_run(self, split: str) -> Path:
        """A TREC run of BM25 over the official candidates of every judged query of `split` ("dev" or "dl<year>"),
        whose files list them in no order (msmarco.bm25); built once per data folder."""
        if split == "dev":
            names, topics, candidates = ["queries.tar.gz", "qrels.dev.small.tsv", "top1000.dev.tar.gz"], \
                (lambda: (self.queries("dev"), self.qrels("dev"))), self.dev_candidates
        else:
            year = int(split[2:])
            names, topics, candidates = list(TREC_DL[year]), (lambda: self.trec_dl_topics(year)), \
                (lambda: self.trec_dl_candidates(year))
        sources = [self.path(n) for n in names] + [self.path("collection.tar.gz")]
        key = f"bm25-{split}-" + params_key({"k1": bm25.K1, "b": bm25.B, "version": bm25.VERSION})
        folder = prepared(self.dir, key, sources,
                          lambda d: bm25.write_run(d / f"{split}.run", *topics(), candidates(), self.collection()))
        return folder / f"{split}.run"

    # --- training signals
    def hard_negatives(self) -> HardNegatives:
        def make():
            src = self.path("msmarco-hard-negatives.jsonl.gz")
            return HardNegatives(prepared(self.dir, "hard-negatives", [src, self.path("collection.tar.gz")],
                                          lambda d: HardNegatives.build(d, src, self.collection())))
        return self._once("hn", make)

    def ce_scores(self) -> ScoreStore:
        def make():
            src = self.path("cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")
            return ScoreStore(prepared(self.dir, "ce-scores", [src, self.path("collection.tar.gz")],
                                       lambda d: ScoreStore.build(d, src, self.collection())))
        return self._once("ce", make)

    def triples(self, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
        """(n, 3) int32 (qid, pid_pos, pid_neg) of qidpidtriples: every line (max_rows None), or a seeded uniform
        sample of `max_rows` lines from the whole file (all of them when the file is no longer), in file order.

        The official file is sorted by qid, ~1,000 lines per query: its first lines would be a few queries only.
        Each (max_rows, seed) is one store, built once by one pass over the whole file (3 min and 918 MiB peak at
        full size for 16M rows on 2 cores: stores.build_triples) and only opened after that."""
        def make():
            src = self.path("qidpidtriples.train.full.2.tsv.gz")
            key = "triples" + ("" if max_rows is None else f".sample{max_rows}.seed{seed}")
            folder = prepared(self.dir, key, [src, self.path("collection.tar.gz")],
                              lambda d: build_triples(d, src, self.collection(), max_rows, seed))
            return load_array(folder, "triples.bin", np.int32).reshape(-1, 3)
        return self._once(("triples", max_rows, None if max_rows is None else seed), make)

    def teacher_scores(self) -> np.ndarray:
        """Structured array (pos_score, neg_score, qid, pid_pos, pid_neg), one record per line, in file order."""
        def make():
            src = self.path("bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv")
            folder = prepared(self.dir, "teacher", [src, self.path("collection.tar.gz")],
                              lambda d: build_teacher(d, src, self.collection()))
            return load_array(folder, "teacher.bin", np.uint8).view(TEACHER_DTYPE)
        return self._once("teacher", make)

    def check_train_qids(self, qids, source: str) -> None:
        """Fail at the start, not mid-run: every query id that the training file `source` names must be in
        queries.train.tsv (its passage ids were checked against the collection when its store was built)."""
        try:
            self.queries("train").rows_of(distinct_ids(qids))
        except DataError as e:
            raise DataError(f"{self.path(source)}: {e}: it and queries.tar.gz come from different releases; delete "
                            "the one that is not the official file and download it again") from None

    def filtered_negatives(self, ce_margin: float, per_system: int, systems: tuple[str, ...] = ()) \
            -> tuple[Grouped, Grouped]:
        """Positives and CE-margin-filtered hard negatives (filter_negatives) of every training query that keeps one,
        as two Groupeds over the same qids; each query's negatives in a shuffled order. Computed once per data folder
        and setting (minutes at full scale: one pass over the hard-negative and score stores) and memory-mapped: a
        second start, and every torchrun process, only opens them."""
        hn = self.hard_negatives()
        unknown = set(systems) - set(hn.systems)
        if unknown:
            raise SystemExit(f"error: --systems names {sorted(unknown)}, not in the hard-negatives file; it has: "
                             f"{', '.join(hn.systems)}")
        setting = dict(ce_margin=ce_margin, negs_per_system=per_system, systems=sorted(systems))

        def build(folder):
            ce, rng = self.ce_scores(), np.random.default_rng(0)
            # the judged training queries, as a set for this build only: the qrels' dict of dicts (532k lines, ~180
            # MB) would otherwise stay cached for the life of the process, in every torchrun process
            qrels = {qid for qid, _, _ in iter_qrels(self.path("qrels.train.tsv"))}
            pos_w, neg_w = GroupedWriter(folder, "pos"), GroupedWriter(folder, "neg")
            for i, qid in enumerate(hn.qids.tolist()):  # ascending
                if i % 50_000 == 0:
                    release_pages(hn, ce)  # one pass over 2.4 GB of stores: keep its pages out of RSS
                pos, negs = hn.positives(qid), hn.negatives(qid)
                kept = filter_negatives(pos, negs, ce.lookup(qid, pos), {k: ce.lookup(qid, v) for k, v in negs.items()},
                                        ce_margin, per_system, systems)
                if kept and qid in qrels:
                    pos_w.add(qid, pos)
                    neg_w.add(qid, rng.permutation(kept))
            pos_w.close(), neg_w.close()
            return {"setting": setting, "queries": pos_w.qids.n, "negatives": neg_w.n}

        sources = ["msmarco-hard-negatives.jsonl.gz", "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz",
                   "qrels.train.tsv"]
        folder = prepared(self.dir, "bi-encoder-negatives-" + params_key(setting), [self.path(n) for n in sources],
                          build)
        pos = Grouped(folder, "pos")
        if not len(pos):
            raise DataError(f"no training query keeps a negative after the CE filter (ce_margin {ce_margin}, "
                            f"systems {', '.join(systems) or 'all'}): lower --ce_margin, check --systems, or check "
                            f"that {self.path('qrels.train.tsv')} judges the queries of the hard-negatives file")
        return pos, Grouped(folder, "neg")

    # --- token ids, for building training batches without tokenizing text (msmarco/tokens.py)
    def tokens(self, texts: str, tokenizer) -> TokenStore:
        """The token store of `texts` ("collection" or "queries.<split>") for `tokenizer`, built once per tokenizer
        (minutes for the full collection, on the fast tokenizer's threads) and memory-mapped afterwards."""
        store = self.collection() if texts == "collection" else self.queries(texts.split(".", 1)[1])
        src = self.path("collection.tar.gz" if texts == "collection" else "queries.tar.gz")
        key = tokenizer_key(tokenizer)

        def make():
            folder = prepared(self.dir, f"tokens.{texts}.{key}", [src],
                              lambda d: TokenStore.build(d, store, tokenizer))
            return TokenStore(folder)
        return self._once(("tokens", texts, key), make)


class TeacherSamples:
    """Rows of a teacher-line dataset as PairBatches pairs: with MSE, row 2i / 2i + 1 is line i's (query, positive,
    pos_score) / (query, negative, neg_score); with MarginMSE, row i is line i's (query, [positive, negative],
    pos_score - neg_score). Reads the memory-mapped teacher store; pickles as its data folder."""

    def __init__(self, data: MSMarco, margin: bool):
        self.data, self.margin = data, margin

    def __call__(self, columns: dict):
        rows = np.asarray(columns["row"], dtype=np.int64)
        rec = self.data.teacher_scores()[rows // (1 if self.margin else 2)]
        if self.margin:
            return rec["qid"], np.stack([rec["pid_pos"], rec["pid_neg"]], 1), rec["pos_score"] - rec["neg_score"]
        pos = rows % 2 == 0
        return rec["qid"], np.where(pos, rec["pid_pos"], rec["pid_neg"]), np.where(pos, rec["pos_score"],
                                                                                     rec["neg_score"])


def shuffle_within_groups(ptr: np.ndarray, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`values` with each group values[ptr[i]:ptr[i + 1]] in a random order (one argsort, not a loop)."""
    owner = np.repeat(np.arange(len(ptr) - 1, dtype=np.float64), np.diff(ptr))
    return np.asarray(values)[np.argsort(owner + rng.random(len(owner)), kind="stable")]


def distinct_ids(ids) -> np.ndarray:
    """The distinct values of a large array of ids, ascending. Ids are small non-negative ints (qids < 1.2M, pids
    < 8.9M), so one pass that marks each id (a byte per possible id) replaces np.unique's sort: 40M teacher qids
    in ~0.2 s instead of ~4 s at every start."""
    ids = np.asarray(ids)
    if ids.size == 0 or ids.min() < 0 or ids.max() > 1 << 28:
        return np.unique(ids)
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    seen[ids] = True
    return np.flatnonzero(seen)


def id_dataset(columns: dict[str, np.ndarray], name: str):
    """A datasets.Dataset of numpy id columns, without a copy: pyarrow wraps the arrays in place, and a given
    fingerprint spares `datasets` from hashing the whole table, which peaked at 4x its size (+1.2 GB at 1.3 s for
    v2's 80M rows; with this: +2 MB, 6 ms). Texts are looked up per batch (with_transform), never stored."""
    import pyarrow as pa
    from datasets import Dataset
    cols = {k: np.ascontiguousarray(v) for k, v in columns.items()}
    probe = {k: v[::max(1, len(v) // 4096)].tolist() for k, v in cols.items()}  # cheap content check
    rows = len(next(iter(cols.values())))
    return Dataset(pa.table(cols), fingerprint=f"{name}-{params_key({'rows': rows, **probe})}")


def params_key(params: dict) -> str:
    """A short stable name for a setting (e.g. a filter's thresholds), to keep one derived store per setting."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
