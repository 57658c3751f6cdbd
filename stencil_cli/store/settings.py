"""Settings that fall back to the stored config: flag > environment variable > `stencil config set` > default.

The command line gives a value when the user typed a flag or set its `STENCIL_*` variable (Typer reads both);
otherwise the stored config decides, and then the defaults below. Verbs settle each setting once, here.
"""

from __future__ import annotations

from stencil_cli.store.db import Store

DEFAULTS: dict[str, str] = {
    "subject_model": "sd15",
    "context_model": "sd3-medium",
    "device": "auto",
    "precision": "auto",
}


def resolve_setting(store: Store, key: str, given: str | None) -> str:
    """Settle one setting: the given (flag/env) value, else the stored config, else the default."""
    if given:
        return given
    stored = store.get_config(key)
    return stored if stored else DEFAULTS[key]
