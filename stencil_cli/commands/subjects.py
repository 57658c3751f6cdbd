"""Subject commands: add, ls, show, rm, and `store path|clean|repair`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.errors import BadInputError
from stencil_cli.output import err_console, escape, info, print_json, settings, shown, warn
from stencil_cli.store import Store, Subject, open_store
from stencil_cli.verbs.subjects import (
    RM_WAIT_S,
    AddRequest,
    BadPhotosError,
    add_photos,
    remove_photo,
    remove_subject,
)
from stencil_cli.verbs.train import masks_of

store_app = typer.Typer(help="The local store: where subjects, runs and images live.", no_args_is_help=True)


def _image_row(image: dict[str, Any], missing: bool | None = None) -> dict[str, Any]:
    row = {
        "id": image["id"],
        "sha256": image["sha256"],
        "width": image["width"],
        "height": image["height"],
        "original_name": image["original_name"],
        "file": image["file"],
        "caption": image["caption"],
        "caption_source": image["caption_source"],
    }
    if missing is not None:
        row["missing"] = missing
    return row


def subject_json(subject: Subject, missing_ids: set[int] | None = None) -> dict[str, Any]:
    """The JSON shape of one subject (used by `show --json` and `add --json`); with `missing_ids`, each
    photo says whether its file is missing."""
    data = subject.to_dict()
    data["images"] = [
        _image_row(image, None if missing_ids is None else image["id"] in missing_ids)
        for image in subject.images
    ]
    return data


def warn_unindexed(store: Store) -> list[str]:
    """Warn about subject folders that have no database row (a lost or replaced database); return them."""
    folders = store.unindexed_folders()
    if folders:
        warn(
            f"subject folder(s) without a database row: {', '.join(folders)} (was the database lost or "
            "replaced?); run `stencil store repair` to index their photos again (`store clean` keeps them)"
        )
    return folders


@handle_errors
def add(
    name: Annotated[str, typer.Argument(help="Subject name: lowercase letters, digits, '-' and '_'.")],
    paths: Annotated[list[Path], typer.Argument(help="Photo files or folders of photos.")],
    phrase: Annotated[
        str | None, typer.Option("--phrase", help="Words the subject is bound to, e.g. 'cat' or 'toy robot'.")
    ] = None,
    class_word: Annotated[
        str | None, typer.Option("--class", help="Class word, e.g. 'dog' (default: the phrase).")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Add the good photos even if some files are bad.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Create a subject from photos, or add photos to an existing one."""
    request = AddRequest(name, paths, phrase=phrase, class_word=class_word, skip_bad=skip_bad)
    try:
        outcome = add_photos(open_store(), request)
    except BadPhotosError as error:
        for rejected in error.rejected:
            err_console.print(f"  [red]bad:[/red] {escape(str(rejected.source))}: {escape(rejected.reason)}")
        raise
    for message in outcome.warnings:
        warn(message)
    if json_output:
        print_json(
            {
                "subject": subject_json(outcome.subject),
                "created": outcome.created,
                "added": [_image_row(image) for image in outcome.added],
                "duplicates": [str(path) for path in outcome.duplicates],
                "restored": [_image_row(image) for image in outcome.restored],
                "skipped": [{"file": str(r.source), "reason": r.reason} for r in outcome.skipped],
            }
        )
        return
    for rejected in outcome.skipped:
        warn(f"skipped {rejected.source}: {rejected.reason}")
    if outcome.restored:
        ids = ", ".join(str(image["id"]) for image in outcome.restored)
        info(f"restored {len(outcome.restored)} missing photo file(s) (photo(s) {ids})")
    verb = "created" if outcome.created else "updated"
    typer.echo(
        f"{verb} {name}: added {len(outcome.added)} photo(s), {len(outcome.duplicates)} already there, "
        f"{len(outcome.subject.images)} in all"
    )
    if outcome.subject.phrase is None:
        info("[dim]tip: set the words the subject is bound to with --phrase (e.g. --phrase 'cat')[/dim]")


@handle_errors
def ls(json_output: JsonOption = False) -> None:
    """List subjects."""
    store = open_store()
    rows = store.list_subjects()
    unindexed = warn_unindexed(store)
    if json_output:
        print_json(rows)
        return
    if not rows:
        if not unindexed:
            info("no subjects yet: add one with `stencil add NAME PHOTOS...`")
        return
    table = Table("name", "phrase", "photos", "captioned", "trained run", box=None)
    for row in rows:
        table.add_row(
            escape(row["name"]),
            shown(row["phrase"] or "-"),
            str(row["images"]),
            str(row["captioned"]),
            str(row["latest_run"] or "-"),
        )
    from rich.console import Console

    Console().print(table)


@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    masks: Annotated[
        bool, typer.Option("--masks", help="Print the paths of the mask pictures of the last mask pass.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Show a subject: its phrase, description and photos with captions."""
    if masks:
        _show_masks(name, json_output)
        return
    store = open_store()
    subject = store.get_subject(name)
    missing = {image["id"] for image in store.missing_files(name)}
    if missing:
        warn(
            f"{len(missing)} photo file(s) of {name} are missing: add the same photos again to restore them, "
            f"or remove them with `stencil rm {name} --image ID`"
        )
    if json_output:
        print_json(subject_json(subject, missing))
        return
    lines = [
        f"[bold]{escape(subject.name)}[/bold]",
        f"phrase:      {shown(subject.phrase or '-')}",
        f"class:       {shown(subject.class_word or '-')}",
        f"description: {shown(subject.description or '-')}",
        f"created:     {subject.created}",
        f"photos:      {len(subject.images)}",
    ]
    from rich.console import Console

    console = Console(highlight=False)
    for line in lines:
        console.print(line)
    for image in subject.images:
        gone = " [red](file missing)[/red]" if image["id"] in missing else ""
        console.print(
            f"  [cyan]{image['id']:>3}[/cyan] {image['sha256'][:12]} {image['width']}x{image['height']} "
            f"{shown(image['original_name'] or '')}{gone}"
        )
        caption = image["caption"]
        console.print(f"      caption: {shown(caption) if caption else '[dim](none)[/dim]'}")


def _show_masks(name: str, json_output: bool) -> None:
    """`stencil show NAME --masks`: one line per photo with its mask picture's path (stdout)."""
    rows = masks_of(open_store(), name)
    if json_output:
        print_json({"subject": name, "masks": rows})
        return
    if not any(row["file"] for row in rows):
        info(f"no mask pictures for {escape(name)} yet: run `stencil train {escape(name)} --masks-only`")
        return
    for row in rows:
        typer.echo(f"{row['image_id']:>4}  {row['file'] or '(none yet)'}")


@handle_errors
def rm(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    image: Annotated[str | None, typer.Option("--image", help="Remove only this photo (id or hash).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            min=0,
            max=3600,
            help="Seconds to wait for commands using the subject (gen, train, caption, eval) to finish.",
        ),
    ] = RM_WAIT_S,
) -> None:
    """Remove a subject (with its photos, runs and images), or one photo with --image."""
    store = open_store()
    subject = store.get_subject(name)
    if image is not None:
        removed = remove_photo(store, name, image)
        typer.echo(f"removed photo {removed['id']} ({removed['sha256'][:12]}) from {name}")
        return
    if not yes:
        if not typer.get_text_stream("stdin").isatty():
            raise BadInputError(f"refusing to remove {name!r} without confirmation: pass --yes")
        typer.confirm(
            f"Remove subject {name!r} with {len(subject.images)} photo(s) and all its runs?", abort=True
        )
    remove_subject(store, name, wait_s=wait)
    typer.echo(f"removed {name}")


@store_app.command("path")
@handle_errors
def store_path() -> None:
    """Print the store's folder (STENCIL_HOME or the platform default)."""
    typer.echo(str(open_store().root))


@store_app.command("clean")
@handle_errors
def store_clean(
    older_than: Annotated[
        float,
        typer.Option("--older-than", min=0, help="Only remove leftovers untouched for this many seconds."),
    ] = 300.0,
    remove_unindexed: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-unindexed",
            metavar="NAME",
            help="Also remove this subject folder that has no database row (only when named; repeatable).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove files left behind by interrupted commands (nothing that a row refers to).

    Subject folders without a database row (after a lost database) are kept unless named with
    --remove-unindexed; `stencil store repair` indexes their photos again.
    """
    store = open_store()
    named = sorted(set(remove_unindexed or []))
    if named and not yes:
        if not typer.get_text_stream("stdin").isatty():
            raise BadInputError(
                f"refusing to remove the folder(s) {', '.join(named)} without confirmation: pass --yes"
            )
        typer.confirm(
            f"Remove the subject folder(s) {', '.join(named)} (photos, weights and images) for good?",
            abort=True,
        )
    removed = store.clean(min_age_s=older_than, remove_unindexed=named)
    typer.echo(f"removed {len(removed)} orphan file(s)/folder(s)")
    kept = [folder for folder in store.unindexed_folders() if folder not in named]
    if kept:
        warn(
            f"kept subject folder(s) without a database row: {', '.join(kept)}; `stencil store repair` "
            "indexes them again, `--remove-unindexed NAME` removes one"
        )


@store_app.command("repair")
@handle_errors
def store_repair(json_output: JsonOption = False) -> None:
    """Index again the photos in subject folders that have no database row (after a lost database).

    Each such folder becomes a subject again with its photos (no captions); its old runs and generations are
    kept under `subjects/NAME/recovered/`. Caption and train again as needed.
    """
    report = open_store().repair()
    if json_output:
        print_json(
            {
                "subjects": report["subjects"],
                "images": report["images"],
                "skipped": [{"path": path, "reason": reason} for path, reason in report["skipped"]],
            }
        )
        return
    for path, reason in report["skipped"]:
        warn(f"skipped {path}: {reason}")
    names = ", ".join(report["subjects"])
    typer.echo(
        f"indexed {report['images']} photo(s) in {len(report['subjects'])} new subject(s)"
        + (f": {names}" if names else "")
    )
    if report["subjects"]:
        info(f"next: caption them (`stencil caption {escape(report['subjects'][0])}`), then train")


def register(app: typer.Typer) -> None:
    """Register the subject commands on `app`."""
    app.command()(add)
    app.command("ls")(ls)
    app.command()(show)
    app.command()(rm)
    app.add_typer(store_app, name="store")
    _ = settings  # quiet/debug are read by helpers at call time
