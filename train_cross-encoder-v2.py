"""Distil a small, fast cross-encoder from a teacher ensemble's logits on MS MARCO (recipe v2).

Hofstätter et al. (arXiv 2010.02666) scored ~40M (query, positive, negative) training triples with an
ensemble of three large BERT-CAT cross-encoders; their file has lines `pos_score neg_score qid pid_pos pid_neg`.
Each line gives two samples, (query, positive, pos_score) and (query, negative, neg_score), and a small
CrossEncoder learns the teacher's raw logits with MSE (no sigmoid); `--loss=margin_mse` instead fits the
pos-neg difference (MarginMSE). Lines are read from a memory-mapped store and turned into text only when a
batch is built: the 40M lines and their texts are never held in memory.

Training batches are built from token ids (tokenized once per tokenizer), grouped by length and padded for real
tokens (msmarco/batching.py); the losses are the stock MSELoss / MarginMSELoss. While training it reranks held-out
dev-small queries ("dev-tune") and keeps the best checkpoint by MRR@10; the final figures come from queries that
chose nothing: other dev-small queries ("dev-test") and TREC DL, each beside the first stage's own order (a BM25
run: --first_stage, the data folder's runs/bm25, else msmarco/bm25.py's ranking of the official candidates). It also
reports how closely the student tracks the teacher (Pearson and Spearman correlation on teacher lines of held-out
training queries). Expected at full scale (one GPU, MiniLM-L12, one epoch): about 0.39 MRR@10 reranking the
dev-small BM25 top-1000, the published result of this family, at 18x the speed of the teacher models (`python
evaluate.py --model=output/train_cross-encoder-v2/model` measures that; the script's own results.json reranks BM25's
top --eval_candidates of --eval_queries dev queries). In data/sample the "teacher" scores are all-MiniLM-L6-v2
cosine x 20, not the BERT-CAT ensemble (see data/sample/README.md).

Commands:
    python train_cross-encoder-v2.py --sample          # bundled sample, offline base model, 2 CPU cores, < 5 min
    python train_cross-encoder-v2.py                   # full data (downloads ~4.2 GB into data/), one GPU
    python train_cross-encoder-v2.py --loss=margin_mse --lr=1e-5   # any config field as --key=value
    python train_cross-encoder-v2.py --help            # every config field with the value a run would use
    torchrun --nproc_per_node=8 train_cross-encoder-v2.py   # 8 GPUs (DDP); README, "Train on several GPUs"
Outputs: output/train_cross-encoder-v2/ (model/, checkpoints/, config.json, metrics.jsonl, metrics.png,
results.json). Rerunning the same command resumes from the newest checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import MarginMSELoss, MSELoss

from msmarco.batching import PairBatches, batch_shape, on_token_batches
from msmarco.config import script_config
from msmarco.data import MSMarco, TeacherSamples, distinct_ids, id_dataset
from msmarco.distributed import is_main_process, main_process_first, split_work
from msmarco.errors import user_errors
from msmarco.evaluation import RerankEvaluator, cross_encoder_run, evaluation_sets, rerank_table
from msmarco.models import compile_args, cross_encoder, head_bias, precision_args
from msmarco.paths import resolve_dir
from msmarco.run import (baseline_metrics, merge, metric_history, report, resume_point, save_model, start_run,
                         teacher_description, train_from)
from msmarco.sampling import SamplerEpoch, length_grouped_batches


@dataclass
class Config:
    sample: bool = False  # run on data/sample with the offline base model and a CPU budget (see SAMPLE)
    data_dir: str = "data"  # MS MARCO folder, relative to the repository; missing files are downloaded into it
    model_name: str = "microsoft/MiniLM-L12-H384-uncased"  # student to start from: hub name, folder or offline:<name>
    loss: str = "mse"  # mse: each (query, passage) logit to the teacher's; margin_mse: the pos-neg difference
    pooling: str = "cls"  # head input: cls ([CLS] + pooler, as BertForSequenceClassification) or mean (token states)
    attn_implementation: str = "sdpa"  # attention kernels: sdpa, eager, or flash_attention_2 (GPU, if installed)
    compile_mode: str = ""  # torch.compile training: "" (off), default, reduce-overhead (CUDA graphs), max-autotune
    dropout: float = -1.0  # dropout probability of every layer while training (-1: the base model's own, 0.1 for BERT)
    freeze_embeddings: bool = False  # train without the embedding layer (half of MiniLM's weights; 7% faster CPU steps)
    max_length: int = 512  # tokens of query + passage
    max_lines: int = -1  # teacher lines to train on (-1: all ~40M)
    heldout_queries: int = 1000  # training queries whose teacher lines are held out to measure student-teacher fit
    epochs: int = 1  # passes over the teacher lines
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    batch_size: int = 32  # samples per step (lines per step with margin_mse)
    lr: float = 7e-6  # peak learning rate (AdamW)
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
    seed: int = 12  # data order, head initialisation
    resume: bool = True  # continue from the newest checkpoint of output/train_cross-encoder-v2
    output_dir: str = "output/train_cross-encoder-v2"  # relative to the repository


# --sample: the whole recipe on the bundled miniature, offline, on 2 CPU cores in under 5 minutes (a head on the
# mean token state of the sentence-embedding base, as in train_cross-encoder-v1.py). Compute-bound like v1: 64 tokens
# a pair buy 2,100 teacher lines where 128 took 1,200; on dev-tune 64 beat 128, 80 and 48. Dropout off: faster
# steps, a tie on dev-tune over 3 seeds; the time it saved buys 2,700 lines, +0.027 on dev-tune. The embedding layer
# frozen: 7% faster CPU steps, a tie on dev-tune over 3 seeds (-0.009 MRR@10; docs/sample-runs.md).
SAMPLE = dict(data_dir="data/sample", model_name="offline:all-MiniLM-L6-v2", pooling="mean", max_length=64,
              dropout=0.0, freeze_embeddings=True, max_lines=2_700, heldout_queries=18, batch_size=16, lr=5e-5,
              warmup_steps=15,
              eval_queries=60, eval_candidates=20, report_splits=("dl2020",),
              eval_steps=1_000, logging_steps=10)


def teacher_split(data: MSMarco, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of teacher lines to train on and to hold out (all lines of `heldout_queries` random training queries)."""
    teacher = data.teacher_scores()
    n = len(teacher) if cfg.max_lines < 0 else min(cfg.max_lines, len(teacher))
    qids = np.ascontiguousarray(teacher["qid"][:n])  # one pass over the strided records, then fast passes
    rng = np.random.default_rng(cfg.seed)
    uniq = distinct_ids(qids)
    held = np.zeros(int(uniq[-1]) + 1, dtype=bool)  # held[qid]: one pass over the 40M lines, no sort
    n_held = min(cfg.heldout_queries, len(uniq) // 10)  # at most a tenth of the queries: the rest train
    if n_held < cfg.heldout_queries:
        print(f"note: {n_held} held-out queries, not {cfg.heldout_queries}: at most a tenth of the {len(uniq):,} "
              f"training queries in the lines used")
    held[rng.choice(uniq, size=n_held, replace=False)] = True
    is_held = held[qids]
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)  # int64 line numbers


def training_samples(data: MSMarco, lines: np.ndarray, loss: str) -> Dataset:
    """mse: two rows per teacher line, (query, passage, score) for its positive then its negative;
    margin_mse: one row per line, (query, positive, negative, pos_score - neg_score). Rows are line numbers; token
    ids are looked up per batch (PairBatches with TeacherSamples)."""
    # fail now, not mid-run, on an unknown query: every query of the lines' span (the held-out ones too)
    data.check_train_qids(data.teacher_scores()["qid"][:int(lines[-1]) + 1] if len(lines) else [],
                          "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv")

    if loss == "mse":  # 2 * line and 2 * line + 1, interleaved, written in place (80M rows: 320 MB, no temporaries)
        rows = np.empty(2 * len(lines), np.int32)
        np.multiply(lines, 2, out=rows[0::2], casting="unsafe")
        np.add(rows[0::2], 1, out=rows[1::2])
    else:
        rows = lines.astype(np.int32)
    return id_dataset({"row": rows}, f"ce-v2-{loss}")


def teacher_fit(model: CrossEncoder, data: MSMarco, lines: np.ndarray, max_pairs: int = 2000) -> dict:
    """Pearson and Spearman correlation of the student's logits with the teacher's on held-out lines."""
    rec = data.teacher_scores()[lines[:max_pairs // 2]]
    queries, collection = data.queries("train"), data.collection()
    q = [queries[int(x)] for x in rec["qid"]] * 2
    p = collection.get_many(rec["pid_pos"]) + collection.get_many(rec["pid_neg"])
    teacher = np.concatenate([rec["pos_score"], rec["neg_score"]]).astype(np.float64)
    student = np.asarray(split_work(  # the pairs split across the processes of a multi-GPU run
        lambda part: model.predict(part, batch_size=64, show_progress_bar=False,
                                   activation_fn=torch.nn.Identity()).tolist(), list(zip(q, p))), dtype=np.float64)
    ranks = lambda x: np.argsort(np.argsort(x))
    return {"pearson": float(np.corrcoef(student, teacher)[0, 1]),
            "spearman": float(np.corrcoef(ranks(student), ranks(teacher))[0, 1]), "pairs": len(teacher)}


def main(cfg: Config) -> dict:
    if cfg.loss not in ("mse", "margin_mse"):
        raise SystemExit(f"error: --loss must be mse or margin_mse, not {cfg.loss!r}")
    out = resolve_dir(cfg.output_dir)
    checkpoint = resume_point(cfg, out)  # checks output/<script>/; start_run (stage 4) changes it
    data = MSMarco(cfg.data_dir)

    # 1. Data: teacher lines (ids), held-out teacher lines; evaluation sets: dev-tune queries choose the checkpoint,
    #    dev-test and TREC DL queries give the final figures. Under torchrun the main process prepares the stores.
    with main_process_first():
        train_lines, held_lines = teacher_split(data, cfg)
        train = training_samples(data, train_lines, cfg.loss)
        tune, reports = evaluation_sets(data, cfg)
    print(f"{len(train):,} training samples from {len(train_lines):,} teacher lines; {len(held_lines):,} held-out "
          f"teacher lines; evaluation: " + ", ".join(f"{s.name} {len(s.qids)}" for s in [tune, *reports]))

    # 2. Model: the student, one raw logit per (query, passage) on [CLS] or on the mean token state; predict()
    #    returns it unsquashed, like the teacher's. The head's bias starts at the teacher's mean score (about 10 in
    #    the sample): Adam moves a bias by ~lr per step, so MSE would otherwise spend its whole run on that offset.
    torch.manual_seed(cfg.seed)
    model = cross_encoder(cfg.model_name, cfg.max_length, cfg.pooling, activation=torch.nn.Identity(),
                          attn=cfg.attn_implementation, dropout=cfg.dropout,
                          freeze_embeddings=cfg.freeze_embeddings)
    spread = data.teacher_scores()[train_lines[::max(1, len(train_lines) // 1_000_000)]]  # ~1M lines: mean +-0.005
    head_bias(model).fill_(float(spread["pos_score"].mean() + spread["neg_score"].mean()) / 2
                           if cfg.loss == "mse" else 0.0)

    # 3. Loss: MSE on the raw logit, or MarginMSE on the pos-neg difference, fed batches of token ids: pairs of
    #    similar lengths, each chunk padded to its own longest pair.
    batches = PairBatches(data, model.tokenizer, batch_shape(cfg.max_length, cfg.pad_multiple, cfg.chunk_cost),
                          resolve=TeacherSamples(data, margin=cfg.loss == "margin_mse"))
    loss = on_token_batches(MSELoss(model) if cfg.loss == "mse" else MarginMSELoss(model))

    # 4. Evaluation before training: the first stage's order everywhere, the untrained student on dev-tune.
    evaluator = RerankEvaluator(tune, cross_encoder_run)
    start_run(cfg, out, checkpoint)  # only now: a value that failed above left the folder's last run whole
    baselines = baseline_metrics(out, lambda: {**rerank_table([tune], cross_encoder_run, {"untrained": model}),
                                               **rerank_table(reports, cross_encoder_run, {}),
                                               "untrained_fit": teacher_fit(model, data, held_lines)}, tune.name)

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

    # 6. Save the best student where stock CrossEncoder(path) loads it; evaluate that saved model (ranking and
    #    teacher fit).
    student = CrossEncoder(str(save_model(trainer, model, out)))
    results = {**merge(baselines, rerank_table(reports, cross_encoder_run, {"trained": student}, first_stage=False)),
               "trained_fit": teacher_fit(student, data, held_lines),
               "first_stage": {s.name: s.first_stage for s in [tune, *reports]}, "data_dir": str(data.dir),
               "teacher": teacher_description(data.dir)}
    report(trainer, out, results, f"Reranking held-out queries (dev-tune chose the checkpoint; the others decided "
                                  f"nothing); teacher: {results['teacher']}")
    before, after = results["untrained_fit"], results["trained_fit"]
    if is_main_process():
        print(f"student vs teacher on {after['pairs']} held-out pairs: Pearson {before['pearson']:.3f} -> "
              f"{after['pearson']:.3f}, Spearman {before['spearman']:.3f} -> {after['spearman']:.3f}")
    return results


if __name__ == "__main__":
    with user_errors():
        main(script_config(Config(), SAMPLE))
