"""Build the hidden-state cache for cached IISAN (authors' Code_Cached/preprocess_vectors.py).

Runs the frozen text and image encoders once over every item of the data set and writes
`stored_vectors_*/text.safetensors` and `image.safetensors`: the layers the SANs read, as one array per
modality, in fp32 as the authors' (`--cache-dtype float16` halves it); with `--all-layers`, every layer,
so that one cache serves every layer ablation.
`python preprocess_vectors.py --dataset Instrument`, `--help` for all flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from iisan.experiments.sweep import run_script  # noqa: E402


def extra_arguments(parser):
    parser.add_argument("--all-items", action="store_true", help="every row of the items file")
    parser.add_argument("--all-layers", action="store_true",
                        help="every hidden state of each encoder: one cache for any --text-layers / --image-layers")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")


def action(cfg, args):
    from iisan.model.caching import build_cache_from_config  # here: --help need not import torch

    return build_cache_from_config(cfg, all_items=args.all_items, all_layers=args.all_layers,
                                   overwrite=args.overwrite)


if __name__ == "__main__":
    run_script({"method": "iisan", "encode_batch_size": 512}, {}, description=__doc__, action=action,
               extra_arguments=extra_arguments, parallel=False)  # one process builds the cache every rank reads
