"""Experiments on top of training: the paper's settings (``presets``), grids of runs (``sweep``), tables
of finished runs (``report``), parameter counts (``params``), the efficiency benchmark (``bench``,
``efficiency``, ``figures``, ``flops``), the GPU diagnosis (``diagnose``, ``diagnose_steps``,
``plain_reference``, ``timing``), real-data runs (``realdata``, ``offline``, ``seed_table``), the demo and
the Versa GPU check,
fetching encoders (``encoders``), one-command reproductions (``reproduce``), and using a trained run
(``trained``: evaluate, recommend, export)."""
