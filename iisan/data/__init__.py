"""Data: the users and items files and the paper's protocol (``interactions``, ``microlens``), images in
an LMDB (``images``), training and encoding batches (``batches``), the hidden-state cache, its
building and the import of the authors' released states (``cache``, ``cache_build``, ``cache_import``),
fetching the paper's data sets (``sources``, ``download``, ``manifest``, ``fetch``), and synthetic data
for tests and benchmarks (``synthetic``)."""
