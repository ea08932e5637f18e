"""Preparing the big training files takes bounded memory: peak RSS does not grow with the input.

Synthetic inputs in the real formats (benchmarks/generate_synthetic.py) at two sizes, 4x apart, are prepared
each in a fresh subprocess; the larger one's peak RSS growth (over the same process after its imports) must
stay within TOLERANCE_MIB of the smaller one's. A loader that builds Python objects per row (pickle.load of
the score dict, a list of teacher rows) would grow by hundreds of MiB between the two sizes.

Sizes: the teacher reader (formats.iter_int_rows) parses chunks of 8 MB of text (~210k teacher lines of ~38
bytes) and keeps the previous chunk alive while it reads the next, so its peak is reached only after two full
chunks. With 0.3M and 1.2M lines at the default chunk size the comparison would measure how full the first
chunks are, not scaling; the child therefore sets 64 KiB chunks (~1.7k lines; `chunk_bytes`, an argument default
of iter_int_rows), so both files span many chunks. The absolute peak at the default chunk size is
what benchmarks/bench_prepare.py reports. The score reader holds one pickle batch of 1,000 queries (~320k
entries) at a time, so both pickles hold more than one batch (0.5M and 2.0M entries).
"""
import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import generate_synthetic as gen  # noqa: E402
from msmarco import score_pickle, stores  # noqa: E402

TOLERANCE_MIB = 40
TEACHER_CHUNK_BYTES = 1 << 16  # iter_int_rows parses 64 KiB chunks here (default 8 MiB): 0.3M lines = ~170 chunks
N_PASSAGES = 1_000_000  # pid range of the synthetic files (no collection is built: stores get collection=None)

# VmHWM, the peak RSS of the child's own process image: ru_maxrss would start at the pytest parent's RSS
# (Linux carries it over fork/exec), hiding the child's growth.
CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from msmarco import formats, stores

def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])

kind, src, dst, chunk_bytes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if chunk_bytes:  # smaller parse chunks, so that both test sizes span many chunks (see the module doc)
    d = list(formats.iter_int_rows.__defaults__)
    d[0] = chunk_bytes
    formats.iter_int_rows.__defaults__ = tuple(d)
base = hwm_kib()
t = time.time()
dst.mkdir(parents=True)
if kind == "scores":
    info = stores.ScoreStore.build(dst, src, None)
elif kind == "teacher":
    info = stores.build_teacher(dst, src, None)
else:  # "triples:N": a seeded sample of N lines
    info = stores.build_triples(dst, src, None, int(kind.split(":")[1]), seed=0)
print(json.dumps({"base_kib": base, "peak_kib": hwm_kib(), "seconds": time.time() - t, "info": info}))
"""


def _prepare(kind: str, src: Path, dst: Path, chunk_bytes: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(dst), str(chunk_bytes)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["growth_mib"] = (r["peak_kib"] - r["base_kib"]) / 1024
    return r


def _score_chunks(n_entries: int, seed: int):
    qids = gen.query_ids(max(1, round(n_entries / 320)), seed)
    return lambda: gen.iter_score_chunks(qids, N_PASSAGES, 320, seed)


def test_score_pickle_memory_does_not_grow(tmp_path):
    runs = {}
    for n in (500_000, 2_000_000):
        src = tmp_path / f"scores{n}.pkl.gz"
        chunks = _score_chunks(n, seed=n)
        info = gen.write_score_pickle(src, chunks())
        r = _prepare("scores", src, tmp_path / f"store{n}")
        assert r["info"]["scores"] == info["rows"] and r["info"]["queries"] == info["queries"]
        runs[n] = r
        # the store returns what the generator wrote, for random (qid, pid)
        store = stores.ScoreStore(tmp_path / f"store{n}")
        rng = np.random.default_rng(0)
        for q, ptr, pids, scores in chunks():
            for j in rng.choice(len(q), 3, replace=False):
                a, b = ptr[j], ptr[j + 1]
                k = rng.integers(a, b, 5)
                got = store.lookup(int(q[j]), pids[k])
                np.testing.assert_array_equal(got, scores[k].astype(np.float32))
                sp, ss = store.for_query(int(q[j]))
                assert len(sp) == b - a
        assert np.isnan(store.lookup(int(q[0]), [N_PASSAGES + 5]))[0]
    small, big = runs[500_000], runs[2_000_000]
    print({n: (round(r["growth_mib"], 1), round(r["seconds"], 2)) for n, r in runs.items()})
    assert big["growth_mib"] - small["growth_mib"] < TOLERANCE_MIB, runs


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_score_pickle_memory_does_not_grow(tmp_path, protocol):
    """A pickle of numpy scalars (ids and scores as CrossEncoder.predict and numpy arrays give them) memoises ~6
    objects per entry; the reader drops them once decoded (kept, 150k more entries would add ~300 MiB). Short
    queries (20 entries), so that both sizes span more than one 1,000-query batch."""
    runs = {}
    for n in (25_000, 175_000):
        rng = np.random.default_rng(n)
        pids, scores = rng.integers(0, N_PASSAGES, n), rng.normal(size=n).astype(np.float32)
        d = {np.int64(q): dict(zip(pids[q * 20:(q + 1) * 20], scores[q * 20:(q + 1) * 20])) for q in range(n // 20)}
        src = tmp_path / f"np{n}.pkl"
        src.write_bytes(pickle.dumps(d, protocol=protocol))
        runs[n] = r = _prepare("scores", src, tmp_path / f"store{n}")
        assert r["info"]["queries"] == len(d) and r["info"]["scores"] == sum(map(len, d.values()))
        store = stores.ScoreStore(tmp_path / f"store{n}")
        q = len(d) - 1
        np.testing.assert_array_equal(store.lookup(q, list(d[q])), np.array(list(d[q].values())))
    small, big = runs[25_000], runs[175_000]
    print({n: (round(r["growth_mib"], 1), round(r["seconds"], 2)) for n, r in runs.items()})
    assert big["growth_mib"] - small["growth_mib"] < TOLERANCE_MIB, runs


def test_teacher_memory_does_not_grow(tmp_path):
    runs = {}
    for n in (300_000, 1_200_000):
        src = tmp_path / f"teacher{n}.tsv"
        gen.write_teacher(src, n, N_PASSAGES, seed=n)
        r = _prepare("teacher", src, tmp_path / f"store{n}", chunk_bytes=TEACHER_CHUNK_BYTES)
        assert r["info"]["rows"] == n
        runs[n] = r
        arr = stores.load_array(tmp_path / f"store{n}", "teacher.bin", np.uint8).view(stores.TEACHER_DTYPE)
        rng = np.random.default_rng(0)
        for first, a in gen.iter_teacher_chunks(n, N_PASSAGES, seed=n):
            for i in rng.integers(0, len(a), 5):
                rec = arr[first + i]
                assert rec["pos_score"] == np.float32(a[i, 0] / 1e6)
                assert rec["neg_score"] == np.float32(a[i, 1] / 1e6)
                assert (int(rec["qid"]), int(rec["pid_pos"]), int(rec["pid_neg"])) == tuple(a[i, 2:].tolist())
    small, big = runs[300_000], runs[1_200_000]
    print({n: (round(r["growth_mib"], 1), round(r["seconds"], 2)) for n, r in runs.items()})
    assert big["growth_mib"] - small["growth_mib"] < TOLERANCE_MIB, runs


def test_triples_sample_memory_does_not_grow_with_the_file(tmp_path):
    """A sample of 50k lines from files of 0.5M and 4M qid-sorted lines (synthetic, in the real file's order): the
    buffer is O(sample), so the peak does not grow with the file (holding every line, even as int32 ids or as a key
    each, would add 28-42 MiB here); the 4M-line store is exactly the sample computed from the keys."""
    n_keep, runs = 50_000, {}
    for n in (500_000, 4_000_000):
        src = tmp_path / f"triples{n}.tsv.gz"
        assert gen.write_triples(src, n, N_PASSAGES, seed=n)["rows"] == n
        r = _prepare(f"triples:{n_keep}", src, tmp_path / f"store{n}", chunk_bytes=1 << 20)  # 1 MiB: 12+ chunks
        assert r["info"]["rows"] == n_keep and r["info"]["lines"] == n
        runs[n] = r
    every = np.concatenate(list(gen.iter_triples_chunks(4_000_000, N_PASSAGES, seed=4_000_000)))
    want = np.sort(np.argsort(stores.line_keys(0, 1, len(every)), kind="stable")[:n_keep])
    got = stores.load_array(tmp_path / "store4000000", "triples.bin", np.int32).reshape(-1, 3)
    assert np.array_equal(got, every[want])
    assert len(np.unique(got[:, 0])) > 0.9 * len(np.unique(every[:, 0]))  # nearly every query of the file
    small, big = runs[500_000], runs[4_000_000]
    print({n: (round(r["growth_mib"], 1), round(r["seconds"], 2)) for n, r in runs.items()})
    assert big["growth_mib"] - small["growth_mib"] < 20, runs


def _strip_frames(b: bytes) -> bytes:
    out, last = [], 0
    for op, arg, pos in pickletools.genops(b):
        if op.name == "FRAME":
            out.append(b[last:pos])
            last = pos + 9
    out.append(b[last:])
    return b"".join(out)


@pytest.mark.parametrize("counts", [[], [0], [1], [2], [1000], [1001], [2000], [0, 1, 2, 999, 1000, 1001, 2000, 3],
                                    [3] * 1000, [2] * 1001, [1] * 2000])
@pytest.mark.parametrize("framing", [False, True])
def test_streaming_pickle_writer_matches_pickle(counts, framing, tmp_path):
    rng = np.random.default_rng(len(counts))
    qids = rng.choice(2**31 - 1, len(counts), replace=False)
    qids[:3] = [7, 300, 70_000][:len(qids)]  # BININT1, BININT2 and BININT keys
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    pids = (np.concatenate([rng.choice(N_PASSAGES, c, replace=False) for c in counts]) if sum(counts)
            else np.zeros(0, np.int64))
    pids[:3] = [0, 255, 65_536][:len(pids)]
    scores = rng.normal(size=len(pids))
    chunks = [(qids, ptr, pids, scores)]
    d = gen.chunks_to_dict(chunks)
    b = gen.score_pickle_bytes(chunks, framing=framing)
    assert pickle.loads(b) == d
    assert _strip_frames(b) == _strip_frames(pickle.dumps(d, protocol=4))  # same opcodes, FRAMEs aside
    assert any(op.name == "FRAME" for op, _, _ in pickletools.genops(b)) == (framing and len(counts) > 0)
    # and the restricted streaming reader accepts it
    src = tmp_path / "s.pkl"
    src.write_bytes(b)
    got = {}
    n = score_pickle.stream_score_pickle(src, lambda q, p, s: got.__setitem__(q, dict(zip(p, s))))
    assert n == sum(1 for c in counts) and got == d
