"""The bi-encoder recipe's data logic: the cross-encoder margin filter and the per-epoch negative rotation."""
import json

import numpy as np
import pytest
import torch

from msmarco import config, data, paths, stores
from msmarco.data import MSMarco
from msmarco.hard_negatives import filter_negatives
from test_scripts import load, tiny_config

bi = load("train_bi-encoder-v2")
nan = float("nan")


def kept(pos_scores, neg_scores, margin=3.0, per_system=5, systems=(), pos=(1, 2)):
    negs = {name: np.arange(100 + 10 * i, 100 + 10 * i + len(s)) for i, (name, s) in enumerate(neg_scores.items())}
    return filter_negatives(np.array(pos), negs, np.array(pos_scores, dtype=np.float32),
                               {k: np.array(v, dtype=np.float32) for k, v in neg_scores.items()},
                               margin, per_system, systems)


def test_margin_is_measured_from_the_lowest_positive():
    # positives 9 and 6: threshold 6 - 3 = 3; a negative scored exactly at the threshold is kept
    assert kept([9.0, 6.0], {"bm25": [3.0, 3.01, 2.0, 8.0]}) == [100, 102]


def test_equal_scores_of_positive_and_negative_are_dropped():
    assert kept([5.0], {"bm25": [5.0, 5.0]}, margin=3.0) == []
    assert kept([5.0], {"bm25": [5.0]}, margin=0.0) == [100]  # margin 0: equal counts as "at most"


def test_missing_scores():
    # an unscored negative is dropped: it could be an unlabelled positive
    assert kept([9.0, 9.0], {"bm25": [nan, 1.0]}) == [101]
    # an unscored positive is ignored; with no scored positive nothing can be vouched for
    assert kept([nan, 9.0], {"bm25": [5.0, 7.0]}) == [100]
    assert kept([nan, nan], {"bm25": [-10.0]}) == []


def test_no_negative_left():
    assert kept([1.0], {"bm25": [0.0, 0.5], "tasb": [-1.0]}, margin=3.0) == []


def test_per_system_cap_rank_order_repeats_and_system_choice():
    scores = {"bm25": [0.0] * 8, "tasb": [0.0] * 3}
    assert kept([9.0], scores, per_system=2) == [100, 101, 110, 111]
    assert kept([9.0], scores, per_system=2, systems=("tasb",)) == [110, 111]
    # a negative that is also a positive, or already taken from another system, is not repeated
    negs = {"bm25": np.array([1, 7, 8]), "tasb": np.array([8, 9])}
    z = {"bm25": np.zeros(3, np.float32), "tasb": np.zeros(2, np.float32)}
    assert filter_negatives(np.array([1]), negs, np.array([9.0], np.float32), z, 3.0, 5) == [7, 8, 9]


def test_filter_on_the_sample_matches_a_plain_dict_reading(tmp_path):
    """The filter over the memory-mapped stores equals the classic script's dict-of-dicts logic on the sample."""
    import gzip
    import json
    import pickle
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path)
    positives, negatives = bi.training_queries(MSMarco(cfg.data_dir), cfg)
    ce = pickle.load(gzip.open(paths.SAMPLE_DIR / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"))
    expected = {}
    for line in gzip.open(paths.SAMPLE_DIR / "msmarco-hard-negatives.jsonl.gz", "rt"):
        rec = json.loads(line)
        threshold = min(ce[rec["qid"]][p] for p in rec["pos"]) - cfg.ce_margin
        negs = []
        for system, pids in rec["neg"].items():
            added = 0
            for pid in pids:
                if ce[rec["qid"]][pid] > threshold or pid in negs or pid in rec["pos"]:
                    continue
                negs.append(pid)
                added += 1
                if added >= cfg.negs_per_system:
                    break
        if negs:
            expected[rec["qid"]] = (sorted(rec["pos"]), sorted(negs))
    got = {q: (sorted(p.tolist()), sorted(negatives[q].tolist())) for q, p in positives.items()}
    assert got == expected and len(got) > 100
    assert np.array_equal(positives.qids, negatives.qids)


def test_filtered_negatives_are_built_once_per_setting(tmp_path):
    """The filter's result is a store: a second call opens it, and a new margin gets its own."""
    import json
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path, "--ce_margin=3.0")  # the full recipe's margin
    data = MSMarco(cfg.data_dir)
    first = bi.training_queries(data, cfg)[1]
    folder, = (p for p in (data.dir / paths.PREPARED).glob("bi-encoder-negatives-*") if p.is_dir()
               and json.loads((p / "meta.json").read_text())["setting"] == dict(ce_margin=3.0, negs_per_system=5,
                                                                                systems=[]))
    mtime = (folder / "meta.json").stat().st_mtime_ns
    again = bi.training_queries(data, cfg)[1]
    assert (folder / "meta.json").stat().st_mtime_ns == mtime  # opened, not rebuilt
    np.testing.assert_array_equal(first.values, again.values)
    looser = bi.training_queries(data, config.parse_cli(cfg, ["--ce_margin=0.5"]))[1]
    assert len(looser.values) > len(first.values)
    assert len({p.name for p in (data.dir / paths.PREPARED).glob("bi-encoder-negatives-*") if p.is_dir()}) >= 2


def grouped(groups: dict[int, list[int]]) -> stores.Grouped:
    qids = sorted(groups)
    ptr = np.cumsum([0] + [len(groups[q]) for q in qids])
    return stores.Grouped.from_arrays(np.array(qids), ptr, np.concatenate([groups[q] for q in qids]))


def test_rotation_gives_each_epoch_the_next_positive_and_negative():
    pos, neg = grouped({10: [1, 2], 20: [3]}), grouped({10: [5, 6, 7], 20: [8, 9]})
    rows = bi.rotation(pos, neg, epochs=4, seed=0)
    assert rows[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for q in (10, 20):
        ps, ns = pos[q].tolist(), neg[q].tolist()
        mine = rows[rows[:, 1] == q]
        i0 = ps.index(mine[0, 2])
        assert mine[:, 2].tolist() == [ps[(i0 + e) % len(ps)] for e in range(4)]
        j0 = ns.index(mine[0, 3])
        assert mine[:, 3].tolist() == [ns[(j0 + e) % len(ns)] for e in range(4)]
    np.testing.assert_array_equal(rows, bi.rotation(pos, neg, epochs=4, seed=0))  # same seed, same rows
    assert not np.array_equal(rows, bi.rotation(pos, neg, epochs=4, seed=1))


def test_shuffle_within_groups_keeps_each_group():
    ptr, values = np.array([0, 3, 3, 8]), np.arange(8)
    out = data.shuffle_within_groups(ptr, values, np.random.default_rng(0))
    assert [sorted(out[a:b].tolist()) for a, b in zip(ptr[:-1], ptr[1:])] == [[0, 1, 2], [], [3, 4, 5, 6, 7]]
    assert out.tolist() != values.tolist()


def test_resumed_sampler_replays_the_same_batches(tmp_path):
    """HF Trainer resumes an epoch by re-creating the batch sampler and skipping the batches already done:
    the same seed and epoch must give the same batches, drawn from that epoch's rows only."""
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path)
    data = MSMarco(cfg.data_dir)
    positives, negatives = bi.training_queries(data, cfg)
    n = len(positives)
    ds = bi.training_triplets(bi.rotation(positives, negatives, 3, cfg.seed))

    def batches(epoch):
        sampler = bi.EpochBlockSampler(ds, batch_size=16, drop_last=False, seed=cfg.seed, rows_per_epoch=n,
                                       generator=torch.Generator().manual_seed(cfg.seed))  # as the trainer builds it
        sampler.set_epoch(epoch)
        return list(sampler)

    first = batches(1)
    assert first == batches(1) and first != batches(2)
    flat = [i for b in first for i in b]
    assert sorted(flat) == list(range(n, 2 * n))  # exactly epoch 1's rows, each once
    for b in first:  # no text twice in a batch: no query or passage id twice
        ids = [t for i in b for t in ds[i].values()]
        assert len(ids) == len(set(ids))


def test_every_epoch_has_as_many_batches_as_the_sampler_says(tmp_path):
    """The Trainer counts an epoch's steps once, from len(sampler): an epoch that yields fewer (rows that clash near
    its end used to end it early) leaves max_steps, and with it the final evaluation and save, unreached. Every batch
    size, every epoch: exactly len() batches, no query or passage twice in a batch, full batches under drop_last (as
    under DDP), and each row of the epoch trained on."""
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path)
    positives, negatives = bi.training_queries(MSMarco(cfg.data_dir), cfg)
    n = len(positives)
    ds = bi.training_triplets(bi.rotation(positives, negatives, 4, cfg.seed))
    ids = {c: ds.data.table.column(c).to_numpy() for c in ("qid", "pos", "neg")}
    for batch_size in range(2, n):  # (at n, one epoch in one batch, two clashing rows cannot both be in it)
        for drop_last in (False, True):
            sampler = bi.EpochBlockSampler(ds, batch_size=batch_size, drop_last=drop_last, seed=cfg.seed,
                                           rows_per_epoch=n)
            for epoch in range(4):
                sampler.set_epoch(epoch)
                batches = list(sampler)
                assert len(batches) == len(sampler), (batch_size, drop_last, epoch)
                for b in batches:
                    texts = [-1 - ids["qid"][i] for i in b] + [ids[c][i] for c in ("pos", "neg") for i in b]
                    assert len(texts) == len(set(texts)) and all(epoch * n <= i < (epoch + 1) * n for i in b)
                assert not drop_last or all(len(b) == batch_size for b in batches)
                rows = {i for b in batches for i in b}
                assert len(rows) >= (n // batch_size * batch_size if drop_last else n) - batch_size // 8


def test_bm25_triples_source_groups_the_triples_by_query(tmp_path):
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path, "--negatives=triples", "--max_triples=500")
    data = MSMarco(cfg.data_dir)
    positives, negatives = bi.training_queries(data, cfg)
    expected: dict[int, tuple[set, set]] = {}
    for q, p, n in np.asarray(data.triples(500, seed=cfg.seed)).tolist():
        expected.setdefault(q, (set(), set()))[0].add(p)
        expected[q][1].add(n)
    assert {q: (set(p.tolist()), set(negatives[q].tolist())) for q, p in positives.items()} == expected
    with pytest.raises(SystemExit, match="--negatives must be hard or triples"):
        bi.training_queries(data, config.parse_cli(cfg, ["--negatives=bm25"]))
    with pytest.raises(SystemExit, match="--systems=bm25 picks mining systems.*triples"):  # not silently ignored
        bi.training_queries(data, config.parse_cli(cfg, ["--systems=bm25"]))


def test_two_processes_split_each_epoch_between_them(tmp_path):
    """Under torchrun, accelerate hands process r every world-th batch of the one seeded sampler (BatchSamplerShard)
    and the Trainer sets the epoch on that sampler: together the processes see exactly the epoch's rows, and each
    process's batches are the same on every run. The processes' batches of one step are each other's in-batch
    negatives (gather_across_devices): no query or passage twice in a step, across the processes too."""
    from accelerate.data_loader import BatchSamplerShard
    _, cfg = tiny_config("train_bi-encoder-v2", tmp_path)
    data = MSMarco(cfg.data_dir)
    positives, negatives = bi.training_queries(data, cfg)
    n = len(positives)
    ds = bi.training_triplets(bi.rotation(positives, negatives, 2, cfg.seed))

    def shard(rank, epoch):
        sampler = bi.EpochBlockSampler(ds, batch_size=8, drop_last=True, seed=cfg.seed, rows_per_epoch=n,
                                       generator=torch.Generator().manual_seed(cfg.seed), world=2)
        sampler.set_epoch(epoch)  # what the Trainer does through the shard wrapper, every epoch
        return list(BatchSamplerShard(sampler, num_processes=2, process_index=rank))

    ids = {c: ds.data.table.column(c).to_numpy() for c in ("qid", "pos", "neg")}
    for epoch in (0, 1):
        a, b = shard(0, epoch), shard(1, epoch)
        assert a == shard(0, epoch) and b == shard(1, epoch)  # deterministic per rank
        assert len(a) == len(b) == n // 16 and all(len(x) == 8 for x in a + b)
        rows = [i for batch in a + b for i in batch]
        assert len(rows) == len(set(rows)) and set(rows) <= set(range(epoch * n, (epoch + 1) * n))
        assert len(rows) >= n - 2 * 8 * 2  # all but the last, partial, round of batches
        for step in zip(a, b):  # one step: both processes' batches
            rows = [i for batch in step for i in batch]
            texts = [-1 - ids["qid"][i] for i in rows] + [ids[c][i] for c in ("pos", "neg") for i in rows]
            assert len(texts) == len(set(texts))
    assert shard(0, 0) != shard(0, 1)


def test_max_steps_beyond_the_configured_epochs_train_on(tmp_path, monkeypatch):
    """--max_steps past the configured epochs: the Trainer goes on into further epochs, and the rotation covers them
    (it used to end at `epochs`, and the sampler failed with an IndexError in the first epoch past them). Also:
    training batches are cut at max_seq_length, while the model scores, and is saved, with eval_max_seq_length (a
    model saved with a short training length truncated users' passages: worse than its base as shipped)."""
    mod, cfg = tiny_config("train_bi-encoder-v2", tmp_path, "--epochs=1", "--batch_size=32", "--max_steps=8",
                           "--eval_steps=8", "--max_seq_length=8", "--eval_max_seq_length=12")
    widths = []

    class Batches(mod.TextBatches):
        def __call__(self, rows):
            out = super().__call__(rows)
            for key, value in out.items():  # a tensor, or one per chunk
                if key.endswith("input_ids"):
                    widths.extend(int(t.shape[-1]) for t in (value if isinstance(value, list) else [value]))
            return out
    monkeypatch.setattr(mod, "TextBatches", Batches)
    res = mod.main(cfg)  # 179 training queries: 5 steps an epoch
    assert widths and max(widths) <= 8
    from sentence_transformers import SentenceTransformer
    assert SentenceTransformer(str(tmp_path / "model")).max_seq_length == 12
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 9)) and history[-2]["epoch"] > 1
    assert 0 <= res["dev-test"]["trained"]["MRR@10"] <= 1
    assert bi.rotation_epochs(cfg, 179, world=1) >= 2 and bi.rotation_epochs(cfg, 179, world=2) >= 3


def test_loss_scale_follows_the_similarity():
    """20 on cosines (the published recipe); 1 on unnormalised dot products, which are logit-sized already: the
    offline base's mean-pooled embeddings have norms of 5-7, so x 20 would put a positive's logit in the hundreds."""
    assert bi.loss_scale(bi.Config()) == 20.0
    assert bi.loss_scale(config.parse_cli(bi.Config(), ["--similarity=dot"])) == 1.0
    assert bi.loss_scale(config.parse_cli(bi.Config(), ["--similarity=dot", "--scale=5"])) == 5.0
    from sentence_transformers import SentenceTransformer
    from msmarco.models import resolve_model
    from sentence_transformers.models import Pooling, Transformer
    t = Transformer(resolve_model("offline:all-MiniLM-L6-v2"), max_seq_length=32)
    model = SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean")], device="cpu")
    norms = model.encode(["what is a bi-encoder", "the capital of france is paris"], convert_to_tensor=True).norm(dim=1)
    assert (norms > 2).all()  # why dot products need no extra scale


def test_dot_similarity_reaches_the_loss_and_the_saved_model(tmp_path, monkeypatch):
    """--similarity=dot: MNRL scores dot products at scale 1, and the saved model ranks by dot product too."""
    mod, cfg = tiny_config("train_bi-encoder-v2", tmp_path, "--similarity=dot")
    scales = []

    class Recorded(mod.MultipleNegativesRankingLoss):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            scales.append((self.scale, self.similarity_fct))
    monkeypatch.setattr(mod, "MultipleNegativesRankingLoss", Recorded)
    mod.main(cfg)
    from sentence_transformers import SentenceTransformer
    saved = SentenceTransformer(str(tmp_path / "model"))
    assert [s for s, _ in scales] == [1.0] and saved.similarity_fn_name == "dot"
    a, b = saved.encode(["what is a bank", "a bank holds money"], convert_to_tensor=True)
    assert float(scales[0][1](a[None], b[None])) == pytest.approx(float(a @ b), rel=1e-4)
