"""Token-id batches (msmarco/tokens.py, msmarco/batching.py): the same model inputs as the stock tokenization, cut
into length chunks that hold real tokens, and the stock losses' values when fed through on_token_batches."""
import numpy as np
import pytest
import torch

from msmarco import batching
from msmarco.batching import BatchShape, PairBatches, TextBatches, on_token_batches, plan_chunks
from msmarco.data import MSMarco, TeacherSamples, id_dataset
from msmarco.models import cross_encoder, offline_base_model
from msmarco.sampling import LengthGroupedBatchSampler
from msmarco.tokens import Layout
from conftest import SAMPLE
from test_scripts import load


@pytest.fixture(scope="module")
def data():
    return MSMarco(SAMPLE)


@pytest.fixture(scope="module")
def ce():
    torch.manual_seed(0)
    return cross_encoder("offline:all-MiniLM-L6-v2", 128, "mean")


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(offline_base_model())


def unchunk(features: dict, key: str = "input_ids") -> list[list[int]]:
    """Each row's unpadded values, in row order, from chunked inputs."""
    rows = []
    for ids, mask in zip(features[key], features["attention_mask"]):
        rows += [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    return [rows[i] for i in features["order"].tolist()]


def stock_rows(enc: dict, key: str = "input_ids") -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(enc[key], enc["attention_mask"])]


def test_token_store_is_the_tokenizers_output(data, ce):
    coll = data.collection()
    store = data.tokens("collection", ce.tokenizer)
    assert len(store) == len(coll) and store.ids.dtype == np.uint16
    rows = np.random.default_rng(0).choice(len(coll), 300, replace=False)
    texts = [coll.text_at(int(r)) for r in rows]
    expected = ce.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [store.row_ids(int(r)).tolist() for r in rows] == expected
    queries = data.queries("train")
    qstore = data.tokens("queries.train", ce.tokenizer)
    assert [qstore.row_ids(i).tolist() for i in range(len(queries))] == \
        ce.tokenizer([queries.text_at(i) for i in range(len(queries))], add_special_tokens=False)["input_ids"]
    assert data.tokens("collection", ce.tokenizer) is store  # opened once


def test_another_tokenizer_gets_its_own_token_store(copy, ce):
    """The store is keyed by the tokenizer's behaviour: a cased variant of the same vocabulary (as another recipe's
    base model would bring) builds its own ids instead of reading the uncased ones."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer.from_str(ce.tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    cased = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]")
    data = MSMarco(copy)
    queries = data.queries("train")
    texts = [queries.text_at(i) for i in range(len(queries))]
    uncased_store, cased_store = data.tokens("queries.train", ce.tokenizer), data.tokens("queries.train", cased)
    assert uncased_store.folder != cased_store.folder
    for store, tok in ((uncased_store, ce.tokenizer), (cased_store, cased)):
        assert [store.row_ids(i).tolist() for i in range(len(queries))] == \
            tok(texts, add_special_tokens=False)["input_ids"]
    assert cased(texts, add_special_tokens=False)["input_ids"] != ce.tokenizer(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_length", [24, 48, 128, 512])
def test_pairs_are_the_stock_tokenization(data, ce, max_length):
    """Token-id pairs equal CrossEncoder.preprocess of the texts (ids, token types), truncation included."""
    t = np.asarray(data.triples())
    idx = np.random.default_rng(max_length).choice(len(t), 64, replace=False)
    cols = {"qid": t[idx, 0], "pid": t[idx, 2], "label": np.zeros(64, np.float32)}
    pb = PairBatches(data, ce.tokenizer, BatchShape(max_length, 8, chunk_cost=64))
    out = pb([{k: v[i] for k, v in cols.items()} for i in range(64)])["pairs"]
    q, c = data.queries("train"), data.collection()
    old = ce.max_seq_length
    ce.max_seq_length = max_length
    try:
        enc = ce.preprocess([(q[int(a)], c[int(b)]) for a, b in zip(cols["qid"], cols["pid"])])
    finally:
        ce.max_seq_length = old
    assert unchunk(out) == stock_rows(enc)
    assert unchunk(out, "token_type_ids") == stock_rows(enc, "token_type_ids")
    assert all(x.shape[1] % 8 == 0 for x in out["input_ids"])
    assert out["real_tokens"] == int(enc["attention_mask"].sum())


def test_pair_truncation_is_the_tokenizers_for_every_length_pair(ce):
    """Layout.pair_lengths against the tokenizer's own "longest_first" truncation, over a grid of lengths."""
    layout = Layout.of(ce.tokenizer)
    for max_length in (9, 16, 33):
        for nq in range(1, 30, 3):  # an empty text is not a pair to the tokenizer: lengths from 1
            for npas in range(1, 40, 4):
                enc = ce.tokenizer(" ".join(["a"] * nq), " ".join(["b"] * npas), truncation="longest_first",
                                   max_length=max_length)["input_ids"]
                kq, kp = layout.pair_lengths(np.array([nq]), np.array([npas]), max_length)
                assert (enc.count(1037), enc.count(1038)) == (int(kq[0]), int(kp[0])), (max_length, nq, npas)


def test_layout_of_another_template():
    """A RoBERTa-like pair template (<s> q </s></s> p </s>, no token types) is read off the tokenizer too."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    bert = AutoTokenizer.from_pretrained(offline_base_model())
    backend = Tokenizer.from_str(bert.backend_tokenizer.to_str())
    cls, sep = bert.cls_token_id, bert.sep_token_id
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] [SEP] $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", model_input_names=["input_ids",
                                                                                                   "attention_mask"])
    layout = Layout.of(tok)
    assert layout.pair == ((cls,), (sep, sep), (sep,)) and layout.single == ((cls,), (sep,))
    assert not layout.token_types and layout.pair_types == (0, 0, 0, 0, 0)
    kq, kp = layout.pair_lengths(np.array([30]), np.array([50]), 20)
    assert kq[0] + kp[0] == 16  # 20 - 4 special tokens


def test_text_batches_are_the_stock_tokenization(data, st):
    t = np.asarray(data.triples())[:48]
    feats = [{"qid": int(q), "pos": int(p), "neg": int(n)} for q, p, n in t]
    st.max_seq_length = 40
    tb = TextBatches(data, st.tokenizer, BatchShape(40, 8, chunk_cost=32))
    out = tb(feats)
    q, c = data.queries("train"), data.collection()
    for name, texts in (("query", [q[f["qid"]] for f in feats]),
                        ("passages", [c[f["pos"]] for f in feats] + [c[f["neg"]] for f in feats])):
        chunked = {k[len(name) + 1:]: v for k, v in out.items() if k.startswith(name + "_")}
        assert unchunk(chunked) == stock_rows(st.preprocess(texts)), name
    plain = TextBatches(data, st.tokenizer, BatchShape(40, 8), chunked=False)(feats)
    assert set(k.split("_")[0] for k in plain) == {"query", "positive", "negative"}
    assert stock_rows({"input_ids": plain["negative_input_ids"], "attention_mask": plain["negative_attention_mask"]}) \
        == stock_rows(st.preprocess([c[f["neg"]] for f in feats]))


def test_losses_on_token_batches_equal_the_stock_losses(data, ce, st):
    """The stock loss computed from texts (its own tokenization) and from token batches gives the same value."""
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, MarginMSELoss, MSELoss
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    q, c = data.queries("train"), data.collection()
    t = np.asarray(data.triples())[::97][:24]
    ce.eval(), st.eval()  # no dropout: both paths see the same network
    with torch.no_grad():
        labels = torch.tensor(np.arange(24) % 2, dtype=torch.float32)
        feats = [{"qid": int(a), "pid": int(b), "label": float(lab)} for (a, b, _), lab in zip(t, labels)]
        batch = PairBatches(data, ce.tokenizer, BatchShape(128, 8, chunk_cost=16))(feats)
        texts = [[q[int(a)] for a, _, _ in t], [c[int(b)] for _, b, _ in t]]
        for stock in (BinaryCrossEntropyLoss(ce), MSELoss(ce)):
            assert on_token_batches(stock)([batch["pairs"]], batch["label"]).item() == \
                pytest.approx(stock(texts, labels).item(), rel=1e-5)
        teacher = data.teacher_scores()
        rows = np.arange(0, 40, 3)
        qids, pids, margins = TeacherSamples(data, margin=True)({"row": rows})
        batch = PairBatches(data, ce.tokenizer, BatchShape(128, 8, chunk_cost=16),
                            resolve=TeacherSamples(data, margin=True))([{"row": int(r)} for r in rows])
        margin = MarginMSELoss(ce)
        stock = margin([[q[int(x)] for x in qids], [c[int(x)] for x in pids[:, 0]], [c[int(x)] for x in pids[:, 1]]],
                       torch.tensor(margins))
        assert on_token_batches(margin)([batch["pairs"]], batch["label"]).item() == pytest.approx(stock.item(), rel=1e-5)
        assert len(teacher) > 40
        st.max_seq_length = 64
        mnrl = MultipleNegativesRankingLoss(st)
        feats = [{"qid": int(a), "pos": int(b), "neg": int(n)} for a, b, n in t]
        out = TextBatches(data, st.tokenizer, BatchShape(64, 8, chunk_cost=16))(feats)
        cols = [{k[len(n) + 1:]: v for k, v in out.items() if k.startswith(n + "_")} for n in ("query", "passages")]
        stock_feats = [st.preprocess(x) for x in ([q[int(a)] for a, _, _ in t], [c[int(b)] for _, b, _ in t],
                                                  [c[int(n)] for _, _, n in t])]
        assert on_token_batches(mnrl)(cols, None).item() == pytest.approx(mnrl(stock_feats, None).item(), rel=1e-5)


def test_plan_chunks_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = np.sort(rng.integers(5, 300, rng.integers(1, 40)))
        cost, step, multiple = float(rng.integers(0, 2000)), int(rng.integers(1, 9)), 8

        def total(chunks):
            return sum((b - a) * batching.padded(lengths[b - 1], multiple) + cost for a, b in chunks)
        best = plan_chunks(lengths, cost, multiple, step)
        assert best[0][0] == 0 and best[-1][1] == len(lengths) and all(x[1] == y[0] for x, y in zip(best, best[1:]))
        cuts = list(range(0, len(lengths), step))[1:]
        for mask in range(1 << min(len(cuts), 10)):  # every choice of boundaries (up to 2^10)
            chosen = [0] + [cu for i, cu in enumerate(cuts) if mask >> i & 1] + [len(lengths)]
            assert total(best) <= total(list(zip(chosen, chosen[1:]))) + 1e-6
    assert plan_chunks(np.array([10, 20, 300]), 1e9, 8, 1) == [(0, 3)]
    assert plan_chunks(np.arange(1, 17) * 8, 0, 8, 1) == [(i, i + 1) for i in range(16)]


@pytest.mark.parametrize("recipe, max_length, batch_size", [
    ("v1", 64, 16), ("v1", 512, 32), ("bi", 96, 32), ("bi", 300, 64)])  # sample presets and full defaults
def test_padding_holds_real_tokens(data, ce, st, recipe, max_length, batch_size):
    """Padded tokens per real token over a pass of the sample's training rows, with the scripts' samplers and the CPU
    chunk cost: at most 1.10 (the stock collator: 1.45-2.26)."""
    if recipe == "v1":
        t = np.asarray(data.triples())
        rows = {"qid": t[:, 0], "pid": np.where(np.arange(len(t)) % 5 == 0, t[:, 1], t[:, 2]),
                "label": np.zeros(len(t), np.float32)}
        collate = PairBatches(data, ce.tokenizer, batching.batch_shape(max_length))
        sampler = LengthGroupedBatchSampler(id_dataset(rows, "t"), batch_size=batch_size, drop_last=False, seed=0,
                                            lengths=collate.row_lengths)
        batches = [collate([{k: v[i] for k, v in rows.items()} for i in b]) for b in sampler]
        inputs = [b["pairs"] for b in batches]
    else:
        bi = load("train_bi-encoder-v2")
        cfg = bi.Config(data_dir=str(SAMPLE))
        pos, neg = bi.training_queries(data, cfg)
        rows = bi.rotation(pos, neg, 1, 0)
        collate = TextBatches(data, st.tokenizer, batching.batch_shape(max_length))
        order = np.random.default_rng(0).permutation(len(rows))
        inputs = []
        for i in range(0, len(rows), batch_size):
            out = collate([{"qid": rows[j, 1], "pos": rows[j, 2], "neg": rows[j, 3]} for j in order[i:i + batch_size]])
            inputs += [{k[len(n) + 1:]: v for k, v in out.items() if k.startswith(n + "_")} for n in ("query", "passages")]
    padded = sum(int(x.numel()) for f in inputs for x in f["input_ids"])
    real = sum(f["real_tokens"] for f in inputs)
    assert 1.0 <= padded / real <= 1.10, padded / real
