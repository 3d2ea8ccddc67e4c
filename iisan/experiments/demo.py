"""``iisan demo``: synthetic multimodal data, tiny encoders, the image LMDB, the cache, cached IISAN
trained for a few epochs, and a most-popular baseline under the same protocol. Offline, CPU, minutes.

``iisan demo --versa``: the same with IISAN-Versa's asymmetric pair, a tiny decoder LLM (LLaMA
architecture, masked-mean pooling) as the text tower and a ViT of another width and depth.
"""

from __future__ import annotations

import inspect
import logging
import sys
import tempfile
import time
from pathlib import Path

from ..claims import claim_folder
from ..config import Config
from ..console import fixed
from ..data.image_build import build_image_lmdb
from ..data.interactions import read_items
from ..data.run_data import load_data
from ..data.synthetic import generate
from ..errors import ConfigError, OutputError, parse_json
from ..evaluate import popularity_metrics
from ..files import write_json_atomic
from ..metric_names import HEADLINE, label
from ..model.backbones import read_spec
from ..model.build import layers_for, model_name
from ..model.caching import build_cache_from_config
from ..model.tiny import vocabulary, write_bert, write_decoder, write_vit
from ..train.trainer import train

log = logging.getLogger(__name__)
DEMO_MARKER = ".iisan-demo"  # in every folder a demo made (``claims.claim_folder``)
DEMO_SETTINGS = "demo-settings.json"  # what the folder's data was generated with (``claim_demo_data``)
GENERATED = ("items.tsv", "users.tsv")  # the text files ``generate`` writes, in this order
# The flags that set the generation settings, per command; the refusal of other settings names them.
DEMO_FLAGS = {"out": "--out", "num_users": "--users", "num_items": "--items", "seed": "--seed"}
SHOWN = {"num_users": "{} users", "num_items": "{} items", "seed": "seed {}"}  # always in the refusal


def generation_settings(seed: int, sizes: dict) -> dict:
    """Every argument of ``generate`` that decides the data (its defaults filled in), as the demo calls it."""
    defaults = {k: p.default for k, p in inspect.signature(generate).parameters.items() if k != "out_dir"}
    return {**defaults, **sizes, "seed": seed}


def describe(settings: dict, other: dict) -> str:
    """``200 users, 60 items, seed 0``, and any other setting in which ``other`` differs."""
    keys = [*SHOWN, *(k for k in settings if k not in SHOWN and settings[k] != other.get(k))]
    return ", ".join(SHOWN.get(k, k + " {}").format("unknown" if settings[k] is None else settings[k]) for k in keys)


def read_settings(record: Path) -> dict | None:
    """The settings a ``DEMO_SETTINGS`` file holds (over ``generate``'s defaults), or None when it is
    unreadable (then the data decides, as for a folder without one)."""
    try:
        held = parse_json(record.read_text(encoding="utf-8"))["settings"]
        return {**generation_settings(held["seed"], {}), **held}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_matches(out: Path, settings: dict) -> bool:
    """Whether the text files ``out`` holds are those ``settings`` generate (into a scratch folder, without
    images: the images and tiny models follow from the same settings)."""
    with tempfile.TemporaryDirectory(prefix="iisan-demo-") as scratch:
        generate(scratch, **{**settings, "images": None})
        return all((out / name).read_bytes() == (Path(scratch) / name).read_bytes()
                   for name in GENERATED if (out / name).is_file())


def settings_of_earlier_data(out: Path, settings: dict) -> dict | None:
    """Settings for a folder filled by a version without ``DEMO_SETTINGS``: None when it holds no data,
    ``settings`` when its data is what they generate, else its sizes (line counts) with the seed, of this
    call's and 0, that generates it (None when neither does)."""
    if not any((out / name).is_file() for name in GENERATED):
        return None
    if data_matches(out, settings):
        return settings
    held = dict(settings)
    for key, name in (("num_users", "users.tsv"), ("num_items", "items.tsv")):
        if (out / name).is_file():
            held[key] = len((out / name).read_bytes().splitlines())
    held["seed"] = next((s for s in dict.fromkeys((settings["seed"], 0)) if data_matches(out, {**held, "seed": s})),
                        None)
    return held


def claim_demo_data(out: Path, settings: dict, flags: dict) -> None:
    """Refuse in one line, before anything in ``out`` changes, data generated there with other settings;
    else record the settings (before the first generation, so that a rerun with them finishes it)."""
    record = out / DEMO_SETTINGS
    recorded = read_settings(record) if record.is_file() else None
    held = recorded or settings_of_earlier_data(out, settings)
    if held is not None and held != settings:
        same = " ".join(f"{flags[k]} {held[k]}" for k in SHOWN if flags.get(k))
        settable = all(held[k] == v or (held[k] is not None and flags.get(k)) for k, v in settings.items())
        how = f", or the same settings ({same}) to reuse it" if settable else ""
        raise OutputError(f"{out} holds demo data generated with {describe(held, settings)}, not "
                          f"{describe(settings, held)}; it is not overwritten: use another {flags['out']} for "
                          f"these settings{how}")
    if recorded is None:
        write_json_atomic(record, {"made_by": "iisan demo", "settings": settings})


def prepare_demo_data(out_dir: str | Path, seed: int = 0, progress: bool = True, flags: dict | None = None,
                      **sizes) -> dict[str, str]:
    """Data set, tiny models and image LMDB under ``out_dir``, written again on every call from the same
    settings: the same bytes (a file changed or removed since is restored; the cache and runs that read
    them are kept). The folder must be new, empty or one a demo made (``DEMO_MARKER``): the demo rewrites
    its files by name. Data it holds of other settings (sizes, seed) is refused, never overwritten; ``flags``
    names the command's flags for them in that refusal (default ``DEMO_FLAGS``, ``iisan demo``'s)."""
    flags = {**DEMO_FLAGS, **(flags or {})}
    out = claim_folder(out_dir, DEMO_MARKER, "a demo folder", flags["out"])
    again = (out / DEMO_SETTINGS).is_file()
    claim_demo_data(out, generation_settings(seed, sizes), flags)
    if again:
        log.info("%s: writing the demo's data, models and images again from their settings (the same bytes)", out)
    paths = generate(out, seed=seed, **sizes)
    titles = read_items(paths["items"]).titles
    models = out / "models"
    text_model = write_bert(models / "tiny-bert", vocabulary(titles), hidden=64, layers=4, heads=2, seed=seed)
    image_model = write_vit(models / "tiny-vit", hidden=64, layers=4, heads=2, image_size=224, patch_size=32,
                            seed=seed)
    lmdb_path = out / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb_path, read_items(paths["items"]).ids, progress=progress,
                     overwrite=True)  # the demo folder's own store, rebuilt from the regenerated images
    return {"users": str(paths["users"]), "items": str(paths["items"]), "images": str(lmdb_path),
            "text_model": str(text_model), "image_model": str(image_model)}


def prepare_versa_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """The asymmetric pair: text 6 layers x 64 (7 SAN blocks), image 3 layers x 48 (4 SAN blocks), so
    the text chain runs 3 blocks alone and the inter SAN maps text states 64 -> 48."""
    models = Path(out_dir) / "models"
    titles = read_items(Path(out_dir) / "items.tsv").titles
    text_model = write_decoder(models / "tiny-llama", "llama", titles, hidden=64, layers=6, heads=4,
                               seed=seed)
    image_model = write_vit(models / "tiny-vit-48x3", hidden=48, layers=3, heads=2, image_size=224,
                            patch_size=32, seed=seed)
    return {"text_model": str(text_model), "image_model": str(image_model)}


def demo_config(prepared: dict[str, str], out_dir: str | Path, **overrides) -> Config:
    values = dict(prepared, cache_dir=str(Path(out_dir) / "cache"), out_dir=str(Path(out_dir) / "runs"),
                  feed="cached", epochs=20, patience=5, batch_size=64, lr=1e-3, lr_image=1e-3,
                  lr_text=1e-3, lr_adapter_image=1e-3, lr_adapter_text=1e-3, device="cpu", num_workers=0)
    values.update(overrides)
    # One run folder per seed: rerunning the demo resumes (or just reports) its own run.
    values.setdefault("run_name", f"demo-seed{values.get('seed', 12345)}")
    return Config(**values)


def run_demo(out_dir: str | Path = "demo_data", seed: int = 0, epochs: int = 20, progress: bool = True,
             versa: bool = False, **sizes) -> dict:
    """``sizes``: ``num_users`` / ``num_items`` of the synthetic data (``data.synthetic.generate``)."""
    start = time.perf_counter()
    run_dir = Path(out_dir) / "runs" / ("demo-versa" if versa else f"demo-seed{seed}")
    refuse_fewer_epochs(run_dir, epochs)  # before the data, LMDB and cache are made again
    prepared = prepare_demo_data(out_dir, seed=seed, progress=progress, **sizes)
    method, extra = "IISAN", {}
    if versa:
        prepared.update(prepare_versa_models(out_dir, seed))
        method = "IISAN-Versa"
        extra = {"cache_dir": str(Path(out_dir) / "cache-versa")}
    cfg = demo_config(prepared, out_dir, epochs=epochs, seed=seed, progress=progress, run_name=run_dir.name, **extra)
    refuse_copied_run(Path(cfg.out_dir) / cfg.run_name, cfg)
    build_cache_from_config(cfg, dtype="float32", overwrite=True, reuse=True)  # kept, unless --seed changed the models
    results = train(cfg)  # named here, so a Ctrl-C's hint is only to run the same command again
    data = load_data(cfg)
    popular = {split: popularity_metrics(data, split) for split in ("valid", "test")}
    elapsed = time.perf_counter() - start
    rows = [(method.replace("IISAN-", "") + " (cached)", results["valid"], results["test"]),
            ("most popular", popular["valid"], popular["test"])]
    print(file=sys.stderr)  # sets the table off the log lines above it; redirected, stdout starts with the table
    print(f"{method} demo: {data.num_users} users, {data.num_items} items, synthetic titles and images, "
          f"tiny random encoders; best epoch {results['best_epoch']}")
    if versa:
        print(describe_pair(cfg) + f"; trainable params {results['parameters']['trainable']:,}")
    header = [f"{split} {label(m)}" for split in ("valid", "test") for m in HEADLINE]
    print(f"{'method':<15}" + "".join(f"  {h}" for h in header))
    for name, *splits in rows:
        cells = [fixed(split[m]) for split in splits for m in HEADLINE]
        print(f"{name:<15}" + "".join(f"  {c:>{len(h)}}" for c, h in zip(cells, header, strict=True)))
    beats = all(results["test"][m] > popular["test"][m] for m in HEADLINE)
    print(f"{method} {'beats' if beats else 'does NOT beat'} the most-popular baseline on test; "
          f"{elapsed:.0f} s in all; results in {results['run_dir']}/results.json")
    return {"iisan": results, "popularity": popular, "beats_popularity": beats, "seconds": elapsed}


def refuse_fewer_epochs(folder: Path, epochs: int) -> None:
    """The demo's run in ``folder`` has trained more than ``epochs`` epochs: it cannot go on with fewer (its
    results hold them all). Said before the demo's work, in the demo's words (the trainer's name --run-name
    and a config file, which the demo has not)."""
    try:
        trained = parse_json((folder / "results.json").read_text(encoding="utf-8"))["epochs"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not a run's: the trainer judges
        return
    if isinstance(trained, list) and len(trained) > epochs:
        raise ConfigError(f"--epochs {epochs}: {folder} has trained {len(trained)} epochs already; give at least "
                          "that many to go on with it, or another --out")


def refuse_copied_run(folder: Path, cfg: Config) -> None:
    """The demo's run folder holds a run of another demo folder's files (the folder was copied): it can be
    neither resumed nor reported as this one's, so the demo stops before its work, saying what to do."""
    try:
        users = parse_json((folder / "config.json").read_text(encoding="utf-8")).get("users")
    except (OSError, ValueError, AttributeError):  # none yet, or not a config: the trainer judges it
        return
    if isinstance(users, str) and Path(users).resolve() != Path(cfg.users).resolve():
        raise OutputError(f"{folder} holds the run of the demo in {Path(users).parent} (a copied folder?), not of "
                          f"this one: move {folder} away to train the demo here, or use another --out")


def describe_pair(cfg: Config) -> str:
    parts = []
    for m in ("text", "image"):
        spec = read_spec(model_name(cfg, m), m)
        parts.append(f"{m}: {spec.model_type} {spec.depth} layers x {spec.width}, "
                     f"SAN reads states {list(layers_for(cfg, m, spec.depth))}")
    return "; ".join(parts)
