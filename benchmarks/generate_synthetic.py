"""Synthetic MS MARCO training sources in the exact real file formats, at any scale.

    python benchmarks/generate_synthetic.py OUT_DIR --factor 0.01 [--seed 0] [--only collection,ce_scores,...]

`--factor 1.0` gives the real sizes: 8,841,823 passages, ~502,939 training queries with ~320 cross-encoder
scores each (~160M entries), 40M teacher lines, 397,768,673 triples lines, one hard-negatives line per query
(13 systems, up to 50 negatives each). The folder it writes works as an `msmarco.data.MSMarco` data folder: the
files are present, so nothing is downloaded.

Files (names as in msmarco.sources.SOURCES):
  collection.tar.gz               member collection.tsv, `pid \\t passage`, pids 0..N-1; random words with a
                                  long-tailed length distribution (mean ~330 bytes, ~58 words, at most ~1,700
                                  bytes), ~10% of passages carry the real collection's double-encoded UTF-8
                                  (``donâ\\x80\\x99t``) and ~1% genuine UTF-8 (``café``), which does not round-trip
  cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz
                                  gzipped pickle of {qid: {pid: score}} (int -> float): for each hard-negatives
                                  query, its line's distinct pids (~290 per query; the real file ~320; positives
                                  score high, so the bi-encoder's CE-margin filter keeps a share), written by a streaming
                                  writer that never builds the dict: the opcode stream of the C pickler's
                                  pickle.dumps(d, protocol=4) (PROTO, EMPTY_DICT, MEMOIZE, MARK, BININT/BININT1/
                                  BININT2 keys, BINFLOAT values, SETITEMS per 1,000 items, SETITEM for a dict of
                                  one item, STOP), with FRAME opcodes at query boundaries (~64 KiB frames; the C
                                  pickler puts its frame boundaries elsewhere) or none (framing=False)
  bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv
                                  `pos_score \\t neg_score \\t qid \\t pid_pos \\t pid_neg`, scores with 6 decimals
  msmarco-hard-negatives.jsonl.gz {"qid": int, "pos": [pid], "neg": {system: [pid]}}, 13 real system names
  qidpidtriples.train.full.2.tsv.gz
                                  `qid \\t pid_pos \\t pid_neg`, 397,768,673 * factor lines, in the real file's order:
                                  sorted by qid as text (then pid_pos, pid_neg), ~1,000 lines per query (~400k
                                  queries at factor 1.0), 1-3 positives per query each paired with its negatives.
                                  The scripts read a seeded uniform sample of it (MSMarco.triples(max_rows, seed)),
                                  one pass over the whole file; its first lines would be a few queries only
  queries.tar.gz                  members queries.train.tsv (every qid below the training qid range, so each
                                  qid of the files above has a text: 1.2M queries against the real 808,731) and
                                  queries.dev.tsv (101,093 * factor), `qid \\t query`, 3-12 random words
  qrels.train.tsv                 `qid 0 pid 1`, the positives of the hard-negatives file (written with it)
  qrels.dev.small.tsv             6,980 * factor dev queries, 1-2 positives each
  top1000.dev.tar.gz              member top1000.dev, `qid \\t pid \\t query \\t passage`, ~955 candidates per
                                  dev-small query (6.67M lines at factor 1.0, 2.9 GB of text), each query's lines
                                  together and its candidates in random order (the real file is in no BM25 order
                                  either: its lines are sorted by pid as text, the queries interleaved); the passage
                                  text is random words, not the collection's (the store reads only the ids)

Everything is generated in numpy chunks with per-chunk seeded generators (memory stays at one chunk, and a
chunk can be regenerated to check what a store returns: see `iter_score_chunks`, `iter_teacher_chunks`).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REAL = {
    "passages": 8_841_823,
    "queries": 502_939,  # training queries with hard negatives and cross-encoder scores
    "scores_per_query": 320,  # ~160M (qid, pid, score) entries in all
    "teacher_lines": 40_000_000,
    "triples_lines": 397_768_673,  # qidpidtriples.train.full.2.tsv.gz, sorted by qid
    "triples_per_query": 1_000,  # ~400k training queries in it, ~1,000 lines each
    "dev_queries": 101_093,  # queries.dev.tsv
    "dev_small_queries": 6_980,  # qrels.dev.small.tsv, each with ~955 BM25 candidates in top1000.dev
    "candidates_per_query": 955,
}
QID_RANGE = 1_200_000  # real training qids lie below ~1.19M
HN_CHUNK = 5_000  # queries per generated chunk of the hard-negatives file (and of their scores)

SYSTEMS = ["bm25", "msmarco-distilbert-base-tas-b", "msmarco-distilbert-base-v3", "msmarco-MiniLM-L-6-v3",
           "distilbert-margin_mse-cls-dot-v2", "distilbert-margin_mse-cls-dot-v1", "distilbert-margin_mse-mean-dot-v1",
           "mpnet-margin_mse-mean-v1", "co-condenser-margin_mse-cls-v1", "distilbert-margin_mse-mnrl-mean-v1",
           "distilbert-margin_mse-sym_mnrl-mean-v1", "distilbert-margin_mse-sym_mnrl-mean-v2",
           "co-condenser-margin_mse-sym_mnrl-mean-v1"]

FILES = {
    "collection": "collection.tar.gz",
    "ce_scores": "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz",
    "teacher": "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv",
    "hard_negatives": "msmarco-hard-negatives.jsonl.gz",
    "triples": "qidpidtriples.train.full.2.tsv.gz",
    "queries": "queries.tar.gz",
    "dev": "top1000.dev.tar.gz",
}
# written by the same job as the file of FILES[job]
EXTRA_FILES = {"hard_negatives": "qrels.train.tsv", "dev": "qrels.dev.small.tsv"}

# stream ids for the per-chunk generators: every file draws from its own streams
_S_VOCAB, _S_COLL, _S_QIDS, _S_CE, _S_TEACHER, _S_HN, _S_TRIPLES, _S_QTEXT, _S_DEV = range(9)


def sizes(factor: float) -> dict:
    """Row counts at `factor` (1.0 = real sizes)."""
    q = max(1, round(REAL["queries"] * factor))
    return {"passages": max(1000, round(REAL["passages"] * factor)), "queries": q,
            "ce_entries_approx": q * REAL["scores_per_query"],
            "teacher_lines": max(1, round(REAL["teacher_lines"] * factor)),
            "triples_lines": max(1, round(REAL["triples_lines"] * factor)),
            "dev_queries": max(200, round(REAL["dev_queries"] * factor)),
            "dev_small_queries": max(50, round(REAL["dev_small_queries"] * factor))}


def _rng(seed: int, stream: int, chunk: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, chunk])


def query_ids(n_queries: int, seed: int = 0) -> np.ndarray:
    """The training qids (distinct, in random order) shared by the score pickle and hard negatives."""
    hi = max(QID_RANGE, 3 * n_queries)
    return _rng(seed, _S_QIDS).choice(hi, size=n_queries, replace=False).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Vectorized text rendering: numbers to ASCII without a Python call per value.
# --------------------------------------------------------------------------------------------
def _digits(x: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8 decimal digits of non-negative ints, leading zeros as 0 bytes (dropped later)."""
    x = np.asarray(x, dtype=np.int64)
    out = np.empty((len(x), width), dtype=np.uint8)
    v = x.copy()
    for k in range(width - 1, -1, -1):
        out[:, k] = (v % 10) + 48
        v //= 10
    if width > 1:  # blank leading zeros (but keep the last digit)
        p = 10 ** np.arange(width - 1, 0, -1, dtype=np.int64)  # place value of columns 0..width-2
        out[:, :width - 1][x[:, None] < p[None, :]] = 0
    return out


def _int_col(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    width = max(1, len(str(int(x.max())))) if len(x) else 1
    return _digits(x, width)


def _fixed_col(q: np.ndarray, decimals: int) -> np.ndarray:
    """Columns for the value q / 10**decimals (q int64, any sign) as `-123.456789`."""
    q = np.asarray(q, dtype=np.int64)
    a = np.abs(q)
    ip, fp = a // 10 ** decimals, a % 10 ** decimals
    sign = np.where(q < 0, ord("-"), 0).astype(np.uint8)[:, None]
    dot = np.full((len(q), 1), ord("."), dtype=np.uint8)
    frac = _digits(fp + 10 ** decimals, decimals + 1)[:, 1:]  # keep leading zeros of the fraction
    return np.hstack([sign, _int_col(ip), dot, frac])


def _lines(cols: list[np.ndarray], sep: bytes = b"\t") -> bytes:
    """Join per-row column blocks with `sep`, end each row with a newline, drop the 0 padding bytes."""
    n = len(cols[0])
    s = np.full((n, 1), sep[0], dtype=np.uint8)
    nl = np.full((n, 1), 10, dtype=np.uint8)
    parts = []
    for i, c in enumerate(cols):
        parts += [c, s] if i < len(cols) - 1 else [c, nl]
    m = np.hstack(parts)
    return m[m != 0].tobytes()


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------
_MOJIBAKE = ["don’t", "it’s", "“quoted”", "1990–2000", "—", "etc…", "‘single’", "•", "can’t", "−5"]
_GENUINE = ["café", "naïve", "résumé", "€20", "São", "Zürich"]


def _vocabulary(seed: int, size: int = 50_000):
    """(concatenated word bytes each followed by a space, start offsets, lengths incl. the space, cdf)."""
    rng = _rng(seed, _S_VOCAB)
    lens = np.clip(rng.poisson(3.7, size) + 1, 1, 18)  # mean ~4.7 letters, as English text
    letters = rng.integers(97, 123, int(lens.sum()), dtype=np.uint8)
    words = []
    pos = 0
    for n in lens.tolist():
        words.append(letters[pos:pos + n].tobytes())
        pos += n
    freq = 1.0 / (np.arange(size) + 2.7)
    freq /= freq.sum()
    # special words: double-encoded UTF-8 (as in the real collection.tsv) and genuine UTF-8 (does not round-trip)
    mojibake = [w.encode("utf-8").decode("latin-1").encode("utf-8") for w in _MOJIBAKE]
    genuine = [w.encode("utf-8") for w in _GENUINE]
    words += mojibake + genuine
    freq = np.concatenate([freq * (1 - 0.0020 - 0.0002), np.full(len(mojibake), 0.0020 / len(mojibake)),
                           np.full(len(genuine), 0.0002 / len(genuine))])
    blob = b"".join(w + b" " for w in words)
    wl = np.array([len(w) + 1 for w in words], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(wl)[:-1]])
    cdf = np.cumsum(freq)
    cdf /= cdf[-1]
    return np.frombuffer(blob, dtype=np.uint8), starts, wl, cdf


def iter_collection_chunks(n_passages: int, seed: int = 0, chunk: int = 20_000) -> Iterator[bytes]:
    """collection.tsv content, `pid \\t passage \\n` for pids 0..n-1, in chunks of `chunk` lines."""
    blob, starts, wl, cdf = _vocabulary(seed)
    mean_wbytes = float((np.diff(np.concatenate([[0.0], cdf])) * wl).sum())
    # words per passage: log-normal (sample: median 54, sigma 0.40), scaled to a ~330-byte mean, <= ~1,700 bytes
    mu = np.log(330 / mean_wbytes) - 0.42 ** 2 / 2
    max_words = int(1690 / mean_wbytes)
    for c, lo in enumerate(range(0, n_passages, chunk)):
        rng = _rng(seed, _S_COLL, c)
        n = min(chunk, n_passages - lo)
        nw = np.clip(np.rint(rng.lognormal(mu, 0.42, n)), 3, max_words).astype(np.int64)
        w = np.searchsorted(cdf, rng.random(int(nw.sum())), side="right")
        w = np.minimum(w, len(cdf) - 1)
        l = wl[w]
        # passage body: the words' bytes (each followed by a space) gathered in one ragged copy
        wstart = np.concatenate([[0], np.cumsum(l)[:-1]])
        body = blob[np.repeat(starts[w] - wstart, l) + np.arange(int(l.sum()))]
        word_end = np.cumsum(l)
        pend = word_end[np.cumsum(nw) - 1]  # end (after the space) of each passage's last word
        blen = np.diff(np.concatenate([[0], pend]))  # body bytes incl. the trailing space
        body[pend - 1] = 10  # the trailing space of each passage becomes the newline
        head = _lines([_int_col(np.arange(lo, lo + n))], sep=b"\t")  # "pid\n" per line
        head = np.frombuffer(head, dtype=np.uint8).copy()
        hlen = np.diff(np.concatenate([[0], np.flatnonzero(head == 10) + 1]))
        head[head == 10] = 9  # "pid\t"
        # interleave head_i + body_i
        llen = hlen + blen
        lstart = np.concatenate([[0], np.cumsum(llen)[:-1]])
        out = np.empty(int(llen.sum()), dtype=np.uint8)
        hstart = np.concatenate([[0], np.cumsum(hlen)[:-1]])
        out[np.repeat(lstart - hstart, hlen) + np.arange(len(head))] = head
        bstart = np.concatenate([[0], np.cumsum(blen)[:-1]])
        out[np.repeat(lstart + hlen - bstart, blen) + np.arange(len(body))] = body
        yield out.tobytes()


def write_collection(path: Path, n_passages: int, seed: int = 0, level: int = 1) -> dict:
    """collection.tar.gz with member collection.tsv (written to a temporary file first: tar needs the size)."""
    path = Path(path)
    tmp = path.with_name("collection.tsv.tmp")
    size = 0
    with open(tmp, "wb") as f:
        for b in iter_collection_chunks(n_passages, seed):
            f.write(b)
            size += len(b)
    try:
        part = path.with_name(path.name + ".part")
        with tarfile.open(part, "w:gz", compresslevel=level) as tar, open(tmp, "rb") as f:
            info = tarfile.TarInfo("collection.tsv")
            info.size, info.mtime, info.mode = size, int(time.time()), 0o644
            tar.addfile(info, f)
        os.replace(part, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rows": n_passages, "text_bytes": size}


# --------------------------------------------------------------------------------------------
# Cross-encoder scores: chunks of queries, and a streaming pickle writer
# --------------------------------------------------------------------------------------------
def iter_score_chunks(qids: np.ndarray, n_passages: int, mean_per_query: float = 320, seed: int = 0,
                      chunk_queries: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(qids, ptr, pids, scores) per chunk of queries: query j of the chunk has pids[ptr[j]:ptr[j+1]] (distinct,
    in random order) with float32-exact scores (float64 values, as a pickled Python float from a float32 logit).

    Per-query counts: gamma-distributed around `mean_per_query` (1..~4.7x the mean, so a few exceed the
    pickler's 1,000-item batches), a few queries with exactly one entry."""
    qids = np.asarray(qids, dtype=np.int64)
    for c, lo in enumerate(range(0, len(qids), chunk_queries)):
        rng = _rng(seed, _S_CE, c)
        q = qids[lo:lo + chunk_queries]
        nq = len(q)
        cnt = np.clip(np.rint(rng.gamma(4.0, mean_per_query / 4.0, nq)), 1, max(1, int(4.7 * mean_per_query)))
        cnt[rng.random(nq) < 0.002] = 1
        cnt = np.minimum(cnt.astype(np.int64), n_passages)
        owner = np.repeat(np.arange(nq, dtype=np.int64), cnt)
        key = np.unique(owner * n_passages + rng.integers(0, n_passages, len(owner)))  # distinct per query
        owner, pid = key // n_passages, key % n_passages
        order = np.lexsort((rng.random(len(key)), owner))  # random order within each query
        pid = pid[order]
        ptr = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=nq))])
        scores = rng.normal(-2.0, 4.5, len(pid)).astype(np.float32).astype(np.float64)
        yield q, ptr, pid, scores


def _int_op(x: int) -> bytes:
    """The C pickler's encoding of an int (protocol >= 1)."""
    if 0 <= x <= 0xFF:
        return b"K" + bytes([x])
    if 0 <= x <= 0xFFFF:
        return b"M" + x.to_bytes(2, "little")
    if -0x80000000 <= x <= 0x7FFFFFFF:
        return b"J" + x.to_bytes(4, "little", signed=True)
    n = (x.bit_length() + 8) // 8  # LONG1 (not used by the synthetic ids, here for completeness)
    return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)


def _entry_bytes(pids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pickled `key value` pairs of one chunk as one uint8 array, and each entry's byte offset (n+1)."""
    pids = np.asarray(pids, dtype=np.int64)
    n = len(pids)
    if n and (pids.min() < 0 or pids.max() > 0x7FFFFFFF):
        raise ValueError("pids must be in 0..2**31-1")
    rec = np.empty((n, 14), dtype=np.uint8)
    rec[:, 0] = np.where(pids <= 0xFF, ord("K"), np.where(pids <= 0xFFFF, ord("M"), ord("J")))
    rec[:, 1:5] = pids.astype("<i4").view(np.uint8).reshape(n, 4)
    rec[:, 5] = ord("G")
    rec[:, 6:14] = np.asarray(scores, dtype=">f8").view(np.uint8).reshape(n, 8)
    mask = np.ones((n, 14), dtype=bool)
    mask[:, 2] = pids > 0xFF
    mask[:, 3:5] = (pids > 0xFFFF)[:, None]
    lens = 11 + (pids > 0xFF) + 2 * (pids > 0xFFFF)
    return rec[mask], np.concatenate([[0], np.cumsum(lens)])


def _dict_body(flat: memoryview, off: np.ndarray, a: int, b: int, batch: int = 1000) -> list:
    """Items a..b of a dict after its `} MEMOIZE`, batched as the C pickler does (batch_dict_exact):
    one item -> `k v SETITEM`; otherwise `MARK <= batch items SETITEMS` repeated while a batch is full
    (so a multiple of `batch` ends with an empty `MARK SETITEMS`); nothing for an empty dict."""
    c = b - a
    if c == 0:
        return []
    if c == 1:
        return [flat[off[a]:off[b]], b"s"]
    out = []
    s = a
    while True:
        e = min(s + batch, b)
        out += [b"(", flat[off[s]:off[e]], b"u"]
        if e - s < batch:
            return out
        s = e


class ScorePickleWriter:
    """Writes {qid: {pid: score}} as a protocol-4 pickle, one query at a time, without building the dict.

    The opcodes are those of the C pickler's pickle.dumps(d, protocol=4) for a dict of dicts of int -> float
    (in insertion order); FRAME opcodes (framing=True) are placed at query boundaries once a frame holds
    >= 64 KiB, where the C pickler places them at its own opcode boundaries."""

    FRAME_TARGET = 64 * 1024

    def __init__(self, f, framing: bool = True, batch: int = 1000):
        self.f, self.framing, self.batch = f, framing, batch
        self.n = 0  # queries so far
        self.in_batch = 0
        self.pending: list | None = None  # the first item, held back: a 1-item dict uses SETITEM
        self.frame: list = []
        self.frame_len = 0
        self.f.write(b"\x80\x04")  # PROTO 4, outside any frame
        self._put([b"}\x94"])  # the outer dict, memo 0

    def _put(self, pieces: list) -> None:
        """Append complete opcodes; a full frame is committed first (without framing: just flushed)."""
        if self.frame_len >= self.FRAME_TARGET:
            self._commit()
        for p in pieces:
            self.frame.append(p)
            self.frame_len += len(p)

    def _commit(self) -> None:
        if not self.frame:
            return
        if self.framing and self.frame_len >= 4:
            self.f.write(b"\x95" + self.frame_len.to_bytes(8, "little"))
        self.f.write(b"".join(self.frame))
        self.frame, self.frame_len = [], 0

    def _item(self, pieces: list) -> None:
        if self.n == 0:
            self.pending = pieces
        elif self.n == 1:
            self._put([b"("] + self.pending + pieces)
            self.pending = None
            self.in_batch = 2
        else:
            if self.in_batch == self.batch:
                self._put([b"u("])
                self.in_batch = 0
            self._put(pieces)
            self.in_batch += 1
        self.n += 1

    def add_chunk(self, qids, ptr, pids, scores) -> None:
        """Queries qids[j] -> {pids[ptr[j]:ptr[j+1]]: scores[...]}, in order."""
        flat, off = _entry_bytes(pids, scores)
        flat = memoryview(flat)
        off = off.tolist()
        ptr = np.asarray(ptr).tolist()
        for j, q in enumerate(np.asarray(qids).tolist()):
            self._item([_int_op(q), b"}\x94"] + _dict_body(flat, off, ptr[j], ptr[j + 1], self.batch))

    def close(self) -> None:
        if self.n == 1:
            self._put(self.pending + [b"s"])
        elif self.n > 1:
            self._put([b"u"] + ([b"(u"] if self.in_batch == self.batch else []))
        self._put([b"."])
        self._commit()


def score_pickle_bytes(chunks: Iterable, framing: bool = True) -> bytes:
    """The whole pickle in memory (for small checks)."""
    buf = io.BytesIO()
    w = ScorePickleWriter(buf, framing=framing)
    for ch in chunks:
        w.add_chunk(*ch)
    w.close()
    return buf.getvalue()


def chunks_to_dict(chunks: Iterable) -> dict:
    """The dict the chunks mean (small sizes only)."""
    d = {}
    for q, ptr, pids, scores in chunks:
        for j, qid in enumerate(np.asarray(q).tolist()):
            d[qid] = dict(zip(pids[ptr[j]:ptr[j + 1]].tolist(), scores[ptr[j]:ptr[j + 1]].tolist()))
    return d


def write_score_pickle(path: Path, chunks: Iterable, level: int = 1, framing: bool = True) -> dict:
    path = Path(path)
    part = path.with_name(path.name + ".part")
    n = nq = 0
    with gzip.open(part, "wb", compresslevel=level) as f:
        w = ScorePickleWriter(f, framing=framing)
        for ch in chunks:
            w.add_chunk(*ch)
            n += len(ch[2])
            nq += len(ch[0])
        w.close()
    os.replace(part, path)
    return {"rows": n, "queries": nq}


# --------------------------------------------------------------------------------------------
# Teacher scores, triples, hard negatives
# --------------------------------------------------------------------------------------------
def iter_teacher_chunks(n_lines: int, n_passages: int, seed: int = 0, chunk: int = 500_000,
                        qid_range: int = QID_RANGE) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, int64 (n, 5) array): pos_score*1e6, neg_score*1e6 (as written: 6 decimals), qid, pid_pos, pid_neg.
    The intended float of a score column is value / 1e6."""
    for c, lo in enumerate(range(0, n_lines, chunk)):
        rng = _rng(seed, _S_TEACHER, c)
        n = min(chunk, n_lines - lo)
        a = np.empty((n, 5), dtype=np.int64)
        a[:, 0] = np.rint(rng.normal(6.0, 3.0, n) * 1e6)
        a[:, 1] = np.rint(rng.normal(-4.0, 4.0, n) * 1e6)
        a[:, 2] = rng.integers(0, qid_range, n)
        a[:, 3] = rng.integers(0, n_passages, n)
        a[:, 4] = rng.integers(0, n_passages, n)
        yield lo, a


def write_teacher(path: Path, n_lines: int, n_passages: int, seed: int = 0) -> dict:
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        for _, a in iter_teacher_chunks(n_lines, n_passages, seed):
            f.write(_lines([_fixed_col(a[:, 0], 6), _fixed_col(a[:, 1], 6), _int_col(a[:, 2]), _int_col(a[:, 3]),
                            _int_col(a[:, 4])]))
    os.replace(part, path)
    return {"rows": n_lines}


def text_order(x: np.ndarray) -> np.ndarray:
    """int64 keys that sort non-negative ints (< 10**9) as their decimal text sorts ("10" < "9", "1" < "10"), the
    order of a plain `sort` of the lines: digits padded on the right to 9 places, then the length (shorter first)."""
    x = np.asarray(x, dtype=np.int64)
    d = np.ones(len(x), dtype=np.int64)
    for k in range(1, 9):
        d += x >= 10 ** k
    return x * 10 ** (9 - d) * 10 + d


def triples_queries(n_lines: int, seed: int = 0, qid_range: int = QID_RANGE,
                    per_query: int = REAL["triples_per_query"]) -> tuple[np.ndarray, np.ndarray]:
    """(qids in file order, lines per query) of the synthetic qidpidtriples: round(n_lines / per_query) distinct
    qids, in the real file's order (ascending as text), with 0.5x-1.5x `per_query` lines each, n_lines in all."""
    n_q = max(1, min(round(n_lines / per_query), qid_range, n_lines))
    rng = _rng(seed, _S_TRIPLES, 1 << 20)
    qids = rng.choice(qid_range, n_q, replace=False).astype(np.int64)
    qids = qids[np.argsort(text_order(qids), kind="stable")]
    w = rng.uniform(0.5, 1.5, n_q)
    counts = np.floor(w / w.sum() * n_lines).astype(np.int64)
    counts[rng.choice(n_q, n_lines - int(counts.sum()), replace=False)] += 1  # the remainder: n_lines in all
    return qids, counts


def iter_triples_chunks(n_lines: int, n_passages: int, seed: int = 0, qid_range: int = QID_RANGE,
                        chunk_queries: int = 500) -> Iterator[np.ndarray]:
    """int64 (n, 3) chunks of the synthetic qidpidtriples, in file order: queries as triples_queries(), each query's
    lines together, like the real file (which is sorted as text: qid, then pid_pos, then pid_neg). A query has 1-3
    positives, each paired with the query's negatives (distinct random pids) until its line count is reached."""
    qids, counts = triples_queries(n_lines, seed, qid_range)
    for c, lo in enumerate(range(0, len(qids), chunk_queries)):
        rng = _rng(seed, _S_TRIPLES, c)
        parts = []
        for qid, cnt in zip(qids[lo:lo + chunk_queries].tolist(), counts[lo:lo + chunk_queries].tolist()):
            if cnt == 0:
                continue
            npos = min(int(rng.choice([1, 1, 1, 1, 2, 3])), cnt)
            pos = rng.integers(0, n_passages, npos)
            neg = rng.integers(0, n_passages, -(-cnt // npos))
            p, n = np.repeat(pos, len(neg))[:cnt], np.tile(neg, npos)[:cnt]
            order = np.lexsort((text_order(n), text_order(p)))
            parts.append(np.stack([np.full(cnt, qid), p[order], n[order]], 1))
        if parts:
            yield np.concatenate(parts)


def write_triples(path: Path, n_lines: int, n_passages: int, seed: int = 0, level: int = 1,
                  qid_range: int = QID_RANGE) -> dict:
    """qidpidtriples.train.full.2.tsv.gz, sorted by qid like the real file (~1,000 lines per query), streamed one
    chunk of 500 queries at a time."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    n = 0
    with gzip.open(part, "wb", compresslevel=level) as f:
        for a in iter_triples_chunks(n_lines, n_passages, seed, qid_range):
            f.write(_lines([_int_col(a[:, 0]), _int_col(a[:, 1]), _int_col(a[:, 2])]))
            n += len(a)
    os.replace(part, path)
    return {"rows": n}


def hard_negative_chunk(n_queries: int, c: int, n_passages: int, seed: int = 0, candidates: int = 330):
    """Chunk c of the hard-negatives file: positives per query (1-3), negatives per query and system (20..50),
    and the pool of pids they take in order (per query: its positives, then each system's negatives).
    The systems retrieve from one set of `candidates` pids per query (a random window each), so their lists
    overlap as the real ones do: ~290 distinct pids per query (the real score pickle holds ~320)."""
    rng = _rng(seed, _S_HN, c)
    npos = rng.choice([1, 1, 1, 1, 2, 3], n_queries)
    nneg = np.where(rng.random((n_queries, len(SYSTEMS))) < 0.8, 50,
                    rng.integers(20, 50, (n_queries, len(SYSTEMS))))
    stride = rng.integers(1, max(2, n_passages // candidates), (n_queries, 1))  # distinct: no wrap past the start
    cand = (rng.integers(0, n_passages, (n_queries, 1)) + stride * np.arange(candidates)) % n_passages
    window = (rng.integers(0, candidates, (n_queries, len(SYSTEMS)))[:, :, None] + np.arange(50)) % candidates
    negs = np.take_along_axis(cand[:, None, :], window, axis=2).reshape(n_queries, -1)  # (query, system * 50)
    pos = rng.integers(0, n_passages, (n_queries, 3))
    keep = np.hstack([np.arange(3) < npos[:, None], (np.arange(50) < nneg[:, :, None]).reshape(n_queries, -1)])
    pool = np.hstack([pos, negs])[keep]  # row-major: each query's positives, then its systems in order
    return npos, nneg, pool


def iter_hn_score_chunks(qids: np.ndarray, n_passages: int, seed: int = 0, chunk: int = HN_CHUNK):
    """Score chunks (as iter_score_chunks) for the hard-negatives file's queries: each query scores exactly the
    distinct pids of its line, as the real pickle does (it was made by scoring them, ~320 per query).
    Positives score around +7 and negatives around -2 (sd 4.5), so the CE-margin filter keeps a share of them."""
    qids = np.asarray(qids, dtype=np.int64)
    for c, lo in enumerate(range(0, len(qids), chunk)):
        q = qids[lo:lo + chunk]
        npos, nneg, pool = hard_negative_chunk(len(q), c, n_passages, seed)
        per_query = npos + nneg.sum(1)
        owner = np.repeat(np.arange(len(q), dtype=np.int64), per_query)
        start = np.repeat(np.cumsum(per_query) - per_query, per_query)
        is_pos = np.arange(len(pool)) - start < np.repeat(npos, per_query)
        _, first = np.unique(owner * n_passages + pool, return_index=True)  # distinct per query; a positive wins
        rng = _rng(seed, _S_CE, c)
        scores = np.where(is_pos[first], rng.normal(7.0, 2.0, len(first)), rng.normal(-2.0, 4.5, len(first)))
        ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[first], minlength=len(q)))])
        yield q, ptr, pool[first].astype(np.int64), scores.astype(np.float32).astype(np.float64)


def write_hard_negatives(path: Path, qids: np.ndarray, n_passages: int, seed: int = 0, level: int = 1,
                         chunk: int = HN_CHUNK, qrels_path: Path | None = None) -> dict:
    """One line per query: 1-3 positives; per system (all 13, in the same key order) 20..50 negatives.
    With `qrels_path`, also the qrels.train.tsv of those positives."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    n_neg = 0
    qrels = open(qrels_path, "w") if qrels_path is not None else None
    with gzip.open(part, "wb", compresslevel=level) as f:
        for c, lo in enumerate(range(0, len(qids), chunk)):
            q = qids[lo:lo + chunk].tolist()
            npos, nneg, pool = hard_negative_chunk(len(q), c, n_passages, seed)
            npos, pool = npos.tolist(), pool.tolist()
            k = 0
            out = []
            for i, qid in enumerate(q):
                pos = pool[k:k + npos[i]]
                k += npos[i]
                neg = {}
                for s, name in enumerate(SYSTEMS):
                    m = int(nneg[i, s])
                    neg[name] = pool[k:k + m]
                    k += m
                out.append(json.dumps({"qid": qid, "pos": pos, "neg": neg}))
                if qrels is not None:
                    qrels.write("".join(f"{qid}\t0\t{p}\t1\n" for p in pos))
            n_neg += int(nneg.sum())
            f.write(("\n".join(out) + "\n").encode())
    if qrels is not None:
        qrels.close()
    os.replace(part, path)
    return {"rows": len(qids), "negatives": n_neg}


# --------------------------------------------------------------------------------------------
# Queries, dev qrels and dev candidates
# --------------------------------------------------------------------------------------------
def _words(seed: int) -> list[bytes]:
    blob, starts, wl, _ = _vocabulary(seed)
    return [blob[a:a + n - 1].tobytes() for a, n in zip(starts.tolist(), wl.tolist())]


def _texts(rng: np.random.Generator, words: list[bytes], n: int, lo: int, hi: int) -> list[bytes]:
    """n texts of lo..hi random words (uniform over the vocabulary: the store never looks at them)."""
    counts = rng.integers(lo, hi + 1, n)
    w = rng.integers(0, len(words), int(counts.sum())).tolist()
    out, k = [], 0
    for c in counts.tolist():
        out.append(b" ".join(words[i] for i in w[k:k + c]))
        k += c
    return out


def _add_member(tar: tarfile.TarFile, name: str, data_path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = data_path.stat().st_size, int(time.time()), 0o644
    with open(data_path, "rb") as f:
        tar.addfile(info, f)


def dev_query_ids(n_dev: int, n_train_range: int) -> np.ndarray:
    """Dev qids: a range above every training qid, so the splits never share a query."""
    return np.arange(n_train_range, n_train_range + n_dev, dtype=np.int64)


def write_queries(path: Path, n_train_range: int, n_dev: int, seed: int = 0, chunk: int = 100_000) -> dict:
    """queries.tar.gz: queries.train.tsv for every qid in [0, n_train_range), queries.dev.tsv for the dev qids."""
    path = Path(path)
    words = _words(seed)
    tmp = {m: path.with_name(f"{m}.tmp") for m in ("queries.train.tsv", "queries.dev.tsv")}
    try:
        for c, (member, ids) in enumerate([("queries.train.tsv", np.arange(n_train_range)),
                                           ("queries.dev.tsv", dev_query_ids(n_dev, n_train_range))]):
            with open(tmp[member], "wb") as f:
                for k, lo in enumerate(range(0, len(ids), chunk)):
                    part_ids = ids[lo:lo + chunk].tolist()
                    texts = _texts(_rng(seed, _S_QTEXT, c * 10_000 + k), words, len(part_ids), 3, 12)
                    f.write(b"".join(b"%d\t%s\n" % (q, t) for q, t in zip(part_ids, texts)))
        part = path.with_name(path.name + ".part")
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:
            for member, p in tmp.items():
                _add_member(tar, member, p)
        os.replace(part, path)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return {"rows": n_train_range + n_dev}


def write_dev(path: Path, qrels_path: Path, n_train_range: int, n_dev: int, n_small: int, n_passages: int,
              per_query: int = REAL["candidates_per_query"], seed: int = 0, chunk: int = 200) -> dict:
    """top1000.dev.tar.gz and qrels.dev.small.tsv for the first `n_small` dev qids: 1-2 positives each, about
    60% of them among the query's `per_query` candidates (like BM25's recall@1000 on dev-small, ~0.86, roughly)."""
    path = Path(path)
    words = _words(seed)
    dev = dev_query_ids(n_dev, n_train_range)[:n_small]
    tmp = path.with_name("top1000.dev.tmp")
    lines = 0
    try:
        with open(tmp, "wb") as f, open(qrels_path, "w") as qrels:
            for c, lo in enumerate(range(0, len(dev), chunk)):
                rng = _rng(seed, _S_DEV, c)
                for qid in dev[lo:lo + chunk].tolist():
                    pos = rng.choice(n_passages, rng.choice([1, 1, 1, 2]), replace=False).tolist()
                    qrels.write("".join(f"{qid}\t0\t{p}\t1\n" for p in pos))
                    n = int(rng.integers(per_query // 2, per_query * 2 - per_query // 2 + 1))
                    cands = np.unique(rng.integers(0, n_passages, n))
                    cands = rng.permutation(np.concatenate([cands, [p for p in pos if rng.random() < 0.6
                                                                    and p not in set(cands.tolist())]]).astype(np.int64))
                    query = _texts(rng, words, 1, 3, 12)[0]
                    texts = _texts(rng, words, len(cands), 20, 90)
                    f.write(b"".join(b"%d\t%d\t%s\t%s\n" % (qid, p, query, t) for p, t in zip(cands.tolist(), texts)))
                    lines += len(cands)
        part = path.with_name(path.name + ".part")
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:
            _add_member(tar, "top1000.dev", tmp)
        os.replace(part, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rows": lines, "queries": len(dev)}


# --------------------------------------------------------------------------------------------
def generate(folder: str | Path, factor: float, seed: int = 0, only: Iterable[str] | None = None,
             verbose: bool = True) -> dict:
    """Write the synthetic sources for `factor` into `folder`; returns {stage: {rows, seconds, bytes}}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    z = sizes(factor)
    qids = query_ids(z["queries"], seed)
    train_range = max(QID_RANGE, 3 * z["queries"])  # every training qid (teacher, triples, hard negatives) is below
    jobs = {
        "collection": lambda p: write_collection(p, z["passages"], seed),
        "ce_scores": lambda p: write_score_pickle(p, iter_hn_score_chunks(qids, z["passages"], seed)),
        "teacher": lambda p: write_teacher(p, z["teacher_lines"], z["passages"], seed),
        "hard_negatives": lambda p: write_hard_negatives(p, qids, z["passages"], seed,
                                                         qrels_path=folder / EXTRA_FILES["hard_negatives"]),
        "triples": lambda p: write_triples(p, z["triples_lines"], z["passages"], seed, qid_range=train_range),
        "queries": lambda p: write_queries(p, train_range, z["dev_queries"], seed),
        "dev": lambda p: write_dev(p, folder / EXTRA_FILES["dev"], train_range, z["dev_queries"],
                                   z["dev_small_queries"], z["passages"], seed=seed),
    }
    report = {}
    for name, job in jobs.items():
        if only is not None and name not in only:
            continue
        t = time.time()
        info = job(folder / FILES[name])
        info["seconds"] = round(time.time() - t, 2)
        info["bytes"] = (folder / FILES[name]).stat().st_size
        report[name] = info
        if verbose:
            print(f"  {FILES[name]}: {info['rows']:,} rows, {info['bytes'] / 2**20:,.1f} MiB, {info['seconds']} s",
                  file=sys.stderr, flush=True)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=float, default=0.01, help="1.0 = real sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(FILES))
    a = ap.parse_args(argv)
    only = None if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    if only and (bad := set(only) - set(FILES)):
        ap.error(f"unknown --only {sorted(bad)}; choose from {list(FILES)}")
    print(f"factor {a.factor}: {sizes(a.factor)}", file=sys.stderr)
    out = a.out if a.out.is_absolute() else Path(__file__).resolve().parents[1] / a.out  # from the repository
    generate(out, a.factor, a.seed, only)


if __name__ == "__main__":
    main()
