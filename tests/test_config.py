"""`--key=value` overrides of a config dataclass (msmarco/config.py): typed values, clear errors listing the options."""
import dataclasses
import importlib.util
import re

import pytest

from msmarco import config


@dataclasses.dataclass
class Cfg:
    lr: float = 2e-5
    flag: bool = False
    x: bool = True
    epochs: int = 1
    names: tuple[str, ...] = ("a",)
    sizes: tuple[int, ...] = (1, 2)
    out: str = "output"
    limit: int | None = None


def test_parse_cli_values():
    c = config.parse_cli(Cfg(), ["--lr=7e-6", "--flag", "--x=false", "--names=b, c", "--sizes=3,4,5",
                             "--epochs", "4", "--out", "somewhere", "--limit=7"])
    assert c == Cfg(lr=7e-6, flag=True, x=False, epochs=4, names=("b", "c"), sizes=(3, 4, 5),
                    out="somewhere", limit=7)
    assert type(c.lr) is float and type(c.epochs) is int and type(c.sizes[0]) is int
    assert config.parse_cli(Cfg(), []) == Cfg()
    assert config.parse_cli(Cfg(), ["--flag", "--x=no"]) == Cfg(flag=True, x=False)
    assert config.parse_cli(Cfg(), ["--x"]).x is True
    assert config.parse_cli(Cfg(limit=3), ["--limit=none"]).limit is None


def test_parse_cli_returns_new_instance():
    cfg = Cfg()
    new = config.parse_cli(cfg, ["--epochs=3"])
    assert cfg.epochs == 1 and new.epochs == 3


def test_parse_cli_unknown_key():
    with pytest.raises(SystemExit) as e:
        config.parse_cli(Cfg(), ["--nope=1"])
    msg = str(e.value.code)
    assert "--nope" in msg
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}=" in msg


@pytest.mark.parametrize("argv, key", [(["--lr=abc"], "--lr"), (["--epochs=1.5"], "--epochs"),
                                       (["--flag=maybe"], "--flag"), (["--sizes=1,x"], "--sizes"),
                                       (["--epochs"], "--epochs"), (["--lr", "--epochs=2"], "--lr needs a value")])
def test_parse_cli_bad_value(argv, key):
    with pytest.raises(SystemExit) as e:
        config.parse_cli(Cfg(), argv)
    assert key in str(e.value.code)


def test_an_option_without_its_value_does_not_take_the_next_option():
    """`--output_dir --sample` would otherwise write to a folder named "--sample" and run at full scale; a negative
    number after a space is still a value."""
    with pytest.raises(SystemExit, match="--lr needs a value"):
        config.parse_cli(Cfg(), ["--lr", "--flag"])
    assert config.parse_cli(Cfg(), ["--lr", "-1e-5"]).lr == -1e-5


def test_parse_cli_positional_argument():
    with pytest.raises(SystemExit, match="unexpected argument"):
        config.parse_cli(Cfg(), ["lr=1"])


@dataclasses.dataclass
class ScriptCfg:
    sample: bool = False
    lr: float = 2e-5
    data_dir: str = "data"


def test_script_config_applies_the_sample_preset_and_help_shows_its_values(capsys):
    """--sample swaps in the preset, then --key=value overrides it; --help lists the values this run would use."""
    preset = {"lr": 1e-4, "data_dir": "data/sample"}
    assert config.script_config(ScriptCfg(), preset, []) == ScriptCfg()
    assert config.script_config(ScriptCfg(), preset, ["--sample", "--lr=3e-4"]) == ScriptCfg(True, 3e-4, "data/sample")
    for argv, shown in ([["--help"], "--data_dir='data'"], [["--sample", "--help"], "--data_dir='data/sample'"]):
        with pytest.raises(SystemExit) as e:
            config.script_config(ScriptCfg(), preset, argv)
        assert e.value.code == 0 and shown in capsys.readouterr().out


SCRIPTS = ["train_cross-encoder-v1", "train_cross-encoder-v2", "train_bi-encoder-v2", "evaluate"]


@pytest.mark.parametrize("argv, says", [
    (["--batch_size=0"], "--batch_size must be 1 or more, not 0"),
    (["--max_steps=0"], "--max_steps must be 1 or more (or -1), not 0"),
    (["--lr=nan"], "--lr must be a positive number"),
    (["--lr=-1e-5"], "--lr must be a positive number"),
    (["--report_to=foo"], "--report_to must be one of"),
    (["--output_dir="], "--output_dir must not be empty"),
    (["--data_dir= "], "--data_dir must not be empty"),
    (["--dropout=1.5"], "--dropout must be in [0, 1)"),
    (["--eval_candidates=-1"], "--eval_candidates must be 0 or more"),
    (["--report_splits=dl2021"], "--report_splits takes TREC DL years among dl2019, dl2020"),
    (["--attn_implementation=foo"], "--attn_implementation must be one of"),
    (["--compile_mode=fast"], "--compile_mode must be one of"),
])
@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_out_of_range_values_end_the_command_before_it_starts(script, argv, says):
    """Checked when the command is parsed, before run.start_run may replace a finished run: a mistyped value must
    change nothing, and must not surface later as a library's traceback."""
    from test_scripts import load
    mod = load(script)
    for preset in ([], ["--sample"]):
        with pytest.raises(SystemExit, match=re.escape(says)):
            config.script_config(mod.Config(), mod.SAMPLE, preset + argv)


def test_a_reporter_that_is_not_installed_ends_the_command_before_it_starts(monkeypatch):
    """--report_to=wandb without wandb failed in the trainer's setup, after the folder's finished run was replaced."""
    from test_scripts import load
    mod = load("train_cross-encoder-v1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match="--report_to=wandb needs the package wandb: pip install wandb"):
        config.script_config(mod.Config(), mod.SAMPLE, ["--sample", "--report_to=wandb"])
    config.script_config(mod.Config(), mod.SAMPLE, ["--sample", "--report_to=tensorboard"])  # tensorboardX: in dev


@pytest.mark.parametrize("script, argv, says", [
    ("train_cross-encoder-v1", ["--negatives=hrad"], "--negatives must be one of 'triples', 'hard'"),
    ("train_cross-encoder-v1", ["--neg_per_pos=1", "--random_negatives=2"], "at most that many"),
    ("train_cross-encoder-v1", ["--max_length=-1"], "--max_length must be 1 or more, not -1"),
    ("train_cross-encoder-v1", ["--pooling=max"], "--pooling must be one of 'cls', 'mean'"),
    ("train_cross-encoder-v2", ["--max_lines=0"], "--max_lines must be 1 or more (or -1)"),
    ("train_cross-encoder-v2", ["--heldout_queries=-5"], "--heldout_queries must be 0 or more"),
    ("train_bi-encoder-v2", ["--mini_batch_size=0"], "--mini_batch_size must be 1 or more"),
    ("train_bi-encoder-v2", ["--similarity=l2"], "--similarity must be one of"),
    ("train_bi-encoder-v2", ["--scale=-5"], "--scale must be 0 or more"),
    ("train_bi-encoder-v2", ["--ce_margin=nan"], "--ce_margin must be a finite number"),  # nan would keep every one
    ("train_cross-encoder-v1", ["--ce_margin=inf"], "--ce_margin must be a finite number"),
    ("train_cross-encoder-v2", ["--seed=-1"], "--seed must be in 0..2**32-1"),
    ("evaluate", ["--depth=0"], "--depth must be 1 or more, not 0"),
    ("evaluate", ["--max_queries=0"], "--max_queries must be 1 or more (or -1)"),
    ("evaluate", ["--max_length=-5"], "--max_length must be 1 or more (or -1)"),
])
def test_each_scripts_own_fields_are_checked(script, argv, says):
    from test_scripts import load
    mod = load(script)
    with pytest.raises(SystemExit, match=re.escape(says)):
        config.script_config(mod.Config(), mod.SAMPLE, argv)
    # the defaults, the sample preset and the sentinel -1 where it is a field's default all pass
    for ok in ([], ["--sample"], ["--max_length=-1"] if script == "evaluate" else ["--max_steps=-1"]):
        config.script_config(mod.Config(), mod.SAMPLE, ok)
