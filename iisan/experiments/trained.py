"""Using a trained run, whatever its method and feed: ``load_run(folder)`` rebuilds the model from the
run's ``config.json`` (``model.build.build_model``, the one construction path) and loads its best
weights (``best.safetensors``); then

- ``evaluate(run, split)``: the full-ranking metrics, computed as training computed them (so they equal
  the ``results.json`` numbers of the best epoch);
- ``recommend(run, histories, k)``: the top-K items after each history (item indices), the history
  and padding masked;
- ``export(run, out_dir, split)``: item embeddings and the users' embeddings for a split, as
  safetensors whose metadata names the row order (item ids, user ids); never into an input of the run
  (``refuse_inputs_as_out``).

Score = user vector · item embedding, as in evaluation. The user vector is SASRec's state after the
last ``max_seq_len`` items of a history.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..config import DEFAULT_MODELS, METHOD_NAMES, Config, model_location
from ..data.batches import PixelSource
from ..data.interactions import SeqRecData
from ..data.run_data import load_data
from ..devices import resolve_device
from ..errors import ConfigError, DataError, OutputError, TrainingError
from ..evaluate import eval_chunk, evaluate_model, item_table
from ..files import claim_output, file_fingerprint, refuse_inside_inputs, save_safetensors_atomic
from ..locks import held
from ..model.build import build_model
from ..model.recommender import Recommender
from ..train.checkpoint import CHECKPOINTS, DATA_PATHS, MODEL_PATHS, config_differences
from ..train.runfolder import LOCK, RESULTS, results_or_reason
from ..train.same_inputs import changed_inputs
from ..train.weights import load_weights
from .results_file import unfinished

log = logging.getLogger(__name__)

EXPORT_FORMAT = "iisan-embeddings/1"


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    data: SeqRecData
    model: Recommender  # in eval mode, best weights loaded
    pixels: PixelSource | None
    device: torch.device
    best_epoch: int
    results: dict = field(default_factory=dict, repr=False)  # its results.json ({} when unreadable)
    table: torch.Tensor | None = field(default=None, repr=False)  # (N+1, D) item embeddings, made once

    def item_embeddings(self) -> torch.Tensor:
        """(N+1, D): every item through the item encoder (row 0: padding), as evaluation computes it."""
        if self.table is None:
            self.table = item_table(self.model, self.data.num_items, self.cfg.encode_batch_size, self.pixels,
                                    self.device)
        return self.table

    def item_index(self, item_ids: list[str], where: str = "--history") -> np.ndarray:
        """Item ids -> dataset indices; an id the data set does not hold is an error naming it."""
        index = {item_id: i for i, item_id in enumerate(self.data.item_ids) if i}
        unknown = [i for i in item_ids if i not in index]
        if unknown:
            raise DataError(f"{where}: item id(s) {', '.join(map(repr, unknown[:5]))} are not among the "
                            f"{self.data.num_items} items of the data set ({self.cfg.items}; items that occur "
                            "in no kept user's history are dropped by the protocol)")
        if not item_ids:
            raise DataError(f"{where}: an empty history (give at least one item id)")
        return np.array([index[i] for i in item_ids], dtype=np.int64)

    def user_history(self, user_id: str, where: str = "--user") -> np.ndarray:
        """The user's kept interactions (oldest first): what a recommendation for them follows."""
        try:
            row = self.data.user_ids.index(user_id)
        except ValueError:
            raise DataError(f"{where}: user {user_id!r} is not among the {self.data.num_users} users of "
                            f"{self.cfg.users} (users with fewer than {self.cfg.min_seq_len} interactions "
                            "are skipped by the protocol)") from None
        sequence = self.data.padded[row]
        return sequence[sequence > 0]


PATH_KEYS = (*DATA_PATHS, *MODEL_PATHS, "cache_dir")  # what a config names by path


def run_ending(results: dict) -> str:
    """'failed (why)' or 'was interrupted (why)' from a run's results; '' for any other status."""
    status, error = results.get("status"), results.get("error", "")
    if status not in ("failed", "interrupted"):
        return ""
    return f"{status if status == 'failed' else 'was interrupted'} ({error})" if error else status


def rebased(cfg: Config, working_dir: str | None) -> Config:
    """``cfg`` with each relative path that is not found from here taken relative to ``working_dir`` (the
    folder the run was trained from, as its results.json says), where it is found there. A data or cache
    path found in neither place is also taken from there, so that the error names where the run had it;
    an encoder name found nowhere stays as it is (it may be a Hub id)."""
    if not isinstance(working_dir, str):
        return cfg
    changes = {}
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if not value or Path(value).is_absolute() or Path(value).exists() or value in DEFAULT_MODELS.values():
            continue  # (a default encoder is the repository's, from any folder: ``model_location``)
        there = Path(working_dir) / value
        if there.exists() or key not in ("text_model", "image_model"):
            changes[key] = str(there)
    return cfg.replace(**changes) if changes else cfg


def load_run(run_dir: str | Path, device: str = "auto") -> TrainedRun:
    """A run folder -> its config, data and model with the best weights, on ``device``."""
    run_dir = Path(run_dir)
    cfg, results = run_files(run_dir)
    torch_device = resolve_device(device)
    data = load_data(cfg)
    refuse_other_inputs(run_dir, cfg, results, data)
    torch.manual_seed(cfg.seed)  # the trained weights replace every random one; seeded all the same
    model, pixels = build_model(cfg, data, torch_device)
    best_epoch = best_weights(model, run_dir / "best.safetensors", cfg)
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, pixels, torch_device, best_epoch, results)


def run_files(run_dir: Path) -> tuple[Config, dict]:
    """The run's saved config, its relative paths taken from where the run ran, and its results ({} when
    damaged: a warning); one line when the folder is no run's or has no weights yet."""
    config_path, weights = run_dir / "config.json", run_dir / "best.safetensors"
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                          else f"{run_dir} is a file; expected a run folder (runs/<name>)")
    if held(run_dir / LOCK):
        log.warning("%s is still training: its best weights and results.json change whenever an epoch improves, "
                    "so what is read now may be of two epochs", run_dir)
    results, damage = results_or_reason(run_dir / RESULTS)
    if damage:  # its numbers only compare, and its working folder and items fingerprint check: not needed
        log.warning("%s: %s; used without it (no working folder for relative paths, no check that the items "
                    "file is the one trained on, no metrics to compare)", run_dir / RESULTS, damage)
    if not config_path.is_file():
        ended = run_ending(results)
        raise ConfigError(f"{run_dir} holds a run that {ended} before it was set up: nothing to use" if ended
                          else f"{run_dir} is not a run folder: it has no config.json")
    saved = Config.from_saved(Config.overrides_from_file(config_path), source=str(config_path))
    if weights.exists() and not weights.is_file():
        raise TrainingError(f"{weights} is {'a folder' if weights.is_dir() else 'not a regular file'}; expected the "
                            "weights file a run writes")
    if not weights.is_file():
        raise TrainingError(f"{run_dir} has no best.safetensors yet (written when an epoch's validation improves)")
    if note := unfinished(run_dir / RESULTS, results, saved.epochs):
        log.warning("%s", note)
    return rebased(saved, results.get("working_dir")), results


def refuse_other_inputs(run_dir: Path, cfg: Config, results: dict, data) -> None:
    """An items file, cache, encoder folder or image LMDB other than the run trained on is refused (its rows
    or states would not match the weights); another users file is a warning (evaluation uses its users now)."""
    trained_on = results.get("items_fingerprint")  # runs before it was recorded have none
    if trained_on and trained_on != data.catalog.fingerprint:
        raise DataError(f"{cfg.items} has changed since {run_dir} was trained (items fingerprint {trained_on} "
                        f"then, {data.catalog.fingerprint} now): the run's item rows would not match it; "
                        "restore the file or train again")
    if (users_then := results.get("users_fingerprint")) and users_then != (users_now := file_fingerprint(cfg.users)):
        log.warning("%s has changed since %s was trained (users fingerprint %s then, %s now): evaluation and "
                    "recommendations use the users in it now", cfg.users, run_dir, users_then, users_now)
    if why := changed_inputs(cfg, results, run_dir):
        raise ConfigError(f"{why}: the run's weights were trained with the other one; restore it or train again")


def best_weights(model, weights: Path, cfg: Config) -> int:
    """Load ``weights`` into ``model``, checked against the run's config (its paths from where the run ran)
    and for non-finite values; the epoch they are of (-1 when their metadata does not say)."""
    metadata = load_weights(model, weights)
    check_weights_config(weights, metadata, cfg.to_dict(), weights.parent / "config.json")
    best_epoch = int(epoch) if re.fullmatch(r"-?\d{1,9}", epoch := str(metadata.get("epoch", -1))) else -1
    if best_epoch == -1 and "epoch" in metadata:
        log.warning("%s: its metadata's epoch %r is not a whole number (the file was edited?); the best epoch is "
                    "shown as -1", weights, metadata["epoch"])
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
        saved = json.loads(metadata.get("config", ""))
    except (ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        log.warning("%s holds no readable config in its metadata; taken to be of %s", weights, config_path)
        return
    if differences := config_differences(saved, config, ignore=frozenset({*DATA_PATHS, *MODEL_PATHS})):
        raise ConfigError(f"{weights} was saved by a run of another config than {config_path} "
                          f"({'; '.join(differences[:3])}): restore the run folder's files or train again")


def evaluate(run: TrainedRun, split: str) -> dict[str, float]:
    """HR@K and NDCG@K (K = 5, 10, 20) on ``split``, exactly as training evaluated the best epoch."""
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
    remain."""
    if k <= 0:
        raise ConfigError(f"-k {k}: must be positive")
    table = run.item_embeddings()  # (N+1, D)
    inputs = padded_inputs(histories, run.cfg.max_seq_len).to(run.device)
    users = run.model.user_vectors(table, inputs).float()  # (U, D)
    scores = users @ table.T  # (U, N+1)
    scores[:, 0] = -torch.inf
    for row, history in enumerate(histories):
        scores[row, torch.from_numpy(history).to(run.device)] = -torch.inf
    return ranked(scores, k)


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


@torch.no_grad()
def user_embeddings(run: TrainedRun, split: str) -> torch.Tensor:
    """(U, D): each user's vector before the ``split`` target (the vectors evaluation ranks with)."""
    inputs, _, _ = run.data.eval_split(split)
    table = run.item_embeddings()
    chunk = eval_chunk(run.cfg, run.device)
    return torch.cat([run.model.user_vectors(table, torch.as_tensor(inputs[s:s + chunk], device=run.device)).float()
                      for s in range(0, len(inputs), chunk)]).cpu()


def export_metadata(path: Path) -> dict | None:
    """The metadata of an export IISAN wrote, or None for any other file."""
    try:
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
    except Exception:  # not a safetensors file at all (safetensors raises its own error types)
        return None
    return metadata if metadata.get("format") == EXPORT_FORMAT else None


def is_export(path: Path) -> bool:
    return export_metadata(path) is not None


def refuse_other_exports(out_dir: Path, common: dict[str, str]) -> None:
    """An ``OutputError`` when ``out_dir`` holds embeddings exported from another run, or from this run at
    another best epoch: a new export would leave a folder of files from two models (``users-valid`` of one,
    ``items`` of the other), whose products mean nothing."""
    for path in sorted(out_dir.glob("*.safetensors")) if out_dir.is_dir() else []:
        if (meta := export_metadata(path)) and any(meta.get(k) != common[k] for k in ("run_dir", "best_epoch",
                                                                                       "config")):
            raise OutputError(f"--out {out_dir} holds {path.name} exported from {meta.get('run_dir')} (best epoch "
                              f"{meta.get('best_epoch')}), not {common['run_dir']} (best epoch "
                              f"{common['best_epoch']}): export into another folder (a folder holds one model's "
                              "embeddings)")


def refuse_inputs_as_out(run: TrainedRun, out_dir: Path) -> None:
    """An ``OutputError`` when ``out_dir`` is, or is inside, something the run reads: a data file, the
    images LMDB, the cache folder or an encoder's folder (whose weights digest covers every .safetensors
    in it, so an export there would break the run and its cache), or the run's checkpoints, which training
    replaces and prunes (a folder ``epoch-N`` there would be taken for one). The run folder itself may
    hold exports: no file of a run has their names, and nothing reads a run folder's .safetensors but
    ``best.safetensors``. A folder that holds an input (``data/`` around ``data/users.tsv``) is fine too:
    only the two exports are written there, and a file of those names that is not an export is refused
    (``claim_output``)."""
    cfg = run.cfg
    refuse_inside_inputs(out_dir, [cfg.users, cfg.items, cfg.images, cfg.cache_dir, *(
        str(model_location(name)) for name in (cfg.text_model, cfg.image_model) if name)], "--out")
    here, checkpoints = out_dir.expanduser().resolve(), run.run_dir / CHECKPOINTS
    if here.is_relative_to(checkpoints.resolve()):
        raise OutputError(f"--out {out_dir} is {'' if here == checkpoints.resolve() else 'inside '}the run's "
                          f"checkpoint folder {checkpoints}, whose folders its training replaces and prunes: "
                          "choose a folder of its own")


def export(run: TrainedRun, out_dir: str | Path, split: str = "test") -> dict[str, Path]:
    """``items.safetensors``: tensor ``items`` (N, D), row i = the item ``item_ids[i]`` of its metadata;
    ``users-<split>.safetensors``: tensor ``users`` (U, D), row u = ``user_ids[u]``. Scores are
    ``users @ items.T``; each file is written atomically."""
    out_dir = Path(out_dir)
    refuse_inputs_as_out(run, out_dir)
    common = {"format": EXPORT_FORMAT, "run_dir": str(run.run_dir), "method": METHOD_NAMES[run.cfg.method],
              "feed": run.cfg.feed, "best_epoch": str(run.best_epoch), "config": json.dumps(run.cfg.to_dict())}
    refuse_other_exports(out_dir, common)
    paths = {"items": out_dir / "items.safetensors", "users": out_dir / f"users-{split}.safetensors"}
    for path in paths.values():  # an earlier export is replaced; any other file there never is
        claim_output(path, is_export, "embeddings IISAN exported", "--out", overwrite=True)
    items = run.item_embeddings()[1:].float().cpu().contiguous()
    save_safetensors_atomic({"items": items}, paths["items"], {**common, "item_ids": json.dumps(run.data.item_ids[1:])})
    users = user_embeddings(run, split).contiguous()
    save_safetensors_atomic({"users": users}, paths["users"],
                            {**common, "split": split, "user_ids": json.dumps(run.data.user_ids),
                             "inputs": f"each user's last {run.cfg.max_seq_len} items before the {split} target"})
    return paths
