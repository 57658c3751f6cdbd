"""Options shared by the ML commands, and how their values are settled.

Precedence: flag > environment variable (Typer's envvar) > `stencil config set` > default.
"""

from __future__ import annotations

from typing import Annotated

import typer

from stencil_cli.store import Store

DEFAULTS: dict[str, str] = {
    "subject_model": "sd15",
    "context_model": "sd3-medium",
    "device": "auto",
    "precision": "auto",
}

SubjectModelOption = Annotated[
    str | None,
    typer.Option(
        "--subject-model",
        envvar="STENCIL_SUBJECT_MODEL",
        help="Subject model: preset (sd15, tiny), Hub id or local folder. Default: sd15.",
        show_default=False,
    ),
]
ContextModelOption = Annotated[
    str | None,
    typer.Option(
        "--context-model",
        envvar="STENCIL_CONTEXT_MODEL",
        help="Draft model: preset (sd3-medium, tiny), Hub id or local folder. Default: sd3-medium.",
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
    typer.Option("--no-t5", envvar="STENCIL_NO_T5", help="Run SD3 without its T5 encoder (less GPU memory)."),
]


def setting(store: Store, key: str, flag_value: str | None) -> str:
    """Settle one setting: the flag/env value if given, else stored config, else the default."""
    if flag_value:
        return flag_value
    stored = store.get_config(key)
    return stored if stored else DEFAULTS[key]
