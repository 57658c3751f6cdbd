"""What the store hands out: typed records (Subject, Run, Generation, AddResult) and the rules for values.

A record is a row with its JSON columns decoded and its file paths absolute; `to_dict` is its JSON view
(`--json` output). Subject names are checked here once, because a name becomes a folder name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli.base.errors import BadInputError

if TYPE_CHECKING:
    from stencil_cli.base.images import PreparedImage

# used with fullmatch (a trailing newline must not pass); no leading '-': it would read as an option
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RUN_STATUSES = ("running", "done", "failed", "interrupted")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid subject name, else raise BadInputError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadInputError(
            f"invalid subject name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit (e.g. 'my-cat')"
        )
    return name


def now() -> str:
    """The current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dumps(value: Any) -> str:
    """JSON for a TEXT column."""
    return json.dumps(value, default=str)


@dataclass
class Subject:
    """A named subject and its photos."""

    id: int
    name: str
    phrase: str | None
    class_word: str | None
    description: str | None
    created: str
    images: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the subject."""
        return {
            "id": self.id,
            "name": self.name,
            "phrase": self.phrase,
            "class_word": self.class_word,
            "description": self.description,
            "created": self.created,
            "images": self.images,
        }


@dataclass
class Run:
    """One training run of a subject (its row, with JSON columns decoded and the weights path absolute)."""

    id: int
    subject_id: int
    status: str  # running | done | failed | interrupted
    params: dict[str, Any]
    base_model: str | None
    losses: list[float]
    step: int
    started: str
    finished: str | None = None
    duration_s: float | None = None
    weights_file: Path | None = None
    error: str | None = None
    damaged: tuple[str, ...] = ()  # JSON columns that could not be read (shown empty): "params", "losses"

    @property
    def final_loss(self) -> float | None:
        """The last recorded training loss, if any."""
        return self.losses[-1] if self.losses else None

    @property
    def kind(self) -> str:
        """What the run trains: ``lora`` (LoRA adapters) or ``full`` (the decoder itself, the paper)."""
        return "lora" if self.params.get("lora_rank") else "full"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run."""
        data = dataclasses.asdict(self)
        data["weights_file"] = str(self.weights_file) if self.weights_file else None
        data["kind"] = self.kind
        data["damaged"] = list(self.damaged)
        return data


@dataclass
class Generation:
    """One generated image (its row, with JSON columns decoded and file paths absolute)."""

    id: int
    subject_id: int
    run_id: int | None
    prompt: str | None
    draft_prompt: str | None
    seed: int | None
    tau: float | None
    params: dict[str, Any]
    image_file: Path | None
    draft_file: Path | None
    scores: dict[str, Any] | None
    created: str
    damaged: tuple[str, ...] = ()  # JSON columns that could not be read (shown empty): "params", "scores"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the generation."""
        data = dataclasses.asdict(self)
        for key in ("image_file", "draft_file"):
            data[key] = str(data[key]) if data[key] else None
        data["damaged"] = list(self.damaged)
        return data


@dataclass
class AddResult:
    """What `add_images` did."""

    subject: Subject
    created_subject: bool
    added: list[dict[str, Any]]
    duplicates: list[PreparedImage]
    # known photos whose file had gone missing and was written again
    restored: list[dict[str, Any]] = field(default_factory=list)


def decode_json_column(text: str | None, default: Any, expected: type) -> tuple[Any, bool]:
    """A JSON column's value (`default` when empty), and whether it was readable: damaged JSON, or JSON of
    another type than `expected`, gives `default` and False (one damaged row never hides the others)."""
    if not text:
        return default, True
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return default, False
    if not isinstance(value, expected):
        return default, False
    return value, True
