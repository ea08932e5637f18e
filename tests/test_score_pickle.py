"""The restricted streaming unpickler of the cross-encoder score pickle (msmarco/score_pickle.py): plain dicts of
every protocol read back exactly; anything that could run code, and any other shape, is refused."""
import gzip
import os
import pickle
import signal
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from msmarco import errors, score_pickle, stores
from conftest import write_pickle


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
    n = score_pickle.stream_score_pickle(path, emit)
    return out, n


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("where", ["score", "whole"])
@pytest.mark.parametrize("gz", [True, False])
def test_unpickler_refuses_callables(tmp_path, protocol, where, gz):
    target = tmp_path / "pwned"
    obj = {1: {2: 0.5, 3: Evil(target)}} if where == "score" else Evil(target)
    path = write_pickle(tmp_path / ("evil.pkl" + (".gz" if gz else "")), pickle.dumps(obj, protocol=protocol))
    with pytest.raises(errors.DataError) as e:
        score_pickle.stream_score_pickle(path, lambda *a: None)
    msg = str(e.value)
    assert str(path) in msg
    assert "opcode" in msg and "could import or call code" in msg
    assert not target.exists()
    # the same file through ScoreStore.build (no collection)
    folder = tmp_path / "store"
    folder.mkdir()
    with pytest.raises(errors.DataError):
        stores.ScoreStore.build(folder, path, None)
    assert not target.exists()


def numpy_scores(d: dict, value, key, outer, inner) -> dict:
    """d as a script might have pickled it: scores straight from CrossEncoder.predict (numpy scalars), ids from
    numpy arrays, dicts built as defaultdicts."""
    out = outer()
    for q, scores in d.items():
        out[key(q)] = inner()
        out[key(q)].update((key(p), value(s)) for p, s in scores.items())
    return out


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("value,key,outer,inner", [
    (np.float32, int, dict, dict),
    (np.float64, np.int64, dict, dict),
    (np.float16, np.uint32, lambda: defaultdict(dict), lambda: defaultdict(float)),
    (float, np.int64, lambda: defaultdict(dict), dict),
    (np.float32, np.int64, dict, lambda: defaultdict(int)),
], ids=["f4", "f8-i8", "f2-u4-defaultdicts", "float-i8-outer-defaultdict", "f4-i8-inner-defaultdict"])
def test_unpickler_reads_numpy_scalars_and_defaultdicts(tmp_path, protocol, gz, value, key, outer, inner):
    d = big_scores()
    if value is np.float16:
        d = {q: {p: float(np.float16(s)) for p, s in scores.items() if p < 2**32} for q, scores in d.items()
             if q < 2**32}  # what float16 and uint32 hold
    obj = numpy_scores(d, value, key, outer, inner)
    data = pickle.dumps(obj, protocol=protocol)
    assert b"scalar" in data or value is float
    path = write_pickle(tmp_path / ("np.pkl" + (".gz" if gz else "")), data)
    got, n = collect(path)
    assert n == len(d)
    expected = {q: {p: float(value(s)) for p, s in scores.items()} for q, scores in d.items()}
    assert got == expected
    assert all(type(k) is int and type(v) is float for inner in got.values() for k, v in inner.items())


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_unpickler_numpy_int_scores_and_what_it_refers_back_to(tmp_path, protocol):
    """The pickle refers back to memoised objects: the dtype every scalar shares, one-byte raw values (CPython
    singletons). A numpy scalar stored twice, as one object, is not kept (nothing predict returns does that):
    a clear error, not a wrong value."""
    d = {np.int64(7): {np.int64(8): np.float32(0.25), 10: np.int8(-3), 11: np.uint8(200), 12: np.int8(-3),
                       13: np.int16(-300), 14: np.uint64(2**64 - 1)}}
    path = write_pickle(tmp_path / "ints.pkl", pickle.dumps(d, protocol=protocol))
    got, n = collect(path)
    assert (got, n) == ({7: {8: 0.25, 10: -3, 11: 200, 12: -3, 13: -300, 14: 2**64 - 1}}, 1)
    s = np.float32(0.25)
    path = write_pickle(tmp_path / "twice.pkl", pickle.dumps({1: {2: s, 3: s}}, protocol=protocol))
    with pytest.raises(errors.DataError, match="refers back"):
        score_pickle.stream_score_pickle(path, lambda *a: None)


def test_unpickler_reads_big_endian_scalars(tmp_path):
    """A pickle written on a big-endian machine: the dtype's state says '>' and the raw bytes are reversed."""
    data = pickle.dumps({1: {2: np.float32(1.5), 3: np.int64(-2)}}, protocol=4)
    for raw in (np.float32(1.5).tobytes(), np.int64(-2).tobytes()):
        assert data.count(raw) == 1
        data = data.replace(raw, raw[::-1])
    assert data.count(b"\x8c\x01<") == 1
    path = write_pickle(tmp_path / "be.pkl", data.replace(b"\x8c\x01<", b"\x8c\x01>"))
    assert collect(path) == ({1: {2: 1.5, 3: -2}}, 1)


def test_score_store_from_numpy_scalars(tmp_path):
    d = {10: {3: np.float32(0.5), 1: np.float32(2.0)}, np.int64(4): defaultdict(float, {np.int64(9): np.float32(7)})}
    path = write_pickle(tmp_path / "s.pkl.gz", pickle.dumps(d, protocol=4))
    folder = tmp_path / "store"
    folder.mkdir()
    assert stores.ScoreStore.build(folder, path, None) == {"queries": 2, "scores": 3}
    store = stores.ScoreStore(folder)
    assert store.lookup(10, [1, 3]).tolist() == [2.0, 0.5] and store.lookup(4, [9]).tolist() == [7.0]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("obj,named", [
    ({1: {2: np.array([0.5])}}, "numpy"),  # an ndarray, not a scalar
    ({1: {2: np.float32(0.5)}, 3: np.zeros(2)}, "numpy"),
    ({1: defaultdict(set, {2: 0.5})}, ".set)"),  # a factory other than dict/float/int/list
    ({1: {2: np.float32(0.5), 3: Path("x")}}, "pathlib"),
    ({1: {2: os.system}}, "system"),
])
def test_unpickler_refuses_other_globals(tmp_path, protocol, obj, named):
    path = write_pickle(tmp_path / "g.pkl", pickle.dumps(obj, protocol=protocol))
    with pytest.raises(errors.DataError) as e:
        score_pickle.stream_score_pickle(path, lambda *a: None)
    msg = str(e.value)
    assert "opcode" in msg and "could import or call code" in msg and named in msg


@pytest.mark.parametrize("obj", [{1: {2: np.bool_(True)}}, {1: {2: np.complex64(1)}}, {1: {2: np.str_("x")}},
                                 {1: {2: np.datetime64("2020-01-01")}}, np.float32(1), {1: np.float32(1)}])
def test_unpickler_refuses_other_numpy_scalars(tmp_path, obj):
    path = write_pickle(tmp_path / "n.pkl", pickle.dumps(obj, protocol=4))
    with pytest.raises(errors.DataError):
        score_pickle.stream_score_pickle(path, lambda *a: None)


def test_unpickler_refuses_reduce_of_an_admitted_name(tmp_path):
    """Admitted names are only decoded in their own shape: a REDUCE calling builtins.dict (a defaultdict factory)
    or numpy.dtype as a dict value, or a BUILD of anything but a dtype, is refused."""
    for blob in (b"\x80\x04}K\x01\x8c\x08builtins\x8c\x04dict\x93)R\x85s.",
                 b"\x80\x04}K\x01}K\x02\x8c\x08builtins\x8c\x04list\x93)bs.s."):
        path = write_pickle(tmp_path / "r.pkl", blob)
        with pytest.raises(errors.DataError, match="could import or call code"):
            score_pickle.stream_score_pickle(path, lambda *a: None)


@pytest.mark.parametrize("obj", [[1, 2, 3], [{1: {2: 0.5}}], {1: 0.5}, {1: {2: "x"}}, {"a": {1: 0.5}},
                                 {1: {2: {3: 0.5}}}, (1, 2), 5])
def test_unpickler_refuses_other_shapes(tmp_path, obj):
    path = write_pickle(tmp_path / "shape.pkl", pickle.dumps(obj, protocol=4))
    with pytest.raises(errors.DataError) as e:
        score_pickle.stream_score_pickle(path, lambda *a: None)
    assert str(path) in str(e.value)


def test_unpickler_truncated(tmp_path):
    data = pickle.dumps({1: {i: float(i) for i in range(100)}}, protocol=4)
    path = write_pickle(tmp_path / "cut.pkl", data[: len(data) // 2])
    with pytest.raises(errors.DataError, match="truncated"):
        score_pickle.stream_score_pickle(path, lambda *a: None)
    gz = gzip.compress(data)
    (tmp_path / "cut.pkl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(errors.DataError, match="truncated"):
        score_pickle.stream_score_pickle(tmp_path / "cut.pkl.gz", lambda *a: None)


@pytest.mark.parametrize("op", [b"X", b"B", b"\x8b", b"j"])
@pytest.mark.parametrize("length", [-5, 2**31 - 1])
def test_unpickler_corrupt_length(tmp_path, op, length):
    """A damaged 4-byte length is an error, not a hang (a negative one stepped back onto its own opcode) and not a
    read of gigabytes."""
    path = write_pickle(tmp_path / "len.pkl", b"\x80\x04}" + op + struct.pack("<i", length) + b"." * 16)

    def hang(*_):
        raise TimeoutError("the reader loops")
    old = signal.signal(signal.SIGALRM, hang)  # a regression loops forever: fail instead of hanging the suite
    signal.alarm(20)
    try:
        with pytest.raises(errors.DataError, match="corrupt|truncated|refuse|unexpected"):
            score_pickle.stream_score_pickle(path, lambda *a: None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


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


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("gz", [True, False])
def test_unpickler_reads_plain_dicts(tmp_path, protocol, gz):
    d = big_scores()
    data = pickle.dumps(d, protocol=protocol)
    assert (b"\x8a" in data) and (b"J" in data) if protocol >= 2 else (b"L" in data) and (b"I" in data or b"J" in data)
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
