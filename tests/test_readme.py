"""README.md's and docs/*.md's examples run as written: the curl lines against a live server, from the
repository root, on the shipped photos; the Python examples; the commands that follow the walk-through
(evaluate, predict, plot, export) on a small run of the same shape; the torch-free ONNX recipe in a virtual
environment without torch. Their commands name the project's Python, and their `python -m training …`
lines parse. Following them leaves nothing in the repository."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from training.__main__ import _parser as training_parser

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXTS = {path.relative_to(REPO).as_posix(): path.read_text() for path in DOCUMENTS}
README = TEXTS["README.md"]
WALKTHROUGH_RUN = "/tmp/imagenette-run"  # what the README's walk-through writes; later examples read it


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def shell_commands(text: str) -> list[str]:
    """Every command of every ```sh block, continuation lines joined, comments dropped."""
    commands = []
    for block in blocks(text, "sh"):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = sorted({c for text in TEXTS.values() for c in shell_commands(text)})
CURLS = [c for c in COMMANDS if c.startswith("curl ")]
PYTHON_BLOCKS = {f"{name}#{i}": block for name, text in TEXTS.items() for i, block in enumerate(blocks(text, "python"))}


def python_block(document: str, containing: str) -> str:
    [block] = [b for name, b in PYTHON_BLOCKS.items() if name.startswith(document + "#") and containing in b]
    return block


def test_the_readme_has_the_examples_this_test_checks():
    readme_curls = [c for c in shell_commands(README) if c.startswith("curl ")]
    assert len(readme_curls) >= 3  # the single photo, several photos with parameters, the raw body
    assert any("--data-binary" in c for c in readme_curls) and any(c.count("-F file=@") >= 2 for c in readme_curls)


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 250, "README.md is for users: reference material goes in docs/"


def test_the_readme_links_to_documents_that_exist_or_are_announced():
    """docs/http.md and docs/protocol.md are written alongside (issue 24); every other link must resolve."""
    announced = {"docs/http.md", "docs/protocol.md"}
    for name, text in TEXTS.items():
        base = (REPO / name).parent
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            path = (base / target).resolve()
            assert path.exists() or path.relative_to(REPO).as_posix() in announced, (name, target)


@pytest.fixture(scope="module")
def server(tmp_path_factory, module_live_service):
    # No checkpoint in its working directory: the untrained net the README's first steps show
    return module_live_service(cwd=tmp_path_factory.mktemp("readme"))


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
    bare = [c for c in COMMANDS if re.match(r"(sudo )?(python3?|torchrun|pytest|pip) ", c)]
    assert bare == [], "write .venv/bin/python (README, Two commands) in these commands"


@pytest.mark.parametrize(
    "command", sorted({c for c in COMMANDS if c.startswith(".venv/bin/python -m training ") and "…" not in c})
)
def test_training_commands_parse(command):
    argv = shlex.split(command)[3:]
    training_parser().parse_args(argv)  # exits 2 (fails the test) on an unknown flag or a missing argument


def run_python(code: str, *, python: str = sys.executable, timeout: float = 300) -> str:
    """Run an example as a reader would: a file of its own, started from the repository root."""
    result = subprocess.run(
        [python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_the_readme_python_api_example_runs_on_the_cpu():
    output = run_python(python_block("README.md", "load_checkpoint"))
    lines = output.strip().splitlines()
    assert len(lines) == 3, output
    scores = [float(line.split()[-1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)


@pytest.mark.slow
def test_the_model_example_runs_on_the_cpu():
    output = run_python(python_block("docs/model.md", "60,965,224"))
    assert output.split() == ["60965224", "torch.Size([1,", "1000])"]


def test_the_readme_device_error_is_the_librarys():
    """The README quotes the one-line error for a missing GPU: it is what the library raises here."""
    import torch

    from model import AlexNet, DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    quoted = re.search(r"`(DeviceError: device 'cuda:0'[^`]*)`", README.replace("\n", " ")).group(1)
    with pytest.raises(DeviceError) as raised:
        AlexNet(width=0.125, devices=("cuda:0", "cuda:1"))
    assert f"DeviceError: {raised.value}" == quoted.replace("2.13.0+cpu", torch.__version__)


@pytest.mark.slow
def test_the_similar_images_example_runs(server):
    code = python_block("docs/api.md", "/embed").replace("http://127.0.0.1:8000", server.url)
    output = run_python(code)
    assert output.startswith("fc7, 4096 numbers per photo, trained: False")
    assert len(output.strip().splitlines()) == 11


@pytest.mark.slow
def test_the_tritonclient_example_runs(server):
    pytest.importorskip("tritonclient.http")
    code = python_block("docs/api.md", "tritonclient").replace("127.0.0.1:8000", server.url.removeprefix("http://"))
    lines = run_python(code).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("True")
    assert all(len(re.findall(r"'[0-9.]+:\d+:[^']+'", line)) == 3 for line in lines[1:])


# The walk-through and what follows it ------------------------------------------------------------------


def after_the_walkthrough(command: str) -> bool:
    """Commands that read the walk-through's run (and are not the training itself, or a server)."""
    return WALKTHROUGH_RUN in command and not command.startswith(("ALEXNET_", "make")) and " train " not in command


FOLLOW_UPS = sorted({c for c in COMMANDS if after_the_walkthrough(c)})


def test_the_follow_up_examples_are_found():
    verbs = {(a[3] if a[2] == "training" else a[2]) for a in map(shlex.split, FOLLOW_UPS)}
    assert {"evaluate", "predict", "plot", "model.export"} <= verbs, FOLLOW_UPS


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """A small run laid out as the walk-through's: TMP/imagenette-256 (prepared) and TMP/imagenette-run (trained
    for one epoch), so that the examples' /tmp/… paths become TMP/…."""
    from support.training import WNIDS, make_source, prepare_quietly, train_cli

    tmp = tmp_path_factory.mktemp("walkthrough")
    prepare_quietly(make_source(tmp / "src", classes=3, train=4, val=2, wnids=WNIDS), tmp / "imagenette-256")
    assert train_cli(tmp / "imagenette-256", tmp / "imagenette-run", "--epochs", "1") == 0
    return tmp


def untracked() -> set[str]:
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                            text=True, check=True)  # fmt: skip
    return {line[3:] for line in result.stdout.splitlines() if line.startswith("??")}


@pytest.mark.slow
@pytest.mark.parametrize("command", FOLLOW_UPS)
def test_the_follow_up_examples_run_and_leave_the_repository_clean(walkthrough, command):
    pytest.importorskip("onnx") if "model.export" in command else None
    before = untracked()
    argv = [a.replace("/tmp/", f"{walkthrough}/") for a in shlex.split(command)]
    argv[0] = sys.executable  # .venv/bin/python: this test's own interpreter
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    assert untracked() == before, "following the docs must not leave files in the repository"
    written = [a for a in argv if a.startswith(str(walkthrough)) and Path(a).suffix in (".jsonl", ".png", ".npy")]
    assert all(Path(a).exists() for a in written), written


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported checkpoint whose answers depend clearly on the image (He-initialised, 1000 classes) and
    that subtracts a mean image, so that the recipe's every step shows in its answers."""
    pytest.importorskip("onnx")
    from support.service import write_checkpoint

    from model import load_checkpoint
    from model.export import export

    run = tmp_path_factory.mktemp("onnx") / "imagenette-run"
    run.mkdir()
    checkpoint = load_checkpoint(write_checkpoint(run / "best.safetensors", seed=3, mean_image=True))
    export(checkpoint, run / "alexnet.onnx")
    return checkpoint, run / "alexnet.onnx"


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory) -> str:
    """A virtual environment with numpy, Pillow and onnxruntime only, at this environment's versions (pip's
    cache and the local wheels make it quick); no site packages from outside, so no torch."""
    venv = tmp_path_factory.mktemp("onnx-recipe") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("onnxruntime", "numpy", "pillow")]
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return str(venv / "bin" / "python")


@pytest.mark.slow
def test_the_onnx_recipe_runs_without_torch(exported, torch_free_python, photos):
    import torch

    checkpoint, onnx_file = exported
    assert subprocess.run([torch_free_python, "-c", "import torch"], capture_output=True, check=False).returncode
    recipe = python_block("docs/export.md", "onnxruntime").replace(WALKTHROUGH_RUN, str(onnx_file.parent))
    assert "torch" not in re.sub(r"#.*", "", recipe), "the recipe must not need torch"
    lines = run_python(recipe, python=torch_free_python).strip().splitlines()
    # The project's own answer for each photo: its preprocessing, its net.
    net, pre = checkpoint.build("cpu").eval(), checkpoint.preprocessor()
    with torch.inference_mode():
        expected = torch.cat([net(pre.from_bytes(p.read_bytes())).softmax(1) for p in photos])
    assert len(lines) == len(photos)
    for photo, line, probabilities in zip(photos, lines, expected):
        top = probabilities.topk(3)
        names = [checkpoint.classes[i].name for i in top.indices]  # ImageNet names hold commas: found one by one
        found = [re.search(re.escape(name) + r" ([0-9.]+)", line) for name in names]
        assert all(found) and [m.start() for m in found] == sorted(m.start() for m in found), (line, names)
        assert [float(m.group(1)) for m in found] == pytest.approx(top.values.tolist(), abs=2e-3), line
