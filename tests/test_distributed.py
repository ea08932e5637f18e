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


def _torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# 179 training queries, 7 batches of 24 an epoch, dealt to two processes: 3 steps an epoch (the odd batch is
# dropped); checkpoints at 4 (inside epoch 1) and 5, the last step. 4 tokens a text, in training and scoring:
# retrieval encodes the whole collection (~30 s a pass here), before and after training, as the full-scale defaults
# do; the resumed run below retrieves at its checkpoint too (--retrieval_every_eval).
TORCHRUN = ["--sample", "--max_steps=5", "--eval_steps=4", "--eval_queries=6", "--eval_candidates=6",
            "--batch_size=24", "--logging_steps=1", "--max_seq_length=4", "--eval_max_seq_length=4", "--retrieval_k=20",
            "--report_splits=", "--retrieval_eval=true", "--save_total_limit=5"]


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "out"
    proc = _torchrun("train_bi-encoder-v2.py", [*TORCHRUN, f"--output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_torchrun_two_processes_train_evaluate_and_save_one_model(torchrun_out):
    """The README's torchrun command with two CPU processes and a tiny budget: one data preparation, one
    history, one model; in-batch negatives gathered across both processes; retrieval from the whole sample
    collection before and after training, split between them."""
    out, proc = torchrun_out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4, 5]  # logged once, by the main process
    assert [r["step"] for r in history if "eval_dev-tune_MRR@10" in r] == [0, 4, 5]  # 0: the untrained model
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (4, 5)]
    assert (out / "model" / "config.json").exists() and not (out / "model.tmp").exists()
    res = json.loads((out / "results.json").read_text())
    assert {"first_stage", "untrained", "trained"} == set(res["dev-test"]) and set(res["retrieval"]) == {"untrained",
                                                                                                     "trained"}
    assert proc.stdout.count("Reranking held-out queries") == 1  # one report
    assert json.loads((out / "config.json").read_text())["batch_size"] == 24
    # the baselines were computed across both processes; one process alone gets the same numbers
    from sentence_transformers import SentenceTransformer
    data = MSMarco(paths.SAMPLE_DIR)
    dev = evaluation.load_rerank_set(data, "dev-test", 6, 6, "data/sample/runs/bm25")  # the scripts draw with seed 0
    trained = SentenceTransformer(str(out / "model"))
    assert evaluation.RerankEvaluator(dev, evaluation.bi_encoder_run).metrics(trained) == \
        pytest.approx(res["dev-test"]["trained"])


def test_two_processes_resumed_inside_an_epoch_replay_that_epoch(torchrun_out, tmp_path):
    """The same two-process run cut one step into epoch 1 (after checkpoint-4) and resumed: the resumed epoch draws
    epoch 1's batches again (it drew epoch 0's: the Trainer's set_epoch did not reach a sampler wrapped for skipping
    under DDP), so the weights at the last step equal those of the uncut run. It retrieves from the collection at
    its checkpoint as well (--retrieval_every_eval), with the trainer's other evaluator."""
    from safetensors.torch import load_file
    out, _ = torchrun_out
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-5")
    shutil.rmtree(cut / "model")
    state = json.loads((cut / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2
    proc = _torchrun("train_bi-encoder-v2.py", [*TORCHRUN, "--retrieval_every_eval=true", "--retrieval_eval=false",
                                                f"--output_dir={cut}"])  # retrieval at step 5, split between both
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stderr[-4000:]
    history = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "eval_dev-tune_retrieval_R@20" in r] == [5]
    a, b = (load_file(str(run / "checkpoints" / "checkpoint-5" / "model.safetensors")) for run in (out, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
