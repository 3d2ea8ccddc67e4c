"""The ``iisan`` command: ``main`` assembles the subcommands that ``data`` (data sets, images, caches,
tiny models), ``fetch`` (downloads, imported caches), ``runs`` (training, parameter counts, result
tables, the demo) and ``use`` (evaluating, recommending from and exporting a trained run) define.
``launch`` is the installed command's entry point.

Each command imports what it runs when it runs (torch and transformers take seconds): defining the
commands imports neither, so ``--help`` and a bad flag answer at once."""

import sys


def launch() -> None:
    """``iisan``: import the command and run it; a Ctrl-C even during that import ends in one line and exit
    status 130, like one anywhere else (each command imports torch and transformers when it runs, inside
    ``console.entry_point``, which ends a Ctrl-C there)."""
    try:
        from .main import main  # here, so that a Ctrl-C during the imports is caught
    except KeyboardInterrupt:
        print("iisan: interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
    main()
