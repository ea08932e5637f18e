"""Every file the recipes use, in one table (`SOURCES`: today's URLs, mirrors, published sizes and md5 sums), and the
download that gets them: resumable (HTTP Range, with If-Range so a file changed upstream is fetched anew), retried
with backoff while it makes no progress (a host name that does not resolve: once), verified, synced to disk and
renamed into place only when complete. Offline, a download fails with the URL and how to place the file by hand; a
disk that cannot take the file fails at once, with the file it could not write."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shlex
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import paths
from .errors import DataError, DownloadError


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


def fetch(name: str, data_dir: str | Path) -> Path:
    """Path of source `name` in `data_dir`, downloading it first if it is not there yet."""
    data_dir = paths.resolve_dir(data_dir)
    src = SOURCES[name]
    path = data_dir / name
    is_sample = paths.is_sample(data_dir)
    if path.exists():
        if not is_sample and src.size is not None and path.stat().st_size != src.size:
            raise DataError(f"{path} is {path.stat().st_size:,} bytes but the published file is {src.size:,}: "
                            f"it is incomplete or a different version. Delete it and rerun to download it again")
        return path
    if is_sample:
        raise DataError(f"{path} is missing from the bundled sample; restore it with `git checkout -- data/sample` "
                        "or rebuild it with scripts/build_sample.py")
    with contextlib.ExitStack() as stack:
        try:  # a read-only data folder: the user can place the file there by hand or point elsewhere
            data_dir.mkdir(parents=True, exist_ok=True)
            # one download per file; parallel runs wait for it, then use it
            stack.enter_context(paths.file_lock(data_dir / f".{name}.lock"))
        except OSError as e:
            raise DataError(f"{data_dir} is not writable ({e}); {name} is missing: download it from {src.urls[0]} "
                            f"and place it there by hand, or choose another --data_dir") from e
        if path.exists():
            return path
        errors = []
        for url in src.urls:  # mirrors in order; every one is checked against the same size and md5
            try:
                return download(url, path, size=src.size, md5=src.md5, desc=name)
            except DownloadError as e:
                errors.append(str(e))
    raise DownloadError("\n".join(errors))


# No library token (python-urllib, python-requests): Zenodo answers 403 to some library user agents since 2026.
_USER_AGENT = "msmarco-training-scripts/1.0 (research downloader; resumable)"
# Azure Storage (the MS MARCO host, blob and static-website endpoints) serves a request without x-ms-version as an
# old API version; Microsoft's TREC-DL download page and ir_datasets send this one, which serves Range requests.
_AZURE_HOSTS = (".blob.core.windows.net", ".web.core.windows.net")
_AZURE_VERSION = "2019-12-12"


def _headers(url: str) -> dict[str, str]:
    """The request headers every request to `url` carries (Range and If-Range come on top)."""
    headers = {"User-Agent": _USER_AGENT}
    if (urllib.parse.urlsplit(url).hostname or "").endswith(_AZURE_HOSTS):
        headers["x-ms-version"] = _AZURE_VERSION
    return headers


class _Transient(Exception):
    """Internal: a failure worth retrying (short read, 5xx, odd 416)."""


def _manual_hint(url: str, dest: Path) -> str:
    part, whole = shlex.quote(f"{dest}.part"), shlex.quote(str(dest))  # a command to paste: a space or quote is kept
    return (f"download {url} with a browser or `curl -L -C - -o {part} {shlex.quote(url)} && mv {part} {whole}` "
            f"(the rename only after curl finishes: a file at {dest} counts as complete)")


def _cannot_write(path: Path, e: OSError) -> DataError:
    """A local disk error (full, read-only, no permission): no retry or mirror would help, so the download ends."""
    return DataError(f"cannot write {path}: {e} (free disk space or check permissions); the partial file is kept, "
                     f"rerun to resume")


def _sync(part: Path) -> None:
    """Put the complete part on disk before it is renamed into place: after a crash or power cut the file under the
    final name is then the whole file, never a name for blocks that were still in the page cache."""
    try:
        paths.fsync_file(part)
    except OSError as e:
        raise _cannot_write(part, e) from e


def _validator_file(part: Path) -> Path:
    """Where the server's version tag (a strong ETag, else Last-Modified) of a partial download is kept: a resume
    sends it as If-Range, so bytes of a file that changed upstream are never appended to the old ones."""
    return part.with_name(part.name + ".validator")


def _discard(part: Path) -> None:
    """Drop a partial download and its version tag: the next request starts from byte 0."""
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _fetch_once(url: str, part: Path, timeout: float, chunk_size: int,
                size: int | None, desc: str) -> None:
    """One HTTP request that appends to ``part``; raises on anything incomplete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = _headers(url)
    validator = _validator_file(part)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.exists():  # the server answers 200 (the whole new file) if its version changed
            headers["If-Range"] = validator.read_text().strip()
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
        _discard(part)  # part is longer than the file or unknown: start over
        raise _Transient(f"HTTP 416 with {offset} bytes already present; restarting")

    with resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None  # bytes in this body
        total = size
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
            served = int(m.group(2)) if m.group(2) != "*" else None  # the file's length, as the server has it
            total = total if total is not None else served
            mode = "ab"
        else:
            # 200 to a Range request: the server has no range support, or the file changed (If-Range); the body
            # is the whole file, so appending would corrupt it. Start from zero.
            offset, mode, served = 0, "wb", expected
            if total is None and expected is not None:
                total = expected
            etag = resp.headers.get("ETag") or ""
            tag = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")  # If-Range
            try:
                if tag:  # takes no weak ETag
                    validator.write_text(tag + "\n")
                else:
                    validator.unlink(missing_ok=True)
            except OSError as e:
                raise _cannot_write(validator, e) from e
        received = 0
        try:  # an OSError here is the disk's (full, no permission), also one from close(); the socket's are marked
            with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=desc) as bar:
                while True:
                    try:
                        chunk = resp.read(chunk_size)
                    except http.client.IncompleteRead as e:  # e.g. chunked body cut short
                        f.write(e.partial)  # keep what did arrive, so the retry resumes after it
                        raise _Transient(f"connection closed after {received + len(e.partial)} "
                                         f"bytes") from e
                    except OSError as e:  # the socket's (timeout, reset): retried, unlike the disk's
                        raise _Transient(f"{type(e).__name__}: {e}") from e
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise _cannot_write(part, e) from e
    # http.client may just return b"" when the peer closes early, so compare ourselves.
    if expected is not None and received < expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")
    have = part.stat().st_size
    if served is not None and have < served:  # a complete reply to a range that stopped short of the end
        raise _Transient(f"the reply ended at byte {have:,} of {served:,}")


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
        _discard(part)
        raise DownloadError(f"downloaded file from {url} is corrupt ({'; '.join(problems)}). "
                            f"Retry, or place a correct file by hand: {_manual_hint(url, dest)}")


def download(url: str, dest: Path, *, size: int | None = None, md5: str | None = None,
             sha256: str | None = None, retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, chunk_size: int = 1 << 20, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with resume, retries and optional verification.

    Data goes to ``dest.name + ".part"`` next to ``dest`` and is renamed atomically only
    once complete and verified, so an existing ``dest`` is always whole (and is returned
    as-is). An existing ``.part`` is resumed with a Range request. Transient failures
    (connection errors, timeouts, 5xx, 408/429, short reads) are retried up to ``retries`` times in a
    row without progress, with backoff ``backoff * 2**i`` seconds (at most 60); a host name that does not resolve
    before any byte arrived, at most once. Raises :class:`DownloadError` on permanent failure or a size/md5/sha256
    mismatch, :class:`DataError` at once when the part file cannot be written (disk full, no permission).
    """
    dest = Path(dest)
    if dest.exists():  # the caller's cache: assumed complete
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        _discard(part)  # longer than the file can be: never resumable

    last_err: str = "unknown error"
    failures = 0  # in a row without progress: a connection that drops every few MB still gets the whole file
    furthest = part.stat().st_size if part.exists() else 0  # progress means bytes past this, not a restart's
    start = furthest  # bytes present when this call began
    while True:
        if failures:
            time.sleep(min(backoff * 2 ** (failures - 1), 60.0))
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            break  # a previous run got every byte; just verify
        unresolved = False  # whether this attempt fails to resolve the host name (offline, or a typo in the URL)
        try:
            _fetch_once(url, part, timeout, chunk_size, size, desc or dest.name)
            break
        except urllib.error.HTTPError as e:  # before URLError: it is a subclass
            last_err = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                if e.code in (404, 410):
                    _discard(part)  # the resource is gone; the part is stale
                raise DownloadError(f"could not download {url}: {last_err}; the link is dead "
                                    f"or offline. {_manual_hint(url, dest)}") from e
        except urllib.error.URLError as e:  # DNS failure, refused, no network
            last_err = f"{type(e.reason).__name__}: {e.reason}"
            unresolved = isinstance(e.reason, socket.gaierror)
        except _Transient as e:  # short reads, timeouts and resets while reading
            last_err = str(e)
        except (http.client.HTTPException, OSError) as e:
            last_err = f"{type(e).__name__}: {e}"
        now = part.stat().st_size if part.exists() else 0
        failures = 1 if now > furthest else failures + 1
        furthest = max(furthest, now)
        # A name that does not resolve before any byte came (offline) gets one retry, not the whole backoff
        # (2+4+8+16+32 s per URL); a connection that was working has its DNS hiccup retried in full.
        allowed = min(retries, 1) if unresolved and furthest == start else retries
        if failures > allowed:  # keep the .part: the next run resumes from it
            cause = ("this machine may be offline (the host name did not resolve)" if unresolved
                     else "the server may be offline or the link dead")
            raise DownloadError(f"could not download {url} after {failures} attempts in a row without "
                                f"progress (last error: {last_err}); {cause}. {_manual_hint(url, dest)}")

    _sync(part)  # once, before it is verified and takes the final name
    _verify(url, dest, part, size, md5, sha256, chunk_size)
    os.replace(part, dest)  # atomic: dest never exists half-written
    _validator_file(part).unlink(missing_ok=True)
    return dest
