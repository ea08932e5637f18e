"""benchmarks/gpu_check.py's CPU dry run: every part of the GPU check runs with tiny budgets, so the command that
waits for a GPU window cannot rot; and bench_train_speed's JSON holds sane figures."""
import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device=cpu", "--dry_run",
                           f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    parts = report["parts"]
    assert set(parts) == {"speed", "scripts", "evaluate", "torchrun", "levers"}
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
    assert "stock" not in parts["speed"]["eager"]["runs"][0]  # a project-only variant
    assert set(parts["levers"]) == {"bi_compile_reduce_overhead"}  # last; in the dry run only this one, on v1
    compiled = parts["levers"]["bi_compile_reduce_overhead"]  # the project's model under torch.compile
    assert compiled["settings"]["compile"] == "reduce-overhead" and compiled["settings"]["pad_multiple"] == 32
    assert compiled["runs"][0]["project"]["nonfinite_losses"] == 0
    # scripts: trained, saved, reloaded to the same metrics; a cut run resumed to the same weights (the comparison
    # with a CPU run is for a GPU only)
    v1 = parts["scripts"]["train_cross-encoder-v1"]
    assert v1["reload_matches"] and v1["resume_max_weight_diff"] < 1e-4 and "device_minus_cpu_MRR@10" not in v1
    assert set(parts["evaluate"]) == {"bi-encoder", "cross-encoder"}
    assert 0 <= parts["torchrun"]["results"]["trained"]["MRR@10"] <= 1
