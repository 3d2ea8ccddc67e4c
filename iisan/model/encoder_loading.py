"""Loading an encoder, a tokenizer or an image processor from a folder ``encoder_files`` has checked: the
one ``from_pretrained`` call (``load_from_folder``), never running code from the folder and never fetching
anything unless asked for.

- What is loaded is what the folder holds: weights of the model that its safetensors lack (which
  transformers would fill with random numbers) are refused (``check_loaded``), and so is a text folder
  without tokenizer files or with a tokenizer that does not fit the model (``load_tokenizer``).
- Damaged files are refused in one line naming the folder (``damaged_file``, ``LOAD_ERRORS``), and so are
  integer tensors (a quantised checkpoint's) that transformers would cast into float weights (``check_float``).
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import logging
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers.utils import logging as hf_logging

from ..config import model_location
from ..errors import EncoderError, error_line, parse_json
from ..files import check_readable, failure_reason
from .encoder_files import (
    PLAIN_VOCABULARIES,
    SENTENCEPIECE_FILES,
    TINY_MARKER,
    VOCABULARY_FILES,
    resolve_model_path,
    say_ignored_code,
)
from .families import MODEL_CLASSES

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings below errors and its progress bars off inside the block; both as found after
    (blocks may nest)."""
    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


# What from_pretrained raises for a folder whose files are damaged or do not fit together (weights of
# other sizes than the config says are a RuntimeError). Building the model, torch asserts on config.json
# values that cannot be (a pad_token_id past the vocabulary) and transformers divides by them (zero heads).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError, StrictDataclassError,
               AssertionError, ZeroDivisionError)
# JSON files an Auto class reads besides config.json. Each must hold an object: transformers takes any
# other JSON value for one and fails on it far away ('list' object has no attribute 'get'). Auto classes go by
# name here (``kind``): naming AutoTokenizer or AutoImageProcessor makes transformers import them, which takes
# seconds (the image processors bring its model code) that a cached run, reading configs alone, never spends.
JSON_OBJECTS = {"AutoTokenizer": ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                  "tokenizer.json", "vocab.json"),
                "AutoImageProcessor": ("preprocessor_config.json", "processor_config.json")}


CODE_MAPS = {"AutoTokenizer": "tokenizer_config.json", "AutoImageProcessor": "preprocessor_config.json"}
CUSTOM_CODE = ("IISAN never runs code from a model folder: use a model whose tokenizer and image processor "
               "transformers provides")


def kind(auto_class) -> str:
    """An Auto class's name: what ``JSON_OBJECTS``, ``CODE_MAPS`` and ``families.MODEL_CLASSES`` go by."""
    return getattr(auto_class, "__name__", "")


def custom_code(folder: Path, auto_class) -> tuple[str | None, Path | None]:
    """An ``auto_map`` in a tokenizer's or image processor's file names Python files of the folder to run.
    transformers, asked never to run them, loads its own class where it has one (``load_from_folder`` then
    says once that the map was ignored: the file returned second); where it has none it stops, and
    ``load_from_folder`` says why in one line. A map that is no object (null, a list), on which
    transformers fails with a TypeError, is why the folder cannot be read (returned first)."""
    path = folder / CODE_MAPS.get(kind(auto_class), "")
    try:
        settings = parse_json(path.read_text(encoding="utf-8")) if kind(auto_class) in CODE_MAPS else {}
    except (OSError, ValueError):  # absent, or not JSON: ``unreadable_json`` says why
        return None, None
    if not isinstance(settings, dict) or "auto_map" not in settings:
        return None, None
    if not isinstance(settings["auto_map"], dict):
        return f"{path.name} gives auto_map {settings['auto_map']!r}; expected an object (or no auto_map)", None
    return None, path if settings["auto_map"] else None


def unreadable_json(folder: Path, auto_class) -> str | None:
    """Which of the JSON files ``auto_class`` reads in ``folder`` does not parse, and why (None: each does):
    transformers' own message names no file."""
    for name in (n for n in JSON_OBJECTS.get(kind(auto_class), ()) if (folder / n).is_file()):
        try:
            parse_json((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # a decoding error is a ValueError too
            return f"{name} is not valid JSON ({error_line(err)})"
    return None


def damaged_file(folder: Path, auto_class) -> str | None:
    """Why ``auto_class`` cannot read ``folder``'s files, in a few words, for the damage transformers
    would meet with an AttributeError or TypeError deep inside, or a weights file this user may not read
    (which safetensors calls missing); None when none is seen. A JSON file that does not parse is left to
    transformers, which says so itself."""
    files = JSON_OBJECTS.get(kind(auto_class), ())
    if kind(auto_class) == "AutoImageProcessor" and not any((folder / name).is_file() for name in files):
        return ("the folder has no preprocessor_config.json (nor a processor_config.json): copy it from the model's "
                "source; it gives the image size, mean and std the model was trained with")
    for name in files:
        if (folder / name).is_file():
            with open(folder / name, "rb") as f:
                head = f.read(4096)
            if head.startswith(codecs.BOM_UTF8):  # some Windows editors write one; JSON readers refuse it
                return f"{name} starts with a byte-order mark, which its JSON readers refuse: save it as UTF-8 " \
                       "without one"
            if not head.lstrip().startswith(b"{"):  # an object's first character, after blanks
                return f"{name} does not hold a JSON object"
    if files:  # a tokenizer or a processor reads no dtype or vocabulary size
        return None
    for weights in sorted(folder.glob("*.safetensors")) if kind(auto_class) in MODEL_CLASSES else ():
        try:
            check_readable(weights)  # safetensors calls a file it may not read missing
        except OSError as err:
            return f"{weights.name} cannot be read ({failure_reason(err)})"
    config = parse_json((folder / "config.json").read_text(encoding="utf-8"))  # valid: ``check_folder``
    for part in [config, *(v for v in config.values() if isinstance(v, dict))]:  # with sub-configs
        for key in ("dtype", "torch_dtype"):
            value = part.get(key)
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                return f"config.json gives {key} {value!r}, which is not a torch dtype (e.g. 'float32', 'bfloat16')"
        if type(size := part.get("vocab_size")) is int and size <= 0:  # transformers fails on it with an IndexError
            return f"config.json gives vocab_size {size}; expected a positive whole number"
    return None


def load_from_folder(auto_class, name: str, what: str, allow_download: bool = False, **kwargs):
    """``auto_class.from_pretrained(folder)`` (a transformers Auto class) with the folder checked first
    (``encoder_files``), never running code from it and never fetching anything unless allowed. A model
    (``families.MODEL_CLASSES``) is loaded only when the folder holds all of its weights (``check_loaded``)."""
    path = resolve_model_path(name, allow_download)
    weights = kind(auto_class) in MODEL_CLASSES
    if weights:
        kwargs["output_loading_info"] = True
    folder = Path(path) if Path(path).is_dir() else None  # None: a Hub id, fetched (only if allowed)
    bad_map, ignored_map = custom_code(folder, auto_class) if folder else (None, None)
    if folder and (reason := damaged_file(folder, auto_class) or bad_map):
        raise EncoderError(f"cannot load {what} from {name!r}: {reason}")
    # transformers' own report of missing and unused weights is silenced: check_loaded reads it instead.
    try:
        with quiet_transformers():
            loaded = auto_class.from_pretrained(path, trust_remote_code=False, local_files_only=not allow_download,
                                                **kwargs)
    except LOAD_ERRORS as err:  # a damaged folder: truncated weights, a config of wrong types or sizes
        if "trust_remote_code" in str(err):  # only the folder's own code could load it
            raise EncoderError(f"cannot load {what} from {name!r}: it needs custom code from its folder (auto_map); "
                               f"{CUSTOM_CODE}") from None
        where = unreadable_json(folder, auto_class) if folder else None
        raise EncoderError(f"cannot load {what} from {name!r}: {where or load_error_line(err)}") from None
    except ImportError as err:  # e.g. transformers < 5.18: AutoImageProcessor needs torchvision
        first = " ".join(str(err).split()).split(". ")[0]
        raise EncoderError(f"cannot load {what} from {name!r}: transformers {transformers.__version__} needs a "
                           f"package that is not installed ({first})") from None
    except Exception as err:  # tokenizers (Rust) reports a vocabulary it cannot read as a bare Exception
        if type(err) is not Exception or kind(auto_class) != "AutoTokenizer":  # not that: it goes on as it is
            raise
        raise EncoderError(f"cannot load {what} from {name!r}: its tokenizer files are damaged "
                           f"({load_error_line(err)})") from None
    if ignored_map is not None:  # loaded by transformers' own class: the folder's code was not needed
        say_ignored_code(ignored_map, "classes")
    if not weights:
        return loaded
    model, info = loaded
    check_loaded(model, info, path, what)
    if folder:
        check_float(model, folder, name, what)
    return model


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # as safetensors names them


def check_float(model, folder: Path, name: str, what: str) -> None:
    """Refuse a folder whose safetensors hold a weight of the model's as integers (or 8-bit floats): the
    values of a quantised checkpoint (int8, packed 4-bit, fp8) without their scales, which transformers
    casts into the float weights without a word. Integer buffers (BERT's position_ids) are left alone."""
    weights = {key for key, p in model.named_parameters() if p.is_floating_point()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")  # a checkpoint's prefix (``bert.``) is stripped by transformers
                if any(".".join(parts[i:]) in weights for i in range(len(parts))) and (
                        dtype := f.get_slice(key).get_dtype()) not in FLOAT_DTYPES:
                    raise EncoderError(f"cannot load {what} from {name!r}: {file.name} holds {key!r} as "
                                       f"{dtype}, which transformers would cast into {type(model).__name__}'s float "
                                       f"weights (a quantised checkpoint?); IISAN needs weights stored as F32, F16 "
                                       f"or BF16")


# Weights a checkpoint may lack: the pooler (BERT's and ViT's ``pooler.dense``), which IISAN never reads
# (``backbones`` pools hidden states itself and drops ViT's pooler) and which the authors' classification
# checkpoints (ViTForImageClassification) do not hold.
UNUSED_WEIGHTS = re.compile(r"(^|\.)pooler\.")


def check_loaded(model, info: dict, folder: str, what: str) -> None:
    """Refuse a model some of whose weights the folder's safetensors lack: transformers would leave them
    randomly initialised, without a word. That is what weights saved under other names give (a wrapper's
    prefix such as ``model.`` or ``module.``) or a tensor dropped from the file. The pooler may be absent
    (``UNUSED_WEIGHTS``). Weights in the file that the model does not use (a classification or language-
    modelling head: ``classifier.*``, ``lm_head.weight``) are usual and only logged."""
    missing = sorted(k for k in info.get("missing_keys") or () if not UNUSED_WEIGHTS.search(k))
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    model_name = type(model).__name__
    if missing or mismatched:
        total = sum(1 for k in model.state_dict() if not UNUSED_WEIGHTS.search(k))
        bad = (f"{len(missing)} of {total} weights of {model_name} are missing from its safetensors (e.g. "
               f"{missing[0]!r}), which transformers would fill with random numbers" if missing else
               f"{len(mismatched)} weights do not have the sizes its config.json gives (e.g. {mismatched[0]!r})")
        hint = (f"; it holds {len(unexpected)} weights {model_name} does not use (e.g. {unexpected[0]!r}): saved "
                "under other names or another prefix?" if unexpected else "")
        raise EncoderError(f"{what} folder {folder} does not hold the whole model: {bad}{hint}")
    if unexpected:
        log.info("%s %s: %d weights in its safetensors are not used by %s (e.g. %r: a task head?); ignored",
                 what, folder, len(unexpected), model_name, unexpected[0])


# Files that hold a tokenizer's vocabulary; a text folder needs one (``load_tokenizer``).
def load_tokenizer(name: str, vocab_size: int | None, allow_download: bool = False):
    """The text tokenizer of ``name``, refused when it cannot be the model's own.

    - A local folder needs a vocabulary file (``VOCABULARY_FILES``): without one transformers 5 builds a
      tokenizer of special tokens only, and every title becomes [UNK].
    - Its ids must fit the model's embedding: none at or above ``vocab_size``, the config's.
    - It must know at least half as many tokens as the model's ``vocab_size``: models pad their
      embedding by a little (Qwen2: 151,646 tokens, 151,936 rows), never by half; a far smaller
      tokenizer is another model's, or one with only its special tokens."""
    folder = model_location(name)
    if folder.is_dir() and (folder / "config.json").is_file():
        names = {p.name for p in folder.iterdir()}
        if not names.intersection(VOCABULARY_FILES) and not any(n.endswith(".tiktoken") for n in names):
            raise EncoderError(f"text encoder folder {folder} has no tokenizer files ({', '.join(VOCABULARY_FILES[:4])}"
                               ", ...): copy them from the model's source")
        spm = names.intersection(SENTENCEPIECE_FILES)
        if spm and not names.intersection(PLAIN_VOCABULARIES) and importlib.util.find_spec("sentencepiece") is None:
            raise EncoderError(f"text encoder folder {folder} has its vocabulary only as {min(spm)}, which needs the "
                               "sentencepiece package (pip install sentencepiece), or a tokenizer.json beside it")
    tokenizer = load_from_folder(transformers.AutoTokenizer, name, "text tokenizer", allow_download)
    if vocab_size is None:  # the config's (``backbones.read_spec``) gives none
        return tokenizer
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        raise EncoderError(f"the tokenizer of {name!r} has ids up to {top} but the model's vocab_size is {vocab_size} "
                           "(a tokenizer of another model?): use the tokenizer files the model came with")
    if len(tokenizer) < vocab_size / 2:
        said = f"the tokenizer of {name!r} knows {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        specials = set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens)
        if (folder / TINY_MARKER).is_file() and specials:  # ours, as an older make-tiny-models wrote it
            raise EncoderError(f"{said}: a tiny random model an older IISAN version wrote with a tokenizer "
                               "of special tokens only; write it again (iisan make-tiny-models, or iisan "
                               "demo in a new folder), and retrain what used it: its results change")
        older = ("; a tiny random model of an IISAN version older still (its folder unmarked): write it again (iisan "
                 "make-tiny-models) and retrain what used it") if specials else ""
        raise EncoderError(f"{said} (a tokenizer of another model, or one of special tokens only?): use the "
                           f"tokenizer files the model came with{older}")
    return tokenizer


def load_error_line(err: Exception) -> str:
    """What went wrong loading a model folder, in one line."""
    text = str(err).strip()
    if isinstance(err, SafetensorError):
        return f"a weights file is damaged or truncated ({text})"
    if "ignore_mismatched_sizes" in text:  # its report of which tensors differ is silenced (quiet_transformers)
        return "its weights do not have the sizes its config.json gives"
    if isinstance(err, (AssertionError, ZeroDivisionError)):  # raised building the model (``LOAD_ERRORS``)
        return f"its config.json gives values the model cannot be built with ({text or type(err).__name__})"
    if isinstance(err, KeyError):  # a JSON file of the folder without an entry transformers reads
        return f"its files lack the entry {text} that transformers reads (damaged, or of another format)"
    if isinstance(err, StrictDataclassError):  # "Validation error for field 'x':\n TypeError: ... expected int"
        return " ".join(line.strip() for line in text.splitlines()[1:]) or text
    return text.splitlines()[0] if text else type(err).__name__
