"""Experiments on top of training: the paper's settings (``presets``), grids of runs (``sweep``), tables
of finished runs (``report``, ``labels``, ``results_file``, ``curves``), parameter counts (``params``),
real-data runs (``realdata``, ``offline``, ``seed_table``), the demo and the Versa GPU check, fetching
encoders (``encoders``), one-command reproductions (``reproduce``), and using a trained run (``trained``:
evaluate, recommend, export). Speed and memory are measured in ``iisan.efficiency``."""
