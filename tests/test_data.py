"""MSMarco, one data folder as the scripts see it (msmarco/data.py), against the bundled miniature in data/sample/:
every accessor equals an independent reading of the raw files, and damaged or mismatched files are clear errors
that leave no store behind. Expected values come from plain Python (tarfile, gzip, json, pickle)."""
import gzip
import io
import json
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from msmarco import data, errors, paths
from msmarco.data import MSMarco
from conftest import SAMPLE, COLLECTION, HARD_NEG, TEACHER, TRIPLES, CE, MISSING_PID, SHARED_SAMPLE, repair, tar_member_lines, raw_id_text, raw_text_lines, raw_qrels, raw_candidates, leftovers, rewrite_text, write_pickle


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
    # two passages' repaired text as written out here, not by the repair function the store itself calls
    assert coll[6596].endswith(" The financial industry has been Clinton’s most frequent sponsor.")
    assert "bahasa prokem (prokém a more-out dated" in coll[231083]


def test_collection_keeps_text_that_does_not_round_trip(ms, raw_collection):
    coll = ms.collection()
    kept = [(p, t) for p, t in raw_collection if not t.isascii() and repair(t) == t]
    assert kept
    for pid, text in kept[:20]:
        assert coll[pid] == text


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="the source data of the sample is not available")
def test_sample_collection_is_the_source_sorted_bytes_unchanged():
    rows = {}
    for line in (SHARED_SAMPLE / "collection.tsv").read_bytes().split(b"\n"):
        if line.strip():
            pid, _ = line.split(b"\t", 1)
            rows[int(pid)] = line.rstrip(b"\r")
    member = [ln for ln in tar_member_lines(SAMPLE / COLLECTION, "collection.tsv") if ln]
    assert member == [rows[p] for p in sorted(rows)]


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
    with pytest.raises(errors.DataError) as e:
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


@pytest.mark.parametrize("pids", [[7.9], [2**70], [[1, 2]], ["7"]], ids=["float", "beyond int64", "nested", "text"])
def test_hard_negative_pids_that_are_not_integers(copy, pids):
    """A pid that is not a JSON integer is refused with its line, not truncated (7.9 read as pid 7) or a traceback."""
    def edit(lines):
        r = json.loads(lines[9])
        r["neg"]["bm25"] = pids
        lines[9] = json.dumps(r).encode()
        return lines
    rewrite_text(copy / HARD_NEG, edit)
    with pytest.raises(errors.DataError) as e:
        MSMarco(copy).hard_negatives()
    assert str(copy / HARD_NEG) in str(e.value) and "line 10:" in str(e.value)
    assert "integer pids" in str(e.value)
    assert "hard-negatives" not in leftovers(copy)


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
    with pytest.raises(errors.DataError) as e:
        open_(MSMarco(copy))
    msg = str(e.value)
    assert str(src) in msg
    assert "truncated" in msg or "corrupt" in msg
    left = leftovers(copy)
    assert store not in left and not [n for n in left if ".tmp-" in n]
    assert left in ([], ["collection"])
    shutil.copy2(SAMPLE / name, src)  # restore the good file
    open_(MSMarco(copy))
    assert (copy / paths.PREPARED / store / "meta.json").exists()
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
    except errors.DataError as e:
        assert str(src) in str(e) and leftovers(copy) == []
        return
    except Exception as e:  # noqa: BLE001 - the bug: any other exception type
        raise AssertionError(f"{type(e).__name__}: {e} (not a errors.DataError)") from e
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
    with pytest.raises(errors.DataError, match=f"id {pid} appears twice"):
        MSMarco(copy).collection()
    assert leftovers(copy) == []


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
    with pytest.raises(errors.DataError) as e:
        MSMarco(copy).qrels(split)
    assert f"{src}, line 17:" in str(e.value)


def test_malformed_trec_qrels(copy):
    src = copy / "2020qrels-pass.txt"

    def edit(lines):
        lines[4_000] = b"23849 0 17118"
        return lines
    rewrite_text(src, edit)
    with pytest.raises(errors.DataError) as e:
        MSMarco(copy).trec_dl(2020)
    assert f"{src}, line 4001:" in str(e.value)


def test_distinct_ids_and_id_dataset():
    rng = np.random.default_rng(0)
    for ids in (rng.integers(0, 1000, 5000), np.array([], np.int64), np.array([3, 3, 3]),
                np.array([1 << 40, 5, 1 << 40]), np.array([-2, 7, -2])):  # huge or negative ids: np.unique
        assert data.distinct_ids(ids).tolist() == np.unique(ids).tolist()
    qid = np.arange(10, dtype=np.int32)
    ds = data.id_dataset({"qid": qid, "label": np.ones(10, np.float32)}, "t")
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


def test_candidate_files_carry_no_bm25_order_and_the_bm25_runs_do():
    """Like the official top1000 files, the sample's candidate files list each query's candidates in no BM25 order;
    the real BM25 rank order is in runs/bm25/ (TREC runs) over exactly the same candidates."""
    from msmarco import metrics
    dev = raw_candidates([ln.decode("utf-8") for ln in tar_member_lines(SAMPLE / "top1000.dev.tar.gz", "top1000.dev")
                          if ln])
    dl = raw_candidates(raw_text_lines(SAMPLE / "msmarco-passagetest2020-top1000.tsv.gz"))
    for name, cands, n_lines in [("dev", dev, 2_000), ("dl2020", dl, 5_400)]:
        run = metrics.read_trec_run(SAMPLE / "runs" / "bm25" / f"{name}.run")
        assert sum(map(len, run.values())) == n_lines
        assert {q: sorted(d) for q, d in run.items()} == {str(q): sorted(map(str, p)) for q, p in cands.items()}
        in_rank_order = sum(metrics.rank(run[str(q)]) == [str(p) for p in pids] for q, pids in cands.items())
        assert in_rank_order == 0, f"{name}: {in_rank_order} queries list their candidates in BM25 order"
    # the documented BM25 figures: dev-small (top-20 order), and TREC DL 2020 (those of the source's README)
    dev_run = metrics.read_trec_run(SAMPLE / "runs" / "bm25" / "dev.run")
    assert metrics.mrr_at_k(dev_run, metrics.str_qrels(raw_qrels(SAMPLE / "qrels.dev.small.tsv"))) == \
        pytest.approx(0.3338, abs=5e-5)
    dl_run, dl_qrels = metrics.read_trec_run(SAMPLE / "runs" / "bm25" / "dl2020.run"), \
        metrics.str_qrels(raw_qrels(SAMPLE / "2020qrels-pass.txt"))
    assert metrics.ndcg_at_k(dl_run, dl_qrels) == pytest.approx(0.4796, abs=5e-5)
    assert metrics.mrr_at_k(dl_run, dl_qrels, min_grade=2) == pytest.approx(0.6533, abs=5e-5)


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="the source data of the sample is not available")
def test_bm25_runs_are_the_source_order():
    dl = (SHARED_SAMPLE / "runs" / "dl20.BM25.trec").read_bytes()
    assert (SAMPLE / "runs" / "bm25" / "dl2020.run").read_bytes() == dl  # every passage is in the collection
    top20: dict[int, list[int]] = {}
    for ln in (SHARED_SAMPLE / "top20.dev-a.tsv").read_bytes().splitlines():
        q, p = map(int, ln.split(b"\t")[:2])
        if p not in top20.setdefault(q, []):
            top20[q].append(p)
    got: dict[int, list[tuple]] = {}
    for ln in (SAMPLE / "runs" / "bm25" / "dev.run").read_text().splitlines():
        q, q0, p, r, score, tag = ln.split()
        got.setdefault(int(q), []).append((int(p), int(r), float(score), q0, tag))
    assert len(got) == 100
    for q, rows in got.items():
        assert rows == [(p, r, -float(r), "Q0", "bm25") for r, p in enumerate(top20[q], 1)]
