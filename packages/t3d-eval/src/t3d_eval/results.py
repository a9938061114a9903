"""Saving evaluation results (strict JSON + a Markdown table) and mean ± std over seeds.

NaN (e.g. an AUC skipped for a single-class finding) is stored as JSON ``null`` and read back
as NaN; a :class:`MeanStd` is stored as ``{"mean": m, "std": s}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["MeanStd", "aggregate_seeds", "flatten_results", "read_results", "write_results"]


class MeanStd(NamedTuple):
    """Mean and sample standard deviation (``ddof=1``; 0 for one seed) of a metric."""

    mean: float
    std: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}"


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _to_json(x: Any) -> Any:
    if isinstance(x, MeanStd):
        return {"mean": _to_json(x.mean), "std": _to_json(x.std)}
    if isinstance(x, Mapping):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_json(v) for v in x]
    if hasattr(x, "tolist"):  # tensors and numpy values
        return _to_json(x.tolist())
    if _is_number(x):
        return (
            None
            if not math.isfinite(float(x))
            else (int(x) if isinstance(x, int | np.integer) else float(x))
        )
    return x


def _from_json(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"mean", "std"}:
            return MeanStd(*(math.nan if x[k] is None else float(x[k]) for k in ("mean", "std")))
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return math.nan if x is None else x


def flatten_results(results: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flatten nested dicts to ``{"a/b/c": leaf}`` (a :class:`MeanStd` is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in results.items():
        if isinstance(v, Mapping):
            out.update({f"{k}{sep}{kk}": vv for kk, vv in flatten_results(v, sep).items()})
        else:
            out[str(k)] = v
    return out


def _fmt(x: Any, digits: int) -> str:
    if isinstance(x, MeanStd):
        return f"{_fmt(x.mean, digits)} ± {_fmt(x.std, digits)}"
    if isinstance(x, bool) or isinstance(x, int | np.integer):
        return str(x)
    if _is_number(x):
        return "n/a" if math.isnan(float(x)) else f"{float(x):.{digits}f}"
    if isinstance(x, list | tuple):
        return ", ".join(_fmt(v, digits) for v in x) or "–"
    return str(x).replace("|", "\\|")


def _markdown(results: Mapping[str, Any], name: str, digits: int) -> str:
    lines = [f"# {name}", ""]
    columns = list(results)
    if columns and all(isinstance(results[c], Mapping) for c in columns):
        # {run: {metric: value}} -> one column per run, one row per metric.
        flat = {c: flatten_results(results[c]) for c in columns}
        rows = list(dict.fromkeys(k for c in columns for k in flat[c]))
        lines.append("| metric | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for r in rows:
            cells = [_fmt(flat[c][r], digits) if r in flat[c] else "" for c in columns]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, digits)} |" for k, v in flatten_results(results).items()]
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Any], out_dir: str | os.PathLike[str], name: str, digits: int = 4
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (strict JSON) and ``<out_dir>/<name>.md`` (a table).

    A results dict whose top-level values are all dicts (e.g. ``{"t3d": {...}, "scratch":
    {...}}``) becomes one column per key; anything else a two-column ``metric | value`` table.

    Args:
        results: nested dict of numbers, strings, lists, tensors or :class:`MeanStd`.
        out_dir: folder, created if needed.
        name: file stem (no extension).
        digits: decimals in the Markdown table.

    Returns:
        ``(json_path, markdown_path)``.

    Both files are rendered first, then each is written to a temporary name in ``out_dir`` and
    renamed over the target (atomic: a reader sees the old file or the new one, never half).

    Raises:
        ValueError: if ``name`` is not a plain file stem (``t3d_data.names.safe_filename``
            would change it: a path separator, ``..``, a leading dot, NUL, ...).
    """
    from t3d_data.names import safe_filename

    if not name or safe_filename(name) != name:
        raise ValueError(
            f"name must be a plain file stem; got {name!r} (e.g. {safe_filename(name or '_')!r})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    texts = {
        json_path: json.dumps(_to_json(results), indent=2, allow_nan=False, ensure_ascii=False)
        + "\n",
        md_path: _markdown(results, name, digits),
    }
    for path, text in texts.items():
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return json_path, md_path


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON written by :func:`write_results` (``null`` → NaN, mean/std → MeanStd)."""
    return _from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def aggregate_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every numeric metric, keeping the nesting.

    NaN values (e.g. a skipped finding in one seed) are ignored; a metric NaN in every seed
    stays NaN. Non-numeric leaves are kept when equal across runs, else listed per run.
    Keys missing from some runs are aggregated over the runs that have them.

    Args:
        runs: one results dict per seed.

    Returns:
        The same structure with numeric leaves replaced by :class:`MeanStd`.

    Raises:
        ValueError: if ``runs`` is empty.
    """
    if not runs:
        raise ValueError("runs is empty; pass one results dict per seed")
    keys = list(dict.fromkeys(k for r in runs for k in r))
    out: dict[str, Any] = {}
    for k in keys:
        values = [r[k] for r in runs if k in r]
        if all(isinstance(v, Mapping) for v in values):
            out[k] = aggregate_seeds(values)
        elif all(_is_number(v) for v in values):
            arr = np.asarray(values, dtype=float)
            arr = arr[~np.isnan(arr)]
            if arr.size == 0:
                out[k] = MeanStd(math.nan, math.nan)
            else:
                std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
                out[k] = MeanStd(float(arr.mean()), std)
        else:
            out[k] = values[0] if all(v == values[0] for v in values) else values
    return out
