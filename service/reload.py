"""Hot reload: notice when the checkpoint file is replaced, load the new one beside the old, then switch.

The file is polled (inode, size, mtime); a change is loaded once it has held still for one poll interval,
so a file copied in place (not renamed over, as training does) is not read half-written. Loading and the
warm-up forward pass run in a worker thread while the old model keeps serving; the switch is one
reference assignment on the event loop. A file that fails to load is logged and left alone until it
changes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from model.files import FileIdentity, file_identity

from . import engine
from .logs import identity_summary

log = logging.getLogger("service")

Fingerprint = FileIdentity
fingerprint = file_identity  # (inode, size, mtime) of the checkpoint file; None while there is none


async def watch_checkpoint(
    path: Path,
    interval: float,
    loaded: Fingerprint | None,
    load: Callable[[Path], engine.LoadedModel],
    switch: Callable[[engine.LoadedModel], None],
    on_result: Callable[[str], None],
) -> None:
    """Poll forever (until cancelled). ``loaded`` is the fingerprint of the file being served, if any."""
    seen, candidate, missing_reported = loaded, None, False
    while True:
        await asyncio.sleep(interval)
        current = fingerprint(path)
        if current is None:
            if seen is not None and not missing_reported:
                log.warning("checkpoint %s disappeared; still serving the model loaded from it", path)
                missing_reported = True
            candidate = None
            continue
        missing_reported = False
        if current == seen:
            candidate = None
            continue
        if current != candidate:
            candidate = current  # changed since the last poll: wait until it holds still
            continue
        seen, candidate = current, None
        await _reload(path, load, switch, on_result)


async def _reload(
    path: Path,
    load: Callable[[Path], engine.LoadedModel],
    switch: Callable[[engine.LoadedModel], None],
    on_result: Callable[[str], None],
) -> None:
    """Load the changed file in a worker thread and switch to it; a file that fails to load is logged."""
    log.info("checkpoint %s changed; loading it in the background", path)
    try:
        model = await asyncio.get_running_loop().run_in_executor(None, load, path)
    except Exception as e:  # CheckpointError, or anything else a hostile file provokes
        log.error(
            "rejected the new checkpoint %s, still serving the previous model: %s",
            path,
            e,
            extra={"fields": {"event": "reload_failed", "error": str(e)}},
        )
        on_result("failed")
        return
    switch(model)
    on_result("ok")
    _log_reloaded(path, model.identity)


def _log_reloaded(path: Path, identity) -> None:
    text, fields = identity_summary(identity)
    log.info(
        "now serving %s (sha256 %s, %s)", path, identity.sha256, text, extra={"fields": {"event": "reloaded", **fields}}
    )
