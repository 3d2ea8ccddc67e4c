"""The efficiency benchmark: FFT, Adapter, LoRA, BitFit, IISAN uncached and IISAN cached on the same
data, each measured in a fresh process with the trainer's exact step (``bench.measure_training``), each
beside a row measured the authors' way (every slot encoded, padding included, full-length titles);
then the cache build (both towers) and the full-ranking evaluation of every user (cached IISAN).

Two settings: every method at one batch size ("equal") and the paper's (baselines 32, IISAN 64). One
JSON per setting (rows, configs, provenance), rewritten after every row (a run cut short keeps what it
measured; ``complete`` says whether it finished), then a markdown table and a figure per JSON
(``figures.write_reports``). Data and encoders are synthetic and random (offline): timings depend on
shapes, not on weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..claims import expect_folders
from ..config import Config
from ..data.datasets import DATASETS
from ..data.interactions import read_items
from ..data.synthetic import SCIENTIFIC_LENGTHS, generate
from ..devices import resolve_device
from ..errors import ConfigError, TrainingError
from ..files import path_component, write_json_atomic
from ..isolate import in_fresh_process
from ..logfiles import command_log, logging_to
from ..methods import METHOD_DEFAULTS, METHOD_TABLE
from ..model.tiny import vocabulary, write_base_architectures, write_bert, write_vit
from ..precedence import resolve
from ..provenance import git_commit, provenance
from .bench import (
    add_tpme,
    measure_cache_build,
    measure_evaluation,
    measure_training,
)
from .figures import claim_benchmark, claim_reports, plain, write_reports
from .options import SETTING_NAMES
from .rows import AUTHORS_WAY, MIN_STEPS, MIN_WARMUP, TABLE_METHODS, authors_label

log = logging.getLogger(__name__)

BENCH_LOG = "benchmark.log"  # every benchmark's lines, appended in --out
USERS = {"demo": 1200, "scientific": sum(SCIENTIFIC_LENGTHS.values())}  # of ``prepare``'s synthetic data


def bench_methods(table: dict) -> dict[str, dict]:
    """Every row --methods may name: the paper's table, then by its paper name each other method of ``table``
    (``METHOD_TABLE``) with an item encoder, one added later: measured when named, never by default, as TPME
    is normalised over the rows of one table."""
    tabled = {setting["method"] for setting in TABLE_METHODS.values()}
    return {**TABLE_METHODS, **{method.paper_name: {"method": name} for name, method in table.items()
                                if method.kind != "id" and name not in tabled}}


BENCH_METHODS = bench_methods(METHOD_TABLE)


def label_list(flag: str, text: str, known, may_be_empty: bool = True) -> tuple[str, ...]:
    """A comma list of method labels ('all': every known one; where ``may_be_empty``, 'none' or empty: none).
    A ``ConfigError`` naming ``flag`` for an unknown label, or for none where one is needed; a label given
    twice is kept once. Labels among ``BENCH_METHODS`` but not ``known`` (a subset: --methods) are said to be so."""
    if text.strip() == "all":
        return tuple(known)
    labels = tuple(dict.fromkeys(m.strip() for m in text.split(",")
                                 if m.strip() and not (may_be_empty and m.strip() == "none")))
    if outside := [m for m in labels if m in BENCH_METHODS and m not in known]:
        raise ConfigError(f"{flag}: {outside} not among --methods {list(known)}; add them there or leave them out")
    if unknown := [m for m in labels if m not in known]:
        raise ConfigError(f"{flag}: unknown method label(s) {unknown}; choose from {list(known)}")
    if not labels and not may_be_empty:
        raise ConfigError(f"{flag} {text!r} names no method; choose from {list(known)} or 'all'")
    return labels


def selection(methods: str, authors_way: str, full_epoch: str, settings: str, *, warmup: int, steps: int,
              flop_batches: int, few_steps: bool = False) -> dict:
    """``run_benchmark``'s labels, authors_way, full_epoch and setting_names from the command line's comma
    lists, after checking the step counts: a ``ConfigError`` naming the flag at fault."""
    labels = tuple(TABLE_METHODS) if methods.strip() == "all" else label_list("--methods", methods, BENCH_METHODS,
                                                                               may_be_empty=False)
    chosen = {"labels": labels, "authors_way": label_list("--authors-way", authors_way, labels),
              "full_epoch": label_list("--full-epoch", full_epoch, labels)}
    if warmup < 0 or steps < 1 or flop_batches < 0:  # refused with --few-steps too: said first
        raise ConfigError(f"--warmup and --flop-batches must be >= 0 and --steps >= 1, not {warmup}, "
                          f"{flop_batches} and {steps}")
    if not few_steps and (warmup < MIN_WARMUP or steps < MIN_STEPS):
        raise ConfigError(f"--warmup {warmup} --steps {steps}: the benchmark times at least {MIN_STEPS} steps "
                          f"after {MIN_WARMUP} warm-up steps; pass --few-steps for a quick check")
    chosen["setting_names"] = tuple(s.strip() for s in settings.split(",") if s.strip())
    if not chosen["setting_names"] or any(s not in SETTING_NAMES for s in chosen["setting_names"]):
        raise ConfigError(f"--settings must list equal and/or paper, not {settings!r}")
    return chosen


def prepare(work: Path, data: str, backbones: str) -> dict[str, str]:
    """Synthetic data with an image LMDB, and random-weight encoders; reused when already there."""
    data_dir = work / f"data-{data}"
    if not (data_dir / "images.lmdb").is_dir():
        log.info("generating %s-shaped synthetic data in %s", data, data_dir)
        if data == "scientific":  # Scientific's users and sequence lengths, and its items
            generate(data_dir, num_items=DATASETS["Scientific"].source.stats.items, num_topics=500,
                     length_profile=SCIENTIFIC_LENGTHS, images="lmdb")
        else:
            generate(data_dir, num_users=USERS["demo"], num_items=400, images="lmdb")
    paths = {"users": str(data_dir / "users.tsv"), "items": str(data_dir / "items.tsv"),
             "images": str(data_dir / "images.lmdb")}
    models = work / f"models-{backbones}"
    if backbones == "base":
        text, image = models / "bert-base-random", models / "vit-base-random"
        if not (image / "config.json").is_file():
            write_base_architectures(models)
    else:
        text, image = models / "tiny-bert", models / "tiny-vit"
        if not (image / "config.json").is_file():
            write_bert(text, vocabulary(read_items(paths["items"]).titles), hidden=64, layers=4, heads=2)
            write_vit(image, hidden=64, layers=4, heads=2, image_size=224, patch_size=32)
    paths.update(text_model=str(text), image_model=str(image))
    return paths


def base_config(paths: dict, work: Path, data: str, backbones: str, **settings) -> dict:
    """What every row shares: data and encoder paths, the cache folder, device and precision settings."""
    return dict(paths, cache_dir=str(work / f"cache-{data}-{backbones}"), progress=False, encode_batch_size=512,
                **settings)


def method_config(base: dict, label: str, batch: int | None = None, way: str = "default") -> Config:
    """The config of one benchmark row: shared paths and settings, the method's paper defaults, its
    setting (``BENCH_METHODS[label]``), if given a batch size, and measured the authors' way or not."""
    return resolve({**base, **BENCH_METHODS[label], **({"batch_size": batch} if batch is not None else {}),
                    **(AUTHORS_WAY if way == "authors" else {})})


def check_device(settings: dict) -> torch.device:
    """The shared settings are valid and the device every row will ask for exists here: a ``ConfigError``
    now, not one failed row each. Never touches the GPU itself: the measuring processes do."""
    return resolve_device(Config(**settings).device)


def batch_size(setting: str, method: str, equal_batch: int) -> int:
    return equal_batch if setting == "equal" else METHOD_DEFAULTS[method]["batch_size"]


def check_batch_size(batch: int, data: str, flag: str) -> None:
    """A ``ConfigError`` for a batch larger than the users of ``data``: every timed step needs a full batch."""
    if batch > USERS[data]:
        raise ConfigError(f"{flag} {batch} exceeds the {USERS[data]:,} users of the {data} data; every timed step "
                          f"needs a full batch: choose at most {USERS[data]}")


def device_tag(device: str) -> str:
    if device.startswith(("CPU", "Apple MPS")):
        return "cpu" if device.startswith("CPU") else "mps"
    return device.replace("NVIDIA ", "").split()[0].lower()


def measured_device(payload: dict, rows: list[dict]) -> str | None:
    """The device as the measuring processes named it (the benchmark's own process never touches a GPU)."""
    return next((r["device"] for r in [*rows, payload.get("evaluation") or {}] if "device" in r), None)


def result_path(out: Path, tag: str, payload: dict, rows: list[dict], settings: dict) -> Path:
    """``out/<tag>-<setting>.json``, the tag by default ``<backbones>-<data>-<device>``."""
    payload["device"] = measured_device(payload, rows) or settings.get("device", "auto")
    name = path_component(tag) if tag else f"{payload['backbones']}-{payload['data']}-{device_tag(payload['device'])}"
    return Path(out) / f"{name}-{payload['setting']}.json"


def claim_results(out: Path, tag: str, payload: dict, rows: list[dict], settings: dict,
                  figs: Path | None) -> Path:
    """The JSON path of ``payload``, after refusing (one line) a JSON, table or figure there that this
    benchmark did not write."""
    path = result_path(out, tag, payload, rows, settings)
    claim_benchmark(path, "--out")
    claim_reports(path, figs, "--out")
    return path


def measuring_order(labels: tuple[str, ...], authors_way: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every label the default way, in the given order, then the authors' way ones: the rows a run cut
    short (a lent GPU's time limit) keeps are the ones the comparison needs; the authors' way costs most.
    A label given twice is measured once."""
    return [(label, "default") for label in dict.fromkeys(labels)] + [
        (label, "authors") for label in dict.fromkeys(authors_way) if label in labels]


def table_position(label: str) -> tuple[int, int]:
    """Rows are listed in ``BENCH_METHODS`` order, each label's authors'-way row under its default one."""
    for i, known in enumerate(BENCH_METHODS):
        if label in (known, authors_label(known)):
            return i, int(label != known)
    raise ValueError(f"not a benchmark row label: {label!r}")


def shared_tasks(base: dict) -> dict:
    """The cache build (both towers) and the full-ranking evaluation of every user with cached IISAN, each
    timed in a fresh process: the same two entries in every setting's JSON."""
    log.info("building the cache (timed)")
    tasks = {"cache_build": in_fresh_process(measure_cache_build, Config(**base))}
    log.info("  -> %s", measured_line(tasks["cache_build"], "cache_build_seconds", "s to build the cache"))
    log.info("evaluating every user (timed)")
    tasks["evaluation"] = in_fresh_process(measure_evaluation, method_config(base, "IISAN (cached)"))
    log.info("  -> %s", measured_line(tasks["evaluation"], "evaluation_seconds", "s to rank every user (median)"))
    return tasks


def measured_line(result: dict, key: str = "epoch_seconds", what: str = "s per epoch (median step x steps)") -> str:
    """One measurement as a line to read (the JSON holds it whole): its time, peak memory and parameters."""
    if "error" in result:
        return f"failed: {result['error']}"
    memory = result.get("memory") or {}
    peak = memory.get("max_allocated_gib", memory.get("peak_rss_gib"))
    parts = [f"{plain(result[key])} {what}" if isinstance(result.get(key), (int, float)) else f"no {key}",
             *([f"{plain(1000 * result['seconds_per_step'])} ms per step"] if "seconds_per_step" in result else []),
             *([f"{result['trainable_params']:,} trainable parameters"] if "trainable_params" in result else []),
             *([f"peak {peak:.2f} GiB"] if isinstance(peak, (int, float)) else [])]
    return ", ".join(parts)


def run_benchmark(settings: dict, *, backbones: str = "tiny", data: str = "demo",
                  setting_names: tuple[str, ...] = ("equal", "paper"), equal_batch: int = 32,
                  labels: tuple[str, ...] = tuple(TABLE_METHODS), authors_way: tuple[str, ...] | None = None,
                  full_epoch: tuple[str, ...] = (), warmup: int = 10, steps: int = 50, flop_batches: int = 0,
                  work: Path, out: Path, tag: str = "", figs: Path | None = None) -> list[Path]:
    """Measure every label in every setting, and the labels in ``authors_way`` (default: all) also the
    authors' way; ``full_epoch``: labels whose default row also times a real epoch end to end;
    ``flop_batches``: FLOPs counted over the first that many timed batches (0: all).
    ``settings``: Config values shared by all rows (``options.BENCH_KEYS``). Writes
    ``out/<tag>-<setting>.json`` and its table beside it (``.md``), and with ``figs`` its figure, and appends
    its log lines, those of the measuring processes too, to ``out/benchmark.log``; returns
    the JSONs. When every measured row failed, a ``TrainingError`` that says where they are (no figure)."""
    if not labels:  # (the script refuses an empty --methods; a call from Python too, before a rowless file)
        raise ConfigError("no method to measure: name at least one of " + ", ".join(BENCH_METHODS))
    # The device the rows will name, where known without touching a GPU (the CPU), else None.
    device = "CPU" if check_device(settings).type == "cpu" else None
    if "equal" in setting_names:  # the paper's batches (32, 64) fit either data
        check_batch_size(equal_batch, data, "--equal-batch")
    expect_folders(work=work, out=out, figs=figs)
    if tag or device:  # the files' names are known before any measuring: refuse what is not ours now
        for setting in setting_names:
            claim_results(out, tag, {"setting": setting, "backbones": backbones, "data": data, "device": device},
                          [{"device": device}] if device else [], settings, figs)
    out.mkdir(parents=True, exist_ok=True)
    with logging_to(command_log(out / BENCH_LOG, "=== benchmark", "benchmark log"), "benchmark"):
        commit = git_commit()  # before this run writes its own results into the checkout
        authors_way = labels if authors_way is None else authors_way
        paths = prepare(work, data, backbones)
        base = base_config(paths, work, data, backbones, **settings)
        tasks = shared_tasks(base) if "IISAN (cached)" in labels else {"cache_build": None, "evaluation": None}
        written = []
        measured: dict[tuple, dict] = {}  # baselines run at 32 in both settings: measure once
        for setting in setting_names:
            rows, configs = [], {}
            payload = {"setting": setting, "description": SETTING_NAMES[setting], "backbones": backbones, "data": data,
                       "rows": rows, **tasks, "configs": configs, "warmup_steps": warmup, "timed_steps": steps,
                       "complete": False, **provenance(commit=commit)}
            order = list(measuring_order(labels, authors_way))
            for n, (label, way) in enumerate(order, 1):
                cfg = method_config(base, label, batch_size(setting, BENCH_METHODS[label]["method"], equal_batch), way)
                key = (label, cfg.batch_size, way)
                if key not in measured:
                    log.info("%s | %s | batch %d | %s (row %d of %d)", setting, label, cfg.batch_size, way, n,
                             len(order))
                    measured[key] = in_fresh_process(measure_training, cfg, warmup=warmup, steps=steps,
                                                     full_epoch=way == "default" and label in full_epoch,
                                                     flop_batches=flop_batches)
                row = dict(measured[key], label=label if way == "default" else authors_label(label), measured=way)
                rows.append(row)
                rows.sort(key=lambda r: table_position(r["label"]))
                configs[row["label"]] = cfg.to_dict()
                log.info("  -> %s", measured_line(row))
                if tag or measured_device(payload, rows):  # (the file's name needs the device)
                    path = write_json_atomic(claim_results(out, tag, payload, rows, settings, figs), payload)
                    write_reports([path], None, "--out")  # if cut short, the JSON and its table keep what was measured
            add_tpme([r for r in rows if r["measured"] == "default"])  # the paper's comparison: default rows
            payload["complete"] = True
            written.append(write_json_atomic(claim_results(out, tag, payload, rows, settings, figs), payload))
            log.info("wrote %s and its table %s", written[-1], written[-1].with_suffix(".md"))
        failed = bool(measured) and all("error" in row for row in measured.values())
        for path in write_reports(written, None if failed else figs, "--out"):  # no figure of nothing
            if path.suffix == ".png":
                log.info("wrote the figure %s", path)
        if failed:
            first = next(iter(measured.values()))["error"]
            raise TrainingError(f"every measured row failed (the first: {first}); their errors are in "
                                f"{', '.join(map(str, written))}")
        return written
