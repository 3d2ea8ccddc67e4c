"""A table of test metrics over seeds on the real Amazon interactions and titles, on this CPU: SASRec
over item IDs (``id``) and text-only cached IISAN with the real pretrained MiniLM text tower (no images
are available offline, so the image tower is left out rather than fed blanks).

Every (setting, data set, seed) point is one run folder under ``work``, named by the point, so running
the same command again resumes an interrupted run from its newest checkpoint and skips finished ones.
``write_table`` collects whatever has finished into one JSON: per point the test metrics at the best
validation epoch, and per setting and data set their mean and sample standard deviation.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from safetensors import safe_open

from ..claims import claim_output
from ..config import Config
from ..console import fixed
from ..data.cache import cache_file
from ..data.datasets import DATASETS
from ..data.interactions import load_dataset
from ..digests import file_fingerprint
from ..errors import CacheError, ConfigError, DataError, parse_json
from ..evaluate import popularity_metrics
from ..files import check_readable, failure_reason, write_json_atomic
from ..methods import METHOD_DEFAULTS
from ..metric_names import HEADLINE, label
from ..model.caching import build_cache_from_config
from ..provenance import provenance
from ..train.run_results import finished_file, read_results
from ..train.trainer import train
from .offline import minilm_path
from .presets import SEED_SETTINGS, SEEDS

log = logging.getLogger(__name__)

DESCRIPTION = {
    "id": "SASRec over learned 64-d item-ID embeddings (method id): no encoder, cache or images",
    "iisan-text": "cached IISAN, text tower only (--towers text): the real pretrained all-MiniLM-L6-v2 "
                  "(6 layers x 384), all 7 hidden states (0..6) cached in fp32; no image tower",
    "most-popular": "train-part counts as scores, history masked, ties averaged (no training, no seed)",
}


def data_files(data_root: Path, dataset: str) -> tuple[Path, Path]:
    spec = DATASETS[dataset]
    users, items = Path(data_root) / spec.folder / spec.users_file, Path(data_root) / spec.folder / spec.items_file
    if not users.is_file() or not items.is_file():
        raise DataError(f"data not found: {users} / {items}")
    return users, items


def point_name(setting: str, dataset: str, seed: int) -> str:
    return f"{dataset}-{setting}-seed{seed}"


def point_config(setting: str, dataset: str, seed: int, data_root: Path, work: Path) -> Config:
    """The paper's defaults (``methods.METHOD_DEFAULTS``) for the point, on the CPU, in ``work``."""
    users, items = data_files(data_root, dataset)
    method = "id" if setting == "id" else "iisan"
    values = {**METHOD_DEFAULTS[method], "method": method, "users": str(users), "items": str(items),
              "seed": seed, "device": "cpu", "num_workers": 0, "progress": False,
              "out_dir": str(Path(work) / "runs"), "run_name": point_name(setting, dataset, seed)}
    if setting == "iisan-text":
        values.update(towers="text", feed="cached", text_model=minilm_path(),
                      cache_dir=str(Path(work) / f"cache-{dataset}-minilm"))
    return Config(**values)


def data_differences(results: dict, users: Path, items: Path) -> list[str]:
    """How the data a run's ``results`` record differs from ``users`` / ``items``: the files (a relative
    path is taken from the run's working folder) and, when recorded, the items file's fingerprint."""
    saved, where = results.get("config"), results.get("working_dir")
    saved, base = saved if isinstance(saved, dict) else {}, Path(where if isinstance(where, str) and where else ".")
    differences = [f"{key} file {saved.get(key)} there, {now} now" for key, now in (("users", users), ("items", items))
                   if not isinstance(saved.get(key), str) or (base / saved[key]).resolve() != Path(now).resolve()]
    recorded = results.get("items_fingerprint")
    now = file_fingerprint(items) if recorded and not differences else recorded
    if now != recorded:
        differences.append(f"items file fingerprint {recorded} there, {now} now")
    return differences


def finished_point(path: Path, users: Path, items: Path) -> dict | None:
    """The results at ``path`` when that run finished on this very data, None when it has not finished; a
    finished run on other data (a subset, another data root with the same --work) is refused, never
    reused or tabled as this data's result, and left where it is."""
    if finished_file(path) is None:
        return None
    results = read_results(path)
    differences = data_differences(results, users, items)
    if differences:
        raise ConfigError(f"{path.parent} finished on other data ({'; '.join(differences)}); give another --work, "
                          "or move that run folder away to train this point here")
    return results


def run_point(setting: str, dataset: str, seed: int, data_root: Path, work: Path) -> Path:
    """Train one point (resuming it if interrupted; nothing to do if it finished on this data); its results
    file."""
    cfg = point_config(setting, dataset, seed, data_root, work)
    results = Path(cfg.out_dir) / cfg.run_name / "results.json"
    if finished_point(results, Path(cfg.users), Path(cfg.items)) is not None:
        log.info("%s: finished already (%s)", cfg.run_name, results)
        return results
    if cfg.cached and not cache_file(cfg.cache_dir, "text").is_file():
        build_cache_from_config(cfg, dtype="float32")  # resumable; one cache per data set, shared by seeds
    train(cfg)
    return results


def verify_point(setting: str, dataset: str, seed: int, data_root: Path, work: Path, scratch: Path,
                 epochs: int = 3) -> dict:
    """Whether a finished point made at another commit stands for this one: its first ``epochs`` epochs
    rerun here in ``scratch`` (a cached point's cache rebuilt there first), compared with the recorded
    ones: per epoch the loss and every validation metric, and the largest difference between the
    recorded cache's states and the rebuilt ones."""
    name = point_name(setting, dataset, seed)
    recorded = parse_json((Path(work) / "runs" / name / "results.json").read_text(encoding="utf-8"))
    cfg = point_config(setting, dataset, seed, data_root, scratch).replace(epochs=epochs)
    report = {"point": name, "recorded_commit": recorded.get("git_commit"), "epochs": epochs}
    if cfg.feed == "cached":
        old_file = cache_file(point_config(setting, dataset, seed, data_root, work).cache_dir, "text")
        try:  # before the rebuild: safetensors would call a file it may not read missing, after it
            check_readable(old_file)
        except OSError as err:
            raise CacheError(f"cache file {old_file} of the recorded point cannot be read "
                             f"({failure_reason(err)})") from None
        build_cache_from_config(cfg)
        with safe_open(str(old_file), framework="pt") as old, \
                safe_open(str(cache_file(cfg.cache_dir, "text")), framework="pt") as new:
            difference = (old.get_tensor("states").float() - new.get_tensor("states").float()).abs().max()
        report["cache_max_abs_difference"] = float(difference)
    rerun = train(cfg)
    pairs = list(zip(recorded["epochs"][:epochs], rerun["epochs"]))
    report["compared"] = [{"epoch": old["epoch"], "loss": [old["loss"], new["loss"]],
                           "valid": {m: [old["valid"][m], new["valid"][m]] for m in old["valid"]}}
                          for old, new in pairs]
    report["identical"] = len(pairs) == epochs and report.get("cache_max_abs_difference", 0.0) == 0.0 and all(
        old["loss"] == new["loss"] and old["valid"] == new["valid"] for old, new in pairs)
    return report


def _summary(path: Path) -> dict:
    result = parse_json(path.read_text(encoding="utf-8"))
    timing = result.get("timing", {})
    return {"best_epoch": result["best_epoch"], "epochs_run": len(result["epochs"]), "test": result["test"],
            "valid": result["valid"], "train_seconds_per_epoch": timing.get("train_seconds_per_epoch"),
            "parameters": result["parameters"], "git_commit": result["git_commit"], "device": result["device"],
            "results_file": str(path)}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None for a single value). A NaN or infinite value makes
    both None, which the table shows as ``non-finite``: never averaged away, never a crash."""
    if not all(math.isfinite(v) for v in values):
        return {"mean": None, "std": None, "n": len(values)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _is_table(path: Path) -> bool:
    return {"table", "points", "missing"} <= set(read_results(path))


def claim_table(out: Path) -> None:
    """``out`` is rewritten on every call, so it may already hold a table; anything else there is refused."""
    claim_output(out, _is_table, "a seed table", "--out", overwrite=True)


def claim_verify_report(out: Path) -> None:
    """Like ``claim_table``, for ``verify_point``'s reports (a list of points)."""
    claim_output(out, lambda path: isinstance(read_results(path).get("points"), list), "a verify report",
                 "--verify-out", overwrite=True)


def write_table(work: Path, out: Path, data_root: Path, settings=SEED_SETTINGS, datasets=("Scientific", "Instrument"),
                seeds=SEEDS) -> dict:
    """Collect every finished point under ``work`` into ``out`` (atomic); unfinished points are listed.
    With them, the most-popular baseline's test metrics on each data set (same protocol, no training).
    No finished point at all is an error: an empty table never replaces a full one."""
    if not (Path(work) / "runs").is_dir():
        raise ConfigError(f"--work {work} holds no run folders (no {Path(work) / 'runs'}); nothing to table")
    claim_table(out)
    points, missing, table = {}, [], {}
    for setting in settings:
        for dataset in datasets:
            users, items = data_files(data_root, dataset)
            found = {}
            for seed in seeds:
                path = Path(work) / "runs" / point_name(setting, dataset, seed) / "results.json"
                if finished_point(path, users, items) is not None:
                    found[seed] = points[point_name(setting, dataset, seed)] = _summary(path)
                else:
                    missing.append(point_name(setting, dataset, seed))
            if found:
                table[f"{dataset}/{setting}"] = {
                    m: mean_std([p["test"][m] for p in found.values()]) for m in HEADLINE
                } | {"seeds": sorted(found)}
    if not points:
        raise ConfigError(f"none of the {len(missing)} points has finished under {Path(work) / 'runs'}; "
                          f"{out} is left as it was")
    popular = {}
    for dataset in datasets:
        users, items = data_files(data_root, dataset)
        defaults = Config()  # the protocol: last max_seq_len + 3 items of users with >= min_seq_len
        data = load_dataset(users, items, defaults.max_seq_len, defaults.min_seq_len)
        popular[f"{dataset}/most-popular"] = {m: {"mean": v, "std": None, "n": 1}
                                              for m, v in popularity_metrics(data, "test").items() if m in HEADLINE}
    table = popular | table
    payload = {"what": "test HR@10 / NDCG@10 at the best validation epoch, mean and sample std over seeds",
               "settings": {s: DESCRIPTION[s] for s in (*settings, "most-popular")}, "table": table, "points": points,
               "missing": missing, **provenance("cpu")}
    write_json_atomic(out, payload)
    return payload


def markdown(payload: dict) -> str:
    """The table of ``write_table``'s payload: one row per data set and setting, mean ± sample std."""
    names = [f"test {label(m)}" for m in HEADLINE]
    lines = [f"| data set | setting | seeds | {' | '.join(names)} | best epochs |", "|---" * (len(names) + 4) + "|"]
    for key, row in payload["table"].items():
        dataset, setting = key.split("/")
        seeds = row.get("seeds", [])
        best = [str(payload["points"][point_name(setting, dataset, s)]["best_epoch"]) for s in seeds]
        cells = " | ".join(_mean_std_cell(row[m]) for m in HEADLINE)
        lines.append(f"| {dataset} | {setting} | {len(seeds) or '-'} | {cells} | {', '.join(best) or '-'} |")
    return "\n".join(lines) + "\n"


def _mean_std_cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "non-finite"
    return fixed(stat["mean"]) + (f" ± {fixed(stat['std'])}" if stat["std"] is not None else "")
