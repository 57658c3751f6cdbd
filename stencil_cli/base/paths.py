"""Where stencil keeps its files by default: a leaf module that the store and the models layer both import.

It imports nothing from stencil, so the models layer can find the default store root without importing the
store (SQLite) and the store can find it without importing the models (torch).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    """The store root: ``STENCIL_HOME`` if set, else the platform's user data folder."""
    env = os.environ.get("STENCIL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("stencil", appauthor=False))
