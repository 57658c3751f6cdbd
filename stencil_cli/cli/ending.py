"""The end of a `stencil` process: after an ML command, skip the interpreter's teardown, safely.

Tearing down an interpreter that imported torch, diffusers and transformers takes seconds on a CPU (tens of
thousands of module objects and torch's operator registrations are destroyed one by one; 14% of a tiny
`stencil gen`, profiled) and does nothing a finished command needs. So once a command that loaded torch has
returned, `end_process` closes every store's database connection, flushes logging, stdout and stderr, and
ends the process with `os._exit` and the command's exit code. OS file locks are released by the kernel when
the process ends. Commands that never imported torch, and processes that are part of a distributed run, end
the ordinary way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


def exit_status(code: object) -> int:
    """The status `sys.exit(code)` would end the process with (printing a message code as it would)."""
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _distributed() -> bool:
    """Whether this process belongs to an initialised torch.distributed group (it must shut down in order)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def end_process(code: object) -> None:
    """After an ML command: close the stores, flush everything and `os._exit(status)`; otherwise return."""
    if "torch" not in sys.modules or _distributed():
        return
    from stencil_cli.store.db import close_open_stores

    try:
        close_open_stores()
    except Exception as error:  # noqa: BLE001 - a store that cannot close: say so, end the ordinary way
        print(f"error: {error}", file=sys.stderr)
        return
    status = exit_status(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said on it
            stream.flush()
    os._exit(status)
