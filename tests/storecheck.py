"""A store consistency checker for tests: what a crash, a race or a bug may have left inconsistent.

`check_store(root)` opens the database read-only (it never changes the store) and returns a list of problems,
empty when the store is consistent:

- SQLite's `PRAGMA integrity_check` is not "ok";
- rows whose file is missing (images, run weights of `done` runs, generated images and drafts);
- rows pointing outside the store, or at another subject's folder;
- files in a subject's images/ folder that no image row refers to, run folders without a run row;
- runs left `running` (pass `allow_running=True` while a command is known to be running);
- subject folders without a subject row.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote


def check_store(root: Path, *, allow_running: bool = False, allow_orphan_files: bool = False) -> list[str]:
    """Every inconsistency found in the store at `root` ([] if none)."""
    root = Path(root)
    db_path = root / "stencil.db"
    if not db_path.is_file():
        return [f"{db_path} is missing"]
    problems: list[str] = []
    try:
        conn = sqlite3.connect(f"file:{quote(str(db_path.resolve()))}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.DatabaseError as error:
        return [f"{db_path}: {error}"]
    try:
        if integrity != ["ok"]:
            problems += [f"integrity_check: {line}" for line in integrity]
            return problems
        subjects = {row["id"]: row["name"] for row in conn.execute("select id, name from subjects")}

        def check_path(kind: str, row_id: int, subject_id: int, relative: str | None) -> None:
            if not relative:
                return
            path = root / relative
            name = subjects.get(subject_id)
            if name is None:
                problems.append(f"{kind} {row_id} belongs to no subject (subject id {subject_id})")
            elif not relative.startswith(f"subjects/{name}/"):
                problems.append(f"{kind} {row_id} of {name!r} points outside its folder: {relative}")
            if not path.is_file():
                problems.append(f"{kind} {row_id}: file missing: {relative}")

        image_paths = set()
        for row in conn.execute("select id, subject_id, file from images"):
            image_paths.add(row["file"])
            check_path("image", row["id"], row["subject_id"], row["file"])
        run_ids: dict[str, set[str]] = {}
        for row in conn.execute("select id, subject_id, status, weights_file from runs"):
            run_ids.setdefault(subjects.get(row["subject_id"], "?"), set()).add(str(row["id"]))
            if row["status"] == "running" and not allow_running:
                problems.append(f"run {row['id']} was left running")
            if row["status"] == "done":
                check_path("run", row["id"], row["subject_id"], row["weights_file"] or "")
                if not row["weights_file"]:
                    problems.append(f"run {row['id']} is done but has no weights")
        for row in conn.execute("select id, subject_id, image_file, draft_file from generations"):
            check_path("generation", row["id"], row["subject_id"], row["image_file"])
            check_path("generation draft", row["id"], row["subject_id"], row["draft_file"])
        folder = root / "subjects"
        names = set(subjects.values())
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if entry.name not in names:
                    problems.append(f"subject folder without a row: {entry.name}")
                    continue
                if allow_orphan_files:
                    continue
                images = entry / "images"
                if images.is_dir():
                    for file in sorted(images.iterdir()):
                        relative = file.relative_to(root).as_posix()
                        if relative not in image_paths:
                            problems.append(f"file without a row: {relative}")
                runs = entry / "runs"
                if runs.is_dir():
                    for run in sorted(runs.iterdir()):
                        if run.name not in run_ids.get(entry.name, set()):
                            problems.append(f"run folder without a row: {run.relative_to(root).as_posix()}")
    finally:
        conn.close()
    return problems
