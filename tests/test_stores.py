"""The memory-mapped stores (msmarco/stores.py): the same values as the raw files, built once and reused, rebuilt
when their source or layout changes, nothing left behind by a killed build."""
import gzip
import json
import math
import os
import pickle
import shutil
import time

import numpy as np

from msmarco import paths, stores
from msmarco.data import MSMarco
from conftest import SAMPLE, COLLECTION, TEACHER, TRIPLES, CE, MISSING_PID, leftovers, raw_teacher, raw_text_lines, write_pickle


def test_a_killed_build_leaves_nothing_the_next_run_keeps(copy):
    """A build killed mid-way (no exception handler runs) leaves its temporary folder; the next build removes it."""
    stale = copy / paths.PREPARED / "collection.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "text.bin").write_bytes(b"half")
    assert len(MSMarco(copy).collection()) == 28_262
    assert leftovers(copy) == ["collection"]


def test_ce_scores_equal_pickle(ms):
    with gzip.open(SAMPLE / CE, "rb") as f:
        raw = pickle.load(f)  # our own file: safe to load
    assert len(raw) == 180 and sum(map(len, raw.values())) == 9_541
    store = ms.ce_scores()
    for qid, scores in raw.items():
        pids = list(scores)
        got = store.lookup(qid, pids)
        np.testing.assert_array_equal(got, np.array([scores[p] for p in pids], dtype=np.float32))
        sp, ss = store.for_query(qid)
        assert sp.tolist() == sorted(pids)
        np.testing.assert_array_equal(ss, np.array([scores[p] for p in sorted(pids)], dtype=np.float32))


def test_ce_scores_missing_pid_and_unknown_qid(ms):
    store = ms.ce_scores()
    with gzip.open(SAMPLE / CE, "rb") as f:
        raw = pickle.load(f)
    qid, scores = next(iter(raw.items()))
    known = next(iter(scores))
    unscored = next(p for p in ms.collection().ids.tolist() if p not in scores)
    got = store.lookup(qid, [unscored, known, MISSING_PID])
    assert math.isnan(got[0]) and math.isnan(got[2])
    assert got[1] == np.float32(scores[known])
    unknown_q = max(raw) + 1
    p, s = store.for_query(unknown_q)
    assert p.size == 0 and s.size == 0
    assert np.isnan(store.lookup(unknown_q, [known])).all()


def test_score_store_from_crafted_pickle(tmp_path):
    d = {10: {3: 0.5, 1: 2.0, 2: -1.0}, 4: {9: 7.0}}
    path = write_pickle(tmp_path / "s.pkl", pickle.dumps(d, protocol=4))
    folder = tmp_path / "store"
    folder.mkdir()
    info = stores.ScoreStore.build(folder, path, None)
    assert info == {"queries": 2, "scores": 4}
    s = stores.ScoreStore(folder)
    assert s.for_query(10)[0].tolist() == [1, 2, 3]
    assert s.lookup(10, [3, 2, 1, 9]).tolist()[:3] == [0.5, -1.0, 2.0]
    assert math.isnan(s.lookup(10, [9])[0])
    assert s.lookup(4, [9]).tolist() == [7.0]


def test_teacher_equals_raw(ms):
    raw = raw_teacher(SAMPLE / TEACHER)
    rec = ms.teacher_scores()
    assert len(raw) == len(rec) == 9_361
    assert rec.dtype == stores.TEACHER_DTYPE
    cols = list(zip(*raw))
    np.testing.assert_array_equal(rec["pos_score"], np.array(cols[0], dtype=np.float32))
    np.testing.assert_array_equal(rec["neg_score"], np.array(cols[1], dtype=np.float32))
    for j, name in enumerate(["qid", "pid_pos", "pid_neg"], 2):
        assert rec[name].tolist() == list(cols[j])


def sampled(raw: list, n: int, seed: int) -> list:
    """The documented sample, computed independently: the n lines of smallest line_keys(seed, line), in file order."""
    if n >= len(raw):
        return list(raw)
    keys = stores.line_keys(seed, 1, len(raw))
    return [raw[i] for i in sorted(np.argsort(keys, kind="stable")[:n].tolist())]


def test_triples(ms):
    raw = [tuple(map(int, ln.split("\t"))) for ln in raw_text_lines(SAMPLE / TRIPLES)]
    assert len(raw) == 3_421
    every = ms.triples()
    assert every.shape == (3_421, 3) and every.dtype == np.int32
    assert [tuple(r) for r in every.tolist()] == raw
    some = ms.triples(max_rows=100)
    assert some.shape == (100, 3) and some.dtype == np.int32
    assert [tuple(r) for r in some.tolist()] == sampled(raw, 100, 0)
    assert [tuple(r) for r in ms.triples(max_rows=100, seed=5).tolist()] == sampled(raw, 100, 5)
    assert [tuple(r) for r in ms.triples(max_rows=10_000).tolist()] == raw  # a short file is kept whole, in order
    assert ms.triples(max_rows=0).shape == (0, 3)


def test_triples_sample_spreads_over_the_whole_qid_sorted_file(copy):
    """The sample's qidpidtriples is sorted like the official file (by qid, ~19 lines per query here, ~1,000 there),
    so its first 500 lines hold ~27 of the 180 training queries; a uniform sample of 500 lines holds nearly all."""
    lines = [ln.encode() for ln in raw_text_lines(SAMPLE / TRIPLES)]
    assert lines == sorted(lines)  # a plain sort of the lines as text, like the official file
    qids = [int(ln.split(b"\t")[0]) for ln in lines]
    assert len(set(qids)) == 180
    head = len(set(qids[:500]))
    a, b = np.array(MSMarco(copy).triples(max_rows=500)), np.array(MSMarco(copy).triples(max_rows=500, seed=1))
    assert len(a) == len(b) == 500
    for t in (a, b):
        assert len(set(t[:, 0].tolist())) >= 150 > 4 * head
    assert not np.array_equal(a, b)  # another seed, another sample
    rows = {tuple(map(int, ln.split(b"\t"))): i for i, ln in enumerate(lines)}
    at = [rows[tuple(r)] for r in a.tolist()]
    assert at == sorted(at) and at[-1] > 3_000  # file order, from all over the file
    meta = copy / paths.PREPARED / "triples.sample500.seed0" / "meta.json"
    m1 = meta.stat().st_mtime_ns
    assert np.array_equal(MSMarco(copy).triples(max_rows=500), a) and meta.stat().st_mtime_ns == m1  # reopened
    assert json.loads(meta.read_text())["lines"] == 3_421
    shutil.rmtree(meta.parent)
    assert np.array_equal(MSMarco(copy).triples(max_rows=500), a)  # built anew: the same rows


def test_triples_sample_does_not_depend_on_the_parse_chunks(copy, monkeypatch):
    """Tiny parse chunks (a few lines each) exercise every path of the bounded buffer (chunks larger than the sample,
    cuts back to n rows): the sample is the same as with one chunk for the whole file."""
    from msmarco import formats
    raw = [tuple(map(int, ln.split("\t"))) for ln in raw_text_lines(SAMPLE / TRIPLES)]
    defaults = list(formats.iter_int_rows.__defaults__)
    defaults[0] = 97  # chunk_bytes: ~4 lines
    monkeypatch.setattr(formats.iter_int_rows, "__defaults__", tuple(defaults))
    for n, seed in [(1, 0), (7, 3), (500, 0), (3_420, 2)]:
        got = MSMarco(copy).triples(max_rows=n, seed=seed)
        assert [tuple(r) for r in got.tolist()] == sampled(raw, n, seed), (n, seed)


def test_smallest_keys_keeps_the_n_smallest_in_arrival_order():
    rng = np.random.default_rng(0)
    for n, sizes in [(5, [3, 0, 9, 1, 20]), (50, [1000]), (10, [4] * 30), (3, [1, 1, 1, 1])]:
        keys = rng.integers(0, 40, sum(sizes)).astype(np.uint64)  # many ties: the earlier row must win
        rows = np.arange(len(keys), dtype=np.int32).reshape(-1, 1).repeat(3, 1)
        pick, lo = stores.SmallestKeys(n), 0
        for m in sizes:
            pick.add(keys[lo:lo + m], rows[lo:lo + m])
            lo += m
        want = np.sort(np.argsort(keys, kind="stable")[:n])
        assert pick.result()[:, 0].tolist() == want.tolist()


def test_cache_reused_and_rebuilt_when_source_changes(copy):
    src = copy / COLLECTION
    meta = copy / paths.PREPARED / "collection" / "meta.json"
    assert len(MSMarco(copy).collection()) == 28_262
    m1 = meta.stat().st_mtime_ns
    again = MSMarco(copy).collection()
    assert len(again) == 28_262
    assert meta.stat().st_mtime_ns == m1  # reused: not rebuilt
    st = src.stat()
    new_mtime = st.st_mtime_ns - 3_600 * 10**9
    os.utime(src, ns=(st.st_atime_ns, new_mtime))
    time.sleep(0.01)
    rebuilt = MSMarco(copy).collection()
    assert len(rebuilt) == 28_262
    assert meta.stat().st_mtime_ns != m1
    fp = json.loads(meta.read_text())["fingerprint"]
    assert fp["sources"][COLLECTION] == [st.st_size, new_mtime]
    assert leftovers(copy) == ["collection"]


def test_built_stores_are_read_without_writing_and_an_unwritable_folder_is_a_clear_error(copy, monkeypatch):
    """A built store opens without taking the build lock, so a shared or read-only data folder serves its stores
    (here taking a lock fails, as it would there); a store that still has to be built ends with
    an error that says the folder must be writable once, not with an OSError's traceback."""
    import pytest
    from msmarco.errors import DataError
    assert len(MSMarco(copy).collection()) == 28_262

    def unwritable(*a, **k):
        raise PermissionError(13, "Permission denied", str(a[0]) if a else "")
    monkeypatch.setattr(paths, "file_lock", unwritable)
    assert len(MSMarco(copy).collection()) == 28_262
    with pytest.raises(DataError, match="cannot build the store 'queries.dev'.*writable.*--data_dir"):
        MSMarco(copy).queries("dev")


def test_a_copy_of_the_sample_is_the_sample(tmp_path):
    """The advice for a read-only checkout is a writable copy of the data folder: a copy of data/sample is still the
    bundled sample (its files are smaller than the published ones, and it has no DL 2019), not a full-size folder
    whose files would be taken for incomplete downloads."""
    from msmarco import evaluation
    copy = tmp_path / "my-sample"
    shutil.copytree(SAMPLE, copy, ignore=shutil.ignore_patterns(paths.PREPARED))
    assert paths.is_sample(copy) and not paths.is_sample(tmp_path)
    assert MSMarco(copy).qrels("train") == MSMarco(SAMPLE).qrels("train")  # no "incomplete download" error
    assert not evaluation.available(copy, "dl2019") and evaluation.available(copy, "dl2020")


def test_cache_rebuilt_for_old_store_version(copy, monkeypatch):
    MSMarco(copy).collection()
    meta = copy / paths.PREPARED / "collection" / "meta.json"
    m1 = meta.stat().st_mtime_ns
    time.sleep(0.01)
    monkeypatch.setattr(stores, "STORE_VERSION", stores.STORE_VERSION + 1)
    MSMarco(copy).collection()
    assert meta.stat().st_mtime_ns != m1
    assert json.loads(meta.read_text())["fingerprint"]["version"] == stores.STORE_VERSION


def test_released_store_pages_read_back_the_same():
    ce = MSMarco(SAMPLE).ce_scores()
    before = np.array(ce.scores[:100]), np.array(ce.pids[-100:])
    stores.release_pages(ce)  # drops the pages from this process's resident set; the next read faults them back
    assert np.array_equal(ce.scores[:100], before[0]) and np.array_equal(ce.pids[-100:], before[1])


def test_a_full_disk_during_a_build_is_a_clear_error_and_leaves_nothing(copy):
    """The first full-scale run writes GBs of stores: a disk that fills on the way ends the script with what to do
    (exit 1, no traceback), and no half-built store. The file-size limit (ulimit -f) stands in for a full disk."""
    import subprocess
    import sys
    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)); "
            "from msmarco.errors import user_errors; from msmarco.data import MSMarco\n"
            f"with user_errors(): MSMarco({str(copy)!r}).collection()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=paths.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "no room on its disk" in proc.stderr and "free disk space" in proc.stderr
    assert str(copy / paths.PREPARED / "collection") in proc.stderr
    assert "collection" not in leftovers(copy) and not [n for n in leftovers(copy) if ".tmp-" in n]
    assert len(MSMarco(copy).collection()) == 28_262  # with room again, the next run builds it


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    import errno
    import pathlib
    import pytest
    from msmarco.errors import DataError
    target = tmp_path / "results.json"
    target.write_text("old")

    def full(self, text):
        pathlib.Path.write_bytes(self, text[:3].encode())  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(DataError, match="no room on its disk.*free disk space"):
        paths.write_atomic(target, "new text")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
