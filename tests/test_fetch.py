"""fetch() (msmarco/sources.py): a missing source is downloaded once (also by parallel processes), from a mirror
when the first address is dead, verified; the bundled sample is never downloaded nor size-checked. Downloads go
to a local HTTP server."""
import errno
import hashlib
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from msmarco import errors, sources
from msmarco.data import MSMarco
from conftest import SAMPLE, TEACHER


def test_fetch_missing_sample_file(copy):
    (copy / TEACHER).unlink()
    with pytest.raises(errors.DataError) as e:
        sources.fetch(TEACHER, copy)
    assert "git checkout" in str(e.value) and str(copy / TEACHER) in str(e.value)
    with pytest.raises(errors.DataError, match="git"):
        MSMarco(copy).teacher_scores()


def test_fetch_existing_sample_file_is_not_size_checked():
    # the bundled miniature is smaller than the published files and is accepted as is
    assert sources.fetch("qrels.train.tsv", SAMPLE) == SAMPLE / "qrels.train.tsv"


PAYLOAD = b"0\t0\t17\t1\n" * 5_000


@pytest.fixture
def http_server():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path != "/file":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()
    th.join()


def _patch_source(monkeypatch, name, urls, size, md5):
    monkeypatch.setitem(sources.SOURCES, name, sources.Source(name, tuple(urls), size, md5, "test"))


def test_fetch_downloads_missing_file(tmp_path, monkeypatch, http_server):
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], len(PAYLOAD), hashlib.md5(PAYLOAD).hexdigest())
    folder = tmp_path / "data"
    path = sources.fetch(name, folder)
    assert path == folder / name and path.read_bytes() == PAYLOAD
    assert hits == ["/file"]
    assert sources.fetch(name, folder) == path  # present: no second request
    assert hits == ["/file"]
    assert MSMarco(folder).qrels("train") == {0: {17: 1}}
    assert not list(folder.glob("*.part"))


def test_parallel_fetches_download_once(tmp_path, monkeypatch, http_server):
    """Processes that start together (torchrun ranks, two scripts) share one download: the others wait for it."""
    from concurrent.futures import ThreadPoolExecutor
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], len(PAYLOAD), hashlib.md5(PAYLOAD).hexdigest())
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: sources.fetch(name, tmp_path), range(4)))
    assert hits == ["/file"] and all(p.read_bytes() == PAYLOAD for p in paths)


def test_fetch_falls_back_to_mirror(tmp_path, monkeypatch, http_server):
    base, hits = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/dead", base + "/file"], None, hashlib.md5(PAYLOAD).hexdigest())
    assert sources.fetch(name, tmp_path).read_bytes() == PAYLOAD
    assert hits == ["/dead", "/file"]


@pytest.mark.parametrize("size, md5", [(None, "0" * 32), (len(PAYLOAD) + 1, None), (len(PAYLOAD), "f" * 32)])
def test_fetch_verifies_download(tmp_path, monkeypatch, http_server, size, md5):
    base, _ = http_server
    name = "qrels.train.tsv"
    _patch_source(monkeypatch, name, [base + "/file"], size, md5)
    with pytest.raises(errors.DownloadError, match="corrupt"):
        sources.fetch(name, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{name}.lock"]  # neither the file nor a .part; the lock


def test_fetch_refuses_incomplete_existing_file(tmp_path, monkeypatch):
    name = "qrels.train.tsv"
    assert sources.SOURCES[name].size == 10_589_532
    shutil.copy2(SAMPLE / name, tmp_path / name)  # the sample file outside the sample folder
    with pytest.raises(errors.DataError) as e:
        sources.fetch(name, tmp_path)
    assert "incomplete" in str(e.value) and str(tmp_path / name) in str(e.value)
    _patch_source(monkeypatch, name, ["http://127.0.0.1:9/never"], (SAMPLE / name).stat().st_size, None)
    assert sources.fetch(name, tmp_path) == tmp_path / name


def test_fetch_into_read_only_folder(tmp_path, monkeypatch):
    """A missing file and a data folder that cannot be written: the user's error, with what to do, no traceback."""
    name = "qrels.train.tsv"
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes there anyway: fail the lock file as the read-only folder would
        def refuse(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(sources.paths, "file_lock", refuse)
    try:
        with pytest.raises(errors.DataError) as e:
            sources.fetch(name, folder)
    finally:
        folder.chmod(0o755)  # so that pytest can clean it up
    msg = str(e.value)
    assert f"{folder} is not writable" in msg and "Permission denied" in msg
    assert f"{name} is missing" in msg and sources.SOURCES[name].urls[0] in msg and "--data_dir" in msg
