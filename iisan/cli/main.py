"""``iisan``: data-stats, build-lmdb, make-tiny-models, cache, fetch, import-cache, train, params, results, demo,
evaluate, recommend, export.

Every training and caching flag is a ``Config`` field (``iisan train --help`` lists them). Bad input
ends with one line on stderr (``iisan: error: ...``) and exit status 2; Ctrl-C during training saves a
checkpoint, says how to resume and exits 130 (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..console import VERBOSE_HELP, entry_point, setup_logging, summary
from ..errors import ConfigError
from ..flags import FlagParser
from ..once import in_a_launch
from ..streams import printable_streams
from .data import add_data_commands
from .fetch import add_fetch_commands
from .runs import add_run_commands
from .use import add_use_commands


class Parser(FlagParser):
    """``FlagParser``, ending a bad flag like every other bad input: the (sub)command's usage, then
    ``iisan: error: ...``. Every (sub)command takes ``-v``: ``iisan -v train ...`` and ``iisan train ... -v``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser, not given -v, leaves the value the command line's start set
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"iisan: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iisan", description=summary(__doc__))
    parser.add_argument("--version", action="version", version=f"iisan {__version__}")
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_data_commands(sub)
    add_fetch_commands(sub)
    add_run_commands(sub)
    add_use_commands(sub)
    return parser


# The commands torchrun may start: training is data-parallel; every other command runs whole in each process
# (a cache build's ranks would lock each other out, evaluate would print its table once per rank).
UNDER_TORCHRUN = ("train",)
# What a Ctrl-C leaves, for the commands that neither train nor build a cache (console.INTERRUPTED's words)
READ_ONLY = "interrupted; nothing was written"
INTERRUPTED = {
    "build-lmdb": "interrupted; no store was written (it is written whole or not at all): run the same command "
                  "again to build it from the start",
    "export": "interrupted; nothing is left half-written (each file is written whole or not at all): run the same "
              "command again",
    "fetch": "interrupted; nothing is left half-written: a download goes on from what it fetched when the same "
             "command runs again",
    "import-cache": "interrupted; no cache file was written (each is written whole or not at all): run the same "
                    "command again to import the states",
    "results": "interrupted; nothing is left half-written (a table or figure is written whole or not at all)",
    **dict.fromkeys(("evaluate", "recommend", "params", "data-stats"), READ_ONLY),
}


def main(argv: list[str] | None = None) -> None:
    printable_streams()  # (--help included)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    entry_point("iisan", lambda: run(args), **({"interrupted": INTERRUPTED[args.command]}
                                                if args.command in INTERRUPTED else {}))


def run(args: argparse.Namespace):
    if in_a_launch() and args.command not in UNDER_TORCHRUN:  # (torch-free: iisan results imports no torch)
        raise ConfigError(f"iisan {args.command} runs in one process: start it without torchrun (only iisan train "
                          "and the entry scripts are data-parallel; RANK and WORLD_SIZE in the environment say a "
                          "launch)")
    return args.func(args)


if __name__ == "__main__":
    main()
