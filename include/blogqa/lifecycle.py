"""Process lifetime: a worker process must not outlive the process that started it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (SIGKILL included).

    A task process whose supervisor or Celery worker was killed would otherwise go on as an
    orphan working on leased rows (and burning a core) that another worker takes over.
    Elsewhere than Linux this does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)


def main(argv: list[str]) -> None:
    """`python -m blogqa.lifecycle PARENT_PID COMMAND [ARGS...]`: run COMMAND bound to the
    process that started this one (the death signal survives exec); SIGTERM when it dies."""
    parent, command = int(argv[0]), argv[1:]
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        raise SystemExit(0)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
