"""t3d_objectives: see the package README."""

from __future__ import annotations

__version__ = "0.1.0"
__all__: list[str] = []
