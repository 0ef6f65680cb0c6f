"""Fetch a large file by URL or path, with a progress bar, computing its checksums on the way.

Only the standard library (urllib): this is needed once, at install or image-build time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

CHUNK = 1 << 20
USER_AGENT = "alexnet-reference/import_weights (python urllib)"


class DownloadError(OSError):
    """The file could not be fetched (no network, HTTP error, connection cut short)."""


class ChecksumMismatch(ValueError):
    """The bytes are not the file they claim to be."""


@dataclass(frozen=True)
class Digests:
    size: int
    sha1: str
    sha256: str

    def verify(self, expected: dict[str, str], what: str) -> None:
        """Raise ChecksumMismatch unless every ``{"sha1"|"sha256": hex}`` in ``expected`` matches."""
        for algorithm, want in expected.items():
            got = getattr(self, algorithm)
            if got != want.lower():
                raise ChecksumMismatch(
                    f"{what}: {algorithm} is {got} ({self.size:,} bytes), expected {want.lower()}. "
                    "The file is damaged, truncated, or not the one expected."
                )


class _Hashing:
    def __init__(self):
        self.size, self._sha1, self._sha256 = 0, hashlib.sha1(), hashlib.sha256()

    def update(self, chunk) -> None:
        self.size += len(chunk)
        self._sha1.update(chunk)
        self._sha256.update(chunk)

    def digests(self) -> Digests:
        return Digests(self.size, self._sha1.hexdigest(), self._sha256.hexdigest())


class Progress:
    """A one-line progress bar on a terminal; on a log (docker build, CI) a line every 10%."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = sys.stderr, min_interval: float = 0.2):
        self.label, self.total, self.stream = label, total, stream
        self.done, self.started = 0, time.monotonic()
        self._tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self._last_draw, self._last_decile, self._min_interval = 0.0, -1, min_interval

    def update(self, n: int) -> None:
        self.done += n
        if self.stream is None:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= self._min_interval:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        elif self.total:
            decile = 10 * self.done // self.total
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self._tty:
            self.stream.write("\r" + self._line(time.monotonic()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-6) / 1e6
        if self.total:
            return (
                f"{self.label}: {100 * self.done // self.total:3d}% "
                f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {rate:.1f} MB/s"
            )
        return f"{self.label}: {self.done / 1e6:.1f} MB  {rate:.1f} MB/s"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def download(url: str, dest: Path, *, progress: TextIO | None = sys.stderr, timeout: float = 60.0) -> Digests:
    """Stream ``url`` into ``dest``; return its size and checksums.

    Raises DownloadError for any network failure, an HTTP error status, or a body shorter than the
    Content-Length the server announced (a cut connection is not always an exception in urllib).
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    hashing = _Hashing()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = Progress(f"downloading {Path(urllib.parse.urlsplit(url).path).name or url}", total, progress)
            with open(dest, "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    hashing.update(chunk)
                    bar.update(len(chunk))
            bar.close()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({e.reason}); is there a network connection?") from None
    except (http.client.HTTPException, OSError) as e:
        raise DownloadError(
            f"{url}: connection failed after {hashing.size:,} bytes ({type(e).__name__}: {e})"
        ) from None
    if total is not None and hashing.size != total:
        raise DownloadError(f"{url}: download truncated: got {hashing.size:,} of {total:,} bytes")
    return hashing.digests()


def read_file(path: str | os.PathLike, *, progress: TextIO | None = None) -> tuple[bytearray, Digests]:
    """The whole file in a (writable) bytearray, with its checksums."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(size)
            view, hashing = memoryview(data), _Hashing()
            bar = Progress(f"reading {path.name}", size, progress)
            while hashing.size < size:
                n = f.readinto(view[hashing.size : hashing.size + CHUNK])
                if not n:
                    raise OSError(f"file shrank while reading: got {hashing.size:,} of {size:,} bytes")
                hashing.update(view[hashing.size : hashing.size + n])
                bar.update(n)
            bar.close()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory") from None
    return data, hashing.digests()
