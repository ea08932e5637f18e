"""Texts as token ids, tokenized once per tokenizer: the memory-mapped token store of a text store (the collection,
the training queries), and the layout of a model's special tokens, so that a training batch is built by slicing and
padding ids, with the truncation the tokenizer itself would apply, instead of tokenizing strings at every step.

At full size the collection's 8.8M passages take ~80 ids each: ~1.4 GB as uint16, memory-mapped like the other
stores (only the pages a batch touches are read)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stores import ArrayWriter, TextStore, load_array, release_pages

TOKENS_VERSION = 1  # bump when the token store's layout changes


def tokenizer_key(tokenizer) -> str:
    """A short name for a tokenizer's exact behaviour (vocabulary, normaliser, pre-tokeniser), so that a token store
    is shared by every model with the same tokenizer and rebuilt for a different one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation and padding state, which changes from call to call
        spec = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    spec += f"|{type(tokenizer).__name__}|v{TOKENS_VERSION}"
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class TokenStore:
    """Row -> token ids without special tokens, in the row order of the TextStore it was built from (so a text's
    row, from TextStore.rows_of, is also its row here): ids in one flat file, int64 offsets."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / "meta.json").read_text())
        self.ids = load_array(folder, "ids.bin", np.dtype(meta["dtype"]))
        self.offsets = load_array(folder, "offsets.bin", np.int64)

    def __reduce__(self):  # pickled as its folder (see TextStore)
        return TokenStore, (self.folder,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self.offsets[rows + 1] - self.offsets[rows]

    def row_ids(self, row: int) -> np.ndarray:
        return np.asarray(self.ids[self.offsets[row]:self.offsets[row + 1]])

    @staticmethod
    def build(folder: Path, texts: TextStore, tokenizer, chunk: int = 20_000) -> dict:
        """Tokenize every text of `texts` in chunks (the fast tokenizer's batch call); bounded memory: the pages of
        the texts read so far leave the resident set after each chunk (3 GB of passages at full size)."""
        dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
        ids_w, off_w = ArrayWriter(folder / "ids.bin", dtype), ArrayWriter(folder / "offsets.bin", np.int64)
        off_w.write([0])
        total = 0
        for lo in range(0, len(texts), chunk):
            batch = [texts.text_at(r) for r in range(lo, min(lo + chunk, len(texts)))]
            enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                            verbose=False)["input_ids"]  # verbose: no warning on texts longer than the model's limit
            lens = np.fromiter((len(e) for e in enc), np.int64, len(enc))
            ids_w.write(np.fromiter((t for e in enc for t in e), dtype, int(lens.sum())))
            off_w.write(total + np.cumsum(lens))
            total += int(lens.sum())
            release_pages(texts)
        ids_w.close(), off_w.close()
        return {"dtype": np.dtype(dtype).name, "rows": len(texts), "tokens": total,
                "mean_tokens": round(total / max(1, len(texts)), 2)}


@dataclass(frozen=True)
class Layout:
    """Where a tokenizer puts its special tokens around one text ([CLS] t [SEP]) and a pair ([CLS] q [SEP] p [SEP]
    for BERT, <s> q </s></s> p </s> for RoBERTa), with their token types, read off the tokenizer itself."""
    single: tuple[tuple[int, ...], tuple[int, ...]]  # ids before and after a text
    pair: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # before the query, between, after the passage
    pair_types: tuple[int, int, int, int, int]  # token type of: prefix, query, middle, passage, suffix
    token_types: bool  # whether the model takes token_type_ids
    pad_id: int

    @classmethod
    def of(cls, tokenizer) -> "Layout":
        a = tokenizer("a", add_special_tokens=False)["input_ids"]
        b = tokenizer("b", add_special_tokens=False)["input_ids"]
        one = tokenizer("a")["input_ids"]
        enc = tokenizer("a", "b", return_token_type_ids=True)
        two, types = enc["input_ids"], enc["token_type_ids"]
        i = _find(one, a, 0)
        j = _find(two, a, 0)
        k = _find(two, b, j + len(a))
        regions = [(0, j), (j, j + len(a)), (j + len(a), k), (k, k + len(b)), (k + len(b), len(two))]
        region_types = []
        for lo, hi in regions:
            t = set(types[lo:hi]) or {types[min(lo, len(types) - 1)]}
            if len(t) != 1:
                raise ValueError(f"{type(tokenizer).__name__}: mixed token types within a region of a pair: {types}")
            region_types.append(t.pop())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(single=(tuple(one[:i]), tuple(one[i + len(a):])),
                   pair=(tuple(two[:j]), tuple(two[j + len(a):k]), tuple(two[k + len(b):])),
                   pair_types=tuple(region_types), token_types="token_type_ids" in tokenizer.model_input_names,
                   pad_id=int(pad))

    def text_budget(self, max_length: int) -> int:
        """Tokens of a single text that fit in `max_length` with its special tokens."""
        return max(0, max_length - len(self.single[0]) - len(self.single[1]))

    def pair_lengths(self, q: np.ndarray, p: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Query and passage tokens kept by the tokenizers' "longest_first" truncation of a pair to `max_length`
        (the algorithm of the Rust tokenizers: the shorter text is kept whole when it fits in half the budget,
        else both get half), vectorised."""
        budget = max(0, max_length - sum(map(len, self.pair)))
        q, p = np.asarray(q, np.int64), np.asarray(p, np.int64)
        swap = q > p
        n1, n2 = np.where(swap, p, q), np.where(swap, q, p)  # n1 <= n2
        over = n1 + n2 > budget
        n2_new = np.where(n1 > budget, n1, np.maximum(n1, budget - n1))
        half = budget // 2
        both_long = (n1 + n2_new) > budget
        t1 = np.where(both_long, half, n1)
        t2 = np.where(both_long, half + budget % 2, np.minimum(n2, n2_new))
        t1, t2 = np.minimum(np.where(over, t1, n1), n1), np.minimum(np.where(over, t2, n2), n2)
        return np.where(swap, t2, t1), np.where(swap, t1, t2)


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ValueError(f"cannot locate {sub} in {seq}: the tokenizer's special-token layout is not understood")
