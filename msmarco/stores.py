"""Memory-mapped stores, built once per data folder into <data_dir>/.prepared/<name>/ and opened in milliseconds:
texts (TextStore), ids grouped by query (Grouped), cross-encoder scores (ScoreStore), numeric row files (triples,
teacher lines). A build streams its source in bounded memory, writes into a temporary folder and renames it when
complete; a changed source (size, mtime) or store layout (STORE_VERSION) rebuilds it."""
from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import paths
from .errors import DataError
from .formats import iter_int_rows
from .score_pickle import stream_score_pickle

STORE_VERSION = 2  # bump when a store's on-disk layout or text changes: old caches are rebuilt (2: text repair)


def _fingerprint(sources: Iterable[Path]) -> dict:
    return {"version": STORE_VERSION,
            "sources": {str(p.name): [p.stat().st_size, p.stat().st_mtime_ns] for p in sources}}


def _built(final: Path, want: dict) -> bool:
    try:  # read without the lock: the store may vanish under a rebuild (after a source change) in another process
        return json.loads((final / "meta.json").read_text()).get("fingerprint") == want
    except (OSError, ValueError):
        return False


def prepared(data_dir: Path, name: str, sources: list[Path], build: Callable[[Path], dict | None]) -> Path:
    """The folder of store `name`, built by `build(tmp_dir)` unless an up-to-date one exists.

    Built into a temporary folder and renamed when complete, so an interrupted or failed build leaves
    nothing behind and the next run rebuilds it; a changed source file (size or mtime) forces a rebuild.
    A file lock lets one process build while the others (torchrun ranks, parallel runs) wait for it."""
    root = paths.resolve_dir(data_dir) / paths.PREPARED
    final = root / name
    want = _fingerprint(sources)
    if _built(final, want):  # no lock needed to read: a shared or read-only data folder serves its built stores
        return final
    with contextlib.ExitStack() as locked:
        try:
            root.mkdir(parents=True, exist_ok=True)
            locked.enter_context(paths.file_lock(root / f"{name}.lock"))
        except OSError as e:
            raise DataError(f"cannot build the store {name!r} in {root} ({e}): a store is written once, on the first "
                            f"run that needs it, so the data folder must be writable then; make it writable, or "
                            f"pass --data_dir=<a writable copy>") from None
        if _built(final, want):  # built by another process while this one waited for the lock
            return final
        for stale in root.glob(f"{name}.tmp-*"):  # left by a killed build: no one else builds under the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        t0 = time.time()
        try:
            info = build(tmp) or {}
            (tmp / "meta.json").write_text(json.dumps(
                {"fingerprint": want, "built_seconds": round(time.time() - t0, 1), **info}, indent=1))
            for f in tmp.iterdir():  # on disk before the rename publishes the store: no meta.json beside short arrays
                paths.fsync_file(f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and paths.out_of_space(e):
                raise paths.disk_full(final, e) from e
            raise
    return final


class ArrayWriter:
    """Appends numpy chunks to a raw binary file, so that large arrays never sit in memory whole."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")

    def write(self, values) -> None:
        a = np.asarray(values, dtype=self.dtype)
        a.tofile(self.f)
        self.n += a.size

    def close(self) -> None:
        self.f.close()


def load_array(folder: Path, name: str, dtype) -> np.ndarray:
    """Memory-map a raw array written by ArrayWriter (an empty file gives an empty array)."""
    path = folder / name
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def write_sorted_index(folder: Path, ids: np.ndarray, ids_name: str, rows_name: str, where: str) -> None:
    """Sorted ids and the file row of each, for lookups by binary search; an id seen twice is a damaged file."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if len(s) > 1 and (dup := np.flatnonzero(s[1:] == s[:-1])).size:
        raise DataError(f"{where}: id {s[dup[0]]} appears twice; the file is damaged: download it again")
    s.tofile(folder / ids_name)
    order.astype(np.int64).tofile(folder / rows_name)


class TextStore:
    """id -> text, memory-mapped: UTF-8 bytes in one file, int64 offsets, sorted ids for lookup.

    At full scale (8.8M passages, ~3 GB of text) this uses ~280 MB of index (4 arrays of 8-byte
    integers a passage) and no text in RAM."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = folder, what
        self.text = load_array(folder, "text.bin", np.uint8)
        self.offsets = load_array(folder, "offsets.bin", np.int64)
        self.sorted_ids = load_array(folder, "sorted_ids.bin", np.int64)
        self.sorted_rows = load_array(folder, "sorted_rows.bin", np.int64)
        self.ids = load_array(folder, "ids.bin", np.int64)  # in file order

    def __reduce__(self):
        # pickled as its folder, not as the memory-mapped text: `datasets` pickles a batch transform to fingerprint
        # it, and a closure holding the full collection cost 9 s and a 10 GB peak at every start
        return TextStore, (self.folder, self.what)

    @staticmethod
    def build(folder: Path, rows: Iterable[tuple[int, str]], where: str) -> dict:
        text, offsets, ids = (ArrayWriter(folder / "text.bin", np.uint8),
                              ArrayWriter(folder / "offsets.bin", np.int64), ArrayWriter(folder / "ids.bin", np.int64))
        pos, buf, id_buf, off_buf = 0, [], [], [0]
        for i, t in rows:
            b = t.encode("utf-8")
            buf.append(b)
            pos += len(b)
            id_buf.append(i)
            off_buf.append(pos)
            if len(buf) >= 100_000:  # flush in chunks: bounded memory, few syscalls
                text.write(np.frombuffer(b"".join(buf), np.uint8)); ids.write(id_buf); offsets.write(off_buf)
                buf, id_buf, off_buf = [], [], []
        text.write(np.frombuffer(b"".join(buf), np.uint8)); ids.write(id_buf); offsets.write(off_buf)
        for w in (text, offsets, ids):
            w.close()
        all_ids = np.fromfile(folder / "ids.bin", dtype=np.int64)
        write_sorted_index(folder, all_ids, "sorted_ids.bin", "sorted_rows.bin", where)
        return {"rows": int(len(all_ids))}

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids) -> np.ndarray:
        """Row numbers of `ids`; an id not in the store is a DataError naming it."""
        ids = np.asarray(ids, dtype=np.int64)
        i = np.searchsorted(self.sorted_ids, ids)
        i = np.minimum(i, max(len(self.sorted_ids) - 1, 0))
        bad = (self.sorted_ids[i] != ids) if len(self.sorted_ids) else np.ones_like(ids, bool)
        if np.any(bad):
            missing = ids[bad][:5].tolist()
            raise DataError(f"unknown {self.what} id(s) {missing} (not in {self.folder.parent.parent}); "
                            "the id file does not match this data folder's collection/queries")
        return self.sorted_rows[i]

    def __contains__(self, id_) -> bool:
        i = np.searchsorted(self.sorted_ids, id_)
        return bool(i < len(self.sorted_ids) and self.sorted_ids[i] == id_)

    def bytes_at(self, row: int) -> bytes:
        return bytes(self.text[self.offsets[row]:self.offsets[row + 1]])

    def text_at(self, row: int) -> str:
        return self.bytes_at(row).decode("utf-8")

    def __getitem__(self, id_: int) -> str:
        return self.text_at(int(self.rows_of([id_])[0]))

    def get_many(self, ids) -> list[str]:
        return [self.text_at(int(r)) for r in self.rows_of(ids)]


class Grouped:
    """qid -> int32 values (candidates, positives), memory-mapped as CSR: sorted qids, row pointers, values."""

    def __init__(self, folder: Path, prefix: str):
        self.qids = load_array(folder, f"{prefix}.qids.bin", np.int64)
        self.ptr = load_array(folder, f"{prefix}.ptr.bin", np.int64)
        self.values = load_array(folder, f"{prefix}.values.bin", np.int32)

    @staticmethod
    def write(folder: Path, prefix: str, groups: dict[int, list[int]]) -> None:
        w = GroupedWriter(folder, prefix)
        for q in sorted(groups):
            w.add(q, groups[q])
        w.close()

    def __len__(self) -> int:
        return len(self.qids)

    def __contains__(self, qid) -> bool:
        i = np.searchsorted(self.qids, qid)
        return bool(i < len(self.qids) and self.qids[i] == qid)

    def __getitem__(self, qid: int) -> np.ndarray:
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            raise KeyError(qid)
        return np.asarray(self.values[self.ptr[i]:self.ptr[i + 1]])

    def items(self) -> Iterator[tuple[int, np.ndarray]]:
        for i, q in enumerate(self.qids):
            yield int(q), np.asarray(self.values[self.ptr[i]:self.ptr[i + 1]])

    @classmethod
    def from_arrays(cls, qids: np.ndarray, ptr: np.ndarray, values: np.ndarray) -> "Grouped":
        """An in-memory Grouped: qids ascending, query i's values at values[ptr[i]:ptr[i + 1]]."""
        g = cls.__new__(cls)
        g.qids, g.ptr, g.values = np.asarray(qids, np.int64), np.asarray(ptr, np.int64), np.asarray(values, np.int32)
        return g

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)


class GroupedWriter:
    """Writes a Grouped store query by query, in ascending qid order, so that no dict of lists is ever held."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.last, self.n = folder, prefix, None, 0
        self.qids = ArrayWriter(folder / f"{prefix}.qids.bin", np.int64)
        self.ptr = ArrayWriter(folder / f"{prefix}.ptr.bin", np.int64)
        self.values = ArrayWriter(folder / f"{prefix}.values.bin", np.int32)
        self.ptr.write([0])

    def add(self, qid: int, values) -> None:
        if self.last is not None and qid <= self.last:
            raise ValueError(f"GroupedWriter: qid {qid} after {self.last}; add queries in ascending order")
        values = np.asarray(values, dtype=np.int32)
        self.qids.write([qid])
        self.values.write(values)
        self.n += len(values)
        self.ptr.write([self.n])
        self.last = qid

    def close(self) -> None:
        for w in (self.qids, self.ptr, self.values):
            w.close()


def release_pages(*stores) -> None:
    """Drop the pages of the stores' memory-mapped arrays (or of memory-mapped arrays given as such) from this
    process's resident set (they stay in the page cache and come back on the next read). A one-pass scan of the
    hard-negative and score stores (2.4 GB of files at full size) otherwise keeps every page it touched resident
    until the end."""
    import mmap
    for store in stores:
        for arr in [store] if isinstance(store, np.memmap) else vars(store).values():
            m = getattr(arr, "_mmap", None)
            if isinstance(arr, np.memmap) and m is not None and hasattr(m, "madvise"):
                m.madvise(mmap.MADV_DONTNEED)


class ScoreStore:
    """(qid, pid) -> score, memory-mapped: one block of pid-sorted scores per query, found by binary search.

    160M entries take 8 bytes each on disk (int32 pid, float32 score) and nothing in RAM but the page cache."""

    def __init__(self, folder: Path):
        self.qids = load_array(folder, "qids.bin", np.int64)
        self.ptr = load_array(folder, "ptr.bin", np.int64)
        self.block_of = load_array(folder, "block_of.bin", np.int64)
        self.pids = load_array(folder, "pids.bin", np.int32)
        self.scores = load_array(folder, "scores.bin", np.float32)

    @staticmethod
    def build(folder: Path, path: Path, collection: "TextStore | None") -> dict:
        qids, starts = array.array("q"), array.array("q", [0])  # 16 bytes per query, not Python ints
        pid_w, score_w = ArrayWriter(folder / "pids.bin", np.int32), ArrayWriter(folder / "scores.bin", np.float32)

        def emit(qid: int, pids: list, scores: list) -> None:
            p = np.asarray(pids, dtype=np.int64)
            order = np.argsort(p, kind="stable")
            if collection is not None and len(p):
                try:
                    collection.rows_of(p)
                except DataError as e:
                    raise DataError(f"{path}: scores for qid {qid} name passages missing from the collection "
                                    f"({e}); the score file does not match this data folder") from None
            pid_w.write(p[order])
            score_w.write(np.asarray(scores, dtype=np.float32)[order])
            qids.append(qid)
            starts.append(starts[-1] + len(p))

        n = stream_score_pickle(path, emit)
        pid_w.close(); score_w.close()
        q = np.frombuffer(qids, dtype=np.int64)
        order = np.argsort(q, kind="stable")
        np.asarray(q[order]).tofile(folder / "qids.bin")
        np.frombuffer(starts, dtype=np.int64).tofile(folder / "ptr.bin")
        order.astype(np.int64).tofile(folder / "block_of.bin")
        return {"queries": n, "scores": int(starts[-1])}

    def for_query(self, qid: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted pids, scores) of one query; empty arrays when the query has no scores."""
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        b = self.block_of[i]
        lo, hi = self.ptr[b], self.ptr[b + 1]
        return np.asarray(self.pids[lo:hi]), np.asarray(self.scores[lo:hi])

    def lookup(self, qid: int, pids) -> np.ndarray:
        """Scores of `pids` for `qid`; NaN where the file has no score."""
        have_p, have_s = self.for_query(qid)
        pids = np.asarray(pids, dtype=np.int64)
        out = np.full(len(pids), np.nan, dtype=np.float32)
        if len(have_p):
            i = np.minimum(np.searchsorted(have_p, pids), len(have_p) - 1)
            hit = have_p[i] == pids
            out[hit] = have_s[i[hit]]
        return out


def _check_pids(collection: "TextStore | None", pids: np.ndarray, path: Path, first_line: int, ncols_line) -> None:
    if collection is None or not len(pids):
        return
    i = np.searchsorted(collection.sorted_ids, pids)
    i = np.minimum(i, len(collection.sorted_ids) - 1)
    bad = np.flatnonzero(collection.sorted_ids[i] != pids)
    if bad.size:
        line = first_line + ncols_line(bad[0])
        raise DataError(f"{path}, line {line}: pid {int(pids[bad[0]])} is not in this data folder's collection; "
                        "the file does not match the collection (wrong data folder, or a damaged file)")


def known_pid_mask(collection: "TextStore | None") -> np.ndarray | None:
    """known[pid] is True for the collection's pids: one byte per possible pid (8.8 MB at full size), so checking a
    chunk of ids is one gather instead of a binary search each (~0.1 s per 20M ids instead of ~4 s)."""
    if collection is None:
        return None
    ids = np.asarray(collection.sorted_ids)
    known = np.zeros(int(ids[-1]) + 1 if len(ids) else 0, dtype=bool)
    known[ids] = True
    return known


def _check_known(known: np.ndarray | None, pids: np.ndarray, path: Path, first_line: int, line_of) -> None:
    """`_check_pids` with a known_pid_mask: the same DataError, naming the first line with an unknown pid."""
    if known is None or not len(pids):
        return
    ok = pids < len(known)
    ok[ok] = known[pids[ok]]
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{path}, line {first_line + line_of(k)}: pid {int(pids[k])} is not in this data folder's "
                        "collection; the file does not match the collection (wrong data folder, or a damaged file)")


_GAMMA, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def line_keys(seed: int, first_line: int, n: int) -> np.ndarray:
    """The sampling keys (uint64) of lines first_line .. first_line + n - 1 (1-based): the SplitMix64 sequence started
    at a state drawn from `seed`, key i = mix(start + i * gamma). A key depends only on (seed, line number), not on
    how the file is cut into chunks, so a sample can be recomputed independently (tests do)."""
    start = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):
        z = start + np.arange(first_line, first_line + n, dtype=np.uint64) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


class SmallestKeys:
    """The `n` rows of smallest key seen so far in a stream of (keys, rows) chunks, kept in arrival order; among equal
    keys the earlier row wins. Memory O(n): a row is kept only while its key can still be among the n smallest, and
    the kept chunks are cut back to n rows whenever they pass 1.5n (8-byte key + 12-byte row each; at the peak of a
    cut ~42 bytes per kept row: ~650 MB for 16M rows)."""

    def __init__(self, n: int):
        self.n, self.limit = n, None  # limit: the n-th smallest key so far, once known; only smaller keys can enter
        self.keys: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.size = 0

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if self.n <= 0:
            return
        if self.limit is not None:
            sel = keys < self.limit
            keys, rows = keys[sel], rows[sel]
        self.keys.append(keys)
        self.rows.append(rows)
        self.size += len(keys)
        if self.size > self.n + self.n // 2:
            self._cut()

    def _cut(self) -> None:
        """Keep the n smallest: find the n-th smallest key (one partition of a joined copy of the keys), then cut each
        chunk in turn, releasing it before the next, so the peak is the chunks plus one copy of their keys."""
        joined = np.concatenate(self.keys)
        joined.partition(self.n - 1)
        self.limit = kth = joined[self.n - 1]
        del joined
        ties = self.n - sum(int((k < kth).sum()) for k in self.keys)  # how many keys equal to kth stay: the first
        keys, rows = [], []
        while self.keys:
            k, r = self.keys.pop(0), self.rows.pop(0)
            keep = k < kth
            eq = np.flatnonzero(k == kth)[:ties]
            keep[eq] = True
            ties -= len(eq)
            keys.append(k[keep])
            rows.append(r[keep])
            del k, r
        self.keys, self.rows, self.size = keys, rows, self.n

    def result(self) -> np.ndarray:
        """The kept rows, in arrival order."""
        if self.size > self.n:
            self._cut()
        rows, self.rows, self.keys = self.rows, [], []
        return np.concatenate(rows) if rows else np.zeros((0, 3), np.int32)


def build_triples(folder: Path, path: Path, collection: "TextStore | None", max_rows: int | None = None,
                  seed: int = 0) -> dict:
    """qidpidtriples -> int32 (n, 3) (qid, pid_pos, pid_neg): every line (max_rows None), or a seeded uniform sample
    of `max_rows` lines drawn from the WHOLE file, in one streaming pass in O(max_rows) memory.

    Why not the first lines: the official qidpidtriples.train.full.2.tsv.gz is sorted by qid (as text), ~1,000
    lines per query, so its first 16M lines hold ~16k of the ~400k training queries, each positive ~250 times.
    The sample keeps the `max_rows` lines of smallest key (line_keys(seed, line)), i.e. a uniform random subset of
    that size; a file of <= max_rows lines is kept whole. Kept rows are in FILE order (so grouped by query, as in
    the file): the training samplers shuffle them. Every line is parsed and checked (malformed line, pid not in
    the collection: a DataError naming the line), not only the kept ones.

    Cost at full size, once per (max_rows, seed): one pass over 1.8 GB of gzip / 397,768,673 lines. At the
    vectorised parser's ~0.45 us a line that is 3 minutes (measured on the 397,768,673 lines of the full-size
    synthetic file, 2 idle cores: 177 s; the older parser, 20M lines in 42 s, would have taken ~14 min), up to twice
    that on busy cores. Peak RSS 918 MiB for 16M rows (~32 bytes per kept row plus ~120 MB of parse chunks); the
    store takes 12 bytes per row (192 MB for 16M)."""
    w = ArrayWriter(folder / "triples.bin", np.int32)
    known = known_pid_mask(collection)
    pick = None if max_rows is None else SmallestKeys(max_rows)
    lines = 0
    for first, arr in iter_int_rows(path, 3, "`qid<TAB>pid_pos<TAB>pid_neg`", kinds="iii"):
        rows = arr.astype(np.int32)
        del arr
        _check_known(known, rows[:, 1:].ravel(), path, first, lambda k: k // 2)
        if pick is None:
            w.write(rows)
        else:
            pick.add(line_keys(seed, first, len(rows)), rows)
        lines += len(rows)
    info = {"rows": lines, "lines": lines}
    if pick is not None:
        kept = pick.result()
        w.write(kept)
        info.update(rows=int(len(kept)), queries=int(len(np.unique(kept[:, 0]))), max_rows=max_rows, seed=seed,
                    sample="uniform over the whole file, rows in file order")
    w.close()
    return info


TEACHER_DTYPE = np.dtype([("pos_score", np.float32), ("neg_score", np.float32), ("qid", np.int32),
                          ("pid_pos", np.int32), ("pid_neg", np.int32)])


def build_teacher(folder: Path, path: Path, collection: "TextStore | None") -> dict:
    """Hofstaetter's `pos_score neg_score qid pid_pos pid_neg` lines -> a 20-byte record per line."""
    w = ArrayWriter(folder / "teacher.bin", np.uint8)
    n = 0
    for first, arr in iter_int_rows(path, 5, "`pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg`",
                                    kinds="ffiii"):
        _check_pids(collection, arr[:, 3:].astype(np.int64).ravel(), path, first, lambda k: k // 2)
        rec = np.empty(len(arr), dtype=TEACHER_DTYPE)
        for j, name in enumerate(TEACHER_DTYPE.names):
            rec[name] = arr[:, j]
        w.write(rec.view(np.uint8))
        n += len(arr)
    w.close()
    return {"rows": n}
