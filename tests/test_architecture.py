"""The package's layers: imports run one way (lowest layer first), no cycles, a light command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stencil_cli"

# The layer order, lowest first: each layer is one folder of the package (the package's own __init__ is the
# lowest, `python -m stencil_cli` the highest). A module imports its own layer and those before it, never a
# later one.
LAYERS: list[tuple[str, str]] = [
    ("root", "__init__"),
    ("base", "base"),
    ("models", "models"),
    ("core", "core"),
    ("captioning", "captioning"),
    ("store", "store"),
    ("verbs", "verbs"),
    ("cli", "cli"),
    ("main", "__main__"),
]


def layer_of(module: str) -> int:
    """The index of the layer a dotted module name (stencil_cli.x.y) belongs to."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, folder) in enumerate(LAYERS):
        if head == folder:
            return index
    raise AssertionError(f"{module} is in no layer: put it in one of the folders of LAYERS in {__file__}")


def test_every_layer_is_a_folder_of_the_package_and_every_module_is_in_one() -> None:
    for _, folder in LAYERS:
        assert (PACKAGE / folder / "__init__.py").is_file() or (PACKAGE / f"{folder}.py").is_file(), folder
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert not loose, f"modules outside the layer folders: {loose}"
    for module in import_graph():
        layer_of(module)


def module_name(path: Path) -> str:
    """stencil_cli/verbs/train.py -> stencil_cli.verbs.train."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every stencil_cli module `path` imports, at the top or inside functions."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("stencil_cli"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("stencil_cli"):
                continue
            found.add(target)
            for alias in node.names:  # `from stencil_cli import models` imports a module
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                ).is_file():
                    found.add(candidate)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the stencil_cli modules it imports."""
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_imports_never_reach_a_higher_layer() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_ml_core_and_models_never_import_the_store() -> None:
    graph = import_graph()
    offending = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if LAYERS[layer_of(module)][0] in ("base", "models", "core", "captioning")
        for target in targets
        if target.split(".")[1:2] == ["store"]
    ]
    assert not offending, "\n".join(offending)


def test_commands_never_import_another_command() -> None:
    from stencil_cli.cli.app import COMMAND_MODULES as names

    commands = {f"stencil_cli.cli.{name}" for name in names}
    offending = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module in commands
        for target in targets
        if target in commands
    ]
    assert not offending, "\n".join(offending)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules (packages count as their __init__), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            # a package importing its own submodules (re-exports) is not a cycle
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert _find_cycle(import_graph()) is None, (
        f"import cycle: {' -> '.join(_find_cycle(import_graph()) or [])}"
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


HEAVY = ("torch", "diffusers", "transformers")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["ls", "--json"],
        ["show", "nobody"],
        ["rm", "nobody", "--yes"],
        ["store", "path"],
        ["config", "ls"],
    ],
)
def test_store_commands_never_import_the_ml_libraries(argv: list[str], tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from stencil_cli.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {"STENCIL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PACKAGE.parent, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_importing_the_cli_imports_no_ml_library() -> None:
    code = f"import sys, stencil_cli.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_commands_never_import_the_ml_core() -> None:
    core = LAYERS[[name for name, _ in LAYERS].index("core")][1]
    offending = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.startswith("stencil_cli.cli") or LAYERS[layer_of(module)][0] == "cli"
        for target in targets
        if target.split(".")[1:2] and target.split(".")[1] in core
    ]
    assert not offending, "\n".join(offending)
