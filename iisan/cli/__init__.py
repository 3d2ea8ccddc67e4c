"""The ``iisan`` command: ``main.py`` assembles the subcommands that ``data.py`` (data sets, images,
caches, tiny models), ``fetch.py`` (downloads, imported caches) and ``runs.py`` (training, parameter counts, result
tables, the demo) define."""
