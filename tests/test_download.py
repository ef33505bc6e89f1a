"""The downloader against a local HTTP server started by the tests (no network needed)."""

import collections
import hashlib
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from bnnjax import _download
from bnnjax._download import ChecksumError, DataError, DownloadError, Remote, fetch, resolve_url


class FileServer:
    """An HTTP server on 127.0.0.1 (free port) serving ``files`` (URL path -> bytes) from a thread.

    ``hits`` counts requests per path; ``fail[path]`` is a list of HTTP statuses to answer first;
    paths in ``truncate`` announce more bytes than they send.
    """

    def __init__(self, files=None):
        self.files = dict(files or {})
        self.hits = collections.Counter()
        self.fail = {}
        self.truncate = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                server.hits[path] += 1
                if server.fail.get(path):
                    self.send_error(server.fail[path].pop(0))
                elif path not in server.files:
                    self.send_error(404)
                else:
                    body = server.files[path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 100 * (path in server.truncate)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.thread = None


def dead_url() -> str:
    """A local URL nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(_download, "_BACKOFF_S", 0.0)
    monkeypatch.delenv("BNNJAX_DATASET_MIRROR", raising=False)


PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk


def serve(server, path="/files/data.bin", body=PAYLOAD, **kw):
    server.files[path] = body
    return Remote(server.url + path, hashlib.sha256(body).hexdigest(), **kw)


def leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_remote_defaults_and_validation():
    r = Remote("https://example.org/a/b%20c.h5?x=1", "AB" * 32, size=3)
    assert r.filename == "b c.h5" and r.mirror_path == "b c.h5" and r.sha256 == "ab" * 32
    with pytest.raises(ValueError, match="64 hex digits"):
        Remote("https://example.org/x", "abc")
    with pytest.raises(ValueError, match="plain file name"):
        Remote("https://example.org/x", "0" * 64, filename="../x")
    assert issubclass(DownloadError, OSError) and issubclass(ChecksumError, DownloadError)
    assert issubclass(DownloadError, DataError)


def test_download_then_cache_hit_with_server_gone(server, tmp_path, capsys):
    remote = serve(server)
    path = fetch(remote, tmp_path / "cache", progress=True)
    assert path == tmp_path / "cache" / "data.bin" and path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path / "cache") == ["data.bin"]  # no temporary file left beside it
    assert "data.bin" in capsys.readouterr().err  # the progress bar
    server.stop()
    assert fetch(remote, tmp_path / "cache", progress=False).read_bytes() == PAYLOAD
    _download._verified.clear()  # a fresh process re-hashes the file, still without the network
    assert fetch(remote, tmp_path / "cache", progress=False) == path
    assert server.hits["/files/data.bin"] == 1


def test_checksum_mismatch_names_url_and_digests_and_deletes_the_file(server, tmp_path):
    good = serve(server)
    bad = Remote(good.url, hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(ChecksumError) as e:
        fetch(bad, tmp_path, progress=False)
    msg = str(e.value)
    assert good.url in msg and bad.sha256 in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    assert "deleted" in msg and leftovers(tmp_path) == []
    assert server.hits["/files/data.bin"] == 1  # a wrong digest is not retried


def test_wrong_cached_file_is_replaced(server, tmp_path):
    remote = serve(server)
    (tmp_path / "data.bin").write_bytes(b"stale")
    assert fetch(remote, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_server_down_names_url_mirror_and_where_to_put_the_file(tmp_path):
    url = dead_url() + "/files/weights.h5"
    remote = Remote(url, "0" * 64)
    with pytest.raises(DownloadError) as e:
        fetch(remote, tmp_path / "cache", progress=False, retries=2)
    msg = str(e.value)
    assert url in msg and "Connection refused" in msg and "3 attempts" in msg
    assert "BNNJAX_DATASET_MIRROR" in msg and f"{tmp_path / 'cache'}/" in msg and "weights.h5" in msg
    assert e.value.url == url and leftovers(tmp_path / "cache") == []


def test_not_found_is_not_retried(server, tmp_path):
    remote = Remote(server.url + "/missing.bin", "0" * 64)
    with pytest.raises(DownloadError, match="not found on the server"):
        fetch(remote, tmp_path, progress=False)
    assert server.hits["/missing.bin"] == 1 and leftovers(tmp_path) == []


def test_transient_errors_are_retried(server, tmp_path):
    remote = serve(server)
    server.fail["/files/data.bin"] = [503, 500]
    assert fetch(remote, tmp_path, progress=False, retries=3).read_bytes() == PAYLOAD
    assert server.hits["/files/data.bin"] == 3
    server.fail["/files/other.bin"] = [503] * 5
    with pytest.raises(DownloadError, match="HTTP 503.*2 attempts"):
        fetch(serve(server, "/files/other.bin"), tmp_path, progress=False, retries=1)


def test_truncated_body_is_retried_then_reported(server, tmp_path):
    remote = serve(server)
    server.truncate.add("/files/data.bin")
    with pytest.raises(DownloadError, match=f"closed after {len(PAYLOAD)} of {len(PAYLOAD) + 100} bytes"):
        fetch(remote, tmp_path, progress=False, retries=1)
    assert server.hits["/files/data.bin"] == 2 and leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_partial_file(server, tmp_path, monkeypatch):
    remote = serve(server)

    def interrupted(url, remote, tmp, progress):
        tmp.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(_download, "_download_once", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(remote, tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_mirror_variable_replaces_the_host(server, tmp_path, monkeypatch):
    body = b"mirrored bytes"
    server.files["/mirror/sub/file.bin"] = body
    remote = Remote(dead_url() + "/canonical/file.bin", hashlib.sha256(body).hexdigest(), mirror_path="sub/file.bin")
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", server.url + "/mirror/")
    assert resolve_url(remote) == server.url + "/mirror/sub/file.bin"
    assert fetch(remote, tmp_path / "a", progress=False).read_bytes() == body
    # A directory (by path or file:// URL) laid out the same way is a mirror too.
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "file.bin").write_bytes(body)
    for mirror in (str(tmp_path / "m"), (tmp_path / "m").as_uri()):
        monkeypatch.setenv("BNNJAX_DATASET_MIRROR", mirror)
        assert resolve_url(remote) == (tmp_path / "m" / "sub" / "file.bin").as_uri()
        assert fetch(remote, tmp_path / mirror[-3:].replace("/", "_"), progress=False).read_bytes() == body
    # A mirror without the file: not found, and the message says which mirror is set.
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", server.url + "/empty")
    with pytest.raises(DownloadError) as e:
        fetch(remote, tmp_path / "b", progress=False)
    assert "not found" in str(e.value) and server.url + "/empty" in str(e.value)
    with pytest.raises(DownloadError, match="canonical/file.bin.*Connection refused"):
        fetch(remote, tmp_path / "c", progress=False, retries=0, mirror_env=None)  # ignores the mirror
