"""Errors a user can fix (a damaged or missing data file, a failed download, a bad option, an output folder holding a
cut run of another config, a model that overflows in half precision), each with a message that says what is wrong
and what to do, and how a script ends on one: the message and exit code 1, no traceback.
Any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import errno
import sys


class DataError(ValueError):
    """Bad or missing input data, or a data folder or disk that cannot take it (read-only, full); the message names
    the file (and line) and what to do."""


class DownloadError(RuntimeError):
    """A download failed for good (dead link, retries used up, corrupt result)."""


class OutputFolderError(RuntimeError):
    """An output folder holds a cut run that the command would not continue faithfully (another config)."""


class ModelError(RuntimeError):
    """A model that cannot serve: a base model that does not load (no folder here, and the hub unreachable or the
    name unknown), or one whose output cannot rank (scores or embeddings that are not finite, more than two labels)."""


# A bad --key=value already ends the script with its message (config.py).
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}  # OSErrors that name a folder to fix
USER_ERRORS = (DataError, DownloadError, OutputFolderError, ModelError)


@contextlib.contextmanager
def user_errors():
    """Around a script's main: a user-fixable error ends the process with its message and exit code 1."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the newest checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as e:  # a folder the user named that cannot be written: read-only, not a folder, no permission
        if e.errno not in REFUSED or e.filename is None:
            raise
        print(f"error: cannot write {e.filename}: {e.strerror}. Pass a writable --output_dir (or --data_dir), or "
              f"fix the folder's permissions", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
