"""Build the hidden-state cache for cached IISAN (authors' Code_Cached/preprocess_vectors.py).

Runs the frozen text and image encoders once over the items of the data set that training reads (those
left after the paper's protocol; `--all-items`: every row of the items file) and writes
`stored_vectors_*/text.safetensors` and `image.safetensors`: the layers the SANs read, as one array per
modality, in fp32 as the authors' (`--cache-dtype float16` halves it); with `--all-layers`, every layer,
so that one cache serves every layer ablation. It trains no run: it ends naming the cache it wrote. Run
again, it keeps a cache built with the same settings and encodes nothing (`--overwrite` builds it again).
`python preprocess_vectors.py --dataset Instrument`; `--help` lists the flags a cache depends on, those of
`iisan cache`. Every other training flag is taken too and changes nothing here, so a training command line
builds the cache its run reads.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from iisan.cli.data import CACHE_KEYS  # noqa: E402
from iisan.experiments.sweep import run_script  # noqa: E402


def extra_arguments(parser):
    parser.add_argument("--all-items", action="store_true", help="every row of the items file")
    parser.add_argument("--all-layers", action="store_true",
                        help="every hidden state of each encoder: one cache for any --text-layers / --image-layers")
    parser.add_argument("--overwrite", action="store_true", help="build the cache again, replacing what --cache-dir "
                        "holds (without it, a cache built with the same settings is kept, one built otherwise refused)")


def action(cfg, args):
    from iisan.model.caching import build_cache_from_config  # here: --help need not import torch

    return build_cache_from_config(cfg, all_items=args.all_items, all_layers=args.all_layers,
                                   overwrite=args.overwrite, reuse=not args.overwrite)


def made(cfg, paths) -> str:
    """What the build makes: the cache folder; once written, its items and each tower's file, as recorded."""
    if paths is None:
        return f"cache {cfg.cache_dir}"
    from iisan.data.cache import read_metadata  # here: --help need not import torch

    towers = {modality: read_metadata(path) for modality, path in paths.items()}
    items = len(json.loads(next(iter(towers.values()))["item_ids"]))
    return f"cache {cfg.cache_dir}: {items} items; " + "; ".join(
        f"{m}: {Path(meta['encoder']).name}, {len(json.loads(meta['layers']))} layers x {meta['width']} "
        f"({meta['dtype']})" for m, meta in towers.items())


if __name__ == "__main__":
    # one process builds the cache every rank reads
    run_script({"method": "iisan", "encode_batch_size": 512}, {}, description=__doc__, action=action,
               extra_arguments=extra_arguments, parallel=False, made=made, listed=CACHE_KEYS)
