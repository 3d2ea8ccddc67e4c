"""Exporting a trained run (``trained.load_run``): ``export(run, out_dir, split)`` writes the item embeddings
and the users' embeddings for a split, as safetensors whose metadata names the row order (item ids, user ids),
never into an input of the run (``refuse_inputs_as_out``) nor over files that are not its own exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..claims import claim_output, refuse_inside_inputs
from ..config import model_location
from ..console import progress_bar
from ..data.interactions import check_split
from ..errors import OutputError, parse_json
from ..evaluate import eval_chunk
from ..files import check_readable, failure_reason, folders_kept_on_success, remove, stale_temporaries
from ..locks import OutputLock
from ..methods import METHOD_NAMES
from ..tensorfiles import header_bytes, save_safetensors_atomic
from ..train.checkpoint import CHECKPOINTS, PATHS, config_differences
from .trained import TrainedRun

EXPORT_FORMAT = "iisan-embeddings/1"
LOCK = ".iisan-export-lock"  # held while an export checks and writes a folder, removed after


@torch.no_grad()
def user_embeddings(run: TrainedRun, split: str) -> torch.Tensor:
    """(U, D): each user's vector before the ``split`` target (the vectors evaluation ranks with)."""
    inputs, _, _ = run.data.eval_split(split)
    table = run.item_embeddings()
    chunk = eval_chunk(run.cfg, run.device, run.data.num_items)
    starts = progress_bar(range(0, len(inputs), chunk), len(inputs), desc=f"user vectors before {split}",
                          unit="users", enabled=run.cfg.progress, size=lambda s: min(chunk, len(inputs) - s))
    return torch.cat([run.model.user_vectors(table, torch.as_tensor(inputs[s:s + chunk], device=run.device)).float()
                      for s in starts]).cpu()


def export_metadata(path: Path) -> dict | None:
    """The metadata of an export IISAN wrote, or None for any other file. A file this user may not read is
    refused: it may be an earlier export, never to be taken for someone else's file (safetensors calls it missing)."""
    try:
        check_readable(path)
    except PermissionError as err:
        raise OutputError(f"--out {path.parent} holds {path.name}, which cannot be read ({failure_reason(err)}) and "
                          "may be an earlier export: make it readable, or export into another folder") from None
    except OSError:  # a folder, a name safetensors cannot open: no export
        return None
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
    another best epoch or of another config: a new export would leave a folder of files from two models
    (``users-valid`` of one, ``items`` of the other), whose products mean nothing. Data and encoder paths are
    not compared (config.json edited to say where a moved file is now: the same model)."""
    for path in sorted(out_dir.glob("*.safetensors")) if out_dir.is_dir() else []:
        if (meta := export_metadata(path)) and (why := other_model(meta, common)):
            raise OutputError(f"--out {out_dir} holds {path.name} exported from {meta.get('run_dir')} (best epoch "
                              f"{meta.get('best_epoch')}), {why}: export into another folder (a folder holds one "
                              "model's embeddings)")


def other_model(meta: dict[str, str], common: dict[str, str]) -> str:
    """How an earlier export's metadata says it is of another model than ``common``'s; '' when the same."""
    if Path(str(meta.get("run_dir"))).resolve() != Path(common["run_dir"]) or \
            meta.get("best_epoch") != common["best_epoch"]:
        return f"not {common['run_dir']} (best epoch {common['best_epoch']})"
    try:
        saved = parse_json(meta.get("config") or "")
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        return "and records no readable config"
    differences = config_differences(saved, parse_json(common["config"]), ignore=PATHS)
    return f"of another config ({'; '.join(differences[:3])})" if differences else ""


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
    check_split(split)  # (before anything is written)
    out_dir = Path(out_dir)
    refuse_inputs_as_out(run, out_dir)
    common = {"format": EXPORT_FORMAT, "run_dir": str(run.run_dir.resolve()), "method": METHOD_NAMES[run.cfg.method],
              "feed": "-" if run.cfg.method == "id" else run.cfg.feed,  # (ID: no encoder to feed)
              "best_epoch": str(run.best_epoch), "config": json.dumps(run.cfg.to_dict())}
    paths = {"items": out_dir / "items.safetensors", "users": out_dir / f"users-{split}.safetensors"}
    # One export at a time into a folder: two runs' checks, then both their writes, would mix their files.
    with folders_kept_on_success(out_dir), OutputLock(out_dir / LOCK, f"export folder {out_dir}",
                                                       "another export is writing there; wait for it to finish"):
        refuse_other_exports(out_dir, common)
        for path in paths.values():  # an earlier export is replaced; any other file there never is
            claim_output(path, is_export, "embeddings IISAN exported", "--out", overwrite=True)
            for stale in stale_temporaries(path):  # a killed export's (the folder is locked)
                remove(stale)
        metadata = {"items": {**common, "item_ids": json.dumps(run.data.item_ids[1:])},
                    "users": {**common, "split": split, "user_ids": json.dumps(run.data.user_ids),
                              "inputs": f"each user's last {run.cfg.max_seq_len} items before the {split} target"}}
        for name, count in (("items", run.data.num_items), ("users", len(run.data.user_ids))):  # before the work
            header_bytes(paths[name], {name: (torch.float32, (count, 0))}, metadata[name])
        items = run.item_embeddings()[1:].float().cpu().contiguous()
        save_safetensors_atomic({"items": items}, paths["items"], metadata["items"])
        users = user_embeddings(run, split).contiguous()
        save_safetensors_atomic({"users": users}, paths["users"], metadata["users"])
    return paths
