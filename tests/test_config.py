"""`--key=value` overrides of a config dataclass (msmarco/config.py): typed values, clear errors listing the options."""
import dataclasses

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
                                       (["--epochs"], "--epochs")])
def test_parse_cli_bad_value(argv, key):
    with pytest.raises(SystemExit) as e:
        config.parse_cli(Cfg(), argv)
    assert key in str(e.value.code)


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
