"""The command-line face of ``Config``: every field is a flag (``--key``), so the ``iisan`` command, the
entry scripts and the benchmark scripts share one definition, and ``--config FILE`` reads a JSON file of
keys. What wins over what is ``precedence.resolve``'s one rule. ``FlagParser`` takes flags only spelled out
and answers one it does not know with the flag meant (``--epoch``: did you mean ``--epochs``?).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import sys

from .bounds import path_arg
from .config import Config
from .methods import METHOD_DEFAULTS
from .precedence import read_config_file, resolve
from .spelling import ALIASES, own_spelling

# A field's help may say its default in words, as its last clause: "...; default: --layer-rule's choice",
# "... (default: method, feed, ...)". A default the caller gives replaces that clause, never follows it.
DEFAULT_IN_WORDS = re.compile(r"(?:;\s*|\s*\()default: [^()]*\)?$")


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                         multi: set[str] | None = None, only: tuple[str, ...] | None = None,
                         shown: tuple[str, ...] | None = None) -> None:
    """Add ``--key`` for every Config field (or the fields in ``only``, without ``--config``). Keys in
    ``multi`` accept several values (sweeps). ``defaults``: what the help shows as a key's default (a
    script's SWEEP list or own default); without one, a key the methods set shows each method's value.
    ``shown``: the keys the help lists (the others are taken as well, unlisted). Flags left out keep no
    value, so a flag never given never overrides anything."""
    defaults = defaults or {}
    multi = multi or set()
    if only is None:
        parser.add_argument("--config", type=path_arg, action="append", default=None, metavar="FILE",
                            help="JSON file of config keys (CLI flags win); given more than once, the files are "
                                 "read in order and a later one's keys win")
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        listed = shown is None or f.name in shown
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS,
                        "help": _help(f, defaults) if listed else argparse.SUPPRESS}
        if f.name in multi:
            kwargs["nargs"] = "+"
        elif f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        if f.metadata.get("choices") and f.name not in multi:
            kwargs["choices"] = f.metadata["choices"]
            if f.name in ALIASES:  # --amp bfloat16 is --amp bf16 (``spelling.ALIASES``)
                kwargs["type"] = functools.partial(own_spelling, f.name)
        parser.add_argument(flag, **kwargs)


def _help(f: dataclasses.Field, defaults: dict) -> str:
    """The field's help with its default: the caller's (``defaults``), or the field's own by method. A
    default of nothing ("" or None) is not shown: the help says what leaving the flag out means, where it
    means something."""
    text, given = f.metadata["help"], f.name in defaults
    value = defaults[f.name] if given else f.default
    in_words = DEFAULT_IN_WORDS.search(text)
    if value in ("", None) or (in_words and not given):
        return text
    shown = value if given else _default_by_method(f.name, f.default)
    return f"{text[:in_words.start()] if in_words else text} (default: {shown})"


def _default_by_method(key: str, default) -> str:
    """``64`` for a key no method sets, else e.g. ``iisan 64; fft, adapter, lora, bitfit 32``."""
    if not any(key in values for values in METHOD_DEFAULTS.values()):
        return str(default)
    by_value: dict[str, list[str]] = {}
    for method, values in METHOD_DEFAULTS.items():
        by_value.setdefault(str(values.get(key, default)), []).append(method)
    return "; ".join(f"{', '.join(methods)} {value}" for value, methods in by_value.items())


def args_layers(args: argparse.Namespace) -> tuple[dict, dict]:
    """The ``--config`` files' values (merged in order) and the flags given on the command line, as two dicts."""
    file_values = {}
    for path in getattr(args, "config", None) or ():  # --config base.json --config lr.json: lr.json's keys win
        file_values.update(read_config_file(path))
    names = {f.name for f in dataclasses.fields(Config)}
    return file_values, {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, defaults: dict | None = None) -> Config:
    """``resolve`` of the flags in ``args``, its ``--config`` file and ``defaults``."""
    file_values, flags = args_layers(args)
    return resolve(defaults, file_values, flags)


def close_match(name: str, names) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells (``epoch``: ``epochs``), if any is close;
    ``_`` is read as ``-`` where the names use ``-``. The cutoff keeps ``learning-rate`` from ``drop-rate``."""
    names = list(names)
    if not any("_" in n for n in names):
        name = name.replace("_", "-")
    return next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.8)), None)


class FlagParser(argparse.ArgumentParser):
    """argparse that takes a flag only spelled out (``--user`` is not ``--users``: an abbreviation that
    works today could mean another flag once one is added), and reports arguments it does not know in
    the parser of the (sub)command they were given to, with its usage and a hint (``unrecognized``).
    ``several_values``: what that hint adds when a one-value flag was given several values."""

    def __init__(self, *args, several_values: str = "", **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.several_values = several_values
        self.commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        namespace, extra = self.parse_known_args(argv, namespace)
        if extra:
            parser = self.given_to(namespace, argv[:len(argv) - 1 - argv[::-1].index(extra[0])])
            parser.error(unrecognized(parser, extra, argv))
        return namespace

    def given_to(self, namespace: argparse.Namespace, before: list[str]) -> argparse.ArgumentParser:
        """The parser of the last (sub)command named in ``before``, the arguments up to an unknown one."""
        name = getattr(namespace, self.commands.dest, None) if self.commands else None
        if name not in before:
            return self
        chosen = self.commands.choices[name]
        return chosen.given_to(namespace, before) if isinstance(chosen, FlagParser) else chosen


def unrecognized(parser: argparse.ArgumentParser, extra: list[str], argv: list[str]) -> str:
    """argparse's ``unrecognized arguments: ...``, with the flag meant for a misspelt one and, for values
    after a flag that takes one or none, what that flag takes."""
    hints = [_flags_meant(parser, extra), _values_too_many(parser, extra, argv)]
    return "; ".join([f"unrecognized arguments: {' '.join(extra)}", *filter(None, hints)])


def _flags_meant(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    known = {s.lstrip("-"): s for s in parser._option_string_actions if s.startswith("--")}
    meant = {}
    for token in extra:
        if token.startswith("--"):
            match = close_match(token.split("=", 1)[0].lstrip("-"), known)
            if match:
                meant[token.split("=", 1)[0]] = known[match]
    if len(meant) == 1:
        return f"did you mean {next(iter(meant.values()))}?"
    return "did you mean " + ", ".join(f"{m} for {t}" for t, m in meant.items()) + "?" if meant else ""


def _is_value(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return not token.startswith("-")


def _values_too_many(parser: argparse.ArgumentParser, extra: list[str], argv: list[str]) -> str:
    """For ``--lr 1e-3 2e-3`` (``2e-3`` unrecognized): ``--lr takes one value`` and the parser's
    ``several_values``, formatted with ``flag`` and ``values``."""
    options = parser._option_string_actions
    for i, token in enumerate(argv):
        flag, inline, value = token.partition("=")
        action = options.get(flag)
        if action is None or action.nargs not in (None, 0):
            continue
        first = i + 1 if inline or action.nargs == 0 else i + 2
        stray = []
        for candidate in argv[first:]:
            if candidate not in extra or not _is_value(candidate):
                break
            stray.append(candidate)
        if not stray:
            continue
        if action.nargs == 0:
            return f"{flag} takes no value"
        values = " ".join([value if inline else argv[i + 1], *stray])
        several = getattr(parser, "several_values", "")
        return f"{flag} takes one value" + (": " + several.format(flag=flag, values=values) if several else "")
    return ""
