"""Reading a classify request's images: the body limit counted while streaming, multipart parsed as it arrives.

Counting bytes as they arrive (not trusting Content-Length) is what makes the limit hold for chunked
uploads, which have no Content-Length. The multipart parser is python-multipart's streaming one, fed
the same limited chunks, so too many file parts are refused as soon as the one too many begins.

Each body is held once, as the chunks it arrived in (the decoder reads them in place: joining them would
hold the body twice and need one contiguous block its size), and counted against the body budget
(memory.py): the Content-Length before the first byte is read, or each chunk of a chunked body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .memory import Reservation
from .problems import ProblemError

FILE_FIELD = "file"
RAW_TYPES = ("image/", "application/octet-stream")


@dataclass
class Upload:
    filename: str | None
    data: bytes | list[bytes]  # one image, in the chunks it arrived in; emptied once decoded

    def describe(self, position: int) -> str:
        return f"file {position}" + (f" ({self.filename!r})" if self.filename else "")


async def read_uploads(
    request: Request, *, max_body_bytes: int, max_files: int, timeout: float, reservation: Reservation | None = None
) -> list[Upload]:
    """The images in a multipart form (every ``file`` part) or a raw ``image/*`` body, which must arrive
    within ``timeout`` seconds: a client that stalls mid-body would otherwise hold its queue place forever
    (64 stalled connections would lock everyone else out). The body is counted in ``reservation``."""
    refuse_content_coding(request)
    async with _reading(request, max_body_bytes, timeout):
        return await _read_uploads(request, max_body_bytes, max_files, reservation or Reservation(None))


async def read_body(
    request: Request, *, max_body_bytes: int, timeout: float, reservation: Reservation | None = None
) -> bytes:
    """The whole raw body, whatever its Content-Type, under the same limit, budget and timeout as an upload."""
    refuse_content_coding(request)
    reservation = reservation or Reservation(None)
    async with _reading(request, max_body_bytes, timeout):
        await _check_declared_length(request, max_body_bytes, reservation)
        return b"".join([chunk async for chunk in _limited(request, max_body_bytes, reservation)])


def refuse_content_coding(request: Request) -> None:
    """415 with ``Accept-Encoding: identity`` for a body sent with a Content-Encoding (gzip, br, …): bodies are
    read as sent. Decoding them would need a bound of its own on the decompressed size; ignoring the header
    would read compressed bytes as an image (RFC 9110 §8.4, §15.5.16)."""
    header = request.headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    refused = [c for c in codings if c != "identity"]
    if refused:
        raise ProblemError(
            415,
            "unsupported-content-encoding",
            f"Content-Encoding {', '.join(refused)[:60]!r}: send the body uncompressed (identity)",
            {"Accept-Encoding": "identity"},
        )


@contextlib.asynccontextmanager
async def _reading(request: Request, max_body_bytes: int, timeout: float):
    """A body's read: within ``timeout`` (else 408); refused for want of room (503), what is left of it is
    drained first (discard_body), so the client reads the 503 on a connection it can use again."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise ProblemError(408, "body-timeout", f"the request body did not arrive within {timeout:g} s") from None
    except ProblemError as e:
        if e.status == 503:
            await discard_body(request, max_body_bytes=max_body_bytes, timeout=timeout)
        raise


async def _read_uploads(
    request: Request, max_body_bytes: int, max_files: int, reservation: Reservation
) -> list[Upload]:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    content_type = content_type.decode("latin-1")
    await _check_declared_length(request, max_body_bytes, reservation)

    if content_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise ProblemError(400, "malformed-multipart", "multipart/form-data without a boundary parameter")
        form = _Form(boundary, max_files)
        try:
            async for chunk in _limited(request, max_body_bytes, reservation):
                form.parser.write(chunk)
            form.parser.finalize()
        except FormParserError as e:
            raise ProblemError(400, "malformed-multipart", f"cannot parse the multipart body: {e}") from None
        if form.parser.state != MultipartState.END:  # a truncated body must not pass for one file fewer
            raise ProblemError(400, "malformed-multipart", "the multipart body ends before its closing boundary")
        if not form.uploads:
            raise ProblemError(422, "no-image", f"the form has no {FILE_FIELD!r} part: upload images as -F file=@…")
        return form.uploads

    if content_type.startswith(RAW_TYPES):
        return [Upload(None, [chunk async for chunk in _limited(request, max_body_bytes, reservation)])]

    raise ProblemError(
        415,
        "unsupported-media-type",
        f"Content-Type {content_type or '(none)'!r}: send multipart/form-data with {FILE_FIELD!r} parts, "
        "or one image as the raw body with Content-Type image/*",
    )


def _declared_length(request: Request) -> int | None:
    """The Content-Length, if the request has a usable one."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def _check_declared_length(request: Request, max_body_bytes: int, reservation: Reservation) -> None:
    """Before reading: a Content-Length over the limit is 413; one the body budget has no room for waits for
    room (the body unread meanwhile), then is 503."""
    declared = _declared_length(request)
    if declared is None:
        return
    if declared > max_body_bytes:
        raise _too_large(max_body_bytes)  # no need to read what will be refused anyway
    if not await reservation.grow_to(declared):
        raise _no_room(reservation)  # the body is drained before the answer (discard_body)


async def discard_body(request: Request, *, max_body_bytes: int, timeout: float) -> None:
    """Read what is left of a refused request's body and drop it, chunk by chunk (no memory held), so the
    client, still sending, reads the answer on a connection that stays open instead of seeing it reset.
    Only for bodies within the limit and only for ``timeout`` seconds; otherwise the connection closes."""
    declared = _declared_length(request)
    if declared is not None and declared > max_body_bytes:
        return
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    return
    except (TimeoutError, ClientDisconnect, RuntimeError):  # RuntimeError: the stream was already consumed
        return


def _no_room(reservation: Reservation) -> ProblemError:
    budget = reservation.budget
    return ProblemError(
        503,
        "memory-busy",
        f"request bodies in memory are at the limit ({budget.capacity:,} bytes, ALEXNET_BODY_MEMORY_BYTES); "
        "retry later",
        {"Retry-After": "1"},
    )


def _too_large(limit: int) -> ProblemError:
    return ProblemError(413, "body-too-large", f"the request body is larger than the limit of {limit:,} bytes")


async def _limited(request: Request, limit: int, reservation: Reservation) -> AsyncIterator[bytes]:
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if not await reservation.grow_to(size):  # a chunked body (or one longer than it said) growing
                raise _no_room(reservation)
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise ProblemError(400, "incomplete-body", "the client disconnected before sending the whole body") from None


@dataclass
class _Part:
    filename: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


class _Form:
    """Collects ``file`` parts from python-multipart's callbacks; refuses other fields and the one file too many."""

    def __init__(self, boundary: bytes, max_files: int):
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self._part = _Part()
        self._field, self._value = b"", b""
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def _begin(self):
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int):
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int):
        self._value += data[start:end]

    def _header_end(self):
        self._part.headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self):
        disposition, params = parse_options_header(self._part.headers.get("content-disposition"))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or name != FILE_FIELD:
            raise ProblemError(
                422,
                "unexpected-field",
                f"unexpected form field {name[:100]!r}: send each image as a part named {FILE_FIELD!r}",
            )
        if len(self.uploads) >= self.max_files:
            raise ProblemError(413, "too-many-files", f"more than {self.max_files} files in one request")
        filename = params.get(b"filename")
        self._part.filename = None if filename is None else filename.decode("utf-8", "replace")[:255]

    def _data(self, data: bytes, start: int, end: int):
        self._part.chunks.append(data[start:end])

    def _end(self):
        self.uploads.append(Upload(self._part.filename, self._part.chunks))
        self._part.chunks = []
