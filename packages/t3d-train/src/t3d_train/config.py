"""YAML configs with ``--set section.field=value`` overrides, validated by pydantic.

Shared by the launch scripts in ``tools/``: a config file is one pydantic model composed of
the packages' own configs; unknown keys are errors; errors are one line per problem.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is meant for the user."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides in place; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: an override without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set optim.lr=1e-4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw), f"--set {item!r}")
    return tree


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per error: ``source: field 'a.b': message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the preset files for valid keys)"
        lines.append(f"{source}: field '{loc}': {msg}")
    return "\n".join(lines)


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> M:
    """Read YAML (or start from ``defaults``), apply overrides and validate into ``model``.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key or invalid value.
    """
    tree: dict[str, Any] = dict(defaults or {})
    source = "command line"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found; presets live in tools/configs/")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        tree = loaded
    apply_overrides(tree, overrides or [])
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; user errors (config, data) print one clear line and exit with status 2."""
    try:
        code = main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
