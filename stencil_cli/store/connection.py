"""The store's connection: opening (read-write or read-only, WAL, migrations), write transactions, the
SQLite errors explained as StencilErrors, and the root's paths. The query groups build on `Connection`.

Every public method that reads or writes the database or its files is decorated with `@translate_errors`,
so a raw `sqlite3.Error` (or a full disk) leaves the store only as the StencilError that explains it:
`CorruptStoreError`, `StoreReadOnlyError`, `DiskFullError` or "locked by another process".
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

from stencil_cli.base.errors import CorruptStoreError, DiskFullError, StencilError, StoreReadOnlyError
from stencil_cli.base.fsutil import is_disk_full, is_within
from stencil_cli.base.paths import default_root
from stencil_cli.store import layout, migrations
from stencil_cli.store.records import validate_name
from stencil_cli.store.sqlite import Database

BUSY_TIMEOUT_MS = 30_000

C = TypeVar("C", bound="Connection")
P = ParamSpec("P")
R = TypeVar("R")


def translate_errors(method: Callable[Concatenate[C, P], R]) -> Callable[Concatenate[C, P], R]:
    """Make a store method raise the StencilError that explains a raw sqlite3.Error or a full disk."""

    @functools.wraps(method)
    def translated(self: C, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raise self.db_error(error) from error
        except OSError as error:
            if is_disk_full(error):
                raise DiskFullError(getattr(error, "filename", None) or self.root) from error
            raise

    return translated


class Connection:
    """A handle on the store: its root folder and its database.

    `read_only=None` (the default) opens the store for writing when its folder and database are writable and
    read-only otherwise; `read_only=True` never writes (no migration, no journal-mode change): reads work and
    every change raises `StoreReadOnlyError`.
    """

    def __init__(self, root: Path | None = None, *, read_only: bool | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.db_path = self.root / layout.DB_NAME
        if read_only is None:
            read_only = self.db_path.exists() and not _writable(self.root, self.db_path)
        self.read_only = bool(read_only)
        if self.read_only:
            self._open_read_only()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StencilError(
                f"cannot create the store folder {self.root}: {error.strerror}",
                hint="set STENCIL_HOME to a writable folder",
            ) from error
        try:
            self.db = Database(self.db_path)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("select count(*) from sqlite_master").fetchone()  # a damaged file fails here
            self._enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = NORMAL")
            if migrations.pending(self.db):  # no write lock at all when the schema is current
                with self.write():
                    if migrations.pending(self.db):
                        migrations.apply(self.db)
        except sqlite3.Error as error:
            raise self.db_error(error) from error

    def _open_read_only(self) -> None:
        if not self.db_path.is_file():
            raise StoreReadOnlyError(
                f"the store {self.root} is read-only and has no database yet",
                hint="set STENCIL_HOME to a writable folder",
            )
        uri = "file:" + quote(str(self.db_path.resolve()))
        try:
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True)
                conn.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.OperationalError as error:
                if "locked" in str(error):
                    raise
                # a WAL database in a folder nobody may write: no -shm can be made beside it
                conn = self._open_committed_copy() or sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
                conn.execute("select count(*) from sqlite_master").fetchone()
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db = Database(conn)
            if migrations.pending(self.db):
                raise StoreReadOnlyError(
                    f"the store {self.root} is read-only and its database needs an upgrade this version "
                    "cannot make without writing",
                    hint="make the store writable once, or use the stencil version that wrote it",
                )
        except sqlite3.Error as error:
            raise self.db_error(error) from error

    def _open_committed_copy(self) -> sqlite3.Connection | None:
        """A read-only connection to a private copy of the database and its WAL (None without a WAL).

        `immutable=1` would read the main file alone and miss what the WAL holds (committed, not yet
        checkpointed); a copy in a temp folder can make its own -shm and shows every committed change,
        and the store itself is never written."""
        wal = Path(f"{self.db_path}-wal")
        if not wal.is_file() or wal.stat().st_size == 0:
            return None
        folder = Path(tempfile.mkdtemp(prefix="stencil-read-only-"))
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        copy = folder / layout.DB_NAME
        shutil.copyfile(self.db_path, copy)
        shutil.copyfile(wal, f"{copy}-wal")
        conn = sqlite3.connect(f"file:{quote(str(copy))}?mode=ro", uri=True)
        return conn

    def _enable_wal(self) -> None:
        # Switching a new database to WAL needs an exclusive lock, and SQLite may answer "database is locked"
        # at once (without the busy handler) when another process is switching it at the same moment.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- errors -------------------------------------------------------------------------------

    def db_error(self, error: sqlite3.Error) -> StencilError:
        """The StencilError that explains SQLite's `error` (damaged file, read-only, disk full, locked)."""
        text = str(error).lower()
        code = getattr(error, "sqlite_errorname", "") or ""
        damaged = "not a database" in text or "malformed" in text
        if damaged or code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return CorruptStoreError(
                f"the store database {self.db_path} is damaged ({error})",
                hint=f"move it aside (mv {self.db_path} {self.db_path}.broken), then run "
                "`stencil store repair` to index the photos again from the subject folders "
                "(docs/store.md)",
            )
        if code.startswith("SQLITE_READONLY") or "readonly" in text or "read-only" in text:
            return self._read_only_error()
        if code == "SQLITE_FULL" or "disk is full" in text:
            return DiskFullError(self.db_path)
        if code.startswith("SQLITE_IOERR") and _out_of_space(self.root):
            return DiskFullError(self.db_path)
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StencilError(
                f"the store database {self.db_path} is locked by another process",
                hint="try again when the other stencil command has finished",
            )
        if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            return StencilError(
                f"cannot open the store database {self.db_path}",
                hint="check that the folder exists and is readable, or set STENCIL_HOME",
            )
        return StencilError(f"the store database {self.db_path} failed: {error}")

    def _read_only_error(self, doing: str = "change it") -> StoreReadOnlyError:
        return StoreReadOnlyError(
            f"the store {self.root} is read-only: cannot {doing}",
            hint="commands that only read (ls, show, doctor) work; make the folder writable to change it",
        )

    def _require_writable(self) -> None:
        if self.read_only:
            raise self._read_only_error()

    def require_writable(self, doing: str = "change it") -> None:
        """Refuse up front, before any work, a command that would write to a read-only store."""
        if self.read_only:
            raise self._read_only_error(doing)

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Database]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks)."""
        self._require_writable()
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield self.db
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise self.db_error(error) from error
        try:
            yield self.db
        except BaseException as error:
            if conn.in_transaction:
                with suppress(sqlite3.Error):  # SQLite may have rolled back itself (e.g. on a full disk)
                    conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise self.db_error(error) from error
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise self.db_error(error) from error

    @translate_errors
    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    @translate_errors
    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds wrong with the database ([] when it is sound)."""
        try:
            rows = [row[0] for row in self.db.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as error:
            return [str(error)]
        return [] if rows == ["ok"] else rows

    # -- paths --------------------------------------------------------------------------------

    def subject_dir(self, name: str) -> Path:
        """The folder holding a subject's files; a symbolic link there (or at `subjects/`) is refused."""
        folder = layout.subject_folder(self.root, validate_name(name))
        for path in (folder.parent, folder):
            if path.is_symlink():
                raise StencilError(
                    f"{path} is a symbolic link: stencil keeps a subject's files only in real folders "
                    "inside the store, and will not follow it",
                    hint=f"replace the link by the folder it points to (e.g. rm the link, then mv the folder "
                    f"to {path})",
                )
        return folder

    def absolute(self, relative: str) -> Path:
        """Turn a path stored in the database (relative to the root) into an absolute one."""
        return self.root / relative

    def relative(self, path: Path) -> str:
        """Store-relative form of `path`, as kept in the database."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def _delete_tree(self, folder: Path) -> None:
        if not folder.exists():
            return
        if not is_within(folder, self.root) or folder.resolve() == self.root.resolve():
            raise StencilError(f"refusing to delete {folder}: it is not inside the store {self.root}")
        shutil.rmtree(folder)


def _writable(root: Path, db_path: Path) -> bool:
    """Whether this process may write the database file and make its journal files beside it."""
    return os.access(db_path, os.W_OK) and os.access(root, os.W_OK | os.X_OK)


def _out_of_space(root: Path) -> bool:
    """Whether a failed write at `root` is best explained by a full disk or a file-size limit."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return True
    except (ImportError, OSError, ValueError):
        pass
    try:
        return shutil.disk_usage(root).free < 1024 * 1024
    except OSError:
        return False
