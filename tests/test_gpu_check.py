"""benchmarks/gpu_check.py's CPU dry run: every part of the GPU check runs with tiny budgets, so the command that
waits for a GPU window cannot rot; and bench_train_speed's JSON holds sane figures."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device=cpu", "--dry_run",
                           f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    parts = report["parts"]
    assert list(parts) == ["speed", "levers", "scripts", "torchrun", "evaluate", "variants"]  # by what a window needs
    for name, part in parts.items():
        assert "error" not in json.dumps(part), (name, json.dumps(part)[:3000])
    # speed: bench_train_speed's JSON, stock against project, in the same process
    run = parts["speed"]["stock_vs_project"]["runs"][0]
    for config in ("stock", "project"):
        r = run[config]
        assert r["samples_per_s"] > 0 and r["real_tokens_per_s"] > 0 and r["padded_per_real"] >= 1
        assert r["host_ms_per_step"] >= 0 and r["peak_mib"] > 0 and r["pipeline_samples_per_s"] > 0
        assert r["nonfinite_losses"] == 0 and r["model_tflops_per_s"] > 0
    assert run["ratio"] > 0 and run["project"]["padded_per_real"] <= run["stock"]["padded_per_real"]
    assert "stock" not in parts["variants"]["eager"]["runs"][0]  # a project-only variant
    assert set(parts["levers"]) == {"bi_compile_reduce_overhead"}  # in the dry run only this one, on v1
    compiled = parts["levers"]["bi_compile_reduce_overhead"]  # the project's model under torch.compile
    assert compiled["settings"]["compile"] == "reduce-overhead" and compiled["settings"]["pad_multiple"] == 32
    assert compiled["runs"][0]["project"]["nonfinite_losses"] == 0
    # scripts: trained, saved, reloaded to the same metrics; a cut run resumed to the same weights (the comparison
    # with a CPU run is for a GPU only)
    v1 = parts["scripts"]["train_cross-encoder-v1"]
    assert v1["reload_matches"] and v1["resume_max_weight_diff"] < 1e-4 and "device_minus_cpu_MRR@10" not in v1
    assert set(parts["evaluate"]) == {"bi-encoder", "cross-encoder"}
    assert 0 <= parts["torchrun"]["results"]["trained"]["MRR@10"] <= 1


def test_a_cut_command_takes_every_process_it_started_with_it(tmp_path):
    """A command cut at the check's deadline is killed with all it started, also a process in a session of its own
    (as torchrun's workers are): one left behind would hold the GPU while the next part is timed. Its output so far
    is kept in the error."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(600)'], start_new_session=True); print('child', child.pid, flush=True); time.sleep(600)")
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=r"cut after 3 s(.|\n)*child \d+") as e:
        gpu_check.sh([sys.executable, "-c", code], timeout=3)
    assert time.monotonic() - t < 300  # not held until the child ends: it shares the command's output pipes
    pid = int(str(e.value).rsplit("child ", 1)[1].split()[0])
    for _ in range(50):  # killed: gone, or a zombie waiting for its new parent to reap it
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} outlived the cut")
