"""History commands: `stencil runs` and `stencil images` (newest first, with --json)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from stencil_cli.cli.flags import run_error
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.output import (
    PIPED_WIDTH,
    escape,
    human_bytes,
    info,
    print_json,
    stdout_console,
    warn_damaged,
)
from stencil_cli.store.db import open_store
from stencil_cli.verbs.history import ImagesQuery, damaged_rows, list_images, list_runs

FLAGS = {"limit": "-n", "run_id": "--run"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@handle_errors(flags=FLAGS)
def runs(
    name: Annotated[str | None, typer.Argument(help="Subject name. [default: every subject]")] = None,
    paths: Annotated[
        bool, typer.Option("--paths", help="Print each run's folder, weights, loss curve and previews.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """List training runs, newest first: id, status, kind, steps, final loss, duration, size, started."""
    found = list_runs(open_store(), name)
    warn_damaged(damaged_rows(item.run for item in found))
    if json_output:
        print_json([run.to_dict() for run in found])
        return
    if not found:
        target = escape(name) if name else "NAME"
        info(f"no training runs yet: train with `stencil train {target}`")
        return
    if paths:
        for item in found:
            data = item.to_dict()
            typer.echo(f"run {item.run.id} ({item.subject}, {item.run.status})")
            for key in ("folder", "weights_file", "loss_curve", "samples"):
                if data.get(key):
                    typer.echo(f"  {key + ':':<14}{data[key]}")
        return

    table = listing_table(
        "id", "subject", "status", "kind", "steps", "loss", "duration", "size", "images", "started"
    )
    for item in found:
        run = item.run
        steps = item.run.params.get("steps")
        table.add_row(
            str(run.id),
            escape(item.subject),
            run.status,
            item.to_dict()["kind_label"],
            f"{run.step}/{steps}" if steps else str(run.step),
            f"{run.final_loss:.4f}" if run.final_loss is not None else "-",
            _duration(run.duration_s),
            human_bytes(item.bytes),
            str(item.images),
            run.started.replace("T", " ").removesuffix("+00:00"),
        )
    print_listing(table)
    for item in found:
        if item.run.error and item.run.status in ("failed", "interrupted"):
            info(f"run {item.run.id} {item.run.status}: {escape(run_error(item.run.error))}")


def listing_table(*columns: str) -> Table:
    """A borderless table of the given columns (see `print_listing`)."""
    return Table(*columns, box=None, pad_edge=False)


def print_listing(table: Table) -> None:
    """Print a listing at its natural width, wider than a narrow terminal if need be (the terminal wraps
    the line): an id, a date or a path cut short or folded by rich cannot be copied back into a command."""
    shown = stdout_console()
    natural = shown.measure(table, options=shown.options.update(max_width=PIPED_WIDTH)).maximum
    shown.width = max(shown.width, natural)
    shown.print(table, crop=False)


@handle_errors(flags=FLAGS)
def images(
    name: Annotated[str | None, typer.Argument(help="Subject name. [default: every subject]")] = None,
    run_id: Annotated[int | None, typer.Option("--run", help="Only images made with this run.")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Only prompts containing this text (any case).")
    ] = None,
    limit: Annotated[int | None, typer.Option("-n", "--limit", help="Only the newest N.")] = None,
    json_output: JsonOption = False,
) -> None:
    """List generated images, newest first: id, run, prompt, tau, seed, mode, file, created."""
    found = list_images(open_store(), ImagesQuery(name, run_id, prompt, limit))
    warn_damaged(damaged_rows(item.generation for item in found))
    if json_output:
        print_json([image.to_dict() for image in found])
        return
    if not found:
        target = escape(name) if name else "NAME"
        info(f"no generated images match: render some with `stencil gen {target} PROMPT`")
        return

    table = listing_table("id", "subject", "run", "prompt", "tau", "seed", "mode", "file", "created")
    for item in found:
        row = item.generation
        table.add_row(
            str(row.id),
            escape(item.subject),
            str(row.run_id if row.run_id is not None else "-"),
            escape(row.prompt or "-"),
            f"{row.tau:g}" if row.tau is not None else "-",
            str(row.seed if row.seed is not None else "-"),
            item.mode or "-",
            escape(str(row.image_file or "-")) + (" [red](missing)[/red]" if item.missing else ""),
            row.created.replace("T", " ").removesuffix("+00:00"),
        )
    print_listing(table)


def register(app: typer.Typer) -> None:
    """Register `stencil runs` and `stencil images`."""
    app.command("runs")(runs)
    app.command("images")(images)
