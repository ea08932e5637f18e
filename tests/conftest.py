"""Test setup: the repository root is importable, nothing may reach a model hub or dataset host; and what the tests of
the data layer share: the bundled sample's file names, independent readers of the raw files (plain Python: tarfile,
gzip, json), and a private copy of the sample that a test may damage."""
import gzip
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from msmarco import data, formats, paths  # noqa: E402

SHARED_SAMPLE = ROOT.parent / "shared" / "msmarco-sample"  # the real data the bundled sample was built from

SAMPLE = paths.SAMPLE_DIR
COLLECTION = "collection.tar.gz"
TEACHER = "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv"
TRIPLES = "qidpidtriples.train.full.2.tsv.gz"
HARD_NEG = "msmarco-hard-negatives.jsonl.gz"
CE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
MISSING_PID = 999_999_999  # fits int32, not in the sample collection


def repair(text: str) -> str:
    """The stores' text: the raw text with its double-encoded UTF-8 repaired (its cases: tests/test_formats.py)."""
    return formats.fix_mojibake(text)


def tar_member_lines(path: Path, member: str) -> list[bytes]:
    with tarfile.open(path, "r:gz") as t:
        data = t.extractfile(member).read()
    return data.split(b"\n")


def raw_id_text(lines: list[bytes]) -> list[tuple[int, str]]:
    out = []
    for line in lines:
        if not line:
            continue
        i, text = line.split(b"\t", 1)
        out.append((int(i), text.decode("utf-8")))
    return out


def raw_text_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def raw_qrels(path: Path) -> dict:
    q = {}
    for line in raw_text_lines(path):
        a, _, p, g = line.split()
        q.setdefault(int(a), {})[int(p)] = int(g)
    return q


def raw_candidates(lines: list[str]) -> dict:
    c = {}
    for line in lines:
        q, p, _ = line.split("\t", 2)
        c.setdefault(int(q), []).append(int(p))
    return c


def raw_teacher(path: Path) -> list[tuple]:
    out = []
    for ln in raw_text_lines(path):
        a, b, q, p, n = ln.split("\t")
        out.append((float(a), float(b), int(q), int(p), int(n)))
    return out


@pytest.fixture(scope="session")
def ms():
    return data.MSMarco(SAMPLE)


@pytest.fixture(scope="session")
def raw_collection():
    return raw_id_text(tar_member_lines(SAMPLE / COLLECTION, "collection.tsv"))


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """A private copy of data/sample (without .prepared/) that the test may damage.

    The copy stands in for the bundled sample (SAMPLE_DIR points at it): outside the sample folder, fetch()
    would compare the miniature files with the published sizes of the full downloads and refuse them."""
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns(".prepared"))
    monkeypatch.setattr(paths, "SAMPLE_DIR", dst)
    return dst


def leftovers(folder: Path) -> list[str]:
    """What a build left under .prepared/, besides the (empty) lock files that serialise builds."""
    root = folder / paths.PREPARED
    return sorted(p.name for p in root.iterdir() if p.suffix != ".lock") if root.exists() else []


def rewrite_text(path: Path, edit) -> None:
    """Rewrite a (gzipped) text file with edit(list_of_lines) -> list_of_lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b""
    lines = edit(lines[:-1])
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def write_pickle(path: Path, blob: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)
    return path
