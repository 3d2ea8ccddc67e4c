"""One command per reproduction (``make reproduce DATASET=Scientific``, ``scripts/reproduce.py``):

1. data: the data set under ``Dataset/``, fetched when it is missing (``iisan fetch data``);
2. cache: the hidden-state cache, imported from the authors' stored states (``--import-from``) or
   built with the encoders, which are fetched when missing (``iisan fetch encoders``);
3. runs: cached IISAN with the paper's defaults (``methods.METHOD_DEFAULTS``), one run per seed (a
   rerun resumes or reuses each);
4. table: the test metrics as mean ± sample std over the seeds, beside the paper's headline numbers,
   with the command, device and commit, in ``<out>/reproduce-<dataset>.md`` (a file there that is not
   such a table is refused before step 1); every step's log lines go to ``<out>/reproduce-<dataset>.log``
   too, each run's also to its own train.log.

``--no-fetch`` (or no network) turns a missing input into one line naming the step and how to do it.
``DATASET=demo`` runs the same steps on the synthetic demo data with tiny encoders (no network, fetch
skipped): it checks the pipeline, and its numbers are not comparable with the paper's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..claims import claim_output
from ..config import Config
from ..console import fixed
from ..data.cache import cache_file
from ..data.datasets import dataset_paths
from ..data.fetch import fetch_dataset, paper_stats
from ..data.sources import SOURCES
from ..errors import DataError, FetchError, RunInterrupted, UserError
from ..files import atomic_path, starts_with
from ..logfiles import command_log, logging_to
from ..metric_names import TABLED
from ..model.caching import build_cache_from_config, import_cache_from_config
from ..precedence import resolve
from ..provenance import provenance
from ..train.trainer import train
from .demo import demo_config, prepare_demo_data
from .encoders import fetch_encoders
from .presets import BACKBONES, ROOT, SEEDS
from .report import average_rows, seconds
from .report_rows import read_row

log = logging.getLogger(__name__)

# The paper's headline numbers for IISAN, as its authors state them (README: "from 47GB to just 3GB",
# "from 443s to 22s" per epoch, on their GPU). Its per-data-set HR@10 / NDCG@10 are not copied into this
# repository; add them here as {"Scientific": {"hit@10": ..., "ndcg@10": ...}} to show them in the table.
PAPER_EFFICIENCY = {"train_s_per_epoch": 22.0, "gpu_memory_gb": 3.0}
PAPER_ACCURACY: dict[str, dict[str, float]] = {}


# scripts/reproduce.py's flags for the demo data's settings (its seed is always 0), named when refused.
DEMO_DATA_FLAGS = {"out": "--out", "num_users": "--demo-users", "num_items": "--demo-items", "seed": None}


class StepMissing(UserError, RuntimeError):
    """An input of a reproduction that is missing and cannot be made here; names the step."""


@dataclass
class Reproduction:
    dataset: str
    out_dir: Path
    seeds: tuple[int, ...] = SEEDS
    fetch: bool = True
    import_from: str = ""
    overrides: dict | None = None  # Config keys (e.g. epochs, device) over the paper's defaults
    demo_sizes: dict | None = None  # demo only: num_users / num_items of the synthetic data


def ensure_data(name: str, root: Path, fetch: bool) -> dict[str, str]:
    paths = dataset_paths(name, root)
    missing = [paths[k] for k in ("users", "items", "images") if not Path(paths[k]).exists()]
    if missing:
        how = f"`iisan fetch data --dataset {name}` (needs the network), or see Dataset/README.md"
        if not fetch:
            raise StepMissing(f"step 1 of 4 (data): {missing[0]} is missing; get it with {how}")
        try:
            fetch_dataset(name, root)
        except FetchError as err:
            raise StepMissing(f"step 1 of 4 (data): {err}") from None
    elif name in SOURCES:  # files put there by hand: the paper's data set, or no reproduction of it
        try:
            paper_stats(name, SOURCES[name], root)
        except DataError as err:
            raise DataError(f"step 1 of 4 (data): {err}; put the authors' files in {Path(paths['users']).parent} "
                            f"(`iisan fetch data --dataset {name}` fetches and checks them)") from None
    return paths


def ensure_cache(cfg: Config, run: Reproduction) -> None:
    needed = [cache_file(cfg.cache_dir, m) for m in ("text", "image")]
    if all(p.is_file() for p in needed):
        log.info("using the cache in %s (training checks that it matches)", cfg.cache_dir)
        return
    if run.import_from:
        import_cache_from_config(cfg, run.import_from)
        return
    models = [Path(cfg.text_model), Path(cfg.image_model)]
    if not all((m / "config.json").is_file() for m in models):
        absent = next(m for m in models if not (m / "config.json").is_file())
        how = ("`iisan fetch encoders` (needs the network), or import the authors' stored states with "
               "`make reproduce IMPORT=DIR` (DIR holds bert_outputs/ and vit_outputs/)")
        if not run.fetch:
            raise StepMissing(f"step 2 of 4 (cache): {needed[0]} is missing and so is the encoder {absent}; "
                              f"get it with {how}")
        try:
            fetch_encoders("iisan", models[0].parent)
        except FetchError as err:
            raise StepMissing(f"step 2 of 4 (cache, encoders): {err}") from None
    build_cache_from_config(cfg)  # cfg.cache_dtype: auto = fp32, as the authors' cache


def base_config(run: Reproduction, root: Path) -> Config:
    if run.dataset == "demo":
        progress = (run.overrides or {}).get("progress", True)  # (a million users' images take minutes)
        prepared = prepare_demo_data(run.out_dir / "demo_data", progress=progress, flags=DEMO_DATA_FLAGS,
                                     **(run.demo_sizes or {}))  # data of other sizes there is refused
        cfg = demo_config(prepared, run.out_dir / "demo_data", **(run.overrides or {}))
        return cfg.replace(out_dir=str(run.out_dir / "runs"))
    paths = ensure_data(run.dataset, root, run.fetch)
    models = {k: str(root / "pretrained_models" / Path(v).name) for k, v in BACKBONES.items()}
    return resolve({**models, **paths, "method": "iisan", "feed": "cached", "out_dir": str(run.out_dir / "runs"),
                    **(run.overrides or {})})  # the paper's IISAN defaults below these (precedence.resolve)


def table(dataset: str, rows: list[dict]) -> str:
    """Markdown: one row of mean ± std over the seeds and one of the paper's numbers. Seeds whose runs
    cannot be averaged together (one ended at a NaN, or read other data files) make a row each, named by
    what sets them apart, so that no seed goes unseen."""
    groups = average_rows(rows)
    apart = [k for k in ("status", "data", "data_files", "image_files") if len({str(g.get(k)) for g in groups}) > 1]

    def cell(merged: dict, name: str) -> str:
        std = merged.get(f"{name}_std")
        return fixed(merged[name]) + (f" ± {fixed(std)}" if std is not None else "")

    def label(merged: dict) -> str:
        return "this reproduction" + (f" ({', '.join(f'{k} {merged.get(k)}' for k in apart)})" if apart else "")

    def measured(value: float | None, how: Callable[[float], str]) -> str:
        return how(value) if value is not None and math.isfinite(value) else "-"  # "-": seeds on several devices

    def peak(merged: dict) -> float | None:
        """The largest peak among the row's own seeds (None where they ran on several devices)."""
        seeds = [r for r in rows if all(str(r.get(k)) == str(merged.get(k)) for k in apart)]
        peaks = [r["peak_gib"] for r in seeds if r["peak_gib"] is not None]
        return max(peaks) if peaks and len({r["device"] for r in seeds}) == 1 else None

    paper = PAPER_ACCURACY.get(dataset, {})
    header = ("| | seeds | " + " | ".join(f"test {m}" for m in TABLED)
              + " | train s/epoch | peak memory (of the seed that used most) |")
    ours = [f"| {label(merged)} | {merged['seeds']} | " + " | ".join(cell(merged, f"test_{m}") for m in TABLED)
            + f" | {measured(merged['train_s_per_epoch'], seconds)} | "
            + f"{measured(peak(merged), lambda v: f'{v:.2f} GiB')} |" for merged in groups]
    theirs = ("| paper (IISAN) | | " + " | ".join(fixed(paper[m]) if m in paper else "not recorded" for m in TABLED)
              + f" | {PAPER_EFFICIENCY['train_s_per_epoch']:.0f} | {PAPER_EFFICIENCY['gpu_memory_gb']:.0f} GB |")
    return "\n".join([header, "|" + "---|" * 8, *ours, theirs]) + "\n"


TABLE_HEAD = "# Reproduction: "  # the first line of every table ``reproduce`` writes


def is_table(path: Path) -> bool:
    """A table ``reproduce`` wrote: its first line names the reproduction."""
    return starts_with(path, TABLE_HEAD)


def table_path(run: Reproduction) -> Path:
    """``<out>/reproduce-<dataset>.md``, after refusing (one line) a file there that is not such a table."""
    path = Path(run.out_dir) / f"reproduce-{run.dataset}.md"
    claim_output(path, is_table, "a reproduction table IISAN wrote", "--out", overwrite=True)
    return path


def reproduce(run: Reproduction, root: Path = ROOT) -> Path:
    """Steps 1-4 of the module docstring; returns the table's path."""
    run.out_dir = Path(run.out_dir)
    path = table_path(run)  # before any work
    Config(**(run.overrides or {}))  # bad overrides (epochs=0, device="gpu") fail before the demo data is made
    path.parent.mkdir(parents=True, exist_ok=True)
    with logging_to(command_log(path.with_suffix(".log"), "=== reproduction", "reproduction log"), "reproduction"):
        log.info("step 1 of 4: the %s data", run.dataset)
        cfg = base_config(run, root)
        log.info("step 2 of 4: the cache of %s's hidden states", run.dataset)
        ensure_cache(cfg, run)
        rows = []
        for seed in run.seeds:
            log.info("step 3 of 4: cached IISAN on %s, seed %d", run.dataset, seed)
            try:
                results = train(cfg.replace(seed=seed, run_name=f"reproduce-{run.dataset}-seed{seed}"))
            except RunInterrupted as err:  # the trainer's hint names --run-name, which this command does not take
                raise err.rehinted("To go on, run the same command again: finished seeds are reused" + (
                    "" if err.results is not None else ", this one goes on from its checkpoint")) from None
            rows.append(read_row(Path(results["run_dir"]) / "results.json", results))
        about = provenance()
        note = ("synthetic demo data and tiny random encoders: checks the pipeline; not comparable with the paper"
                if run.dataset == "demo"
                else f"the paper's data set {run.dataset}, cached IISAN with the paper's defaults")
        text = (f"{TABLE_HEAD}{run.dataset}\n\n{note}; test metrics at the best-validation epoch, mean ± sample "
                f"standard deviation over seeds {', '.join(map(str, run.seeds))}.\n\n{table(run.dataset, rows)}\n"
                "Peak memory is that of the training steps (evaluation left out, as from the time per epoch): "
                "the GPU allocator's peak on a GPU (the paper's measure) and the process's peak resident memory on "
                "a CPU (the interpreter and libraries included).\n"
                f"Command: `{about['command']}`; device: {rows[0]['device']}; commit: {about['git_commit']}; "
                f"{about['date']}. Runs: {cfg.out_dir}.\n")
        table_path(run)  # again: a file put there while the runs trained is not replaced either
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        log.info("step 4 of 4: the table, written to %s", path)
        print(text)
        return path
