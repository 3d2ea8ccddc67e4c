"""IISAN: decoupled parameter-efficient adaptation of multimodal foundation models for sequential
recommendation (SIGIR 2024), and IISAN-Versa (TKDE).

The package follows the pipeline, each layer importing only from those before it: a base of small
modules (``errors``, ``bounds``, ``spelling``, ``methods``, ``metric_names``, ``config``, ``precedence``, ``flags``,
``files``, ``tensorfiles``, ``digests``, ``claims``, ``locks``, ``devices``, ``memory``, ``once``, ``provenance``,
``streams``, ``system_errors``, ``console``, ``logfiles``, ``distributed``, ``isolate``: a measurement in a fresh
process),
then ``data`` -> ``model`` -> ``evaluate`` -> ``train`` -> ``experiments`` and ``efficiency`` (the benchmark
and the GPU diagnosis; neither imports the other) -> ``cli``.
"""

import os

if os.name == "nt":  # the resource module, fcntl locks, POSIX signals, fsync of folders
    raise SystemExit("iisan: runs on Linux and macOS, not on Windows itself: run it under WSL 2 (Windows Subsystem "
                     "for Linux)")

__version__ = "0.1.0"
