"""Measuring speed and memory: the efficiency benchmark of the paper's table (``benchmark``: every method
in a fresh process; ``bench``: the trainer's exact step timed after a warm-up, evaluation and the cache
build; ``flops``; ``rows``: the methods of its table and what a row holds, without torch; ``figures``: its
tables and figures, from JSONs ``report_checks`` reads and checks, with the notes under a table from
``report_notes``), the GPU diagnosis (``diagnose``, ``diagnose_steps``, ``plain_reference``: a plain
implementation to hold iisan's step against), their tool ``timing`` (each measurement in a fresh process:
``iisan.isolate``), and ``options``: what the measuring scripts are asked, without torch, for their --help."""
