"""What a captioner gets and gives: the photos to caption, and a validated answer (one caption per photo)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Photo:
    """One photo to caption: its store id and its file."""

    id: int
    path: Path


@dataclass(frozen=True)
class CaptionJob:
    """What a captioner gets: the subject's phrase (None if the user gave none) and the photos to caption."""

    photos: Sequence[Photo]
    phrase: str | None = None
    class_word: str | None = None


@dataclass
class CaptionResult:
    """A complete, validated answer: one caption per requested photo, each containing `phrase`."""

    phrase: str
    captions: dict[int, str]
    source: str
    description: str | None = None
    repaired: list[int] = field(default_factory=list)  # photo ids whose caption got the phrase inserted
    notes: list[str] = field(default_factory=list)  # what was retried or repaired, for the user


class Captioner(Protocol):
    """Anything that turns a CaptionJob into a CaptionResult (or raises StencilError)."""

    name: str

    def caption(self, request: CaptionJob) -> CaptionResult:
        """Caption every photo of `request`."""
        ...
