"""Progress events: what a long operation reports while it runs, as small typed values.

The ML core and the verbs call a progress hook (`Progress`) with these events; the commands dispatch on
the event's type (``match event: case events.Step(): ...``) to draw bars and print messages. Every layer
may import this module: it imports nothing of the project. A verb whose event carries one of its own
records defines that event beside the record (a subclass of `Event`, e.g. `verbs.train.MaskPictures`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

# the stages that report steps: the drafts, DDIM inversion, null-text optimisation and the denoise of a
# generation; the mask pass (or the plain encoding of the photos), the training steps and the previews
Stage = Literal["draft", "inversion", "null-text", "denoise", "encoding", "masks", "train", "samples"]


class Event:
    """What every progress event is (the hook's argument type)."""

    __slots__ = ()


Progress = Callable[[Event], None]


def no_progress(event: Event) -> None:
    """The default progress hook: report nothing."""


# -- steps ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step(Event):
    """`step` of `total` steps of `stage` are done (`step` 0: the stage begins).

    A batched step stands for `samples` seeds' steps. Training steps carry their `loss`; a finished null-text
    step carries its `inner` iterations (all samples together) and the largest last loss of its samples;
    previews carry the training step (`at`) they show.
    """

    stage: Stage
    step: int
    total: int | None
    samples: int = 1
    loss: float | None = None
    inner: int | None = None
    at: int | None = None


@dataclass(frozen=True)
class NullTextIteration(Event):
    """One inner iteration (`inner`, 1-based) of null-text step `step` of `total`, still under way; `loss` is
    the largest loss of the batch's samples."""

    stage: ClassVar[Stage] = "null-text"

    step: int
    total: int
    inner: int
    loss: float
    samples: int = 1


@dataclass(frozen=True)
class Working(Event):
    """`stage` began as one long step: it reports only its end, ``Step(stage, 1, 1)``."""

    stage: Stage


@dataclass(frozen=True)
class Reused(Event):
    """`steps` steps of `stage` need no work (a draft kept from an earlier attempt): count them as done."""

    stage: Stage
    steps: int


# -- what is going on -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loading(Event):
    """A model is about to load (`model`: its reference, or references) onto `device`."""

    model: str
    device: str


@dataclass(frozen=True)
class Captioning(Event):
    """A captioner is asked about `photos` photos (`host`: the server of a remote vision model)."""

    photos: int
    captioner: str
    host: str | None = None


@dataclass(frozen=True)
class Captioned(Event):
    """The captioner answered for `photos` photos."""

    photos: int


@dataclass(frozen=True)
class Exporting(Event):
    """The export in `format` begins (one long step)."""

    format: str


@dataclass(frozen=True)
class Heading(Event):
    """Step `number` of `total` of a longer flow begins (the demo's add, caption, train, gen)."""

    number: int
    total: int
    title: str


@dataclass(frozen=True)
class Removed(Event):
    """The half-made subject `subject` was removed after a failure."""

    subject: str


# -- messages ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note(Event):
    """Something to tell the user once (plain text, not markup)."""

    text: str


@dataclass(frozen=True)
class Warning(Event):  # the builtin's name: import the module and write `events.Warning`
    """Something the user may not expect (plain text, not markup)."""

    text: str
