"""Only the CLI knows flags: messages below it mention settings by field, and each front end shows them its
way (the CLI as flags, `str(error)` as field names)."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from photos import add_subject
from runs import interrupted_run

from stencil_cli.base.errors import (
    PLACEHOLDER,
    BadInputError,
    DiskFullError,
    FieldError,
    StencilError,
    Wording,
    worded,
)
from stencil_cli.cli.app import app
from stencil_cli.cli.flags import command_flag
from stencil_cli.cli.kit import error_line
from stencil_cli.cli.output import warn

PACKAGE = Path(__file__).resolve().parents[1] / "stencil_cli"

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
CSS_PROPERTY = re.compile(r"var\(--[\w-]+|--[\w-]+\s*:")  # a CSS custom property (the view page), not a flag


def string_literals(source: str) -> Iterator[tuple[int, str]]:
    """Every string constant of `source` (f-strings' literal parts included) that is not a docstring."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def flags_in(source: str) -> list[tuple[int, str]]:
    """The `--flag` names in the string literals of `source` (not docstrings, not CSS custom properties)."""
    return [
        (line, match.group())
        for line, text in string_literals(source)
        for match in FLAG.finditer(CSS_PROPERTY.sub("", text))
    ]


def modules_below_the_cli() -> list[Path]:
    """Every module of the package outside `cli/`."""
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] != "cli"]


def test_the_flag_check_reads_f_strings_and_skips_docstrings_and_css() -> None:
    source = (
        '"""A module about --steps."""\n'
        "def f(x):\n"
        '    """Use --lr."""\n'
        '    page = ":root { --bg: #fff; } a { color: var(--ink); }"\n'
        '    return f"try a lower {x} or --precision fp32", "--no-t5", "a-b--c", page\n'
    )
    assert sorted(flags_in(source)) == [(5, "--no-t5"), (5, "--precision")]


def test_no_module_below_the_cli_names_a_flag() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {flag}"
        for path in modules_below_the_cli()
        for line, flag in flags_in(path.read_text(encoding="utf-8"))
    ]
    assert not found, "name the setting by field instead ({lr}, see base/errors.py):\n" + "\n".join(found)


def test_every_setting_of_another_command_that_a_message_mentions_is_an_option_of_that_command() -> None:
    root = typer.main.get_command(app)
    mentioned, unknown = [], []
    for path in modules_below_the_cli():
        for line, text in string_literals(path.read_text(encoding="utf-8")):
            for match in PLACEHOLDER.finditer(text):
                if match["command"] is None:
                    continue
                mentioned.append(match[0])
                if command_flag(root, match["command"], match["field"]) is None:
                    unknown.append(f"{path.relative_to(PACKAGE)}:{line}: {match[0]}")
    assert "{rm.image=ID}" in mentioned  # the check sees the messages' placeholders
    assert not unknown, "no such option:\n" + "\n".join(unknown)


# -- how a message mentions settings, and how each front end shows them -------------------------------------


def test_an_error_reads_with_field_names_and_the_cli_shows_flags_with_their_values() -> None:
    error = StencilError(
        "the loss became nan at step 3; try a lower {lr} or {precision=fp32}", fields=("lr", "precision")
    )
    assert str(error) == "the loss became nan at step 3; try a lower lr or precision=fp32"
    assert error_line(error) == "the loss became nan at step 3; try a lower --lr or --precision fp32"
    renamed = error_line(error, {"lr": "--learning-rate"})
    assert renamed.endswith("try a lower --learning-rate or --precision fp32")
    assert error.fields == ("lr", "precision")


def test_only_declared_fields_are_placeholders_so_user_text_keeps_its_braces() -> None:
    error = BadInputError("the prompt '{lr} {x} {}' is bad: see {lr}", hint="{steps} stays", fields=("lr",))
    assert str(error) == "the prompt 'lr {x} {}' is bad: see lr ({steps} stays)"
    plain = StencilError("a path /tmp/{lr}/x")  # declares nothing: nothing is replaced
    assert str(plain) == error_line(plain) == "a path /tmp/{lr}/x"


def test_a_hint_may_mention_the_settings_of_another_command() -> None:
    error = StencilError(
        "photo(s) 3 of 'cat' are missing their files",
        hint="remove them with `stencil rm cat {rm.image=ID}`",
        fields=("rm.image",),
    )
    assert str(error).endswith("(remove them with `stencil rm cat image=ID`)")
    assert error_line(error).endswith("(remove them with `stencil rm cat --image ID`)")
    assert error.fields == ("rm.image",)


def test_the_cli_finds_another_commands_flag_among_that_commands_options() -> None:
    root = typer.main.get_command(app)
    assert command_flag(root, "rm", "image") == "--image"
    assert command_flag(root, "train", "masks_only") == "--masks-only"
    assert command_flag(root, "bench dreambench", "train_steps") == "--train-steps"
    assert command_flag(root, "rm", "no_such_option") is None and command_flag(root, "nope", "x") is None


def test_a_field_error_may_name_its_fields_by_their_own_placeholders() -> None:
    error = FieldError("draft", "{draft} {path} is a folder: give one image file", hint="e.g. {draft=a.png}")
    assert str(error) == "draft {path} is a folder: give one image file (e.g. draft=a.png)"
    assert error_line(error) == "--draft {path} is a folder: give one image file (e.g. --draft a.png)"


def test_renaming_a_field_error_renames_its_placeholders_in_the_message_and_the_hint() -> None:
    error = FieldError("steps", "{} must be at least 1", hint="{steps=100} is the default").renamed(
        {"steps": "train_steps"}
    )
    assert error.fields == ("train_steps",)
    assert error_line(error) == "--train-steps must be at least 1 (--train-steps 100 is the default)"


def test_a_prefixed_error_keeps_its_class_hint_and_settings() -> None:
    error = BadInputError("the subject has no phrase: set one with {add.phrase=WORDS}", fields=["add.phrase"])
    prefixed = error.prefixed("photo 3 of 'cat': ")
    assert type(prefixed) is BadInputError and prefixed.exit_code == error.exit_code
    assert str(prefixed) == "photo 3 of 'cat': the subject has no phrase: set one with phrase=WORDS"
    assert error_line(prefixed) == "photo 3 of 'cat': the subject has no phrase: set one with --phrase WORDS"


def test_a_hint_worded_before_the_error_keeps_its_settings() -> None:
    error = DiskFullError("/x", hint=worded("then `stencil train cat {train.resume}`", ("train.resume",)))
    assert str(error) == "disk full at /x (then `stencil train cat resume`)"
    assert error_line(error) == "disk full at /x (then `stencil train cat --resume`)"


def test_a_wording_is_plain_text_to_a_library_and_flags_in_a_cli_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = Wording("run `stencil caption cat {caption.force}` for a new one", ("caption.force",))
    assert text == "run `stencil caption cat force` for a new one" and isinstance(text, str)
    assert f"({text})" == "(run `stencil caption cat force` for a new one)"
    warn(text)
    assert " ".join(capsys.readouterr().err.split()) == (
        "warning: run `stencil caption cat --force` for a new one"
    )


# -- the messages through the commands ----------------------------------------------------------------------


def _line(result: Any) -> str:
    return " ".join(result.stderr.split())


def test_resuming_without_a_checkpoint_names_the_checkpoint_flag(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    result = cli("train", "robot", "--resume", "--subject-model", "tiny")
    assert result.exit_code == 1
    assert "(train with --checkpoint-every N to make a run resumable)" in _line(result)


def test_missing_photo_files_name_the_flag_of_stencil_rm(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    image = store.get_subject("robot").images[0]
    store.absolute(image["file"]).unlink()
    result = cli("caption", "robot", "--captioner", "template")
    assert result.exit_code == 1
    assert "or remove them with `stencil rm robot --image ID`)" in _line(result)


def test_the_template_captioner_without_a_phrase_names_the_phrase_flags(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path, phrase=None)
    result = cli("caption", "robot", "--captioner", "template")
    assert result.exit_code == 1
    assert "(pass --phrase 'cat' (or set it with `stencil add NAME --phrase ...`))" in _line(result)


def test_exporting_an_unfinished_subject_names_the_resume_flag(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    interrupted_run(store)
    result = cli("export", "robot", "-f", "lora", "-o", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 2
    assert "finish it with `stencil train robot --resume` or train again" in _line(result)


def test_bad_eval_models_read_as_the_field_and_show_as_the_flag() -> None:
    from stencil_cli.models import parse_eval_models

    with pytest.raises(BadInputError) as caught:
        parse_eval_models("a,b,c")
    assert str(caught.value).startswith("bad eval_models 'a,b,c': use 'tiny'")
    assert error_line(caught.value).startswith("bad --eval-models 'a,b,c': use 'tiny'")


def test_the_subject_page_names_the_masks_only_flag(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    result = cli("view", "robot", "--no-open")
    assert result.exit_code == 0, result.output
    page = Path(result.stdout.strip()).read_text(encoding="utf-8")
    assert "no mask pictures yet: stencil train robot --masks-only" in page


def test_a_loss_that_blows_up_names_the_learning_rate_and_precision_flags(
    cli: Any, tiny_preset: Path, tmp_path: Path
) -> None:
    add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    args = ("--subject-model", "tiny", "--steps", "3", "--batch-size", "1", "--lr", "1e30")
    result = cli("train", "robot", *args)
    assert result.exit_code == 1, result.output
    assert "; try a lower --lr or --precision fp32" in _line(result)
    from stencil_cli.store.db import open_store

    [run] = open_store().list_runs("robot")  # the store keeps field names, as a library reads them
    assert run.status == "failed" and "try a lower lr or precision=fp32" in str(run.error)
    assert "try a lower lr or precision=fp32" in json.loads(cli("runs", "robot", "--json").stdout)[0]["error"]
    runs = cli("runs", "robot")  # the CLI shows them as train's flags
    assert f"run {run.id} failed:" in runs.stderr and "try a lower --lr or --precision fp32" in runs.stderr
    shown = cli("show", "robot").stdout
    assert f"last run:    {run.id} failed:" in shown and "try a lower --lr or --precision fp32" in shown


def test_a_subject_model_of_another_kind_names_the_subject_model_flag(
    cli: Any, tiny_preset: Path, tmp_path: Path
) -> None:
    add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    result = cli("train", "robot", "--subject-model", str(tiny_preset / "context"), "--steps", "1")
    assert result.exit_code == 1, result.output
    wanted = (
        "(the subject model must be SD1.5- or SDXL-shaped, e.g. --subject-model sd15 or --subject-model sdxl)"
    )
    assert wanted in _line(result)


@pytest.mark.parametrize(("command", "module"), [("gen", "gen"), ("bench dreambench", "bench")])
def test_the_captioners_model_field_shows_as_the_caption_model_flag(command: str, module: str) -> None:
    import importlib

    flags = importlib.import_module(f"stencil_cli.cli.{module}").FLAGS
    error = StencilError("the vision model said no", hint="try another {model}", fields=("model",))
    assert error_line(error, flags).endswith("(try another --caption-model)")
    assert command_flag(typer.main.get_command(app), command, "caption_model") == "--caption-model"
