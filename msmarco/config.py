"""A script's configuration: its `Config` dataclass, the --sample preset, and `--key=value` overrides from the command
line, converted to each field's type and checked against the fields' ranges and choices. An unknown key or a bad value
ends the script with a message that lists the valid options (exit code 1), before anything is read or written."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import types
import typing


def _convert(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} takes true or false, not {value!r}")
    if typing.get_origin(typ) in (tuple, list):
        inner = typing.get_args(typ)[0] if typing.get_args(typ) else str
        items = [_convert(v.strip(), inner, key) for v in value.split(",") if v.strip()]
        return tuple(items) if typing.get_origin(typ) is tuple else items
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{key} takes a {getattr(typ, '__name__', typ)}, not {value!r}") from None


def parse_cli(cfg, argv: list[str] | None = None):
    """Apply `--key=value` (or `--key value`; `--flag` alone means true) to a config dataclass instance.

    Values are converted to the field's type; an unknown key or a bad value exits with a message listing
    the valid keys. Returns a new instance."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cfg)}
    changes, i = {}, 0
    valid = "\n".join(f"  --{k}={getattr(cfg, k)!r}  ({getattr(v, '__name__', str(v))})" for k, v in fields.items())
    if "--help" in argv or "-h" in argv:
        print(f"options (current values):\n{valid}")
        raise SystemExit(0)
    try:
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                raise ValueError(f"unknown option --{key}")
            if not eq:
                if fields[key] is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                    value = "true"
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):  # else `--output_dir --sample`
                    i += 1                                                    # would write to a folder "--sample"
                    value = argv[i]
                else:
                    raise ValueError(f"--{key} needs a value (--{key}=value)")
            changes[key] = _convert(value, fields[key], key)
            i += 1
    except ValueError as e:
        raise SystemExit(f"error: {e}\nvalid options (current values):\n{valid}") from None
    return dataclasses.replace(cfg, **changes)


# The ranges and choices of the fields the scripts share, by name. They are checked when the command is parsed, before
# anything is written: a mistyped value must neither replace a finished run (run.start_run) nor end a run later in a
# library's traceback. -1 stays allowed where it is a field's default ("all", "the model's own", "by device").
AT_LEAST_1 = ("batch_size", "eval_steps", "logging_steps", "neg_per_pos", "epochs", "max_pairs", "max_lines",
              "max_triples", "eval_queries", "mini_batch_size", "depth", "encode_chunk", "max_length", "max_seq_length",
              "retrieval_k", "length_window", "negs_per_system", "max_steps", "max_queries", "pad_multiple",
              "chunk_cost")
AT_LEAST_0 = ("warmup_steps", "random_negatives", "eval_candidates", "heldout_queries", "weight_decay",
              "eval_max_seq_length", "save_total_limit", "scale")
CHOICES = {"pooling": ("cls", "mean"), "negatives": ("triples", "hard"), "similarity": ("cosine", "dot"),
           "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
           "compile_mode": ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           "report_to": ("none", "tensorboard", "wandb", "all")}
NOT_EMPTY = ("data_dir", "output_dir", "model_name")  # where the default names one: "" would be the repository root
REPORT_SPLITS = ("dl2019", "dl2020")


def check(cfg, default) -> None:
    """Raise ValueError for a field outside its range or choices (the names above; fields a config lacks are
    skipped)."""
    has = {f.name for f in dataclasses.fields(cfg)}
    if "seed" in has and not 0 <= cfg.seed < 2 ** 32:
        raise ValueError(f"--seed must be in 0..2**32-1 (numpy's and torch's seeds), not {cfg.seed}")
    for key in has & set(AT_LEAST_1):
        v = getattr(cfg, key)
        if v < 1 and not (v == -1 == getattr(default, key)):
            raise ValueError(f"--{key} must be 1 or more" + (" (or -1)" if getattr(default, key) == -1 else "")
                             + f", not {v}")
    for key in has & set(AT_LEAST_0):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key} must be 0 or more, not {getattr(cfg, key)}")
    for key in has & set(CHOICES):
        if getattr(cfg, key) not in CHOICES[key]:
            raise ValueError(f"--{key} must be one of {', '.join(map(repr, CHOICES[key]))}, not {getattr(cfg, key)!r}")
    for key in has & set(NOT_EMPTY):
        if getattr(default, key) and not str(getattr(cfg, key)).strip():
            raise ValueError(f"--{key} must not be empty (the default is {getattr(default, key)!r})")
    if "lr" in has and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a positive number, not {cfg.lr}")
    if "dropout" in has and not (cfg.dropout == -1 or 0 <= cfg.dropout < 1):
        raise ValueError(f"--dropout must be in [0, 1), or -1 for the base model's own, not {cfg.dropout}")
    if "report_to" in has and (need := {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(
            cfg.report_to)) and not any(importlib.util.find_spec(m) for m in need):  # else the trainer fails late
        raise ValueError(f"--report_to={cfg.report_to} needs the package {' or '.join(need)}: pip install {need[0]}")
    if "report_splits" in has and (bad := [s for s in cfg.report_splits if s not in REPORT_SPLITS]):
        raise ValueError(f"--report_splits takes TREC DL years among {', '.join(REPORT_SPLITS)}, not {bad}")
    if {"random_negatives", "neg_per_pos"} <= has and cfg.random_negatives > cfg.neg_per_pos:
        raise ValueError(f"--random_negatives ({cfg.random_negatives}) is a share of --neg_per_pos "
                         f"({cfg.neg_per_pos}): at most that many")
    for key in sorted(has):  # nan passes every comparison above as False: --ce_margin=nan would keep every negative
        if isinstance(getattr(cfg, key), float) and not math.isfinite(getattr(cfg, key)):
            raise ValueError(f"--{key} must be a finite number, not {getattr(cfg, key)}")


def script_config(default, sample_preset: dict, argv: list[str] | None = None):
    """The config of a script run: defaults, then the sample preset if --sample, then the --key=value overrides.
    --help lists the values the run would use (with --sample, the preset's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_cli(default, [a for a in argv if a not in ("--help", "-h")])
    base = dataclasses.replace(default, **sample_preset, sample=True) if cfg.sample else default
    cfg = parse_cli(base, argv)
    try:
        check(cfg, default)
    except ValueError as e:
        raise SystemExit(f"error: {e}\n(--help lists every option with the value a run would use)") from None
    return cfg
