"""Train a cross-encoder reranker on MS MARCO with binary cross-entropy (recipe v1).

A CrossEncoder (one relevance logit per (query, passage)) is trained from a plain encoder on labelled
pairs drawn from the MS MARCO BM25 training triples (qidpidtriples): each query's positive with label 1
and `neg_per_pos` of its BM25 negatives with label 0. The triples are a seeded uniform sample of the whole
file (which is sorted by query: its first lines would be ~4% of the training queries); the sample is drawn
once per data folder, size and seed (one pass over the 398M lines, 3 min at full size) and reopened
after that. Pairs are ids until a batch is built, so the full run (20M pairs) never holds their texts in memory.
`--negatives=hard` draws the negatives from msmarco-hard-negatives instead (BM25 and dense systems' top hits,
kept only where the cross-encoder scores them `ce_margin` below the positives), still BCE on labelled pairs;
`--random_negatives=r` makes r of each positive's negatives random passages of the collection (easy ones). The
`--sample` preset uses both (they won on its dev-tune queries: SAMPLE).

Training batches are built from token ids (tokenized once per tokenizer), grouped by length and padded for real
tokens (msmarco/batching.py); the loss is the stock BinaryCrossEntropyLoss. While training it reranks held-out
dev-small queries ("dev-tune") and keeps the best checkpoint by MRR@10; the final figures come from queries that
chose nothing: other dev-small queries ("dev-test") and TREC DL, each beside the first stage's own order (a BM25
run: --first_stage, the data folder's runs/bm25, else msmarco/bm25.py's ranking of the official candidates) and, on
dev-tune, the untrained model. Expected at full scale (one GPU, ~20M pairs, distilroberta-base as in the published
recipe): the v1 models of this recipe reranked the dev-small BM25 top-1000 to 0.30-0.36 MRR@10 (TinyBERT-L-2 to
ELECTRA-base). `python evaluate.py --model=output/train_cross-encoder-v1/model` measures that (all 6,980 queries, all
their candidates); the script's own results.json reranks BM25's top --eval_candidates of --eval_queries of them.

Commands:
    python train_cross-encoder-v1.py --sample          # bundled sample, offline base model, 2 CPU cores, < 5 min
    python train_cross-encoder-v1.py                   # full data (downloads ~3.7 GB into data/), one GPU
    python train_cross-encoder-v1.py --lr=7e-6 --neg_per_pos=8   # any config field as --key=value
    python train_cross-encoder-v1.py --help            # every config field with the value a run would use
    torchrun --nproc_per_node=8 train_cross-encoder-v1.py   # 8 GPUs (DDP); README, "Train on several GPUs"
Outputs: output/train_cross-encoder-v1/ (model/, checkpoints/, config.json, metrics.jsonl, metrics.png,
results.json). Rerunning the same command resumes from the newest checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

from msmarco.batching import PairBatches, batch_shape, on_token_batches
from msmarco.config import script_config
from msmarco.data import MSMarco, id_dataset
from msmarco.distributed import main_process_first
from msmarco.errors import user_errors
from msmarco.evaluation import RerankEvaluator, cross_encoder_run, evaluation_sets, rerank_table
from msmarco.models import compile_args, cross_encoder, head_bias, precision_args
from msmarco.paths import resolve_dir
from msmarco.run import (baseline_metrics, merge, metric_history, report, resume_point, save_model, start_run,
                         train_from)
from msmarco.sampling import SamplerEpoch, length_grouped_batches


@dataclass
class Config:
    sample: bool = False  # run on data/sample with the offline base model and a CPU budget (see SAMPLE)
    data_dir: str = "data"  # MS MARCO folder, relative to the repository; missing files are downloaded into it
    model_name: str = "distilroberta-base"  # encoder to start from (the recipe's): hub name, folder or offline:<name>
    pooling: str = "cls"  # head input: cls (the model's own classification head, on [CLS] / <s>) or mean (token states)
    attn_implementation: str = "sdpa"  # attention kernels: sdpa, eager, or flash_attention_2 (GPU, if installed)
    compile_mode: str = ""  # torch.compile training: "" (off), default, reduce-overhead (CUDA graphs), max-autotune
    dropout: float = -1.0  # dropout probability of every layer while training (-1: the base model's own, 0.1 for BERT)
    freeze_embeddings: bool = False  # train without the embedding layer (half of MiniLM's weights; 7% faster CPU steps)
    max_length: int = 512  # tokens of query + passage (longer is truncated)
    negatives: str = "triples"  # triples: BM25 negatives of qidpidtriples; hard: msmarco-hard-negatives, CE-filtered
    neg_per_pos: int = 4  # negatives per positive pair
    random_negatives: int = 0  # of those, how many are passages drawn at random from the collection (easy negatives)
    ce_margin: float = 3.0  # negatives=hard: keep a negative only if its CE score <= lowest positive's - margin
    negs_per_system: int = 5  # negatives=hard: negatives kept per mining system and query
    max_pairs: int = 20_000_000  # training pairs in all (positives + negatives), from a uniform sample of the triples
    epochs: int = 1  # passes over the pairs
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    batch_size: int = 32  # pairs per step
    lr: float = 2e-5  # peak learning rate (AdamW)
    warmup_steps: int = 5000  # linear warm-up, in steps
    weight_decay: float = 0.01  # AdamW weight decay
    pad_multiple: int = -1  # pad batch chunks to a multiple of this (-1: 8 on a GPU, bounded shapes; 1 on a CPU)
    chunk_cost: int = -1  # padded tokens that one more forward pass is worth when a batch is cut (-1: by device)
    length_window: int = 64  # batches sorted by length together before they are shuffled (1: random batches)
    first_stage: str = ""  # TREC run (file, or folder of <split>.run) reranked; "": <data_dir>/runs/bm25 or BM25
    eval_queries: int = 500  # dev-tune queries reranked during training; as many dev-test queries in the final report
    eval_candidates: int = 100  # candidates per query, the top of first_stage or else of BM25 (0: all)
    report_splits: tuple[str, ...] = ("dl2019", "dl2020")  # TREC DL years reranked in the final report
    eval_steps: int = 5000  # evaluate and save a checkpoint every this many steps
    logging_steps: int = 100  # log the training loss every this many steps
    save_total_limit: int = 2  # checkpoints kept on disk, the best and the newest among them (HF counts the best)
    report_to: str = "none"  # also log to tensorboard or wandb (the HF Trainer's report_to; needs that package)
    amp: bool = True  # mixed precision: bf16 on GPUs with native bf16 and CPUs with AMX, fp16 on older GPUs (V100, T4)
    seed: int = 12  # triples sample (a new seed: a new one-time pass) or hard-negative rounds; data order; head init
    resume: bool = True  # continue from the newest checkpoint of output/train_cross-encoder-v1
    output_dir: str = "output/train_cross-encoder-v1"  # relative to the repository


# --sample: the whole recipe on the bundled miniature, offline, on 2 CPU cores in under 5 minutes. The base is a
# sentence-embedding model, so its mean token state already carries meaning: a head on it (pooling=mean) learns
# far faster than the stock [CLS] head there. The run is compute-bound: 64 tokens a pair (the query and the start
# of the passage) buy 3,900 pairs in less time than 128 took for 2,500, and won on dev-tune. Dropout off: faster
# steps, and dev-tune no worse over 3 seeds in so short a run. Two of each positive's four negatives random: with
# BM25's lexical near-misses only, the loss sat at the labels' prior for half the run; easy negatives teach term
# matching first, and won on dev-tune by +0.11 MRR@10 over 3 seeds. The other two from the hard negatives that the
# cross-encoder scores at least ce_margin (3) below the positive (--negatives=hard), not the BM25 triples: the
# margin drops near-misses that may be unjudged positives, +0.052 MRR@10 on dev-tune over 3 seeds (margin 0:
# a tie). The embedding layer frozen: 7% faster CPU steps, a tie on dev-tune (docs/sample-runs.md).
SAMPLE = dict(data_dir="data/sample", model_name="offline:all-MiniLM-L6-v2", pooling="mean", max_length=64,
              dropout=0.0, freeze_embeddings=True, negatives="hard", random_negatives=2, max_pairs=3_900, epochs=1,
              batch_size=16, lr=1e-4, warmup_steps=15,
              eval_queries=60, eval_candidates=20, report_splits=("dl2020",),
              eval_steps=1_000, logging_steps=10)


def training_pairs(data: MSMarco, cfg: Config) -> Dataset:
    """(qid, pid, label) rows: each positive (label 1) just before `neg_per_pos` negatives of its query (label 0).

    triples: from a seeded uniform sample of the BM25 triples (MSMarco.triples(n, cfg.seed): n lines drawn from the
    whole file, which is sorted by query): every triple gives its negative, every `neg_per_pos`-th also its positive.
    hard: the CE-margin filtered hard negatives (MSMarco.filtered_negatives), in rounds: in round r each query, in
    a seeded order of its own, gives its next positive and its next `neg_per_pos` negatives, cycling through its
    lists from a seeded start, until max_pairs.
    Either way the last `random_negatives` of each positive's negatives are then replaced by seeded uniform draws
    from the collection (redrawn where one hits the pair's positive).
    Token ids are looked up only when a batch is built (PairBatches)."""
    k, rng = cfg.neg_per_pos, np.random.default_rng(cfg.seed)
    if cfg.negatives == "triples":
        t = np.asarray(data.triples(max_rows=math.ceil(cfg.max_pairs * k / (k + 1)), seed=cfg.seed))
        queries, pos, neg = t[:, 0], t[::k, 1], t[:, 2]
    elif cfg.negatives == "hard":
        positives, negatives = data.filtered_negatives(cfg.ce_margin, cfg.negs_per_system)
        rounds = math.ceil(cfg.max_pairs / (len(positives) * (k + 1)))
        r = np.repeat(np.arange(rounds), len(positives))
        # each round in its own seeded query order: the last round, cut at max_pairs, then holds random queries,
        # not the lowest qids (the file's order); each query starts its lists at a seeded offset, so the seed also
        # chooses which of its negatives the rounds reach where they reach fewer than all
        q = np.concatenate([rng.permutation(len(positives)) for _ in range(rounds)])
        start = rng.integers(0, 1 << 30, len(positives))[q]
        pos = np.asarray(positives.values)[positives.ptr[q] + (start + r) % positives.lengths[q]]
        j = (start + r * k)[:, None] + np.arange(k)  # this round's negatives of each query, cycling through its list
        neg = np.asarray(negatives.values)[negatives.ptr[q][:, None] + j % negatives.lengths[q][:, None]].ravel()
        queries = np.repeat(positives.qids[q], k)
    else:
        raise SystemExit(f"error: --negatives must be triples or hard, not {cfg.negatives!r}")
    if not 0 <= cfg.random_negatives <= k:
        raise SystemExit(f"error: --random_negatives must be in 0..neg_per_pos ({k}), not {cfg.random_negatives}")
    if cfg.random_negatives:  # the last ones of each positive's k: seeded draws from the collection, not that positive
        slot = np.flatnonzero(np.arange(len(neg)) % k >= k - cfg.random_negatives)
        own = (t[:, 1] if cfg.negatives == "triples" else np.repeat(pos, k))[slot]  # the positive of each row's query
        ids = np.asarray(data.collection().ids)
        neg, draw = np.array(neg), ids[rng.integers(0, len(ids), len(slot))]
        while (clash := draw == own).any():
            draw[clash] = ids[rng.integers(0, len(ids), int(clash.sum()))]
        neg[slot] = draw
    i = np.arange(len(queries))
    neg_at = i + i // k + 1  # after the i // k + 1 positives of rows 0..i
    pos_at = neg_at[::k] - 1
    qid, pid = np.empty(len(i) + len(pos_at), np.int32), np.empty(len(i) + len(pos_at), np.int32)
    label = np.zeros(len(qid), np.float32)
    qid[neg_at], pid[neg_at] = queries, neg
    qid[pos_at], pid[pos_at], label[pos_at] = queries[::k], pos[:len(pos_at)], 1.0
    qid, pid, label = qid[:cfg.max_pairs], pid[:cfg.max_pairs], label[:cfg.max_pairs]
    data.check_train_qids(qid, "qidpidtriples.train.full.2.tsv.gz" if cfg.negatives == "triples"
                          else "msmarco-hard-negatives.jsonl.gz")
    return id_dataset({"qid": qid, "pid": pid, "label": label}, "ce-v1-pairs")


def main(cfg: Config) -> dict:
    out = resolve_dir(cfg.output_dir)
    checkpoint = resume_point(cfg, out)  # checks output/<script>/; start_run (stage 4) changes it
    data = MSMarco(cfg.data_dir)

    # 1. Data: training pairs (ids); evaluation sets: dev-tune queries choose the checkpoint, dev-test and TREC DL
    #    queries give the final figures. Under torchrun the main process prepares the stores first.
    with main_process_first():
        train = training_pairs(data, cfg)
        tune, reports = evaluation_sets(data, cfg)
    sets = ", ".join(f"{s.name} {len(s.qids)}" for s in [tune, *reports])
    print(f"{len(train):,} training pairs; evaluation: {sets}")

    # 2. Model: a plain encoder with a new one-logit head on [CLS] or on the mean token state. The head's bias
    #    starts at the labels' prior log-odds, log(1 / neg_per_pos), so no steps are spent learning it.
    torch.manual_seed(cfg.seed)
    model = cross_encoder(cfg.model_name, cfg.max_length, cfg.pooling, activation=None, attn=cfg.attn_implementation,
                          dropout=cfg.dropout, freeze_embeddings=cfg.freeze_embeddings)
    head_bias(model).fill_(math.log(1 / cfg.neg_per_pos))

    # 3. Loss: binary cross-entropy on the raw logit, fed batches of token ids: pairs of similar lengths, each chunk
    #    padded to its own longest pair.
    batches = PairBatches(data, model.tokenizer, batch_shape(cfg.max_length, cfg.pad_multiple, cfg.chunk_cost))
    loss = on_token_batches(BinaryCrossEntropyLoss(model))

    # 4. Evaluation before training: the first stage's order everywhere, the untrained model on dev-tune.
    evaluator = RerankEvaluator(tune, cross_encoder_run)
    start_run(cfg, out, checkpoint)  # only now: a value that failed above left the folder's last run whole
    baselines = baseline_metrics(out, lambda: {**rerank_table([tune], cross_encoder_run, {"untrained": model}),
                                               **rerank_table(reports, cross_encoder_run, {})}, tune.name)

    # 5. Trainer: HF Trainer machinery (checkpoints, resume, best model by dev-tune MRR@10, DDP under torchrun).
    args = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, **precision_args(cfg.amp), **compile_args(cfg.compile_mode),
        seed=cfg.seed, batch_sampler=length_grouped_batches(batches.row_lengths, cfg.length_window),
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit, load_best_model_at_end=True,
        metric_for_best_model=f"eval_{evaluator.name}_MRR@10", logging_steps=cfg.logging_steps,
        report_to=cfg.report_to, ddp_find_unused_parameters=False)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=loss, evaluator=evaluator,
                                  data_collator=batches,
                                  callbacks=[metric_history(out / "metrics.jsonl"), SamplerEpoch()])
    train_from(trainer, checkpoint)  # trainer.train(resume_from_checkpoint=...), minus a step past --max_steps

    # 6. Save the best model where stock CrossEncoder(path) loads it, and evaluate that saved model.
    trained = CrossEncoder(str(save_model(trainer, model, out)))
    results = {**merge(baselines, rerank_table(reports, cross_encoder_run, {"trained": trained}, first_stage=False)),
               "first_stage": {s.name: s.first_stage for s in [tune, *reports]}, "data_dir": str(data.dir)}
    report(trainer, out, results,
           "Reranking held-out queries (dev-tune chose the checkpoint; the others decided nothing)")
    return results


if __name__ == "__main__":
    with user_errors():
        main(script_config(Config(), SAMPLE))
