"""sqlite-utils, imported without numpy: every store module takes `sqlite_utils` from here.

sqlite-utils imports numpy (~0.2 s) only to store numpy values, which stencil never does, and every command
(`stencil ls` in a shell loop) would pay for it at start-up.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def _import_sqlite_utils() -> Any:
    """Import sqlite-utils with `import numpy` failing inside it (unless numpy or sqlite-utils is loaded)."""
    if "numpy" in sys.modules or "sqlite_utils" in sys.modules:
        return importlib.import_module("sqlite_utils")
    sys.modules["numpy"] = None  # type: ignore[assignment] # makes `import numpy` fail inside sqlite-utils
    try:
        return importlib.import_module("sqlite_utils")
    finally:
        del sys.modules["numpy"]


sqlite_utils = _import_sqlite_utils()
from sqlite_utils import Database, Migrations  # noqa: E402 - after the import above

__all__ = ["Database", "Migrations", "sqlite_utils"]
