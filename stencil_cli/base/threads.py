"""How many CPU threads torch uses: a sensible default, and the user's choice (a leaf module).

PyTorch's default is one thread per core the machine has, each spinning while it waits for the others
(OpenMP's active wait). On a machine whose cores are busy with other work that is ruinous: a spinning thread
holds a core that the thread it waits for needs (docs/performance.md: tiny `gen --steps 10` took several
times longer with two threads than with one on a loaded 2-core machine). The default here therefore:

* counts the cores this process may run on (its CPU affinity, which containers and `taskset` restrict),
  not the machine's;
* leaves out the cores other processes are keeping busy (the 1-minute load average, read once at start);
* caps the result (`MAX_DEFAULT_THREADS`): beyond that, diffusion models on a CPU gain little;
* asks OpenMP to wait passively (`OMP_WAIT_POLICY=PASSIVE`) unless the user set a policy, so that threads
  that do wait give their core back. This only works before torch is imported (OpenMP reads it once).

Nothing here imports torch: the CLI can call `configure_threads` in its root callback, before any command
imports torch, and `import stencil_cli.cli` stays fast.
"""

from __future__ import annotations

import math
import os
import sys

MAX_DEFAULT_THREADS = 8
ENV_VAR = "STENCIL_THREADS"  # the CLI's environment variable for `--threads` (resolved by the CLI layer)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else all of the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """How many cores other processes keep busy: the 1-minute load average (0 where there is none)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def default_threads(cores: int | None = None, busy: float | None = None) -> int:
    """The default thread count: the available cores not kept busy by others, at least 1, at most
    `MAX_DEFAULT_THREADS`."""
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = cores - math.ceil(busy - 0.5) if busy > 0 else cores  # a load of 0.4 is an idle machine
    return max(1, min(MAX_DEFAULT_THREADS, free))


def configure_threads(requested: int | None = None) -> int:
    """Use `requested` CPU threads (a positive number), or `default_threads()` when None; returns the count.

    An explicit OMP_NUM_THREADS in the environment counts as the user's choice when nothing is requested.
    Never imports torch (safe in a torch-free CLI callback): before torch is imported it sets
    OMP_NUM_THREADS (torch starts with that many threads) and, unless the user chose one, the passive OpenMP
    wait policy (read once, when torch loads OpenMP; inherited by worker processes); once torch is imported
    it calls ``torch.set_num_threads``. Raises ValueError for a number below 1.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"threads must be at least 1 (got {requested})")
    if requested is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
        requested = int(from_env) if from_env.isdigit() and int(from_env) > 0 else default_threads()
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ["OMP_NUM_THREADS"] = str(requested)
    else:
        torch.set_num_threads(requested)
    return requested
