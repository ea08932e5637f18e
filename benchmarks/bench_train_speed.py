"""Training speed of each recipe: the stock trainer configuration against the project's, in one process.

    python benchmarks/bench_train_speed.py                           # CPU, offline base model, both presets, ~10 min
    python benchmarks/bench_train_speed.py --preset=sample --steps=3 # quicker
    python benchmarks/bench_train_speed.py --device=cuda --steps=50  # on a GPU (benchmarks/gpu_check.py runs it)

For each recipe (v1: BCE pairs, v2: MSE on teacher lines, bi: MNRL triplets) and preset (its --sample lengths and
batch size, or its full-scale defaults), the same model, data and samples per step run N optimizer steps through the
real sentence-transformers trainer in two configurations:
  (a) stock:   text rows, the trainer's default batch sampler and collator, the stock loss (which tokenizes);
  (b) project: id rows, the script's batch sampler (length-grouped for the cross-encoders), token-id batches cut into
               length chunks (msmarco/batching.py), the stock loss fed by them (on_token_batches), and the script's
               dropout and frozen embeddings (--freeze_embeddings; --dropout=base keeps the base model's dropout
               and trains every weight, as stock does).
Printed and written as JSON (--out) per recipe, preset and configuration: samples/s and real tokens/s; padded tokens
per real token (what the model was given / what was text and special tokens, counted at the model's input); host ms
per step (step wall time outside the model's forward and backward passes: data, collation, tokenization, optimizer,
trainer bookkeeping); peak memory (RSS on a CPU, reset between configurations; torch.cuda.max_memory_allocated on a
GPU); and the ratio b / a of samples/s. Then the data pipeline alone, no model: samples/s that one core feeds
(torch and tokenizers on one thread), the stock pipeline including its tokenization.
The first `--warmup` steps of each configuration are not timed. Each recipe and preset runs in a fresh process of its
own (--no-isolate: all in one), and --rounds=2 runs each configuration twice, stock, project, project, stock, the
figures their means: what a process's earlier runs leave behind then weighs on both configurations alike.
Also reported: model TFLOP/s of the real tokens (6 x non-embedding parameters per token plus attention) and, with
--peak_tflops, the MFU; losses that were not finite. --amp, --tf32, --attn, --cudnn_sdp, --pad_multiple,
--chunk_cost and --compile set the precision, attention kernels, cuDNN's SDPA backend, the project batches' shape
and its torch.compile mode, for A/B runs (benchmarks/gpu_check.py runs those on a GPU). By default each
configuration runs with its own backends: stock with torch's defaults, the project's with what the scripts set
under autocast (no cuDNN attention on a GPU, no flash attention on a CPU: msmarco.models).
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from msmarco.batching import PairBatches, TextBatches, batch_shape, on_token_batches  # noqa: E402
from msmarco.config import parse_cli  # noqa: E402
from msmarco.data import MSMarco, TeacherSamples  # noqa: E402
from msmarco.models import (cross_encoder, no_cpu_flash_attention, no_cudnn_attention, resolve_model,  # noqa: E402
                            set_dropout)
from msmarco.paths import resolve_dir  # noqa: E402
from msmarco.sampling import length_grouped_batches  # noqa: E402

SCRIPTS = {"v1": "train_cross-encoder-v1", "v2": "train_cross-encoder-v2", "bi": "train_bi-encoder-v2"}
LENGTH = {"v1": "max_length", "v2": "max_length", "bi": "max_seq_length"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def script_cfg(recipe: str, preset: str, a: argparse.Namespace):
    """The script's config: its --sample preset (lengths, batch) or its full-scale defaults, on a.data_dir."""
    mod = load_script(SCRIPTS[recipe])
    cfg = mod.Config()
    if preset == "sample":
        cfg = parse_cli(cfg.__class__(**{**cfg.__dict__, **mod.SAMPLE}), [])
    over = {"data_dir": a.data_dir, "model_name": a.model, "attn_implementation": a.attn}
    if a.max_length:
        over[LENGTH[recipe]] = a.max_length
    if a.batch_size:
        over["batch_size"] = a.batch_size
    return mod, cfg.__class__(**{**cfg.__dict__, **over})


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) / 1024


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux)
        except OSError:
            pass


class Meter:
    """Times the model's forward passes and the backward passes, and counts the real and padded tokens the model
    is given, through hooks on the model and a wrapper of the accelerator's backward."""

    def __init__(self, model, trainer, device: str):
        self.device = device
        self.fwd = self.bwd = 0.0
        self.real = self.padded = self.square = self.nonfinite = self.rows = 0
        self.step_times: list[float] = []
        self._t = 0.0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)
        backward = trainer.accelerator.backward

        def timed_backward(loss, **kw):
            self.nonfinite += int(not torch.isfinite(loss.detach()).all())
            self._sync()
            t = time.perf_counter()
            backward(loss, **kw)
            self._sync()
            self.bwd += time.perf_counter() - t
        trainer.accelerator.backward = timed_backward

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # not traced by torch.compile: its hooks would otherwise be compiled with the model (recompiled on every call,
    # and a device sync inside a CUDA graph capture)
    @torch.compiler.disable
    def _pre(self, module, args, kwargs):
        if module.training:
            features = args[0] if args else kwargs.get("input")
            mask = features["attention_mask"]
            lengths = mask.sum(1)
            self.real += int(lengths.sum())
            self.square += int((lengths.double() ** 2).sum())  # attention's work grows with each length squared
            self.padded += int(mask.numel())
            self._sync()
            self._t = time.perf_counter()

    @torch.compiler.disable
    def _post(self, module, args, kwargs, output):
        if module.training:
            self._sync()
            self.fwd += time.perf_counter() - self._t

    def reset(self):
        self.fwd = self.bwd = 0.0
        self.real = self.padded = self.square = self.nonfinite = 0


def make_trainer(recipe: str, mod, cfg, config: str, device: str, steps: int, seed: int, amp: str = "none",
                 pad_multiple: int = -1, chunk_cost: int = -1, dropout: float = -1.0, compile_mode: str = "",
                 freeze_embeddings: bool = False):
    """A trainer for `steps` steps of `config` ("stock" or "project"), without evaluation or checkpoints; `dropout`:
    the model's dropout (set_dropout; -1 keeps the base model's); `compile_mode`: the trainer's torch.compile mode
    ("": none), as the scripts' --compile_mode; `freeze_embeddings`: a cross-encoder trains without its embedding
    layer, as the scripts' --freeze_embeddings."""
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, MSELoss
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    data = MSMarco(cfg.data_dir)
    torch.manual_seed(seed)
    common = dict(output_dir=str(REPO / "output" / "bench_train_speed"), max_steps=steps,
                  per_device_train_batch_size=cfg.batch_size, learning_rate=1e-5, warmup_steps=0,
                  save_strategy="no", eval_strategy="no", logging_steps=10**6, report_to="none", seed=seed,
                  use_cpu=device == "cpu", bf16=amp == "bf16", fp16=amp == "fp16", disable_tqdm=True,
                  torch_compile_mode=compile_mode or None)
    shape = batch_shape(getattr(cfg, LENGTH[recipe]), pad_multiple, chunk_cost)
    if recipe in ("v1", "v2"):
        model = cross_encoder(cfg.model_name, cfg.max_length, cfg.pooling, activation=torch.nn.Identity(),
                              attn=cfg.attn_implementation, dropout=dropout,
                              freeze_embeddings=freeze_embeddings).to(device)
        if recipe == "v1":
            ids = mod.training_pairs(data, cfg)
            resolve, stock_loss = None, BinaryCrossEntropyLoss(model)
        else:
            lines, _ = mod.teacher_split(data, cfg)
            ids = mod.training_samples(data, lines, "mse")
            resolve, stock_loss = TeacherSamples(data, margin=False), MSELoss(model)
        batches = PairBatches(data, model.tokenizer, shape, resolve=resolve)
        if config == "stock":
            queries, collection = data.queries("train"), data.collection()
            pairs_of = resolve or (lambda c: (c["qid"], c["pid"], c["label"]))

            def to_text(batch):
                qids, pids, labels = pairs_of({k: np.asarray(v) for k, v in batch.items()})
                return {"query": queries.get_many(qids), "passage": collection.get_many(pids),
                        "label": np.asarray(labels, np.float32).tolist()}
            kw = dict(train_dataset=ids.with_transform(to_text), loss=stock_loss)
        else:
            kw = dict(train_dataset=ids, loss=on_token_batches(stock_loss), data_collator=batches)
            common["batch_sampler"] = length_grouped_batches(batches.row_lengths, cfg.length_window)
        trainer = CrossEncoderTrainer(model=model, args=CrossEncoderTrainingArguments(**common), **kw)
    else:
        t = Transformer(resolve_model(cfg.model_name), max_seq_length=cfg.max_seq_length,
                        model_kwargs={"attn_implementation": cfg.attn_implementation})
        model = SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean")]).to(device)
        set_dropout(model, dropout)
        positives, negatives = mod.training_queries(data, cfg)
        rows = mod.rotation(positives, negatives, 1, cfg.seed)
        ids = mod.training_triplets(rows)
        loss = MultipleNegativesRankingLoss(model, scale=mod.loss_scale(cfg))
        if config == "stock":
            queries, collection = data.queries("train"), data.collection()

            def to_text(batch):
                return {"query": queries.get_many(batch["qid"]), "positive": collection.get_many(batch["pos"]),
                        "negative": collection.get_many(batch["neg"])}
            kw = dict(train_dataset=ids.with_transform(to_text), loss=loss)
        else:
            batches = TextBatches(data, model.tokenizer, shape)
            kw = dict(train_dataset=ids, loss=on_token_batches(loss), data_collator=batches)
            common["batch_sampler"] = functools.partial(mod.EpochBlockSampler, rows_per_epoch=len(positives))
        trainer = SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**common), **kw)
    return trainer, model


def run_config(recipe, mod, cfg, config, a) -> dict:
    from transformers import TrainerCallback
    dropout = cfg.dropout if config == "project" and a.dropout == "script" else -1.0
    freeze = config == "project" and a.dropout == "script" and getattr(cfg, "freeze_embeddings", False)
    compile_mode = a.compile if config == "project" else ""
    if a.device == "cuda":  # torch's default, then what this configuration changes
        torch.backends.cuda.enable_cudnn_sdp(True)
        if a.cudnn_sdp == "off" or (a.cudnn_sdp == "by_config" and config == "project" and a.amp != "none"):
            no_cudnn_attention()
    else:  # the same on a CPU: its flash kernel, unless the scripts take it out (bf16 autocast)
        torch.backends.cuda.enable_flash_sdp(True)
        if config == "project" and a.amp == "bf16":
            no_cpu_flash_attention()
    trainer, model = make_trainer(recipe, mod, cfg, config, a.device, a.warmup + a.steps, a.seed, a.amp,
                                  a.pad_multiple, a.chunk_cost, dropout, compile_mode, freeze)
    meter = Meter(model, trainer, a.device)
    pending = collections.deque()  # rows of each batch, in the order the steps take them (accelerate fetches ahead)

    class Counted:
        """The trainer's collator (its attributes too, which the trainer reads), counting each batch's rows."""
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, features):
            batch = self.inner(features)
            pending.append(rows_in(batch))
            return batch
    trainer.data_collator = Counted(trainer.data_collator)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter._sync()
            self.t = time.perf_counter()
            if state.global_step == a.warmup:
                meter.reset()
                reset_peak(a.device)

        def on_step_end(self, args, state, control, **kw):
            meter._sync()
            rows = pending.popleft() if pending else cfg.batch_size
            if state.global_step > a.warmup:
                meter.step_times.append(time.perf_counter() - self.t)
                meter.rows += rows
    trainer.add_callback(Steps())
    gc.collect()  # the previous run's trainer and model (reference cycles) out of this run's peak
    if a.device == "cuda":
        torch.cuda.empty_cache()
    reset_peak(a.device)
    trainer.train()
    wall = sum(meter.step_times)
    n = len(meter.step_times)
    samples = meter.rows  # not steps x batch size: an epoch's last batch can be short (the bi-encoder's rotation)
    flops = model_flops(model, meter.real, meter.square) / wall
    out = {"steps": n, "samples": samples, "samples_per_s": samples / wall, "real_tokens_per_s": meter.real / wall,
           "model_tflops_per_s": flops / 1e12, "mfu": flops / (a.peak_tflops * 1e12) if a.peak_tflops else None,
           "nonfinite_losses": meter.nonfinite,
           "padded_per_real": meter.padded / max(1, meter.real),
           "host_ms_per_step": 1000 * (wall - meter.fwd - meter.bwd) / n,
           "forward_ms_per_step": 1000 * meter.fwd / n, "backward_ms_per_step": 1000 * meter.bwd / n,
           "peak_mib": peak_mib(a.device)}
    if a.device == "cuda":
        out["cudnn_sdp"] = torch.backends.cuda.cudnn_sdp_enabled()
    out["pipeline_samples_per_s"] = pipeline_rate(trainer, model, recipe, config, a.pipeline_batches)
    del trainer, model
    return out


def measure(recipe: str, preset: str, a: argparse.Namespace) -> dict:
    """One recipe and preset: each configuration run a.rounds times, the order reversed every other round, so that
    what a process's earlier runs leave behind (its heap, caches, threads) weighs on both configurations alike."""
    mod, cfg = script_cfg(recipe, preset, a)
    row = {"recipe": recipe, "preset": preset, "max_length": getattr(cfg, LENGTH[recipe]),
           "batch_size": cfg.batch_size, "project_dropout": cfg.dropout if a.dropout == "script" else -1.0,
           "project_freeze_embeddings": a.dropout == "script" and getattr(cfg, "freeze_embeddings", False),
           "pid": os.getpid()}
    configs = a.configs.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for i in range(a.rounds):
        for config in configs if i % 2 == 0 else configs[::-1]:
            runs[config].append(run_config(recipe, mod, cfg, config, a))
    for config, rs in runs.items():
        row[config] = combine(rs)
    if "stock" in row and "project" in row:
        row["ratio"] = row["project"]["samples_per_s"] / row["stock"]["samples_per_s"]
        if a.rounds > 1:
            row["round_ratios"] = [p["samples_per_s"] / s["samples_per_s"]
                                   for p, s in zip(runs["project"], runs["stock"])]
    return row


def combine(runs: list[dict]) -> dict:
    """One configuration's figures over its rounds: rates and times are means; steps, samples and non-finite losses
    sums; peak memory the highest."""
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    for key, value in out.items():
        values = [r[key] for r in runs]
        if key in ("steps", "samples", "nonfinite_losses"):
            out[key] = sum(values)
        elif key == "peak_mib":
            out[key] = max(values)
        elif isinstance(value, float):
            out[key] = sum(values) / len(values)
    out["rounds"] = len(runs)
    return out


def isolated(recipe: str, preset: str, argv: list[str]) -> dict:
    """measure() in a fresh process: in one process, the recipe measured second ran its project configuration 5-10%
    slower than when measured first (v1 and v2 sample presets on 2 CPU cores, 2026-12-06), and the ratio with it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, f"--recipes={recipe}",
                        f"--preset={preset}", "--no-isolate", f"--out={out}"], check=True)
        return json.loads(out.read_text())["runs"][0]


def model_flops(model, real_tokens: int, square_lengths: int) -> float:
    """Training FLOPs of the real tokens: 6 x the non-embedding parameters per token (forward 2, backward 4), plus
    attention's 12 x layers x hidden x (sum of squared sequence lengths) (scores and weighted sums, forward and
    backward). Padding is not counted: this is the useful work."""
    config = getattr(model[0], "auto_model", model[0]).config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 6.0 * params * real_tokens + 12.0 * config.num_hidden_layers * config.hidden_size * square_lengths


def pipeline_rate(trainer, model, recipe: str, config: str, batches: int) -> float:
    """Samples/s of the data pipeline alone on one core: sampler, dataset rows, collation; for the stock
    cross-encoders also the tokenization that their loss does (model.preprocess)."""
    threads, parallelism = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        loader = trainer.get_train_dataloader()
        n, t = 0, time.perf_counter()
        for i, batch in enumerate(loader):
            if config == "stock" and recipe in ("v1", "v2"):
                model.preprocess(list(zip(batch["query"], batch["passage"])))
            n += rows_in(batch)
            if i + 1 >= batches:
                break
        return n / (time.perf_counter() - t)
    finally:  # the next configuration or recipe of this process tokenizes as it would alone
        torch.set_num_threads(threads)
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def rows_in(batch: dict) -> int:
    """Rows of a collated batch: its labels, or its queries (stock input ids, or a token batch's row order)."""
    for key in ("label", "query_order", "query_input_ids"):
        if key in batch:
            return len(batch[key])
    raise KeyError(f"cannot count the rows of a batch with keys {sorted(batch)}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="v1,v2,bi")
    p.add_argument("--preset", choices=["sample", "full", "both"], default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="offline:all-MiniLM-L6-v2")
    p.add_argument("--data_dir", default="data/sample")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--max_length", type=int, default=0, help="override the preset's sequence length")
    p.add_argument("--batch_size", type=int, default=0, help="override the preset's batch size")
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="the trainer's mixed precision")
    p.add_argument("--cudnn_sdp", choices=["by_config", "on", "off"], default="by_config",
                   help="cuDNN's SDPA backend: by_config (stock: torch's default, on; project: the scripts' choice, "
                        "off under autocast), or on / off for both")
    p.add_argument("--tf32", action="store_true", help="fp32 matrix products on TF32 tensor cores (GPU)")
    p.add_argument("--pad_multiple", type=int, default=-1, help="project batches' padding multiple (-1: by device)")
    p.add_argument("--chunk_cost", type=int, default=-1, help="project batches' chunk cost (-1: by device)")
    p.add_argument("--configs", default="stock,project", help="which configurations to run")
    p.add_argument("--rounds", type=int, default=1, help="runs of each configuration, the order reversed every "
                   "other round (2: stock, project, project, stock); figures are their means")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each recipe and preset in a fresh process of its own (--no-isolate: all in this one)")
    p.add_argument("--compile", default="", help="the project configuration under torch.compile with this mode "
                   "(default, reduce-overhead: CUDA graphs, max-autotune); the warm-up steps take the compilations")
    p.add_argument("--dropout", choices=["script", "base"], default="script",
                   help="the project configuration's dropout and frozen embeddings: the script's (its --sample "
                        "preset turns dropout off) or "
                        "the base model's, as stock keeps it (then the ratio is the batches' alone)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak for the MFU (0: no MFU)")
    p.add_argument("--pipeline_batches", type=int, default=100, help="batches drawn to time the data pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be 1 or more, not {a.rounds}")
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results = {"settings": {k: v for k, v in vars(a).items() if k != "out"}, "device": a.device, "model": a.model,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    if a.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    presets = ["sample", "full"] if a.preset == "both" else [a.preset]
    pairs = [(recipe, preset) for recipe in a.recipes.split(",") for preset in presets]
    for recipe, preset in pairs:
        if a.isolate and len(pairs) > 1:
            row = isolated(recipe, preset, sys.argv[1:] if argv is None else argv)
        else:
            row = measure(recipe, preset, a)
            print_row(row, flush=True)
        results["runs"].append(row)
        if a.out:  # after every recipe: a run cut by a short GPU window keeps the recipes it finished
            out = resolve_dir(a.out)  # a relative --out is taken from the repository, as the scripts' folders are
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    return results


def print_row(row: dict, flush: bool = False) -> None:
    drop = row.get("project_dropout", -1.0)
    head = (f"{row['recipe']} {row['preset']} (length {row['max_length']}, batch {row['batch_size']}"
            + (f"; project dropout {drop:g}" if drop >= 0 else "")
            + ("; project embeddings frozen" if row.get("project_freeze_embeddings") else "") + ")")
    print(f"\n{head}" + (f": project / stock = {row['ratio']:.2f}x samples/s" if "ratio" in row else ""))
    print(f"{'':9}{'samples/s':>10}{'tokens/s':>10}{'pad/real':>9}{'host ms':>9}{'fwd ms':>9}{'bwd ms':>9}"
          f"{'peak MiB':>10}{'pipeline/s':>11}{'TFLOP/s':>9}{'MFU':>7}")
    for config in [c for c in ("stock", "project") if c in row]:
        r = row[config]
        print(f"{config:9}{r['samples_per_s']:10.2f}{r['real_tokens_per_s']:10.0f}{r['padded_per_real']:9.2f}"
              f"{r['host_ms_per_step']:9.1f}{r['forward_ms_per_step']:9.1f}{r['backward_ms_per_step']:9.1f}"
              f"{r['peak_mib']:10.0f}{r['pipeline_samples_per_s']:11.0f}{r['model_tflops_per_s']:9.3f}"
              + (f"{r['mfu']:7.1%}" if r["mfu"] is not None else f"{'':7}"), flush=flush)


if __name__ == "__main__":
    main()
