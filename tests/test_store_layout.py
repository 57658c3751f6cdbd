"""The store's layout is written once: every file and folder name inside a subject's folder lives in
`stencil_cli/store/layout.py`, and the rest of the package takes it from there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from stencil_cli.store import layout

PACKAGE = Path(__file__).resolve().parents[1] / "stencil_cli"
LAYOUT_FILE = PACKAGE / "store" / "layout.py"
# named by lower layers (they cannot import the store) or by another folder that reuses the word (the
# DreamBench report's `subjects/<name>/`): not checked here
NOT_CHECKED = {layout.SUBJECTS_DIR}


def layout_names() -> dict[str, str]:
    """The names layout.py defines (constant name -> file or folder name)."""
    return {
        constant: value
        for constant, value in vars(layout).items()
        if constant.isupper() and isinstance(value, str) and value not in NOT_CHECKED
    }


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string nodes that are docstrings (of the module, a class or a function)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _path_operands(tree: ast.AST) -> set[int]:
    """The ids of string nodes joined onto a path (`folder / "x"`, `"x" / name`, `joinpath("x")`,
    `os.path.join(..., "x")`) or given a constant's name (`MASKS_DIR = "x"`)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(target, ast.Name) and target.id.isupper() for target in targets):
                found.add(id(node.value))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found.update(id(side) for side in (node.left, node.right) if isinstance(side, ast.Constant))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("joinpath", "join"):
            found.update(id(arg) for arg in node.args if isinstance(arg, ast.Constant))
    return found


def misplaced_names(source: str, names: dict[str, str]) -> list[tuple[int, str]]:
    """(line, literal) for each literal in `source` that writes one of the layout's `names` itself.

    Docstrings and prose (strings with spaces: messages, help texts) are not checked. A file name
    (``loss.png``) may not be in any other string (f-string parts included). A folder name (``masks``, also
    a common word and JSON key) may not be joined onto a path, be a part of a path such as ``"x/images"``,
    or be given a constant's name of its own.
    """
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    joined = _path_operands(tree)
    files = {value for value in names.values() if "." in value}
    folders = {value for value in names.values() if "." not in value}
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        text = node.value
        if any(character.isspace() for character in text):
            continue  # prose (a message, a help text) may mention a name; only names and paths are checked
        segments = set(text.split("/")) if "/" in text else set()
        named_file = any(name in text for name in files)
        joined_folder = id(node) in joined and text in folders
        if named_file or joined_folder or segments & folders:
            found.append((node.lineno, node.col_offset, text))
    return [(line, text) for line, _, text in sorted(found)]


def test_subject_folder_names_are_written_only_in_the_layout_module() -> None:
    names = layout_names()
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != LAYOUT_FILE
        for line, text in misplaced_names(path.read_text(encoding="utf-8"), names)
    ]
    assert not offending, "write these names through stencil_cli.store.layout:\n" + "\n".join(offending)


def test_the_name_check_finds_names_written_outside_the_layout() -> None:
    names = layout_names()
    source = '''
"""A docstring may say loss.png and runs/ID/samples."""
import os
def f(folder, run):
    """So may this one: contact-sheet.png."""
    stats = {"masks": 3, "runs": []}  # words used as keys are fine
    a = folder / "loss.png"
    MASKS_DIR = "masks"
    b = f"{run}/checkpoint.pt"
    c = folder / "masks" / "x.png"
    d = os.path.join(folder, "samples")
    e = f"subjects/{run}/images/{run}.jpg"
    return stats, a, b, c, d, e
'''
    found = misplaced_names(source, names)
    assert [text for _, text in found] == [
        "loss.png",
        "masks",
        "/checkpoint.pt",
        "masks",
        "samples",
        "/images/",
    ]
    assert "runs" in names.values() and "samples" in names.values()  # the folders are checked at all


def test_the_layout_places_each_kind_of_file_in_its_folder(tmp_path: Path) -> None:
    subject = layout.subject_folder(tmp_path, "cat")
    run = layout.run_folder(subject, 7)
    assert run == tmp_path / "subjects" / "cat" / "runs" / "7"
    assert (
        layout.photo_relative("cat", layout.photo_name("ab" * 32, ".jpg"))
        == f"subjects/cat/images/{'ab' * 32}.jpg"
    )
    assert layout.PHOTO_FILE.fullmatch(layout.photo_name("ab" * 32, ".png"))
    image = {"id": 3, "sha256": "0123456789abcdef" * 4}
    assert layout.mask_path(subject / layout.MASKS_DIR, image) == subject / "masks" / "3-0123456789ab.png"
    assert layout.sample_path(run, 50, 1) == run / "samples" / "step-000050-p1.png"
    assert (
        layout.draft_name("p00-0") == "draft-p00-0.png"
        and layout.image_name("p00-0-tau60") == "p00-0-tau60.png"
    )
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", layout.batch_name())  # UTC time, a random suffix
