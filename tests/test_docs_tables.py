"""The reference tables in docs/ say what the code says: each is the one scripts/docs_tables.py generates
from the code (Settings, the metrics registry, the problems the service raises, the training parser).
When one of these fails, run `.venv/bin/python scripts/docs_tables.py` and commit what it rewrites."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_tables", REPO / "scripts" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(_spec)
sys.modules["docs_tables"] = docs_tables
_spec.loader.exec_module(docs_tables)


def generated_part(text: str, name: str) -> str:
    return text[slice(*docs_tables.span(text, name))]


@pytest.mark.parametrize("name", sorted(docs_tables.TABLES))
def test_the_committed_table_is_the_generated_one(name):
    document, build = docs_tables.TABLES[name]
    committed = (REPO / document).read_text()
    current = generated_part(committed, name)
    assert current.strip() == build(current).strip(), (
        f"{document}: the {name} table differs from the code; run .venv/bin/python scripts/docs_tables.py"
    )
    assert docs_tables.UNDOCUMENTED not in current, f"{document}: say when each problem in the {name} table happens"


def test_a_changed_setting_is_noticed(monkeypatch):
    """The check compares against the code as it is at run time, not a copy: change a field, the table differs."""
    from service.settings import Settings

    committed = docs_tables.read_documents()
    monkeypatch.setattr(Settings.model_fields["max_files"], "description", "a description nobody wrote down")
    problems = docs_tables.differences(committed, docs_tables.regenerate(committed))
    assert problems == ["docs/serving.md: the settings table is not what the code says"]


def test_a_new_problem_type_needs_its_when(monkeypatch):
    raises = docs_tables._raises()
    monkeypatch.setattr(docs_tables, "_raises", lambda: [*raises, ("418", "teapot", False)])
    committed = docs_tables.read_documents()
    generated = docs_tables.regenerate(committed)
    assert f"| 418 | `teapot` | {docs_tables.UNDOCUMENTED} |" in generated["docs/api.md"]
    assert "docs/api.md: the errors table has an" in " ".join(docs_tables.differences(committed, generated))


def test_every_training_flag_the_docs_name_exists():
    """Prose outside the generated table names flags too (docs/training.md's notes, the README): none is stale."""
    from training.__main__ import _parser

    parser = _parser()
    known = {s for a in parser._actions for s in a.option_strings}
    for action in parser._actions:
        for sub in getattr(action, "choices", None) or {}:
            known |= {s for a in action.choices[sub]._actions for s in a.option_strings}
    text = (REPO / "docs" / "training.md").read_text()
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", text))
    assert named and named <= known, sorted(named - known)
