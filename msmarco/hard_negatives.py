"""The store of msmarco-hard-negatives.jsonl.gz (`{qid, pos, neg: {system: [pid]}}` per line, 503k queries and ~300M
negatives at full size): positives and each mining system's negatives per query, in rank order, as CSR arrays; and
the cross-encoder margin filter that keeps the negatives a cross-encoder scores well below the positives (its
result is a store too: MSMarco.filtered_negatives)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DataError
from .formats import bad_line, iter_lines
from .stores import ArrayWriter, TextStore, load_array, write_sorted_index


def _pids(values) -> np.ndarray:
    """A record's list of pids as int64: a flat list of JSON integers, nothing truncated (7.9 is not pid 7)."""
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError("pos and neg lists must be flat lists of integer pids")
    return a.astype(np.int64)


class HardNegatives:
    """Per query: positives, and per mining system its negatives in rank order (memory-mapped)."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.systems: list[str] = meta["systems"]
        self.qids = load_array(folder, "qids.bin", np.int64)  # sorted
        self.row_of = load_array(folder, "row_of.bin", np.int64)  # sorted position -> file row
        self.pos_ptr = load_array(folder, "pos_ptr.bin", np.int64)
        self.pos = load_array(folder, "pos.bin", np.int32)
        self.seg_ptr = load_array(folder, "seg_ptr.bin", np.int64)  # file row -> its segments
        self.seg_sys = load_array(folder, "seg_sys.bin", np.int16)
        self.neg_ptr = load_array(folder, "neg_ptr.bin", np.int64)  # segment -> its negatives
        self.neg = load_array(folder, "neg.bin", np.int32)

    @staticmethod
    def build(folder: Path, path: Path, collection: "TextStore | None") -> dict:
        w = {k: ArrayWriter(folder / f"{k}.bin", t) for k, t in [
            ("qids_unsorted", np.int64), ("pos_ptr", np.int64), ("pos", np.int32), ("seg_ptr", np.int64),
            ("seg_sys", np.int16), ("neg_ptr", np.int64), ("neg", np.int32)]}
        systems: dict[str, int] = {}
        n_pos = n_seg = n_neg = 0
        w["pos_ptr"].write([0]); w["seg_ptr"].write([0]); w["neg_ptr"].write([0])
        buf: dict[str, list] = {k: [] for k in w}
        checked = []

        def flush() -> None:
            for k, v in buf.items():
                if v:
                    w[k].write(np.concatenate(v) if isinstance(v[0], np.ndarray) else v)
                    v.clear()
            if collection is not None and checked:
                ids = np.concatenate(checked)
                checked.clear()
                try:
                    collection.rows_of(ids)
                except DataError as e:
                    raise DataError(f"{path}: {e}; the hard-negatives file does not match this data folder") from None

        lineno = 0
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                qid, pos, neg = int(rec["qid"]), rec["pos"], rec["neg"]
                pos = _pids(pos)
                segs = [(str(k), _pids(v)) for k, v in neg.items()]
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
                raise bad_line(path, lineno, line, f'{{"qid": int, "pos": [pid], "neg": {{system: [pid]}}}} ({e})')
            buf["qids_unsorted"].append(qid)
            buf["pos"].append(pos.astype(np.int32))
            checked.append(pos)
            n_pos += len(pos)
            buf["pos_ptr"].append(n_pos)
            for name, pids in segs:
                buf["seg_sys"].append(systems.setdefault(name, len(systems)))
                buf["neg"].append(pids.astype(np.int32))
                checked.append(pids)
                n_neg += len(pids)
                buf["neg_ptr"].append(n_neg)
                n_seg += 1
            buf["seg_ptr"].append(n_seg)
            if len(buf["qids_unsorted"]) >= 20_000:
                flush()
        flush()
        for x in w.values():
            x.close()
        q = np.fromfile(folder / "qids_unsorted.bin", dtype=np.int64)
        write_sorted_index(folder, q, "qids.bin", "row_of.bin", str(path))
        (folder / "qids_unsorted.bin").unlink()
        return {"systems": list(systems), "queries": int(len(q)), "negatives": n_neg}

    def __len__(self) -> int:
        return len(self.qids)

    def _row(self, qid: int) -> int:
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            raise KeyError(qid)
        return int(self.row_of[i])

    def positives(self, qid: int) -> np.ndarray:
        r = self._row(qid)
        return np.asarray(self.pos[self.pos_ptr[r]:self.pos_ptr[r + 1]])

    def negatives(self, qid: int) -> dict[str, np.ndarray]:
        """system -> negatives in that system's rank order."""
        r = self._row(qid)
        out = {}
        for g in range(self.seg_ptr[r], self.seg_ptr[r + 1]):
            out[self.systems[self.seg_sys[g]]] = np.asarray(self.neg[self.neg_ptr[g]:self.neg_ptr[g + 1]])
        return out


def filter_negatives(pos: np.ndarray, negs: dict[str, np.ndarray], pos_scores: np.ndarray,
                     neg_scores: dict[str, np.ndarray], margin: float, per_system: int,
                     systems: tuple[str, ...] = ()) -> list[int]:
    """The CE-margin filter: a negative is kept if its cross-encoder score is <= the lowest scored positive's
    score - margin, up to `per_system` per system (in the system's rank order), without repeats or positives.
    Unscored negatives are dropped (they could be unlabelled positives); with no scored positive, none is kept."""
    scored = pos_scores[~np.isnan(pos_scores)]
    if scored.size == 0:
        return []
    threshold = scored.min() - margin
    kept: list[int] = []
    seen = set(int(p) for p in pos)
    for name, pids in negs.items():
        if systems and name not in systems:
            continue
        added = 0
        for pid, score in zip(pids, neg_scores[name]):
            if added >= per_system:
                break
            if np.isnan(score) or score > threshold or int(pid) in seen:
                continue
            seen.add(int(pid))
            kept.append(int(pid))
            added += 1
    return kept
