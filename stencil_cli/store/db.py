"""The Store: one handle on the store's folder and database, made of the query groups (see the package).

This module never imports torch.
"""

from __future__ import annotations

from pathlib import Path

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


def open_store(root: Path | None = None, *, read_only: bool | None = None) -> Store:
    """Open (and migrate) the store at `root` or the default location (see `Store` for `read_only`)."""
    return Store(root, read_only=read_only)
