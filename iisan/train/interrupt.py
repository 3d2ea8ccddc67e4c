"""Ctrl-C (SIGINT) and the stop signals (``errors.STOP_SIGNALS``: SIGTERM, a preempted job; SIGUSR1, a
scheduler's notice that time runs out; SIGHUP, a closed terminal) become a request the training loop honours
at a clean point: after the current step (under torchrun, the ranks agree every ``STOP_POLL_STEPS`` steps; a request
during an epoch's last step lets the epoch and its evaluation finish) it saves a checkpoint and stops with
``RunInterrupted``. While the run sets up (its data, encoders, the checkpoint it resumes from) there is no
step to finish: a signal stops at once, as in every other command.

Single process: a second Ctrl-C stops at once (KeyboardInterrupt) for when saving itself hangs. Under
torchrun the launcher forwards the signal it received to every worker, so a worker may see two
signals for one Ctrl-C; there the second is ignored (torchrun kills the workers after its shutdown
timeout anyway). Images are read by threads, which signals never reach: only the main thread handles them.
A signal ignored when the run starts (a script's background job, ``trap '' INT``) stays ignored.

An epoch's evaluation has no step to finish, and takes minutes over a large catalogue or with a live feed
(longer than a scheduler waits between SIGTERM and SIGKILL): in a single process a first signal there stops
it at once (``StopRequests.raising``), and the run saves its epoch's steps, from which a resume evaluates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from ..errors import STOP_SIGNALS, Terminated


class EvaluationStopped(BaseException):
    """Raised by the handler inside ``StopRequests.raising``: a BaseException, so that no ``except Exception``
    on the way takes it for a failure."""


class StopRequests:
    """Context manager installing the handlers; ``signal`` holds the name of the first signal received."""

    SIGNALS = (signal.SIGINT, *(getattr(signal, name) for name in STOP_SIGNALS))

    def __init__(self, escalate: bool = True, armed: bool = True):
        self.escalate = escalate
        self.armed = armed  # False while a run sets up: a signal then stops at once (there is nothing to save)
        self.signal: str | None = None
        self._previous: dict = {}
        self._raise: type[BaseException] | None = None  # inside ``raising``: what a first signal raises

    @contextlib.contextmanager
    def raising(self, error: type[BaseException]):
        """Inside the block, a first signal raises ``error`` where the main thread is, instead of a request that
        waits for the end of a step (work that is redone after, as an evaluation is)."""
        self._raise = error
        try:
            yield
        finally:
            self._raise = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name  # the message is what train.log and results.json say of the ending
        if not self.armed:
            said = f"{name} while the run set up, before its first step"
            raise KeyboardInterrupt(said) if signum == signal.SIGINT else Terminated(said, signal=name)
        if self.signal is not None:
            if self.escalate and signum == signal.SIGINT:
                raise KeyboardInterrupt(f"a second SIGINT after {self.signal}: stopped at once, without saving a "
                                        "checkpoint (the same command resumes from the newest one)")
            return
        self.signal = name
        # os.write, not logging: a handler may run while the logging lock is held. On a terminal, below the
        # bar and the ^C it echoed; in a log, no blank line. A stderr gone (a closed terminal's SIGHUP; a `| tee`
        # the same SIGTERM ended first) loses the line, never the step: an error here would surface mid-step.
        below = "\n" if os.isatty(2) else ""
        again = self.escalate and signum == signal.SIGINT  # (a batch job's later signals are ignored)
        doing = "stopping the evaluation" if self._raise else "finishing the current step"
        with contextlib.suppress(OSError):
            os.write(2, f"{below}{self.signal} received: {doing}, then saving a checkpoint"
                        f"{' (Ctrl-C again stops at once, without saving)' if again else ''}\n".encode())
        if self._raise is not None:
            raise self._raise(name)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default action
            # (stop the process) is closer to it than leaving this one, which nothing reads any more.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
