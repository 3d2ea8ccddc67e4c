"""The command-line face of ``Config``: every field is a flag (``--key``), so the ``iisan`` command, the
entry scripts and the benchmark scripts share one definition, and ``--config FILE`` reads a JSON file of
keys. What wins over what is ``config.resolve``'s one rule.
"""

from __future__ import annotations

import argparse
import dataclasses

from .config import METHOD_DEFAULTS, Config, resolve


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                         multi: set[str] | None = None, only: tuple[str, ...] | None = None) -> None:
    """Add ``--key`` for every Config field (or the fields in ``only``, without ``--config``). Keys in
    ``multi`` accept several values (sweeps). ``defaults``: what the help shows as a key's default (a
    script's SWEEP list or own default); without one, a key the methods set shows each method's value.
    Flags left out keep no value, so a flag never given never overrides anything."""
    defaults = defaults or {}
    multi = multi or set()
    if only is None:
        parser.add_argument("--config", default=None, help="JSON file of config keys (CLI flags win)")
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = defaults[f.name] if f.name in defaults else _default_by_method(f.name, f.default)
        help_text = f"{f.metadata['help']} (default: {shown})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in multi:
            kwargs["nargs"] = "+"
        elif f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        if f.metadata.get("choices") and f.name not in multi:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def _default_by_method(key: str, default) -> str:
    """``64`` for a key no method sets, else e.g. ``iisan 64; fft, adapter, lora, bitfit 32``."""
    if not any(key in values for values in METHOD_DEFAULTS.values()):
        return str(default)
    by_value: dict[str, list[str]] = {}
    for method, values in METHOD_DEFAULTS.items():
        by_value.setdefault(str(values.get(key, default)), []).append(method)
    return "; ".join(f"{', '.join(methods)} {value}" for value, methods in by_value.items())


def args_layers(args: argparse.Namespace) -> tuple[dict, dict]:
    """The ``--config`` file's values and the flags given on the command line, as two dicts."""
    file_values = Config.from_file(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(Config)}
    return file_values, {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, defaults: dict | None = None) -> Config:
    """``resolve`` of the flags in ``args``, its ``--config`` file and ``defaults``."""
    file_values, flags = args_layers(args)
    return resolve(defaults, file_values, flags)
