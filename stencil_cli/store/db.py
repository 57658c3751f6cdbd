"""The Store: one handle on the store's folder and database, made of the query groups (see the package).

This module never imports torch.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from stencil_cli.store.config import ConfigQueries
from stencil_cli.store.drafts import DraftPromptCache
from stencil_cli.store.generations import GenerationQueries
from stencil_cli.store.runs import RunQueries
from stencil_cli.store.upkeep import Upkeep


class Store(RunQueries, GenerationQueries, DraftPromptCache, Upkeep, ConfigQueries):
    """A handle on the store: its root folder and its database.

    `read_only=None` (the default) opens the store for writing when its folder and database are writable and
    read-only otherwise; `read_only=True` never writes (no migration, no journal-mode change): reads work and
    every change raises `StoreReadOnlyError`. Every SQLite error a method meets becomes one StencilError:
    `CorruptStoreError`, `StoreReadOnlyError`, `DiskFullError` or "locked by another process".
    """


# the database handle of every store this process opened, while anything still holds it
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()


def open_store(root: Path | None = None, *, read_only: bool | None = None) -> Store:
    """Open (and migrate) the store at `root` or the default location (see `Store` for `read_only`)."""
    store = Store(root, read_only=read_only)
    _OPEN.add(store.db)
    return store


def close_open_stores() -> None:
    """Close the database connection of every store `open_store` opened in this process (before it ends)."""
    for db in list(_OPEN):
        db.conn.close()  # finalises pending statements; the last connection checkpoints and removes the WAL
        _OPEN.discard(db)
