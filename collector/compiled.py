"""Which compiled extensions this install has, and the switch that turns them off.

The compiled core is optional (setup.py builds it with `optional=True`); every caller asks
here instead of importing it directly, so that COLLECTOR_PURE_PYTHON=1 (or a machine without
a C compiler) runs the pure-Python reference implementation of the same behaviour.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def pure_python() -> bool:
    """True when COLLECTOR_PURE_PYTHON is set to anything but '' or '0'."""
    return os.environ.get("COLLECTOR_PURE_PYTHON", "") not in ("", "0")


def extension(name: str) -> ModuleType | None:
    """`collector.<name>` (e.g. "_fastflow") when it is built and not switched off, else None."""
    if pure_python():
        return None
    try:
        return importlib.import_module(f"collector.{name}")
    except ImportError:
        return None


__all__ = ["extension", "pure_python"]
