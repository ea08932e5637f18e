"""evaluate.py as a command: saved bi-/cross-encoders on the bundled sample, metrics checked against ir-measures,
the resumable embedding cache, and the README's "use a trained model" snippet.

The models are the offline base model cut to one transformer layer (fast on 2 CPU cores); the collection is
encoded once per session (the cache is removed at the end)."""
import concurrent.futures
import json
import re
import shutil
import time
from pathlib import Path

import ir_measures
import numpy as np
import pytest

import evaluate
from msmarco import config, errors, evaluation, metrics, paths
from msmarco.errors import ModelError
from msmarco.models import offline_base_model
from msmarco.data import MSMarco

SAMPLE = paths.SAMPLE_DIR
DEV_MEASURES = {"MRR@10": "RR@10", "R@100": "R@100", "R@1000": "R@1000"}
DL_MEASURES = {"nDCG@10": "nDCG@10", "MRR@10": "RR(rel=2)@10", "R@100": "R(rel=2)@100", "R@1000": "R(rel=2)@1000"}
QRELS = {"dev": SAMPLE / "qrels.dev.small.tsv", "dl2020": SAMPLE / "2020qrels-pass.txt"}


def _one_layer(encoder_module) -> None:
    encoder_module.encoder.layer = encoder_module.encoder.layer[:1]
    encoder_module.config.num_hidden_layers = 1


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from sentence_transformers import CrossEncoder, SentenceTransformer
    root = tmp_path_factory.mktemp("models")
    base = offline_base_model()
    bi = SentenceTransformer(base, device="cpu")
    _one_layer(bi[0].auto_model)
    bi.max_seq_length = 16  # the whole sample collection is encoded: 16 tokens halve its cost
    bi.save_pretrained(str(root / "bi" / "model"))
    import torch
    torch.manual_seed(0)  # the new head's weights: the same scores, and the same ties, in every session
    ce = CrossEncoder(base, num_labels=1, device="cpu", max_length=64)
    _one_layer(ce.model.base_model)
    ce.save_pretrained(str(root / "ce" / "model"))
    (root / "plain").mkdir()
    shutil.copy(Path(base) / "config.json", root / "plain" / "config.json")
    return {"bi": root / "bi" / "model", "ce": root / "ce" / "model", "plain": root / "plain"}


def _cfg(model, out, **kw):
    return evaluate.Config(model=str(model), data_dir=str(SAMPLE), max_queries=10, batch_size=32,
                           output_dir=str(out), **kw)


@pytest.fixture(scope="session")
def bi_eval(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_bi")
    root = SAMPLE / paths.PREPARED / "embeddings"
    before = set(root.glob("*"))
    report = evaluate.main(_cfg(models["bi"], out))
    yield out, report
    for c in set(root.glob("*")) - before:  # this session's cache only (a new model folder: a new fingerprint)
        shutil.rmtree(c, ignore_errors=True)


def _check_against_ir_measures(out: Path, report: dict, depth: int) -> None:
    # no DL 2019 in the sample: skipped with a note; dev-test (dev's queries that decided nothing) from dev's run
    assert list(report["splits"]) == ["dev", "dev-test", "dl2020"]
    for split, res in report["splits"].items():
        run_path = out / res["run"]
        _check_trec_run(run_path, depth)
        run = {}
        for r in ir_measures.read_trec_run(str(run_path)):
            run.setdefault(r.query_id, {})[r.doc_id] = r.score
        if split == "dev-test":
            assert res["part_of"] == "dev" and res["run"] == "dev.run"
            run = {q: d for q, d in run.items() if int(q) in evaluation.dev_part([int(q) for q in run], "test")}
        assert len(run) == res["queries"] == (10 if split != "dev-test" else len(run)) > 0
        qrels = [q for q in ir_measures.read_trec_qrels(str(QRELS[split.split("-")[0]])) if q.query_id in run]
        dev = split.startswith("dev")
        names = {k: v for k, v in (DEV_MEASURES if dev else DL_MEASURES).items() if not k.startswith("R@")}
        for k in [k for k in (100, 1000) if k <= depth] or [depth]:
            names[f"R@{k}"] = f"R@{k}" if dev else f"R(rel=2)@{k}"
        # Exact ties happen (the sample's collection holds duplicate passages, which a model scores alike).
        # msmarco.metrics breaks them as trec_eval does (docno descending; checked against trec_eval in
        # test_metrics.py), ir-measures' default provider for RR@k the other way: so it is given the run's ranks.
        run = {q: {d: -float(i) for i, d in enumerate(metrics.rank(docs))} for q, docs in run.items()}
        expect = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in names.values()], qrels, run)
        got = json.loads((out / "metrics.json").read_text())["splits"][split]["model"]
        assert set(got) == set(names)
        for ours, theirs in names.items():
            assert got[ours] == pytest.approx(expect[ir_measures.parse_measure(theirs)], abs=1e-9), (split, ours)
        assert set(res["candidates"]) == set(names)


def _check_trec_run(path: Path, depth: int) -> None:
    last = {}
    for line in path.read_text().splitlines():
        qid, q0, pid, rnk, score, tag = line.split()
        assert q0 == "Q0" and tag
        prev_rank, prev_score, seen = last.get(qid, (0, float("inf"), set()))
        assert int(rnk) == prev_rank + 1 <= depth and float(score) <= prev_score and pid not in seen
        seen.add(pid)
        last[qid] = (int(rnk), float(score), seen)


def test_bi_encoder_dense_retrieval_matches_ir_measures(bi_eval):
    out, report = bi_eval
    assert report["model_type"] == "bi-encoder"
    assert report["splits"]["dev"]["mode"] == "dense retrieval"
    _check_against_ir_measures(out, report, depth=1000)


def test_an_evaluation_waits_for_another_of_the_same_model_name(bi_eval, models, tmp_path):
    """Two evaluations of one model name at once (say, at two max_lengths): each would remove the other's embedding
    cache as an earlier model's, so the second waits for the first's lock on the name before it touches the caches."""
    import threading
    root = SAMPLE / paths.PREPARED / "embeddings"
    label = evaluate.model_label("", models["bi"])
    other = root / f"{label}-0123456789abcdef"  # the cache another evaluation of the name is reading
    other.mkdir(parents=True, exist_ok=True)
    done = threading.Event()
    try:
        with paths.file_lock(root / f"{label}.lock"):
            t = threading.Thread(target=lambda: (evaluate.main(_cfg(models["bi"], tmp_path)), done.set()))
            t.start()
            assert not done.wait(3) and other.is_dir()  # waiting, the other's cache untouched
        t.join(300)
        assert done.is_set() and not other.exists()  # then it ran, and removed the cache as an earlier model's
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_rerun_uses_the_embedding_cache(bi_eval, models, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer
    out, _ = bi_eval

    def no_encoding(*a, **kw):
        raise AssertionError("the collection was encoded again")
    monkeypatch.setattr(SentenceTransformer, "encode_document", no_encoding)
    root = SAMPLE / paths.PREPARED / "embeddings"
    label = evaluate.model_label("", models["bi"])  # "bi": the folder above model/
    stale, other = root / f"{label}-0123456789abcdef", root / f"{label}x-0123456789abcdef"
    for d in (stale, other):
        d.mkdir(parents=True, exist_ok=True)
    try:
        evaluate.main(_cfg(models["bi"], tmp_path))
        # the same model name's earlier embeddings (other weights) are removed, another model's are kept
        assert not stale.exists() and other.is_dir() and len(list(root.glob(f"{label}-*"))) == 1
    finally:
        for d in (stale, other):
            shutil.rmtree(d, ignore_errors=True)
    for split in ("dev", "dl2020"):
        assert (tmp_path / f"{split}.run").read_text() == (out / f"{split}.run").read_text()


class _Head:
    """The first rows of the sample collection, as a TextStore-like object."""
    def __init__(self, store, n):
        self.store, self.ids = store, np.asarray(store.ids[:n])

    def __len__(self):
        return len(self.ids)

    def text_at(self, row):
        return self.store.text_at(row)


def test_interrupted_encoding_resumes(models, tmp_path):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(models["bi"]), device="cpu")
    coll = _Head(MSMarco(SAMPLE).collection(), 300)
    real, calls, crash = model.encode_document, [], True

    def crash_on_third_chunk(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3 and crash:
            raise RuntimeError("simulated crash")
        return real(texts, **kw)
    model.encode_document = crash_on_third_chunk
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluation.encode_collection(model, coll, tmp_path / "cache", batch_size=16, chunk=64, progress=False)
    assert json.loads((tmp_path / "cache" / "done.json").read_text()) == {"done_rows": 128}
    calls.clear()
    crash = False
    resumed = evaluation.encode_collection(model, coll, tmp_path / "cache", batch_size=16, chunk=64, progress=False)
    assert calls == [64, 64, 44]  # rows 128-299 only: the chunks not yet done
    model.encode_document = real
    fresh = evaluation.encode_collection(model, coll, tmp_path / "fresh", batch_size=16, chunk=64, progress=False)
    assert resumed.shape == (300, 384) and resumed.dtype == np.float16
    np.testing.assert_array_equal(resumed, fresh)
    # the cached search gives the uncached one's ranking
    q = ["what is a bank", "how long do cats sleep"]
    a = evaluation.dense_retrieval_run(model, q, [1, 2], coll, k=5, batch_size=16, chunk=64, cache_dir=tmp_path / "cache")
    b = evaluation.dense_retrieval_run(model, q, [1, 2], coll, k=5, batch_size=16, chunk=64)
    assert {k: metrics.rank(v) for k, v in a.items()} == {k: metrics.rank(v) for k, v in b.items()}
    # two processes of a multi-GPU run each search a share of the rows; their merged top k is the whole search's
    shares = [evaluation.dense_retrieval_run(model, q, [1, 2], coll, k=5, batch_size=16, chunk=64, rows=r)
              for r in (range(0, 150), range(150, 300))]
    merged = evaluation.merge_top_k(shares, 5)
    assert {k: metrics.rank(v) for k, v in merged.items()} == {k: metrics.rank(v) for k, v in b.items()}
    assert all(merged[k] == pytest.approx(b[k], abs=1e-5) for k in b)
    tiny = evaluation.dense_retrieval_run(model, q, [1, 2], coll, k=5, rows=range(0, 3))  # a share smaller than k
    assert all(len(v) == 3 for v in tiny.values())


def test_a_dl_query_judged_only_at_grade_1_counts_for_ndcg(copy):
    """trec_eval's nDCG@10 averages over every query with a relevant judgment at any grade; MRR@10 and recall of TREC
    DL count grade >= 2. A DL query whose best judgment is 1 (none in DL 2020, so made here) stays in the sets, for
    nDCG, instead of being dropped from all metrics."""
    qrels = copy / "2020qrels-pass.txt"
    lines = qrels.read_text().splitlines()
    qid = lines[0].split()[0]
    qrels.write_text("".join((" ".join(f[:3] + [str(min(int(f[3]), 1))]) if f[0] == qid else ln) + "\n"
                             for ln in lines for f in [ln.split()]))
    data = MSMarco(copy)
    rs = evaluation.load_rerank_set(data, "dl2020", None, 20, str(copy / "runs" / "bm25"))
    assert int(qid) in rs.qids and len(rs.qids) == 54
    assert int(qid) in evaluate.load_benchmark_split(data, "dl2020").qids
    run = evaluation.candidate_order_run(rs)
    per_query = metrics.evaluate_run({qid: run[qid]}, {qid: rs.qrels[qid]}, min_grade=2, recall_ks=())
    assert per_query["nDCG@10"] > 0 and per_query["MRR@10"] == 0.0  # in nDCG's average, not in MRR's


def test_merged_shares_break_a_tie_at_the_cut_as_trec_eval_does():
    """The processes' shares of a search are merged to one top k; equal scores at the k-th place (duplicate passages
    score alike) are decided by docno, descending, as trec_eval orders them, whatever the order of the shares."""
    shares = [{"1": {"5": 1.0, "7": 0.5}}, {"1": {"3": 0.5, "9": 0.5}}]
    for order in (shares, shares[::-1]):
        assert evaluation.merge_top_k(order, 2) == {"1": {"5": 1.0, "9": 0.5}}


def test_retrieval_scores_are_fp32_under_mixed_precision(models, monkeypatch):
    """Passages may be encoded under bf16 autocast, but their similarities are computed in fp32: bf16 keeps about 3
    significant digits, which tied the top ranks (then broken by pid string). amp=False encodes in fp32 too."""
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(models["bi"]), device="cpu")
    coll = _Head(MSMarco(SAMPLE).collection(), 300)
    rs = evaluation.RerankSet("t", [1, 2, 3], ["what is a bank", "how long do cats sleep", "symptoms of flu"],
                              [], [], {"1": {"0": 1}, "2": {"1": 1}, "3": {"2": 1}}, 1)
    monkeypatch.setattr(evaluation, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = []
    real = evaluation.dense_retrieval_run

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(evaluation, "dense_retrieval_run", spy)
    evaluation.RetrievalEvaluator(rs, coll, k=20, batch_size=32).metrics(model)
    for docs in seen[-1].values():  # 20 distinct scores per query: no ties
        assert len(set(docs.values())) == 20
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the scores were before: bf16 similarities
        q = model.encode_query(rs.queries, convert_to_tensor=True)
        p = model.encode_document([coll.text_at(r) for r in range(300)], convert_to_tensor=True)
        bf16 = model.similarity(q, p).topk(20).values
    assert min(len(set(row.tolist())) for row in bf16) < 20
    evaluation.RetrievalEvaluator(rs, coll, k=20, batch_size=32, amp=False).metrics(model)
    fp32 = real(model, rs.queries, rs.qids, coll, 20, 32)  # outside any autocast
    assert all(seen[-1][q] == pytest.approx(fp32[q], abs=1e-6) for q in fp32)


def test_checkpoints_are_chosen_on_fp32_scores_under_mixed_precision(models):
    """The trainer (accelerate) wraps a model's forward in bf16 autocast in place, so the evaluator that picks the
    best checkpoint got logits on bf16's grid, tied (then broken by pid). It scores with the unwrapped forward, and
    leaves the trainer's wrapper in place for the next training step."""
    import torch
    from accelerate import Accelerator
    from sentence_transformers import CrossEncoder
    model = CrossEncoder(str(models["ce"]), device="cpu")
    with torch.no_grad():  # a spread of logits as a trained head gives (4-16), where bf16 steps by 0.03-0.06
        model.model.classifier.weight.mul_(200.0)
    rs = evaluation.load_rerank_set(MSMarco(SAMPLE), "dl2020", 8, 20, str(SAMPLE / "runs" / "bm25"), 0)
    fp32 = evaluation.cross_encoder_run(model, rs)
    scored = []

    def scorer(m, r, batch_size):
        scored.append(evaluation.cross_encoder_run(m, r, batch_size))
        return scored[-1]
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # an earlier test's trainer set it up without mixed precision (one per process)
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
        wrapped = prepared.forward
        assert "_original_forward" in prepared.__dict__  # what the trainer's model carries while it trains
        bf16 = evaluation.cross_encoder_run(prepared, rs)
        assert any(abs(bf16[q][p] - fp32[q][p]) > 1e-3 for q in fp32 for p in fp32[q])  # the wrapper rounds
        evaluation.RerankEvaluator(rs, scorer).metrics(prepared)
        assert all(scored[-1][q][p] == pytest.approx(fp32[q][p], abs=1e-5) for q in fp32 for p in fp32[q])
        assert prepared.forward == wrapped  # training goes on under its autocast
    finally:
        AcceleratorState._reset_state()  # later tests' trainers set up their own


def test_cross_encoder_rerank_matches_ir_measures(models, tmp_path):
    report = evaluate.main(_cfg(models["ce"], tmp_path, depth=20))
    assert report["model_type"] == "cross-encoder"
    _check_against_ir_measures(tmp_path, report, depth=20)
    # The sample's candidate files are in no rank order (as the official ones): what is reranked is BM25's top 20
    # from the bundled run, and the BM25 column is that run's own metrics, not the file order's.
    for split in ("dev", "dl2020"):
        res = report["splits"][split]
        assert res["mode"].startswith("rerank BM25 run") and res["candidates_order"] == "BM25"
        bm25 = {q: docs for q, docs in metrics.read_trec_run(SAMPLE / "runs" / "bm25" / f"{split}.run").items()}
        mine = {}
        for line in (tmp_path / f"{split}.run").read_text().splitlines():
            mine.setdefault(line.split()[0], set()).add(line.split()[2])
        assert mine == {q: set(metrics.rank(bm25[q], 20)) for q in mine}
        top = {q: {p: -float(i) for i, p in enumerate(metrics.rank(bm25[q], 20))} for q in mine}
        qrels = [q for q in ir_measures.read_trec_qrels(str(QRELS[split])) if q.query_id in mine]
        measure = ir_measures.parse_measure("RR@10" if split == "dev" else "nDCG@10")
        first = "MRR@10" if split == "dev" else "nDCG@10"
        expect = ir_measures.calc_aggregate([measure], qrels, top)[measure]
        assert res["candidates"][first] == pytest.approx(expect, abs=1e-9)


def test_dev_tune_and_dev_test_are_the_training_scripts_parts_of_dev(models, tmp_path):
    """--splits=dev-test scores only the dev queries that chose nothing (the scripts' dev-test), dev-tune the others:
    together they are dev, with the same figures per query; both read dev's files and its BM25 run."""
    cfg = evaluate.Config(model=str(models["ce"]), data_dir=str(SAMPLE), batch_size=32, depth=20,
                          splits=("dev", "dev-tune", "dev-test"), output_dir=str(tmp_path))
    report = evaluate.main(cfg)["splits"]
    data = MSMarco(SAMPLE)
    for part in ("tune", "test"):
        split = evaluate.load_benchmark_split(data, f"dev-{part}")
        assert split.qids == evaluation.dev_part(evaluate.load_benchmark_split(data, "dev").qids, part)
        assert report[f"dev-{part}"]["queries"] == len(split.qids) and report[f"dev-{part}"]["candidates_order"] == "BM25"
    assert report["dev-tune"]["queries"] + report["dev-test"]["queries"] == report["dev"]["queries"] == 100
    lines = {s: [ln.split()[:4] for ln in (tmp_path / f"{s}.run").read_text().splitlines()]  # qid Q0 pid rank
             for s in ("dev", "dev-tune", "dev-test")}
    assert sorted(lines["dev-tune"] + lines["dev-test"]) == sorted(lines["dev"])
    n = {s: report[s]["queries"] for s in report}
    mrr = {s: report[s]["model"]["MRR@10"] for s in report}
    assert mrr["dev"] == pytest.approx((mrr["dev-tune"] * n["dev-tune"] + mrr["dev-test"] * n["dev-test"]) / 100,
                                       abs=1e-9)
    # --splits=dev alone reports dev-test beside it, from dev's run: the same figures as scoring dev-test itself
    alone = evaluate.main(evaluate.Config(model=str(models["ce"]), data_dir=str(SAMPLE), batch_size=32, depth=20,
                                          splits=("dev",), output_dir=str(tmp_path / "alone")))["splits"]
    assert list(alone) == ["dev", "dev-test"] and alone["dev-test"]["queries"] == report["dev-test"]["queries"]
    for key in ("model", "candidates"):
        assert alone["dev-test"][key] == pytest.approx(report["dev-test"][key], abs=1e-12), key
    with pytest.raises(SystemExit, match="unknown split.*dev-test"):
        evaluate.main(evaluate.Config(model=str(models["ce"]), splits=("dev-other",), output_dir=str(tmp_path)))


def test_unranked_candidate_files_are_not_cut(tmp_path):
    """Without a ranking, the official candidate file is reranked whole: a --depth below it is a clear error (its
    first N would be an arbitrary subset), not a silent random sample; the BM25 column then takes every candidate."""
    split = evaluate.BenchmarkSplit("dl2020", [1, 2], ["q1", "q2"], {}, 2, (), lambda q: np.arange(100) + q)
    with pytest.raises(SystemExit, match="arbitrary subset.*--depth=100.*runs/bm25/dl2020.run"):
        evaluate._candidate_lists(split, tmp_path, "", 20)
    cands, source, order = evaluate._candidate_lists(split, tmp_path, "", 20, cut=False)
    assert order == "file order" and [len(c) for c in cands.values()] == [100, 100]
    cands, _, order = evaluate._candidate_lists(split, tmp_path, "", 1000)
    assert order == "file order" and cands[2].tolist() == list(range(2, 102))
    (tmp_path / "runs" / "bm25").mkdir(parents=True)
    (tmp_path / "runs" / "bm25" / "dl2020.run").write_text("1 Q0 7 1 3.0 bm25\n1 Q0 5 2 2.0 bm25\n1 Q0 9 3 1.0 bm25\n")
    cands, source, order = evaluate._candidate_lists(split, tmp_path, "", 2)
    assert order == "BM25" and source.startswith("BM25 run") and {q: c.tolist() for q, c in cands.items()} == {1: [7, 5]}


def test_a_run_of_ones_own_needs_no_official_candidate_file(monkeypatch):
    """With a first-stage run the official candidate files (top1000.dev: 687 MB at full scale; the DL top-1000s)
    are neither downloaded nor read, and evaluate.py's splits read them only when their candidates are asked for
    (a bi-encoder retrieves instead)."""
    from msmarco.data import MSMarco

    def unavailable(*a):
        raise AssertionError("the official candidate file was read")
    monkeypatch.setattr(MSMarco, "dev_candidates", unavailable)
    monkeypatch.setattr(MSMarco, "trec_dl_candidates", unavailable)
    data = MSMarco(paths.SAMPLE_DIR)
    for split in ("dev-test", "dl2020"):
        rs = evaluation.load_rerank_set(data, split, 5, 6, "data/sample/runs/bm25")
        assert len(rs.qids) == 5 and rs.ranked and all(len(c) == 6 for c in rs.candidates)
        bench = evaluate.load_benchmark_split(data, split.split("-")[0], 5)
        assert len(bench.qids) == 5 and bench.qrels
    with pytest.raises(AssertionError, match="official candidate file"):
        bench.candidates(bench.qids[0])


def test_cross_encoder_reranks_a_run_folder(models, bi_eval, tmp_path):
    bi_out, _ = bi_eval
    report = evaluate.main(_cfg(models["ce"], tmp_path, depth=10, run_file=str(bi_out)))
    _check_against_ir_measures(tmp_path, report, depth=10)
    for split in ("dev", "dl2020"):  # reranks exactly the bi-encoder's top 10 of each query
        top = {}
        for line in (bi_out / f"{split}.run").read_text().splitlines():
            qid, _, pid, rnk, _, _ = line.split()
            if int(rnk) <= 10:
                top.setdefault(qid, set()).add(pid)
        mine = {}
        for line in (tmp_path / f"{split}.run").read_text().splitlines():
            mine.setdefault(line.split()[0], set()).add(line.split()[2])
        assert mine == top


def test_model_detection_and_errors(models, tmp_path):
    assert evaluate.model_kind(models["bi"]) == "bi-encoder"
    assert evaluate.model_kind(models["ce"]) == "cross-encoder"
    assert evaluate.model_kind(offline_base_model()) == "bi-encoder"  # saved by sentence-transformers 2
    with pytest.raises(SystemExit, match="neither"):
        evaluate.model_kind(models["plain"])
    with pytest.raises(SystemExit, match="--model="):
        evaluate.main(evaluate.Config())
    with pytest.raises(SystemExit, match="unknown split"):
        evaluate.main(evaluate.Config(model=str(models["bi"]), splits=("dl2021",)))
    with pytest.raises(SystemExit, match="run_file"):
        evaluate.main(_cfg(models["bi"], tmp_path, run_file="x.run"))
    assert config.parse_cli(evaluate.Config(), ["--model=m", "--splits=dev,dl2020"]).splits == ("dev", "dl2020")
    # nothing to evaluate, a model path that does not exist, a damaged model folder: clear errors, and the output
    # folder of an earlier evaluation left as it was
    (tmp_path / "metrics.json").write_text("{}")
    for kw, says in [(dict(splits=()), "nothing to evaluate"), (dict(splits=("dl2019",)), "nothing to evaluate")]:
        with pytest.raises(SystemExit, match=says):
            evaluate.main(_cfg(models["ce"], tmp_path, **kw))
    assert (tmp_path / "metrics.json").read_text() == "{}" and not (tmp_path / "config.json").exists()
    with pytest.raises(SystemExit, match="model folder output/nope/model does not exist"):
        evaluate.main(evaluate.Config(model="output/nope/model"))
    with pytest.raises(SystemExit, match="model folder output/nope does not exist"):  # not a hub name: output/ is here
        evaluate.main(evaluate.Config(model="output/nope"))
    broken = tmp_path / "broken"
    shutil.copytree(models["ce"], broken)
    (broken / "config_sentence_transformers.json").write_text("{bad")
    with pytest.raises(SystemExit, match="is not valid JSON .* save the model again"):
        evaluate.model_kind(broken)


def test_readme_snippet_runs(models, capsys):
    readme = (paths.REPO / "README.md").read_text()
    section = readme.split("## Use a trained model in your code", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code, n = re.subn(r'^bi_encoder_path = ".*"$', f'bi_encoder_path = "{models["bi"]}"', code, flags=re.M)
    code, m = re.subn(r'^cross_encoder_path = ".*"$', f'cross_encoder_path = "{models["ce"]}"', code, flags=re.M)
    assert n == m == 1
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [float(ln.split(None, 1)[0]) for ln in lines]
    texts = [ln.split(None, 1)[1] for ln in lines]
    # the bi-encoder's 3 nearest passages, reranked by the cross-encoder: best score first
    assert len(lines) == 3 and scores == sorted(scores, reverse=True)
    assert set(texts) == {scope["passages"][i] for i in scope["top"]}


def test_a_bi_encoder_downloads_no_candidate_file_for_its_bm25_column(models, copy, tmp_path, monkeypatch, capsys):
    """A bi-encoder retrieves: its table shows BM25 beside it only where a BM25 run or the candidate file is already
    in the data folder. At full scale that column would download top1000.dev (687 MB) after the whole collection
    was encoded, and a failed download there lost metrics.json."""
    from msmarco.data import MSMarco

    def unavailable(*a):
        raise AssertionError("the official candidate file was read")
    monkeypatch.setattr(MSMarco, "dev_candidates", unavailable)
    shutil.rmtree(copy / "runs")
    (copy / "top1000.dev.tar.gz").unlink()
    assert not evaluate._reference_at_hand(copy, "dev") and evaluate._reference_at_hand(copy, "dl2020")
    dummy = {"dev": {"mode": "retrieve", "queries": 3, "run": "dev.run", "model": {"MRR@10": 0.5}},
             "dev-test": {"mode": "retrieve", "queries": 2, "run": "dev.run", "model": {"MRR@10": 0.4}}}
    monkeypatch.setattr(evaluate, "_bi_encoder_splits", lambda *a, **k: dummy)  # the retrieval is tested above
    (tmp_path / "metrics.json").write_text("{}")  # an earlier evaluation's: removed when this one starts
    report = evaluate.main(evaluate.Config(model=str(models["bi"]), data_dir=str(copy), splits=("dev",),
                                           max_queries=3, output_dir=str(tmp_path)))
    assert "candidates" not in report["splits"]["dev"] and "candidates" not in report["splits"]["dev-test"]
    assert "skipped" not in capsys.readouterr().out  # dev is evaluated: a bi-encoder needs no candidate file
    assert json.loads((tmp_path / "metrics.json").read_text())["splits"]["dev"]["model"] == {"MRR@10": 0.5}


def test_a_half_precision_cross_encoder_keeps_fp32_logits(models):
    """--half (the default on a GPU) halves the encoder but keeps the one-logit head in fp32: fp16 logits step by
    0.008-0.016 at a MiniLM cross-encoder's 2-19 and tie close candidates. Here on the CPU, which runs fp16 too."""
    import torch
    from sentence_transformers import CrossEncoder
    pairs = [("what is a cross-encoder", f"passage number {i} about encoders and ranking") for i in range(8)]
    full = CrossEncoder(str(models["ce"]), device="cpu").predict(pairs, convert_to_numpy=True)
    half = CrossEncoder(str(models["ce"]), device="cpu")
    half.half()
    evaluate.keep_head_fp32(half)
    seen = []
    head = [m for m in half.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    got = half.predict(pairs, convert_to_numpy=True)
    assert seen and set(seen) == {torch.float32} and head.weight.dtype == torch.float32
    assert np.allclose(got, full, atol=0.05)


def test_a_hub_model_is_labelled_by_its_name_not_its_revision(tmp_path):
    snap = tmp_path / "models--cross-encoder--ms-marco-MiniLM-L6-v2" / "snapshots" / ("c5ee24" + "0" * 34)
    assert evaluate.model_label("cross-encoder/ms-marco-MiniLM-L6-v2", snap) == "ms-marco-MiniLM-L6-v2"
    assert evaluate.model_label("output/train_cross-encoder-v1/model",
                                Path("output/train_cross-encoder-v1/model")) == "train_cross-encoder-v1"
    # one embedding cache per hub model, whatever its revision, and none shared between two hub models
    other = tmp_path / "models--sentence-transformers--msmarco-MiniLM-L6-cos-v5" / "snapshots" / ("ab" * 20)
    again = snap.parent / ("d" * 40)
    assert evaluate.cache_label(snap) == evaluate.cache_label(again) == "cross-encoder--ms-marco-MiniLM-L6-v2"
    assert evaluate.cache_label(other) == "sentence-transformers--msmarco-MiniLM-L6-cos-v5"


def test_a_split_without_candidates_stops_the_command_before_any_scoring(models, tmp_path, monkeypatch):
    """A --run_file that ranks only dev, with the default splits: the error comes before dev is reranked (at full
    size hours of work), and no metrics are written."""
    def scored(*a, **kw):
        raise AssertionError("a split was scored before every split's candidates were found")
    monkeypatch.setattr(evaluate, "_cross_encoder_ranked", scored)
    with pytest.raises(SystemExit, match="ranks none of the .* judged queries of split dl2020"):
        evaluate.main(_cfg(models["ce"], tmp_path, depth=20, run_file=str(SAMPLE / "runs" / "bm25" / "dev.run")))
    assert not (tmp_path / "metrics.json").exists()


def test_a_two_label_head_ranks_by_relevant_over_not_relevant(models):
    """monoBERT-style rerankers (two labels, 1 = relevant) rank by logit 1 - logit 0, not by "not relevant"; a
    head of three labels is no reranker."""
    import torch
    from sentence_transformers import CrossEncoder
    assert evaluation.relevance_scores([[0.1, 2.0], [1.0, -1.0]], 2).tolist() == pytest.approx([1.9, -2.0])
    assert evaluation.relevance_scores([[0.5], [-0.5]], 2).tolist() == [0.5, -0.5]
    with pytest.raises(ModelError, match="3 output labels"):
        evaluation.relevance_scores(np.zeros((2, 3)), 2)
    torch.manual_seed(0)
    two = CrossEncoder(offline_base_model(), num_labels=2, device="cpu", max_length=32)
    _one_layer(two.model.base_model)
    rs = evaluation.load_rerank_set(MSMarco(SAMPLE), "dev", 3, 5)
    run = evaluation.cross_encoder_run(two, rs)
    pairs = [(q, p) for q, ps in zip(rs.queries, rs.passages) for p in ps]
    logits = two.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    assert [s for q in run.values() for s in q.values()] == pytest.approx((logits[:, 1] - logits[:, 0]).tolist(),
                                                                          abs=1e-5)


class _NanModel:
    """A bi-encoder whose half-precision forward overflowed on some passages (NaN rows), as T5-based models do."""
    def __init__(self, bad_rows):
        self.bad_rows, self.seen = set(bad_rows), 0

    def get_embedding_dimension(self):
        return 4

    def encode_document(self, texts, **kw):
        emb = np.ones((len(texts), 4), np.float32)
        for i in range(len(texts)):
            if self.seen + i in self.bad_rows:
                emb[i] = np.nan
        self.seen += len(texts)
        return emb


def test_non_finite_embeddings_or_scores_stop_with_what_to_do(tmp_path):
    """NaN would rank first in torch.topk and give metrics with no sign of it: a ModelError names --half=false, and
    the embedding cache keeps only the finite chunks before it."""
    coll = _Head(MSMarco(SAMPLE).collection(), 300)
    with pytest.raises(ModelError, match=r"1 of 64 passage embeddings are not finite.*--half=false"):
        evaluation.encode_collection(_NanModel({150}), coll, tmp_path / "cache", chunk=64, progress=False)
    assert json.loads((tmp_path / "cache" / "done.json").read_text()) == {"done_rows": 128}
    with pytest.raises(ModelError, match="cross-encoder scores are not finite"):
        evaluation.relevance_scores([[0.5], [np.nan]], 2)
    assert ModelError in errors.USER_ERRORS  # a script ends on it with the message and exit code 1


class _SlowModel(_NanModel):
    """Finite embeddings, slowly: a second encoding that does not wait for the first would overlap it."""

    def encode_document(self, texts, **kw):
        time.sleep(0.05)
        return super().encode_document(texts, **kw) * (1 + np.arange(len(texts), dtype=np.float32)[:, None])


def test_two_evaluations_of_one_model_encode_its_collection_once(tmp_path):
    """Two evaluations at once (two terminals, two splits) share the embedding cache: the second waits for the
    first's lock and reuses what it wrote instead of starting the file over under it."""
    coll = _Head(MSMarco(SAMPLE).collection(), 300)
    models = [_SlowModel(()), _SlowModel(())]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # flock excludes two open()s of a process, as two processes
        out = list(pool.map(lambda m: np.array(evaluation.encode_collection(m, coll, tmp_path / "cache", chunk=64,
                                                                            progress=False)), models))
    assert sorted(m.seen for m in models) == [0, 300]
    np.testing.assert_array_equal(out[0], out[1])
    assert json.loads((tmp_path / "cache" / "done.json").read_text()) == {"done_rows": 300}


def test_bi_encoder_runs_rank_the_most_similar_passages_first(models, tmp_path):
    """Reranking and dense retrieval (uncached and through the fp16 cache) score by the model's own similarity and
    keep the largest: the same scores, and the same top 5, as a plain similarity matrix over the passages."""
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(models["bi"]), device="cpu")
    coll = _Head(MSMarco(SAMPLE).collection(), 300)
    texts = [coll.text_at(r) for r in range(len(coll))]
    row_of = {int(pid): r for r, pid in enumerate(coll.ids)}
    q = ["what is a bank", "how long do cats sleep"]
    sims = model.similarity(model.encode_query(q), model.encode_document(texts)).numpy()

    def by_row(run):  # {query index: {collection row: score}}
        return {int(qid) - 1: {row_of[int(pid)]: score for pid, score in hits.items()} for qid, hits in run.items()}
    for cache in (None, tmp_path / "cache"):
        run = by_row(evaluation.dense_retrieval_run(model, q, [1, 2], coll, k=5, batch_size=16, chunk=64,
                                                    cache_dir=cache))
        for i, s in enumerate(sims):
            assert set(run[i]) == set(np.argsort(-s)[:5].tolist()), cache
            assert [run[i][r] for r in sorted(run[i])] == pytest.approx([float(s[r]) for r in sorted(run[i])], abs=2e-3)
    spans = [(0, 7), (7, 10)]
    rs = evaluation.RerankSet(name="t", qids=[1, 2], queries=q, candidates=[coll.ids[lo:hi] for lo, hi in spans],
                              passages=[texts[lo:hi] for lo, hi in spans], qrels={}, min_grade=1)
    run = by_row(evaluation.bi_encoder_run(model, rs))
    for i, (lo, hi) in enumerate(spans):
        assert [run[i][r] for r in range(lo, hi)] == pytest.approx(sims[i, lo:hi].tolist(), abs=1e-5)


def test_the_sample_preset_encodes_the_collection_in_checkpointed_chunks():
    """--sample: the bar moves and a cut run keeps what it encoded (one 100,000-passage chunk did neither)."""
    cfg = config.script_config(evaluate.Config(), evaluate.SAMPLE, ["--sample", "--model=offline:all-MiniLM-L6-v2"])
    assert cfg.encode_chunk * 10 <= len(MSMarco(SAMPLE).collection())
