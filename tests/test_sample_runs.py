"""The README's sample commands, run as a user would (a subprocess each), and what they must show.

These are the slow tests (a few minutes each on 2 CPU cores). Each trains on the bundled sample; dev-tune chose its
preset and checkpoint, so only queries that decided nothing judge it: dev-test (other dev-small queries, BM25 top 20
reranked) and TREC DL 2020 (graded, BM25 top 20 reranked). The margins asserted are what the runs reach on every one
of 3 seeds (docs/sample-runs.md), less a little: the noise was measured, not hoped.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# script -> (the baseline row: BM25's order or the untrained base, {(set, metric): least margin over it}). Each
# margin is the lowest of 3 seeds' (docs/sample-runs.md) less 0.02, rounded down: a negative one is a known shortfall,
# kept as a guard against regressions, not a claim.
MARGINS = {"train_cross-encoder-v1.py": ("first_stage", {("dev-test", "MRR@10"): 0.08, ("dev-test", "nDCG@10"): 0.08,
                                                         ("dl2020", "MRR@10"): 0.01, ("dl2020", "nDCG@10"): 0.00}),
           "train_cross-encoder-v2.py": ("first_stage", {("dev-test", "MRR@10"): 0.09, ("dev-test", "nDCG@10"): 0.09,
                                                         ("dl2020", "MRR@10"): 0.02, ("dl2020", "nDCG@10"): 0.00}),
           "train_bi-encoder-v2.py": ("untrained", {("dev-test", "MRR@10"): -0.04, ("dev-test", "nDCG@10"): -0.04,
                                                    ("dl2020", "MRR@10"): -0.04, ("dl2020", "nDCG@10"): -0.03})}


def readme_sample_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"^python (train_[\w-]+\.py) --sample\b", text, flags=re.M)))


def test_readme_names_every_script_sample_command():
    assert readme_sample_commands() == sorted(MARGINS)


@pytest.mark.parametrize("script", sorted(MARGINS))
def test_sample_run_beats_its_baseline_on_queries_that_decided_nothing(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, script, "--sample", f"--output_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dev-tune chose" in proc.stdout and "dev-test" in proc.stdout and "dl2020" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    baseline, margin = MARGINS[script]
    for (split, metric), least in margin.items():
        trained, base = res[split]["trained"][metric], res[split][baseline][metric]
        assert trained >= base + least, (split, metric, trained, base, least)
    if script == "train_cross-encoder-v2.py":  # the student learnt the teacher's scores on held-out lines
        assert res["trained_fit"]["pearson"] > res["untrained_fit"]["pearson"] + 0.3
