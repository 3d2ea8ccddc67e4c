"""What every entry point shares: logging set-up and how a run ends for the user (one line on stderr
and exit status 2 for bad input, 130 with the resume command after Ctrl-C). The ``iisan`` command,
the entry scripts under ``Code_*`` and the tools under ``scripts/`` all go through ``entry_point``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from .errors import USER_ERRORS, RunInterrupted

T = TypeVar("T")
# The console's line format; a run's train.log uses the same, so its lines are the console's.
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING  # under torchrun, rank 0 speaks for all; other ranks report only trouble
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_interrupted(prog: str, err: BaseException | str) -> None:
    """Ctrl-C: say how to resume (once, under torchrun) and exit 130."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {err}", file=sys.stderr)
    sys.exit(130)


def fail(prog: str, err: BaseException) -> None:
    """A user error: ``prog: error: <one line>`` on stderr, exit status 2."""
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def summary(doc: str) -> str:
    """A module docstring's first paragraph on one line, without reST's double backticks: a script's
    ``--help`` description."""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


def entry_point(prog: str, run: Callable[[], T]) -> T:
    """``run()``, with user errors and interruptions turned into the one-line endings above. An
    ``OSError`` about a named file (a permission the OS refused, a file that vanished while read) is a
    user's error too: one line naming the file, the traceback only with ``--verbose``. ``prog`` is named as
    argparse names it (``run_IISAN.py``, not the path it was started by)."""
    prog = os.path.basename(prog)
    try:
        return run()
    except USER_ERRORS as err:
        fail(prog, err)
    except RunInterrupted as err:
        exit_interrupted(prog, err)
    except KeyboardInterrupt:  # outside a training loop (loading, a cache build), or a second Ctrl-C there
        logging.getLogger(__name__).debug("interrupted at", exc_info=True)
        exit_interrupted(prog, "interrupted; what was finished is kept: a run resumes from its last checkpoint "
                               "and a cache build from its finished chunks when the same command runs again")
    except OSError as err:
        if err.filename is None:
            raise
        logging.getLogger(__name__).debug("the error in full", exc_info=True)
        fail(prog, f"{err.filename}: {err.strerror or err}")
