"""safe_filename / safe_join: file names derived from study ids never leave their folder."""

from __future__ import annotations

import os

import pytest
from t3d_data.names import MAX_NAME_LENGTH, safe_filename, safe_join

HOSTILE = [
    "..",
    ".",
    "",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "a/../../../../outside/ESCAPED_overlay",
    "a/../../x",
    "a\\..\\..\\x",
    "nul\0byte",
    "tab\tand\nnewline",
    ".hidden",
    "x" * 300,
    "x" * 299 + "y",
    "a/b",
    "a\\b",
    "a_b",
    "ünïcødé id",
    "~/home",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_ids_become_one_safe_component(text, tmp_path):
    name = safe_filename(text)
    assert name and len(name) <= MAX_NAME_LENGTH
    assert "/" not in name and "\\" not in name and "\0" not in name
    assert ".." not in name and not name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    path = safe_join(tmp_path, name + ".png")
    assert path.resolve().parent == tmp_path.resolve()
    path.write_bytes(b"x")  # a real file system accepts it
    assert os.listdir(tmp_path) == [name + ".png"]


def test_distinct_ids_stay_distinct_and_safe_ids_are_unchanged():
    names = [safe_filename(t) for t in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    for safe in ("case_001", "PHANTOM-0007", "study.v2", "a" * MAX_NAME_LENGTH):
        assert safe_filename(safe) == safe
    assert safe_filename("a/b") != safe_filename("a_b") == "a_b"
    assert safe_filename("a/b") == safe_filename("a/b")  # deterministic across calls
    assert safe_filename("a/../../x").startswith("a_._._x-")


@pytest.mark.parametrize("name", ["..", "../x.png", "a/b.png", "a\\b.png", "x\0.png", ".env", "",
                                  "a..b"])
def test_safe_join_rejects_unsafe_components(tmp_path, name):
    with pytest.raises(ValueError, match="not one safe path component"):
        safe_join(tmp_path, name)


def test_safe_filename_rejects_non_strings():
    with pytest.raises(TypeError, match="needs a str"):
        safe_filename(None)  # type: ignore[arg-type]
