"""Multi-process runs, as under `torchrun --nproc_per_node=N` on N GPUs, here on CPU processes (gloo backend)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT
from msmarco import distributed, evaluation, paths
from msmarco.data import MSMarco


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        squares = distributed.split_work(lambda xs: [x * x for x in xs], list(range(11)))
        with distributed.main_process_first():  # the main process writes first, the others then see its file
            marker = os.path.join(out_dir, "first")
            seen = os.path.exists(marker)
            if distributed.is_main_process():
                open(marker, "w").write("0")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"squares": squares, "saw_main_first": seen, "group": distributed.process_group()}, f)
    finally:
        dist.destroy_process_group()


def test_work_is_split_and_gathered_in_order_and_the_main_process_goes_first(tmp_path):
    mp.spawn(_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["squares"] == [x * x for x in range(11)] for r in res)  # every process gets the whole result
    assert [r["saw_main_first"] for r in res] == [False, True, True]
    assert [r["group"] for r in res] == [[0, 3], [1, 3], [2, 3]]
    assert distributed.process_group() == (0, 1) and distributed.split_work(lambda xs: xs, [1, 2]) == [1, 2]  # alone: no-ops


def test_torchrun_two_processes_train_evaluate_and_save_one_model(tmp_path):
    """The README's torchrun command with two CPU processes and a tiny budget: one data preparation, one
    history, one model; in-batch negatives gathered across both processes; retrieval from the whole sample
    collection before, during and after training, split between them."""
    out = tmp_path / "out"
    args = ["--sample", "--max_steps=4", "--eval_steps=2", "--eval_queries=6", "--eval_candidates=6",
            "--batch_size=4", "--logging_steps=1", "--max_seq_length=8", "--retrieval_k=20",
            "--retrieval_eval=true", "--retrieval_every_eval=true", f"--output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_bi-encoder-v2.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]  # logged once, by the main process
    assert [r["step"] for r in history if "eval_dev_MRR@10" in r] == [2, 4]
    assert [r["step"] for r in history if "eval_dev_retrieval_R@20" in r] == [2, 4]  # retrieval at eval steps too
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "model" / "config.json").exists() and not (out / "model.tmp").exists()
    res = json.loads((out / "results.json").read_text())
    assert {"bm25", "untrained", "trained", "untrained_retrieval", "trained_retrieval"} <= set(res)
    assert proc.stdout.count("held-out dev queries: reranking") == 1  # one report
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    # the baselines were computed across both processes; one process alone gets the same numbers
    from sentence_transformers import SentenceTransformer
    data = MSMarco(paths.SAMPLE_DIR)
    dev = evaluation.load_rerank_set(data, "dev", 6, 6, seed=12)
    trained = SentenceTransformer(str(out / "model"))
    assert evaluation.RerankEvaluator(dev, evaluation.bi_encoder_run).metrics(trained) == pytest.approx(res["trained"])
