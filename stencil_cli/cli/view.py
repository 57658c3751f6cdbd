"""`stencil view NAME`: write the subject's HTML page and open it in the browser."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer

from stencil_cli.cli.flags import show_as_flag
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.output import escape, info, print_json, warn
from stencil_cli.store.db import open_store
from stencil_cli.verbs.view import ViewRequest, write_view


@handle_errors
def view(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    out: Annotated[
        str | None,  # text, not a Path: Click reads an empty path as "." (the current folder)
        typer.Option(
            "--out",
            metavar="PATH",
            help="Write the page here (a folder, or a name without a suffix, gets NAME.html inside). "
            "[default: the subject's folder, view.html]",
            show_default=False,
        ),
    ] = None,
    no_open: Annotated[
        bool, typer.Option("--no-open", help="Only write the page; do not open a browser.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Write a static HTML page of a subject and open it: each image beside its draft, grouped by prompt
    (newest first), with its scores; the training runs; the photos and their masks.

    The page needs no server and no network; it refers to the images in the store by relative paths. Run it
    again after training or generating to bring the page up to date.
    """
    result = write_view(open_store(), ViewRequest(name, out, show_setting=show_as_flag()))
    for path in result.missing[:5]:
        warn(f"file missing (shown as a placeholder): {path}")
    if len(result.missing) > 5:
        warn(f"... and {len(result.missing) - 5} more missing file(s)")
    if json_output:
        print_json(result.to_dict())
    else:
        typer.echo(str(result.page))
    if no_open:
        return
    if webbrowser.open(result.page.resolve().as_uri()):
        info(f"opened {escape(result.page.name)} in the browser")
    else:
        info(f"no browser found: open {escape(str(result.page))} yourself")


def register(app: typer.Typer) -> None:
    """Register `stencil view`."""
    app.command("view")(view)
