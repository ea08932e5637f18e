"""Batch samplers (msmarco/sampling.py): seeded permutations in bounded memory, each row once per epoch."""
import numpy as np

from msmarco import sampling


def test_feistel_order_is_a_seeded_permutation():
    for n in (1, 2, 5, 1000, 70_001):
        order = np.concatenate(list(sampling.feistel_order(n, seed=3, chunk=4096)))
        assert np.array_equal(np.sort(order), np.arange(n))  # every row exactly once
    a = np.concatenate(list(sampling.feistel_order(70_001, seed=3)))
    assert np.array_equal(a, np.concatenate(list(sampling.feistel_order(70_001, seed=3))))
    assert not np.array_equal(a, np.concatenate(list(sampling.feistel_order(70_001, seed=4))))
    assert abs(np.corrcoef(np.arange(len(a)), a)[0, 1]) < 0.02  # no trace of the input order
    # the first rows drawn are spread over the whole range, not a local block of it
    assert np.histogram(a[:7000], bins=10, range=(0, 70_001))[0].min() > 550


def test_shuffled_batches_cover_each_row_once_per_epoch_and_replay_by_epoch():
    ds = list(range(103))
    def batches(epoch, seed=5, drop_last=False):
        s = sampling.shuffled_batches(ds, batch_size=10, drop_last=drop_last, seed=seed)
        s.set_epoch(epoch)
        return list(s)
    first = batches(0)
    assert sorted(i for b in first for i in b) == ds and len(first) == 11 and [len(b) for b in first][-1] == 3
    assert first == batches(0) and first != batches(1) and first != batches(0, seed=6)
    assert len(batches(0, drop_last=True)) == 10 == len(sampling.shuffled_batches(ds, 10, True))


def test_length_grouped_batches_cover_each_row_once_and_replay_by_epoch():
    from msmarco.data import id_dataset
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, 5_000)
    ds = id_dataset({"row": np.arange(5_000)}, "t")

    def batches(epoch, seed=3, drop_last=False):
        s = sampling.LengthGroupedBatchSampler(ds, batch_size=16, drop_last=drop_last, seed=seed,
                                               lengths=lambda cols: lengths[cols["row"]], window=20)
        s.set_epoch(epoch)
        return list(s)
    first = batches(0)
    assert sorted(i for b in first for i in b) == list(range(5_000)) and len(first) == 313
    assert first == batches(0) and first != batches(1) and first != batches(0, seed=4)
    assert len(batches(0, drop_last=True)) == 312
    spread = np.mean([np.ptp(lengths[b]) for b in first])  # a random batch of 16 spans ~250 tokens
    assert spread < 40
    starts = [lengths[b].mean() for b in first[:40]]  # the batches of a window come in random order
    assert not (np.all(np.diff(starts) >= 0) or np.all(np.diff(starts) <= 0))


def test_the_epoch_reaches_a_sampler_whatever_wraps_it():
    """A resumed multi-process run iterates SkipBatchSampler(BatchSamplerShard(sampler)); the Trainer's set_epoch
    does not reach the sampler through them (accelerate 1.x), which replayed epoch 0's order. SamplerEpoch does."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
    ds = list(range(100))
    sampler = sampling.shuffled_batches(ds, batch_size=10, drop_last=False, seed=1)
    loader = SimpleNamespace(batch_sampler=SkipBatchSampler(BatchSamplerShard(sampler, 2, 1), skip_batches=1))
    sampling.SamplerEpoch().on_epoch_begin(None, SimpleNamespace(epoch=3.4), None, train_dataloader=loader)
    assert sampler.epoch == 3
    sampling.SamplerEpoch().on_epoch_begin(None, SimpleNamespace(epoch=4.0), None, train_dataloader=loader)
    assert sampler.epoch == 4


def test_the_trainers_seed_reaches_the_batch_samplers(tmp_path):
    """The order a training run sees follows its --seed. sentence-transformers hands a single dataset's batch sampler
    the trainer's seed only inside `generator` (its `seed` argument stays 0): read through the real trainers'
    dataloaders, as a run builds them, two seeds must give two orders and one seed the same order twice."""
    import functools

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from msmarco.data import id_dataset
    from msmarco.models import cross_encoder, resolve_model
    from test_scripts import load

    class Collator:  # the batches are read from the sampler, never collated
        valid_label_columns = ["label"]

        def __call__(self, features):
            return features

    n = 200
    pairs = id_dataset({"qid": np.arange(n), "pid": np.arange(n), "label": np.zeros(n, np.float32)}, "seed-pairs")
    triplets = id_dataset({"qid": np.arange(n), "pos": np.arange(n, 2 * n), "neg": np.arange(2 * n, 3 * n)},
                          "seed-triplets")
    ce = cross_encoder("offline:all-MiniLM-L6-v2", 32, "mean")
    transformer = Transformer(resolve_model("offline:all-MiniLM-L6-v2"), max_seq_length=32)
    st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")])
    bi = load("train_bi-encoder-v2")
    kinds = {
        "shuffled": lambda seed: CrossEncoderTrainer(model=ce, train_dataset=pairs, data_collator=Collator(),
                                                     args=CrossEncoderTrainingArguments(
                                                         output_dir=str(tmp_path), seed=seed, report_to="none",
                                                         per_device_train_batch_size=10, use_cpu=True,
                                                         batch_sampler=sampling.shuffled_batches)),
        "length-grouped": lambda seed: CrossEncoderTrainer(
            model=ce, train_dataset=pairs, data_collator=Collator(),
            args=CrossEncoderTrainingArguments(
                output_dir=str(tmp_path), seed=seed, report_to="none", per_device_train_batch_size=10, use_cpu=True,
                batch_sampler=sampling.length_grouped_batches(lambda cols: cols["qid"] % 7, window=4))),
        "bi-encoder epochs": lambda seed: SentenceTransformerTrainer(
            model=st, train_dataset=triplets, data_collator=Collator(),
            args=SentenceTransformerTrainingArguments(
                output_dir=str(tmp_path), seed=seed, report_to="none", per_device_train_batch_size=10, use_cpu=True,
                batch_sampler=functools.partial(bi.EpochBlockSampler, rows_per_epoch=n))),
    }
    for kind, trainer in kinds.items():
        def order(seed):
            return list(next(sampling._samplers_in(trainer(seed).get_train_dataloader())))
        first = order(12)
        assert first == order(12), kind
        assert first != order(13), kind
