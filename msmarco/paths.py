"""Where things live: the repository, the data folders, the outputs; relative paths resolved against the repository
(never the working directory); an inter-process file lock for work that one process must do alone; files written
whole (a temporary file and a rename) and put on disk before they are published; a write that
finds no room on its disk told apart from a bug (out_of_space)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .errors import DataError

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
    try:
        tmp.write_text(text)
        fsync_file(tmp)  # a power cut must not leave the new name on blocks still in the page cache
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise (disk_full(path, e) if out_of_space(e) else e) from e


def out_of_space(e: OSError) -> bool:
    """Whether a write failed for want of disk (full, over quota, over the file-size limit): the user's to fix, not
    a bug. numpy's short write (ndarray.tofile) carries no errno, only its message."""
    return (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            or e.errno is None and "requested and" in str(e) and "written" in str(e))


def disk_full(path: Path, e: OSError) -> DataError:
    return DataError(f"cannot write {path}: no room on its disk ({e}); nothing half-written was kept: free disk space "
                     f"(or pass --data_dir/--output_dir on a larger disk) and rerun")


def fsync_file(path: Path) -> None:
    """Put a file's written blocks on disk, before a rename publishes it: after a power cut the published name must
    not stand for blocks that were still in the page cache (an empty or short file that reads as valid)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
