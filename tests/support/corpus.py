"""The hostile-input corpus (tests/corpus/make_corpus.py) as the tests use it: written into a folder, and
each entry as an httpx request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CORPUS_SCRIPT = Path(__file__).resolve().parents[1] / "corpus" / "make_corpus.py"


def write_corpus(directory: Path) -> list[dict]:
    """tests/corpus/make_corpus.py's hostile and unusual inputs written into ``directory``; its manifest."""
    made = subprocess.run(
        [sys.executable, str(CORPUS_SCRIPT), str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert made.returncode == 0, made.stderr
    return json.loads((directory / "manifest.json").read_text())


def corpus_request(entry: dict, data: bytes) -> dict:
    """httpx.request keyword arguments that send a corpus entry as the manifest says."""
    if entry["send"] == "multipart":
        return {"files": {"file": (entry["name"], data, entry["content_type"])}}
    return {"content": data, "headers": {"Content-Type": entry["content_type"]}}  # raw body, or a whole form
