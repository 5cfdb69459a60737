"""Stopping cleanly: SIGTERM (schedulers, `kill`, torchrun) and Ctrl-C ask the loop to stop.

The handler only sets a flag; the loop checks it between optimisation steps (all ranks agree
through one all-reduce), writes last.pt and returns normally, so a preempted run resumes with
`resume=auto`. A second Ctrl-C interrupts at once, for when saving itself hangs.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequest:
    """Installs the handlers on creation (main thread only), restores the old ones on close()."""

    def __init__(self) -> None:
        self.signum: int | None = None
        sigs = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in sigs}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.signum = signum
        log.warning("%s received: saving last.pt and stopping after this step (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
