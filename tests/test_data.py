"""Tests of the data layer (msmarco_data.py) against the bundled miniature in data/sample/.

Every expected value is computed independently from the raw files with plain Python (tarfile, gzip,
json, pickle). Tests that damage a file work on a copy of data/sample in tmp_path; data/sample itself
is only read (its git-ignored .prepared/ cache may be written).
"""
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import tarfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import msmarco_data as md
from conftest import SHARED_SAMPLE
from msmarco_data import DataError, DownloadError, MSMarco, Source

SAMPLE = md.SAMPLE_DIR
COLLECTION = "collection.tar.gz"
TEACHER = "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv"
TRIPLES = "qidpidtriples.train.full.2.tsv.gz"
HARD_NEG = "msmarco-hard-negatives.jsonl.gz"
CE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
MISSING_PID = 999_999_999  # fits int32, not in the sample collection


# ----------------------------------------------------------------------------------------------
# Independent readers of the raw files
# ----------------------------------------------------------------------------------------------
def repair(text: str) -> str:
    """The documented fix (data/sample/README.md): latin-1 -> utf-8, keep the text when it raises."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


def tar_member_lines(path: Path, member: str) -> list[bytes]:
    with tarfile.open(path, "r:gz") as t:
        data = t.extractfile(member).read()
    return data.split(b"\n")


def raw_id_text(lines: list[bytes]) -> list[tuple[int, str]]:
    out = []
    for line in lines:
        if not line:
            continue
        i, text = line.split(b"\t", 1)
        out.append((int(i), text.decode("utf-8")))
    return out


def raw_text_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def raw_qrels(path: Path) -> dict:
    q = {}
    for line in raw_text_lines(path):
        a, _, p, g = line.split()
        q.setdefault(int(a), {})[int(p)] = int(g)
    return q


def raw_candidates(lines: list[str]) -> dict:
    c = {}
    for line in lines:
        q, p, _ = line.split("\t", 2)
        c.setdefault(int(q), []).append(int(p))
    return c


@pytest.fixture(scope="session")
def ms():
    return MSMarco(SAMPLE)


@pytest.fixture(scope="session")
def raw_collection():
    return raw_id_text(tar_member_lines(SAMPLE / COLLECTION, "collection.tsv"))


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """A private copy of data/sample (without .prepared/) that the test may damage.

    The copy stands in for the bundled sample (SAMPLE_DIR points at it): outside the sample folder, fetch()
    would compare the miniature files with the published sizes of the full downloads and refuse them."""
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns(".prepared"))
    monkeypatch.setattr(md, "SAMPLE_DIR", dst)
    return dst


def leftovers(folder: Path) -> list[str]:
    """What a build left under .prepared/, besides the (empty) lock files that serialise builds."""
    root = folder / md.PREPARED
    return sorted(p.name for p in root.iterdir() if p.suffix != ".lock") if root.exists() else []


def test_a_killed_build_leaves_nothing_the_next_run_keeps(copy):
    """A build killed mid-way (no exception handler runs) leaves its temporary folder; the next build removes it."""
    stale = copy / md.PREPARED / "collection.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "text.bin").write_bytes(b"half")
    assert len(MSMarco(copy).collection()) == 28_262
    assert leftovers(copy) == ["collection"]


def rewrite_text(path: Path, edit) -> None:
    """Rewrite a (gzipped) text file with edit(list_of_lines) -> list_of_lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b""
    lines = edit(lines[:-1])
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


# ----------------------------------------------------------------------------------------------
# 1. Collection and the mojibake repair
# ----------------------------------------------------------------------------------------------
def test_collection_equals_raw(ms, raw_collection):
    coll = ms.collection()
    assert len(raw_collection) == 28_262
    assert len(coll) == 28_262
    pids = [p for p, _ in raw_collection]
    assert coll.ids.tolist() == pids  # file order
    assert coll.get_many(pids) == [repair(t) for _, t in raw_collection]
    assert all(p in coll for p in pids[:50])
    assert MISSING_PID not in coll


def test_collection_repairs_double_encoded_utf8(ms, raw_collection):
    coll = ms.collection()
    moji = [(p, t) for p, t in raw_collection if "â\x80\x99" in t]
    assert moji, "the sample keeps the official double-encoded UTF-8"
    pid, text = moji[0]
    fixed = coll[pid]
    assert "’" in fixed and "â\x80\x99" not in fixed
    assert fixed == text.replace("â\x80\x99", "’") or fixed == repair(text)
    assert fixed.count("’") >= text.count("â\x80\x99")


def test_collection_keeps_text_that_does_not_round_trip(ms, raw_collection):
    coll = ms.collection()
    kept = [(p, t) for p, t in raw_collection if not t.isascii() and repair(t) == t]
    assert kept
    for pid, text in kept[:20]:
        assert coll[pid] == text


@pytest.mark.parametrize("text, expected", [
    ("donâ\x80\x99t", "don’t"),
    ("café", "café"),  # legit latin-1 that is not UTF-8 bytes: kept
    ("plain ascii text", "plain ascii text"),
    ("", ""),
    ("194 â¦ 2-1946", "194 â¦ 2-1946"),  # partial sequence: kept
    ("日本", "日本"),  # not latin-1 at all: kept
    ("â\x80\x9cquoteâ\x80\x9d", "“quote”"),
])
def test_fix_mojibake(text, expected):
    assert md.fix_mojibake(text) == expected


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="the source data of the sample is not available")
def test_sample_collection_is_the_source_sorted_bytes_unchanged():
    rows = {}
    for line in (SHARED_SAMPLE / "collection.tsv").read_bytes().split(b"\n"):
        if line.strip():
            pid, _ = line.split(b"\t", 1)
            rows[int(pid)] = line.rstrip(b"\r")
    member = [ln for ln in tar_member_lines(SAMPLE / COLLECTION, "collection.tsv") if ln]
    assert member == [rows[p] for p in sorted(rows)]


# ----------------------------------------------------------------------------------------------
# 2. Queries, qrels, candidates, TREC DL 2020
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, n", [("train", 200), ("dev", 100)])
def test_queries(ms, split, n):
    raw = raw_id_text(tar_member_lines(SAMPLE / "queries.tar.gz", f"queries.{split}.tsv"))
    store = ms.queries(split)
    assert len(raw) == n and len(store) == n
    assert store.ids.tolist() == [q for q, _ in raw]
    assert store.get_many([q for q, _ in raw]) == [repair(t) for _, t in raw]
    q0, t0 = raw[0]
    assert store[q0] == repair(t0)


def test_queries_train_and_dev_are_disjoint(ms):
    assert not set(ms.queries("train").ids.tolist()) & set(ms.queries("dev").ids.tolist())


@pytest.mark.parametrize("split, name, lines, queries", [
    ("train", "qrels.train.tsv", 180, 180), ("dev", "qrels.dev.small.tsv", 100, 100)])
def test_qrels(ms, split, name, lines, queries):
    raw = raw_qrels(SAMPLE / name)
    assert len(raw_text_lines(SAMPLE / name)) == lines
    got = ms.qrels(split)
    assert got == raw
    assert len(got) == queries
    first = raw_text_lines(SAMPLE / name)[0].split()
    assert got[int(first[0])][int(first[2])] == int(first[3])
    # the documented 20 train queries whose positive is missing are left out of qrels.train
    if split == "train":
        assert 58801 not in got and 1100486 not in got
        assert 58801 in ms.queries("train")


def test_dev_candidates_file_order(ms):
    lines = [ln for ln in tar_member_lines(SAMPLE / "top1000.dev.tar.gz", "top1000.dev") if ln]
    assert len(lines) == 2_000
    raw = raw_candidates([ln.decode("utf-8") for ln in lines])
    cand = ms.dev_candidates()
    assert len(cand) == len(raw) == 100
    for q, pids in raw.items():
        assert cand[q].tolist() == pids
    assert dict((q, v.tolist()) for q, v in cand.items()) == raw
    with pytest.raises(KeyError):
        cand[MISSING_PID]
    first = lines[0].split(b"\t")
    assert cand[int(first[0])][0] == int(first[1])


def test_trec_dl_2020(ms):
    queries, qrels, cand = ms.trec_dl(2020)
    raw_q = [(int(q), t) for q, t in (ln.split("\t", 1) for ln in
                                     raw_text_lines(SAMPLE / "msmarco-test2020-queries.tsv.gz"))]
    assert len(raw_q) == 54 and len(queries) == 54
    assert queries.get_many([q for q, _ in raw_q]) == [repair(t) for _, t in raw_q]
    raw_r = raw_qrels(SAMPLE / "2020qrels-pass.txt")
    assert qrels == raw_r
    assert sum(map(len, qrels.values())) == 11_386
    assert set(qrels) == {q for q, _ in raw_q}
    lines = raw_text_lines(SAMPLE / "msmarco-passagetest2020-top1000.tsv.gz")
    assert len(lines) == 5_400
    raw_c = raw_candidates(lines)
    assert {q: v.tolist() for q, v in cand.items()} == raw_c
    assert sum(len(v) for _, v in cand.items()) == 5_400
    assert all(len(v) == 100 for v in raw_c.values())


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="the source data of the sample is not available")
def test_dl20_qrels_are_the_source_file():
    assert (SAMPLE / "2020qrels-pass.txt").read_bytes() == (SHARED_SAMPLE / "qrels.dl20.txt").read_bytes()


# ----------------------------------------------------------------------------------------------
# 3. Hard negatives
# ----------------------------------------------------------------------------------------------
def test_hard_negatives_equal_raw(ms):
    recs = [json.loads(ln) for ln in raw_text_lines(SAMPLE / HARD_NEG)]
    hn = ms.hard_negatives()
    assert len(recs) == len(hn) == 180
    systems = []
    for r in recs:
        for s in r["neg"]:
            if s not in systems:
                systems.append(s)
    assert hn.systems == systems == ["bm25", "all-MiniLM-L6-v2"]
    n = {s: 0 for s in systems}
    for r in recs:
        assert hn.positives(r["qid"]).tolist() == r["pos"]
        got = hn.negatives(r["qid"])
        assert list(got) == list(r["neg"])  # system order of the line
        assert {s: v.tolist() for s, v in got.items()} == r["neg"]  # rank order
        for s, v in r["neg"].items():
            n[s] += len(v)
    assert n == {"bm25": 3_421, "all-MiniLM-L6-v2": 8_821}
    with pytest.raises(KeyError):
        hn.positives(MISSING_PID)


# ----------------------------------------------------------------------------------------------
# 4. Cross-encoder scores
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# 5. The restricted unpickler
# ----------------------------------------------------------------------------------------------
class Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def collect(path: Path) -> tuple[dict, int]:
    out = {}

    def emit(qid, pids, scores):
        assert qid not in out
        out[qid] = dict(zip(pids, scores))
    n = md.stream_score_pickle(path, emit)
    return out, n


def write_pickle(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("where", ["score", "whole"])
@pytest.mark.parametrize("gz", [True, False])
def test_unpickler_refuses_callables(tmp_path, protocol, where, gz):
    target = tmp_path / "pwned"
    obj = {1: {2: 0.5, 3: Evil(target)}} if where == "score" else Evil(target)
    path = write_pickle(tmp_path / ("evil.pkl" + (".gz" if gz else "")), pickle.dumps(obj, protocol=protocol))
    with pytest.raises(DataError) as e:
        md.stream_score_pickle(path, lambda *a: None)
    msg = str(e.value)
    assert str(path) in msg
    assert "opcode" in msg and "could import or call code" in msg
    assert not target.exists()
    # the same file through ScoreStore.build (no collection)
    folder = tmp_path / "store"
    folder.mkdir()
    with pytest.raises(DataError):
        md.ScoreStore.build(folder, path, None)
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_refuses_numpy_scores(tmp_path, protocol):
    path = write_pickle(tmp_path / "np.pkl.gz", pickle.dumps({7: {8: np.float32(1.5)}}, protocol=protocol))
    with pytest.raises(DataError, match="opcode"):
        md.stream_score_pickle(path, lambda *a: None)


@pytest.mark.parametrize("obj", [[1, 2, 3], [{1: {2: 0.5}}], {1: 0.5}, {1: {2: "x"}}, {"a": {1: 0.5}},
                                 {1: {2: {3: 0.5}}}, (1, 2), 5])
def test_unpickler_refuses_other_shapes(tmp_path, obj):
    path = write_pickle(tmp_path / "shape.pkl", pickle.dumps(obj, protocol=4))
    with pytest.raises(DataError) as e:
        md.stream_score_pickle(path, lambda *a: None)
    assert str(path) in str(e.value)


def test_unpickler_truncated(tmp_path):
    data = pickle.dumps({1: {i: float(i) for i in range(100)}}, protocol=4)
    path = write_pickle(tmp_path / "cut.pkl", data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        md.stream_score_pickle(path, lambda *a: None)
    gz = gzip.compress(data)
    (tmp_path / "cut.pkl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="truncated"):
        md.stream_score_pickle(tmp_path / "cut.pkl.gz", lambda *a: None)


def big_scores() -> dict:
    rng = np.random.default_rng(0)
    d = {
        0: {0: 1.0, 5: -2.5},  # qid 0, BININT1 keys
        300: {70_000 + i: float(rng.normal()) for i in range(1_500)},  # >1000 items: several SETITEMS batches
        70_000: {1: 3},  # a single item (SETITEM), int score
        2**31 + 5: {2**31 + 7: 0.25, 65_536: -1e-3},  # LONG1 keys
        2**40: {},  # empty inner dict
    }
    for q in range(1_000, 2_300):  # >1000 queries (outer batches) and >256 memo entries (LONG_BINPUT)
        d[q] = {q * 7 + i: float(i) / 3 for i in range(q % 4)}
    return d


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("gz", [True, False])
def test_unpickler_reads_plain_dicts(tmp_path, protocol, gz):
    d = big_scores()
    data = pickle.dumps(d, protocol=protocol)
    assert (b"\x8a" in data) and (b"J" in data)
    path = write_pickle(tmp_path / ("ok.pkl" + (".gz" if gz else "")), data)
    got, n = collect(path)
    assert n == len(d)
    assert got == d
    assert all(type(k) is int for inner in got.values() for k in inner)


@pytest.mark.parametrize("protocol", [2, 4])
def test_unpickler_single_query(tmp_path, protocol):
    for d in ({5: {6: 0.5}}, {5: {6: 0.5, 7: 1.5}}, {}):
        path = write_pickle(tmp_path / "one.pkl", pickle.dumps(d, protocol=protocol))
        got, n = collect(path)
        assert (got, n) == (d, len(d))


def test_score_store_from_crafted_pickle(tmp_path):
    d = {10: {3: 0.5, 1: 2.0, 2: -1.0}, 4: {9: 7.0}}
    path = write_pickle(tmp_path / "s.pkl", pickle.dumps(d, protocol=4))
    folder = tmp_path / "store"
    folder.mkdir()
    info = md.ScoreStore.build(folder, path, None)
    assert info == {"queries": 2, "scores": 4}
    s = md.ScoreStore(folder)
    assert s.for_query(10)[0].tolist() == [1, 2, 3]
    assert s.lookup(10, [3, 2, 1, 9]).tolist()[:3] == [0.5, -1.0, 2.0]
    assert math.isnan(s.lookup(10, [9])[0])
    assert s.lookup(4, [9]).tolist() == [7.0]


# ----------------------------------------------------------------------------------------------
# 6. Teacher scores
# ----------------------------------------------------------------------------------------------
def raw_teacher(path: Path) -> list[tuple]:
    out = []
    for ln in raw_text_lines(path):
        a, b, q, p, n = ln.split("\t")
        out.append((float(a), float(b), int(q), int(p), int(n)))
    return out


def test_teacher_equals_raw(ms):
    raw = raw_teacher(SAMPLE / TEACHER)
    rec = ms.teacher_scores()
    assert len(raw) == len(rec) == 9_361
    assert rec.dtype == md.TEACHER_DTYPE
    cols = list(zip(*raw))
    np.testing.assert_array_equal(rec["pos_score"], np.array(cols[0], dtype=np.float32))
    np.testing.assert_array_equal(rec["neg_score"], np.array(cols[1], dtype=np.float32))
    for j, name in enumerate(["qid", "pid_pos", "pid_neg"], 2):
        assert rec[name].tolist() == list(cols[j])


BAD_TEACHER_LINES = {
    "4 fields": lambda f: b"\t".join(f[:4]),
    "6 fields": lambda f: b"\t".join(f + [b"1"]),
    "abc score": lambda f: b"\t".join([b"abc"] + f[1:]),
    "negative pid": lambda f: b"\t".join(f[:3] + [b"-" + f[3]] + f[4:]),
    "fractional qid": lambda f: b"\t".join(f[:2] + [f[2] + b".5"] + f[3:]),
    "nan score": lambda f: b"\t".join([b"nan"] + f[1:]),
    "empty line": lambda f: b"",
}


@pytest.mark.parametrize("kind", list(BAD_TEACHER_LINES))
def test_teacher_malformed_line(copy, kind):
    src = copy / TEACHER
    good = src.read_bytes()
    lineno = 1_234

    def edit(lines):
        lines[lineno - 1] = BAD_TEACHER_LINES[kind](lines[lineno - 1].split(b"\t"))
        return lines
    rewrite_text(src, edit)
    with pytest.raises(DataError) as e:
        MSMarco(copy).teacher_scores()
    msg = str(e.value)
    assert str(src) in msg
    assert f"line {lineno}:" in msg
    left = leftovers(copy)
    assert "teacher" not in left
    assert not [n for n in left if ".tmp-" in n]
    # repaired: the next run builds it
    src.write_bytes(good)
    rec = MSMarco(copy).teacher_scores()
    assert len(rec) == 9_361
    assert (copy / md.PREPARED / "teacher" / "meta.json").exists()


def test_teacher_compensating_malformed_lines(copy):
    src = copy / TEACHER

    def edit(lines):  # move the last field of line 10 to the start of line 11
        f10, f11 = lines[9].split(b"\t"), lines[10].split(b"\t")
        lines[9] = b"\t".join(f10[:4])
        lines[10] = b"\t".join([f10[4]] + f11)
        return lines
    rewrite_text(src, edit)
    with pytest.raises(DataError, match="line 10"):
        MSMarco(copy).teacher_scores()


@pytest.mark.parametrize("name", [TEACHER, TRIPLES])
def test_qid_out_of_int32_range(copy, name):
    col = 2 if name == TEACHER else 0

    def edit(lines):
        f = lines[0].split(b"\t")
        f[col] = b"3000000000"
        lines[0] = b"\t".join(f)
        return lines
    rewrite_text(copy / name, edit)
    m = MSMarco(copy)
    with pytest.raises(DataError, match="line 1:"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy: invalid value encountered in cast
        m.teacher_scores() if name == TEACHER else m.triples()


# ----------------------------------------------------------------------------------------------
# 7. Triples
# ----------------------------------------------------------------------------------------------
def test_triples(ms):
    raw = [tuple(map(int, ln.split("\t"))) for ln in raw_text_lines(SAMPLE / TRIPLES)]
    assert len(raw) == 3_421
    first = ms.triples(max_rows=100)
    assert first.shape == (100, 3) and first.dtype == np.int32
    assert [tuple(r) for r in first.tolist()] == raw[:100]
    every = ms.triples()
    assert every.shape == (3_421, 3)
    assert [tuple(r) for r in every.tolist()] == raw
    assert ms.triples(max_rows=10_000).shape == (3_421, 3)


def test_triples_malformed_line(copy):
    src = copy / TRIPLES

    def edit(lines):
        lines[99] = b"1\t2"
        return lines
    rewrite_text(src, edit)
    with pytest.raises(DataError) as e:
        MSMarco(copy).triples()
    assert str(src) in str(e.value) and "line 100:" in str(e.value)
    assert not [n for n in leftovers(copy) if n.startswith("triples")]


# ----------------------------------------------------------------------------------------------
# 8. Files naming passages that are not in the collection
# ----------------------------------------------------------------------------------------------
def _unknown_teacher(copy):
    def edit(lines):
        f = lines[76].split(b"\t")
        lines[76] = b"\t".join(f[:4] + [str(MISSING_PID).encode()])
        return lines
    rewrite_text(copy / TEACHER, edit)
    return TEACHER, "teacher", lambda m: m.teacher_scores(), 77


def _unknown_triples(copy):
    def edit(lines):
        f = lines[54].split(b"\t")
        lines[54] = b"\t".join([f[0], str(MISSING_PID).encode(), f[2]])
        return lines
    rewrite_text(copy / TRIPLES, edit)
    return TRIPLES, "triples", lambda m: m.triples(), 55


def _unknown_hard_negative(copy):
    def edit(lines):
        r = json.loads(lines[9])
        r["neg"]["bm25"].append(MISSING_PID)
        lines[9] = json.dumps(r).encode()
        return lines
    rewrite_text(copy / HARD_NEG, edit)
    return HARD_NEG, "hard-negatives", lambda m: m.hard_negatives(), None


def _unknown_score(copy):
    with gzip.open(copy / CE, "rb") as f:
        d = pickle.load(f)
    next(iter(d.values()))[MISSING_PID] = 1.0
    write_pickle(copy / CE, pickle.dumps(d, protocol=4))
    return CE, "ce-scores", lambda m: m.ce_scores(), None


@pytest.mark.parametrize("damage", [_unknown_teacher, _unknown_triples, _unknown_hard_negative, _unknown_score],
                         ids=["teacher", "triples", "hard-negatives", "ce-scores"])
def test_unknown_pid(copy, damage):
    name, store, open_, lineno = damage(copy)
    with pytest.raises(DataError) as e:
        open_(MSMarco(copy))
    msg = str(e.value)
    assert str(copy / name) in msg
    assert "does not match" in msg
    assert str(MISSING_PID) in msg
    if lineno is not None:
        assert f"line {lineno}:" in msg
    left = leftovers(copy)
    assert store not in left and not [n for n in left if ".tmp-" in n]
    assert left == ["collection"]  # the (good) collection store was built on the way


# ----------------------------------------------------------------------------------------------
# 9. Truncated downloads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, store, open_", [
    (COLLECTION, "collection", lambda m: m.collection()),
    (HARD_NEG, "hard-negatives", lambda m: m.hard_negatives()),
    (TRIPLES, "triples", lambda m: m.triples()),
    (CE, "ce-scores", lambda m: m.ce_scores()),
], ids=["collection", "hard-negatives", "triples", "ce-scores"])
def test_truncated_gzip(copy, name, store, open_):
    src = copy / name
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        open_(MSMarco(copy))
    msg = str(e.value)
    assert str(src) in msg
    assert "truncated" in msg or "corrupt" in msg
    left = leftovers(copy)
    assert store not in left and not [n for n in left if ".tmp-" in n]
    assert left in ([], ["collection"])
    shutil.copy2(SAMPLE / name, src)  # restore the good file
    open_(MSMarco(copy))
    assert (copy / md.PREPARED / store / "meta.json").exists()
    assert len(MSMarco(copy).collection()) == 28_262


@pytest.mark.parametrize("content", ["html", "first 100 bytes", "valid gzip of a cut tar"])
def test_collection_not_a_tar(copy, content):
    src = copy / COLLECTION
    if content == "html":
        src.write_bytes(b"<html>404 not found</html>\n" * 10)
    elif content == "first 100 bytes":
        src.write_bytes(src.read_bytes()[:100])
    else:  # the gzip stream is whole, the tar inside ends early: tarfile raises ReadError while reading
        tar = gzip.decompress(src.read_bytes())
        src.write_bytes(gzip.compress(tar[: len(tar) // 2]))
    try:
        MSMarco(copy).collection()
    except DataError as e:
        assert str(src) in str(e) and leftovers(copy) == []
        return
    except Exception as e:  # noqa: BLE001 - the bug: any other exception type
        raise AssertionError(f"{type(e).__name__}: {e} (not a DataError)") from e
    raise AssertionError("no error")


def test_duplicate_pid_in_collection(copy):
    lines = tar_member_lines(SAMPLE / COLLECTION, "collection.tsv")
    lines.insert(100, lines[5])
    data = b"\n".join(lines)
    with tarfile.open(copy / COLLECTION, "w:gz") as t:
        info = tarfile.TarInfo("collection.tsv")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    pid = int(lines[5].split(b"\t")[0])
    with pytest.raises(DataError, match=f"id {pid} appears twice"):
        MSMarco(copy).collection()
    assert leftovers(copy) == []


# ----------------------------------------------------------------------------------------------
# 10. Malformed qrels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, name, bad", [
    ("train", "qrels.train.tsv", b"abc\t0\t123\t1"),
    ("train", "qrels.train.tsv", b"5\t0\t123"),
    ("dev", "qrels.dev.small.tsv", b"5\t0\t123\tx"),
])
def test_malformed_qrels(copy, split, name, bad):
    src = copy / name

    def edit(lines):
        lines[16] = bad
        return lines
    rewrite_text(src, edit)
    with pytest.raises(DataError) as e:
        MSMarco(copy).qrels(split)
    assert f"{src}, line 17:" in str(e.value)


def test_malformed_trec_qrels(copy):
    src = copy / "2020qrels-pass.txt"

    def edit(lines):
        lines[4_000] = b"23849 0 17118"
        return lines
    rewrite_text(src, edit)
    with pytest.raises(DataError) as e:
        MSMarco(copy).trec_dl(2020)
    assert f"{src}, line 4001:" in str(e.value)


# ----------------------------------------------------------------------------------------------
# 11. The prepared cache
# ----------------------------------------------------------------------------------------------
def test_cache_reused_and_rebuilt_when_source_changes(copy):
    src = copy / COLLECTION
    meta = copy / md.PREPARED / "collection" / "meta.json"
    assert len(MSMarco(copy).collection()) == 28_262
    m1 = meta.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = MSMarco(copy).collection()
    took = time.perf_counter() - t0
    assert len(again) == 28_262
    assert meta.stat().st_mtime_ns == m1
    assert took < 0.5
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


def test_cache_rebuilt_for_old_store_version(copy, monkeypatch):
    MSMarco(copy).collection()
    meta = copy / md.PREPARED / "collection" / "meta.json"
    m1 = meta.stat().st_mtime_ns
    time.sleep(0.01)
    monkeypatch.setattr(md, "STORE_VERSION", md.STORE_VERSION + 1)
    MSMarco(copy).collection()
    assert meta.stat().st_mtime_ns != m1
    assert json.loads(meta.read_text())["fingerprint"]["version"] == md.STORE_VERSION


# ----------------------------------------------------------------------------------------------
# 12. fetch()
# ----------------------------------------------------------------------------------------------
def test_fetch_missing_sample_file(copy):
    (copy / TEACHER).unlink()
    with pytest.raises(DataError) as e:
        md.fetch(TEACHER, copy)
    assert "git checkout" in str(e.value) and str(copy / TEACHER) in str(e.value)
    with pytest.raises(DataError, match="git"):
        MSMarco(copy).teacher_scores()


def test_fetch_existing_sample_file_is_not_size_checked():
    # the bundled miniature is smaller than the published files and is accepted as is
    assert md.fetch("qrels.train.tsv", SAMPLE) == SAMPLE / "qrels.train.tsv"


PAYLOAD = b"0\t0\t17\t1\n" * 5_000


@pytest.fixture
def http_server():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path != "/file":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()
    th.join()


def _patch_source(monkeypatch, name, urls, size, md5):
    monkeypatch.setitem(md.SOURCES, name, Source(name, tuple(urls), size, md5, "test"))


def test_fetch_downloads_missing_file(tmp_path, monkeypatch, http_server):
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], len(PAYLOAD), hashlib.md5(PAYLOAD).hexdigest())
    folder = tmp_path / "data"
    path = md.fetch(name, folder)
    assert path == folder / name and path.read_bytes() == PAYLOAD
    assert hits == ["/file"]
    assert md.fetch(name, folder) == path  # present: no second request
    assert hits == ["/file"]
    assert MSMarco(folder).qrels("train") == {0: {17: 1}}
    assert not list(folder.glob("*.part"))


def test_parallel_fetches_download_once(tmp_path, monkeypatch, http_server):
    """Processes that start together (torchrun ranks, two scripts) share one download: the others wait for it."""
    from concurrent.futures import ThreadPoolExecutor
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], len(PAYLOAD), hashlib.md5(PAYLOAD).hexdigest())
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: md.fetch(name, tmp_path), range(4)))
    assert hits == ["/file"] and all(p.read_bytes() == PAYLOAD for p in paths)


def test_fetch_falls_back_to_mirror(tmp_path, monkeypatch, http_server):
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/dead", base + "/file"], None, hashlib.md5(PAYLOAD).hexdigest())
    assert md.fetch(name, tmp_path).read_bytes() == PAYLOAD
    assert hits == ["/dead", "/file"]


@pytest.mark.parametrize("size, md5", [(None, "0" * 32), (len(PAYLOAD) + 1, None), (len(PAYLOAD), "f" * 32)])
def test_fetch_verifies_download(tmp_path, monkeypatch, http_server, size, md5):
    base, _ = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], size, md5)
    with pytest.raises(DownloadError, match="corrupt"):
        md.fetch(name, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{name}.lock"]  # neither the file nor a .part; the lock


def test_fetch_refuses_incomplete_existing_file(tmp_path, monkeypatch):
    name = "qrels.train.tsv"
    assert md.SOURCES[name].size == 10_589_532
    shutil.copy2(SAMPLE / name, tmp_path / name)  # the sample file outside the sample folder
    with pytest.raises(DataError) as e:
        md.fetch(name, tmp_path)
    assert "incomplete" in str(e.value) and str(tmp_path / name) in str(e.value)
    _patch_source(monkeypatch, name, ["http://127.0.0.1:9/never"], (SAMPLE / name).stat().st_size, None)
    assert md.fetch(name, tmp_path) == tmp_path / name


# ----------------------------------------------------------------------------------------------
# 13. parse_cli
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cfg:
    lr: float = 2e-5
    flag: bool = False
    x: bool = True
    epochs: int = 1
    names: tuple[str, ...] = ("a",)
    sizes: tuple[int, ...] = (1, 2)
    out: str = "output"
    limit: int | None = None


def test_parse_cli_values():
    c = md.parse_cli(Cfg(), ["--lr=7e-6", "--flag", "--x=false", "--names=b, c", "--sizes=3,4,5",
                             "--epochs", "4", "--out", "somewhere", "--limit=7"])
    assert c == Cfg(lr=7e-6, flag=True, x=False, epochs=4, names=("b", "c"), sizes=(3, 4, 5),
                    out="somewhere", limit=7)
    assert type(c.lr) is float and type(c.epochs) is int and type(c.sizes[0]) is int
    assert md.parse_cli(Cfg(), []) == Cfg()
    assert md.parse_cli(Cfg(), ["--flag", "--x=no"]) == Cfg(flag=True, x=False)
    assert md.parse_cli(Cfg(), ["--x"]).x is True
    assert md.parse_cli(Cfg(limit=3), ["--limit=none"]).limit is None


def test_parse_cli_returns_new_instance():
    cfg = Cfg()
    new = md.parse_cli(cfg, ["--epochs=3"])
    assert cfg.epochs == 1 and new.epochs == 3


def test_parse_cli_unknown_key():
    with pytest.raises(SystemExit) as e:
        md.parse_cli(Cfg(), ["--nope=1"])
    msg = str(e.value.code)
    assert "--nope" in msg
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}=" in msg


@pytest.mark.parametrize("argv, key", [(["--lr=abc"], "--lr"), (["--epochs=1.5"], "--epochs"),
                                       (["--flag=maybe"], "--flag"), (["--sizes=1,x"], "--sizes"),
                                       (["--epochs"], "--epochs")])
def test_parse_cli_bad_value(argv, key):
    with pytest.raises(SystemExit) as e:
        md.parse_cli(Cfg(), argv)
    assert key in str(e.value.code)


def test_parse_cli_positional_argument():
    with pytest.raises(SystemExit, match="unexpected argument"):
        md.parse_cli(Cfg(), ["lr=1"])


def test_distinct_ids_and_id_dataset():
    rng = np.random.default_rng(0)
    for ids in (rng.integers(0, 1000, 5000), np.array([], np.int64), np.array([3, 3, 3]),
                np.array([1 << 40, 5, 1 << 40]), np.array([-2, 7, -2])):  # huge or negative ids: np.unique
        assert md.distinct_ids(ids).tolist() == np.unique(ids).tolist()
    qid = np.arange(10, dtype=np.int32)
    ds = md.id_dataset({"qid": qid, "label": np.ones(10, np.float32)}, "t")
    assert len(ds) == 10 and ds[3] == {"qid": 3, "label": 1.0}
    assert ds.data.table.column("qid").chunk(0).buffers()[1].address == qid.ctypes.data  # wrapped, not copied


def test_stores_pickle_as_their_folder():
    """`datasets` pickles a batch transform to fingerprint it: a closure over the collection must not copy it."""
    import pickle
    data = MSMarco(SAMPLE)
    coll = data.collection()
    blob = pickle.dumps(coll)
    assert len(blob) < 1000 < coll.text.nbytes
    back = pickle.loads(blob)
    pid = int(coll.ids[7])
    assert back[pid] == coll[pid] and len(back) == len(coll)
    again = pickle.loads(pickle.dumps(data))
    assert again.dir == data.dir and again.queries("train")[int(data.queries("train").ids[0])]


def test_feistel_order_is_a_seeded_permutation():
    for n in (1, 2, 5, 1000, 70_001):
        order = np.concatenate(list(md.feistel_order(n, seed=3, chunk=4096)))
        assert np.array_equal(np.sort(order), np.arange(n))  # every row exactly once
    a = np.concatenate(list(md.feistel_order(70_001, seed=3)))
    assert np.array_equal(a, np.concatenate(list(md.feistel_order(70_001, seed=3))))
    assert not np.array_equal(a, np.concatenate(list(md.feistel_order(70_001, seed=4))))
    assert abs(np.corrcoef(np.arange(len(a)), a)[0, 1]) < 0.02  # no trace of the input order
    # the first rows drawn are spread over the whole range, not a local block of it
    assert np.histogram(a[:7000], bins=10, range=(0, 70_001))[0].min() > 550


def test_released_store_pages_read_back_the_same():
    ce = MSMarco(SAMPLE).ce_scores()
    before = np.array(ce.scores[:100]), np.array(ce.pids[-100:])
    md.release_pages(ce)  # drops the pages from this process's resident set; the next read faults them back
    assert np.array_equal(ce.scores[:100], before[0]) and np.array_equal(ce.pids[-100:], before[1])
