"""Using a trained run, whatever its method and feed: ``load_run(folder)`` rebuilds the model from the
run's ``config.json`` (``model.build.build_model``, the one construction path) and loads its best
weights (``best.safetensors``); then

- ``evaluate(run, split)``: the full-ranking metrics, computed as training computed them (so they equal
  the ``results.json`` numbers of the best epoch);
- ``recommend(run, histories, k)``: the top-K items after each history (item indices), the history
  and padding masked;
- ``exports.export(run, out_dir, split)``: item embeddings and the users' embeddings for a split.

Score = user vector · item embedding, as in evaluation. The user vector is SASRec's state after the
last ``max_seq_len`` items of a history.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..bounds import device_problem
from ..config import DEFAULT_MODELS, Config, model_location
from ..data.batches import PixelSource
from ..data.interactions import SeqRecData, check_split
from ..data.run_data import load_data
from ..devices import resolve_device
from ..digests import file_fingerprint
from ..errors import ConfigError, DataError, TrainingError, ValuesTogether, parse_json
from ..evaluate import eval_chunk, evaluate_model, item_table
from ..locks import held
from ..methods import unread_keys
from ..model.build import build_model, modalities
from ..model.recommender import Recommender
from ..precedence import read_config_file
from ..train.checkpoint import DATA_PATHS, MODEL_PATHS, PATHS, config_differences
from ..train.run_results import results_or_reason
from ..train.runfolder import LOCK, RESULTS
from ..train.same_inputs import changed_inputs
from ..train.weights import copy_weights, read_weights
from .results_file import check_run_folder, ran_from, run_ending, unfinished, without_weights

log = logging.getLogger(__name__)

@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    data: SeqRecData
    model: Recommender = field(repr=False)  # in eval mode, best weights loaded
    pixels: PixelSource | None = field(repr=False)
    device: torch.device
    best_epoch: int
    results: dict = field(default_factory=dict, repr=False)  # its results.json ({} when unreadable)
    table: torch.Tensor | None = field(default=None, repr=False)  # (N+1, D) item embeddings, made once

    def item_embeddings(self) -> torch.Tensor:
        """(N+1, D): every item through the item encoder (row 0: padding), as evaluation computes it. The run's
        own table, which ``evaluate`` and ``recommend`` use too: clone it before changing it in place."""
        if self.table is None:
            self.table = item_table(self.model, self.data.num_items, self.cfg.encode_batch_size, self.pixels,
                                    self.device, progress=self.cfg.progress, width=self.cfg.embedding_dim)
        return self.table

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        """Item id -> dataset index (1..N)."""
        return {item_id: i for i, item_id in enumerate(self.data.item_ids) if i}

    def item_index(self, item_ids: list[str], where: str = "--history") -> np.ndarray:
        """Item ids -> dataset indices; an id the data set does not hold is an error naming it."""
        if isinstance(item_ids, str) or not all(isinstance(i, str) for i in item_ids):
            raise DataError(f"{where}: expected a list of item ids (strings), not {item_ids!r:.80}")
        index = self.positions
        unknown = list(dict.fromkeys(i for i in item_ids if i not in index))  # each once, in the order given
        if unknown:
            spaced = next((i for i in unknown if any(ch.isspace() for ch in i)), None)  # "a b", as a users file
            hint = f"; item ids are comma-separated: {','.join(spaced.split())!r}" if spaced else ""
            raise DataError(f"{where}: item id(s) {', '.join(map(repr, unknown[:5]))} are not among the "
                            f"{self.data.num_items} items of the data set ({self.cfg.items}; items that occur "
                            f"in no kept user's history are dropped by the protocol){hint}")
        if not item_ids:
            raise DataError(f"{where}: an empty history (give at least one item id)")
        return np.array([index[i] for i in item_ids], dtype=np.int64)

    def user_history(self, user_id: str, where: str = "--user") -> np.ndarray:
        """The user's every interaction with a kept item (oldest first), not only the last ``max_seq_len + 3``
        the protocol keeps: a recommendation for them follows the last ones and masks them all."""
        if (row := self.data.user_row.get(user_id)) is None:
            raise DataError(f"{where}: user {user_id!r} is not among the {self.data.num_users} users of "
                            f"{self.cfg.users} (users with fewer than {self.cfg.min_seq_len} interactions "
                            "are skipped by the protocol)")
        return self.data.history(row)


PATH_KEYS = (*DATA_PATHS, *MODEL_PATHS, "cache_dir")  # what a config names by path
# Methods whose trained weights hold a row per kept item, by its position among the kept items (``ItemIDEncoder``):
# another users file that keeps other items reads each row for another item. Every other method's weights are
# of no item (its item table is encoded from titles and images, or read from a cache by item id).
BY_ITEM_POSITION = {"id": "item_encoder.embedding.weight"}


def rebased(cfg: Config, working_dir: str | None) -> Config:
    """``cfg`` with each relative path taken from ``working_dir`` (the folder the run was trained from, as its
    results.json says), what it meant there; from here only where it is not found there (a run folder copied
    with its data to another machine), and as it is where it is found in neither place, so that the error
    names it. An encoder name found nowhere stays as it is (it may be a Hub id)."""
    if not isinstance(working_dir, str):
        return cfg
    changes = {}
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if not value or Path(value).is_absolute() or value in DEFAULT_MODELS.values():
            continue  # (a default encoder is the repository's, from any folder: ``model_location``)
        there = Path(working_dir) / value
        if there.exists() or (not Path(value).exists() and key not in ("text_model", "image_model")):
            changes[key] = str(there)
    return cfg.replace(**changes) if changes else cfg


def load_run(run_dir: str | Path, device: str | torch.device = "auto", progress: bool | None = None) -> TrainedRun:
    """A run folder -> its config, data and model with the best weights, on ``device``, with bars (``progress``;
    default: as the run trained) while it evaluates. The caller's random streams are left as they were."""
    device = str(device) if isinstance(device, torch.device) else device
    if problem := device_problem(device if isinstance(device, str) else repr(device)):
        raise ConfigError(f"device={problem}")
    cfg, results = run_files(run_dir := Path(run_dir))
    cfg = cfg if progress is None else cfg.replace(progress=progress)
    torch_device = resolve_device(device)
    data = load_data(cfg, run_dir)
    refuse_other_inputs(run_dir, cfg, results, data)
    cuda = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the trained weights replace every random one; seeded all the same
        torch.manual_seed(cfg.seed)
        # a cached run reads its cache, checked against what it trained on (``refuse_other_inputs``), not the LMDB
        model, pixels = build_model(cfg.replace(images="") if cfg.cached else cfg, data, torch_device, trained=True)
    best_epoch = best_weights(model, run_dir / "best.safetensors", cfg)
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, pixels, torch_device, best_epoch, results)


def run_files(run_dir: Path) -> tuple[Config, dict]:
    """The run's saved config, its relative paths taken from where the run ran, and its results ({} when
    damaged: a warning); one line when the folder is no run's or has no weights yet."""
    config_path, weights = run_dir / "config.json", run_dir / "best.safetensors"
    check_run_folder(run_dir)
    results, damage = results_or_reason(run_dir / RESULTS)
    if (holder := held(run_dir / LOCK)) or (holder is None and results.get("status") == "running"):
        log.warning("%s is %s: its best weights and results.json change whenever an epoch improves, so what is read "
                    "now may be of two epochs", run_dir, "still training" if holder else "said to be training "
                    "(results.json: running) by a process this machine cannot see, its lock naming another machine or "
                    "unreadable here")
    if damage:  # its numbers only compare, and its working folder and items fingerprint check: not needed
        log.warning("%s: %s; used without it (relative paths from the folder its out_dir leads from, no check that "
                    "the items file is the one trained on, no metrics to compare)", run_dir / RESULTS, damage)
    if config_path.exists() and not config_path.is_file():
        raise ConfigError(f"{config_path} is {'a folder' if config_path.is_dir() else 'not a regular file'}; "
                          "expected the config file a run writes")
    if not config_path.is_file():
        ended = run_ending(results)
        raise ConfigError(f"{run_dir} holds a run that {ended} before it was set up: nothing to use" if ended
                          else f"{run_dir} is not a run folder: it has no config.json")
    try:
        saved = Config.from_saved(read_config_file(config_path), source=str(config_path))
    except ValuesTogether as err:  # (read_config_file leaves these to the merge: here the file is all there is)
        raise ConfigError(f"{config_path}: {err}") from None
    if weights.exists() and not weights.is_file():
        raise TrainingError(f"{weights} is {'a folder' if weights.is_dir() else 'not a regular file'}; expected the "
                            "weights file a run writes")
    if not weights.is_file():
        raise TrainingError(without_weights(run_dir / RESULTS, results))
    if note := unfinished(run_dir / RESULTS, results, saved.epochs):
        log.warning("%s", note)
    cfg = rebased(saved, ran_from(run_dir / RESULTS, results, saved.to_dict()))
    reads_images = cfg.images and "images" not in unread_keys(cfg.method, cfg.towers, cfg.feed)
    needed = [*DATA_PATHS[:2], *(["cache_dir"] if cfg.cached else ["images"] if reads_images else [])]
    where = {k: Path(getattr(cfg, k)) for k in needed} | encoder_folders(cfg, results.get("working_dir"))
    if missing := [k for k, path in where.items() if not path.exists()]:  # moved since: where to say so
        rebuild = (" (a cache deleted: `iisan cache` with the run's encoders rebuilds it, or --build-cache in the "
                   "entry script)" if missing[0] == "cache_dir" else "")
        raise ConfigError(f"{where[missing[0]]} ({missing[0]} of {config_path}) does not exist: if it moved, "
                          f"set {', '.join(missing)} in {config_path} to where it is now{rebuild}")
    return cfg, results


def encoder_folders(cfg: Config, working_dir) -> dict[str, Path]:
    """``{text_model: folder, ...}``: the encoder folders a live run reads (a cached run reads its cache, the
    ID method none), a relative one as from where the run ran (``rebased`` leaves a name found nowhere as it
    is: it may be a Hub id, which only a run with --allow-download fetched, and is then left out here)."""
    if cfg.cached or cfg.method == "id":
        return {}
    folders = {}
    for key in (f"{m}_model" for m in modalities(cfg)):
        folder = model_location(getattr(cfg, key))
        if not folder.exists() and not folder.is_absolute() and isinstance(working_dir, str):
            folder = Path(working_dir) / folder
        if folder.exists() or not cfg.allow_download:  # (else a Hub id: the loader fetches or names it)
            folders[key] = folder
    return folders


def refuse_other_inputs(run_dir: Path, cfg: Config, results: dict, data: SeqRecData) -> None:
    """An items file, cache, encoder folder or image LMDB other than the run trained on is refused (its rows
    or states would not match the weights), and so is a users file that keeps other items for a run whose
    weights are by item position (``BY_ITEM_POSITION``); another users file is otherwise a warning
    (evaluation uses its users now)."""
    trained_on = results.get("items_fingerprint")  # runs before it was recorded have none
    if trained_on and trained_on != data.catalog.fingerprint:
        raise DataError(f"{cfg.items} has changed since {run_dir} was trained (items fingerprint {trained_on} "
                        f"then, {data.catalog.fingerprint} now): the run's item rows would not match it; "
                        "restore the file or train again")
    kept = results.get("kept_items")  # runs before it was recorded: ``best_weights`` compares the counts
    if cfg.method in BY_ITEM_POSITION and isinstance(kept, str) and kept and kept != data.kept_items:
        raise DataError(f"{Path(cfg.users).resolve()} keeps other items than the users file {run_dir} trained on "
                        f"(kept items {kept} then, {data.kept_items} now; edited since, or another file): the run's "
                        "item embeddings are by item position and would be read for other items; restore the users "
                        "file the run trained on, or train again")
    if (users_then := results.get("users_fingerprint")) and users_then != (users_now := file_fingerprint(cfg.users)):
        log.warning("%s is not the users file %s trained on (its fingerprint %s then, %s now; edited since, or "
                    "another file): evaluation and recommendations use the users in it", Path(cfg.users).resolve(),
                    run_dir, users_then, users_now)
    if why := changed_inputs(cfg, results, run_dir):
        raise ConfigError(f"{why}: the run's weights were trained with the other one; restore it or train again")


def best_weights(model, weights: Path, cfg: Config) -> int:
    """Load ``weights`` into ``model``, checked against the run's config (its paths from where the run ran)
    and for non-finite values; the epoch they are of (-1 when their metadata does not say)."""
    state, metadata = read_weights(weights)
    check_weights_config(weights, metadata, cfg.to_dict(), weights.parent / "config.json")  # before their shapes
    rows = BY_ITEM_POSITION.get(cfg.method)  # a run before kept_items was recorded: its count tells
    then, now = (len(state[rows]), len(model.get_parameter(rows))) if rows in state and state[rows].dim() else (0, 0)
    if then != now:
        raise DataError(f"{weights} holds embeddings of {then - 1} items, those the users file it trained on kept; "
                        f"{Path(cfg.users).resolve()} keeps {now - 1}: it is not that users file (edited since, or "
                        "another file); restore the users file the run trained on, or train again")
    copy_weights(model, state, weights)
    best_epoch = int(epoch) if re.fullmatch(r"-?\d{1,9}", epoch := str(metadata.get("epoch", -1))) else -1
    if best_epoch == -1 and "epoch" in metadata:
        log.warning("%s: its metadata's epoch %r is not a whole number (the file was edited?); the best epoch is "
                    "unknown", weights, metadata["epoch"])
    if bad := [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]:
        raise TrainingError(f"{weights} holds non-finite values in {len(bad)} weight tensor(s) (e.g. {bad[0]}); "
                            "its metrics and scores would be NaN: restore the file or train again")
    return best_epoch


def check_weights_config(weights: Path, metadata: dict[str, str], config: dict, config_path: Path) -> None:
    """The config a weights file was saved with (its metadata) against the run folder's config.json: a
    ``ConfigError`` when they differ in what a step computes (the weights are of another run, and the model
    built from config.json would give other numbers with them); a warning when the metadata holds no
    readable config (nothing to check against). Data and encoder paths are not compared: a resumed run may
    spell them otherwise (``users.tsv``, then its absolute path)."""
    try:
        saved = parse_json(metadata.get("config", ""))
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        log.warning("%s holds no readable config in its metadata; taken to be of %s", weights, config_path)
        return
    if differences := config_differences(saved, config, ignore=PATHS):
        raise ConfigError(f"{weights} was saved by a run of another config than {config_path} "
                          f"({'; '.join(differences[:3])}): restore the run folder's files or train again")


def evaluate(run: TrainedRun, split: str) -> dict[str, float]:
    """HR@K and NDCG@K (K = 5, 10, 20) on ``split``, exactly as training evaluated the best epoch."""
    check_split(split)  # (before the item table is made)
    return evaluate_model(run.model, run.data, split, run.cfg, run.device, run.pixels,
                          table=run.item_embeddings())


def padded_inputs(histories: list[np.ndarray], length: int) -> torch.Tensor:
    """(U, length): the last ``length`` items of each history, left-padded with 0 (the training layout)."""
    inputs = np.zeros((len(histories), length), dtype=np.int64)
    for row, history in enumerate(histories):
        tail = history[-length:]
        inputs[row, length - len(tail):] = tail
    return torch.from_numpy(inputs)


@torch.no_grad()
def recommend(run: TrainedRun, histories: list[np.ndarray], k: int = 10) -> list[list[tuple[int, float]]]:
    """For each history (dataset item indices, oldest first): the top-``k`` ``(item index, score)``,
    best first. Items of the history and padding are never returned; fewer than ``k`` when fewer items
    remain. The histories are scored a chunk at a time (``eval_chunk``, as evaluation): a (histories, items)
    score matrix at once outgrows any memory."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"-k {k!r}: must be a positive whole number")
    if any(np.ndim(h) == 0 for h in histories):  # recommend(run, history), a history's items one by one
        raise DataError("expected a list of histories, each a list of item indices: one history is [history]")
    histories = [np.asarray(h) for h in histories]
    for row, history in enumerate(histories):
        if history.ndim != 1 or not len(history) or history.dtype.kind not in "iu" or \
                history.min() < 1 or history.max() > run.data.num_items:
            raise DataError(f"history {row}: expected a non-empty list of item indices 1..{run.data.num_items} "
                            f"(``TrainedRun.item_index`` makes them from item ids), not {history.tolist()!r:.80}")
    histories = [h.astype(np.int64) for h in histories]  # (torch indexes with int64; uint8 would be a mask)
    table, top = run.item_embeddings(), []  # (N+1, D)
    chunk = eval_chunk(run.cfg, run.device, run.data.num_items)
    for start in range(0, len(histories), chunk):
        part = histories[start:start + chunk]
        inputs = padded_inputs(part, run.cfg.max_seq_len).to(run.device)
        scores = run.model.user_vectors(table, inputs).float() @ table.T  # (chunk, N+1)
        scores[:, 0] = -torch.inf
        for row, history in enumerate(part):
            scores[row, torch.from_numpy(history).to(run.device)] = -torch.inf
        top += ranked(scores, k)
    return top


def ranked(scores: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's ``k`` best ``(index, score)``, best first, equal scores in index order (so the top ``k``
    is always a prefix of the top ``k + 1``: items with the same title score the same); -inf entries
    (history, padding) and NaN ones are never listed. topk runs where the scores are; only a row whose
    ties cross the cut is ranked again in full (``top_items``)."""
    scores = scores.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    k = min(k, scores.shape[1])
    indices = scores.topk(k, dim=1).indices.sort(dim=1).values  # the top k, in index order
    values = scores.gather(1, indices)
    order = values.sort(dim=1, descending=True, stable=True).indices
    indices, values = indices.gather(1, order), values.gather(1, order)
    crossing = ((scores >= values[:, -1:]).sum(1) > k).tolist()
    return [top_items(scores[row].cpu(), k) if crossing[row] else
            [(i, s) for i, s in zip(index, value, strict=True) if s != -np.inf]
            for row, (index, value) in enumerate(zip(indices.tolist(), values.tolist(), strict=True))]


def top_items(scores: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """``ranked`` for one row, by a full look at the scores tied with the ``k``-th."""
    scores = scores.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    kth = scores.topk(min(k, len(scores))).values[-1]
    candidates = torch.nonzero(scores >= kth).flatten()  # in index order
    top = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices[:k]].tolist()
    values = scores[top].tolist()
    return [(i, s) for i, s in zip(top, values, strict=True) if s != -np.inf]
