"""The ``iisan`` command: ``main.py`` assembles the subcommands that ``data.py`` (data sets, images,
caches, tiny models), ``fetch.py`` (downloads, imported caches), ``runs.py`` (training, parameter
counts, result tables, the demo) and ``use.py`` (evaluating, recommending from and exporting a trained
run) define."""
