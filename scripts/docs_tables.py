"""The reference tables of docs/, generated from the code that they describe.

    .venv/bin/python scripts/docs_tables.py           # rewrite the tables in docs/*.md
    .venv/bin/python scripts/docs_tables.py --check   # exit 1, naming each table that differs (the test does this)

Each table sits between two markers in its document, ``<!-- generated: NAME … -->`` and
``<!-- end generated: NAME -->``; everything else in the documents is left as it is. The tables:

    settings   docs/serving.md   service.settings.Settings: each field's variable, flag, default, description
    metrics    docs/serving.md   service.metrics.ServiceMetrics: each series' name, labels, kind and help
    errors     docs/api.md       every (status, problem type) the service code raises, found in its source;
                                 the "when" column is prose kept from the document, by problem type
    training   docs/training.md  python -m training's flags, per command, as its --help prints them

A new problem type gets "UNDOCUMENTED" in its "when" cell: write what causes it there, and --check passes.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

UNDOCUMENTED = "UNDOCUMENTED: say when it happens"


def cell(text: object) -> str:
    """Text for one Markdown table cell: pipes escaped, angle brackets kept visible, one line."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "\\<")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# Settings --------------------------------------------------------------------------------------------------


def _size(value: int) -> str:
    """Byte counts of a whole number of MiB also in MiB: 33554432 (32 MiB)."""
    if value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value}`"


def settings_table(_: str) -> str:
    from service.settings import ENV_PREFIX, GPU_DEFAULTS, Settings

    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = _size(default) if name.endswith("_bytes") else f"`{default}`"
        if name in GPU_DEFAULTS:
            gpu = GPU_DEFAULTS[name]
            shown += f" (on a GPU: `{int(gpu) if float(gpu).is_integer() else gpu}`)"
        flag = "--" + name.replace("_", "-")
        rows.append((f"`{ENV_PREFIX}{name.upper()}`", f"`{flag}`", shown, cell(field.description)))
    return table(("variable", "flag", "default", "meaning"), rows)


# Metrics ---------------------------------------------------------------------------------------------------


def metrics_table(_: str) -> str:
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(queue_depth=dict, model_info=dict, memory=dict)
    rows = []
    for metric in metrics.registry._metrics:  # the registry is the list of what /metrics exports, in order
        labels = "{" + ",".join(metric.labelnames) + "}" if metric.labelnames else ""
        rows.append((f"`{metric.name}{labels}`", metric.kind, cell(metric.help)))
    return table(("series", "kind", "what it counts"), rows)


# Errors ----------------------------------------------------------------------------------------------------

RAISERS = {"ProblemError", "problem_response"}  # service.problems: (status, slug, detail, headers)


@dataclass(frozen=True)
class Problem:
    status: str  # "503"; "404, 405" for about:blank
    slug: str  # "about:blank" for plain HTTP errors
    retry_after: str  # "always", "sometimes" (some raises send Retry-After, some not) or "never"


def _raises() -> list[tuple[str, str, bool]]:
    """(status, slug, sends Retry-After) of every ProblemError(...) / problem_response(...) in service/ whose
    problem type is a literal, and of service.problems.IMAGE_PROBLEMS (raised through image_problem)."""
    found = []
    for path in sorted((REPO / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if func not in RAISERS or not isinstance(node.args[1], ast.Constant):
                continue
            status, slug = node.args[0], node.args[1].value
            headers = node.args[3] if len(node.args) > 3 else next((k.value for k in node.keywords), None)
            retry = isinstance(headers, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "Retry-After" for k in headers.keys
            )
            if slug is None:
                # No problem type: a plain HTTP error (about:blank), or under /v2 an {"error": …} body whose
                # status the Open Inference Protocol section explains. The table lists the plain ones.
                continue
            if not isinstance(status, ast.Constant):
                raise SystemExit(f"{path}:{node.lineno}: problem {slug!r} with a status that is not a literal")
            found.append((str(status.value), slug, retry))
    from service.problems import IMAGE_PROBLEMS, OTHER_IMAGE_PROBLEM

    found += [(str(status), slug, False) for status, slug in [*IMAGE_PROBLEMS.values(), OTHER_IMAGE_PROBLEM]]
    return found


def raised_problems() -> list[Problem]:
    """One row per (status, problem type), and about:blank for unknown paths and wrong methods."""
    retries: dict[tuple[str, str], set[bool]] = {}
    for status, slug, retry in _raises():
        retries.setdefault((status, slug), set()).add(retry)
    problems = [Problem("404, 405", "about:blank", "never")]
    for (status, slug), seen in sorted(retries.items()):
        problems.append(Problem(status, slug, "sometimes" if len(seen) > 1 else "always" if True in seen else "never"))
    return problems


ERROR_ROW = re.compile(r"^\| *([^|]+?) *\| *`([^`]+)`[^|]*\| *(.*?) *\|$")


def errors_table(current: str) -> str:
    when = {m.group(2): m.group(3) for line in current.splitlines() if (m := ERROR_ROW.match(line))}
    rows = []
    for p in sorted(raised_problems(), key=lambda p: (p.status, p.slug)):
        kind = f"`{p.slug}`" + {"always": " (with `Retry-After`)", "sometimes": " (some with `Retry-After`)"}.get(
            p.retry_after, ""
        )
        rows.append((p.status, kind, when.get(p.slug) or UNDOCUMENTED))
    return table(("status", "`type` (`urn:alexnet:problem:…`)", "when"), rows)


# Training flags --------------------------------------------------------------------------------------------


def training_table(_: str) -> str:
    from training.__main__ import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, command in commands.choices.items():
        formatter = command._get_formatter()
        rows = []
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            invocation = formatter._format_action_invocation(action)  # what --help prints: "--lr LR"
            help = formatter._expand_help(action) if action.help else ""  # with %(default)s filled in
            rows.append((f"`{invocation}`", cell(help)))
        parts.append(f"**{name}**\n\n" + table(("argument", "meaning"), rows))
    return "\n".join(parts)


# The documents ---------------------------------------------------------------------------------------------

TABLES = {
    "settings": ("docs/serving.md", settings_table),
    "metrics": ("docs/serving.md", metrics_table),
    "errors": ("docs/api.md", errors_table),
    "training": ("docs/training.md", training_table),
}


def span(text: str, name: str) -> tuple[int, int]:
    """Where the generated part of ``name`` lies in ``text``: after its opening marker's line, up to its end marker."""
    start = re.search(rf"^<!-- generated: {name}\b.*-->\n", text, re.MULTILINE)
    end = re.search(rf"^<!-- end generated: {name} -->$", text, re.MULTILINE)
    if not start or not end or end.start() < start.end():
        raise SystemExit(f"error: no '<!-- generated: {name} … -->' … '<!-- end generated: {name} -->' markers")
    return start.end(), end.start()


def regenerate(documents: dict[str, str]) -> dict[str, str]:
    """The documents with every table replaced by what the code says now."""
    documents = dict(documents)
    for name, (document, build) in TABLES.items():
        text = documents[document]
        start, end = span(text, name)
        documents[document] = text[:start] + "\n" + build(text[start:end]) + "\n" + text[end:]
    return documents


def differences(committed: dict[str, str], generated: dict[str, str]) -> list[str]:
    problems = []
    for name, (document, _) in TABLES.items():
        a, b = span(committed[document], name), span(generated[document], name)
        if committed[document][slice(*a)] != generated[document][slice(*b)]:
            problems.append(f"{document}: the {name} table is not what the code says")
        if UNDOCUMENTED in generated[document][slice(*b)]:
            problems.append(f"{document}: the {name} table has an {UNDOCUMENTED!r} row")
    return problems


def read_documents() -> dict[str, str]:
    return {d: (REPO / d).read_text() for d in sorted({d for d, _ in TABLES.values()})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    args = parser.parse_args()
    committed = read_documents()
    generated = regenerate(committed)
    problems = differences(committed, generated)
    if args.check:
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("rerun: .venv/bin/python scripts/docs_tables.py", file=sys.stderr)
        return 1 if problems else 0
    for document, text in generated.items():
        if text != committed[document]:
            (REPO / document).write_text(text)
            print(f"rewrote {document}")
    for problem in problems:
        if UNDOCUMENTED in problem:
            print(problem, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
