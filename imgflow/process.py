"""Child processes of a command (`imgflow run`, `imgflow replay`): none may outlive it."""

from __future__ import annotations

import ctypes
import os
import signal


def own_session_dying_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: in the child before exec, its own session
    (a Ctrl-C in the terminal reaches the parent only, which stops the children in order),
    and SIGTERM when the parent dies (even by SIGKILL: PR_SET_PDEATHSIG)."""
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
