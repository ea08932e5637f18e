"""Training batches that hold real tokens, not padding, built from token ids instead of text.

A collator here turns a batch of id rows (qid, pid, label, ...) into model inputs by slicing the token stores
(msmarco/tokens.py) and adding the tokenizer's special tokens, with the truncation the tokenizer would apply: no
string is tokenized while training. Within the batch the sequences are sorted by length and cut into a few
chunks, each padded to its own longest sequence (rounded up to a multiple of `pad_multiple`, so that a GPU sees a
bounded set of shapes); a chunk boundary is placed where the padding it saves outweighs one more forward pass
(`chunk_cost`, in padded tokens). `on_token_batches(loss)` runs the model chunk by chunk, puts the outputs back in
row order and applies the stock loss's own formula, so the recipe stays the library's loss.

Why not the stock collator: it tokenizes every batch (host time every step) and pads all of a batch's texts to its
longest, which at MS MARCO's length spread (mean 82 tokens, p99 183) makes about half of every step padding;
benchmarks/bench_train_speed.py measures both."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import MSMarco
from .tokens import Layout, TokenStore

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def padded(n, multiple: int):
    """`n` rounded up to a multiple of `multiple` (n may be an array)."""
    return -(-np.asarray(n) // multiple) * multiple


def plan_chunks(lengths: np.ndarray, cost: float, multiple: int, step: int = 8) -> list[tuple[int, int]]:
    """Cut rows sorted by length into consecutive chunks [a, b) that minimise the padded tokens (each chunk padded
    to its longest row, rounded up to `multiple`) plus `cost` per chunk; boundaries at multiples of `step` rows.
    Exact dynamic programme over at most n / step + 1 boundaries."""
    n = len(lengths)
    cuts = list(range(0, n, step)) + [n]
    pad = padded(lengths, multiple)
    best, back = [0.0] + [np.inf] * (len(cuts) - 1), [0] * len(cuts)
    for j in range(1, len(cuts)):
        b = cuts[j]
        for i in range(j):
            c = best[i] + (b - cuts[i]) * float(pad[b - 1]) + cost
            if c < best[j]:
                best[j], back[j] = c, i
    out, j = [], len(cuts) - 1
    while j > 0:
        out.append((cuts[back[j]], cuts[j]))
        j = back[j]
    return out[::-1]


def _single(tok: TokenStore, rows: np.ndarray, keep: np.ndarray, layout: Layout, width: int) -> dict:
    """[prefix] text[:keep] [suffix], padded to `width`: input_ids, attention_mask (and zero token types)."""
    pre, suf = layout.single
    n = len(rows)
    c = np.arange(width)[None, :]
    ids = np.full((n, width), layout.pad_id, dtype=np.int64)
    if pre:
        ids[:, :len(pre)] = pre
    inside = (c >= len(pre)) & (c < len(pre) + keep[:, None])
    ids[inside] = tok.ids[(tok.offsets[rows][:, None] + c - len(pre))[inside]]
    end = len(pre) + keep
    for j, t in enumerate(suf):
        ids[np.arange(n), end + j] = t
    out = {"input_ids": ids, "attention_mask": (c < (end + len(suf))[:, None]).astype(np.int64)}
    if layout.token_types:
        out["token_type_ids"] = np.zeros_like(ids)
    return out


def _pair(qtok: TokenStore, qrows, qkeep, ptok: TokenStore, prows, pkeep, layout: Layout, width: int) -> dict:
    """[prefix] query[:qkeep] [middle] passage[:pkeep] [suffix], padded to `width`, with the pair's token types."""
    pre, mid, suf = layout.pair
    n = len(qrows)
    c = np.arange(width)[None, :]
    ids = np.full((n, width), layout.pad_id, dtype=np.int64)
    if pre:
        ids[:, :len(pre)] = pre
    q_end = len(pre) + qkeep[:, None]
    in_q = (c >= len(pre)) & (c < q_end)
    ids[in_q] = qtok.ids[(qtok.offsets[qrows][:, None] + c - len(pre))[in_q]]
    for j, t in enumerate(mid):
        ids[np.arange(n), q_end[:, 0] + j] = t
    p_start = q_end + len(mid)
    p_end = p_start + pkeep[:, None]
    in_p = (c >= p_start) & (c < p_end)
    ids[in_p] = ptok.ids[(ptok.offsets[prows][:, None] + c - p_start)[in_p]]
    for j, t in enumerate(suf):
        ids[np.arange(n), p_end[:, 0] + j] = t
    end = p_end + len(suf)
    out = {"input_ids": ids, "attention_mask": (c < end).astype(np.int64)}
    if layout.token_types:
        tp, tq, tm, tpa, ts = layout.pair_types
        out["token_type_ids"] = np.select([c < len(pre), c < q_end, c < p_start, c < p_end], [tp, tq, tm, tpa],
                                          ts).astype(np.int64) * out["attention_mask"]
    return out


def _chunked(lengths: np.ndarray, build, cost: float, multiple: int) -> dict:
    """Model inputs for rows of the given total lengths: sorted by length, cut by plan_chunks, each chunk built by
    build(row_indices, width); "order" puts the concatenated chunk outputs back in row order."""
    perm = np.argsort(lengths, kind="stable")
    parts = [build(perm[a:b], int(padded(lengths[perm[b - 1]], multiple)))
             for a, b in plan_chunks(lengths[perm], cost, multiple)]
    out = {k: [torch.from_numpy(p[k]) for p in parts] for k in parts[0]}
    out["order"] = torch.from_numpy(np.argsort(perm))
    out["real_tokens"] = int(lengths.sum())  # for the benchmark's padded / real figure
    return out


@dataclass
class BatchShape:
    """How batches are padded and cut (see the module doc)."""
    max_length: int  # tokens per sequence, special tokens included (longer ones are truncated)
    pad_multiple: int = 8  # pad each chunk to a multiple of this many tokens (bounded shapes for GPUs)
    chunk_cost: float = 64  # padded tokens worth one more forward pass: small on CPUs, large on GPUs


def batch_shape(max_length: int, pad_multiple: int = -1, chunk_cost: int = -1) -> BatchShape:
    """BatchShape with this device's settings where they are -1. On a CPU: no rounding (a shape costs nothing to
    change) and a chunk cost of 64 padded tokens (one more forward and backward pass of MiniLM-L6 within a step
    costs about as much as that many tokens on 2 cores). On a GPU: multiples of 8 (kernels want bounded shapes) and
    16k tokens (a pass costs ~1 ms of kernel launches, ~10k tokens of a small model's throughput; an estimate,
    not measured), so batches stay whole unless their lengths differ a lot."""
    gpu = torch.cuda.is_available()
    return BatchShape(max_length, pad_multiple if pad_multiple > 0 else (8 if gpu else 1),
                      chunk_cost if chunk_cost >= 0 else (16_384 if gpu else 64))


class PairBatches:
    """Cross-encoder batches: (query, passage) pairs of the training queries and the collection, one "pairs"
    input (for MarginMSE: each row's positive pair, then its negative pair) and the labels.

    `resolve(columns) -> (qids, pids, labels)` turns the dataset's id columns into pairs; pids is (n,) or (n, 2)
    (positive, negative); by default the columns are qid, pid, label."""
    valid_label_columns = ["label"]  # what the sentence-transformers trainer asks a collator

    def __init__(self, data: MSMarco, tokenizer, shape: BatchShape, resolve=None, split: str = "train"):
        self.queries, self.passages = data.queries(split), data.collection()
        self.q_tok, self.p_tok = data.tokens(f"queries.{split}", tokenizer), data.tokens("collection", tokenizer)
        self.layout, self.shape, self.resolve = Layout.of(tokenizer), shape, resolve or default_pairs

    def _rows(self, columns: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qids, pids, labels = self.resolve(columns)
        pids = np.asarray(pids).reshape(len(qids), -1)
        return self.queries.rows_of(qids), self.passages.rows_of(pids.ravel()).reshape(pids.shape), labels

    def _keep(self, qrows: np.ndarray, prows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.repeat(self.q_tok.lengths(qrows), prows.shape[1])
        return self.layout.pair_lengths(q, self.p_tok.lengths(prows.ravel()), self.shape.max_length)

    def row_lengths(self, columns: dict) -> np.ndarray:
        """Tokens of each row's longest pair, special tokens included (what a length-grouped sampler sorts by)."""
        qrows, prows, _ = self._rows(columns)
        qk, pk = self._keep(qrows, prows)
        return (qk + pk).reshape(prows.shape).max(1) + sum(map(len, self.layout.pair))

    def __call__(self, features: list[dict]) -> dict:
        columns = {k: np.asarray([f[k] for f in features]) for k in features[0]}
        qrows, prows, labels = self._rows(columns)
        k = prows.shape[1]
        qrows = np.tile(qrows, k)  # pair j * n + i: row i's j-th passage (positives first, then negatives)
        prows = prows.T.ravel()
        qk, pk = self.layout.pair_lengths(self.q_tok.lengths(qrows), self.p_tok.lengths(prows), self.shape.max_length)
        total = qk + pk + sum(map(len, self.layout.pair))
        pairs = _chunked(total, lambda i, w: _pair(self.q_tok, qrows[i], qk[i], self.p_tok, prows[i], pk[i],
                                                     self.layout, w), self.shape.chunk_cost, self.shape.pad_multiple)
        return {"pairs": pairs, "label": torch.as_tensor(np.asarray(labels, dtype=np.float32))}


def default_pairs(columns: dict):
    return columns["qid"], columns["pid"], columns["label"]


class TextBatches:
    """Bi-encoder batches: each row's query, and its passages (positive, then hard negative) as one input of 2n
    texts, so that positives and negatives share chunks of similar lengths. For the sentence-transformers trainer
    the inputs are flat keys "<column>_<input>". With chunked=False: plain padded columns query, positive, negative
    in row order, as the stock collator gives them (what CachedMultipleNegativesRankingLoss takes)."""
    valid_label_columns = ["label"]

    def __init__(self, data: MSMarco, tokenizer, shape: BatchShape, passage_columns=("pos", "neg"),
                 chunked: bool = True, split: str = "train"):
        self.queries, self.passages = data.queries(split), data.collection()
        self.q_tok, self.p_tok = data.tokens(f"queries.{split}", tokenizer), data.tokens("collection", tokenizer)
        self.layout, self.shape, self.passage_columns = Layout.of(tokenizer), shape, tuple(passage_columns)
        self.chunked = chunked

    def _texts(self, tok: TokenStore, rows: np.ndarray) -> dict:
        keep = np.minimum(tok.lengths(rows), self.layout.text_budget(self.shape.max_length))
        total = keep + sum(map(len, self.layout.single))
        if not self.chunked:
            plain = _single(tok, rows, keep, self.layout, int(padded(total.max(), self.shape.pad_multiple)))
            return {k: torch.from_numpy(v) for k, v in plain.items()}
        return _chunked(total, lambda i, w: _single(tok, rows[i], keep[i], self.layout, w), self.shape.chunk_cost,
                        self.shape.pad_multiple)

    def __call__(self, features: list[dict]) -> dict:
        qids = np.asarray([f["qid"] for f in features])
        pids = [np.asarray([f[c] for f in features]) for c in self.passage_columns]
        if self.chunked:
            columns = [("query", self.q_tok, self.queries.rows_of(qids)),
                       ("passages", self.p_tok, self.passages.rows_of(np.concatenate(pids)))]
        else:
            names = ["positive", "negative", *[f"negative_{i}" for i in range(2, len(pids))]]
            columns = [("query", self.q_tok, self.queries.rows_of(qids))]
            columns += [(name, self.p_tok, self.passages.rows_of(p)) for name, p in zip(names, pids)]
        batch = {}
        for name, tok, rows in columns:
            for key, value in self._texts(tok, rows).items():
                batch[f"{name}_{key}"] = value
        return batch


def forward_chunks(model, features: dict, output: str) -> torch.Tensor:
    """`model` on each chunk of `features`; the outputs (`output`: sentence_embedding or scores) in row order."""
    keys = [k for k in MODEL_KEYS if k in features]
    outs = [model({k: features[k][i] for k in keys})[output] for i in range(len(features["input_ids"]))]
    return torch.cat(outs)[features["order"].to(outs[0].device)]


class TokenBatchLoss(torch.nn.Module):
    """A stock sentence-transformers loss fed by PairBatches / TextBatches: the model runs chunk by chunk, then the
    stock loss's own formula applies (MultipleNegativesRankingLoss.compute_loss_from_embeddings; the BCE, MSE and
    MarginMSE criteria of the cross-encoder losses)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    @property
    def model(self):
        return self.loss.model

    def forward(self, features: list[dict], labels: torch.Tensor | None = None, **_) -> torch.Tensor:
        from sentence_transformers.cross_encoder import losses as ce
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        loss = self.loss
        if isinstance(loss, MultipleNegativesRankingLoss):
            queries = forward_chunks(loss.model, features[0], "sentence_embedding")
            passages = forward_chunks(loss.model, features[1], "sentence_embedding")
            return loss.compute_loss_from_embeddings([queries, *passages.split(len(queries))], labels)
        logits = loss.activation_fn(forward_chunks(loss.model, features[0], "scores").view(-1))
        if isinstance(loss, ce.MarginMSELoss):
            pos, neg = logits.split(len(logits) // 2)
            return loss.loss_fct((pos - neg).unsqueeze(1), labels.float().view(-1, 1))
        if isinstance(loss, ce.BinaryCrossEntropyLoss):
            return loss.bce_with_logits_loss(logits, labels.float())
        if isinstance(loss, ce.MSELoss):
            return loss.loss_fct(logits, labels.float())
        raise TypeError(f"on_token_batches does not know {type(loss).__name__}")

    def get_config_dict(self):
        return self.loss.get_config_dict()

    @property
    def citation(self):
        return getattr(self.loss, "citation", None)


def on_token_batches(loss: torch.nn.Module) -> TokenBatchLoss:
    """The stock `loss`, fed pre-tokenized, length-sorted chunks (PairBatches, TextBatches) instead of texts."""
    return TokenBatchLoss(loss)
