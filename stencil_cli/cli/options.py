"""Options shared by the ML commands (settled by `store.settings`: flag > env > config > default)."""

from __future__ import annotations

from typing import Annotated

import typer

SubjectModelOption = Annotated[
    str | None,
    typer.Option(
        "--subject-model",
        envvar="STENCIL_SUBJECT_MODEL",
        help="Subject model: preset (sd15, sdxl, tiny, tiny-sdxl), Hub id or local folder. Default: sd15.",
        show_default=False,
    ),
]
ContextModelOption = Annotated[
    str | None,
    typer.Option(
        "--context-model",
        envvar="STENCIL_CONTEXT_MODEL",
        help="Draft model: preset (sd3-medium, sd35-medium, sd35-large-turbo, flux-schnell, tiny, tiny-sd35, "
        "tiny-flux), Hub id or local folder. Default: sd3-medium.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        envvar="STENCIL_DEVICE",
        help="auto | cpu | cuda | cuda:N | mps. Default: auto.",
        show_default=False,
    ),
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        envvar="STENCIL_PRECISION",
        help="auto | fp32 | fp16 | bf16. Default: auto.",
        show_default=False,
    ),
]
NoT5Option = Annotated[
    bool,
    typer.Option(
        "--no-t5",
        envvar="STENCIL_NO_T5",
        help="Run an SD3 / SD3.5 draft model without its T5 encoder (less GPU memory); FLUX needs its T5.",
    ),
]

EvalModelsOption = Annotated[
    str | None,
    typer.Option(
        "--eval-models",
        envvar="STENCIL_EVAL_MODELS",
        help="DINO and CLIP models: 'DINO_REF,CLIP_REF', 'dino=REF,clip=REF' or 'tiny' (random, offline). "
        "[default: facebook/dino-vits16,openai/clip-vit-base-patch32]",
        show_default=False,
    ),
]
