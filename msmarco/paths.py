"""Where things live: the repository, the data folders, the outputs; relative paths resolved against the repository
(never the working directory); an inter-process file lock for work that one process must do alone; files written
whole (a temporary file and a rename) and put on disk before they are published."""
from __future__ import annotations

import contextlib
import os
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


def write_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary one (named by process) and a rename: a crash leaves the old file or the new
    one, never half of one (a half-written results.json would mark a cut run as finished)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    """Put a file's written blocks on disk, before a rename publishes it: after a power cut the published name must
    not stand for blocks that were still in the page cache (an empty or short file that reads as valid)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
