"""``iisan fetch encoders``: the encoders a preset needs, from the Hugging Face Hub at a pinned commit,
into ``pretrained_models/<folder>/``, with only the files a run loads (config, tokenizer or image
processor files, safetensors weights; no other framework's weights, no pickled ``.bin``).

The download goes to ``pretrained_models/.<folder>.partial/`` (huggingface_hub resumes there after an
interruption); once complete and checked it gets ``iisan-fetch.json`` (repository, commit, every file's
size and sha256) and is renamed into place, so a folder under its real name is always whole. A second
run verifies that manifest; a folder put there by hand (no manifest) is left as it is. The Hub is
reached through a ``HubClient`` (huggingface_hub by default, a stand-in in tests).

A Hub that cannot be reached (no network, a blocked host, ``HF_HUB_OFFLINE=1``) is said in one line
naming the model and how to bring its folder from a machine that reaches the Hub. The download starts
with one request that huggingface_hub does not retry, so that an offline machine is told at once
instead of after the retries of its file listing (5, 23 s of waiting with huggingface_hub's defaults).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import OfflineModeIsEnabled

from ..data.fetch import shortened
from ..data.manifest import Manifest, folder_files
from ..errors import FetchError, parse_json
from .presets import BACKBONES, ENCODER_PRESET_NAMES, ROOT, VERSA_PRESETS

log = logging.getLogger(__name__)

MANIFEST = "iisan-fetch.json"
# What a run loads (``AutoModel`` / ``AutoTokenizer`` / ``AutoImageProcessor``), as huggingface_hub's
# allow_patterns: exact names, and the shards of a sharded safetensors checkpoint with their index.
RUN_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "vocab.json", "merges.txt", "tokenizer.model", "preprocessor_config.json", "processor_config.json",
             "model.safetensors",
             "model.safetensors.index.json", "model-*-of-*.safetensors"]


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str | None  # a commit hash; None: the head of main, resolved to a commit and recorded
    modality: str  # text or image: which preprocessing files it must have


ENCODERS = {  # folder under pretrained_models/ -> where it comes from
    "bert-base-uncased": HubModel("google-bert/bert-base-uncased", "86b5e0934494bd15c9632b12f734a8a67f723594",
                                  "text"),
    "vit-base-patch16-224": HubModel("google/vit-base-patch16-224", "3f49326eb077187dfe1c2a2bb15fbd74e6ab91e3",
                                     "image"),
    "bert-large-uncased": HubModel("google-bert/bert-large-uncased", "6da4b6a26a1877e173fca3225479512db81a5e5b",
                                   "text"),
    # Gated repositories (accept Meta's licence and log in first); their head commit is recorded.
    "Meta-Llama-3-8B": HubModel("meta-llama/Meta-Llama-3-8B", None, "text"),
    "Meta-Llama-3-70B": HubModel("meta-llama/Meta-Llama-3-70B", None, "text"),
}


def _pair(settings: dict) -> tuple[str, str]:
    """The folders under pretrained_models/ of an encoder pair's settings (BERT-base and ViT-B/16 unless set)."""
    return tuple(Path(settings.get(key, BACKBONES[key])).name for key in ("text_model", "image_model"))


# the paper's IISAN, and the pairs of the Versa presets (Code_Cached/scripts/run_IISAN_Versa.py --preset)
ENCODER_PRESETS = {name: _pair(VERSA_PRESETS.get(name, {})) for name in ENCODER_PRESET_NAMES}


class HubClient(Protocol):
    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit hash that ``revision`` (a branch or tag) names now."""

    def download(self, repo_id: str, revision: str, allow_patterns: list[str], local_dir: Path) -> None:
        """The repository's files matching ``allow_patterns`` at ``revision``, into ``local_dir``."""


class HuggingFaceHub:
    def resolve(self, repo_id: str, revision: str) -> str:
        # one request, never retried, and as long as huggingface_hub waits for a file's metadata (its
        # default here would be no time limit at all)
        return huggingface_hub.HfApi().model_info(repo_id, revision=revision,
                                                  timeout=hub_constants.HF_HUB_ETAG_TIMEOUT).sha

    def download(self, repo_id: str, revision: str, allow_patterns: list[str], local_dir: Path) -> None:
        self.resolve(repo_id, revision)  # the Hub reached, or an error at once (module docstring)
        log.info("downloading %s at %s into %s", repo_id, revision[:12], local_dir)
        huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                          local_dir=str(local_dir))


def unreachable(err: BaseException | None) -> str | None:
    """Why the Hub could not be reached, when ``err`` or an error it came from says so (huggingface_hub
    wraps them: ``LocalEntryNotFoundError`` from ``ConnectError``): offline mode, or a connection that
    failed or timed out. None for any other error (a gated or missing repository, a full disk)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OfflineModeIsEnabled):
            said = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k)] or ["HF_HUB_OFFLINE"]
            return (f"{' and '.join(said)} {'is' if len(said) == 1 else 'are'} set, huggingface_hub's offline mode: "
                    f"unset {'it' if len(said) == 1 else 'them'} where the Hub is reachable")
        transport = any(c.__name__ == "TransportError" and c.__module__.split(".")[0] in ("httpx", "httpx2")
                        for c in type(err).__mro__)  # httpx2's (huggingface_hub 2) or httpx's (1.x)
        if transport or isinstance(err, (ConnectionError, TimeoutError, socket.gaierror)):
            return " ".join(f"{type(err).__name__}: {err}".split())[:200]
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def by_hand(model: HubModel, revision: str, target: Path) -> str:
    what = "tokenizer" if model.modality == "text" else "image-processor"
    return (f"download config.json, the {what} files and the safetensors weights (model*.safetensors) from "
            f"https://huggingface.co/{model.repo_id}/tree/{revision} into {target}/")


def missing_files(folder: Path, model: HubModel) -> list[str]:
    """What a run would need and ``folder`` lacks."""
    from ..model.encoder_files import VOCABULARY_FILES  # imported when run: it brings transformers, not for --help

    names = {p.name for p in folder.iterdir()}
    missing = [] if "config.json" in names else ["config.json"]
    if "model.safetensors.index.json" in names:
        try:
            shards = parse_json((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):  # cut short, or damaged
            shards = None
        if isinstance(shards, dict) and shards and all(isinstance(f, str) for f in shards.values()):
            missing += sorted(set(shards.values()) - names)
        else:
            missing.append("a model.safetensors.index.json that names its weight files")
    elif "model.safetensors" not in names:
        missing.append("safetensors weights")
    if model.modality == "image" and "preprocessor_config.json" not in names:
        missing.append("preprocessor_config.json")
    if model.modality == "text" and not any(n in VOCABULARY_FILES or n.endswith(".tiktoken") for n in names):
        missing.append(f"a vocabulary ({', '.join(VOCABULARY_FILES[:3])}, ...)")  # else every title is [UNK]
    return missing


def verify_fetched(target: Path, model: HubModel) -> None:
    manifest = Manifest(target / MANIFEST, target, "`iisan fetch encoders`", holder=target)
    info = manifest.info("download")
    if model.revision and info["revision"] != model.revision:
        raise FetchError(f"{target} holds {info['repo_id']} at {info['revision'][:12]}, this version of iisan pins "
                         f"{model.revision[:12]}; move the folder away and run `iisan fetch encoders` again")
    checked = manifest.verify("download")
    log.info("%s: %s at %s, %d files unchanged", target, info["repo_id"], info["revision"][:12], checked)


def fetch_encoder(name: str, root: Path, client: HubClient) -> Path:
    """``root/name`` complete and checked; returns it."""
    model, target = ENCODERS[name], root / name
    if (target / MANIFEST).is_file():
        verify_fetched(target, model)
        return target
    if target.exists():
        log.warning("%s exists and was not fetched by iisan (no %s); left as it is", target, MANIFEST)
        return target
    partial = root / f".{name}.partial"
    revision = model.revision or "main"
    try:
        revision = model.revision or client.resolve(model.repo_id, "main")
        client.download(model.repo_id, revision, RUN_FILES, partial)
    except Exception as err:  # huggingface_hub's, httpx's and OS errors alike: one line, never a traceback
        if why := unreachable(err):
            raise FetchError(f"cannot reach the Hugging Face Hub for {model.repo_id}@{revision[:12]} ({why}); run "
                             f"`iisan fetch encoders` where the Hub is reachable and copy the folder it writes to "
                             f"{target}/ (its {MANIFEST} is checked here), or {by_hand(model, revision, target)} "
                             "(pretrained_models/README.md)") from None
        reason = shortened(" ".join(f"{type(err).__name__}: {err}".split()))
        raise FetchError(f"cannot download {model.repo_id}@{revision[:12]} from the Hugging Face Hub ({reason}); "
                         f"{by_hand(model, revision, target)}") from None
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping, in our folder
    missing = missing_files(partial, model) if partial.is_dir() else ["every file"]
    if missing:
        raise FetchError(f"{model.repo_id}@{revision[:12]} lacks {', '.join(missing)} among the files a run "
                         f"loads; the partial download stays in {partial}; {by_hand(model, revision, target)}")
    Manifest(partial / MANIFEST, partial).record(
        "download", folder_files(partial), repo_id=model.repo_id, revision=revision,
        requested=model.revision or "main", allow_patterns=RUN_FILES, huggingface_hub=huggingface_hub.__version__)
    os.replace(partial, target)
    log.info("%s: %s at %s", target, model.repo_id, revision[:12])
    return target


def fetch_encoders(preset: str = "iisan", root: str | Path = ROOT / "pretrained_models",
                   client: HubClient | None = None) -> list[Path]:
    if preset not in ENCODER_PRESETS:
        raise FetchError(f"--preset {preset}: not one of {', '.join(ENCODER_PRESETS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    client = client or HuggingFaceHub()
    return [fetch_encoder(name, root, client) for name in ENCODER_PRESETS[preset]]
