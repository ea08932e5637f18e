"""benchmarks/bench_prepare.py, the full-size rehearsal, at a tiny size: a subset of its stages (--stages) generates
only the sources those stages read, measures each in a fresh process, and reuses what it generated."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_prepare  # noqa: E402
import generate_synthetic as gen  # noqa: E402


def test_stages_subset_generates_and_measures_only_those(tmp_path, capsys):
    out = tmp_path / "result.json"
    args = ["--factor", "0.0002", "--dir", str(tmp_path), "--stages", "collection,triples", "--json", str(out)]
    bench_prepare.main(args)
    folder = tmp_path / "factor-0.0002"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        [gen.FILES["collection"], gen.FILES["triples"], "sizes.json"])
    (res,) = json.loads(out.read_text())
    assert list(res["stages"]) == ["collection", "triples"]
    z = gen.sizes(0.0002)
    assert res["stages"]["collection"]["rows"] == z["passages"]
    assert res["stages"]["triples"]["rows"] == z["triples_lines"]  # the sample's one pass reads every line
    assert 0 < res["stages"]["triples"]["kept"] <= z["triples_lines"]
    for r in res["stages"].values():
        assert r["wall_s"] >= 0 and r["maxrss_mib"] > 0
    assert "generated collection, triples" in capsys.readouterr().out

    bench_prepare.main(args)  # a second call reuses the sources it generated
    assert "using the sources already generated there" in capsys.readouterr().out


def test_unknown_stage_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_prepare.main(["--factor", "0.0002", "--dir", str(tmp_path), "--stages", "collection,nope"])
    assert e.value.code == 2
    assert "unknown --stages ['nope']" in capsys.readouterr().err
