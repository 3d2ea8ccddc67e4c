"""Data: the users and items files and the paper's protocol (``interactions``, ``microlens``), images in
an LMDB (``images``), training and encoding batches (``batches``), the hidden-state cache and its
building (``cache``, ``cache_build``), and synthetic data for tests and benchmarks (``synthetic``)."""
