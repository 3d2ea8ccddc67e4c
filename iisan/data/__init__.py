"""Data: the users and items files and the paper's protocol (``interactions``, ``csv_files``; decoding
and item-id checks: ``textfile``), images in an LMDB (``images``; building it: ``image_build``, and what
from: ``image_inputs``), training and encoding batches (``batches``), an epoch's order of users (``epochs``)
and the static shapes of live steps (``shapes``), the hidden-state cache, its building and the import of the
authors' stored states (``cache``, ``cache_build``, ``cache_import``), a run's data read from its config
(``run_data``), the paper's data sets (``datasets``) and fetching them (``sources``, ``download``,
``manifest``, ``fetch``), and synthetic data for tests and benchmarks (``synthetic``)."""
