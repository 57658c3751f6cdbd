"""Training previews: plain generations with the weights as they are, rendered into the run's folder.

`stencil train NAME --sample-every N --sample-prompt TEXT` renders each prompt (through the prompt rules, so
"on a beach" becomes "a PHRASE on a beach") at one fixed seed every N steps and after the last step, into
``<run dir>/samples/step-000050-p0.png``. The images change only because the weights do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stencil_cli.base.errors import FieldError
from stencil_cli.base.events import Progress, Step, no_progress
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.pngmeta import png_bytes
from stencil_cli.core.prompts import build_prompts
from stencil_cli.store.layout import sample_path

DEFAULT_SAMPLE_STEPS = 20
MAX_SAMPLE_STEPS = 1000
PARAM_KEYS = ("sample_every", "sample_prompts", "sample_steps")  # how a run's params record them


@dataclass(frozen=True)
class SampleSettings:
    """What to preview: the prompts as the user wrote them, how often, with how many DDIM steps, one seed.

    `every` 0 renders only after the last step.
    """

    prompts: tuple[str, ...]
    every: int = 0
    steps: int = DEFAULT_SAMPLE_STEPS
    seed: int = 0

    def to_params(self) -> dict[str, Any]:
        """The settings as run params (a resumed run keeps them)."""
        return {"sample_every": self.every, "sample_prompts": list(self.prompts), "sample_steps": self.steps}


def sample_settings(
    every: int | None,
    prompts: list[str] | tuple[str, ...] | None,
    steps: int | None,
    seed: int,
    stored: dict[str, Any] | None = None,
) -> SampleSettings | None:
    """Settle and check the preview options (None: no previews); `stored` are a resumed run's params.

    A value given wins over the stored one. Raises FieldError for values that cannot work.
    """
    stored = stored or {}
    if every is None:
        every = stored.get("sample_every")
    if not prompts:
        prompts = stored.get("sample_prompts") or []
    if steps is None:
        steps = stored.get("sample_steps")
    if every is None and not prompts and steps is None:
        return None
    if every is not None and (isinstance(every, bool) or int(every) < 1):
        raise FieldError("sample_every", f"must be at least 1 step (got {every})")
    if not prompts:
        raise FieldError(
            ("sample_every" if every is not None else "sample_steps", "sample_prompts"),
            "{0} needs at least one {1} to render",
        )
    if any(not str(prompt).strip() for prompt in prompts):
        raise FieldError("sample_prompts", "must not be empty")
    steps = DEFAULT_SAMPLE_STEPS if steps is None else steps
    if isinstance(steps, bool) or not 1 <= int(steps) <= MAX_SAMPLE_STEPS:
        raise FieldError("sample_steps", f"must be in [1, {MAX_SAMPLE_STEPS}] (got {steps})")
    return SampleSettings(tuple(str(p) for p in prompts), int(every or 0), int(steps), int(seed))


def subject_prompts(prompts: tuple[str, ...], phrase: str | None) -> list[str]:
    """The prompts through the prompt rules ("on a beach" -> "a PHRASE on a beach"); as written without a
    phrase."""
    if not (phrase or "").strip():
        return [" ".join(prompt.split()) for prompt in prompts]
    return [build_prompts(prompt, phrase or "").prompt for prompt in prompts]


@dataclass
class Previewer:
    """Renders the previews of one run with a pipeline's VAE, text encoder and tokenizer and a given UNet.

    `pipe` must hold its own scheduler (`make_previewer` gives it a copy): rendering sets timesteps.
    """

    pipe: Any
    settings: SampleSettings
    prompts: list[str]  # after the prompt rules
    run_dir: Path
    meta: dict[str, Any]  # written into every PNG beside prompt, step and seed
    progress: Progress = no_progress
    total: int | None = None  # images to render in the whole run (for the progress hook), if known
    rendered: int = 0
    last_step: int = -1

    def __call__(self, step: int, unet: Any) -> list[Path]:
        """Render every prompt with `unet` at `step`; write the PNGs atomically; return their paths."""
        import torch

        from stencil_cli.core.generation import GenerationSettings, plain_generate

        if self.pipe.unet is not unet:
            self.pipe.unet = unet
        settings = GenerationSettings(steps=self.settings.steps)
        written: list[Path] = []
        total = self.total or self.rendered + len(self.prompts)
        self.progress(Step("samples", self.rendered, total, at=step))
        for index, prompt in enumerate(self.prompts):
            with torch.inference_mode():
                image = plain_generate(self.pipe, prompt, self.settings.seed, settings)
            meta = {
                **self.meta,
                "prompt": prompt,
                "user_prompt": self.settings.prompts[index],
                "step": step,
                "seed": self.settings.seed,
                "sample_steps": self.settings.steps,
                "mode": "preview",
            }
            path = sample_path(self.run_dir, step, index)
            atomic_write_bytes(path, png_bytes(image, meta))
            written.append(path)
            self.rendered += 1
            self.progress(Step("samples", self.rendered, total, at=step))
        self.last_step = step
        return written


def preview_steps(settings: SampleSettings, start: int, steps: int) -> list[int]:
    """The steps after `start` (a resumed run's checkpoint) up to `steps` at which previews are rendered."""
    every = [step for step in range(start + 1, steps + 1) if settings.every and step % settings.every == 0]
    return every if every and every[-1] == steps else [*every, steps]


def make_previewer(
    pipe: Any,
    settings: SampleSettings,
    phrase: str | None,
    run_dir: Path,
    meta: dict[str, Any],
    *,
    total: int | None = None,
    progress: Progress = no_progress,
) -> Previewer:
    """A previewer over `pipe` (its VAE, text encoder, tokenizer and UNet).

    `pipe.scheduler` is replaced by a copy: the caller keeps the original for the training loop, and the
    copy's timesteps are set for rendering.
    """
    pipe.scheduler = copy.deepcopy(pipe.scheduler)
    prompts = subject_prompts(settings.prompts, phrase)
    return Previewer(pipe, settings, prompts, run_dir, meta, progress=progress, total=total)
