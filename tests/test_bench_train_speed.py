"""benchmarks/bench_train_speed.py with a tiny budget: each recipe in a fresh process of its own, and two rounds of
both configurations in reversed orders, whose figures the JSON combines."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_recipes_run_isolated_in_rounds(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train_speed.py", "--recipes=v1,v2", "--preset=sample",
                           "--device=cpu", "--steps=1", "--warmup=0", "--max_length=32", "--batch_size=4",
                           "--pipeline_batches=2", "--rounds=2", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["recipe"] for r in runs] == ["v1", "v2"]
    assert len({r["pid"] for r in runs}) == 2 and os.getpid() not in {r["pid"] for r in runs}
    for r in runs:
        assert r["stock"]["rounds"] == r["project"]["rounds"] == 2 and r["project"]["steps"] == 2
        assert len(r["round_ratios"]) == 2 and all(x > 0 for x in r["round_ratios"])
        assert r["ratio"] > 0 and r["max_length"] == 32 and r["batch_size"] == 4
        assert 1 <= r["project"]["padded_per_real"] <= r["stock"]["padded_per_real"]


def test_samples_are_the_rows_trained_not_steps_times_batch(tmp_path):
    """The bi-encoder's batches are drawn from one epoch of its training queries (180 in the sample), so at batch 256
    a step trains on fewer rows than the batch size: samples/s counts the rows each timed step took."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train_speed.py", "--recipes=bi", "--preset=sample",
                           "--device=cpu", "--steps=1", "--warmup=0", "--max_length=8", "--batch_size=256",
                           "--pipeline_batches=1", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    for config in ("stock", "project"):
        r = run[config]
        assert r["steps"] == 1 and 100 < r["samples"] < 256, (config, r["samples"])
