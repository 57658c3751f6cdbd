"""Subject commands: add, ls, show, rm, and `store path|clean|repair`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stencil_cli.base.errors import BadInputError, render_text
from stencil_cli.base.images import RejectedImage
from stencil_cli.cli.flags import run_error, show_as_flag
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.output import (
    err_console,
    escape,
    human_bytes,
    info,
    print_json,
    settings,
    shown,
    stdout_console,
    warn,
    warn_damaged,
)
from stencil_cli.cli.stdin import stdin_is_terminal
from stencil_cli.store.db import Store, open_store
from stencil_cli.store.records import Subject
from stencil_cli.verbs.history import SubjectSummary, subject_summary
from stencil_cli.verbs.prune import disk_usage, plan_run_removal, prune, remove_run
from stencil_cli.verbs.subjects import (
    RM_WAIT_S,
    AddRequest,
    BadPhotosError,
    add_photos,
    remove_photo,
    remove_subject,
)
from stencil_cli.verbs.train import masks_of
from stencil_cli.verbs.view import mask_sheet

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
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Photo files, folders of photos and .zip files of photos. Accepted: JPEG, PNG, HEIC/HEIF, "
            "AVIF, WebP, TIFF, BMP, GIF and every other format Pillow (with pi-heif) reads, listed in "
            "docs/store.md; hidden files (macOS ._* and .DS_Store) are passed over.",
        ),
    ],
    phrase: Annotated[
        str | None, typer.Option("--phrase", help="Words the subject is bound to, e.g. 'cat' or 'toy robot'.")
    ] = None,
    class_word: Annotated[
        str | None, typer.Option("--class", help="Class word, e.g. 'dog' (default: the phrase).")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Add the good photos even if some files are bad.")
    ] = False,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive",
            "-r",
            help="Also add the photos in sub-folders of the given folders (without it, a folder whose "
            "sub-folders hold photos is refused).",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Create a subject from photos, or add photos to an existing one.

    Each photo is stored upright (EXIF orientation), converted from its colour profile to sRGB, as 8-bit
    RGB; a zip is read in memory (nothing is unpacked to disk). All or nothing: a bad file stops the add
    unless --skip-bad.
    """
    request = AddRequest(
        name, paths, phrase=phrase, class_word=class_word, skip_bad=skip_bad, recursive=recursive
    )
    try:
        outcome = add_photos(open_store(), request)
    except BadPhotosError as error:
        if len(error.rejected) > 1:  # one bad file: the error line names it
            for rejected in error.rejected:
                err_console.print(f"  [red]bad:[/red] {escape(str(rejected.source))}: {_reason(rejected)}")
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
                "skipped": [
                    {"file": str(r.source), "reason": _reason(r, markup=False)} for r in outcome.skipped
                ],
                "passed_over": {"hidden": outcome.hidden, "other": outcome.other},
            }
        )
        return
    for rejected in outcome.skipped:
        warn(f"skipped {rejected.source}: {_reason(rejected, markup=False)}")
    if outcome.restored:
        ids = ", ".join(str(image["id"]) for image in outcome.restored)
        info(f"restored {len(outcome.restored)} missing photo file(s) (photo(s) {ids})")
    if settings.quiet:  # -q: nothing but errors and warnings
        return
    verb = "created" if outcome.created else "updated"
    passed = [
        f"{count} {kind} file(s)"
        for count, kind in ((outcome.hidden, "hidden"), (outcome.other, "non-photo"))
        if count
    ]
    typer.echo(
        f"{verb} {name}: added {len(outcome.added)} photo(s), {len(outcome.duplicates)} already there, "
        f"{len(outcome.subject.images)} in all" + (f"; passed over {' and '.join(passed)}" if passed else "")
    )
    if outcome.subject.phrase is None:
        info("[dim]tip: set the words the subject is bound to with --phrase (e.g. --phrase 'cat')[/dim]")


def _reason(rejected: RejectedImage, *, markup: bool = True) -> str:
    """Why a file was refused, with the settings it mentions shown as flags (rich-escaped with `markup`)."""
    text = render_text(rejected.reason, show_as_flag())
    return escape(text) if markup else text


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
    stdout_console().print(table)


@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    masks: Annotated[
        bool,
        typer.Option(
            "--masks",
            help="Print the paths of the mask pictures of the last mask pass, and write a contact sheet of "
            "each photo beside its mask.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Show a subject: its phrase, description and photos with captions."""
    if masks:
        _show_masks(name, json_output)
        return
    store = open_store()
    subject = store.get_subject(name)
    summary = subject_summary(store, name)
    warn_damaged(summary.damaged)
    missing = {image["id"] for image in store.missing_files(name)}
    if missing:
        warn(
            f"{len(missing)} photo file(s) of {name} are missing: add the same photos again to restore them, "
            f"or remove them with `stencil rm {name} --image ID`"
        )
    if json_output:
        print_json({**subject_json(subject, missing), "history": summary.to_dict()})
        return
    lines = [
        f"[bold]{escape(subject.name)}[/bold]",
        f"phrase:      {shown(subject.phrase or '-')}",
        f"class:       {shown(subject.class_word or '-')}",
        f"description: {shown(subject.description or '-')}",
        f"created:     {subject.created}",
        f"photos:      {len(subject.images)}",
    ]
    console = stdout_console()
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
    _print_summary(console, name, summary)


def _print_summary(console: Any, name: str, summary: SubjectSummary) -> None:
    """The closing lines of `show`: runs and images, and the commands that list them."""
    if summary.runs:
        newest = f", newest done: run {summary.newest_done}" if summary.newest_done is not None else ""
        console.print(
            f"runs:        {summary.runs} ({summary.done_runs} done{newest}; "
            f"{human_bytes(summary.run_bytes)}) "
            f"[dim]- `stencil runs {escape(name)}`[/dim]"
        )
    else:
        console.print(f"runs:        none [dim]- train with `stencil train {escape(name)}`[/dim]")
    if summary.newest_failed is not None:
        failed = summary.newest_failed
        console.print(f"last run:    {failed.id} failed: {escape(run_error(failed.error))}")
    if summary.images:
        console.print(
            f"images:      {summary.images} (newest {summary.newest_image}) "
            f"[dim]- `stencil images {escape(name)}`[/dim]"
        )
    else:
        console.print("images:      none")


def _show_masks(name: str, json_output: bool) -> None:
    """`stencil show NAME --masks`: one line per photo with its mask picture's path (stdout), and the
    contact sheet's path (stderr)."""
    store = open_store()
    rows = masks_of(store, name)
    sheet = mask_sheet(store, name)
    if json_output:
        print_json({"subject": name, "masks": rows, "contact_sheet": str(sheet.path) if sheet else None})
        return
    if sheet is None:
        info(f"no mask pictures for {escape(name)} yet: run `stencil train {escape(name)} --masks-only`")
        return
    for row in rows:
        typer.echo(f"{row['image_id']:>4}  {row['file'] or '(none yet)'}")
    info(f"contact sheet (each photo beside its mask): {escape(str(sheet.path))}")


@handle_errors
def rm(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    image: Annotated[str | None, typer.Option("--image", help="Remove only this photo (id or hash).")] = None,
    run_id: Annotated[
        int | None,
        typer.Option(
            "--run",
            help="Remove only this training run: its weights, masks, previews and the images made with it "
            "(ids: `stencil runs NAME`).",
            show_default=False,
        ),
    ] = None,
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
    json_output: JsonOption = False,
) -> None:
    """Remove a subject (with its photos, runs and images), one photo with --image, or one run with --run."""
    store = open_store()
    subject = store.get_subject(name)
    if image is not None and run_id is not None:
        raise BadInputError("--image and --run do not go together: remove one thing at a time")
    if image is not None:
        what = f"photo {image} of {name!r}"
        _confirm(yes, f"Remove {what} (its file and caption)?", what)
        removed = remove_photo(store, name, image, wait_s=wait)
        if json_output:
            print_json({"subject": name, "removed": "photo", "photo": _image_row(removed)})
            return
        typer.echo(f"removed photo {removed['id']} ({removed['sha256'][:12]}) from {name}")
        return
    if run_id is not None:
        planned = plan_run_removal(store, name, run_id)
        _confirm(
            yes,
            f"Remove run {run_id} of {name!r} ({human_bytes(planned.bytes)}: weights, masks and "
            f"{len(planned.images)} image(s))?",
            f"run {run_id} of {name!r}",
        )
        removal = remove_run(store, name, run_id, wait_s=wait)
        if json_output:
            print_json({"removed": "run", **removal.to_dict()})
            return
        typer.echo(
            f"removed run {run_id} of {name} and {len(removal.images)} image(s): "
            f"freed {human_bytes(removal.bytes)}"
        )
        return
    _confirm(
        yes, f"Remove subject {name!r} with {len(subject.images)} photo(s) and all its runs?", repr(name)
    )
    remove_subject(store, name, wait_s=wait)
    if json_output:
        print_json({"subject": name, "removed": "subject"})
        return
    typer.echo(f"removed {name}")


def _confirm(yes: bool, question: str, what: str) -> None:
    """Ask `question` on a terminal; without one, refuse to remove `what` unless --yes."""
    if yes:
        return
    if not stdin_is_terminal():
        raise BadInputError(f"refusing to remove {what} without confirmation: pass --yes")
    typer.confirm(question, abort=True)


@store_app.command("path")
@handle_errors
def store_path(json_output: JsonOption = False) -> None:
    """Print the store's folder (STENCIL_HOME or the platform default)."""
    root = open_store().root
    if json_output:
        print_json({"path": str(root)})
        return
    typer.echo(str(root))


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
    json_output: JsonOption = False,
) -> None:
    """Remove files left behind by interrupted commands (nothing that a row refers to).

    Subject folders without a database row (after a lost database) are kept unless named with
    --remove-unindexed; `stencil store repair` indexes their photos again.
    """
    store = open_store()
    named = sorted(set(remove_unindexed or []))
    if named and not yes:
        if not stdin_is_terminal():
            raise BadInputError(
                f"refusing to remove the folder(s) {', '.join(named)} without confirmation: pass --yes"
            )
        typer.confirm(
            f"Remove the subject folder(s) {', '.join(named)} (photos, weights and images) for good?",
            abort=True,
        )
    removed = store.clean(min_age_s=older_than, remove_unindexed=named)
    if json_output:
        print_json({"removed": [str(path) for path in removed]})
        return
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


@store_app.command("prune")
@handle_errors
def store_prune(
    keep: Annotated[
        int, typer.Option("--keep", help="Finished runs per subject whose weights stay (the newest).")
    ] = 1,
    name: Annotated[
        str | None, typer.Option("--subject", help="Only this subject. [default: every subject]")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print what would go and the bytes it would free.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete the weights and checkpoints of older runs (rows, masks and images stay)."""
    result = prune(open_store(), keep, dry_run=dry_run, name=name)
    for subject in result.skipped:
        warn(f"skipped {subject}: another stencil command (train, gen, caption or eval) is using it now")
    if json_output:
        print_json(result.to_dict())
        return
    verb = "would free" if dry_run else "freed"
    for run in result.runs:
        for path in run.files:
            typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    typer.echo(f"{len(result.runs)} run(s): {verb} {human_bytes(result.bytes)} ({result.bytes} bytes)")


@store_app.command("du")
@handle_errors
def store_du(json_output: JsonOption = False) -> None:
    """Show the store's size per subject: photos, runs, generated images."""
    rows = disk_usage(open_store())
    if json_output:
        print_json([row.to_dict() for row in rows])
        return
    table = Table("subject", "photos", "runs", "images", "total", box=None, pad_edge=False)
    for row in rows:
        table.add_row(
            escape(row.subject),
            human_bytes(row.photos),
            human_bytes(row.runs),
            human_bytes(row.generations),
            human_bytes(row.total),
        )
    table.add_row("all", "", "", "", human_bytes(sum(row.total for row in rows)))
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    """Register the subject commands on `app`."""
    app.command()(add)
    app.command("ls")(ls)
    app.command()(show)
    app.command()(rm)
    app.add_typer(store_app, name="store")
    _ = settings  # quiet/debug are read by helpers at call time
