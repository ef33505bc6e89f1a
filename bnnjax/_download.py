"""The one downloader for everything bnnjax fetches (datasets, pretrained weights).

A :class:`Remote` names a file: its URL, SHA-256 and (optionally) size. :func:`fetch` returns the
verified local copy in a cache directory, downloading it on first use:

- streamed to a temporary file in the cache directory with a tqdm progress bar, hashed while streaming,
  fsync'ed and renamed into place only when complete and verified — an interrupted or failed download
  leaves no file under the final name;
- transient failures (timeouts, connection resets/refusals, truncated bodies, HTTP 5xx/408/429) are
  retried with exponential backoff; HTTP 404 and other 4xx, unknown host names and checksum
  mismatches are not;
- ``$BNNJAX_DATASET_MIRROR`` replaces the host: the file is fetched from
  ``$BNNJAX_DATASET_MIRROR/<remote.mirror_path>`` (``mirror_path`` defaults to the file name; the
  datasets use ``<dataset name>/<file name>``, the layout of the cache itself, so a populated cache
  directory served over HTTP or named by path is a complete mirror). The mirror may be an
  ``http(s)://`` or ``file://`` URL or a plain directory path.

Errors: :class:`DownloadError` (a subclass of :class:`OSError`, like the ``urllib`` errors it wraps)
when no verified file can be produced, :class:`ChecksumError` (a :class:`DownloadError`) when the bytes
received do not have the expected SHA-256. Both derive from :class:`DataError`, the base of every
"the data could not be had" error of bnnjax, which the experiment scripts print as one line.

Standard library (``urllib``) and tqdm only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["Remote", "fetch", "resolve_url", "sha256_file", "DataError", "DownloadError", "ChecksumError",
           "MIRROR_ENV"]

MIRROR_ENV = "BNNJAX_DATASET_MIRROR"
_TIMEOUT_S = 30.0  # connect and per-read socket timeout
_BACKOFF_S = 1.0  # first retry waits this long, then doubles; tests set it to 0
_CHUNK = 1 << 20
_USER_AGENT = "bnnjax-downloader (Python urllib)"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Verified cache hits of this process, keyed by path: (size, mtime_ns, sha256). Saves re-hashing a large
# file that is fetched several times (e.g. once per split).
_verified: dict[str, tuple[int, int, str]] = {}


class DataError(Exception):
    """Base of bnnjax's errors about obtaining data files (datasets, weights).

    The file is missing, corrupt, or cannot be downloaded; the message says what failed and how to fix it.
    """


class DownloadError(DataError, OSError):
    """A file could not be downloaded; the message names the URL, the reason and how to provide it by hand.

    Causes: an unreachable or unknown host, a file not on the server, repeated transient failures, an
    unwritable cache directory.

    Attributes:
      url: the URL that failed (None when the failure was local, e.g. an unwritable cache).
      cause: the reason alone, without the advice.
    """

    def __init__(self, message: str, url: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.url, self.cause = url, cause or message


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected SHA-256; the bad file has been deleted.

    The message names the URL, the expected and the actual digest.
    """


@dataclasses.dataclass(frozen=True)
class Remote:
    """A file to download: where from, its SHA-256, and optionally its size and local name.

    Attributes:
      url: the canonical URL (redirects are followed).
      sha256: the expected SHA-256, 64 hex digits.
      filename: the name in the cache directory; default the last component of the URL's path.
      size: the expected size in bytes, when known (progress bar total when the server sends none;
        reported on a mismatch).
      mirror_path: the path under ``$BNNJAX_DATASET_MIRROR``; default ``filename``.
    """

    url: str
    sha256: str
    filename: str | None = None
    size: int | None = None
    mirror_path: str | None = None

    def __post_init__(self):
        digest = self.sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"sha256 of {self.url} must be 64 hex digits, got {self.sha256!r}.")
        object.__setattr__(self, "sha256", digest)
        if not self.filename:
            name = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])
            if not name:
                raise ValueError(f"cannot take a file name from {self.url!r}; pass filename=.")
            object.__setattr__(self, "filename", name)
        if "/" in self.filename or "\\" in self.filename or self.filename in (".", ".."):
            raise ValueError(f"filename must be a plain file name, got {self.filename!r}.")
        if not self.mirror_path:
            object.__setattr__(self, "mirror_path", self.filename)


def _mirror_base(mirror: str) -> str:
    if "://" not in mirror:  # a plain directory path
        return Path(mirror).expanduser().resolve().as_uri()
    return mirror.rstrip("/")


def resolve_url(remote: Remote, mirror_env: str | None = MIRROR_ENV) -> str:
    """The URL :func:`fetch` downloads ``remote`` from.

    ``$mirror_env`` + ``/`` + ``remote.mirror_path`` when that variable is set (a trailing ``/`` of the
    mirror is dropped; a plain directory path becomes a ``file://`` URL), else ``remote.url``.
    """
    mirror = os.environ.get(mirror_env) if mirror_env else None
    if mirror:
        return _mirror_base(mirror) + "/" + urllib.parse.quote(remote.mirror_path)
    return remote.url


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Transient(Exception):
    """A failure worth retrying; ``reason`` says what happened."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Permanent(Exception):
    """A failure that retrying will not fix."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _classify(e: BaseException) -> Exception:
    """Sort a urllib/socket failure into retry-worthy or not, with a human-readable reason."""
    if isinstance(e, urllib.error.HTTPError):
        e.close()  # it holds the response's socket
        what = f"HTTP {e.code} {e.reason}"
        if e.code == 404:
            return _Permanent(f"not found on the server ({what})")
        return (_Transient if e.code in _RETRY_STATUS else _Permanent)(what)
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, str):
        return _Permanent(reason)
    if isinstance(reason, socket.gaierror):
        return _Permanent(f"cannot resolve the host name ({reason}); the machine may be offline")
    if isinstance(reason, FileNotFoundError):  # file:// mirrors
        return _Permanent(f"not found ({reason.strerror}: {reason.filename})")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return _Permanent(f"TLS certificate not trusted ({reason})")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _Transient(f"timed out after {_TIMEOUT_S:g} s")
    if isinstance(reason, (OSError, http.client.HTTPException)):  # resets, refusals, dropped connections
        return _Transient(f"{type(reason).__name__}: {reason}")
    return _Permanent(f"{type(reason).__name__}: {reason}")


def _download_once(url: str, remote: Remote, tmp, progress: bool) -> str:
    """Stream ``url`` into the open file ``tmp`` (truncated first); return the SHA-256 of the bytes.

    Network failures come out as ``_Transient``/``_Permanent``; a failure to write ``tmp`` (disk full)
    stays an ``OSError`` of the file, never mistaken for a network error.
    """
    tmp.seek(0)
    tmp.truncate()
    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except ValueError as e:  # malformed URL (e.g. a mirror without a scheme that is not a path either)
        raise _Permanent(f"not a valid URL ({e})") from e
    except (OSError, http.client.HTTPException) as e:
        raise _classify(e) from e
    from tqdm.auto import tqdm  # imported here: only a download needs it

    with response, tqdm(total=remote.size, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.filename,
                        disable=not progress, file=sys.stderr, leave=False) as bar:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None:
            bar.reset(total=expected)
        received = 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _classify(e) from e
            if not chunk:
                break
            tmp.write(chunk)
            h.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if expected is not None and received != expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")
    return h.hexdigest()


def _by_hand(remote: Remote, cache_dir: Path, mirror_env: str | None) -> str:
    """How to provide the file without the network: where to put it, or which mirror variable to set."""
    text = (f"To provide it by hand, put {remote.filename} (SHA-256 {remote.sha256}, from {remote.url}) "
            f"in {cache_dir}/")
    if not mirror_env:
        return text + "."
    current = os.environ.get(mirror_env)
    return text + (f", or set {mirror_env} to a URL or directory serving it as <mirror>/{remote.mirror_path}"
                   + (f" (now {current!r})." if current else "."))


def _fsync_dir(directory: Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fetch(remote: Remote, cache_dir: str | os.PathLike, *, progress: bool = True, retries: int = 3,
          mirror_env: str | None = MIRROR_ENV) -> Path:
    """The verified local copy of ``remote`` in ``cache_dir``, downloaded on first use.

    A file already at ``cache_dir/remote.filename`` is hashed (once per process) and returned without
    any network access when its SHA-256 matches; when it does not match it is deleted and downloaded
    again.

    Args:
      remote: what to download.
      cache_dir: the directory the file lands in (created if missing).
      progress: show a tqdm progress bar on stderr while downloading.
      retries: how many times to retry a transient failure (so ``retries + 1`` attempts at most),
        waiting 1, 2, 4, ... s between attempts.
      mirror_env: the environment variable naming a mirror (see :func:`resolve_url`); None ignores
        mirrors.

    Returns:
      The path of the verified file, ``cache_dir/remote.filename``.

    Raises:
      ChecksumError: the downloaded bytes do not have ``remote.sha256`` (the message gives the URL,
        the expected and actual digests and sizes; nothing is left in the cache).
      DownloadError: the file cannot be downloaded (the message names the URL, the reason, and where to
        put the file by hand or how to set a mirror).
    """
    cache_dir = Path(cache_dir)
    dest = cache_dir / remote.filename
    note = ""
    if dest.is_file():
        st = dest.stat()
        memo = _verified.get(str(dest))
        actual = memo[2] if memo and memo[:2] == (st.st_size, st.st_mtime_ns) else sha256_file(dest)
        if actual == remote.sha256:
            _verified[str(dest)] = (st.st_size, st.st_mtime_ns, actual)
            return dest
        dest.unlink()
        _verified.pop(str(dest), None)
        note = f" (the cached copy {dest} had SHA-256 {actual}, not {remote.sha256}, and was deleted)"
        if progress:
            print(f"bnnjax: {dest} has the wrong SHA-256; downloading it again.", file=sys.stderr)

    url = resolve_url(remote, mirror_env)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{remote.filename}.", suffix=".part")
    except OSError as e:
        raise DownloadError(f"cannot write to the cache directory {cache_dir} ({e}); set BNNJAX_DATA_DIR "
                            "(or pass a cache directory) to a writable place.") from e
    tmp_path, replaced = Path(tmp_name), False
    try:
        with os.fdopen(fd, "w+b") as tmp:
            attempt = 0
            while True:
                try:
                    actual = _download_once(url, remote, tmp, progress)
                    break
                except _Transient as e:
                    if attempt >= retries:
                        cause = f"{e.reason} (gave up after {attempt + 1} attempts){note}"
                        raise DownloadError(f"cannot download {url}: {cause}. "
                                            + _by_hand(remote, cache_dir, mirror_env), url, cause) from e
                    time.sleep(_BACKOFF_S * 2 ** attempt)
                    attempt += 1
                except _Permanent as e:
                    raise DownloadError(f"cannot download {url}: {e.reason}{note}. "
                                        + _by_hand(remote, cache_dir, mirror_env), url, e.reason + note) from e
                except OSError as e:  # writing the temporary file: disk full, quota
                    raise DownloadError(f"cannot write {tmp_path} while downloading {url}: {e}.") from e
            size = tmp.tell()
            if actual != remote.sha256:
                sizes = f"{size} bytes" + (f", expected {remote.size}" if remote.size is not None else "")
                cause = f"checksum mismatch: expected SHA-256 {remote.sha256}, got {actual} ({sizes})"
                raise ChecksumError(
                    f"{cause} for {url}; the downloaded file was deleted. The server or mirror holds a different "
                    f"or damaged file" + (f"; check the copy on the mirror ({mirror_env})." if url != remote.url
                                          else "."), url, cause)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, dest)
        replaced = True
        _fsync_dir(cache_dir)
    finally:
        if not replaced:  # failure or interruption (Ctrl-C included): no partial file stays behind
            tmp_path.unlink(missing_ok=True)
    st = dest.stat()
    _verified[str(dest)] = (st.st_size, st.st_mtime_ns, remote.sha256)
    return dest
