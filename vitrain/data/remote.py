"""Where shard bytes come from: a URL's scheme decides how it is opened, here and nowhere else.

``data.shards`` (and ``data.val_shards``, ``data.manifest``) may name local paths, ``pipe:COMMAND`` (the
command's standard output, as webdataset reads it), ``http(s)://`` URLs (Python's urllib, byte ranges to go on
where a read stopped) and ``s3://`` / ``gs://`` objects (fsspec, with s3fs or gcsfs from the ``remote`` extra; the
S3 endpoint from the standard ``AWS_ENDPOINT_URL``, anything else through ``data.storage_options``). Everything
after :func:`open_shard` sees a byte stream and does not care where it came from.

A network fault is not a corrupt shard: a connection refused or reset, a timeout, DNS, HTTP 429 and 5xx, S3
throttling (and ``curl``'s exit codes for them under ``pipe:``) are retried with growing pauses for
``retry_seconds``, and the stream goes on at the byte it had reached (a ``pipe:`` command is run again and the
bytes already read are passed over). After that, :class:`NetworkError` names the URL and the cause.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from vitrain.errors import ConfigError, DataError, first_line, import_extra

log = logging.getLogger(__name__)

SCHEMES = ("file", "pipe", "http", "https", "s3", "gs", "gcs")  # what a shard URL may start with
FSSPEC = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # object stores, through fsspec and their package
TIMEOUT = 30.0  # seconds a read may wait for bytes before it counts as a network fault
CURL_NETWORK = {5, 6, 7, 18, 28, 35, 52, 55, 56}  # curl's exits for proxy/DNS/connect/partial/timeout/TLS/recv
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                   "IncompleteRead", "RemoteDisconnected", "ProtocolError", "ResponseStreamingError"}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429"}


class NetworkError(DataError):
    """A server that did not answer (or kept failing) for ``data.retry_seconds``: not the shard's fault."""


class CommandFailed(OSError):
    """A ``pipe:`` command that exited with a non-zero status (``code``)."""

    def __init__(self, command: str, code: int, stderr: str) -> None:
        super().__init__(f"command exited with {code}" + (f": {stderr}" if stderr else ""))
        self.command, self.code = command, code


def network_stop(error: NetworkError, run_dir: Path, resume: str) -> str:
    """The one line for a run stopped by an unreachable data server: the cause, the run's ``last.pt`` that is
    kept (or none yet), and the command ``resume`` that goes on from it once the server answers again."""
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"{last} is kept; once the server answers, resume with: {resume}" if last.is_file() else \
        "no checkpoint was written yet; run the command again once the server answers"
    return f"{first_line(error, 1000)}; it is the network, not the shard (data.skip_corrupt does not apply): {kept}"


def scheme(url: str) -> str:
    """The scheme of a shard URL (``file`` for a local path), or a one-line ConfigError naming an unsupported one."""
    if url.startswith("pipe:"):
        return "pipe"
    if "://" not in url:
        return "file"
    name = url.split("://", 1)[0].lower()
    if name not in SCHEMES:
        raise ConfigError(f"shard URL scheme '{name}://' is not supported ({url}); use a local path, pipe:COMMAND, "
                          f"http(s)://, s3:// or gs://")
    return name


def sibling(url: str, name: str) -> str:
    """The URL of the file ``name`` beside shard ``url``: in the same folder, bucket prefix or server path; for a
    ``pipe:`` command, the same command with the shard's path (the argument naming it) pointing at ``name``."""
    kind = scheme(url)
    if kind == "file":
        return str(Path(url).parent / name)
    if kind != "pipe":
        return url.rsplit("/", 1)[0] + "/" + name
    words = shlex.split(url[len("pipe:"):])
    target = shard_argument(words)
    if target is None:
        raise ConfigError(f"cannot tell which argument of '{url}' names the shard; set data.manifest=URL")
    words[target] = words[target].rsplit("/", 1)[0] + "/" + name if "/" in words[target] else name
    return "pipe:" + shlex.join(words)


def shard_argument(words: list[str]) -> int | None:
    """The index of the command's argument that names a shard (a path or URL ending in .tar or .tgz), or None."""
    found = [i for i, w in enumerate(words) if w.split("?", 1)[0].endswith((".tar", ".tgz", ".tar.gz"))]
    return found[-1] if found else None


def shard_name(url: str) -> str:
    """The file name of a shard (what a manifest lists): ``train-000001.tar`` for a path, URL or pipe: command."""
    if scheme(url) == "pipe":
        words = shlex.split(url[len("pipe:"):])
        target = shard_argument(words)
        url = words[target] if target is not None else url
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def read_text(url: str, storage_options: Mapping[str, Any] | None = None, retry_seconds: float = 0.0) -> str | None:
    """The text of a small file (a manifest, a class list) at ``url``, or None where there is none (a missing
    file, HTTP 404, a command that fails); a network fault past ``retry_seconds`` raises :class:`NetworkError`."""
    try:
        with open_shard(url, storage_options, retry_seconds) as stream:
            return stream.read().decode()
    except NetworkError:
        raise
    except (OSError, ValueError):
        return None


def open_shard(url: str, storage_options: Mapping[str, Any] | None = None,
               retry_seconds: float = 120.0) -> IO[bytes]:
    """A buffered byte stream of ``url`` that rides out network faults for ``retry_seconds`` (module docstring)."""
    kind = scheme(url)
    if kind == "file":
        return open(Path(url).expanduser(), "rb")  # noqa: SIM115 (the caller closes it)
    opener = {"pipe": _open_pipe, "http": _open_http, "https": _open_http}.get(kind, _open_fsspec)
    return io.BufferedReader(RetryingStream(url, lambda offset: opener(url, offset, storage_options or {}),
                                            retry_seconds), buffer_size=1 << 20)


class RetryingStream(io.RawIOBase):
    """A read-only stream over ``open_at(offset)``, which opens the source at a byte offset; a transient fault
    (:func:`transient`) reopens it at the byte reached, with pauses of 0.5, 1, 2, ... s (at most 10 s), for up to
    ``retry_seconds`` since the first fault of a streak; anything else is raised as it is."""

    def __init__(self, url: str, open_at: Callable[[int], IO[bytes]], retry_seconds: float) -> None:
        super().__init__()
        self.url, self.open_at, self.retry_seconds = url, open_at, retry_seconds
        self.position, self.stream = 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        failing_since, pause = None, 0.5
        while True:
            try:
                if self.stream is None:
                    self.stream = self.open_at(self.position)
                n = self.stream.readinto(buffer)
                self.position += n or 0
                return n or 0
            except Exception as e:
                if not transient(e):
                    raise
                self._drop()
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since + pause > self.retry_seconds:
                    raise NetworkError(f"{self.url} could not be read for {self.retry_seconds:g} s "
                                       f"(data.retry_seconds), at byte {self.position}: {cause(e)}") from e
                log.warning("%s: %s; retrying in %.1f s at byte %d", self.url, cause(e), pause, self.position)
                time.sleep(pause)
                pause = min(2 * pause, 10.0)

    def _drop(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close as well
                self.stream.close()
            self.stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def transient(error: BaseException) -> bool:
    """A network fault worth retrying: connection refused or reset, a timeout, DNS, HTTP 429/5xx, S3 throttling
    or a 5xx code, curl's network exits under ``pipe:``; it, or an exception it was raised from."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, urllib.error.HTTPError):
            return seen.code == 429 or seen.code >= 500
        if isinstance(seen, CommandFailed):
            return seen.code in CURL_NETWORK
        if isinstance(seen, ConnectionError | TimeoutError | urllib.error.URLError):
            return True
        code = str(getattr(seen, "response", {}).get("Error", {}).get("Code", "")) if isinstance(
            getattr(seen, "response", None), dict) else ""
        if type(seen).__name__ in TRANSIENT_NAMES or code in TRANSIENT_CODES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cause(error: BaseException) -> str:
    """The network cause in a few words: ``URLError: [Errno 111] Connection refused``."""
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}: {first_line(reason if reason is not None else error, 120)}"


def _open_http(url: str, offset: int, options: Mapping[str, Any]) -> IO[bytes]:
    """urllib, with a Range header past ``offset``; a server that ignores it sends the whole file, and the bytes
    before ``offset`` are read and dropped."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    response = urllib.request.urlopen(urllib.request.Request(url, headers={**headers, **options.get("headers", {})}),
                                      timeout=TIMEOUT)
    if offset and response.status != 206:
        _skip(response, offset)
    return response


def _open_fsspec(url: str, offset: int, options: Mapping[str, Any]) -> IO[bytes]:
    """An object store through fsspec (s3fs, gcsfs), seeked to ``offset``."""
    import_extra(FSSPEC[scheme(url)], f"reading {url}", "remote")
    import fsspec

    stream = fsspec.open(url, "rb", **options).open()
    if offset:
        stream.seek(offset)
    return stream


class _Pipe(io.RawIOBase):
    """A command's standard output; its exit status is checked at the end (:class:`CommandFailed`)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.process.stdout.readinto(buffer)
        if not n:
            code = self.process.wait()
            if code:
                raise CommandFailed(self.command, code, first_line(self.process.stderr.read().decode(), 200))
        return n

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
        super().close()


def _open_pipe(url: str, offset: int, options: Mapping[str, Any]) -> IO[bytes]:
    stream = _Pipe(url[len("pipe:"):])
    _skip(stream, offset)
    return stream


def _skip(stream: IO[bytes], count: int) -> None:
    """Read and drop ``count`` bytes (a source that cannot start past them)."""
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionResetError(f"the stream ended {count} bytes before the byte to go on from")
        count -= len(chunk)
