import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msmarco.errors import DataError, DownloadError  # noqa: E402
from msmarco import sources  # noqa: E402
from msmarco.sources import download  # noqa: E402

import errno  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import urllib.error  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402

PAYLOAD = os.urandom(3 * 1024 * 1024)
MB = 1024 * 1024
FAST = dict(retries=3, backoff=0.01, timeout=10.0)


class Server:
    """Local HTTP server whose behaviour the tests steer through attributes."""

    def __init__(self) -> None:
        self.payload = PAYLOAD
        self.cut_after: int | None = None  # close the socket after N body bytes, once
        self.status: int | None = None  # answer this error status instead
        self.fail_times = 0  # answer 503 this many times first
        self.ignore_range = False
        self.chunked_cut: int | None = None  # once: chunked body, cut after N bytes
        self.cut_every: int | None = None  # close the socket after N body bytes, every time
        self.range_cap: int | None = None  # answer a Range request with at most N bytes (a complete 206 reply)
        self.etag: str | None = None  # the file's version: sent as ETag; an If-Range naming another gets a 200
        self.requests: list[dict] = []  # headers of each request
        self.served: list[int] = []  # body bytes sent per request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                outer.requests.append(dict(self.headers))
                if outer.status is not None:
                    outer.served.append(0)  # record before replying: the client may finish first
                    self.send_error(outer.status)
                    return
                if outer.fail_times:
                    outer.fail_times -= 1
                    outer.served.append(0)
                    self.send_error(503)
                    return
                data = outer.payload
                if outer.chunked_cut is not None:
                    n, outer.chunked_cut = outer.chunked_cut, None
                    outer.served.append(n)
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n" % len(data) + data[:n])  # one chunk, cut short
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                if m and not outer.ignore_range and (if_range is None or if_range == outer.etag):
                    start = int(m.group(1))
                    if start >= len(data):
                        outer.served.append(0)
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    end = len(data) if outer.range_cap is None else min(len(data), start + outer.range_cap)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    end = len(data)
                    self.send_response(200)
                body = data[start:end]
                self.send_header("Content-Length", str(len(body)))  # always the full length
                if outer.etag:
                    self.send_header("ETag", outer.etag)
                self.end_headers()
                if outer.cut_after is not None or (outer.cut_every is not None and len(body) > outer.cut_every):
                    n = outer.cut_after if outer.cut_after is not None else outer.cut_every
                    outer.cut_after = None
                    outer.served.append(n)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)  # short read for the client
                    self.close_connection = True
                    return
                outer.served.append(len(body))
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/collection.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_complete_download(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    out = download(server.url, dest, size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                   md5=hashlib.md5(PAYLOAD).hexdigest(), **FAST)
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert len(server.requests) == 1
    assert server.requests[0]["User-Agent"] == sources._USER_AGENT
    assert "python-urllib" not in server.requests[0]["User-Agent"]  # Zenodo refuses some library user agents
    assert "x-ms-version" not in {k.lower() for k in server.requests[0]}  # only for the MS MARCO (Azure) host
    assert "Range" not in server.requests[0]


def test_request_headers():
    """The MS MARCO host (Azure Storage) gets the API version that serves Range requests; no other host does."""
    for url in [sources.MSMARCO + "collection.tar.gz", "https://msmarco.blob.core.windows.net/msmarcoranking/x"]:
        assert sources._headers(url) == {"User-Agent": sources._USER_AGENT, "x-ms-version": "2019-12-12"}
    for url in [sources.HF_HARD_NEGATIVES + "x", sources.NIST_DL + "x", sources.SOURCES[
            "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv"].urls[0],
                "https://blob.core.windows.net.example.org/x", "https://example.org/?u=x.blob.core.windows.net"]:
        assert sources._headers(url) == {"User-Agent": sources._USER_AGENT}


def test_existing_dest_is_returned_without_request(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"cached")
    assert download(server.url, dest, **FAST) == dest
    assert dest.read_bytes() == b"cached"
    assert server.requests == []


def test_cut_connection_is_resumed(server, tmp_path):
    half = len(PAYLOAD) // 2
    server.cut_after = half
    dest = tmp_path / "file.bin"
    download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={half}-"
    assert server.served == [half, len(PAYLOAD) - half]
    assert not _part(dest).exists()


def test_cut_chunked_body_is_resumed(server, tmp_path):
    # A chunked body has no Content-Length; http.client raises IncompleteRead instead.
    half = len(PAYLOAD) // 2
    server.chunked_cut = half
    dest = tmp_path / "file.bin"
    download(server.url, dest, size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    # http.client's IncompleteRead may drop the bytes of the read() in flight, so the
    # resume point is somewhere in (0, half], but it must be exactly what was kept.
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", server.requests[1]["Range"]).group(1))
    assert 0 < resumed_at <= half
    assert server.served[1] == len(PAYLOAD) - resumed_at
    assert not _part(dest).exists()


def test_resume_from_existing_part(server, tmp_path):
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:MB])
    download(server.url, dest, size=len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1
    assert server.requests[0]["Range"] == f"bytes={MB}-"
    assert server.served == [len(PAYLOAD) - MB]
    assert not _part(dest).exists()


def test_complete_part_with_416(server, tmp_path):
    # Without `size` the function can't know the part is whole; the server's 416 says so.
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD)
    download(server.url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.served == [0]


@pytest.mark.parametrize("delta", [-10, 10])
def test_size_mismatch(server, tmp_path, delta):
    dest = tmp_path / "file.bin"
    expected = len(PAYLOAD) + delta
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, size=expected, **FAST)
    msg = str(ei.value)
    assert server.url in msg
    assert str(expected) in msg and str(len(PAYLOAD)) in msg
    assert str(dest) in msg
    assert not dest.exists()
    assert not _part(dest).exists()


def test_checksum_mismatch(server, tmp_path):
    server.payload = os.urandom(len(PAYLOAD))  # right length, wrong bytes
    dest = tmp_path / "file.bin"
    want = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, size=len(PAYLOAD), sha256=want, **FAST)
    msg = str(ei.value)
    assert server.url in msg and want in msg
    assert hashlib.sha256(server.payload).hexdigest() in msg
    assert not dest.exists()
    assert not _part(dest).exists()


def test_404_not_retried(server, tmp_path):
    server.status = 404
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(b"stale")
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, **FAST)
    msg = str(ei.value)
    assert server.url in msg
    assert "404" in msg
    assert f"curl -L -C - -o {dest}.part {server.url} && mv {dest}.part {dest}" in msg  # nothing to quote here
    assert "browser" in msg
    assert not dest.exists()
    assert not _part(dest).exists()
    assert len(server.requests) == 1


def test_5xx_is_retried(server, tmp_path):
    server.fail_times = 2
    dest = tmp_path / "file.bin"
    download(server.url, dest, size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_5xx_retries_exhausted_keeps_part(server, tmp_path):
    server.status = 503
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:MB])
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, retries=2, backoff=0.01)
    assert "503" in str(ei.value) and server.url in str(ei.value)
    assert len(server.requests) == 3
    assert _part(dest).read_bytes() == PAYLOAD[:MB]  # kept for the next run to resume
    assert not dest.exists()


def test_server_ignoring_range(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:MB])
    download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["Range"] == f"bytes={MB}-"
    assert len(server.requests) == 1
    assert not _part(dest).exists()


def test_connection_refused(tmp_path, monkeypatch):
    with socket.socket() as s:  # grab a free port, then close it so nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.bin"
    dest = tmp_path / "file.bin"
    sleeps = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)  # count the backoffs instead of timing them
    with pytest.raises(DownloadError) as ei:
        download(url, dest, retries=1, backoff=0.01, timeout=5.0)
    assert sleeps == [0.01]  # two attempts, one backoff between them: a refused connection is not waited out
    assert url in str(ei.value)
    assert "curl -L -C - -o" in str(ei.value)
    assert not dest.exists()


def test_short_range_replies_are_continued(server, tmp_path):
    """A server (or proxy) may answer a range with less than the rest of the file, as a complete 206 reply: the
    download goes on from where it ended, also when no size is published (the Hugging Face files)."""
    server.range_cap = MB
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:MB // 2])
    download(server.url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.served == [MB, MB, MB // 2]


def test_a_connection_that_keeps_dropping_still_completes(server, tmp_path):
    """Each retry that got more bytes resets the count of failures: only attempts in a row without progress end
    the download."""
    server.cut_every = 256 * 1024  # 12 connections for the 3 MiB
    dest = tmp_path / "file.bin"
    download(server.url, dest, size=len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(), **FAST)  # 3 retries
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 12


def test_a_file_changed_upstream_is_not_spliced(server, tmp_path):
    """The server's ETag is kept beside the part and sent as If-Range: when the file changed between two runs the
    server sends the whole new file, which replaces the old part instead of being appended to it."""
    server.etag, server.cut_after = '"v1"', MB
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError):
        download(server.url, dest, retries=0, backoff=0.01)  # a first run, cut after 1 MiB
    assert _part(dest).read_bytes() == PAYLOAD[:MB]
    new = os.urandom(len(PAYLOAD))
    server.payload, server.etag = new, '"v2"'
    download(server.url, dest, **FAST)
    assert server.requests[-1]["Range"] == f"bytes={MB}-" and server.requests[-1]["If-Range"] == '"v1"'
    assert dest.read_bytes() == new
    assert not _part(dest).exists() and not (tmp_path / "file.bin.part.validator").exists()


def test_manual_hint_quotes_paths(server, tmp_path):
    """The curl command of the hint can be pasted into a shell as is, also for a folder with a space in its name."""
    server.status = 404
    dest = tmp_path / "my data" / "file.bin"
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, **FAST)
    command = re.search(r"`(curl [^`]*)`", str(ei.value)).group(1)
    assert shlex.split(command) == ["curl", "-L", "-C", "-", "-o", f"{dest}.part", server.url, "&&",
                                    "mv", f"{dest}.part", str(dest)]


class _FullDisk:
    """A file open for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_ends_at_once(server, tmp_path, monkeypatch):
    """A local write error is no network failure: no retry, no backoff, and a message about the disk; the part is
    kept for a rerun to resume."""
    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f) if set(mode) & set("wa") else f

    monkeypatch.setattr(sources, "open", full_open, raising=False)  # the module's open(); the part's writes fail
    sleeps = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:MB])
    with pytest.raises(DataError) as ei:
        download(server.url, dest, size=len(PAYLOAD), **FAST)
    msg = str(ei.value)
    assert f"cannot write {_part(dest)}: [Errno {errno.ENOSPC}] No space left on device" in msg
    assert "free disk space" in msg and "rerun to resume" in msg
    assert len(server.requests) == 1 and sleeps == []
    assert _part(dest).read_bytes() == PAYLOAD[:MB] and not dest.exists()


def test_unresolvable_host_is_retried_once(tmp_path, monkeypatch):
    """Offline, a host name does not resolve: one retry, not the whole backoff (2+4+8+16+32 s for each URL)."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no query leaves the machine (.invalid never resolves anyway)
    sleeps = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)
    url = "http://nonexistent.invalid/x"
    with pytest.raises(DownloadError) as ei:
        download(url, tmp_path / "x", retries=5, backoff=2.0)
    assert sleeps == [2.0]  # one retry after the backoff's first step
    msg = str(ei.value)
    assert url in msg and "gaierror" in msg and "offline" in msg and "curl -L -C - -o" in msg


def test_a_name_that_stops_resolving_mid_download_gets_every_retry(tmp_path, monkeypatch):
    """A download that was getting bytes and then loses DNS (a resolver hiccup, not an offline machine) is retried
    with the whole backoff, and completes."""
    calls = []

    def fetch(url, part, *args):
        calls.append(len(calls))
        if len(calls) == 1:
            part.write_bytes(PAYLOAD[:10])  # progress, then the name fails to resolve
        elif len(calls) == 4:
            with open(part, "ab") as f:
                f.write(PAYLOAD[10:])
            return
        raise urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))

    monkeypatch.setattr(sources, "_fetch_once", fetch)
    sleeps = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)
    dest = download("http://example.invalid/x", tmp_path / "x", size=len(PAYLOAD), retries=3, backoff=2.0)
    assert sleeps == [2.0, 4.0, 8.0] and dest.read_bytes() == PAYLOAD


def test_part_is_synced_once_before_the_rename(server, tmp_path, monkeypatch):
    """The complete part is fsync'ed before it is verified and renamed, so a crash never leaves a named file whose
    blocks were not written; once per file, however many requests it took."""
    events, synced = [], []

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        events.append("fsync")

    def verify(*args, **kwargs):
        events.append("verify")
        return real_verify(*args, **kwargs)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    real_verify, real_replace = sources._verify, os.replace
    monkeypatch.setattr(sources.os, "fsync", fsync)
    monkeypatch.setattr(sources, "_verify", verify)
    monkeypatch.setattr(sources.os, "replace", replace)
    server.cut_after = MB  # two requests
    dest = tmp_path / "file.bin"
    download(server.url, dest, size=len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(), **FAST)
    assert len(server.requests) == 2
    assert events == ["fsync", "verify", "replace"]
    assert synced == [dest.stat().st_ino]  # the part's, now under the final name
