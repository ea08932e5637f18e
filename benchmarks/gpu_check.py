"""Everything that needs a GPU, in one command that fits a short GPU window (about 8 minutes on one H100/H200).

The GPU machine may reach no package index and have no offline base model: carry what it lacks with the repository
(wheels, and the base model in fp16, in the git-ignored .device/ folder) and install them there first. Then:
    python benchmarks/gpu_check.py --out "$OUT"
On a CPU, the dry run the tests do (tiny budgets, the same code):
    python benchmarks/gpu_check.py --device=cpu --dry_run --out /tmp/gpu_check

Parts, each timed and guarded (a failure is recorded with its error and the other parts still run), in the order
of what a short window most needs:
  1. speed    benchmarks/bench_train_speed.py for the three recipes at their full-default lengths and batch sizes:
              stock vs the project's configuration, each as it ships (stock: bf16 with torch's default attention
              kernels; project: bf16, SDPA without cuDNN), then both in fp32 and both without cuDNN attention.
              Samples/s, real tokens/s, model TFLOP/s and MFU, peak GPU memory, non-finite losses.
  2. levers   what no GPU has run yet, for the launch-bound bi-encoder: the project's configuration under
              torch.compile (reduce-overhead: CUDA graphs, lengths rounded to 32) beside the same eager, and both
              configurations at batch 128.
  3. scripts  each training script's --sample run with a small step budget on the device: train, evaluate, save,
              reload the saved model with stock sentence-transformers and score it again; for v1 also a cut run
              resumed to the same weights, and the same run on the CPU for comparison.
  4. torchrun the bi-encoder under torchrun --nproc_per_node=1 (NCCL on a GPU, gloo on a CPU), briefly.
  5. evaluate evaluate.py --sample on the device: the offline base model as a bi-encoder (chunked top-k over the
              collection) and the scripts part's saved v1 cross-encoder (reranking; needs part 3 first).
  6. variants the project's configuration with one setting changed (measured on an H200 on 2026-11-29): cuDNN
              attention on, eager attention, TF32, flash attention 2 (when importable), unrounded padding
              (pad_multiple 1), the bi-encoder's batches cut into chunks (chunk_cost 1024).
Writes gpu_check.json and gpu_check.md under --out (after every part and every speed run) and prints the table. No
command runs past --deadline (480 s): a part that would is cut (with every process it started) or skipped, with
what it had.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "none": 67.0}  # H100/H200 SXM datasheet, dense: tensor cores, plain fp32
SCRIPTS = ["train_cross-encoder-v1", "train_cross-encoder-v2", "train_bi-encoder-v2"]


DEADLINE = [float("inf")]  # time.time() past which no command starts (main sets it from --deadline)


def sh(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a non-zero exit raises with the end of its output. No command runs
    past the check's deadline: one that would start after it is skipped, one that would end after it is cut."""
    left = DEADLINE[0] - time.time()
    if left < 15:
        raise TimeoutError(f"skipped: the check's deadline has passed ({' '.join(cmd[:3])} ...)")
    # its own session, so that a cut kills all it started: torchrun's workers run in sessions of their own too,
    # and one left behind would hold the GPU while the next part is timed
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    try:
        stdout, stderr = proc.communicate(timeout=min(timeout, left))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f"cut after {min(timeout, left):.0f} s: {' '.join(cmd[:4])} ...; its output so far:\n"
                           f"{(stdout + stderr)[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{(stdout + stderr)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a command and every process it started, also those that started sessions of their own (torchrun's
    workers): its process group, then any descendant left (read from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # ppid -> pids
        except (OSError, IndexError, ValueError):
            continue
    todo, tree = [proc.pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# The speed variants by part, in the order of what a short window most needs: "speed", the ratios to the stock
# trainer (each configuration as it ships, then both in fp32 and both without cuDNN attention); "levers", what has
# never run on a GPU (compiling, a larger batch, the bi-encoder being furthest from 3x); "variants", the project's
# settings one at a time, which the H200 measured on 2026-11-29, last.
SPEED_PARTS = {"speed": ("stock_vs_project", "stock_vs_project_fp32", "cudnn_sdp_off_both"),
               "levers": ("bi_compile_reduce_overhead", "bi_pad_multiple_32", "bi_batch_128"),
               "variants": ("project_cudnn_sdp_on", "eager", "tf32", "pad_multiple_1", "bi_chunk_cost_1024",
                            "flash_attention_2")}


def part_speed(a, work: Path, part: str = "speed") -> dict:
    """bench_train_speed runs, each its own process (a clean allocator and clean torch.backends settings): the
    variants of SPEED_PARTS[part]."""
    runs = {}
    steps = ["--steps=1", "--warmup=0", "--pipeline_batches=2", "--max_length=32", "--batch_size=4"] if a.dry_run \
        else [f"--steps={a.steps}", "--warmup=5", "--pipeline_batches=200"]
    # the recipes of a variant share its process (--no-isolate): a fresh CUDA process costs seconds of a short window
    common = ["--preset=full", f"--device={a.device}", "--recipes=" + ("v1" if a.dry_run else "v1,v2,bi"),
              "--no-isolate", *steps]
    amp = "bf16" if a.device == "cuda" else "none"
    # each configuration as it ships first (stock: torch's default kernels; project: the scripts' choices), then
    # one setting changed at a time
    variants = {"stock_vs_project": [f"--amp={amp}"],
                "stock_vs_project_fp32": ["--amp=none"],
                "cudnn_sdp_off_both": [f"--amp={amp}", "--cudnn_sdp=off"],
                "project_cudnn_sdp_on": [f"--amp={amp}", "--cudnn_sdp=on", "--configs=project"],
                "eager": [f"--amp={amp}", "--attn=eager", "--configs=project"],
                "tf32": ["--amp=none", "--tf32", "--configs=project"],
                "pad_multiple_1": [f"--amp={amp}", "--pad_multiple=1", "--configs=project"],
                "bi_chunk_cost_1024": [f"--amp={amp}", "--chunk_cost=1024", "--configs=project", "--recipes=bi"],
                # the launch-bound bi-encoder step: CUDA graphs (one per padded shape: lengths rounded to 32, the
                # compilations in 10 untimed steps; under compile transformers also turns TF32 on), beside the same
                # eager, and 2x the batch (also more in-batch negatives: a recipe choice; the sample's epoch of 179
                # queries caps a batch there)
                "bi_compile_reduce_overhead": [f"--amp={amp}", "--compile=reduce-overhead", "--pad_multiple=32",
                                               "--warmup=10", "--configs=project", "--recipes=bi"],
                "bi_pad_multiple_32": [f"--amp={amp}", "--pad_multiple=32", "--configs=project", "--recipes=bi"],
                "bi_batch_128": [f"--amp={amp}", "--batch_size=128", "--recipes=bi"]}
    if importlib.util.find_spec("flash_attn"):
        variants["flash_attention_2"] = [f"--amp={amp}", "--attn=flash_attention_2", "--configs=project"]
    elif "flash_attention_2" in SPEED_PARTS[part]:
        runs["flash_attention_2"] = {"skipped": "flash_attn is not installed"}
    variants = {k: v for k, v in variants.items() if k in SPEED_PARTS[part]}
    if a.dry_run:  # v1 only (common's --recipes), one step: the plumbing of each kind of variant
        variants = {k: [x for x in v if not x.startswith(("--recipes=", "--warmup="))] for k, v in variants.items()
                    if k in ("stock_vs_project", "eager", "bi_compile_reduce_overhead")}
    for name, extra in variants.items():
        out = work / f"speed_{name}.json"
        peak = PEAK_TFLOPS["bf16" if "--amp=bf16" in extra else "tf32" if "--tf32" in extra else "none"] \
            if a.device == "cuda" else 0
        t = time.time()
        try:
            sh([sys.executable, "benchmarks/bench_train_speed.py", *common, *extra, f"--peak_tflops={peak}",
                f"--out={out}"], timeout=a.part_timeout)
            runs[name] = {**json.loads(out.read_text()), "seconds": round(time.time() - t, 1)}
        except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
            runs[name] = {"error": str(e)[-2000:], "seconds": round(time.time() - t, 1)}
        a.save(a.part, runs)  # each finished run on disk at once: the window may close in the next one
    return runs


def run_script(script: str, out: Path, device: str, extra: list[str], timeout: int) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    sh([sys.executable, f"{script}.py", "--sample", f"--output_dir={out}", *extra], timeout, env)
    return json.loads((out / "results.json").read_text())


def rescore(script: str, out: Path, device: str) -> dict:
    """The saved model, reloaded with stock sentence-transformers on `device`, on the run's dev-test set."""
    sys.path.insert(0, str(REPO))
    from msmarco.data import MSMarco
    from msmarco.evaluation import RerankEvaluator, bi_encoder_run, cross_encoder_run, first_stage_of, load_rerank_set
    cfg = json.loads((out / "config.json").read_text())
    data = MSMarco(cfg["data_dir"])
    rs = load_rerank_set(data, "dev-test", cfg["eval_queries"], cfg["eval_candidates"] or None,
                         first_stage_of(data.dir, cfg["first_stage"]))
    if script.startswith("train_bi"):
        from sentence_transformers import SentenceTransformer
        return RerankEvaluator(rs, bi_encoder_run).metrics(SentenceTransformer(str(out / "model"), device=device))
    from sentence_transformers import CrossEncoder
    return RerankEvaluator(rs, cross_encoder_run).metrics(CrossEncoder(str(out / "model"), device=device))


def part_scripts(a, work: Path) -> dict:
    length = {"train_bi-encoder-v2": "--max_seq_length=32" if a.dry_run else "--max_seq_length=96"}
    budget = (["--max_steps=4", "--eval_steps=2", "--eval_queries=6", "--eval_candidates=6", "--batch_size=4",
               "--report_splits="] if a.dry_run else
              ["--max_steps=40", "--eval_steps=20", "--eval_queries=40", "--eval_candidates=20"])
    res = {}
    for script in (SCRIPTS[:1] if a.dry_run else SCRIPTS):
        t = time.time()
        extra = budget + [length.get(script, "--max_length=48" if a.dry_run else "--max_length=128")]
        row = {}
        try:
            row["results"] = run_script(script, work / script, a.device, extra, a.part_timeout)
            row["reloaded_dev_test"] = rescore(script, work / script, a.device)
            row["reload_matches"] = all(abs(row["reloaded_dev_test"][m] - row["results"]["dev-test"]["trained"][m])
                                        < 1e-3 for m in ("MRR@10", "nDCG@10"))
            if script == "train_cross-encoder-v1":
                cut = work / f"{script}-cut"
                run_script(script, cut, a.device, extra, a.part_timeout)
                last = max((cut / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                shutil.rmtree(last)
                run_script(script, cut, a.device, extra, a.part_timeout)
                row["resume_max_weight_diff"] = max_weight_diff(work / script / "checkpoints" / last.name, last)
                if a.device != "cpu":  # on a CPU it would be the same run twice
                    cpu = run_script(script, work / f"{script}-cpu", "cpu", extra, a.part_timeout)
                    row["cpu_dev_test"] = cpu["dev-test"]["trained"]
                    row["device_minus_cpu_MRR@10"] = row["results"]["dev-test"]["trained"]["MRR@10"] - \
                        cpu["dev-test"]["trained"]["MRR@10"]
        except Exception as e:  # noqa: BLE001 - the figures gathered before the failure are kept beside it
            row["error"] = str(e)[-2000:]
        row["seconds"] = round(time.time() - t, 1)
        res[script] = row
    return res


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def part_evaluate(a, work: Path) -> dict:
    """evaluate.py on the bundled sample: the base model as a bi-encoder, and the v1 run's saved cross-encoder."""
    res = {}
    env = {"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}
    # dry run: 4 tokens a passage, since the bi-encoder encodes the whole sample collection (~30 s on 2 cores)
    limits = ["--max_queries=5", "--max_length=4", "--depth=20", "--splits=dev"] if a.dry_run else ["--max_queries=50"]
    ce = work / "train_cross-encoder-v1" / "model"
    for name, model in (("bi-encoder", "offline:all-MiniLM-L6-v2"), ("cross-encoder", str(ce))):
        t = time.time()
        try:
            if not Path(model).exists() and not model.startswith("offline:"):
                raise RuntimeError(f"{model} missing: the scripts part did not save it")
            out = work / f"evaluate-{name}"
            sh([sys.executable, "evaluate.py", "--sample", f"--model={model}", f"--output_dir={out}", *limits],
               a.part_timeout, env)
            res[name] = {"metrics": json.loads((out / "metrics.json").read_text())["splits"]}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": str(e)[-2000:]}
        res[name]["seconds"] = round(time.time() - t, 1)
    return res


def part_torchrun(a, work: Path) -> dict:
    t = time.time()
    out = work / "torchrun"
    args = ["--max_steps=4", "--eval_steps=2", "--eval_queries=6", "--eval_candidates=6", "--batch_size=8",
            "--report_splits=", "--max_seq_length=32", "--eval_max_seq_length=32", f"--output_dir={out}"]
    env = {"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}
    try:
        sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "train_bi-encoder-v2.py", "--sample", *args], a.part_timeout, env)
        res = {"results": json.loads((out / "results.json").read_text())["dev-test"]}
    except Exception as e:  # noqa: BLE001
        res = {"error": str(e)[-2000:]}
    res["seconds"] = round(time.time() - t, 1)
    return res


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}, {report['gpu']}", "",
             f"torch {report['torch']}, transformers {report['transformers']}, sentence-transformers "
             f"{report['sentence_transformers']}; {report['seconds']} s in all", ""]
    parts = report["parts"]
    failed = tuple(p for p in SPEED_PARTS if "error" in parts.get(p, {}))  # a part's own bug: shown below
    speed = {k: v for p in SPEED_PARTS if p not in failed for k, v in parts.get(p, {}).items()}
    if speed:
        lines += ["## Training speed (full-default lengths)", "",
                  "| variant | recipe | config | samples/s | real tokens/s | pad/real | TFLOP/s | MFU | peak MiB | "
                  "non-finite losses | project/stock |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, run in speed.items():
            if "runs" not in run or not run["runs"]:
                why = (run.get("error") or run.get("skipped") or "no run finished").strip().splitlines()
                lines.append(f"| {name} | | | {why[-1][:120] if why else ''} |||||||")
                continue
            for row in run["runs"]:
                for config in ("stock", "project"):
                    if config in row:
                        r = row[config]
                        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
                        ratio = f"{row['ratio']:.2f}" if "ratio" in row and config == "project" else ""
                        lines.append(f"| {name} | {row['recipe']} | {config} | {r['samples_per_s']:.1f} | "
                                     f"{r['real_tokens_per_s']:.0f} | {r['padded_per_real']:.2f} | "
                                     f"{r['model_tflops_per_s']:.2f} | {mfu} | {r['peak_mib']:.0f} | "
                                     f"{r['nonfinite_losses']} | {ratio} |")
        lines.append("")
    for part in ("scripts", "evaluate", "torchrun") + failed:
        lines += [f"## {part}", "", "```", json.dumps(parts.get(part), indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry_run", action="store_true", help="tiny budgets: the CPU run the tests do")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "output" / "gpu_check")))
    p.add_argument("--steps", type=int, default=20, help="timed steps per speed configuration")
    p.add_argument("--parts", default="speed,levers,scripts,torchrun,evaluate,variants")
    p.add_argument("--part_timeout", type=int, default=240, help="seconds for one command of a part")
    p.add_argument("--deadline", type=int, default=480, help="seconds after which no command starts or runs on: the "
                   "window's limit, so that one slow part cannot take the others' figures with it")
    a = p.parse_args(argv)
    import torch
    import transformers
    import sentence_transformers
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; use --device=cpu --dry_run for the CPU dry run")
    out = Path(a.out) if Path(a.out).is_absolute() else REPO / a.out  # relative: from the repository
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    t0 = time.time()
    DEADLINE[0] = t0 + a.deadline
    report = {"date": time.strftime("%Y-%m-%d"), "device": a.device, "dry_run": a.dry_run,
              "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "none (CPU dry run)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "sentence_transformers": sentence_transformers.__version__, "parts": {}}
    parts = {"scripts": part_scripts, "evaluate": part_evaluate, "torchrun": part_torchrun,
             **{p: (lambda a, work, p=p: part_speed(a, work, p)) for p in SPEED_PARTS}}

    def save(part: str | None = None, partial: dict | None = None) -> None:
        """gpu_check.json and .md as they stand: after every part, and after every speed run (a cut check keeps
        what it finished)."""
        if part is not None:
            report["parts"][part] = partial
        report["seconds"] = round(time.time() - t0)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))
    a.save = save
    for name in a.parts.split(","):
        t = time.time()
        a.part = name
        try:
            report["parts"][name] = parts[name](a, work)
        except Exception:  # noqa: BLE001 - a part's own bug: recorded, the next part runs
            report["parts"][name] = {"error": traceback.format_exc()[-3000:]}
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
        save()
    print(markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
