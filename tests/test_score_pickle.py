"""The restricted streaming unpickler of the cross-encoder score pickle (msmarco/score_pickle.py): plain dicts of
every protocol read back exactly; anything that could run code, and any other shape, is refused."""
import gzip
import os
import pickle
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


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
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


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_refuses_numpy_scores(tmp_path, protocol):
    path = write_pickle(tmp_path / "np.pkl.gz", pickle.dumps({7: {8: np.float32(1.5)}}, protocol=protocol))
    with pytest.raises(errors.DataError, match="opcode"):
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
