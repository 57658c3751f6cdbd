"""How the command line shows the settings that messages mention (`base.errors`): as the flags that set them.

Below the CLI, messages name settings by field (`{lr}`, `{precision=fp32}`, `{rm.image=ID}`); here each
becomes its flag: through the command's own map of fields to flags where a flag is not `--field-name`
(`stencil gen`'s `count` is `-n`), and another command's setting through that command's declared options
(`stencil rm`'s `--image`).
"""

from __future__ import annotations

from collections.abc import Mapping

from typer import _click as click  # typer vendors Click: its commands and contexts are these classes
from typer.core import TyperOption

from stencil_cli.base.errors import Mention, ShowMention, render_text


def flag_name(field: str, flags: Mapping[str, str] | None = None) -> str:
    """The command-line flag that sets `field`: `flags[field]`, else `--field-name`."""
    if flags and field in flags:
        return flags[field]
    return "--" + field.replace("_", "-")


def command_flag(root: click.Command, command: str, field: str) -> str | None:
    """The flag of the parameter `field` of `command` ("rm", "models pull") under `root`; None when that
    command or option does not exist."""
    target: click.Command | None = root
    for word in command.split():
        target = getattr(target, "commands", {}).get(word)
    if target is None:
        return None
    for param in target.params:
        if param.name == field and isinstance(param, TyperOption):
            long = [opt for opt in param.opts if opt.startswith("--")]
            return (long or param.opts)[0]
    return None


def _root_command() -> click.Command | None:
    context = click.globals.get_current_context(silent=True)
    return context.find_root().command if context is not None else None


def show_as_flag(flags: Mapping[str, str] | None = None) -> ShowMention:
    """Show each mention as its flag (with the value the message suggests: `--precision fp32`): a setting of
    the command at hand through `flags` (else `--field-name`), another command's through its own options."""

    def show(mention: Mention) -> str:
        name = None
        if mention.command is not None:
            root = _root_command()
            name = command_flag(root, mention.command, mention.field) if root is not None else None
        if name is None:
            name = flag_name(mention.field, None if mention.command else flags)
        return name if mention.value is None else f"{name} {mention.value}"

    return show


TRAIN_FLAGS = {  # flags unlike --field-name
    "train": "--train",
    "use_mask": "--no-mask",
    "lora_rank": "--lora",
    "sample_prompts": "--sample-prompt",
}


def run_error(error: str | None) -> str:
    """A failed run's stored error as the CLI words it: the settings it mentions as `stencil train`'s flags
    (the store keeps them as fields: "try a lower {lr}" reads "try a lower --lr" here)."""
    return render_text(error or "", show_as_flag(TRAIN_FLAGS))
