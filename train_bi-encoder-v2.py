"""Train a bi-encoder for MS MARCO passage retrieval with MultipleNegativesRankingLoss and filtered hard negatives.

A SentenceTransformer (transformer + mean pooling, cosine or dot similarity) learns from (query, positive,
hard negative) triplets with MultipleNegativesRankingLoss: every other passage in the batch is a negative too.
Hard negatives come from msmarco-hard-negatives.jsonl.gz (BM25 and a dozen dense systems per query) and are
kept only when a cross-encoder scores them at least `ce_margin` below the query's lowest-scored positive
(false negatives out), at most `negs_per_system` per system. Each epoch pairs every query with its next
positive and next negative; the rotation is fixed by the seed and the epoch, so a resumed run sees the same
sequence. `--negatives=triples` uses the BM25 training triples (qidpidtriples) instead: a seeded uniform sample of
`max_triples` lines of the whole file (drawn once per data folder, size and seed, by one pass over the file).

Training batches are built from token ids (tokenized once per tokenizer); within a batch the queries, and the
passages (positives and negatives together), are sorted by length and cut into chunks padded for real tokens
(msmarco/batching.py), while the batch itself stays a random draw, so the in-batch negatives are as hard as with the
stock collator. The loss is the stock MultipleNegativesRankingLoss. While training it reranks held-out dev-small
queries' candidates ("dev-tune") and keeps the best checkpoint by MRR@10; the final figures come from queries that
chose nothing: other dev-small queries ("dev-test", also dense retrieval over the data folder's whole collection,
MRR@10 and Recall@k, before and after training) and TREC DL, beside the untrained model and the first stage's order
(a BM25 run: --first_stage, the data folder's runs/bm25, else msmarco/bm25.py's ranking of the official candidates).
Expected at full scale (one GPU, distilbert-base-uncased, 10 epochs): about 0.338 MRR@10 retrieving from the full
collection on dev-small: `python evaluate.py --model=output/train_bi-encoder-v2/model` measures that (all 6,980
queries); the script's own results.json reports --eval_queries of them.

Commands:
    python train_bi-encoder-v2.py --sample             # bundled sample, offline base model, 2 CPU cores, < 5 min
    python train_bi-encoder-v2.py                      # full data (downloads ~4 GB into data/), one GPU
    python train_bi-encoder-v2.py --loss=cached_mnrl --batch_size=1024   # large batches in bounded memory
    python train_bi-encoder-v2.py --help               # every config field with the value a run would use
    torchrun --nproc_per_node=8 train_bi-encoder-v2.py   # 8 GPUs (DDP); README, "Train on several GPUs"
    accelerate launch --multi_gpu --num_processes=8 train_bi-encoder-v2.py   # the same, through accelerate
    torchrun --nproc_per_node=2 train_bi-encoder-v2.py --sample   # 2 CPU processes (gloo), as the tests do
Outputs: output/train_bi-encoder-v2/ (model/, checkpoints/, config.json, metrics.jsonl, metrics.png,
results.json). Rerunning the same command resumes from the newest checkpoint.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                               MultipleNegativesRankingLoss)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

from msmarco.batching import TextBatches, batch_shape, on_token_batches
from msmarco.config import script_config
from msmarco.data import MSMarco, id_dataset, shuffle_within_groups
from msmarco.distributed import main_process_first, process_group
from msmarco.errors import user_errors
from msmarco.evaluation import (RerankEvaluator, RetrievalEvaluator, bi_encoder_run, evaluation_sets,
                                rerank_table)
from msmarco.models import compile_args, freeze_unused_pooler, loading, precision_args, resolve_model, set_dropout
from msmarco.paths import resolve_dir
from msmarco.run import (baseline_metrics, merge, metric_history, report, resume_point, save_model, start_run,
                         train_from)
from msmarco.sampling import SamplerEpoch, SeededBatchSampler, no_duplicate_batches, top_up
from msmarco.stores import Grouped


@dataclass
class Config:
    sample: bool = False  # run on data/sample with the offline base model and a CPU budget (see SAMPLE)
    data_dir: str = "data"  # MS MARCO folder, relative to the repository; missing files are downloaded into it
    model_name: str = "distilbert-base-uncased"  # encoder to start from: hub name, folder or offline:<name>
    similarity: str = "cosine"  # cosine or dot (dot: no normalisation, like msmarco-distilbert-dot-v5)
    attn_implementation: str = "sdpa"  # attention kernels: sdpa, eager, or flash_attention_2 (GPU, if installed)
    compile_mode: str = ""  # torch.compile training: "" (off), default, reduce-overhead (CUDA graphs), max-autotune
    dropout: float = -1.0  # dropout probability of every layer while training (-1: the base model's own, 0.1 for BERT)
    max_seq_length: int = 300  # tokens per query or passage while training
    eval_max_seq_length: int = 0  # tokens per text when scoring: evaluation and the saved model (0: max_seq_length)
    negatives: str = "hard"  # hard: msmarco-hard-negatives filtered by CE score; triples: BM25 qidpidtriples
    ce_margin: float = 3.0  # keep a negative only if its CE score <= lowest positive CE score - margin
    negs_per_system: int = 5  # negatives kept per mining system and query
    systems: tuple[str, ...] = ()  # mining systems to use (empty: all in the file)
    max_triples: int = 20_000_000  # with negatives=triples: lines sampled uniformly from the whole qidpidtriples
    loss: str = "mnrl"  # mnrl, or cached_mnrl: GradCache, large batches in the memory of mini_batch_size
    mini_batch_size: int = 32  # with cached_mnrl: texts encoded at once
    scale: float = 0.0  # MNRL logit scale (1 / temperature); 0: 20 for cosine, 1 for dot (unnormalised: already logits)
    epochs: int = 10  # passes over the training queries
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    batch_size: int = 64  # queries per step: each brings a positive and a hard negative; larger is better for MNRL
    lr: float = 2e-5  # peak learning rate (AdamW)
    warmup_steps: int = 1000  # linear warm-up, in steps
    weight_decay: float = 0.01  # AdamW weight decay
    pad_multiple: int = -1  # pad batch chunks to a multiple of this (-1: 8 on a GPU, bounded shapes; 1 on a CPU)
    chunk_cost: int = -1  # padded tokens that one more forward pass is worth when a batch is cut (-1: by device)
    first_stage: str = ""  # TREC run (file, or folder of <split>.run) reranked; "": <data_dir>/runs/bm25 or BM25
    eval_queries: int = 500  # dev-tune queries reranked during training; as many dev-test queries in the final report
    eval_candidates: int = 100  # candidates per query, the top of first_stage or else of BM25 (0: all)
    report_splits: tuple[str, ...] = ("dl2019", "dl2020")  # TREC DL years reranked in the final report
    retrieval_k: int = 100  # depth of dense retrieval over the collection (Recall@k)
    retrieval_eval: bool = True  # dense retrieval of the dev-test queries over the whole collection, before and after
    retrieval_every_eval: bool = False  # ... and of the dev-tune queries at every eval step (a pass over 8.8M each)
    eval_steps: int = 10_000  # evaluate and save a checkpoint every this many steps
    logging_steps: int = 100  # log the training loss every this many steps
    save_total_limit: int = 2  # checkpoints kept on disk, the best and the newest among them (HF counts the best)
    report_to: str = "none"  # also log to tensorboard or wandb (the HF Trainer's report_to; needs that package)
    amp: bool = True  # mixed precision: bf16 on GPUs with native bf16 and CPUs with AMX, fp16 on older GPUs (V100, T4)
    seed: int = 12  # negative pairing, data order, dropout; the triples sample with negatives=triples
    resume: bool = True  # continue from the newest checkpoint of output/train_bi-encoder-v2
    output_dir: str = "output/train_bi-encoder-v2"  # relative to the repository


# --sample: the whole recipe on the bundled miniature, offline, on 2 CPU cores in under 5 minutes (dense retrieval
# over the 28k passages would take 12 of them on 2 AVX2 cores: --retrieval_eval=true adds it). Chosen on dev-tune
# (docs/sample-runs.md): in the sample the "cross-encoder" that filters negatives is the base model itself, so a
# margin of 0 already drops its false negatives. It trains on 96 tokens a text but scores, and is saved, with the
# base's own 256: at 96 the base itself loses 0.024 MRR@10 on dev-tune, so a model saved at 96 ranked below the base
# that a user already has. 3 epochs of 6 steps and a check every 9 keep the longer checks inside the 5 minutes.
SAMPLE = dict(data_dir="data/sample", model_name="offline:all-MiniLM-L6-v2", max_seq_length=96,
              eval_max_seq_length=256, ce_margin=0.0, epochs=3, batch_size=32, lr=2e-5, warmup_steps=2,
              eval_queries=60, eval_candidates=20, report_splits=("dl2020",),
              retrieval_eval=False, eval_steps=9, logging_steps=2)


def training_queries(data: MSMarco, cfg: Config) -> tuple[Grouped, Grouped]:
    """Positives and negatives of every training query (two Groupeds over the same qids), negatives in a
    shuffled order: the CE-margin filtered hard negatives (MSMarco.filtered_negatives: computed once per data
    folder and setting, memory-mapped; msmarco/hard_negatives.py has the filter itself). With
    negatives=triples: the distinct positives and negatives of each query of a seeded uniform sample of
    `max_triples` triples (MSMarco.triples: one pass over the whole file, once per size and seed)."""
    if cfg.negatives == "triples" and cfg.systems:
        raise SystemExit(f"error: --systems={','.join(cfg.systems)} picks mining systems of the hard negatives; the "
                         f"BM25 triples (--negatives=triples) have none: drop --systems, or use --negatives=hard")
    if cfg.negatives == "hard":
        positives, negatives = data.filtered_negatives(cfg.ce_margin, cfg.negs_per_system, cfg.systems)
    elif cfg.negatives == "triples":
        t = np.asarray(data.triples(cfg.max_triples, seed=cfg.seed), dtype=np.int64)
        groups = []
        for col in (1, 2):  # distinct (qid, pid) pairs, grouped by qid
            pairs = np.unique(t[:, [0, col]], axis=0)
            qids, starts = np.unique(pairs[:, 0], return_index=True)
            groups.append((qids, np.append(starts, len(pairs)), pairs[:, 1]))
        (qids, p_ptr, p_val), (_, n_ptr, n_val) = groups  # every triple has both: the same qids
        positives = Grouped.from_arrays(qids, p_ptr, p_val)
        negatives = Grouped.from_arrays(qids, n_ptr, shuffle_within_groups(n_ptr, n_val,
                                                                                 np.random.default_rng(cfg.seed)))
    else:
        raise SystemExit(f"error: --negatives must be hard or triples, not {cfg.negatives!r}")
    if not len(positives):  # the hard negatives' filter says so itself (MSMarco.filtered_negatives)
        raise SystemExit(f"error: the sample of {cfg.max_triples:,} triples holds no training query: check "
                         f"{data.path('qidpidtriples.train.full.2.tsv.gz')}")
    data.check_train_qids(positives.qids, "msmarco-hard-negatives.jsonl.gz" if cfg.negatives == "hard"
                          else "qidpidtriples.train.full.2.tsv.gz")  # now, not at the first batch after a baseline
    return positives, negatives


def rotation(positives: Grouped, negatives: Grouped, epochs: int, seed: int) -> np.ndarray:
    """(epoch, qid, positive, negative) rows, epoch by epoch: in epoch e a query takes its (offset + e)-th positive
    and negative (offsets drawn from the seed), so every epoch pairs it with the next ones, reproducibly."""
    qids = positives.qids
    off = np.random.default_rng(seed + 1).integers(0, 1 << 30, size=len(qids))
    pv, nv = np.asarray(positives.values), np.asarray(negatives.values)
    rows = [np.stack([np.full(len(qids), e), qids,
                      pv[positives.ptr[:-1] + (off + e) % positives.lengths],
                      nv[negatives.ptr[:-1] + (off + e) % negatives.lengths]], 1) for e in range(epochs)]
    return np.concatenate(rows).astype(np.int64)


class EpochBlockSampler(SeededBatchSampler):
    """Batches of one epoch's rows only (rows are laid out epoch by epoch), shuffled by seed + epoch, with no
    passage and no query twice in a step (a repeated passage would be a false in-batch negative). Under torchrun
    a step's batches on all processes are negatives for each other (gather_across_devices), so the rule holds for
    the global batch: `world` consecutive batches, of which accelerate hands process r the r-th."""

    def __init__(self, dataset, *args, rows_per_epoch: int, world: int | None = None, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.rows_per_epoch, self.blocks = rows_per_epoch, max(1, len(dataset) // rows_per_epoch)
        self.world = world or process_group()[1]
        cols = {c: dataset.data.table.column(c).to_numpy() for c in ("qid", "pos", "neg")}
        self.ids = np.stack([-1 - cols["qid"].astype(np.int64), cols["pos"], cols["neg"]], 1)  # queries < 0

    def __iter__(self):
        """Exactly len(self) batches, every epoch: the Trainer counts an epoch's steps once, and a short count
        would leave max_steps (the final evaluation and save) unreached. Rows that clash near the end of an epoch
        could make an extra short batch: one that is not allowed to be short is topped up with other rows of the
        epoch (a few rows twice, rather than a batch short under DDP, where every process's batch has one size)."""
        lo = (self.epoch % self.blocks) * self.rows_per_epoch  # epochs past the rotation's repeat it
        order = lo + np.random.default_rng([self.seed, self.epoch]).permutation(self.rows_per_epoch)
        size, steps = self.batch_size * self.world, len(self) // self.world
        batches = no_duplicate_batches(order, self.ids, size, drop_last=False)  # >= steps global batches
        for i, batch in enumerate(itertools.islice(batches, steps)):
            if len(batch) < size and (self.drop_last or self.world > 1 or i < steps - 1):
                batch = top_up(batch, order, self.ids, size)
            for r in range(self.world):  # process r's share of the step
                yield batch[r * self.batch_size:(r + 1) * self.batch_size]

    def __len__(self) -> int:
        """Batches of an epoch, all processes' together (under torchrun always whole steps: the Trainer drops a
        last partial batch there)."""
        size = self.batch_size * self.world
        steps = self.rows_per_epoch // size if self.drop_last or self.world > 1 else -(-self.rows_per_epoch // size)
        return steps * self.world


def training_triplets(rows: np.ndarray) -> Dataset:
    """(qid, positive, negative) ids per row; token ids are looked up when a batch is built (TextBatches)."""
    return id_dataset({"qid": rows[:, 1], "pos": rows[:, 2], "neg": rows[:, 3]}, "bi-triplets")


def rotation_epochs(cfg: Config, n_queries: int, world: int) -> int:
    """Epochs the rotation must cover: cfg.epochs, or more when --max_steps outruns them (the Trainer then goes on
    past the configured epochs)."""
    if cfg.max_steps < 0:
        return cfg.epochs
    steps_per_epoch = max(1, n_queries // (cfg.batch_size * world))
    return max(cfg.epochs, -(-cfg.max_steps // steps_per_epoch) + 1)


def loss_scale(cfg: Config) -> float:
    """MNRL's scale: the published 20 on cosines (in [-1, 1]); 1 on the dot products of unnormalised embeddings,
    whose size (MiniLM's mean-pooled norms are 5-7, so dot products reach hundreds) is already a logit's: x 20 would
    saturate the softmax, each query's loss about 0 or huge (sentence-transformers' MNRL docs say so too)."""
    return cfg.scale or (20.0 if cfg.similarity == "cosine" else 1.0)


def main(cfg: Config) -> dict:
    if cfg.similarity not in ("cosine", "dot") or cfg.loss not in ("mnrl", "cached_mnrl"):
        raise SystemExit(f"error: --similarity must be cosine or dot (got {cfg.similarity!r}); --loss mnrl or "
                         f"cached_mnrl (got {cfg.loss!r})")
    out = resolve_dir(cfg.output_dir)
    checkpoint = resume_point(cfg, out)  # checks output/<script>/; start_run (stage 4) changes it
    data = MSMarco(cfg.data_dir)

    # 1. Data: filtered hard negatives and their per-epoch rotation (ids); evaluation sets: dev-tune queries choose
    #    the checkpoint, dev-test and TREC DL queries give the final figures. Under torchrun the main process
    #    prepares the stores first; the others then open them.
    with main_process_first():
        positives, negatives = training_queries(data, cfg)
        rows = rotation(positives, negatives, rotation_epochs(cfg, len(positives), process_group()[1]), cfg.seed)
        train = training_triplets(rows)
        tune, reports = evaluation_sets(data, cfg)
    print(f"{len(positives):,} training queries with {len(negatives.values):,} negatives kept; evaluation: "
          + ", ".join(f"{s.name} {len(s.qids)}" for s in [tune, *reports]))

    # 2. Model: transformer + mean pooling; cosine or dot similarity; dropout as the base model has it, or --dropout.
    #    Its max_seq_length is what it scores with, here and once saved; training batches are cut at max_seq_length.
    torch.manual_seed(cfg.seed)
    with loading(cfg.model_name):  # offline or misspelt: a message and exit code 1
        transformer = Transformer(resolve_model(cfg.model_name),
                                  max_seq_length=cfg.eval_max_seq_length or cfg.max_seq_length,
                                  model_kwargs={"attn_implementation": cfg.attn_implementation})
    freeze_unused_pooler(transformer)  # mean pooling skips a BERT pooler; DDP must not wait for its gradients
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                similarity_fn_name=cfg.similarity)
    set_dropout(model, cfg.dropout)

    # 3. Loss: in-batch negatives plus one hard negative per query, fed batches of token ids (each chunk of
    #    queries or passages padded to its own longest text); under torchrun the batches of all devices serve as
    #    negatives for each other (gather_across_devices). cached_mnrl takes plain padded columns.
    batches = TextBatches(data, model.tokenizer, batch_shape(cfg.max_seq_length, cfg.pad_multiple, cfg.chunk_cost),
                          chunked=cfg.loss == "mnrl")
    common = dict(scale=loss_scale(cfg), similarity_fct=model.similarity, gather_across_devices=process_group()[1] > 1)
    loss = (on_token_batches(MultipleNegativesRankingLoss(model, **common)) if cfg.loss == "mnrl" else
            CachedMultipleNegativesRankingLoss(model, mini_batch_size=cfg.mini_batch_size, **common))

    # 4. Evaluation before training: the first stage's order and the untrained model, reranking every set; dense
    #    retrieval of the dev-test queries from the whole collection.
    rerank = RerankEvaluator(tune, bi_encoder_run)
    retrieval = RetrievalEvaluator(reports[0], data.collection(), k=cfg.retrieval_k, amp=cfg.amp) \
        if cfg.retrieval_eval else None
    start_run(cfg, out, checkpoint)  # only now: a value that failed above left the folder's last run whole
    baselines = baseline_metrics(out, lambda: {
        **rerank_table([tune, *reports], bi_encoder_run, {"untrained": model}),
        **({"retrieval": {"untrained": retrieval.metrics(model)}} if cfg.retrieval_eval else {})}, tune.name)

    # 5. Trainer: HF Trainer machinery (checkpoints, resume, best model by dev-tune MRR@10, DDP under torchrun).
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, **precision_args(cfg.amp), **compile_args(cfg.compile_mode),
        seed=cfg.seed, batch_sampler=partial(EpochBlockSampler, rows_per_epoch=len(positives)),
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit, load_best_model_at_end=True,
        metric_for_best_model=f"eval_{rerank.name}_MRR@10", logging_steps=cfg.logging_steps,
        report_to=cfg.report_to, ddp_find_unused_parameters=False)
    during = [rerank, RetrievalEvaluator(tune, data.collection(), k=cfg.retrieval_k, amp=cfg.amp)] \
        if cfg.retrieval_every_eval else rerank
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, evaluator=during,
                                         data_collator=batches,
                                         callbacks=[metric_history(out / "metrics.jsonl"), SamplerEpoch()])
    train_from(trainer, checkpoint)  # trainer.train(resume_from_checkpoint=...), minus a step past --max_steps

    # 6. Save the best model where stock SentenceTransformer(path) loads it, and evaluate that saved model.
    trained = SentenceTransformer(str(save_model(trainer, model, out)))
    results = {**merge(baselines, rerank_table(reports, bi_encoder_run, {"trained": trained}, first_stage=False),
                       {"retrieval": {"trained": retrieval.metrics(trained)}} if cfg.retrieval_eval else {}),
               "first_stage": {s.name: s.first_stage for s in [tune, *reports]},
               "training_queries": len(positives), "data_dir": str(data.dir)}
    report(trainer, out, results, "Reranking held-out queries (dev-tune chose the checkpoint; the others decided "
                                  "nothing)" + (f"; retrieval: {reports[0].name} from {len(data.collection()):,} "
                                                "passages" if cfg.retrieval_eval else ""))
    return results


if __name__ == "__main__":
    with user_errors():
        main(script_config(Config(), SAMPLE))
