"""Cached IISAN-Versa: any text encoder with any image encoder (authors' Code_Cached_Asym/script/).

Pick an encoder pair with --preset (VERSA_PRESETS in iisan/experiments/presets.py, as data); every Config
key is also a flag and wins over the preset (`--text-model pretrained_models/Qwen2.5-7B --text-pooling
last`; another text model than the preset's drops its layer list and pooling for the layer rule's and the
family's). With --build-cache the frozen encoders first run once over the items when the cache is missing
(resumable after an interruption; a job array's tasks sharing one cache wait for the one that builds it;
`--cache-dtype`: fp32 for BERT/ViT towers as the authors', an LLM's own
half type on a GPU); each pair caches into its own folder (`Code_Cached/stored_vectors_sci_<preset>`, or
`..._<text model folder>` for another text model, then `_<image model folder>` for another image model than
ViT-B/16), and the symmetric pair reads IISAN's cache. The
presets follow the authors' Code_Cached_Asym scripts (their layer lists, their LLM pooling, their
MicroLens heads); every difference is a flag.

  python run_IISAN_Versa.py --preset llama3-8b+vit-base --build-cache
  python run_IISAN_Versa.py --preset bert-base+vit-base          # symmetric: exactly cached IISAN
  python run_IISAN_Versa.py --preset microlens --build-cache     # MicroLens-100k: the preset's data set
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout without installing

from iisan.console import entry_point  # noqa: E402
from iisan.errors import ConfigError  # noqa: E402
from iisan.experiments import presets  # noqa: E402
from iisan.experiments.presets import LAYER_CHOICE, VERSA_DEFAULT_PRESET, VERSA_PRESETS, versa_defaults  # noqa: E402
from iisan.experiments.sweep import run_script, script_parser  # noqa: E402
from iisan.flags import args_layers  # noqa: E402

SWEEP = {
    "seed": [12345],
}


def defaults_for(argv: list[str] | None) -> dict:
    """The defaults the preset and data set pick, read from the command line by this script's own flags: another
    encoder than the preset's, or a key of LAYER_CHOICE given (as a flag, in the --config file or in SWEEP),
    changes them."""
    args = script_parser({}, SWEEP, extra_arguments=extra_arguments, add_help=False).parse_known_args(argv)[0]
    file_values, flags = args_layers(args)
    given = {**SWEEP, **file_values, **flags}  # (a flag wins, as in every run)
    return versa_defaults(args.preset, args.dataset, given.get("text_model"), given.get("image_model"),
                          by_rule=any(k in given for k in LAYER_CHOICE))


def extra_arguments(parser):
    parser.several_values = ("add its key to this script's SWEEP list to run several (not --text-model nor "
                             "--image-model: run the script once per encoder)")
    parser.add_argument("--preset", default=VERSA_DEFAULT_PRESET, choices=sorted(VERSA_PRESETS),
                        help="encoder pair and settings (VERSA_PRESETS in iisan/experiments/presets.py); "
                             "microlens is MicroLens-100k's set-up and sets its --dataset "
                             f"(default: {VERSA_DEFAULT_PRESET})")
    parser.add_argument("--build-cache", action="store_true", help="build the cache first when it is missing")


def action(cfg, args):
    from iisan.experiments.versa_run import train_cached  # here: --help need not import torch

    return train_cached(cfg, build_cache=args.build_cache)


def main(argv: list[str] | None = None) -> list:
    if swept := sorted({"text_model", "image_model"} & set(SWEEP)):  # the defaults above are one pair's
        entry_point(Path(__file__).name, lambda: refuse_swept_encoders(swept[0]))
    argv = entry_point(Path(__file__).name, lambda: with_presets_dataset(sys.argv[1:] if argv is None else argv))
    return run_script(defaults_for, SWEEP, argv, description=__doc__, action=action,
                      extra_arguments=extra_arguments)


def with_presets_dataset(argv: list[str]) -> list[str]:
    """``argv`` with the data set of a preset that is one data set's set-up (microlens: MicroLens) when it gives
    no --dataset; another data set is refused (the preset's batch, bottleneck and epochs are for that one)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--preset", default=VERSA_DEFAULT_PRESET)
    parser.add_argument("--dataset")
    try:
        args = parser.parse_known_args(argv)[0]
    except argparse.ArgumentError:  # (a flag without its value: the script's own parser says so)
        return list(argv)
    own = presets.VERSA_PRESET_DATASETS.get(args.preset)
    if own is None or args.dataset == own:
        return list(argv)
    if args.dataset is None:
        return [*argv, "--dataset", own]
    settings = ", ".join(f"{k}={v}" for k, v in VERSA_PRESETS[args.preset].items())
    raise ConfigError(f"--preset {args.preset} is the authors' set-up for {own} ({settings}); --dataset "
                      f"{args.dataset}: leave --dataset out, or give such settings as flags with another preset")


def refuse_swept_encoders(key: str) -> None:
    raise ConfigError(f"SWEEP lists {key}: each encoder pair takes its own layers, pooling and cache folder (the "
                      f"preset's, or the layer rule's and its family's), chosen once per launch; run this script once "
                      f"per --{key.replace('_', '-')}, or add a preset to VERSA_PRESETS")


if __name__ == "__main__":
    main()
