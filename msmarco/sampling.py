"""Batch samplers for the sentence-transformers trainers over datasets of tens of millions of rows: a seeded
permutation computed batch by batch (no list of all indices), reshuffled every epoch; batches of similar lengths
for the token batches (msmarco/batching.py); and the callback that tells a sampler its epoch whatever wraps it, so
that a resumed run, one process or several, replays its epoch exactly."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback


def feistel_order(n: int, seed: int, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
    """A pseudo-random permutation of range(n), in chunks, in O(chunk) memory and with no start-up cost.

    A 4-round Feistel network keyed by `seed` (a bijection of [0, 4^h) for any round function, here a
    splitmix64 hash) maps 0, 1, 2, ... to distinct values; those >= n are skipped (cycle-walking), so the
    values that remain are each of range(n) exactly once. torch.randperm would hold the whole permutation:
    2.8 s on 2 cores and 320 MB for v2's 80M rows before the first batch."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)  # 4^half >= n, < 4n
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng(seed).integers(0, 1 << 63, 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, 1 << (2 * half), chunk):
            x = np.arange(lo, min(lo + chunk, 1 << (2 * half)), dtype=np.uint64)
            left, right = x >> np.uint64(half), x & mask
            for k in keys:
                z = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
            y = (left << np.uint64(half)) | right
            yield y[y < n].astype(np.int64)


class SeededBatchSampler(DefaultBatchSampler):
    """A batch sampler whose order follows the trainer's seed. sentence-transformers 6.0 hands a single dataset's
    sampler only `generator`, seeded with args.seed (its `seed` stays 0), so a sampler that read `seed` alone gave
    every run the same order; here the generator's seed wins when there is one."""

    def __init__(self, dataset, *args, generator=None, seed: int = 0, **kwargs):
        super().__init__(dataset, *args, generator=generator,
                         seed=generator.initial_seed() if generator is not None else seed, **kwargs)


class ShuffledBatchSampler(SeededBatchSampler):
    """Random batches, reshuffled every epoch from seed + epoch (so a resumed run replays its epoch)."""

    def __iter__(self):
        size = self.batch_size
        carry = np.zeros(0, np.int64)
        for part in feistel_order(len(self.sampler), self.seed * 1_000_003 + self.epoch):  # the sampler is the dataset
            carry = np.concatenate([carry, part])
            while len(carry) >= size:
                yield carry[:size].tolist()
                carry = carry[size:]
        if len(carry) and not self.drop_last:
            yield carry.tolist()


def shuffled_batches(dataset, batch_size: int, drop_last: bool, seed: int = 0, generator=None, **_):
    """A `batch_sampler=` for the sentence-transformers trainers: random batches of a large dataset, reshuffled
    every epoch, in bounded memory and with no start-up cost (feistel_order). The default, torch's RandomSampler,
    turns a permutation of all rows into a Python list: for v2's 80M rows ~3 GB and ~5 s before the first step."""
    return ShuffledBatchSampler(dataset, batch_size=batch_size, drop_last=drop_last, seed=seed, generator=generator)


class LengthGroupedBatchSampler(ShuffledBatchSampler):
    """Batches of rows of similar lengths, in random order: the epoch's seeded permutation is cut into windows of
    `window` batches; each window is sorted by length (`lengths(columns)` of its rows' dataset id columns), cut
    into batches, and its batches are shuffled. Deterministic per seed and epoch, so a resumed run replays it."""

    def __init__(self, dataset, *args, lengths: Callable[[dict], np.ndarray], window: int = 64, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        table = dataset.data.table
        self.columns = {c: table.column(c).to_numpy() for c in table.column_names}  # zero-copy views of the ids
        self.lengths, self.window = lengths, window

    def __iter__(self):
        size, rng = self.batch_size, np.random.default_rng([self.seed, self.epoch])
        todo = np.zeros(0, np.int64)
        parts = feistel_order(len(self.sampler), self.seed * 1_000_003 + self.epoch)
        done = False
        while not done:
            while len(todo) < size * self.window and not done:
                part = next(parts, None)
                done = part is None
                if not done:
                    todo = np.concatenate([todo, part])
            window, todo = todo[:size * self.window], todo[size * self.window:]
            if not len(window):
                break
            window = window[np.argsort(self.lengths({c: v[window] for c, v in self.columns.items()}), kind="stable")]
            batches = [window[i:i + size] for i in range(0, len(window), size)]
            if len(batches[-1]) < size and (done and not len(todo)) and self.drop_last:
                batches.pop()
            for i in rng.permutation(len(batches)):
                yield batches[i].tolist()


class length_grouped_batches:  # noqa: N801 - used like the function shuffled_batches
    """A `batch_sampler=` for the trainers: LengthGroupedBatchSampler with `lengths` (e.g. PairBatches.row_lengths).
    A class, not a closure, because the trainer pickles its arguments into every checkpoint."""

    def __init__(self, lengths: Callable[[dict], np.ndarray], window: int = 64):
        self.lengths, self.window = lengths, window

    def __call__(self, dataset, batch_size: int, drop_last: bool, seed: int = 0, generator=None, **_):
        return LengthGroupedBatchSampler(dataset, batch_size=batch_size, drop_last=drop_last, seed=seed,
                                         generator=generator, lengths=self.lengths, window=self.window)


def no_duplicate_batches(order: np.ndarray, ids: np.ndarray, batch_size: int, drop_last: bool) -> Iterator[list[int]]:
    """Batches of the rows `order`, in that order, with no value of `ids` (one row of ids per dataset row) twice in
    a batch: a row that would repeat one waits for a later batch, as in sentence-transformers'
    NoDuplicatesBatchSampler; here on integer ids held in an array (that sampler reads every row through the
    dataset, ~100 us a row: more than building the batch costs). Every row is placed: near the end, rows that
    clash with each other make more than one short batch (all dropped with drop_last)."""
    nxt = np.append(np.arange(1, len(order)), -1)  # linked list over the rows still to place
    head = 0 if len(order) else -1
    while head != -1:
        batch, seen, cur, prev = [], set(), head, -1
        while cur != -1 and len(batch) < batch_size:
            row = int(order[cur])
            values = ids[row].tolist()
            following = int(nxt[cur])
            if seen.isdisjoint(values):
                batch.append(row)
                seen.update(values)
                if prev == -1:
                    head = following
                else:
                    nxt[prev] = following
            else:
                prev = cur
            cur = following
        if len(batch) == batch_size or (batch and not drop_last):
            yield batch


def top_up(batch: list[int], pool: np.ndarray, ids: np.ndarray, batch_size: int) -> list[int]:
    """`batch` filled to `batch_size` with rows of `pool`, in its order, that repeat no id of the batch (rows it
    already has excluded); shorter if the pool has too few."""
    batch, rows, seen = list(batch), set(batch), {v for row in batch for v in ids[row].tolist()}
    for row in pool.tolist():
        if len(batch) == batch_size:
            break
        values = ids[row].tolist()
        if row not in rows and seen.isdisjoint(values):
            batch.append(row)
            rows.add(row)
            seen.update(values)
    return batch


def _samplers_in(loader, depth: int = 5) -> Iterator[DefaultBatchSampler]:
    """Batch samplers reachable from a dataloader through the wrappers accelerate puts around them."""
    seen, todo = set(), [(loader, 0)]
    while todo:
        obj, d = todo.pop()
        if obj is None or id(obj) in seen or d > depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, DefaultBatchSampler):
            yield obj
        for attr in ("batch_sampler", "sampler", "base_dataloader", "dataloader"):
            todo.append((getattr(obj, attr, None), d + 1))


class SamplerEpoch(TrainerCallback):
    """Sets the epoch on the run's batch samplers at every epoch start. The Trainer's own set_epoch does not reach
    them in a resumed multi-process run (accelerate's BatchSamplerShard, wrapped for skip_first_batches, has no
    set_epoch), which would replay epoch 0's order there. state.epoch is the epoch being started (e + 0.0 after
    epoch e - 1 ended; e + a fraction when resuming inside epoch e)."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        for sampler in _samplers_in(train_dataloader):
            sampler.set_epoch(int(state.epoch or 0))
