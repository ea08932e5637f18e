"""A script's configuration: its `Config` dataclass, the --sample preset, and `--key=value` overrides from the command
line, converted to each field's type. An unknown key or a bad value ends the script with a message that lists the
valid options (exit code 1)."""
from __future__ import annotations

import dataclasses
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
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise ValueError(f"--{key} needs a value")
            changes[key] = _convert(value, fields[key], key)
            i += 1
    except ValueError as e:
        raise SystemExit(f"error: {e}\nvalid options (current values):\n{valid}") from None
    return dataclasses.replace(cfg, **changes)


def script_config(default, sample_preset: dict, argv: list[str] | None = None):
    """The config of a script run: defaults, then the sample preset if --sample, then the --key=value overrides.
    --help lists the values the run would use (with --sample, the preset's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_cli(default, [a for a in argv if a not in ("--help", "-h")])
    base = dataclasses.replace(default, **sample_preset, sample=True) if cfg.sample else default
    return parse_cli(base, argv)
