"""What every entry point shares: logging set-up, progress that reaches the log where no bar can be
shown, and how a run ends for the user (one line on stderr and exit status 2 for bad input, 130 with
the resume command after Ctrl-C, 143 after SIGTERM), and how a metric reads (``fixed``). The ``iisan`` command,
the entry scripts under ``Code_*`` and the tools under ``scripts/`` all go through ``entry_point``.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

from .errors import STOP_SIGNALS, USER_ERRORS, RunInterrupted, Terminated, ignore_stops, in_the_way, interrupt_status
from .files import disk_failure
from .metric_names import HEADLINE, label
from .once import other_rank
from .streams import bar_disable, closed_streams_to_null, printable_streams, stdout_closed
from .system_errors import (
    environment_problem,
    host_memory_error,
    no_thread,
    out_of_memory,
    peer_lost,
    working_folder_gone,
)

if TYPE_CHECKING:  # (tqdm: 40 ms of every command's start, --help's included, for the commands that show no bar)
    from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)
# The console's line format; a run's train.log uses the same, so its lines are the console's.
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
VERBOSE_HELP = "debug logging, and the traceback of an unexpected operating-system error"


def fixed(value: float, places: int = 4) -> str:
    """How every metric reads (epoch lines, summaries, tables): ``places`` decimals, halves rounded up as
    by hand, after float noise is dropped. HR@10 = 19/160 prints 0.1188, and a mean of 0.03875 prints
    0.0388 whatever order its seeds were summed in (format() printed such means 0.0387 or 0.0388, from
    floats 1e-17 apart on either side of the half, and 19/160 as 0.1187)."""
    if not math.isfinite(value):
        return f"{value:.{places}f}"
    exact = Decimal(repr(round(float(value), 12)))
    digits = Context(prec=max(28, exact.adjusted() + places + 2))  # 1e24 to 4 places is 29 digits: past the default
    return str(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP, context=digits))


def metrics_text(metrics: dict) -> str:
    """``hit@10 0.1563 ndcg@10 0.0709``: a split's metrics as the epoch and summary lines show them."""
    return " ".join(f"{k} {fixed(metrics[k])}" for k in HEADLINE)


def labelled_metrics(metrics: dict) -> str:
    """``HR@10 0.0715  NDCG@10 0.0437``: a split's metrics as the scripts' closing lines show them."""
    return "  ".join(f"{label(k)} {fixed(metrics[k])}" for k in HEADLINE)


NOISY = ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "matplotlib", "PIL")  # at WARNING


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if other_rank():
        level = logging.WARNING  # under torchrun, rank 0 speaks for all; other ranks report only trouble
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    if verbose:  # also when logging was set up before the flags were read (the entry scripts)
        logging.getLogger().setLevel(level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub gives its logger a handler of its own and also passes each record on to ours: its
    # warnings (each retry of a request) came out twice. Once, in this format. (Imported for its handler.)
    from huggingface_hub.utils import logging as hub_logging
    hub = hub_logging.get_logger()
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class ProgressLog:
    """Where long work stands, as log lines: at most one every ``every`` seconds of ``clock``
    (``advance``) and one at the end (``finish``). ``done``: units a resumed job found done; they count
    in the position, not in the speed and time left, which are measured over what this process does.
    ``status(done)``, if given, adds its text to each line (a training epoch's mean loss so far)."""

    def __init__(self, what: str, total: int, done: int = 0, *, unit: str = "items", every: float = 30.0,
                 clock: Callable[[], float] | None = None, status: Callable[[int], str] | None = None):
        self.what, self.total, self.done, self.unit, self.every = what, total, done, unit, every
        self.clock, self.status = clock or time.monotonic, status
        self.counted = 0
        self.start = self.last = self.clock()

    def pause(self, seconds: float) -> None:
        """``seconds`` just spent on other work (``Bar.pause``): out of the speed and the time left and taken."""
        self.start += seconds

    def advance(self, n: int = 1) -> None:
        self.done, self.counted = self.done + n, self.counted + n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def finish(self) -> None:
        if self.counted:  # nothing done here: a resumed job that found everything done says so itself
            log.info("%s", self.line(self.clock()))

    def line(self, now: float) -> str:
        position = self.position(now)
        return f"{position}, {self.status(self.done)}" if self.status is not None and self.done else position

    def position(self, now: float) -> str:
        seconds = now - self.start
        head = f"{self.what}: {self.done:,} of {self.total:,} {self.unit} ({100 * self.done // max(self.total, 1)} %)"
        if seconds <= 0:
            return head
        rate = self.counted / seconds
        if rate <= 0:
            return head
        if rate >= 0.01:
            speed = f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s"
        else:  # slow work (over 100 s a unit) in seconds per unit: '0.00 steps/s' would say nothing
            speed = f"{duration(1 / rate)}/{singular(self.unit)}"
        if self.done >= self.total:
            return f"{head}, {speed}, {self.counted:,} {self.unit} in {duration(seconds)}"
        return f"{head}, {speed}, about {duration((self.total - self.done) / rate)} left"


def singular(unit: str) -> str:
    """'steps' -> 'step': a unit as a rate names it per one ('1.50s/step', '3 min/item')."""
    return unit[:-1] if unit.endswith("s") and len(unit) > 1 else unit


STATUS_EVERY = 10.0  # seconds between two readings of a bar's status (reading a loss waits for the GPU)


def progress_bar(iterable: Iterable[T], total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 enabled: bool = True, clock: Callable[[], float] | None = None,
                 size: Callable[[T], int] | None = None, status: Callable[[int], str] | None = None,
                 closing: bool = False) -> Bar[T]:
    """``iterable`` with a tqdm bar on a terminal; where tqdm shows none (stderr is a batch job's log), a
    ``ProgressLog`` line at most every 30 seconds instead. Nothing when not ``enabled``. Each element counts
    ``size(element)`` units (default 1): a chunk of items moves the bar by its items, one update per chunk.
    ``unit`` is the plural the log lines count in ('steps'); tqdm shows it only in a rate, in the singular.
    ``status(done)``: a text shown after the rate (units done so far, ``initial`` included), read at most
    every ``STATUS_EVERY`` seconds on a bar and once per log line. ``closing``: the log lines end with one at
    100 %, with the time taken (work that no line of its own ends, as a training epoch's does)."""
    from tqdm import tqdm  # (when a bar is made: not at every command's start; see the top)

    bar = tqdm(iterable if size is None else None, total=total, initial=initial, desc=desc, unit=singular(unit),
               leave=False, disable=bar_disable(enabled))
    lines = (ProgressLog(desc, total, initial, unit=unit, clock=clock, status=status)
             if enabled and bar.disable else None)
    if size is not None:
        return Bar(_sized(iterable, bar, lines, size, closing), bar, lines)
    if lines is not None:
        return Bar(_logged(bar, lines, closing), bar, lines)
    return Bar(bar if status is None or bar.disable else _with_status(bar, status, initial, clock or time.monotonic),
               bar, None)


class Bar(Iterator[T], Generic[T]):
    """What ``progress_bar`` returns: its elements (``close``: no more), shown on ``bar`` (tqdm) or as ``lines``."""

    def __init__(self, items: Iterable[T], bar: tqdm, lines: ProgressLog | None):
        self.items, self.bar, self.lines = iter(items), bar, lines

    def __next__(self) -> T:
        return next(self.items)

    def close(self) -> None:
        if hasattr(self.items, "close"):  # a generator: its ``with bar`` ends, or tqdm's own iteration
            self.items.close()
        self.bar.close()

    def pause(self, seconds: float) -> None:
        """``seconds`` the caller has just spent on other work between two elements (a mid-epoch checkpoint's
        write), left out of the speed, the time left and the time taken shown, as the epoch's training seconds
        leave it out. tqdm's own way (``unpause``: its clock set back by the time since its last print) would
        also drop the elements taken since that print, a whole step when steps are slow; so by ``seconds``."""
        if not self.bar.disable:
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds
        if self.lines is not None:
            self.lines.pause(seconds)


def _logged(bar: Iterable[T], lines: ProgressLog, closing: bool) -> Iterator[T]:
    for item in bar:
        yield item
        lines.advance()
    if closing:
        lines.finish()


def _with_status(bar: tqdm, status: Callable[[int], str], done: int, clock: Callable[[], float]) -> Iterator[T]:
    last = clock()
    with bar:
        for item in bar:
            yield item
            done += 1
            if (now := clock()) - last >= STATUS_EVERY:
                last = now
                bar.set_postfix_str(status(done), refresh=False)


def _sized(iterable: Iterable[T], bar: tqdm, lines: ProgressLog | None, size: Callable[[T], int],
           closing: bool) -> Iterator[T]:
    with bar:
        for item in iterable:
            n = size(item)
            yield item
            bar.update(n)
            if lines is not None:
                lines.advance(n)
    if lines is not None and closing:
        lines.finish()


def exit_interrupted(prog: str, err: BaseException | str, signal_name: str = "SIGINT") -> NoReturn:
    """Ctrl-C or a stop signal: say how to resume (once, under torchrun) and exit 130, 143 or the signal's status. A
    stderr gone (a closed terminal's SIGHUP, a `| tee` the same SIGTERM ended first) loses the line, not the
    status, which a scheduler reads."""
    atexit.register(ignore_stops)  # (registered last, it runs first: before torch's own exit hooks)
    if not other_rank():
        try:
            print(f"{prog}: {err}", file=sys.stderr)
        except OSError:  # and no second failure when Python flushes it at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    sys.exit(interrupt_status(signal_name))


def fail(prog: str, err: BaseException | str) -> NoReturn:
    """A user error: ``prog: error: <one line>`` on stderr, exit status 2."""
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line, without reST's double backticks: a script's
    ``--help`` description ('' under ``python -OO``, which drops docstrings)."""
    return " ".join((doc or "").split("\n\n")[0].split()).replace("``", "")


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """A stop signal (``errors.STOP_SIGNALS``: SIGTERM, a preempted job; SIGUSR1; SIGHUP) raises ``Terminated``,
    a KeyboardInterrupt as Ctrl-C raises, so that a command says what is kept and exits with the signal's status
    (143 for SIGTERM) instead of dying without a word. As safe as Ctrl-C: every output is written to a temporary
    and renamed. Training has its own handler inside (``train.interrupt``): it stops at a clean point to save a
    checkpoint. A signal ignored when the command starts (``trap '' TERM``, ``nohup``'s SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = [getattr(signal, name) for name in STOP_SIGNALS]
    previous = {sig: signal.signal(sig, _terminated) for sig in stops if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(sig, handler)


def _terminated(signum, frame) -> NoReturn:
    raise Terminated(signal=signal.Signals(signum).name)


INTERRUPTED = ("interrupted; nothing is left half-written (every output is written whole or not at all): a training "
               "run resumes from its last checkpoint and a cache build from its finished chunks when the same command "
               "runs again")


def entry_point(prog: str, run: Callable[[], T], interrupted: str = INTERRUPTED) -> T:
    """``run()``, with user errors and interruptions turned into the one-line endings above. An
    ``OSError`` about a named file (a permission the OS refused, a file that vanished while read) is a
    user's error too: one line naming the file, the traceback only with ``--verbose``; so is a full disk
    under standard output. ``prog`` is named as argparse names it (``run_IISAN.py``, not the path it was
    started by); ``interrupted``: what a Ctrl-C outside a training loop says (what the command leaves)."""
    prog = os.path.basename(prog)
    closed_streams_to_null(prog)
    printable_streams()
    if gone := working_folder_gone():  # (before torch is imported: its import would end in a fatal error)
        fail(prog, gone)
    try:
        with sigterm_as_ctrl_c():
            return run()
    except USER_ERRORS as err:
        fail(prog, err)
    except RunInterrupted as err:
        exit_interrupted(prog, err, err.signal)
    except KeyboardInterrupt as err:  # outside a training loop (loading, a cache build), or a second Ctrl-C there
        logging.getLogger(__name__).debug("interrupted at", exc_info=True)
        exit_interrupted(prog, interrupted, err.signal if isinstance(err, Terminated) else "SIGINT")
    except RuntimeError as err:  # torch's CPU allocator says it is out of memory as a plain RuntimeError
        if not (line := host_memory_error(err) or peer_lost(err) or no_thread(err)):
            raise
        fail(prog, line)
    except ValueError as err:  # matplotlib's import, under an MPLBACKEND it has no backend for
        if not (line := environment_problem(err)):
            raise
        fail(prog, line)
    except MemoryError:  # Python's own allocations (or a handler of torch's error) ran out
        logging.getLogger(__name__).debug("the error in full", exc_info=True)
        fail(prog, out_of_memory())
    except BrokenPipeError:
        if not stdout_closed():
            raise
        # The reader of the output went away (`iisan recommend ... | head`): stop quietly, as Unix tools do,
        # with their status (128 + SIGPIPE); stdout is pointed at /dev/null, or Python's exit would try again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as err:
        if err.filename is None and disk_failure(err):  # (standard output on a full disk, say)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit would try again
            fail(prog, f"could not write the output: {err.strerror}")
        if err.filename is None and (err.strerror or "").startswith("No usable temporary directory"):  # tempfile's
            fail(prog, "no writable temporary folder (TMPDIR, /tmp, /var/tmp, the working folder): set TMPDIR to "
                       "one this user may write")
        if line := environment_problem(err):  # (a cache folder an environment variable names, say)
            fail(prog, line)
        if err.filename is None:
            raise
        logging.getLogger(__name__).debug("the error in full", exc_info=True)
        fail(prog, f"{err.filename}: {in_the_way(err.filename, err) or err.strerror or err}")
