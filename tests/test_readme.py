"""README.md's commands run as written: its curl lines against a live server, from the repository root,
on the shipped photos; its commands name the project's Python; its `python -m training …` lines parse."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from training.__main__ import _parser as training_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def shell_commands(text: str) -> list[str]:
    """Every command of every ```sh block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = shell_commands(README)
CURLS = sorted({c for c in COMMANDS if c.startswith("curl ")})


def test_the_readme_has_the_examples_this_test_checks():
    assert len(CURLS) >= 3  # the single photo, several photos with parameters, the raw body
    assert any("--data-binary" in c for c in CURLS) and any(c.count("-F file=@") >= 2 for c in CURLS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, module_live_service):
    return module_live_service(checkpoint=tmp_path_factory.mktemp("readme") / "none.safetensors")


@pytest.mark.parametrize("command", CURLS)
def test_every_curl_example_runs_as_written(server, command):
    argv = [a.replace("http://127.0.0.1:8000", server.url) for a in shlex.split(command)]
    result = subprocess.run([*argv, "--silent", "--show-error", "--fail-with-body"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, (command, result.stderr, result.stdout[:2000])
    answer = json.loads(result.stdout)
    files = len(re.findall(r"-F file=@|--data-binary @", command))
    assert len(answer["results"]) == files
    top_k = int(re.search(r"top_k=(\d+)", command).group(1)) if "top_k=" in command else 5
    assert all(len(r["predictions"]) == top_k for r in answer["results"])


def test_commands_name_the_projects_python():
    """`python -m …` alone would run whatever Python is first on PATH (without the project installed)."""
    bare = [c for c in COMMANDS if re.match(r"(sudo )?(python3?|torchrun|pytest) ", c)]
    assert bare == [], "write .venv/bin/python (README, Set-up) in these commands"


@pytest.mark.parametrize(
    "command", sorted({c for c in COMMANDS if c.startswith(".venv/bin/python -m training ") and "…" not in c})
)
def test_training_commands_parse(command):
    argv = shlex.split(command)[3:]
    training_parser().parse_args(argv)  # exits 2 (fails the test) on an unknown flag or a missing argument
