"""The README's sample commands, run as a user would (a subprocess each), and what they must show.

These are the slow tests (a few minutes each on 2 CPU cores): each trains on the bundled sample and
its held-out dev queries decide whether training helped."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def readme_sample_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"^python (train_[\w-]+\.py) --sample\b", text, flags=re.M)))


def run_sample(script: str, out) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, "--sample", f"--output_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out dev queries" in proc.stdout and "bm25" in proc.stdout and "trained" in proc.stdout
    return json.loads((out / "results.json").read_text())


def test_readme_names_every_script_sample_command():
    assert readme_sample_commands() == ["train_bi-encoder-v2.py", "train_cross-encoder-v1.py",
                                        "train_cross-encoder-v2.py"]


@pytest.mark.parametrize("script", ["train_cross-encoder-v1.py", "train_cross-encoder-v2.py"])
def test_cross_encoder_sample_run_clearly_beats_the_untrained_model(script, tmp_path):
    res = run_sample(script, tmp_path / "out")
    assert res["trained"]["MRR@10"] > res["untrained"]["MRR@10"] + 0.1
    assert res["trained"]["nDCG@10"] > res["untrained"]["nDCG@10"] + 0.1
    # should also beat the BM25 order; allow a little noise on 100 queries, but not a clear loss
    assert res["trained"]["nDCG@10"] > res["bm25"]["nDCG@10"] - 0.03


def test_bi_encoder_sample_run_does_not_end_worse_than_the_base_model(tmp_path):
    res = run_sample("train_bi-encoder-v2.py", tmp_path / "out")
    assert res["trained"]["MRR@10"] >= res["untrained"]["MRR@10"] - 0.01
    assert res["trained_retrieval"]["MRR@10"] >= res["untrained_retrieval"]["MRR@10"] - 0.01
    assert res["trained"]["MRR@10"] > res["bm25"]["MRR@10"]
