"""One run of a training script in output/<script>/: a fresh start or the resume of a cut run, the config saved
beside the outputs, the metric history (metrics.jsonl) and its plot against the baselines, the atomic save of the
best model, and the final report."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from . import paths
from .distributed import barrier, init_distributed, is_main_process, main_process_first
from .errors import OutputFolderError


def save_config(cfg, out_dir: Path, **run) -> Path:
    """Write the config a run used beside its outputs, so a result can be traced to its settings (and `run`: facts
    of the run that are not config fields, such as its number of processes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    paths.write_atomic(path, json.dumps({**dataclasses.asdict(cfg), **run}, indent=2, default=str) + "\n")
    return path


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` folder, to resume a cut run with the same command."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _history_callback_class():
    from transformers import TrainerCallback

    class MetricHistory(TrainerCallback):
        """Appends every logged loss and evaluation to <out>/metrics.jsonl (one JSON object per line);
        on resume it first drops lines past the checkpoint's step, so the history stays one run."""

        def __init__(self, path: Path, extra: dict | None = None):
            self.path, self.extra = path, extra or {}

        def on_train_begin(self, args, state, control, **kw):
            if not args.process_index == 0:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.path.exists():
                for ln in self.path.read_text().splitlines():
                    try:
                        row = json.loads(ln)
                    except ValueError:  # a line cut by a crash mid-append: the resumed run logs that step again
                        continue
                    if row.get("step", 0) <= state.global_step:
                        kept.append(ln)
            paths.write_atomic(self.path, "".join(ln + "\n" for ln in kept))

        def on_log(self, args, state, control, logs=None, **kw):
            if args.process_index == 0 and logs:
                self.log({"step": state.global_step, "epoch": state.epoch, **logs})

        def log(self, record: dict) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, **self.extra}, default=float) + "\n")

    return MetricHistory


def metric_history(path: Path, extra: dict | None = None):
    """A transformers TrainerCallback writing the metric history (see MetricHistory)."""
    return _history_callback_class()(path, extra)


def history_series(rows: list[dict], metric: str) -> dict:
    """What the plot shows, from metrics.jsonl rows: the training loss, `metric` (e.g. eval_dev-tune_MRR@10) over
    steps, from the untrained model at step 0, and the first stage's value (e.g. the BM25 run's order), both of
    the step-0 record that baseline_metrics writes."""
    name = metric.rsplit("_", 1)[-1]  # MRR@10
    first = [r[f"first_stage_{name}"] for r in rows if f"first_stage_{name}" in r][-1:]
    return {"loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "model": [(r["step"], r[metric]) for r in rows if metric in r],
            "first_stage": first[0] if first else None}


def plot_history(jsonl: Path, png: Path, metric: str) -> Path | None:
    """PNG of history_series: the loss, and the model's `metric` read against the untrained model and the first
    stage (the candidates' own order)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []
    h = history_series(rows, metric)
    if not h["loss"] and not h["model"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if h["loss"]:
        ax.plot(*zip(*h["loss"]), color="tab:blue", alpha=0.6, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    if h["model"]:
        ax2.plot(*zip(*h["model"]), "o-", color="tab:red", label="model (step 0: untrained)")
    if h["first_stage"] is not None:
        ax2.axhline(h["first_stage"], color="tab:gray", linestyle="--", label=f"first stage ({h['first_stage']:.3f})")
    ax2.set_ylabel(metric, color="tab:red")
    ax2.legend(loc="lower right", fontsize="small")
    ax.set_title(png.parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# Fields a resumed run may change: where it writes and what it reports, never what it trains or how the checkpoint
# is chosen (a changed --lr, say, would be ignored by the optimizer and scheduler restored from the checkpoint).
RESUMABLE_CHANGES = frozenset({"resume", "output_dir", "report_to", "logging_steps", "save_total_limit",
                               "report_splits", "retrieval_eval", "retrieval_k", "retrieval_every_eval"})
# Of those, the ones that change what the baselines cover: baselines.json is computed again when one changed.
BASELINE_FIELDS = ("report_splits", "retrieval_eval", "retrieval_k")


def config_changes(cfg, out_dir: Path, world_size: int = 1, resumable: bool = False) -> dict:
    """{field: (saved value, new value)} for the fields of `cfg` that differ from out_dir/config.json and that a
    resumed run may not change ({} without a saved config); with `resumable`, those it may. The number of processes
    counts as one: the batch size is per process, so another number changes the steps of an epoch, where a resume
    skips to and the schedule."""
    path = out_dir / "config.json"
    if not path.exists():
        return {}
    saved = {"world_size": 1, **json.loads(path.read_text())}  # a config saved without it: one process
    new = json.loads(json.dumps({**dataclasses.asdict(cfg), "world_size": world_size}, default=str))  # tuples: lists
    return {k: (saved.get(k), v) for k, v in new.items()
            if (k in RESUMABLE_CHANGES) == resumable and saved.get(k) != v}


# What start_run removes when a run starts afresh (and writes later): in a folder without a run's config.json they are
# someone else's files.
RUN_FILES = ("checkpoints", "model", "model.tmp", "model.old", "metrics.jsonl", "metrics.png", "baselines.json",
             "results.json")


def resume_point(cfg, out: Path) -> str | None:
    """The checkpoint of output/<script>/ that this run resumes (the newest complete one, if cfg.resume), or None: it
    starts afresh. Reads the folder and changes nothing (start_run does, once the data and the model have loaded).

    Only the same config resumes. A finished run (results.json written) with another config is to be replaced by
    the new one; a cut run with another config ends the script (exit code 1) with the changed fields, so a mistyped
    flag never continues a run under settings it did not train with. Under a launcher it joins the process group."""
    _, world = init_distributed()
    theirs = [n for n in RUN_FILES if (out / n).exists()]
    if theirs and not (out / "config.json").exists():
        raise OutputFolderError(f"{out} holds {', '.join(theirs)} but no config.json of a run, so they are not a "
                                f"training run's and would be deleted: pass --output_dir=<an empty or new folder>, or "
                                f"move them away")
    checkpoint = last_checkpoint(out / "checkpoints") if cfg.resume else None
    changes = config_changes(cfg, out, world) if checkpoint else {}
    if changes and not (out / "results.json").exists():
        listed = "\n".join(f"  {'processes' if k == 'world_size' else '--' + k}: {old!r} -> {new!r}"
                           for k, (old, new) in changes.items())
        raise OutputFolderError(f"{out} holds a cut run ({Path(checkpoint).name}) with another config:\n{listed}\n"
                                f"Rerun with its options to resume it, add --resume=false to replace it with this "
                                f"run, or pass --output_dir=<another folder> to keep both.")
    return None if changes else checkpoint


def start_run(cfg, out: Path, checkpoint: str | None) -> None:
    """Make output/<script>/ this run's, given resume_point's `checkpoint`. The scripts call it once their data and
    model have loaded, so a value that fails there (a misspelt model name or first-stage run, an unknown mining
    system) leaves the folder's previous run whole. Afresh, the previous run's checkpoints, metric history, model and
    results are removed; resumed, only its results (and its baselines where the report sets changed). Writes the
    config beside the outputs; only the main process touches the folder."""
    _, world = init_distributed()
    replaced = checkpoint is None and (out / "results.json").exists() and config_changes(cfg, out, world)
    if replaced and is_main_process():
        print(f"{out}: the finished run there had another config ({', '.join(replaced)}); starting afresh")
    stale_baselines = checkpoint is not None and bool(set(config_changes(cfg, out, world, resumable=True))
                                                      & set(BASELINE_FIELDS))
    barrier()  # every process has decided from the folder as it was, before the main process changes it
    with main_process_first():
        if is_main_process():
            if checkpoint is None:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                for name in ("metrics.jsonl", "metrics.png", "baselines.json"):
                    (out / name).unlink(missing_ok=True)
                for name in ("model", "model.tmp", "model.old"):  # a previous run's model must not sit beside
                    shutil.rmtree(out / name, ignore_errors=True)  # this run's config
            else:
                print(f"resuming from {checkpoint}")
                if stale_baselines:  # other report sets: their BM25 and untrained rows are computed again
                    (out / "baselines.json").unlink(missing_ok=True)
            (out / "results.json").unlink(missing_ok=True)  # the figures of a run that is no longer the folder's
            save_config(cfg, out, world_size=world)


def train_from(trainer, checkpoint: str | None) -> None:
    """trainer.train(resume_from_checkpoint=checkpoint), except when the checkpoint already holds the whole run
    (a finished run rerun, or one cut in its final evaluation): with --max_steps inside an epoch the HF loop would
    still take one more step there (it checks max_steps only after a step), adding a checkpoint, an evaluation and
    a history row per rerun. Then only the best checkpoint is loaded, as training's end would have."""
    if checkpoint is not None:
        with main_process_first():
            if is_main_process():
                _best_checkpoint_here(Path(checkpoint))
    if checkpoint is not None and trainer.args.max_steps > 0:
        from transformers import TrainerState
        state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            trainer.state = state
            if state.best_model_checkpoint is not None:
                trainer._load_best_model()  # the trainer's own end-of-training load (sentence-transformers')
            return
    trainer.train(resume_from_checkpoint=checkpoint)


def _best_checkpoint_here(checkpoint: Path) -> None:
    """The trainer state names the best checkpoint by its path when it was saved. A run folder moved since (and
    resumed with --output_dir) would otherwise resume with a best checkpoint that is not there: the HF Trainer drops
    it and saves its last checkpoint as the best, and a finished run's rerun saves the untrained weights. So the
    best is looked up beside the checkpoint, and a best checkpoint that is gone ends the command."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    best = state.get("best_model_checkpoint")
    if best is None or Path(best).resolve() == (checkpoint.parent / Path(best).name).resolve():
        here = None if best is None else Path(best)
    else:
        here = checkpoint.parent / Path(best).name
        state["best_model_checkpoint"] = str(here)
        paths.write_atomic(state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")
    if here is not None and not (here / "trainer_state.json").exists():
        raise OutputFolderError(f"{checkpoint.parent}: the run's best checkpoint, {here.name}, is missing, so the "
                                f"run cannot save its best model. Add --resume=false to train afresh, or pass "
                                f"--output_dir=<another folder>.")


def baseline_metrics(out: Path, compute: Callable[[], dict], curve_set: str) -> dict:
    """Metrics before training (the first stage's order, the untrained model), computed once per run and kept for
    resumes. The step-0 record of metrics.jsonl gets the untrained model's metrics on `curve_set` (the set of the
    evaluations during training) under the trainer's names, and the first stage's as first_stage_<metric>.
    Every process calls `compute` (its evaluations are split across them); the main process writes the files."""
    path = out / "baselines.json"
    done = path.exists()
    barrier()  # every process has looked before the main process may write the file (below)
    if done:
        return json.loads(path.read_text())
    res = compute()
    if is_main_process():
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        curve = res[curve_set]
        record = {"step": 0, **{f"eval_{curve_set}_{m}": v for m, v in curve["untrained"].items()},
                  **{f"first_stage_{m}": v for m, v in curve.get("first_stage", {}).items()}}
        jsonl = out / "metrics.jsonl"
        if not any(_step_zero(ln) for ln in (jsonl.read_text().splitlines() if jsonl.exists() else [])):
            with open(jsonl, "a") as f:  # once per run: a resume that recomputes the baselines keeps its record
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    return res


def _step_zero(line: str) -> bool:
    try:
        return json.loads(line).get("step") == 0
    except ValueError:
        return False


def merge(*tables: dict) -> dict:
    """{set: {system: metrics}} tables joined set by set (baselines, then the trained model's rows)."""
    out: dict = {}
    for table in tables:
        for name, row in table.items():
            out[name] = {**out.get(name, {}), **row} if isinstance(row, dict) else row
    return out


def teacher_description(data_dir: Path) -> str:
    """What the teacher scores of a data folder are: the bundled sample's are not the BERT-CAT ensemble's."""
    if paths.is_sample(data_dir):
        return "all-MiniLM-L6-v2 cosine x 20 (the bundled sample's stand-in, see data/sample/README.md)"
    return "BERT-CAT ensemble of Hofstaetter et al. (arXiv 2010.02666)"


def print_table(results: dict, title: str) -> None:
    """The metrics of every evaluation set in `results` ({set: {system: {metric: value}}}), one row per system."""
    sets = {k: v for k, v in results.items() if isinstance(v, dict) and v
            and all(isinstance(m, dict) and "MRR@10" in m for m in v.values())}
    cols = sorted({c for v in sets.values() for m in v.values() for c in m}, key=lambda c: (c != "MRR@10", c))
    print(f"\n{title}\n{'set':10}{'system':14}" + "".join(f"{c:>10}" for c in cols))
    for name, systems in sets.items():
        for system, m in systems.items():
            print(f"{name:10}{system:14}" + "".join(f"{m[c]:10.4f}" if c in m else f"{'':10}" for c in cols))


def save_model(trainer, model, out: Path) -> Path:
    """Save the (best) model atomically to out/model (the main process writes, the others wait for it).

    Evaluate the saved folder, not the in-memory model: the trainer leaves the latter's forward wrapped in its
    autocast (bf16 or fp16), so only the reloaded model scores in fp32, as the baselines were and as users will
    load it."""
    tmp, final = out / "model.tmp", out / "model"
    with main_process_first():
        if trainer.is_world_process_zero():
            old = out / "model.old"
            for stale in (tmp, old):
                shutil.rmtree(stale, ignore_errors=True)
            model.save_pretrained(str(tmp))
            if final.exists():
                os.replace(final, old)  # renames, not a delete: a crash leaves model/ or model.old/ whole, never half
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    return final


def report(trainer, out: Path, results: dict, title: str) -> None:
    """results.json, the metric plot and a printed table of the baselines and the trained model (main process)."""
    if not trainer.is_world_process_zero():
        return
    paths.write_atomic(out / "results.json", json.dumps(results, indent=1))
    plot_history(out / "metrics.jsonl", out / "metrics.png", trainer.args.metric_for_best_model)
    print_table(results, title)
