"""The ``iisan`` command: ``main.py`` assembles the subcommands that ``data.py`` (data sets, images,
caches, tiny models), ``fetch.py`` (downloads, imported caches), ``runs.py`` (training, parameter
counts, result tables, the demo) and ``use.py`` (evaluating, recommending from and exporting a trained
run) define. ``launch`` is the installed command's entry point."""

import sys


def launch() -> None:
    """``iisan``: import the command (torch and transformers, some seconds) and run it; a Ctrl-C during
    the imports ends in one line and exit status 130, like one anywhere else."""
    try:
        from .main import main  # here, so that a Ctrl-C during the imports is caught
    except KeyboardInterrupt:
        print("iisan: interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
    main()
