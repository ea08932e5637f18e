"""The README's commands are its scripts' docstring commands, and a test runs each one.

Here: `--help`, and every training command that sets fields, on the bundled sample with a tiny budget (a full-scale
run needs the full downloads and a GPU); the sample evaluation with a tiny budget. Elsewhere, named by the test
below: the three `--sample` runs (test_sample_runs.py), the two-process torchrun (test_distributed.py), the bare
full-scale commands' code on the sample (test_scripts.py's tiny runs), the set-up and test commands (.ci/run). The
8-GPU launcher lines cannot run here: their arguments are checked with the launchers' own parsers.
"""
import ast
import dataclasses
import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from msmarco import config
from test_distributed import TORCHRUN
from test_sample_runs import MARGINS
from test_scripts import TINY, TINY_LEN, load

SCRIPTS = ["train_cross-encoder-v1.py", "train_cross-encoder-v2.py", "train_bi-encoder-v2.py", "evaluate.py"]


def _argv(line: str) -> tuple[str, ...]:
    return tuple(shlex.split(line, comments=True))


def readme_commands() -> list[tuple[str, ...]]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [_argv(line) for block in blocks for line in block.splitlines() if _argv(line)]


def docstring_commands(script: str) -> list[tuple[str, ...]]:
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text()))
    return [_argv(line) for line in doc.splitlines() if re.match(r"\s+(python|torchrun|accelerate) ", line)]


def script_of(argv) -> str | None:
    return next((a for a in argv if a.endswith(".py")), None)


def kind(argv) -> str:
    """Which test runs a README command."""
    script = script_of(argv)
    if script is None:
        return "ci"  # the set-up and the test command
    if argv[0] in ("torchrun", "accelerate"):
        return "launcher"
    if "--help" in argv:
        return "help"
    if script == "evaluate.py":
        return "evaluate"
    if argv[2:] == ("--sample",):
        return "sample run"
    return "training"


def test_readme_and_docstrings_show_the_same_commands():
    readme = readme_commands()
    for script in SCRIPTS:
        assert docstring_commands(script), script
        assert set(docstring_commands(script)) == {c for c in readme if script_of(c) == script}, script


def test_every_readme_command_has_its_test():
    readme = readme_commands()
    assert {script_of(c) for c in readme} - {None} == set(SCRIPTS)
    ci = (ROOT / ".ci" / "run").read_text()
    for argv in readme:
        k = kind(argv)
        if k == "ci":  # .ci/run installs what the set-up line installs, then runs exactly the test command
            if "pytest" in argv:
                assert ci.rstrip().splitlines()[-1] == shlex.join(argv)
            else:
                wanted = [argv[i + 1] for i, a in enumerate(argv) if a == "-r"]
                assert wanted and f"install -q -r {' -r '.join(wanted)}" in ci, argv
        elif k == "sample run":
            assert argv[:2] == ("python", script_of(argv)) and script_of(argv) in MARGINS
        elif k == "launcher" and "--sample" in argv:
            assert argv[0] == "torchrun" and TORCHRUN[0] == "--sample"  # test_distributed.py, with a tiny budget
    kinds = {kind(c) for c in readme}
    assert kinds == {"ci", "sample run", "training", "help", "evaluate", "launcher"}, kinds


def test_launcher_lines_parse_with_the_launchers_own_parsers():
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    launchers = [c for c in readme_commands() if kind(c) == "launcher"]
    assert len(launchers) >= 3
    for argv in launchers:
        script = script_of(argv)
        if argv[0] == "torchrun":
            args = get_args_parser().parse_args(list(argv[1:]))
            assert args.training_script == script and args.nproc_per_node in ("2", "8")
        else:
            args = launch_command_parser().parse_args(list(argv[2:]))
            assert args.training_script == script and args.num_processes == 8 and args.multi_gpu
        mod = load(script[:-3])
        config.script_config(mod.Config(), mod.SAMPLE, list(argv[argv.index(script) + 1:]))  # its fields parse


@pytest.fixture(scope="module")
def helps():
    """The three `--help` commands at once (each is mostly imports, on one core)."""
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in SCRIPTS[:3]}
    return {s: (p, *p.communicate(timeout=300)) for s, p in procs.items()}


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_help_lists_every_field_and_exits_0(script, helps):
    assert ("python", script, "--help") in readme_commands()
    proc, stdout, stderr = helps[script]
    assert proc.returncode == 0, stderr[-2000:]
    mod = load(script[:-3])
    fields = [f.name for f in dataclasses.fields(mod.Config)]
    for name in fields:
        assert f"--{name}" in stdout + stderr, name


TRAINING = sorted({c for c in readme_commands() if kind(c) == "training" and len(c) > 2})


@pytest.mark.parametrize("argv", TRAINING, ids=lambda c: " ".join(c[1:]))
def test_training_commands_that_set_fields_train_with_a_tiny_budget(argv, tmp_path):
    """The command's own fields, on the bundled sample, with the tests' budget fields (steps, batch size, lengths)
    after them: the fields it names train, evaluate and save."""
    name = argv[1][:-3]
    mod = load(name)
    budget = [*TINY, *TINY_LEN[name], f"--output_dir={tmp_path / 'out'}"]
    cfg = config.script_config(mod.Config(), mod.SAMPLE, ["--sample", *argv[2:], *budget])
    budget_keys = {a.split("=", 1)[0] for a in budget}
    own = dict(a[2:].split("=", 1) for a in argv[2:] if a.split("=", 1)[0] not in budget_keys)
    assert own, argv  # the command sets fields the budget leaves alone
    for key, value in own.items():
        assert getattr(cfg, key) == getattr(config.parse_cli(mod.Config(), [f"--{key}={value}"]), key), key
    res = mod.main(cfg)
    assert res["dev-test"]["trained"]["MRR@10"] >= 0 and (tmp_path / "out" / "model" / "config.json").exists()


def test_sample_evaluation_command_with_a_tiny_budget(tmp_path):
    argv = next(c for c in readme_commands() if kind(c) == "evaluate" and "--sample" in c)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, *argv[1:], "--max_queries=5", "--max_length=4", "--depth=20",
                           "--splits=dev", f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dev" in json.loads((out / "metrics.json").read_text())["splits"]


def test_full_scale_evaluation_commands_parse():
    """They need trained models and the full downloads (test_evaluate_cli.py runs the same code on the sample)."""
    mod = load("evaluate")
    full = [c for c in readme_commands() if kind(c) == "evaluate" and "--sample" not in c]
    assert len(full) == 3
    for argv in full:
        cfg = config.parse_cli(mod.Config(), list(argv[2:]))
        assert cfg.model.startswith("output/train_") and not cfg.sample
