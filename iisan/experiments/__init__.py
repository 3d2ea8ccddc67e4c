"""Experiments on top of training: the paper's settings (``presets``), grids of runs (``sweep``; ``grid``: its
points, summary and time left), tables of finished runs (``report``, ``report_rows``, ``labels``,
``results_file``, ``curves``), parameter counts (``params``), real-data runs (``realdata``, ``offline``,
``seed_table``), the demo (``demo``), the Versa entry script's grid points (``versa_run``) and its GPU check
(``versa_check``), fetching encoders (``encoders``), one-command reproductions (``reproduce``), and using a
trained run (``trained``: evaluate, recommend; ``exports``: embeddings), how the host-side stages grow
with the data (``scaling``), and which commit changed a seeded run's numbers (``commits``). Speed and memory
of training are measured in ``iisan.efficiency``."""
