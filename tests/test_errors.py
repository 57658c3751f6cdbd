"""Errors that name settings by field (base.errors.FieldError) and how the CLI shows them: by flag."""

from __future__ import annotations

import pytest
import typer

from stencil_cli.base.errors import EXIT_USAGE, FieldError
from stencil_cli.cli.kit import fail, flag_name


def test_a_field_error_reads_with_its_field_names_and_renders_with_any_names() -> None:
    error = FieldError("steps", "must be at least 1 (got 0)")
    assert str(error) == "steps must be at least 1 (got 0)" and error.exit_code == EXIT_USAGE
    assert error.render({"steps": "--steps"}) == "--steps must be at least 1 (got 0)"
    placed = FieldError("phrase", "{0} must not be empty (e.g. {0} 'cat')")
    assert placed.render({"phrase": "--phrase"}) == "--phrase must not be empty (e.g. --phrase 'cat')"
    both = FieldError(("resume", "masks_only"), "{} do not go together")
    assert both.render({"resume": "--resume", "masks_only": "--masks-only"}) == (
        "--resume, --masks-only do not go together"
    )
    braces = FieldError("draft", "{} {a} is a folder")  # user text with braces is left alone
    assert braces.render({"draft": "--draft"}) == "--draft {a} is a folder"


def test_renamed_fields_keep_the_template_and_the_hint() -> None:
    error = FieldError("steps", "must be at least 1", hint="try 100").renamed({"steps": "train_steps"})
    assert error.fields == ("train_steps",) and str(error) == "train_steps must be at least 1 (try 100)"


def test_the_cli_shows_each_field_as_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert flag_name("batch_size") == "--batch-size"
    assert flag_name("use_mask", {"use_mask": "--no-mask"}) == "--no-mask"
    with pytest.raises(typer.Exit) as caught:
        fail(FieldError(("use_mask", "batch_size"), "{} cannot be used here", hint="see --help"),
             {"use_mask": "--no-mask"})  # fmt: skip
    assert caught.value.exit_code == EXIT_USAGE
    shown = " ".join(capsys.readouterr().err.split())
    assert shown == "error: --no-mask, --batch-size cannot be used here (see --help)"
