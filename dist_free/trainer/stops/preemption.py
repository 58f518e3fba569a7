"""Stop signals: a preempted or interrupted job saves and leaves instead of dying mid-write."""

import signal


class Preemption:
    """SIGTERM (Slurm/Kubernetes preemption, torchrun shutting down) or SIGINT (Ctrl-C) asks for
    a clean stop: the loop saves and leaves at its next check, instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name
