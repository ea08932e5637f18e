"""Multi-process runs, as under `torchrun --nproc_per_node=N` on N GPUs, here on CPU processes (gloo backend)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
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
            "--batch_size=4", "--logging_steps=1", "--max_seq_length=8", "--retrieval_k=20", "--report_splits=",
            "--retrieval_eval=true", "--retrieval_every_eval=true", f"--output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_bi-encoder-v2.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]  # logged once, by the main process
    assert [r["step"] for r in history if "eval_dev-tune_MRR@10" in r] == [0, 2, 4]  # 0: the untrained model
    assert [r["step"] for r in history if "eval_dev-tune_retrieval_R@20" in r] == [2, 4]  # retrieval at eval steps
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "model" / "config.json").exists() and not (out / "model.tmp").exists()
    res = json.loads((out / "results.json").read_text())
    assert {"first_stage", "untrained", "trained"} == set(res["dev-test"]) and set(res["retrieval"]) == {"untrained",
                                                                                                     "trained"}
    assert proc.stdout.count("held-out dev queries: reranking") == 1  # one report
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    # the baselines were computed across both processes; one process alone gets the same numbers
    from sentence_transformers import SentenceTransformer
    data = MSMarco(paths.SAMPLE_DIR)
    dev = evaluation.load_rerank_set(data, "dev-test", 6, 6, "data/sample/runs/bm25", seed=12)
    trained = SentenceTransformer(str(out / "model"))
    assert evaluation.RerankEvaluator(dev, evaluation.bi_encoder_run).metrics(trained) == \
        pytest.approx(res["dev-test"]["trained"])


def _torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_two_processes_resumed_inside_an_epoch_replay_that_epoch(tmp_path):
    """Two processes cut one step into epoch 1 and resumed: the resumed epoch draws epoch 1's batches again (it used
    to draw epoch 0's: the Trainer's set_epoch did not reach a sampler wrapped for skipping under DDP), so the
    weights at the last step equal those of the uncut run."""
    from safetensors.torch import load_file
    tiny = ["--sample", "--max_pairs=40", "--max_steps=8", "--eval_steps=3", "--save_total_limit=5",
            "--eval_queries=4", "--eval_candidates=4", "--report_splits=", "--batch_size=4", "--max_length=32",
            "--logging_steps=1"]  # 40 pairs / (2 x 4): 5 steps an epoch; checkpoints at 3, 6 (epoch 1) and 8
    for name in ("full", "cut"):
        proc = _torchrun("train_cross-encoder-v1.py", [*tiny, f"--output_dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-8")
    proc = _torchrun("train_cross-encoder-v1.py", [*tiny, f"--output_dir={tmp_path / 'cut'}"])
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stderr[-4000:]
    state = json.loads((tmp_path / "cut" / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2
    a, b = (load_file(str(tmp_path / run / "checkpoints" / "checkpoint-8" / "model.safetensors")) for run in
            ("full", "cut"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
