"""What a config value may be: of its field's type (``coerce``: strings from flags parsed, a bool never
taken for a number), and within bounds that would otherwise fail deep inside a run, or quietly do harm
there: sizes and counts that are not positive or too large to allocate, seeds outside what NumPy takes,
learning rates that are not finite and positive, run names that are not one folder name (a run folder
must stay under ``--out-dir``), device names torch does not know, titles too short for their special
tokens, text encodings Python does not know. ``config.Config`` checks both whenever a config is made."""

from __future__ import annotations

import argparse
import codecs
import math
import re
import sys
import types
import typing
import unicodedata
from pathlib import PurePath

from .errors import ConfigError

LEARNING_RATES = ("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?", re.ASCII)  # torch refuses cuda:01 and other digits
DEVICES = "auto, cpu, cuda, cuda:N, mps"
MAX_DEVICE_INDEX = 127  # torch keeps a device index in 8 bits: cuda:128 would silently become cuda:-128
MIN_TITLE_TOKENS = 3  # [CLS], one word piece, [SEP]
# Upper bounds of values whose size is allocated (histories, positions) or compounded (bucket ladders):
# far above any use, far below what fails inside numpy or torch with a traceback.
AT_MOST = {"max_seq_len": 4096, "min_seq_len": 4096, "title_tokens": 8192, "item_bucket_growth": 4.0,
           "embedding_dim": 65536, "transformer_blocks": 1024, "attention_heads": 1024, "text_adapter_down": 65536,
           "image_adapter_down": 65536, "lora_rank": 65536, "layer_groups": 1024, "batch_size": 2**20,
           "eval_batch_size": 2**20, "encode_batch_size": 2**20}
PIXELS = ("displayed", "authors")  # build-lmdb --pixels: how pictures become pixels (``data.image_build``)
RANDOM_BACKBONES = ("base",)  # `iisan params --random-backbones`: BERT-base + ViT-B/16 with random weights
SEEDS = 2**32  # what NumPy's seeding takes, and well inside torch's
MAX_NAME_BYTES = 200  # a run folder's name
# a number as written on a command line (Python's float() also reads '1_0' and other scripts' digits);
# nan and inf parse, and are refused by name where a value must be finite
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.ASCII | re.I)
INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)  # as written on a command line: no '5_0', no other scripts' digits
SMALLEST = 1e-30  # the least rate, temperature or LoRA alpha taken: far below use, far above float16's and
# float32's subnormals, where a gate or an update flushes to 0 or overflows to inf
# The least gate temperature: a gate's logit gets a gradient of 1 / temperature times the rest; Adam squares it in
# fp32 (at most 3.4e38), and an overflowed square makes every update of the gates 0 (1e-30 trained none of them).
SMALLEST_GATE_TEMPERATURE = 1e-6  # a million times under the paper's 0.1: a step function already


def min_seq_len_problem(min_seq_len: int) -> str:
    """Why ``min_seq_len`` cannot split a history ('' when it can): leave-one-out takes a test and a
    validation item and needs at least one before them."""
    return f"min_seq_len={min_seq_len}: leave-one-out needs at least 3 interactions per user" if min_seq_len < 3 \
        else ""


def finite_number(value) -> bool:
    """Whether ``value`` (from a JSON file, a processor's config) is a finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_bounds(cfg) -> None:
    """``cfg``: a ``config.Config`` (its fields already of their declared types): sizes and counts,
    learning rates and other numbers, run name, device, title length, encoding, layer lists."""
    positive = ("max_seq_len", "min_seq_len", "title_tokens", "embedding_dim", "transformer_blocks",
                "attention_heads", "batch_size", "epochs", "encode_batch_size",
                "text_adapter_down", "image_adapter_down", "layer_groups", "lora_rank")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be positive")
    if cfg.keep_checkpoints < 0:
        raise ConfigError(f"keep_checkpoints={cfg.keep_checkpoints} must be 0 (none once the run has finished) or more")
    if cfg.batch_size == 1:
        raise ConfigError("batch_size=1 trains nothing: the loss ranks each target against the items of the other "
                          "users in its batch (in-batch negatives, per process), and one user has none, so every "
                          "step's loss is 0; use at least 2")
    for name in ("patience", "num_workers", "max_steps_per_epoch", "eval_batch_size", "title_multiple",
                 "item_bucket_growth", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    for name, most in AT_MOST.items():
        if getattr(cfg, name) > most:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at most {most}")
    if problem := min_seq_len_problem(cfg.min_seq_len):
        raise ConfigError(problem)
    if not 0 <= cfg.seed < SEEDS:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32)")
    for name in LEARNING_RATES:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value} must be a finite, positive learning rate")
    for name in ("gate_temperature", "lora_alpha", "drop_rate", "item_bucket_growth"):
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a finite number")
    for name in (*LEARNING_RATES, "lora_alpha"):  # 1e-320: updates of 0
        if 0 < getattr(cfg, name) < SMALLEST:
            raise ConfigError(f"{name}={getattr(cfg, name)} is below {SMALLEST:g}, too small to compute with")
    if 0 < cfg.gate_temperature < SMALLEST_GATE_TEMPERATURE:
        raise ConfigError(f"gate_temperature={cfg.gate_temperature} is below {SMALLEST_GATE_TEMPERATURE:g}: the gates' "
                          "gradient (1 / temperature) would overflow the optimiser's fp32 state, and they would not "
                          "train")
    if cfg.lora_alpha <= 0:  # LoRA's scale alpha / rank: 0 adds nothing and trains nothing, < 0 subtracts
        raise ConfigError(f"lora_alpha={cfg.lora_alpha} must be positive")
    if not 0.0 <= cfg.drop_rate < 1.0:
        raise ConfigError(f"drop_rate={cfg.drop_rate} must be in [0, 1)")
    if cfg.gate_temperature <= 0:
        raise ConfigError(f"gate_temperature={cfg.gate_temperature} must be positive")
    check_run_name(cfg.run_name)
    if not cfg.out_dir.strip():  # as a path, the working folder: run folders would litter it
        raise ConfigError(f"out_dir={cfg.out_dir!r} is empty; expected the folder run folders go in (default: runs)")
    if problem := device_problem(cfg.device):
        raise ConfigError(f"device={problem}")
    if cfg.title_tokens < MIN_TITLE_TOKENS:
        raise ConfigError(f"title_tokens={cfg.title_tokens} must be at least {MIN_TITLE_TOKENS} "
                          "(the tokenizer's [CLS] and [SEP] are counted)")
    check_encoding(cfg.encoding)
    for name in ("text_layers", "image_layers"):
        layers = getattr(cfg, name)
        if layers is not None and len(layers) == 0:
            raise ConfigError(f"{name}=[] names no layer; give the hidden states to read, such as 0,2,4 (or leave "
                              "it out: the method's default)")
        if layers is not None and (min(layers) < 0 or list(layers) != sorted(set(layers))):
            raise ConfigError(f"{name}={said(list(layers))} must be distinct, increasing, non-negative indices")


def check_run_name(name: str) -> None:
    """A run folder's name: one path component, so that the run stays under ``--out-dir`` ("" = default)."""
    if name and (name in (".", "..") or PurePath(name).name != name or "\\" in name or "\0" in name):
        raise ConfigError(f"run_name={name!r} must be a single folder name (no '/', '\\', '.' or '..'); run "
                          "folders go under --out-dir")
    if name and (name != name.strip() or name.startswith("-")):  # a folder a shell command would misread
        raise ConfigError(f"run_name={name!r} must not start or end with a blank or start with '-'")
    if (size := len(name.encode("utf-8", "surrogateescape"))) > MAX_NAME_BYTES:  # here, not after the data loads
        raise ConfigError(f"run_name={name[:40]!r}... is {size} bytes long; "
                          f"a folder name may be at most {MAX_NAME_BYTES} (file systems take 255, and the run's own "
                          "temporary names add to it)")
    if control := next((c for c in name if unicodedata.category(c) == "Cc"), None):  # a newline splits log lines
        raise ConfigError(f"run_name={name!r} contains the control character U+{ord(control):04X}; use letters, "
                          "digits, '-', '_' and '.'")


def check_encoding(encoding: str) -> None:
    """``--encoding``: a text encoding Python knows, whose decoder can keep undecodable bytes
    (``errors="surrogateescape"``, how the data files are read; idna and punycode cannot)."""
    try:
        known = codecs.lookup(encoding)._is_text_encoding
    except (LookupError, ValueError):  # (ValueError: a NUL in the name)
        known = False
    if not known:
        raise ConfigError(f"encoding={encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)")
    try:
        codecs.getincrementaldecoder(encoding)(errors="surrogateescape").decode(b"", final=True)
    except (UnicodeError, LookupError, TypeError, ValueError):
        raise ConfigError(f"encoding={encoding!r} is not an encoding of text files (its decoder cannot read them, "
                          "as idna and punycode cannot); use one such as utf-8, latin-1 or cp1252") from None


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes given on a command line (``-k``, ``--size``)."""
    if not (text.isascii() and text.isdigit()) or int(text) == 0:  # no sign, no other scripts' digits
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def int_in(low: int, high: int):
    """An argparse type: a whole number from ``low`` to ``high``, in ASCII digits (int() also takes '1_0')."""
    def parse(text: str) -> int:
        if not INTEGER.fullmatch(text.strip()) or len(text.strip()) > 100:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(text.strip())
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low:,} to {high:,}")
        return value
    return parse


DEMO_USERS, DEMO_ITEMS = (100, 1_000_000), (40, 100_000)  # synthetic data sizes a demo takes (enough to rank)


def seed_arg(text: str) -> int:
    """An argparse ``type`` for a seed given on a command line: refused at once, not after the work before
    its run (a reproduction's data, images and cache)."""
    if not INTEGER.fullmatch(text.strip()):  # (int() takes '1_2' and '٥')
        raise argparse.ArgumentTypeError(f"{said(text)} is not an integer")
    if len(text.strip()) > 100:  # (int() reads no more than 4,300 digits)
        raise argparse.ArgumentTypeError(f"{said(text)} is not a seed: seeds are in [0, 2**32)")
    if not 0 <= (value := int(text.strip())) < SEEDS:  # (strip() takes more than int() does: '0\x1f')
        raise argparse.ArgumentTypeError(f"{value} is not a seed: seeds are in [0, 2**32)")
    return value


def positive_at_most(name: str):
    """An argparse ``type``: a positive integer no larger than the config's bound for ``name`` (``AT_MOST``),
    for flags of commands that take no config (``data-stats --max-seq-len``)."""
    def check(text: str) -> int:
        value = positive_int(text)
        if value > AT_MOST[name]:
            raise argparse.ArgumentTypeError(f"{value} is more than {AT_MOST[name]}, the most {name} may be")
        return value

    return check


def path_arg(text: str) -> str:
    """An argparse ``type`` for a file or folder named on a command line. An empty string is refused: as a
    path it is the working folder (``Path("")`` is ``.``), never what was meant (an unset variable)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected a path")
    return text


def not_utf8(value: str) -> str | None:
    """``value`` spelt as its bytes (``'bad\\xff'``) when it is not valid UTF-8, else None: a name of undecodable
    bytes (from a command line or a folder listing) reaches Python with surrogates in it. Bytes that are
    UTF-8, undecodable only because Python reads file names in ASCII here (a C locale with PYTHONUTF8=0), are
    a ``ConfigError`` that says so."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError:  # other lone surrogates are refused before (``bounds.coerce``)
        spelt = repr(value.encode("utf-8", "surrogateescape"))[1:]
    try:
        value.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        return spelt
    raise ConfigError(f"{spelt} is a UTF-8 name that Python reads as {sys.getfilesystemencoding()} here (a C or POSIX "
                      "locale with PYTHONUTF8=0); run with PYTHONUTF8=1 or a UTF-8 locale (LC_ALL=C.UTF-8)")


def utf8_path(text: str) -> str:
    """``path_arg`` for where to write files that safetensors or LMDB open: a path that is not valid UTF-8 is
    refused before any work, as ``Config`` refuses its own paths (Python would write there, and nothing could
    open what it wrote)."""
    try:
        spelt = not_utf8(path_arg(text))
    except ConfigError as err:  # (argparse shows its own words for a ValueError)
        raise argparse.ArgumentTypeError(str(err)) from None
    if spelt is not None:
        raise argparse.ArgumentTypeError(f"{spelt} is not valid UTF-8, which safetensors and LMDB cannot open: "
                                         "rename it, or give another")
    return text


def device_problem(text: str) -> str:
    """What is wrong with a device name, or ''."""
    if not DEVICE.fullmatch(text):
        return f"{said(text)} is not one of {DEVICES}"
    if text.startswith("cuda:") and (len(text) > 9 or int(text[5:]) > MAX_DEVICE_INDEX):  # (int() reads 4,300 digits)
        return f"{said(text)}: a device index above {MAX_DEVICE_INDEX}, the largest torch takes"
    return ""


def device_choice(text: str) -> str:
    """An argparse ``type`` for ``--device`` where no config checks it."""
    if problem := device_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def coerce(name: str, value, hint):
    """Check ``value`` against the annotation ``hint``; parse strings from flags and JSON lists."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # 'auto': what leaving the key out means (a flag's way to undo a --config file's layer list)
        if type(None) in args and (value is None or isinstance(value, str) and value.strip() == "auto"):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return coerce(name, value, hint)
    if origin is tuple:
        if isinstance(value, str):
            pieces = [v.strip() for v in value.split(",")]
            if spaced := next((v for v in pieces if v.split() != [v] and v), None):  # '2 4': 2,4 or 24?
                raise ConfigError(f"{name}={said(value)}: {spaced!r} is not one integer; separate the entries with "
                                  "commas, such as 0,2,4")
            if "" in pieces and value.strip():  # '1,,2': a number lost in typing, not a list of two
                raise ConfigError(f"{name}={said(value)}: an empty entry between commas; expected a list of integers "
                                  "such as 0,2,4")
            value = [v for v in pieces if v]
        if not isinstance(value, (list, tuple)) or any(isinstance(v, (bool, float)) for v in value) or \
                any(isinstance(v, str) and not INTEGER.fullmatch(v.strip()) for v in value):
            raise ConfigError(f"{name}={said(value)}: expected a list of integers such as 0,2,4")
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={said(value)}: expected a list of integers such as 0,2,4") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.strip().lower() in ("true", "1", "yes")  # (blanks around it taken as around a number)
        raise ConfigError(f"{name}={said(value)}: expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={said(value)}: expected an integer")
        if isinstance(value, int):
            return value
        if not (isinstance(value, str) and INTEGER.fullmatch(value.strip())):  # not '5_0', '٥' or 5.0
            raise ConfigError(f"{name}={said(value)}: expected an integer")
        if len(value.strip()) > 100:  # (Python reads no more than 4300 digits; no value needs 100)
            raise ConfigError(f"{name}={value.strip()[:12]}... ({len(value.strip())} digits): far larger than any "
                              f"{name} can be")
        return int(value.strip())  # (strip() takes more than int() does: '0\x1f')
    if hint is float:
        if isinstance(value, bool) or (isinstance(value, str) and not NUMBER.fullmatch(value.strip())):
            raise ConfigError(f"{name}={said(value)}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={said(value)}: expected a number") from None
        except OverflowError:  # a JSON integer of 400 digits is an int too large for a float
            raise ConfigError(f"{name}={str(value)[:12]}... ({len(str(value))} digits): expected a number a float "
                              "can hold") from None
        if isinstance(value, str) and beyond_float(value, number):
            raise ConfigError(f"{name}={value.strip()}: beyond what a float holds (it would be read as {number})")
        return number
    if hint is str:
        value = str(value) if isinstance(value, PurePath) else value  # Config(users=Path(...)), as Python code writes
        if not isinstance(value, str):
            raise ConfigError(f"{name}={said(value)}: expected a string")
        try:  # a JSON "\ud800" (a lone surrogate) is a str no file name or log line can hold
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ConfigError(f"{name}={said(value)}: holds a lone surrogate, which no text can") from None
        return value
    return value


def said(value) -> str:
    """``repr(value)`` for a message, its head alone when it is long (a list of 5,000 numbers is no message)."""
    text = repr(value)
    if len(text) <= 80:
        return text
    size = f"{len(value):,} entries" if isinstance(value, (list, tuple)) else f"{len(str(value)):,} characters"
    return f"{text[:60]}... ({size})"


def beyond_float(text: str, value: float) -> bool:
    """Whether ``text``, a number as written (``value`` as read), is one a float cannot hold: 1e400 read
    as inf, 1e-400 as 0.0; a message would otherwise name a value nobody wrote."""
    written_inf = text.strip().lstrip("+-").lower() in ("inf", "infinity")
    return (math.isinf(value) and not written_inf) or \
        (value == 0 and any(c in "123456789" for c in text.lower().split("e")[0]))
