"""The command line: parse flags, call one verb, present the result. The only layer that prints.

`app` (in `stencil_cli.cli.app`) is the `stencil` command; each command group has its own module here.
"""

from stencil_cli.cli.app import app

__all__ = ["app"]
