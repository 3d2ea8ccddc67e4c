"""The model: the encoder families it can use (``families``), frozen backbones and their per-layer states
(``backbones``, ``inputs``, ``patches``; their folders checked and the digest of their weights: ``encoder_files``;
loading them: ``encoder_loading``; which states a SAN reads: ``layer_rules``), the two feeds of those states
(``feeds``: live or cached), the side adapter network (``san``), the SASRec user encoder (``sasrec``), the
in-batch loss (``loss``), what every item encoder provides (``item_encoder``), the recommender around them
(``recommender``), the baselines' PEFT methods (``peft_methods``, ``baselines``; one tower's settings:
``tower_settings``), the ID baseline's item table (``id_embedding``), and the one place that builds all of it from
a config (``build``; building and importing caches from a config: ``caching``). Tiny random checkpoints (tests,
the demo, ``iisan make-tiny-models``, ``iisan params``' base architectures): ``tiny``."""

import sys

if sys.flags.optimize > 1:  # transformers reads its output classes' docstrings as it defines them
    raise SystemExit("iisan: python -OO (or PYTHONOPTIMIZE=2) drops the docstrings transformers defines its models "
                     "from; run without it (-O works)")
