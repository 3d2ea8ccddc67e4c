"""From a ``Config`` to encoders, feeds and a model: the one place that wires the pieces together.
Training, parameter counts, benchmarks and using a trained run all build their model here
(``build_model``), so what is counted or evaluated is what was trained. The data a config names is read
by ``data.run_data``; what a cached run accepts of a cache is decided here (``cache_expectation``), as it
depends on the encoder folders, and checked by ``data.cache``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import once
from ..config import DEFAULT_MODELS, Config, model_location
from ..data.batches import PixelSource
from ..data.cache import CacheExpectation, cache_file, encoder_config_hash, load_cache, read_metadata, weights_record
from ..data.interactions import ItemCatalog, SeqRecData
from ..data.run_data import cache_dir, check_data_files, image_store, images_digest, pixel_source
from ..errors import ConfigError, UserError
from ..methods import METHOD_TABLE, side_network
from .backbones import BackboneEncoder, freeze, load_image_encoder, load_text_encoder, read_spec, resolve_encoder_dtype
from .encoder_files import check_folder_readable, local_folder, weights_digest
from .families import resolve_pooling
from .feeds import CachedStates, LiveStates
from .id_embedding import ItemIDEncoder
from .layer_rules import check_layers, group_layers, stride_layers
from .recommender import IISANItemEncoder, Recommender
from .san import SANItemTower
from .tower_settings import tower_settings

log = logging.getLogger(__name__)


def modalities(cfg: Config) -> tuple[str, ...]:
    return ("text", "image") if cfg.towers == "both" else (cfg.towers,)


def check_run_inputs(cfg: Config, trained: bool = False) -> None:
    """The data files exist, and so do the cache files of a cached run, or the encoder folders and the
    image LMDB of a live one: checked before a run claims its folder, so that a missing or mistyped input
    leaves no run folder behind. ``trained``: the run has trained in its folder before (its encoder names
    are its own: ``log_unchecked_encoder``)."""
    check_data_files(cfg)
    if cfg.cached:
        for m in modalities(cfg):
            meta = read_metadata(path := cache_file(cache_dir(cfg), m))
            name = model_name(cfg, m)  # a mistyped encoder name, too (``unknown_encoder``)
            if not trained and local_folder(name, cfg.allow_download) is None and \
                    (why := unknown_encoder(m, name, path, meta.get("encoder", ""))):
                raise ConfigError(why)
    elif cfg.method != "id":  # the encoders run: their folders' configs, and the image LMDB
        for m in modalities(cfg):
            read_spec(model_name(cfg, m), m, cfg.allow_download)
            check_folder_readable(local_folder(model_name(cfg, m), cfg.allow_download), f"{m} encoder")
        if "image" in modalities(cfg):
            image_store(cfg)


def layers_for(cfg: Config, modality: str, depth: int) -> tuple[int, ...]:
    """Explicit ``--text-layers`` / ``--image-layers`` (checked against the encoder's depth), else
    ``layer_groups`` layers by ``layer_rule``: ``stride_layers`` (the authors' lists) or ``group_layers``."""
    tower = tower_settings(cfg, modality)
    if tower.layers:
        check_layers(tower.layers, depth, f"{modality} ({tower.model})")
        return tower.layers
    # Without the embedding state in a block, the authors' remove_first still reads it: it seeds the chain.
    rule = stride_layers if cfg.layer_rule == "stride" else group_layers
    return rule(depth, cfg.layer_groups, cfg.include_embedding_state or seeded_chains(cfg))


def picked_layers(cfg: Config) -> dict[str, tuple[int, ...]] | None:
    """The hidden states each tower's SAN reads under ``cfg`` (none for the baselines and SASRec-ID), by
    the depth its encoder folder, or else its cache, records; None when neither is here to say it."""
    if METHOD_TABLE[cfg.method].kind != "san":
        return {}
    picked = {}
    for m in modalities(cfg):
        try:
            if local_folder(model_name(cfg, m), cfg.allow_download) is not None:
                depth = read_spec(model_name(cfg, m), m, cfg.allow_download).depth
            elif cfg.cached:
                depth = int(read_metadata(cache_file(cache_dir(cfg), m))["depth"])
            else:
                return None
            picked[m] = layers_for(cfg, m, depth)
        except (UserError, KeyError, ValueError):  # an unreadable config.json or cache, layers it lacks
            return None
    return picked


def seeded_chains(cfg: Config) -> bool:
    """Whether the first state read starts each intra chain instead of feeding a block (``intra_start``)."""
    return not cfg.include_embedding_state and cfg.intra_start == "embedding"


def model_name(cfg: Config, modality: str) -> str:
    return tower_settings(cfg, modality).model


def pooling_for(cfg: Config, modality: str, model_type: str) -> str:
    """How a tower's states are pooled per layer: its ``TowerSettings.pooling`` resolved for its family
    (``text_pooling`` for the text tower; the image tower's CLS token, or SigLIP's mean over patches)."""
    return resolve_pooling(tower_settings(cfg, modality).pooling, model_type, modality)


# --------------------------------------------------------------------------------------------------
# feeds


def load_encoders(cfg: Config, device: torch.device | None = None) -> dict:
    """Frozen encoders: in fp32, or with ``device`` in the precision that ``cfg.encoder_dtype`` resolves to
    there (half for an LLM checkpoint on a GPU)."""
    encoders = {}
    # Loading may draw random numbers (transformers initialises weights the checkpoint then replaces, or
    # a pooler it lacks): restored after, so a model built with or without encoders (live or cached
    # IISAN) starts from the same trained weights for one seed.
    with torch.random.fork_rng(devices=[]):
        for m in modalities(cfg):
            encoders[m] = _load_encoder(cfg, m, device)
    return encoders


def _load_encoder(cfg: Config, m: str, device: torch.device | None) -> BackboneEncoder:
    name, fetch = model_name(cfg, m), cfg.allow_download
    spec = read_spec(name, m, fetch)
    precision = resolve_encoder_dtype(cfg.encoder_dtype, name, m, device, fetch) if device else None
    if m == "text":
        return load_text_encoder(name, layers_for(cfg, m, spec.depth), pooling=cfg.text_pooling, dtype=precision,
                                 allow_download=fetch)
    return load_image_encoder(name, layers_for(cfg, m, spec.depth), dtype=precision,
                              patch_embedding=cfg.patch_embedding, allow_download=fetch, image_norm=cfg.image_norm)


def live_states(cfg: Config, item_ids: list[str], titles: list[str], device: torch.device,
                encoders: dict | None = None) -> tuple[LiveStates, PixelSource | None]:
    """The live feed over an item list (index 0 = padding) and, with an image tower, its pixel source."""
    encoders = encoders or load_encoders(cfg)
    live = LiveStates(encoders, *title_tensors(cfg, titles, encoders), cfg.text_encoder_dropout)
    return live.to(device), image_pixels(cfg, item_ids, encoders)


def title_tensors(cfg: Config, titles: list[str], encoders: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The text tower's (ids, attention), (N+1, ``cfg.title_tokens``), or (None, None) without one."""
    if "text" not in encoders:
        return None, None
    # (200,000 titles: some 15 s, said where it is long enough to wonder about)
    log.log(logging.INFO if len(titles) > 50_000 else logging.DEBUG, "tokenising %s titles", f"{len(titles):,}")
    return encoders["text"].title_inputs(titles, cfg.title_tokens)


def image_pixels(cfg: Config, item_ids: list[str], encoders: dict) -> PixelSource | None:
    """The image LMDB's pixels for a live image tower (None without one). A store of another side than the
    tower takes is resized at every batch (a large store costs time, a small one upscales): a warning the first
    time in a process, then an info line of every later run (a sweep's points), so that each train.log says it."""
    if "image" not in encoders:
        return None
    pixels = pixel_source(cfg, item_ids)
    stored, side = pixels.store.size, encoders["image"].norm["size"]
    if stored != side:
        said = (os.path.realpath(cfg.images), stored, side)
        log.log(once.level("image size", said), "%s holds %d x %d images and the image tower takes %d x %d: each "
                "batch's images are resized on the fly; `iisan build-lmdb --size %d` stores them at the tower's size",
                cfg.images, stored, stored, side, side, side)
    return pixels


def cached_states(cfg: Config, data: SeqRecData, device: torch.device, trained: bool = False) -> CachedStates:
    """The cache's tables on ``device``; ``trained``: for a run that trained already (``log_unchecked_encoder``)."""
    tables, stored = {}, {}
    for m in modalities(cfg):
        path = cache_file(cache_dir(cfg), m)
        expected = cache_expectation(cfg, m, path, read_metadata(path), data.catalog, trained)
        table, _ = load_cache(path, expected, data.item_ids)
        # fp16 tables stay fp16 on the GPU (half the memory); on the CPU, fp32 avoids slow half math.
        tables[m] = table.to(device=device, dtype=table.dtype if device.type == "cuda" else torch.float32)
        stored[m] = str(table.dtype).removeprefix("torch.")
    if len(set(stored.values())) > 1:  # one build stores every tower in one precision
        log.warning("%s: %s: the files of two cache builds (an `iisan cache --overwrite` stopped between them?); "
                    "run that command again to make them one", cache_dir(cfg),
                    ", ".join(f"{m}.safetensors is {d}" for m, d in stored.items()))
    return CachedStates(tables, stored)


def cache_expectation(cfg: Config, m: str, path: Path, meta: dict[str, str], catalog: ItemCatalog,
                      trained: bool = False) -> CacheExpectation:
    """What ``cfg`` accepts of the ``m`` cache at ``path`` (metadata ``meta``): its modality and items
    always; with the encoder folder here, its layers, width, config, weights and pooling; without it, only
    its layers (the cache's record stands for the encoder). ``cache_dtype`` auto accepts any precision; a
    text cache's titles must be cut to ``title_tokens`` and read as this run reads them (``catalog``: the
    items file as read)."""
    dtype = None if cfg.cache_dtype == "auto" else cfg.cache_dtype  # auto: the precision it was built in
    encoder_dtype = None if cfg.encoder_dtype == "auto" else cfg.encoder_dtype  # so for the encoders' weights
    title_tokens = str(cfg.title_tokens) if m == "text" else None  # titles cut to another length give other states
    image_norm = cfg.image_norm if m == "image" else None  # pixels normalised otherwise give other states
    # other pixels give other states; a cache built before caches recorded its images says nothing of them
    images = images_digest(cfg) if m == "image" and meta.get("images") else None
    read = {"items_fingerprint": catalog.fingerprint, "titles": catalog.titles_digest if m == "text" else None}
    name = model_name(cfg, m)
    folder = local_folder(name, cfg.allow_download)
    if folder is None:  # the encoder is not on this machine: the cache's own record stands for it
        log_unchecked_encoder(m, name, path, meta.get("encoder", ""), trained)
        # its family, as recorded, resolves the pooling asked for (caches before model_type was recorded: none)
        pooling = pooling_for(cfg, m, meta["model_type"]) if meta.get("model_type") else None
        return CacheExpectation(modality=m, **read, layers=layers_for(cfg, m, int(meta["depth"])), dtype=dtype,
                                encoder_dtype=encoder_dtype, pooling=pooling, title_tokens=title_tokens,
                                image_norm=image_norm, images=images)
    # the cache must come from these weights (digest read only if files changed)
    spec = read_spec(name, m, cfg.allow_download)
    layers = layers_for(cfg, m, spec.depth)
    config_hash = encoder_config_hash(folder)
    pooling = pooling_for(cfg, m, spec.model_type)
    weights = None  # an import records no weights to compare (cache_import)
    if meta.get("source") != "imported":
        weights = weights_digest(folder, weights_record(meta))["digest"]
    return CacheExpectation(modality=m, **read, layers=layers, width=spec.width,
                            encoder=name, encoder_config=config_hash, encoder_weights=weights, pooling=pooling,
                            dtype=dtype, encoder_dtype=encoder_dtype, title_tokens=title_tokens, image_norm=image_norm,
                            images=images)


def log_unchecked_encoder(m: str, name: str, path: Path, recorded: str, trained: bool = False) -> None:
    """Say why a cache whose encoder folder ``name`` is not here is used as recorded, or refuse a name given
    that is neither the cache's encoder (by folder name) nor the default: a typo would otherwise train, and
    config.json (and every table of runs) would name an encoder that never made the states. A run that
    trained already (``trained``: evaluated, recommended from, exported, or going on in its folder) is used
    with a warning: it may predate the refusal, no flag of those commands names an encoder, and a resume
    must name what its checkpoint names."""
    stands_for = recorded_or_default(m, name, recorded)
    if stands_for == "recorded":  # e.g. the authors' stored states, imported
        log.info("%s: no folder %s here to check the cache against; using the cache as recorded", path, name)
    elif stands_for == "default":  # the paper's pair is simply not on this machine
        log.info("%s was built from %s; the %s encoder named, the default %s, is not on this machine: "
                 "training on the cache as recorded", path, recorded, m, name)
    elif trained:
        log.warning("the run's %s_model %s does not exist here and is not the encoder %s was built from (%s): "
                    "using the cache as recorded", m, name, path, recorded)
    else:
        raise ConfigError(unknown_encoder(m, name, path, recorded))


def recorded_or_default(m: str, name: str, recorded: str) -> str:
    """What an encoder name not on this machine stands for: 'recorded' (the folder name of the encoder the
    cache was built from), 'default' (the paper's encoder, however spelt: an entry script gives a full path)
    or '' (neither: a typo, another model)."""
    if Path(str(name)).name == Path(recorded).name:
        return "recorded"
    return "default" if model_location(str(name)).resolve() == model_location(DEFAULT_MODELS[m]).resolve() else ""


def unknown_encoder(m: str, name: str, path: Path, recorded: str) -> str | None:
    """Why a cached run may not name ``name``, an encoder folder not on this machine, for the cache ``path``
    built from ``recorded``; None when it may (``recorded_or_default``)."""
    if recorded_or_default(m, name, recorded):
        return None
    where = "is a file, not a folder," if Path(str(name)).expanduser().is_file() else "does not exist here"
    return (f"--{m}-model {name} {where} and is not the encoder {path} was built from ({recorded}); "
            f"check the name: give the folder you meant, or {recorded} to train on the cache as recorded")


# --------------------------------------------------------------------------------------------------
# models


def san_tower(cfg: Config, shapes: dict[str, tuple[int, int]]) -> SANItemTower:
    """IISAN's item tower over states of ``shapes`` (modality -> (layers, width))."""
    seeded = seeded_chains(cfg)
    if seeded and min(k for k, _ in shapes.values()) < 2:
        raise ConfigError("--no-include-embedding-state with --intra-start embedding needs at least two states "
                          "per tower (one starts the chain, the others feed its blocks)")
    return SANItemTower(
        widths={m: d for m, (_, d) in shapes.items()},
        steps={m: k for m, (k, _) in shapes.items()},
        embedding_dim=cfg.embedding_dim,
        bottleneck={m: tower_settings(cfg, m).adapter_down for m in ("text", "image")},
        modality=cfg.modality, fusion=cfg.fusion, temperature=cfg.gate_temperature, heads=cfg.san_heads,
        seeded=seeded,
    )


def iisan_item_encoder(cfg: Config, data: SeqRecData | None, device: torch.device,
                       encoders: dict[str, BackboneEncoder] | None,
                       trained: bool = False) -> tuple[IISANItemEncoder, PixelSource | None]:
    """IISAN's SAN tower over its feed: the cache (a cached run on data), else the frozen encoders, live
    (on data: with its titles and pixels; without: for the states' shapes alone)."""
    pixels = None
    if cfg.cached and data is not None:
        states = cached_states(cfg, data, device, trained)
    else:
        encoders = encoders or load_encoders(cfg, device=device)
        if data is None:
            states = LiveStates({m: freeze(e) for m, e in encoders.items()})
        else:
            states, pixels = live_states(cfg, data.item_ids, data.titles, device, encoders)
    return IISANItemEncoder(states, san_tower(cfg, states.shapes())), pixels


def build_model(cfg: Config, data: SeqRecData | None, device: torch.device | str,
                encoders: dict[str, BackboneEncoder] | None = None,
                trained: bool = False) -> tuple[Recommender, PixelSource | None]:
    """The recommender for ``cfg.method`` and, when its item encoder reads pixels, their source.

    ``encoders``: already loaded encoders to use instead of ``cfg``'s model folders (e.g. random-weight
    architectures on the meta device for parameter counts). ``data=None`` builds the model for its shape
    only: no popularity, titles or pixels (``iisan params``); a cached IISAN model then takes its state
    shapes from ``encoders``, exactly what a cache built from them would hold. Method ``id`` reads no
    encoder and needs ``data`` (its table has a row per item). ``trained``: the model of a run that trained
    already (``log_unchecked_encoder``)."""
    device = torch.device(device)  # (a name: 'cpu', 'cuda:1')
    if cfg.method == "id":
        if data is None:
            raise ConfigError("method id needs the data set (--users FILE --items FILE): its embedding table "
                              "has one row per item")
        item_encoder, pixels = ItemIDEncoder(data.num_items, cfg.embedding_dim), None
    elif side_network(cfg.method):
        item_encoder, pixels = iisan_item_encoder(cfg, data, device, encoders, trained)
    else:
        from .baselines import baseline_item_encoder  # here: it imports peft (a second), which IISAN never needs

        encoders = encoders or load_encoders(cfg)
        pixels = image_pixels(cfg, data.item_ids, encoders) if data is not None else None
        item_encoder = baseline_item_encoder(cfg, encoders, None if data is None else data.titles)
    popularity = torch.ones(2) if data is None else torch.from_numpy(data.popularity())
    model = Recommender(item_encoder, popularity, cfg.embedding_dim, cfg.max_seq_len,
                        cfg.transformer_blocks, cfg.attention_heads, cfg.drop_rate)
    return model.to(device), pixels


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def parameter_line(model: torch.nn.Module) -> str:
    """peft's canonical line."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def run_parameter_line(cfg: Config, model: torch.nn.Module) -> str:
    """peft's line for a run's model; a cached IISAN model holds no encoder, which the line then says
    (``iisan params`` counts the frozen encoders in its total)."""
    return parameter_line(model) + (" (cached: the frozen encoders are not in the model; `iisan params` counts "
                                    "them in all params)" if cfg.cached else "")
