"""Peak memory and time of preparing the MS MARCO training data, on synthetic sources of real format.

    python benchmarks/bench_prepare.py [--factor 0.01 0.1] [--dir FOLDER] [--keep]
    python benchmarks/bench_prepare.py --factor 1 --dir FOLDER --stages collection,tokens,triples  # a subset

For each factor: generate the sources (benchmarks/generate_synthetic.py) into a temporary folder (or
--dir/factor-F), then run every preparation stage of msmarco.data.MSMarco in a FRESH subprocess, so that the
peak RSS (the child's own ru_maxrss) belongs to that stage alone: collection, tokens (the collection's token ids for
the offline base model's tokenizer), ce_scores, teacher, hard_negatives, triples(16M, seed 12) (v1's sample: one
pass over the whole file); `--stages` measures a subset and generates only its sources. Then a "second start" that
opens every prepared store and does 1,000 random lookups in each. A child that only imports msmarco.data and numpy gives the baseline RSS. At the
smallest factor, a child that does what the classic scripts did, pickle.load(gzip.open(score pickle)), is
measured for comparison. The last table extrapolates linearly to factor 1.0 (an extrapolation, not a
measurement). Peak RSS is the child's VmHWM (/proc/self/status), not ru_maxrss: Linux copies the
parent's RSS at fork/exec into the child's ru_maxrss, which would inflate small stages. Peak RSS counts the pages of memory-mapped stores that a stage touched, as the kernel does.

Then each training script runs on the same folder, twice (skip with --no-scripts): its real `main` with the
full-scale defaults except the offline base model, a fresh output folder and a small held-out evaluation
(20 dev queries x 20 candidates; bi-encoder: no retrieval pass over the collection), stopped at its first training
step. The first start builds what the script adds (queries, qrels and dev-candidate stores, the bi-encoder's
filtered negatives); the second start finds every store prepared. Printed per start: seconds from launching the
process to entering the first training step, split into imports, data + model (run.resume_point to the evaluation),
evaluation before training, trainer setup up to the first batch; and the peak RSS at that step, and before
the evaluation (imports, data and model only: the evaluation's activations depend on the text lengths, and the
synthetic random words tokenize into ~3x the pieces of real text).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_synthetic as gen  # noqa: E402

STAGES = ["collection", "tokens", "ce_scores", "teacher", "hard_negatives", "triples", "bm25"]

# Run in the child: `stage` and `data_dir` are set before this code. Prints one JSON line.
CHILD = r"""
import json, resource, sys, time

def peak_rss_mib():
    # VmHWM: the peak RSS of this process image. Not ru_maxrss: Linux carries the parent's RSS at fork/exec
    # over into the child's ru_maxrss (and RUSAGE_CHILDREN), so a big parent would inflate every stage.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
t_start = time.time()
import numpy as np
from msmarco import data, sources
t_import = time.time() - t_start
out = {"import_s": round(t_import, 3)}
# the synthetic files have the real row counts (at factor 1.0), not the published sizes: lift the size/md5 checks
import dataclasses
for _k, _v in list(sources.SOURCES.items()):
    sources.SOURCES[_k] = dataclasses.replace(_v, size=None, md5=None)
m = data.MSMarco(data_dir)
t0 = time.time()
if stage == "baseline":
    rows = 0
elif stage == "collection":
    rows = len(m.collection())
elif stage == "tokens":  # the collection's token ids for the offline base model's tokenizer (msmarco/tokens.py)
    from transformers import AutoTokenizer
    from msmarco.models import offline_base_model
    tok = m.tokens("collection", AutoTokenizer.from_pretrained(offline_base_model()))
    rows = len(tok)
    out["tokens"] = int(tok.offsets[-1])
    out["store_mib"] = round((tok.ids.nbytes + tok.offsets.nbytes) / 2**20)
elif stage == "ce_scores":
    rows = len(m.ce_scores().pids)
elif stage == "teacher":
    rows = len(m.teacher_scores())
elif stage == "hard_negatives":
    h = m.hard_negatives()
    rows = len(h)
    out["negatives"] = int(len(h.neg))
elif stage == "triples":  # what train_cross-encoder-v1 reads: a 16M-line sample, one pass over the whole file
    out["kept"] = len(m.triples(16_000_000, seed=12))
    rows = json.loads((m.dir / ".prepared" / "triples.sample16000000.seed12" / "meta.json").read_text())["lines"]
elif stage == "bm25":  # the training scripts' dev ranking without a BM25 run: msmarco/bm25.py over top1000.dev
    m.collection(), m.dev_candidates(), m.queries("dev")
    t0 = time.time()  # those stores are other stages' and the scripts' own: this times the ranking alone
    run = m.bm25_run("dev")
    rows = len(m.collection())
    out["ranked_pairs"] = sum(1 for _ in open(run))
elif stage == "pickle_load":
    import gzip, pickle
    with gzip.open(m.path("cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"), "rb") as f:
        d = pickle.load(f)
    rows = sum(map(len, d.values()))
elif stage == "second_start":
    coll, ce, teacher, hn = m.collection(), m.ce_scores(), m.teacher_scores(), m.hard_negatives()
    tr = m.triples(16_000_000, seed=12)
    out["open_s"] = round(time.time() - t0, 4)
    rng = np.random.default_rng(1)
    t1 = time.time()
    for pid in rng.choice(coll.ids, 1000):
        coll[int(pid)]
    out["collection_1000_s"] = round(time.time() - t1, 4); t1 = time.time()
    for qid in rng.choice(ce.qids, 1000):
        p, s = ce.for_query(int(qid))
        ce.lookup(int(qid), p[:5])
    out["ce_scores_1000_s"] = round(time.time() - t1, 4); t1 = time.time()
    for i in rng.integers(0, len(teacher), 1000):
        r = teacher[int(i)]; float(r["pos_score"]); int(r["pid_neg"])
    out["teacher_1000_s"] = round(time.time() - t1, 4); t1 = time.time()
    for qid in rng.choice(hn.qids, 1000):
        hn.positives(int(qid)); hn.negatives(int(qid))
    out["hard_negatives_1000_s"] = round(time.time() - t1, 4); t1 = time.time()
    for i in rng.integers(0, len(tr), 1000):
        tuple(tr[int(i)])
    out["triples_1000_s"] = round(time.time() - t1, 4)
    rows = 5000
else:
    raise SystemExit("unknown stage " + stage)
out["rows"] = int(rows)
out["wall_s"] = round(time.time() - t0, 3)
out["process_s"] = round(time.time() - t_start, 3)
out["maxrss_mib"] = peak_rss_mib()
try:  # now, not peak: anonymous memory vs pages of memory-mapped files (page cache, reclaimable)
    st = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("Rss")}
    out["anon_mib_now"], out["file_mib_now"] = st.get("RssAnon"), st.get("RssFile")
except OSError:
    pass
print("RESULT " + json.dumps(out), flush=True)
"""


# Run in the child: `script`, `data_dir`, `out_dir`, `extra` are set before this code. Prints one JSON line.
SCRIPT_CHILD = r"""
import dataclasses, importlib.util, json, sys, time
marks = {"launch": launch_time, "imports_start": time.time()}
from msmarco import config, run, sources
import transformers
# the synthetic files have other sizes than the published downloads: lift the size/md5 checks (nothing downloads)
for k, v in list(sources.SOURCES.items()):
    sources.SOURCES[k] = dataclasses.replace(v, size=None, md5=None)
_start, _base = run.resume_point, run.baseline_metrics

def resume_point(*a, **k):
    marks["start_run"] = time.time()
    r = _start(*a, **k)
    marks["data_start"] = time.time()
    return r

def hwm():
    return [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]

def baseline_metrics(*a, **k):
    marks["eval_start"] = time.time()
    marks["rss_before_eval"] = hwm()  # peak so far: imports, data, model
    r = _base(*a, **k)
    marks["eval_end"] = time.time()
    return r

class FirstStep(Exception):
    pass

def training_step(self, *a, **k):  # the first batch is built; stop before the forward pass
    marks["first_step"] = time.time()
    raise FirstStep

run.resume_point, run.baseline_metrics = resume_point, baseline_metrics
transformers.Trainer.training_step = training_step
spec = importlib.util.spec_from_file_location(script.replace("-", "_"), f"{script}.py")
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
cfg = config.parse_cli(mod.Config(), [f"--data_dir={data_dir}", "--model_name=offline:all-MiniLM-L6-v2",
                                  f"--output_dir={out_dir}", "--resume=false", "--eval_queries=20",
                                  "--eval_candidates=20", *extra])
try:
    mod.main(cfg)
    raise SystemExit("the script ended without a training step")
except FirstStep:
    pass
print("RESULT " + json.dumps({"marks": marks, "maxrss_mib": hwm()}), flush=True)
"""

SCRIPTS = {"train_cross-encoder-v1": [], "train_cross-encoder-v2": ["--heldout_queries=10"],
           "train_bi-encoder-v2": ["--retrieval_eval=false"]}


def run_script_child(script: str, data_dir: Path, out_dir: Path) -> dict:
    t = time.time()
    code = (f"launch_time = {t!r}\nscript = {script!r}\ndata_dir = {str(data_dir)!r}\nout_dir = {str(out_dir)!r}\n"
            f"extra = {SCRIPTS[script]!r}\n" + SCRIPT_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    m = r["marks"]
    return {"to_first_step_s": m["first_step"] - m["launch"], "imports_s": m["start_run"] - m["launch"],
            "data_model_s": m["eval_start"] - m["data_start"], "eval_s": m["eval_end"] - m["eval_start"],
            "trainer_s": m["first_step"] - m["eval_end"], "maxrss_mib": r["maxrss_mib"],
            "maxrss_before_eval_mib": m["rss_before_eval"]}


def bench_scripts(folder: Path) -> dict:
    print(f"\n{'script start':<36}{'to step s':>10}{'imports':>9}{'data+model':>11}{'eval':>7}{'trainer':>8}"
          f"{'excl. eval':>11}{'peak MiB':>10}{'pre-eval':>10}")
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out:
        for script in SCRIPTS:
            for start in ("1st", "2nd"):
                r = run_script_child(script, folder, Path(out) / f"{script}-{start}")
                res[f"{script} {start}"] = r
                print(f"{script + ' (' + start + ' start)':<36}{r['to_first_step_s']:>10.1f}{r['imports_s']:>9.1f}"
                      f"{r['data_model_s']:>11.1f}{r['eval_s']:>7.1f}{r['trainer_s']:>8.1f}"
                      f"{r['to_first_step_s'] - r['eval_s']:>11.1f}{r['maxrss_mib']:>10.0f}"
                      f"{r['maxrss_before_eval_mib']:>10.0f}", flush=True)
    return res


def run_child(stage: str, data_dir: Path) -> dict:
    code = f"stage = {stage!r}\ndata_dir = {str(data_dir)!r}\n" + CHILD
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["child_s"] = round(time.time() - t, 3)
    return out


def fmt_row(name, rows, wall, rss, base, extra=""):
    growth = rss - base
    per_m = rss / (rows / 1e6) if rows else float("nan")
    g_per_m = growth / (rows / 1e6) if rows else float("nan")
    rate = rows / wall if wall > 0 and rows else float("nan")
    return (f"{name:<16}{rows:>14,}{wall:>10.2f}{rss:>11.1f}{growth:>10.1f}{per_m:>11.2f}{g_per_m:>11.2f}"
            f"{rate:>13,.0f}  {extra}")


HEADER = (f"{'stage':<16}{'rows':>14}{'wall s':>10}{'peak MiB':>11}{'Δbase':>10}{'MiB/Mrow':>11}{'ΔMiB/Mrow':>11}"
          f"{'rows/s':>13}")


# the generated sources each preparation stage reads (second_start and the scripts read them all)
STAGE_SOURCES = {"collection": ["collection"], "tokens": ["collection"], "ce_scores": ["ce_scores"],
                 "teacher": ["teacher"], "hard_negatives": ["hard_negatives"], "triples": ["triples"],
                 "bm25": ["collection", "queries", "dev"]}


def bench_factor(factor: float, root: Path, with_pickle: bool, scripts: bool = True,
                 prepare: bool = True, stages: list[str] | None = None) -> dict:
    """stages: a subset of STAGES to measure, alone (generating only their sources; no second start, no scripts)."""
    folder = root / f"factor-{factor:g}"
    if prepare:
        shutil.rmtree(folder / ".prepared", ignore_errors=True)  # measure the preparation, not a cache hit
    z = gen.sizes(factor)
    print(f"\n=== factor {factor:g}: {z} -> {folder}", flush=True)
    needed = sorted({f for st in stages for f in STAGE_SOURCES[st]}) if stages else list(gen.FILES)
    marks = folder / "sizes.json"  # these sizes, and which sources were generated whole at them
    done = json.loads(marks.read_text()) if marks.exists() else {}
    have = set(done.get("generated", [])) if done.get("sizes") == z else set()
    missing = [f for f in needed if f not in have or not all(
        (folder / n).exists() for n in [gen.FILES[f], *([gen.EXTRA_FILES[f]] if f in gen.EXTRA_FILES else [])])]
    t = time.time()
    if missing:
        gen.generate(folder, factor, only=missing)
        marks.write_text(json.dumps({"sizes": z, "generated": sorted(have | set(missing))}))
        print(f"generated {', '.join(missing)} in {time.time() - t:.1f} s", flush=True)
    else:
        print("using the sources already generated there", flush=True)
    res = {"factor": factor, "sizes": z, "stages": {}}
    if not prepare:
        res["scripts"] = bench_scripts(folder)
        return res
    base = run_child("baseline", folder)
    res["baseline"] = base
    b = base["maxrss_mib"]
    print(f"import baseline (python + numpy + msmarco.data): {b:.1f} MiB peak RSS, import {base['import_s']} s")
    print(HEADER)
    for st in stages or STAGES + ["second_start"] + (["pickle_load"] if with_pickle else []):
        r = run_child(st, folder)
        res["stages"][st] = r
        extra = ""
        if st == "second_start":
            extra = (f"open {r['open_s']} s, process total {r['process_s']} s; 1000 lookups: " +
                     ", ".join(f"{k[:-7]} {r[k]:.3f} s" for k in r if k.endswith("_1000_s")) +
                     (f"; at exit RssAnon {r['anon_mib_now']:.0f} MiB, RssFile {r['file_mib_now']:.0f} MiB "
                      "(mapped store pages)" if r.get("file_mib_now") is not None else ""))
        elif st == "hard_negatives":
            extra = f"({r['negatives']:,} negatives)"
        elif st == "pickle_load":
            extra = "plain pickle.load(gzip.open(...)) of the same score pickle (the classic scripts)"
        print(fmt_row(st, r["rows"], r["wall_s"], r["maxrss_mib"], b, extra), flush=True)
    if with_pickle and not stages:
        a, p = res["stages"]["ce_scores"]["maxrss_mib"] - b, res["stages"]["pickle_load"]["maxrss_mib"] - b
        print(f"score pickle, growth over baseline: streaming store {a:.1f} MiB vs pickle.load {p:.1f} MiB "
              f"(x{p / max(a, 1e-9):.1f})")
    if scripts and not stages:
        res["scripts"] = bench_scripts(folder)
    return res


def extrapolate(results: list[dict], target: float = 1.0) -> None:
    results = sorted(results, key=lambda r: r["factor"])
    if not results:
        return
    hi = results[-1]
    lo = results[-2] if len(results) > 1 else None
    print(f"\n=== EXTRAPOLATION to factor {target:g} (NOT measured): time from the rows/s at factor {hi['factor']:g}; "
          + (f"peak RSS linear in rows through factors {lo['factor']:g} and {hi['factor']:g} (growth per row "
             f"clamped at >= 0). The stages parse in bounded chunks (teacher/triples ~40 MB of text, hard "
             f"negatives 20k lines, scores 1,000 queries): once the smaller factor is past them the slope is "
             f"the real per-row growth; before that it is an overestimate (pass a larger factor, e.g. 0.3)"
             if lo else "peak RSS assumed flat") + "; triples: time scales with the lines read, peak RSS with the rows "
          "kept (16M, or all lines when fewer), so its peak is linear in the kept rows")
    print(f"{'stage':<16}{'rows':>14}{'wall s':>10}{'peak MiB':>11}")
    z = gen.sizes(target)
    rows_at = {"collection": z["passages"], "tokens": z["passages"],
               "ce_scores": hi["stages"]["ce_scores"]["rows"] / hi["factor"] * target, "teacher": z["teacher_lines"],
               "hard_negatives": z["queries"], "triples": z["triples_lines"], "bm25": z["passages"]}
    total = 0.0
    for st in STAGES:
        h = hi["stages"][st]
        rows = rows_at[st]
        wall = rows / (h["rows"] / h["wall_s"]) if h["wall_s"] > 0 else 0.0
        total += wall
        if st == "triples":  # the sample buffer grows with the rows kept, not with the lines read
            kept_at = min(rows, 16_000_000)
            l = lo["stages"][st] if lo else None
            slope = max(0.0, (h["maxrss_mib"] - l["maxrss_mib"]) / max(h["kept"] - l["kept"], 1)) if l else 0.0
            rss = h["maxrss_mib"] + slope * (kept_at - h["kept"])
        elif lo:
            l = lo["stages"][st]
            slope = max(0.0, (h["maxrss_mib"] - l["maxrss_mib"]) / max(h["rows"] - l["rows"], 1))
            rss = h["maxrss_mib"] + slope * (rows - h["rows"])
        else:
            rss = h["maxrss_mib"]
        print(f"{st:<16}{int(rows):>14,}{wall:>10.0f}{rss:>11.0f}")
    print(f"{'all stages':<16}{'':>14}{total:>10.0f}   (~{total / 60:.1f} min, one process per stage)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--dir", type=Path, default=None, help="generate into DIR/factor-F (kept, reused when complete)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--no-scripts", dest="scripts", action="store_false",
                    help="only the data layer's stages, not the training scripts' starts")
    ap.add_argument("--only-scripts", action="store_true",
                    help="only the training scripts' starts, on the stores of an earlier run in --dir")
    ap.add_argument("--stages", default=None,
                    help="comma-separated subset of " + ",".join(STAGES) + ": measure only these (and generate only "
                    "their sources); no second start, no scripts")
    a = ap.parse_args(argv)
    # relative folders are taken from the repository, never the working directory
    a.dir, a.json = (p if p is None or p.is_absolute() else REPO / p for p in (a.dir, a.json))
    stages = None if a.stages is None else [s.strip() for s in a.stages.split(",") if s.strip()]
    if stages and (bad := set(stages) - set(STAGES)):
        ap.error(f"unknown --stages {sorted(bad)}; choose from {STAGES}")
    root = a.dir or Path(tempfile.mkdtemp(prefix="msmarco-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        factors = sorted(a.factor)
        for f in factors:
            results.append(bench_factor(f, root, with_pickle=(f == factors[0]), scripts=a.scripts,
                                        prepare=not a.only_scripts, stages=stages))
        if not a.only_scripts and not stages and max(factors) < 1.0:
            extrapolate(results)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    finally:
        if a.dir is None and not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
