"""The command lines users run: whole flag names only (``--epoch 1`` is an error, not ``--epochs 1``), and
``--help`` in plain text."""

from __future__ import annotations

import ast
import contextlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_FOLDERS = ("training", "model", "service", "bench", "scripts")


def _training_parser():
    from training.__main__ import _parser

    return _parser()


def _export_parser():
    from model.export.cli import _parser

    return _parser()


def _import_weights_parse(argv):
    from model.importers.cli import _parse_args

    return _parse_args(argv)


def _service_parse(argv):
    from service.__main__ import parse_args

    return parse_args(argv)


def _exit_status(parse, argv) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        parse(argv)
    return exited.value.code, err.getvalue() + out.getvalue()


@pytest.mark.parametrize(
    ("parse", "argv", "abbreviation"),
    [
        (lambda a: _training_parser().parse_args(a), ["train", "data", "--out", "run", "--epoch", "1"], "--epoch"),
        (lambda a: _training_parser().parse_args(a), ["predict", "ck", "d", "--out", "o.jsonl"], "--out"),
        (lambda a: _training_parser().parse_args(a), ["prepare", "src", "dest", "--work", "2"], "--work"),
        (lambda a: _export_parser().parse_args(a), ["ck.safetensors", "--soft"], "--soft"),
        (_import_weights_parse, ["alexnet.onnx", "--ou", "x.safetensors"], "--ou"),
        (_service_parse, ["--por", "8001"], "--por"),
    ],
)
def test_an_abbreviated_flag_is_an_error(parse, argv, abbreviation):
    status, message = _exit_status(parse, argv)
    assert status == 2
    assert abbreviation in message


def test_every_argument_parser_refuses_abbreviations():
    """Every ``argparse.ArgumentParser(...)`` in the packages and scripts users run says allow_abbrev=False
    (the bench scripts build theirs inside main(), so this reads the source rather than running them)."""
    calls = []
    for folder in CLI_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                    keywords = {k.arg: k.value for k in node.keywords}
                    refused = isinstance(keywords.get("allow_abbrev"), ast.Constant) and (
                        keywords["allow_abbrev"].value is False
                    )
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", refused))
    assert len(calls) >= 14, calls  # the scan found the parsers
    assert [where for where, refused in calls if not refused] == []


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["evaluate"], ["predict"], ["plot"]])
def test_training_help_is_plain_text(command):
    status, text = _exit_status(lambda a: _training_parser().parse_args(a), [*command, "--help"])
    assert status == 0 and "usage: python -m training" in text
    for markup in ("``", "`", ":func:", ":class:", ".. "):
        assert markup not in text, (markup, text)
