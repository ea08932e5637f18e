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
