"""A source (a path or a URL) → a checkpoint file: read or download, verify, parse, convert, write."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

from ..checkpoint import Checkpoint
from ..classes import ImageClass
from .common import WeightsError
from .convert import to_checkpoint
from .download import ChecksumMismatch, Digests, download, is_url, read_file
from .formats import parse
from .overwrite import IMPORTED_BY, check_out
from .published import PUBLISHED, PUBLISHED_BY_NAME, PUBLISHED_VAL_ERRORS, PUBLISHED_VAL_NOTE, PublishedFile


def published_match(digests: Digests) -> PublishedFile | None:
    return next((p for p in PUBLISHED if getattr(digests, p.checksum[0]) == p.checksum[1]), None)


def import_weights(
    source: str,
    out: str | Path,
    *,
    format: str = "auto",
    expected: dict[str, str] | None = None,
    allow_unverified: bool = False,
    classes: tuple[ImageClass, ...] | None = None,
    progress: TextIO | None = sys.stderr,
    timeout: float = 60.0,
    force: bool = False,
) -> Checkpoint:
    """Convert ``source`` (path or URL) into a checkpoint at ``out``; return it.

    ``expected`` ({"sha1"|"sha256": hex}) is checked when given; otherwise a file named like a published
    one (bvlc_alexnet.caffemodel, bvlcalexnet-12.onnx) is checked against the published checksum, and a
    download of any other file is refused unless ``allow_unverified``. Raises DownloadError (network),
    ChecksumMismatch, FileNotFoundError or WeightsError; ``out`` is written only on success.

    An existing ``out`` is replaced only when it is an earlier import, or with ``force``: a checkpoint from
    training (or anything else) raises OverwriteRefused, before anything is downloaded (see ``check_out``).
    """
    check_out(out, force)
    url = source if is_url(source) else None
    name = Path(unquote(urlsplit(source).path) if url else source).name
    verify_with, verified_by = _checksum_to_verify(source, name, url, expected, allow_unverified)
    if url:
        with tempfile.TemporaryDirectory(prefix="alexnet-import-") as tmp:
            path = Path(tmp) / (name or "download")
            digests = download(url, path, progress=progress, timeout=timeout)
            digests.verify(verify_with, name)
            data = path.read_bytes()
    else:
        data, digests = read_file(source)
        digests.verify(verify_with, name)

    try:
        imported = parse(data, format, name)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    del data  # the tensors own copies; free the file's 244 MB before writing the checkpoint

    provenance = _provenance(source if url else str(Path(source).resolve()), name, digests, verified_by)
    try:
        checkpoint = to_checkpoint(imported, provenance=provenance, classes=classes)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    replaced = check_out(out, force)  # again: training may have written it meanwhile
    checkpoint.save(out)
    if replaced and progress is not None:
        print(f"replaced {out}: {replaced}", file=progress)
    checkpoint.path = str(out)
    return checkpoint


def _checksum_to_verify(source, name, url, expected, allow_unverified) -> tuple[dict[str, str], str | None]:
    """The checksum the source must have, and how we know it (None: nothing to verify against)."""
    known = PUBLISHED_BY_NAME.get(name)
    if expected:
        return expected, "checksum given on the command line"
    if known is not None:
        return dict([known.checksum]), f"published {known.checksum[0]}"
    if url and not allow_unverified:
        raise ChecksumMismatch(
            f"{source}: no published checksum is known for {name!r}; pass --expected-sha256 or --expected-sha1 "
            "(or --allow-unverified)"
        )
    return {}, None


def _provenance(source: str, name: str, digests: Digests, verified_by: str | None) -> dict:
    match = published_match(digests)
    provenance = {
        "trained": True,
        "source": source,
        "source_name": match.description if match else name,
        "source_bytes": digests.size,
        "source_sha1": digests.sha1,
        "source_sha256": digests.sha256,
        "source_verified": verified_by or "not verified (no checksum known or given)",
        "imported_by": IMPORTED_BY,
    }
    if match:
        provenance |= {"dataset": "ILSVRC-2012", "dataset_size": 1_281_167, **PUBLISHED_VAL_ERRORS}
        provenance["val_errors_note"] = PUBLISHED_VAL_NOTE
    return provenance
