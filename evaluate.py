"""The published benchmarks of any saved model folder (bi-encoder or cross-encoder, detected), in one command.

    python evaluate.py --model=output/train_bi-encoder-v2/model      # dev-small + TREC DL 2019/2020, one GPU
    python evaluate.py --model=output/train_cross-encoder-v1/model   # rerank the official BM25 top-1000
    python evaluate.py --model=output/train_cross-encoder-v1/model --run_file=output/evaluate/train_bi-encoder-v2
                                                                     # retrieve (bi-encoder runs) then rerank
    python evaluate.py --sample --model=offline:all-MiniLM-L6-v2     # bundled sample, offline, CPU
Outputs: output/evaluate/<model name>/ (<split>.run TREC runs, metrics.json, config.json) and a printed table.
A bi-encoder's collection embeddings are cached (fp16, memory-mapped, resumable) under
<data_dir>/.prepared/embeddings/<model name>-<fingerprint>/, so a second evaluation of the same model encodes nothing;
one cache per model name (a retrained model replaces its predecessor's).
A cross-encoder with two labels (monoBERT's kind) ranks by logit 1 minus logit 0; a NaN or infinite score or
embedding (fp16 overflow) stops the command and names --half=false.
The metrics (msmarco/metrics.py) reproduce trec_eval / ir-measures exactly (TREC DL: trec_eval -l 2).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from msmarco import paths
from msmarco.config import script_config
from msmarco.data import MSMarco
from msmarco.errors import user_errors
from msmarco.evaluation import (BM25_RUNS, SPLIT_FILES, available, dev_part, encode_collection, relevance_scores,
                                search_embeddings, write_json_atomic)
from msmarco.metrics import Qrels, StreamingMetrics, read_trec_run, rank, str_qrels
from msmarco.models import no_cudnn_attention, resolve_model
from msmarco.run import save_config
from msmarco.stores import TextStore


@dataclass
class Config:
    model: str = ""  # saved model folder (bi-encoder or cross-encoder, detected), hub name or offline:<name>
    sample: bool = False  # run on data/sample (its dev queries, DL 2020 and 28k-passage collection)
    data_dir: str = "data"  # MS MARCO folder, relative to the repository; missing files are downloaded into it
    splits: tuple[str, ...] = ("dev", "dl2019", "dl2020")  # dev (dev-small: 6,980 queries), dev-tune, dev-test, dl<yr>
    run_file: str = ""  # cross-encoder: a TREC run (or a folder of <split>.run) to rerank instead of the BM25 top-1000
    depth: int = 1000  # bi-encoder: passages retrieved per query; cross-encoder: candidates reranked per query
    batch_size: int = 128  # texts (bi-encoder) or pairs (cross-encoder) per forward pass
    max_length: int = -1  # tokens per text (bi-encoder) / per query+passage (cross-encoder); -1: the model's own
    half: bool = True  # on a GPU run the model in fp16 (2-3x faster); ignored on a CPU
    encode_chunk: int = 100_000  # bi-encoder: passages encoded between two checkpoints of the embedding cache
    max_queries: int = -1  # evaluate a seeded random subset of each split's judged queries (-1: all)
    seed: int = 0  # the subset choice of max_queries
    output_dir: str = ""  # default output/evaluate/<model name>/


# --sample: the 28,262 passages in checkpoints of 2,000 (one chunk of 100,000 showed no progress for ~10 minutes on
# 2 cores and saved nothing when cut)
SAMPLE = dict(data_dir="data/sample", batch_size=64, encode_chunk=2_000)

# Which metrics each split reports, and the grade that counts as relevant for MRR and recall.
SPLIT_METRICS = {"dev": (1, ("MRR@10", "R@100", "R@1000")), "dl": (2, ("nDCG@10", "MRR@10", "R@100", "R@1000"))}
# The two fixed parts of dev-small (msmarco.evaluation.dev_part): dev-tune chose the training scripts' checkpoints and
# the sample presets; dev-test decided nothing. Their files are dev's.
DEV_PARTS = ("dev-tune", "dev-test")


def source_split(name: str) -> str:
    """The split whose files a split reads: dev for dev-tune and dev-test."""
    return name.split("-", 1)[0]


# Published BM25 (Anserini regressions, k1=0.9 b=0.4; TREC DL recall at grade >= 2), printed beside full-scale runs.
PUBLISHED_BM25 = {"dev": {"MRR@10": 0.184, "R@1000": 0.853}, "dl2019": {"nDCG@10": 0.506, "R@1000": 0.750},
                  "dl2020": {"nDCG@10": 0.480, "R@1000": 0.786}}


def model_kind(folder) -> str:
    """"bi-encoder" or "cross-encoder" for a saved model folder, from what sentence-transformers writes there:
    config_sentence_transformers.json's model_type (v4+), else a Pooling module in modules.json (bi-encoder) or a
    *ForSequenceClassification architecture in config.json (older cross-encoders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: model folder {folder} does not exist")
    st_cfg = folder / "config_sentence_transformers.json"
    if st_cfg.exists():
        kind = _json(st_cfg).get("model_type")
        if kind in ("SentenceTransformer", "CrossEncoder"):
            return "bi-encoder" if kind == "SentenceTransformer" else "cross-encoder"
        if kind:
            raise SystemExit(f"error: {folder} holds a {kind} model; evaluate.py takes a SentenceTransformer "
                             "(bi-encoder) or a CrossEncoder")
    if (folder / "modules.json").exists():
        types = [m.get("type", "") for m in _json(folder / "modules.json")]
        if any(t.endswith("Pooling") for t in types):
            return "bi-encoder"
    if (folder / "config.json").exists():
        archs = _json(folder / "config.json").get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "cross-encoder"
    raise SystemExit(f"error: {folder} is neither a SentenceTransformer (bi-encoder: modules.json with a Pooling "
                     "module) nor a CrossEncoder (a sequence-classification head); pass the model/ folder a "
                     "training script saved, e.g. --model=output/train_bi-encoder-v2/model")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e}): the model folder is damaged; save the model again")


def _model_folder(name: str) -> Path:
    path = resolve_model(name)
    if Path(path).is_dir():
        return Path(path)
    if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 \
            or paths.resolve_dir(name.split("/")[0]).is_dir():  # a path (output/x); hub ids: org/name
        raise SystemExit(f"error: model folder {name} does not exist")
    try:  # a hub name: its snapshot folder (downloaded unless offline)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path))
    except Exception as e:
        raise SystemExit(f"error: {name!r} is not a model folder and could not be fetched from the hub: {e}") from None


def model_label(name: str, folder: Path) -> str:
    """A short name for outputs: a training script's output/<script>/model -> <script>; checkpoint-N keeps it."""
    if name.startswith("offline:"):
        return name.split(":", 1)[1]
    if folder.name == "model":
        return folder.parent.name
    if folder.name.startswith("checkpoint-"):
        return f"{folder.parent.parent.name}-{folder.name}"
    if folder.parent.name == "snapshots":  # a hub model in the HF cache: its name, not the revision's hash (one
        return name.rstrip("/").rsplit("/", 1)[-1]  # embedding cache per model, whichever revision)
    return folder.name


def embedding_fingerprint(folder: Path, model, collection: "TextStore") -> str:
    """Key of a bi-encoder's embedding cache: the model folder's files (sizes and mtimes), its max_seq_length and
    weight dtype, and the collection store's own fingerprint."""
    import hashlib
    files = {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "README.md" and ".cache" not in p.parts}
    meta = Path(getattr(collection, "folder", "")) / "meta.json"
    coll = json.loads(meta.read_text()).get("fingerprint") if meta.is_file() else len(collection)
    key = json.dumps({"files": files, "max_seq_length": model.max_seq_length,
                      "dtype": str(next(model.parameters()).dtype), "collection": coll}, sort_keys=True)
    return f"{cache_label(folder)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def cache_label(folder: Path) -> str:
    """The model part of an embedding cache's name, one per model: a newer cache of the same label replaces the older.
    A hub model in the HF cache is named by its org and name (models--org--name), not by its revision's hash."""
    if folder.parent.name == "snapshots":
        return folder.parent.parent.name.removeprefix("models--")
    return model_label("", folder)


@dataclass
class BenchmarkSplit:
    """One benchmark split: its judged queries (all, or a subset), judgments and candidate lists."""
    name: str
    qids: list[int]
    queries: list[str]
    qrels: Qrels
    min_grade: int
    metrics: tuple[str, ...]
    candidates: Callable[[int], np.ndarray | None]  # qid -> candidate pids in order (None: no candidates)


def load_benchmark_split(data: "MSMarco", name: str, max_queries: int = -1,
                         seed: int = 0) -> BenchmarkSplit:
    """Every judged query of dev-small (qrels.dev.small) or TREC DL <year>, with the official candidates, read (and
    downloaded) only when asked for: a bi-encoder retrieves, a --run_file replaces them. Unlike load_rerank_set no
    passage text is loaded: at full scale there are 7M candidates."""
    if source_split(name) == "dev":
        queries, qrels_int, official = data.queries("dev"), data.qrels("dev"), data.dev_candidates
    else:
        queries, qrels_int = data.trec_dl_topics(int(name[2:]))
        official = lambda: data.trec_dl_candidates(int(name[2:]))  # noqa: E731
    min_grade, metrics = SPLIT_METRICS["dev" if source_split(name) == "dev" else "dl"]
    qids = sorted(q for q, d in qrels_int.items() if any(g > 0 for g in d.values()))  # nDCG: any grade; MRR: min_grade
    if name in DEV_PARTS:
        qids = dev_part(qids, name.split("-", 1)[1])
    if 0 <= max_queries < len(qids):
        rng = np.random.default_rng(seed)
        qids = sorted(rng.choice(qids, size=max_queries, replace=False).tolist())
    return BenchmarkSplit(name, qids, [queries[q] for q in qids], str_qrels({q: qrels_int[q] for q in qids}),
                          min_grade, metrics, lambda q: official()[q] if q in official() else None)


def dev_test_part(dev: BenchmarkSplit) -> BenchmarkSplit:
    """dev's queries in dev-test, the part that decided nothing (dev-tune chose the training scripts' checkpoints and
    the sample presets), measured from dev's own ranking: a figure free of that choice at no second scoring."""
    qids = dev_part(dev.qids, "test")
    keep = set(qids)
    return BenchmarkSplit("dev-test", qids, [t for q, t in zip(dev.qids, dev.queries) if q in keep],
                          {str(q): dev.qrels[str(q)] for q in qids}, dev.min_grade, dev.metrics, dev.candidates)


def _run_lines(qid: str, docs: dict[str, float], tag: str, k: int | None = None) -> str:
    """One query's lines in write_trec_run's format."""
    return "".join(f"{qid} Q0 {pid} {i} {float(docs[pid])!r} {tag}\n" for i, pid in enumerate(rank(docs, k), start=1))


def _recall_ks(depth: int) -> tuple[int, ...]:
    return tuple(k for k in (100, 1000) if k <= depth) or (depth,)


def _measure(splits: list[BenchmarkSplit], ranked: Iterable[tuple[int, dict[str, float]]], depth: int,
             run_path: Path | None = None, tag: str = "") -> dict[str, dict[str, float]]:
    """{split name: metrics} of one stream of rankings for each of `splits` (a split and the part of it measured from
    the same stream; each counts its own queries), and with `run_path` the rankings written there (renamed into
    place when complete)."""
    metrics = [StreamingMetrics(s.qrels, s.min_grade, _recall_ks(depth)) for s in splits]
    with contextlib.ExitStack() as stack:
        f = None
        if run_path is not None:
            run_path.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(run_path.with_name(run_path.name + ".tmp"), "w", encoding="utf-8"))
        for qid, docs in ranked:
            if f is not None:
                f.write(_run_lines(str(qid), docs, tag, depth))
            for m in metrics:
                m.add(str(qid), docs)
    if run_path is not None:
        os.replace(run_path.with_name(run_path.name + ".tmp"), run_path)
    return {s.name: _select(m.result(), s.metrics) for s, m in zip(splits, metrics)}


def _entries(s: BenchmarkSplit, part: BenchmarkSplit | None, mode: str, ranked, out: Path, tag: str,
             depth: int) -> dict[str, dict]:
    """The report entries of split `s` (its run written to out/<split>.run) and of its part, if any, right after it."""
    measured = _measure([s, *([part] if part else [])], ranked, depth, out / f"{s.name}.run", tag)
    entries = {s.name: {"mode": mode, "queries": len(s.qids), "run": f"{s.name}.run", "model": measured[s.name]}}
    if part is not None:
        entries[part.name] = {"mode": mode, "queries": len(part.qids), "run": f"{s.name}.run", "part_of": s.name,
                              "model": measured[part.name]}
    return entries


def _select(m: dict[str, float], names: Iterable[str]) -> dict[str, float]:
    """The split's metrics; recall at every measured depth (R@100 and R@1000 at depth 1000, R@<depth> below 100)."""
    return {k: m[k] for k in [n for n in names if not n.startswith("R@")] + [n for n in m if n.startswith("R@")]}


def _candidate_lists(split: BenchmarkSplit, data_dir: Path, run_file: str, depth: int,
                     cut: bool = True) -> tuple[dict[int, np.ndarray], str, str]:
    """qid -> candidate pids, where they come from, and what their own order is ("candidates", "BM25" or
    "file order"). From `run_file` (a TREC run, or a folder of <split>.run) or else the data folder's BM25 run
    (runs/bm25/<split>.run): its top `depth` in its order. Else the official candidate file, all of each query's
    candidates: the file is not in rank order, so its first `depth` would be an arbitrary subset; with `cut`, a
    depth below a query's candidates is an error that says how to give a ranking."""
    order = "candidates"
    if not run_file and (data_dir / BM25_RUNS / f"{source_split(split.name)}.run").is_file():
        run_file, order = str(data_dir / BM25_RUNS), "BM25"
    if not run_file:
        out = {q: np.asarray(c, dtype=np.int64) for q in split.qids if (c := split.candidates(q)) is not None}
        most = max((len(c) for c in out.values()), default=0)
        if cut and most > depth:
            raise SystemExit(
                f"error: --depth={depth}, but the {split.name} candidate file lists up to {most} candidates a query "
                f"in no particular order, so its first {depth} would be an arbitrary subset. Rerank all of them "
                f"(--depth={most} or more), or give a ranking to cut: --run_file=<TREC run or folder of <split>.run>, "
                f"or a BM25 run at {data_dir / BM25_RUNS / (source_split(split.name) + '.run')}")
        return out, "official BM25 top-1000 (all, file order)", "file order"
    path = paths.resolve_dir(run_file)
    if path.is_dir():  # <split>.run, or for a part of dev the whole dev's dev.run
        path = next((p for p in (path / f"{split.name}.run", path / f"{source_split(split.name)}.run") if p.is_file()),
                    path / f"{split.name}.run")
    if not path.is_file():
        raise SystemExit(f"error: run file {path} does not exist")
    run = read_trec_run(path, qids=map(str, split.qids))
    out = {q: np.asarray(rank(run[str(q)], depth), dtype=np.int64) for q in split.qids if str(q) in run}
    if not out:
        raise SystemExit(f"error: {path} ranks none of the {len(split.qids)} judged queries of split {split.name}")
    return out, (f"BM25 run {path}" if order == "BM25" else str(path)), order


def _reference_at_hand(data_dir: Path, split: str) -> bool:
    """Whether a bi-encoder's table can show BM25 beside it without a download (top1000.dev alone is 687 MB)."""
    split = source_split(split)
    return (data_dir / BM25_RUNS / f"{split}.run").is_file() or all(
        (data_dir / f).exists() for f in SPLIT_FILES[split] if "top1000" in f)


def keep_head_fp32(model) -> None:
    """Under .half(), keep a cross-encoder's output layer (its last Linear) in fp32, fed fp32: fp16 logits step by
    0.008-0.016 at the 2-19 of a MiniLM cross-encoder, enough to tie close candidates (ties then go by pid)."""
    import torch
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.float()
    head.register_forward_pre_hook(lambda mod, args: tuple(a.float() for a in args))


@contextlib.contextmanager
def _label_lock(path: Path):
    """One evaluation of a model name at a time in a data folder; none where the folder is read-only (a shared one
    serves its complete caches, and nothing there can be removed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        yield
        return
    with paths.file_lock(path):
        yield


def _bi_encoder_splits(model, folder: Path, data, splits: list[BenchmarkSplit], cfg: Config, out: Path, tag: str,
                       parts: dict[str, BenchmarkSplit]):
    coll = data.collection()
    cache = data.dir / paths.PREPARED / "embeddings" / embedding_fingerprint(folder, model, coll)
    label = cache.name.rsplit("-", 1)[0]
    with _label_lock(cache.parent / f"{label}.lock"):  # another evaluation of this name would remove what this reads
        for old in cache.parent.glob("*"):  # one cache per model: 6.8 GB each for 384 dimensions at full size
            if old.is_dir() and old != cache and re.fullmatch(re.escape(label) + r"-[0-9a-f]{16}", old.name):
                print(f"removing {old}: the embeddings of an earlier {label} (other model files, max_seq_length, "
                      "dtype or collection)")
                shutil.rmtree(old, ignore_errors=True)
        print(f"collection: {len(coll):,} passages; embedding cache {cache}")
        emb = encode_collection(model, coll, cache, batch_size=cfg.batch_size, chunk=cfg.encode_chunk)
        texts = [t for s in splits for t in s.queries]  # every split's queries in one pass over the embeddings
        q = model.encode_query(texts, batch_size=cfg.batch_size, convert_to_tensor=True, show_progress_bar=False)
        scores, rows = search_embeddings(model, q, emb, cfg.depth, progress=len(coll) > 1_000_000)
    ids = np.asarray(coll.ids)
    results, start = {}, 0
    for s in splits:
        sl = slice(start, start + len(s.qids))
        start += len(s.qids)
        pids, sc = ids[rows[sl]], scores[sl]
        ranked = ((q, {str(p): float(v) for p, v in zip(pids[j], sc[j])}) for j, q in enumerate(s.qids))
        results.update(_entries(s, parts.get(s.name), "dense retrieval", ranked, out, tag, cfg.depth))
    return results


def _cross_encoder_ranked(model, split: BenchmarkSplit, cands: dict[int, np.ndarray], collection,
                          batch_size: int, pairs_per_step: int = 16_384):
    """(qid, {pid: raw logit}) per query, scoring a few queries' candidates at a time (bounded memory)."""
    import torch
    from tqdm import tqdm
    order = [(q, t) for q, t in zip(split.qids, split.queries) if q in cands and len(cands[q])]
    bar = tqdm(total=sum(len(cands[q]) for q, _ in order), unit="pair", desc=f"reranking {split.name}",
               disable=len(order) < 200)
    i = 0
    while i < len(order):
        group, n = [], 0
        while i < len(order) and (not group or n + len(cands[order[i][0]]) <= pairs_per_step):
            group.append(order[i]); n += len(cands[order[i][0]]); i += 1
        pairs = [(t, p) for q, t in group for p in collection.get_many(cands[q])]
        scores = model.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                               show_progress_bar=False, convert_to_numpy=True)
        scores = relevance_scores(scores, len(pairs))
        j = 0
        for q, _ in group:
            pids = cands[q]
            yield q, {str(p): float(v) for p, v in zip(pids, scores[j:j + len(pids)])}
            j += len(pids)
        bar.update(n)
    bar.close()


def print_results(results: dict, cand_header: str, published: bool) -> None:
    cols = ["model", cand_header] + (["BM25 (Anserini)"] if published else [])
    w = max([8, *(len(name) + 2 for name in results)])
    print(f"\n{'split':{w}}{'metric':10}" + "".join(f"{c:>17}" for c in cols))
    for name, r in results.items():
        for metric, v in r["model"].items():
            row = [v, r.get("candidates", {}).get(metric), PUBLISHED_BM25.get(name, {}).get(metric)][:len(cols)]
            print(f"{name:{w}}{metric:10}" + "".join(f"{x:17.4f}" if x is not None else f"{'':>17}" for x in row))


def main(cfg: Config) -> dict:
    import torch
    if not cfg.model:
        raise SystemExit("error: which model? pass a saved model folder, e.g.\n"
                         "  python evaluate.py --model=output/train_bi-encoder-v2/model\n"
                         "  python evaluate.py --sample --model=offline:all-MiniLM-L6-v2")
    unknown = [s for s in cfg.splits if s not in SPLIT_FILES and s not in DEV_PARTS]
    if unknown:
        raise SystemExit(f"error: unknown split(s) {unknown}; choose from {', '.join([*SPLIT_FILES, *DEV_PARTS])}")
    folder = _model_folder(cfg.model)
    kind = model_kind(folder)
    label = model_label(cfg.model, folder)
    out = paths.resolve_dir(cfg.output_dir or paths.OUTPUT_DIR / "evaluate" / label)
    data = MSMarco(cfg.data_dir)
    is_sample = paths.is_sample(data.dir)
    if kind == "bi-encoder" and cfg.run_file:
        raise SystemExit("error: --run_file gives candidates for a cross-encoder to rerank; a bi-encoder retrieves "
                         "from the whole collection")
    names = []
    for s in cfg.splits:
        if available(data.dir, s, candidates=kind == "cross-encoder" and not cfg.run_file):
            names.append(s)
        else:
            print(f"note: split {s} skipped: its files are not in the bundled sample "
                  f"({', '.join(SPLIT_FILES[source_split(s)])})")
    if not names:
        raise SystemExit(f"error: nothing to evaluate: --splits={','.join(cfg.splits)} names no split that "
                         f"{data.dir} has; choose from {', '.join([*SPLIT_FILES, *DEV_PARTS])}")
    splits = [load_benchmark_split(data, s, cfg.max_queries, cfg.seed) for s in names]
    save_config(cfg, out)  # only now: a command refused above leaves an earlier evaluation's folder as it was
    (out / "metrics.json").unlink(missing_ok=True)  # an earlier evaluation's, until this one writes its own
    # dev-test beside dev, from dev's rankings: dev holds the dev-tune queries that chose checkpoints and presets
    parts = {s.name: dev_test_part(s) for s in splits if s.name == "dev" and "dev-test" not in names}
    print(f"{label}: {kind} from {folder}; splits " + ", ".join(f"{s.name} ({len(s.qids)} queries)" for s in splits))

    # 1. Model, on the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "bi-encoder":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(str(folder), device=device)
        if cfg.max_length > 0:
            model.max_seq_length = cfg.max_length
    else:
        from sentence_transformers import CrossEncoder
        model = CrossEncoder(str(folder), device=device, max_length=cfg.max_length if cfg.max_length > 0 else None)
    if cfg.half and device == "cuda":
        no_cudnn_attention()  # fp16 with a mask picks it on Hopper: a new cuDNN graph for every padded shape
        model.half()
        if kind == "cross-encoder":
            keep_head_fp32(model)
    model.eval()
    tag = "".join(c if c.isalnum() or c in "-_.:" else "_" for c in label) or "model"

    # 2. Runs and their metrics: dense retrieval over the collection, or reranking of candidates.
    lists: dict[str, tuple[dict[int, np.ndarray], str]] = {}
    with torch.inference_mode():
        if kind == "bi-encoder":
            results = _bi_encoder_splits(model, folder, data, splits, cfg, out, tag, parts)
        else:
            results, coll = {}, data.collection()
            # every split's candidates before any scoring: a split without any (a --run_file of one split, a
            # failed download) ends the command at once, not after hours of reranking the splits before it
            found = {s.name: _candidate_lists(s, data.dir, cfg.run_file, cfg.depth) for s in splits}
            for s in splits:
                cands, source, order = found.pop(s.name)
                lists[s.name] = cands, order  # step 3's reference: a full-size run file is read once
                missing = len(s.qids) - len(cands)
                if missing:
                    print(f"note: {missing} of the {len(s.qids)} {s.name} queries have no candidates; they score 0")
                ranked = _cross_encoder_ranked(model, s, cands, coll, cfg.batch_size)
                results.update(_entries(s, parts.get(s.name), f"rerank {source}", ranked, out, tag, cfg.depth))

    # 3. Beside the model: the candidates' own order (a --run_file's, or BM25's where the data folder has its run).
    #    An official candidate file in file order is no ranking: only its recall over all candidates is kept.
    unranked = []
    for s in splits:
        if s.name not in lists and not _reference_at_hand(data.dir, s.name):
            print(f"note: no BM25 column for {s.name}: neither {BM25_RUNS / (source_split(s.name) + '.run')} nor its "
                  f"candidate file is in {data.dir} (a bi-encoder needs neither, so neither is downloaded)")
            continue
        cands, order = lists[s.name] if s.name in lists else \
            _candidate_lists(s, data.dir, "", cfg.depth, cut=False)[::2]
        own = ((q, {str(p): -float(i) for i, p in enumerate(pids)}) for q, pids in cands.items())
        for name, ref in _measure([s, *([parts[s.name]] if s.name in parts else [])], own, cfg.depth).items():
            if order == "file order":
                most = max((len(c) for c in cands.values()), default=0)
                ref = {k: v for k, v in ref.items() if k.startswith("R@") and int(k[2:]) >= most}
                unranked.append(name)
            results[name]["candidates"], results[name]["candidates_order"] = ref, order

    report = {"model": str(folder), "model_type": kind, "data_dir": str(data.dir), "depth": cfg.depth,
              "candidates": cfg.run_file or "BM25 (data_dir/runs/bm25 where present, else the official top-1000)",
              "splits": results}
    write_json_atomic(out / "metrics.json", report)
    cand_header = "candidates" if cfg.run_file and kind == "cross-encoder" else "BM25"
    print_results(results, cand_header, published=not is_sample and not cfg.run_file)
    if parts:
        print("(dev-test: dev's queries that chose no checkpoint or preset, measured from the same dev run)")
    if unranked:
        print(f"(BM25 column of {', '.join(unranked)}: the official candidate files are not in rank order, so only "
              f"the recall of all candidates is shown; a BM25 run at <data_dir>/{BM25_RUNS}/<split>.run ranks them)")
    print(f"runs and metrics.json in {out}")
    return report


if __name__ == "__main__":
    with user_errors():
        main(script_config(Config(), SAMPLE))
