"""Stop requests: SLURM's warning before a time limit (SIGUSR1, sent by --signal) and
preemption or scancel (SIGTERM) ask the trainer for a checkpoint and a clean exit.

Installed first thing in `megatron-power train`, before the seconds of imports, so that an early
signal cannot kill the process the default way."""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
