"""`stencil gen` with several prompts (stdin, --prompts-file), JSON Lines as images finish, --negative."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_generation import FAST, _photo, trained  # noqa: F401 - `trained` is a fixture

from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.core import generation
from stencil_cli.store.db import open_store


def lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line as one JSON object (fails on anything that is not JSON Lines)."""
    return [json.loads(line) for line in stdout.splitlines()]


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_prompts_from_stdin_give_one_json_line_per_image(cli: Any, trained: str) -> None:  # noqa: F811
    text = "# my prompts\non the moon\n\n  in a garden  \n"
    result = cli("gen", trained, "-", "--seed", "4", "-n", "2", "--no-context", "--json", *FAST, input=text)
    assert result.exit_code == 0, result.output
    records = lines(result.stdout)
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a toy robot on the moon", 4),
        ("a toy robot on the moon", 5),
        ("a toy robot in a garden", 4),
        ("a toy robot in a garden", 5),
    ]
    names = [Path(r["image_file"]).name for r in records]
    assert names == ["p0-s4.png", "p0-s5.png", "p1-s4.png", "p1-s5.png"]
    assert all(Path(r["image_file"]).is_file() for r in records)
    assert len(open_store().list_generations(trained)) == 4


def test_a_prompts_file_skips_comments_and_blank_lines(cli: Any, trained: str, tmp_path: Path) -> None:  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("on a boat\n# not this one\n\nin the snow\n", encoding="utf-8")
    result = cli("gen", trained, "--prompts-file", prompts, "--seed", "1", "--no-context", *FAST)
    assert result.exit_code == 0, result.output
    rows = open_store().list_generations(trained)
    assert [row.prompt for row in rows] == ["a toy robot on a boat", "a toy robot in the snow"]
    assert result.stdout.split() == [str(row.image_file) for row in rows]


def test_json_lines_come_out_as_each_image_is_saved(
    cli: Any,
    trained: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped at the second image: the first one's line was already printed."""
    real = generation.plain_generate
    calls: list[int] = []

    def stop_at_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "plain_generate", stop_at_second)
    result = cli("gen", trained, "on the moon", "-n", "3", "--seed", "2", "--no-context", "--json", *FAST)
    assert result.exit_code == 130
    (record,) = lines(result.stdout)
    assert record["seed"] == 2 and Path(record["image_file"]).is_file()


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["-"], "# only a comment\n\n", "the prompt '-' (stdin) holds no prompt"),
        (["--prompts-file", "missing.txt"], None, "--prompts-file missing.txt: no such file"),
        (["on the moon", "--prompts-file", "p.txt"], None, "not both"),
        ([], None, "say what to render"),
        (["--prompts-file", "empty.txt"], None, "--prompts-file holds no prompt"),
        (["--prompts-file", "."], None, "--prompts-file . is a folder"),
    ],
)
def test_bad_prompt_sources_are_one_line_and_exit_2(
    cli: Any,
    trained: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    stdin: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("on a boat\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    result = cli("gen", trained, *args, "--no-context", *FAST, input=stdin)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert open_store().list_generations(trained) == []


def test_negative_prompt_is_recorded_and_steers_the_plain_denoise(cli: Any, trained: str) -> None:  # noqa: F811
    base = ["gen", trained, "on a boat", "--seed", "3", "--no-context", "--json", *FAST]
    (plain,) = lines(cli(*base).stdout)
    (steered,) = lines(cli(*base, "--negative", "blurry, [low] quality").stdout)
    params = read_png_parameters(Path(steered["image_file"]))
    assert params["negative_prompt"] == "blurry, [low] quality"
    assert steered["params"]["negative_prompt"] == "blurry, [low] quality"
    assert read_png_parameters(Path(plain["image_file"])).get("negative_prompt") is None
    assert not np.array_equal(pixels(plain["image_file"]), pixels(steered["image_file"]))


def test_the_null_embeddings_replace_the_negative_while_injected(
    cli: Any,
    trained: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Every step injected (tau 1000): the negative changes nothing; none injected (tau 0): it does."""
    photo = _photo(tmp_path / "me.png", (200, 40, 40))
    base = ["gen", trained, "on a boat", "--draft", photo, "--tau", "0,1000", "--json", *FAST]
    without = {r["tau"]: r for r in lines(cli(*base).stdout)}
    steered = {r["tau"]: r for r in lines(cli(*base, "--negative", "blurry").stdout)}
    assert np.array_equal(pixels(without[1000.0]["image_file"]), pixels(steered[1000.0]["image_file"]))
    assert not np.array_equal(pixels(without[0.0]["image_file"]), pixels(steered[0.0]["image_file"]))


def test_the_draft_gets_the_negative_prompt(cli: Any, trained: str) -> None:  # noqa: F811
    base = ["gen", trained, "on a boat", "--seed", "5", "--tau", "0", "--json", *FAST]
    (without,) = lines(cli(*base).stdout)
    (steered,) = lines(cli(*base, "--negative", "blurry").stdout)
    assert read_png_parameters(Path(steered["draft_file"]))["negative_prompt"] == "blurry"
    assert not np.array_equal(pixels(without["draft_file"]), pixels(steered["draft_file"]))
