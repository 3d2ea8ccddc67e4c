"""Encoder folders on disk, checked before transformers reads them: where a name points, what a folder
may hold, and the digest that names a folder's weights. Loading from a checked folder (the one
``from_pretrained`` call, one-line errors) is ``encoder_loading``; which architectures IISAN can use,
``families``.

- Names: an existing folder; the defaults (``pretrained_models/...``) resolve against the repository,
  not the working directory; anything else is a Hugging Face Hub id only with ``--allow-download``.
  Nothing is fetched unless asked for.
- Folders never run code: ``trust_remote_code=False`` on every load (``encoder_loading.load_from_folder``), and a
  config whose ``auto_map`` asks for custom code of a model type transformers does not know is refused
  before transformers could prompt for it. Pickled weights (``pytorch_model.bin``) are refused: loading
  a pickle can run code; safetensors cannot.
- The digest of a folder's weight and tokenizer/processor files goes into every cache built from it, so
  a cache is refused when the weights behind it changed, even with an identical ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import transformers
from transformers import CONFIG_MAPPING

from .. import once
from ..config import CHECKOUT, DEFAULT_MODELS, model_location
from ..digests import sha256
from ..errors import EncoderError, parse_json
from .families import SUPPORTED

log = logging.getLogger(__name__)

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "spm.model", "tokenizer.model")
PLAIN_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json")  # read without the sentencepiece package
VOCABULARY_FILES = (*PLAIN_VOCABULARIES, *SENTENCEPIECE_FILES, "tekken.json")  # (and *.tiktoken)
DIGESTED = frozenset({*VOCABULARY_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "merges.txt", "preprocessor_config.json",
                      "processor_config.json"})  # transformers 5 reads its "image_processor" before the other
TINY_MARKER = ".iisan-random-model"  # in each random model folder IISAN writes (``tiny``, ``claims.claim_folder``)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(name: str, allow_download: bool = False) -> str:
    """The folder ``name`` names (checked: ``check_folder``), or, with ``allow_download``, a Hub id."""
    if not name:
        raise EncoderError("no encoder folder given (--text-model / --image-model)")
    default = name in DEFAULT_MODELS.values()
    path = model_location(name)
    if path.is_dir():
        check_folder(path)
        return str(path)
    if path.exists():
        raise EncoderError(f"model folder {str(path)!r} is a file, expected a folder with config.json")
    if not allow_download:
        under = "checkout" if CHECKOUT else "working folder"  # (an installed package's)
        where, how = (f"{str(path)!r} (the default, under the {under})", "`iisan fetch encoders` puts it there") \
            if default else (repr(name), "put the model there")
        raise EncoderError(f"model folder {where} does not exist; {how} (see pretrained_models/README.md in the "
                           "repository), or pass --allow-download to fetch a Hugging Face Hub id")
    if not HUB_ID.fullmatch(name) or name.startswith(("./", "../", "~")):
        raise EncoderError(f"model folder {name!r} does not exist, and it is not a Hub id (organisation/name) "
                           "that --allow-download could fetch")
    return name


def check_folder(folder: Path) -> None:
    """A folder transformers may read: a JSON ``config.json``, no custom code it would need, and
    weights that are not pickles."""
    config_path = folder / "config.json"
    if os.path.lexists(config_path) and not config_path.is_file():  # a folder, a pipe, a link to nothing
        raise EncoderError(f"{config_path} is not a regular file; a transformers model folder holds its config "
                           "there as a JSON file")
    if not config_path.is_file():
        raise EncoderError(f"{folder} has no config.json; it is not a transformers model folder")
    try:
        config = parse_json(config_path.read_text(encoding="utf-8"))
    except ValueError as err:  # not UTF-8 or JSON, a 4300-digit integer, nesting too deep
        raise EncoderError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise EncoderError(f"{config_path} is not a JSON object")
    if config.get("auto_map"):
        check_custom_code(config_path, config)
    elif isinstance(model_type := config.get("model_type"), str) and model_type not in CONFIG_MAPPING:
        raise EncoderError(f"{config_path} gives model type {model_type!r}, which transformers "
                           f"{transformers.__version__} does not know; IISAN's towers: text "
                           f"{', '.join(sorted(SUPPORTED['text']))}; image {', '.join(sorted(SUPPORTED['image']))}")
    names = [p.name for p in folder.iterdir()]
    if "model.safetensors" not in names and "model.safetensors.index.json" in names:  # sharded weights
        check_index(folder / "model.safetensors.index.json", set(names))
    pickles = sorted(n for n in names if n.endswith(PICKLED))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise EncoderError(f"{folder} holds pickled weights ({', '.join(pickles)}) and no .safetensors; IISAN "
                           "never unpickles (a pickle can run code): convert them once, where you trust the "
                           "file, to model.safetensors (e.g. transformers' save_pretrained)")


def check_index(path: Path, names: set[str]) -> None:
    """A sharded checkpoint's index: the JSON object transformers reads (``metadata`` and ``weight_map``,
    tensor name -> file), naming only files the folder holds."""
    try:
        index = parse_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise EncoderError(f"{path} is not valid JSON ({err})") from None
    shards = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict) or not isinstance(shards, dict) \
            or not all(isinstance(f, str) for f in shards.values()):
        raise EncoderError(f"{path} is not a sharded-weights index: expected a JSON object with 'metadata' and "
                           "'weight_map' (tensor name -> weights file), as save_pretrained writes it")
    if missing := sorted(set(shards.values()) - names):
        raise EncoderError(f"{path} names weights files the folder lacks: {', '.join(missing[:3])}")


def say_ignored_code(path: Path, classes: str) -> None:
    """Once per file and process (a folder is checked at each load: config, tokenizer, weights): ``path``'s
    auto_map is ignored, transformers' own ``classes`` load instead."""
    if once.first("ignored code", path):
        log.warning("%s asks for custom code (auto_map); ignored: IISAN loads transformers' own %s and never runs "
                    "code from a model folder", path, classes)


def check_custom_code(config_path: Path, config: dict) -> None:
    """An ``auto_map`` names Python files of the folder to run. A model type transformers knows is
    loaded with its own classes and the map ignored; any other is refused (nothing is ever run)."""
    model_type = config.get("model_type", "")
    if model_type in CONFIG_MAPPING:
        usable = model_type in SUPPORTED["text"] | SUPPORTED["image"]  # else refused next, no warning first
        if usable:
            say_ignored_code(config_path, f"{model_type!r} classes")
        return
    raise EncoderError(f"{config_path} needs custom code from its folder (auto_map, model type {model_type!r}); "
                       "IISAN never runs code from a model folder: use a model transformers supports natively")


# --------------------------------------------------------------------------------------------------
# the weights digest


def check_folder_readable(folder: Path | None, what: str) -> None:
    """Each file of an encoder's ``folder`` (its config, tokenizer and weights) can be opened: another user's
    file is refused before a run folder is made, not once the run has started."""
    for path in sorted(folder.iterdir()) if folder is not None else ():
        try:
            if path.is_file():
                os.close(os.open(path, os.O_RDONLY))
        except OSError as err:
            raise EncoderError(f"{what} {folder}: {path.name} cannot be read: {err.strerror}") from None


def local_folder(name: str, allow_download: bool = False) -> Path | None:
    """The folder holding ``name``'s files: the folder itself, or with ``allow_download`` a Hub id's
    snapshot in the local Hub cache; None when there is none (nothing is fetched)."""
    if model_location(name).is_dir():
        return model_location(name)
    if not allow_download or not HUB_ID.fullmatch(name):
        return None
    from huggingface_hub import try_to_load_from_cache  # Hub ids only (--allow-download)

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _stat(path: Path) -> list[int]:
    # ctime and inode change whenever a file is replaced, even by a copy that keeps size and mtime
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


_MEMO: dict[str, str] = {}


def weights_digest(folder: Path, known: dict | None = None) -> dict:
    """``{"digest": sha256 over the folder's weight and tokenizer/processor files, "files": name ->
    [size, mtime, ctime, inode]}``. Hashing reads every byte once; when ``known`` (a record made
    earlier) lists the same files with the same sizes and times, its digest stands and nothing is read."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.name.endswith((".safetensors", ".safetensors.index.json", ".tiktoken"))
                                       or p.name in DIGESTED))
    stats = {p.name: _stat(p) for p in files}
    key = json.dumps([str(folder.resolve()), stats])
    if known and known.get("files") == stats and known.get("digest"):
        _MEMO[key] = known["digest"]  # later calls in this process (a run's own record) read nothing either
    if key not in _MEMO:
        combined = hashlib.sha256()
        for path in files:
            combined.update(f"{path.name}\t{sha256(path)}\n".encode())
        _MEMO[key] = combined.hexdigest()
    return {"digest": _MEMO[key], "files": stats}


def processor_file(folder: Path | None) -> str:
    """The file an image processor's settings come from: transformers 5 reads processor_config.json's
    "image_processor" where it has one, else preprocessor_config.json."""
    nested = folder / "processor_config.json" if folder else None
    try:
        if nested and nested.is_file() and "image_processor" in parse_json(nested.read_text(encoding="utf-8")):
            return nested.name
    except (ValueError, TypeError, OSError):  # not a JSON object: transformers' load says so
        pass
    return "preprocessor_config.json"
