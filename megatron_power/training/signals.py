"""Stop requests: SLURM's warning before a time limit (SIGUSR1, sent by --signal), preemption or
scancel (SIGTERM) and Ctrl-C (SIGINT) ask the trainer for a checkpoint and a clean exit; a second
Ctrl-C exits at once.

Installed first thing in `megatron-power train`, before the seconds of imports, so that an early
signal cannot kill the process the default way."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopRequest:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)
        _stop_with_launcher()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                print("\nCtrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: exit now)",
                      file=sys.stderr, flush=True)
        self.requested = True


def _set_parent_death_signal(sig: signal.Signals) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _stop_with_launcher() -> None:
    """Under torchrun, a launcher killed with SIGKILL cannot stop its workers, which would train on
    with no parent: each asks the kernel for a SIGTERM (checkpoint, then exit) when its parent dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _set_parent_death_signal(signal.SIGTERM)
