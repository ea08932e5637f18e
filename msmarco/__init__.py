"""MS MARCO passage-ranking plumbing shared by the training scripts and evaluate.py, one concern per module.

    paths.py         where things live: the repository, data/, data/sample/, output/; relative paths; file locks;
                     atomic, fsynced writes; a full disk told apart from a bug
    errors.py        errors a user can fix (bad data, failed downloads, bad options) and how a script exits on them
    sources.py       the table of every file the recipes use (today's URLs, sizes, md5); the verified, resumable
                     download
    formats.py       streaming parsers of the raw formats (tsv, tar.gz members, qrels, numeric rows), mojibake repair
    score_pickle.py  the restricted, streaming reader of the cross-encoder score pickle
    stores.py        memory-mapped stores built once per data folder: texts, grouped ids, scores, numeric rows
    hard_negatives.py  the store of msmarco-hard-negatives.jsonl.gz (positives and per-system negatives per query)
    data.py          MSMarco: one data folder as the scripts see it (fetch, prepare once, open); id datasets
    tokens.py        token ids of the collection and queries, stored once per tokenizer and length
    batching.py      training batches built from token ids: sorted by length, cut into chunks padded to their own
                     longest member
    config.py        `--key=value` overrides of a script's Config dataclass, and the --sample preset
    models.py        base models (hub, folder, offline), the cross-encoder head, mixed precision (bf16 / fp16 / fp32)
    sampling.py      batch samplers: seeded permutations in bounded memory, reshuffled per epoch
    distributed.py   torchrun / accelerate launch: process group, main process first, work split across processes
    run.py           a script run's output folder: start or resume, metric history and plot, atomic save, report
    metrics.py       MRR@10, nDCG@10, recall exactly as trec_eval; TREC run files
    bm25.py          a BM25 ranking of the official candidate files, which list each query's candidates in no order
    evaluation.py    reranking and dense-retrieval evaluation of models, and the evaluators the trainers call
"""
