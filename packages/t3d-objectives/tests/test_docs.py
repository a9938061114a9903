"""Doctests of every module, and the README quick-start (also in docs/objectives.md) runs."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
MODULES = ["distributed", "contrastive", "alignment", "restoration", "corruptions", "objective",
           "terms",
           "monitor"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(f"t3d_objectives.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no >>> example"
    assert result.failed == 0


def _snippet(path: Path, index: int = 0) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) > index, f"no python block #{index} in {path}"
    return blocks[index]


def test_readme_snippet_runs_and_matches_docs(capsys):
    code = _snippet(PACKAGE / "README.md")
    assert "t3d_models" not in code and "t3d_data" not in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_snippet"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and "'loss'" in printed[-1]
    docs = PACKAGE.parents[1] / "docs" / "objectives.md"
    if docs.exists():  # inside the monorepo
        assert _snippet(docs) == code


def test_adding_a_term_snippet_runs_and_matches_docs(capsys):
    from t3d_objectives import TERMS, unregister_term

    code = _snippet(PACKAGE / "README.md", 1)
    assert "register_term(Term(" in code and "objective.py" not in code
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "adding_a_term_snippet"})
        assert list(TERMS)[-1] == "norm"
    finally:
        if "norm" in TERMS:
            unregister_term("norm")
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == ["['tcl_loss', 'align_loss', 'norm_loss']",
                       "['align_loss', 'loss', 'norm_loss', 'tcl_loss']"]
    docs = PACKAGE.parents[1] / "docs" / "objectives.md"
    if docs.exists():  # inside the monorepo
        assert _snippet(docs, 1) == code
