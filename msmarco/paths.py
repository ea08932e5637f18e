"""Where things live: the repository, the data folders, the outputs; relative paths resolved against the repository
(never the working directory); an inter-process file lock for work that one process must do alone."""
from __future__ import annotations

import contextlib
from pathlib import Path

try:
    import fcntl  # POSIX: serialises downloads and store builds between processes
except ImportError:  # pragma: no cover - Windows: builds are still atomic, just not serialised
    fcntl = None

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data"  # full downloads land here (git-ignored)
SAMPLE_DIR = DATA_DIR / "sample"  # the bundled miniature MS MARCO (committed)
OUTPUT_DIR = REPO / "output"  # one sub-folder per script
PREPARED = ".prepared"  # per-data-folder cache of memory-mapped stores


def resolve_dir(path: str | Path) -> Path:
    """A data or output folder: relative paths are taken from the repository, never the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO / p)


SAMPLE_TITLE = "# Bundled miniature MS MARCO"  # first line of the sample's README.md (scripts/build_sample.py)


def is_sample(data_dir: str | Path) -> bool:
    """Whether a data folder is the bundled miniature (whose files are smaller than the published ones): data/sample,
    or a copy of it (its README.md comes along), e.g. a writable one for a read-only checkout."""
    d = resolve_dir(data_dir)
    if d.resolve() == SAMPLE_DIR.resolve():
        return True
    try:
        with open(d / "README.md", encoding="utf-8") as f:
            return f.readline().startswith(SAMPLE_TITLE)
    except OSError:
        return False


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes (torchrun ranks, parallel runs) for the duration of the block."""
    with open(path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield
