"""Streaming readers of the raw MS MARCO formats: plain, .gz and .tar.gz members; `id \\t text` rows, qrels, numeric
rows parsed a chunk at a time by numpy. Every error names the file and line and says what to do. Also the repair of
the collection's double-encoded UTF-8."""
from __future__ import annotations

import gzip
import re
import tarfile
import typing
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError


# One UTF-8 sequence read as latin-1: a lead byte and its continuation bytes, each one character.
_DOUBLE_ENCODED = re.compile("[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def _fix_sequence(m: re.Match) -> str:
    try:
        return m.group().encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:  # an overlong form or a surrogate: not UTF-8 after all
        return m.group()


def fix_mojibake(text: str) -> str:
    """Undo the collection's double-encoded UTF-8 (``donâ\\x80\\x99t`` -> ``don’t``). The whole text where it
    round-trips; else sequence by sequence, since the official collection mixes double-encoded sequences with
    correct characters and with sequences that lost a byte in one passage (as ir_datasets' FixEncoding notes):
    ``1878â\\x80\\x931958`` beside Arabic script is repaired, a broken ``â¦`` is kept."""
    if text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return _DOUBLE_ENCODED.sub(_fix_sequence, text)


def open_binary(path: Path, member: str | None = None) -> tuple[typing.BinaryIO, list]:
    """A binary stream of `path` (decompressed), or of one member of a .tar.gz; also what to close."""
    if member is not None:
        tar = None
        try:
            tar = tarfile.open(path, "r:gz")
            info = next((m for m in tar if Path(m.name).name == member), None)
        except (EOFError, tarfile.TarError, OSError, zlib_error()) as e:
            if tar is not None:
                tar.close()
            raise DataError(f"{path}: cannot read the archive ({e}); it is truncated or corrupt: "
                            f"delete it and download it again") from e
        if info is None:
            tar.close()
            raise DataError(f"{path} holds no member named {member!r}: it is not the published archive; delete it "
                            "and download it again")
        return tar.extractfile(info), [tar]
    if path.suffix == ".gz":
        f = gzip.open(path, "rb")
        return f, [f]
    f = open(path, "rb")
    return f, [f]


def zlib_error():
    import zlib
    return zlib.error


def iter_lines(path: Path, member: str | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line without newline) of a text source; a truncated gzip is a DataError naming the line."""
    stream, closers = open_binary(path, member)
    where = f"{path}" + (f" (member {member})" if member else "")
    lineno = 0
    try:
        for lineno, line in enumerate(stream, 1):
            yield lineno, line.rstrip(b"\r\n")
    except (EOFError, OSError, tarfile.TarError, zlib_error()) as e:
        raise DataError(f"{where}: the compressed stream breaks off after line {lineno} ({e}); "
                        f"the file is truncated or corrupt: delete it and download it again") from e
    finally:
        for c in reversed(closers):
            c.close()


def bad_line(path: Path, lineno: int, line: bytes, expected: str) -> DataError:
    shown = line[:120].decode("utf-8", "replace")
    return DataError(f"{path}, line {lineno}: expected {expected}, got {shown!r}. "
                     "The file is damaged or not the right file: delete it and download it again")


def iter_id_text(path: Path, member: str | None = None) -> Iterator[tuple[int, str]]:
    """Rows `id \\t text` (collection, queries)."""
    for lineno, line in iter_lines(path, member):
        if not line:
            continue
        head, sep, text = line.partition(b"\t")
        if not sep or not head.isdigit():
            raise bad_line(path, lineno, line, "`id<TAB>text`")
        yield int(head), fix_mojibake(text.decode("utf-8", "replace"))


def iter_qrels(path: Path) -> Iterator[tuple[int, int, int]]:
    """(qid, pid, grade) of `qid 0 pid grade` lines, tab- or space-separated."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not (parts[0].isdigit() and parts[2].isdigit()):
            raise bad_line(path, lineno, line, "`qid 0 pid grade`")
        try:
            yield int(parts[0]), int(parts[2]), int(parts[3])
        except ValueError:
            raise bad_line(path, lineno, line, "`qid 0 pid grade`") from None


def read_qrels(path: Path) -> dict[int, dict[int, int]]:
    """qid -> {pid: grade}; small enough to hold (the largest, qrels.train, has 532k lines)."""
    qrels: dict[int, dict[int, int]] = {}
    for qid, pid, grade in iter_qrels(path):
        qrels.setdefault(qid, {})[pid] = grade
    return qrels


def iter_int_rows(path: Path, ncols: int, what: str, chunk_bytes: int = 8 << 20,
                  kinds: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Chunks of numeric rows as float64 arrays (n, ncols), with the first line number of each chunk.

    Each ~8 MB chunk is parsed by one numpy call (C speed, no Python object per field: 40M teacher lines
    parse in about a minute in constant memory); a chunk that does not parse is re-read line by line to
    name the bad line. `kinds` marks integer columns ('i'), which must be whole and non-negative."""
    stream, closers = open_binary(path)
    int_cols = [c == "i" for c in (kinds or "f" * ncols)]
    first, pending = 1, b""
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)  # a block, not readlines(): gzip's readlines() is a Python call
            except (EOFError, OSError, tarfile.TarError, zlib_error()) as e:  # per line, 60% of the parse time
                raise DataError(f"{path}: the compressed stream breaks off after line {first - 1} ({e}); "
                                "the file is truncated or corrupt: delete it and download it again") from e
            if block:
                data = pending + block  # a block without a newline only grows the pending line
                cut = data.rfind(b"\n") + 1  # whole lines now, the rest with the next block
                buf, pending = data[:cut], data[cut:]
                del data
                if not buf:
                    continue
            else:
                buf, pending = pending, b""  # the last line, without a newline
                if not buf:
                    return
            del block
            n = buf.count(b"\n") + (not buf.endswith(b"\n"))
            arr = _parse_uint_rows(buf, n, ncols) if all(int_cols) else None
            try:
                ok = arr is not None or bool((_fields_per_line(buf, n) == ncols).all())
                if ok and arr is None:
                    arr = np.fromstring(buf, dtype=np.float64, sep=" ").reshape(n, ncols)
                    ints = arr[:, int_cols]
                    ok = bool(np.isfinite(arr).all() and (ints % 1 == 0).all() and (ints >= 0).all()
                              and (ints <= np.iinfo(np.int32).max).all())  # ids are stored as int32
            except ValueError:
                ok = False
            if not ok:
                lines = buf.split(b"\n")
                _raise_firstbad_line(path, lines[:n], first, ncols, int_cols, what)
            del buf
            yield first, arr
            first += n
    finally:
        for c in reversed(closers):
            c.close()


_BYTE_CLASS = np.full(256, 2, np.uint8)  # 0: digit, 1: field or line separator, 2: anything else
_BYTE_CLASS[48:58] = 0
_BYTE_CLASS[[32, 9, 10, 13]] = 1


def _parse_uint_rows(buf: bytes, n: int, ncols: int) -> np.ndarray | None:
    """int64 (n, ncols) of a chunk of lines made only of digits and separators, every line `ncols` numbers that fit
    int32; None for any other chunk (the general parser then decides, and names a bad line). Vectorised over the
    bytes and the numbers, ~5x faster than np.fromstring: the triples file is 398M lines of three ids."""
    b = np.frombuffer(buf, np.uint8)
    cls = _BYTE_CLASS[b]
    if (cls == 2).any():
        return None
    edge = np.diff((cls == 0).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    del cls, edge
    if len(starts) != n * ncols:
        return None
    newlines = np.flatnonzero(b == 10)
    if len(newlines) < n:  # the last line has no newline
        newlines = np.append(newlines, len(b))
    if not np.array_equal(np.searchsorted(starts, newlines[:n]), np.arange(1, n + 1) * ncols):
        return None  # some line has another number of fields (the total alone could hide a short and a long line)
    length = ends - starts
    if length.max(initial=0) > 10:
        return None
    value = np.zeros(len(starts), np.int64)
    for j in range(int(length.max(initial=0))):  # the j-th digit from the right of every number at once
        digit = np.where(length > j, b[ends - 1 - j] - np.uint8(48), np.uint8(0))
        value += digit.astype(np.int64) * 10 ** j
    if value.max(initial=0) > np.iinfo(np.int32).max:
        return None
    return value.reshape(n, ncols)


def _fields_per_line(buf: bytes, n: int) -> np.ndarray:
    """Number of whitespace-separated fields on each of the n lines of buf, vectorised (a short line next to a
    long one must not pass as two good ones)."""
    b = np.frombuffer(buf, np.uint8)
    ws = (b == 32) | (b == 9) | (b == 10) | (b == 13)
    starts = ~ws
    starts[1:] &= ws[:-1]
    newline = b == 10
    line_of = np.cumsum(newline) - newline
    return np.bincount(line_of[starts], minlength=n)[:n]


def _raise_firstbad_line(path: Path, lines: list[bytes], first: int, ncols: int, int_cols: list[bool],
                          what: str) -> None:
    for i, line in enumerate(lines):
        parts = line.split()
        ok = len(parts) == ncols
        if ok:
            try:
                vals = [float(p) for p in parts]
                ok = all(np.isfinite(vals)) and all(
                    not is_int or (parts[j].isdigit() and v <= np.iinfo(np.int32).max)
                    for j, (is_int, v) in enumerate(zip(int_cols, vals)))
            except ValueError:
                ok = False
        if not ok:
            raise bad_line(path, first + i, line.rstrip(b"\r\n"), what)
    raise DataError(f"{path}: lines {first}-{first + len(lines) - 1} do not parse as {what}")
