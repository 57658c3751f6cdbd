"""The docs match the code: the generated command reference, and the names the architecture page cites."""

from __future__ import annotations

from pathlib import Path

from stencil_cli.cli import app
from stencil_cli.cli.docgen import render

ROOT = Path(__file__).resolve().parents[1]


def test_commands_md_matches_the_cli() -> None:
    expected = render(app)
    actual = (ROOT / "docs" / "commands.md").read_text()
    fix = "run `python -m stencil_cli.cli.docgen > docs/commands.md`"
    assert actual == expected, f"docs/commands.md is stale: {fix}"


def test_every_command_has_help() -> None:
    text = render(app)
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        assert body.strip().split("\n")[0].strip(), f"{title} has no help text"


# -- docs/architecture.md names only what exists ---------------------------------------------------------

LAYER_FOLDERS = ("base", "models", "core", "captioning", "store", "verbs", "cli")


def _architecture_citations() -> tuple[set[str], set[str]]:
    """The module files (`core/attention.py`) and dotted names (`core.weights.load_trained_weights`) cited."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    folders = "|".join(LAYER_FOLDERS)
    files = set(re.findall(rf"\b((?:{folders})/\w+\.py)\b", text))
    dotted = set(re.findall(rf"`((?:{folders})(?:\.\w+)+)", text))
    return files, dotted


def _resolve(dotted: str) -> bool:
    """Whether `layer.module[.attribute...]` names a module of stencil_cli and (then) attributes of it."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module("stencil_cli." + ".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_architecture_md_cites_only_modules_and_functions_that_exist() -> None:
    files, dotted = _architecture_citations()
    assert len(files) >= 20 and len(dotted) >= 20, "the parser found few citations: is it broken?"
    package = ROOT / "stencil_cli"
    missing = sorted(f for f in files if not (package / f).is_file())
    unknown = sorted(name for name in dotted if not _resolve(name))
    assert not missing and not unknown, f"docs/architecture.md cites what does not exist: {missing + unknown}"


def test_the_citation_check_catches_a_stale_name() -> None:
    assert _resolve("core.weights.load_trained_weights")
    assert not _resolve("core.generation.context_guidance")  # moved long ago: must be reported
    assert not _resolve("store.nowhere")


def _documented_columns(text: str) -> dict[str, list[str]]:
    """{table: [column, ...]} from docs/store.md's schema table (the first backticked word of each item)."""
    import re

    tables = {}
    for line in text.splitlines():
        match = re.match(r"^\| `(\w+)` \| (.+) \|$", line)
        if match:
            items = re.split(r",\s*(?![^()]*\))", match[2])  # commas outside parentheses
            names = [re.match(r"`(\w+)`", item.strip()) for item in items]
            tables[match[1]] = [name[1] for name in names if name]
    return tables


def test_store_md_lists_the_real_columns_of_every_table(stencil_home: Path) -> None:
    from stencil_cli.store.db import open_store

    documented = _documented_columns((ROOT / "docs" / "store.md").read_text())
    db = open_store().db
    real = {t: [c.name for c in db[t].columns] for t in db.table_names() if not t.startswith("_")}
    assert documented == real


def test_the_size_table_in_training_md_is_the_one_export_sizes_computes() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import export_sizes

    table = export_sizes.size_table()
    assert table in (ROOT / "docs" / "training.md").read_text(), (
        "docs/training.md's sizes are stale: paste `python benchmarks/export_sizes.py`"
    )


def test_sizes_read_the_same_in_every_command() -> None:
    """One formatter (decimal units): no command formats bytes by hand with powers of 1024."""
    from stencil_cli.cli.output import human_bytes

    assert human_bytes(2_043_183_360) == "2.0 GB" and human_bytes(1536) == "1.5 kB"
    assert human_bytes(None) == "-"
    for module in (ROOT / "stencil_cli" / "cli").glob("*.py"):
        text = module.read_text()
        assert "/ 1024" not in text and "/= 1024" not in text and "/= 1000" not in text, module.name
