"""The Ctrl-C guard: a first Ctrl-C stops a run after the current step, with a checkpoint.

A second Ctrl-C stops it at once (every file is written atomically, so nothing is left
half-written). A process whose parent ignores SIGINT (a job started with ``nohup``, or with
``&`` from a script) keeps ignoring it, as Python itself does: a Ctrl-C meant for the terminal's
foreground job does not stop it; stop it with ``kill`` (SIGTERM) and resume it from its last
end-of-epoch checkpoint.
"""

from __future__ import annotations

import signal
import threading

from . import distributed


class CtrlCGuard:
    """A context manager that turns SIGINT into a stop request, and gives back the handler that
    was there before, whatever it was.

    Under torchrun every rank stops after the same step (the training step shares the request),
    and further SIGINTs are expected (torchrun forwards the terminal's), so they do not cut the
    checkpoint short; torchrun kills the workers if they take longer than its grace period (30 s).

    Example:
        >>> guard = CtrlCGuard()
        >>> with guard:
        ...     guard.stop_requested
        False
    """

    def __init__(self):
        self.stop_requested = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> "CtrlCGuard":
        self.stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:
            return self  # the parent asked this process to ignore Ctrl-C: so do we
        self._previous, self._installed = previous, True
        signal.signal(signal.SIGINT, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        if not distributed.is_distributed():  # the second Ctrl-C stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)


class RunInterrupted(Exception):
    """The run was stopped by Ctrl-C (SIGINT) after saving a checkpoint it can resume from.

    Example:
        >>> str(RunInterrupted(2, 3, 17, saved=True))
        'interrupted at generation 2, epoch 3, step 17; a checkpoint was saved'
    """

    def __init__(self, generation: int, epoch: int, step: int, saved: bool):
        self.generation, self.epoch, self.step, self.saved = generation, epoch, step, saved
        super().__init__(f"interrupted at generation {generation}, epoch {epoch}, step {step}; "
                         + ("a checkpoint was saved" if saved else "nothing was saved (no run directory)"))
