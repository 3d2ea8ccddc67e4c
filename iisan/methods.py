"""The training methods as data (``METHOD_TABLE``): each method's config name, the paper's name, what kind
of item encoder it trains, its paper settings, which sit below every flag and file in ``precedence.resolve``'s
precedence rule, and the config keys it reads that not every method does (``unread_keys``). ``METHODS``,
``METHOD_NAMES`` and ``METHOD_DEFAULTS`` are views of it. Also the keys a resume may change (``MAY_CHANGE``)."""

from __future__ import annotations

from dataclasses import dataclass

from . import once

# Config keys that may differ between a checkpoint and the run resuming it: they change where or how fast
# things run (patch_embedding, compile, device: the same step, computed another way, with its own random streams
# and rounding: a finished run reused under another compile mode says so, ``train.plan.ran_otherwise``), how long
# the run may go on, or how it reports; not what a step computes. Nor do they name a run folder
# (``train.runnames.config_hash``): --compile off on a CPU, where auto is off too, finds the run of auto.
MAY_CHANGE = frozenset({"epochs", "patience", "device", "num_workers", "eval_batch_size", "encode_batch_size",
                        "out_dir", "run_name", "cache_dir", "progress", "resume", "keep_checkpoints",
                        "checkpoint_every", "deterministic", "patch_embedding", "compile", "report_to",
                        "allow_download"})

# Config keys not every run reads, in groups (a method's ``reads`` names those it does; ``unread_keys``): a key a
# run never reads changes nothing it computes, so it names no other run folder, is not compared on resume and
# shows as '-' in result tables. A key left out of every group is read by every run: a field added later counts
# until it is listed here, never the other way.
SAN_KEYS = frozenset({"text_layers", "image_layers", "layer_groups", "layer_rule", "include_embedding_state",
                      "intra_start", "modality", "fusion", "gate_temperature", "san_heads"})
FROZEN_TOWER_KEYS = frozenset({"cache_dtype", "text_encoder_dropout", "encoder_dtype"})  # the baselines' backbones
# load in fp32, trained or frozen: no --encoder-dtype
LORA_KEYS = frozenset({"lora_rank", "lora_alpha", "lora_random_base", "lora_targets"})
ADAPTER_KEYS = frozenset({"adapter_targets", "adapter_init", "adapter_position"})
BOTTLENECK_KEYS = frozenset({"text_adapter_down", "image_adapter_down"})  # IISAN's side adapters, Houlsby's
# (not dedup_items: which rows a step runs the tower on changes the order its gradients are summed in)
LIVE_SHAPE_KEYS = frozenset({"static_shapes", "item_bucket_growth", "title_multiple"})
ENCODER_KEYS = frozenset({"images", "text_model", "image_model", "text_pooling", "image_norm", "towers",
                          "title_tokens", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text"})
NOT_EVERY_RUN = (SAN_KEYS | FROZEN_TOWER_KEYS | LORA_KEYS | ADAPTER_KEYS | BOTTLENECK_KEYS | LIVE_SHAPE_KEYS
                 | ENCODER_KEYS)
TOWER_KEYS = {  # those of the tower a one-tower run lacks
    "text": frozenset({"images", "image_model", "image_layers", "image_adapter_down", "image_norm"}),
    "image": frozenset({"text_model", "text_layers", "text_adapter_down", "text_pooling", "title_multiple",
                        "text_encoder_dropout"}),
}
ENCODED = ENCODER_KEYS | LIVE_SHAPE_KEYS  # what every method with an item encoder reads (a cached run: below)


@dataclass(frozen=True)
class Method:
    """A training method: its config name, the paper's name (results files, tables), its kind (what its item
    encoder is: san = IISAN's side adapters, baseline = a PEFT method on trained backbones, ``model.baselines.
    APPLY``, id = item-ID embeddings), its paper settings (a key left out keeps its field default) and the keys
    of ``NOT_EVERY_RUN`` it reads."""

    name: str
    paper_name: str
    kind: str  # san, baseline or id
    defaults: dict
    reads: frozenset = frozenset()


# The paper settings come from the authors' run scripts (run_IISAN.py: batch 64, lr 2e-4 recsys, 1e-4 image,
# 5e-5 text, 1e-4 adapters; run_fft.py / run_adapter.py / run_lora.py / run_bitfit.py: batch 32).
METHOD_TABLE = {m.name: m for m in (
    Method("iisan", "IISAN", "san", {"batch_size": 64, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5,
                                      "lr_adapter_image": 1e-4, "lr_adapter_text": 1e-4},
           ENCODED | SAN_KEYS | FROZEN_TOWER_KEYS | BOTTLENECK_KEYS),
    Method("fft", "FFT", "baseline", {"batch_size": 32, "lr": 1e-4, "lr_image": 1e-4, "lr_text": 5e-5}, ENCODED),
    Method("adapter", "Adapter", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_adapter_image": 4e-4,
                                              "lr_adapter_text": 4e-4}, ENCODED | ADAPTER_KEYS | BOTTLENECK_KEYS),
    # LoRA's image/text rates train only the Q/V biases of --lora-random-base (the authors' loralib layers).
    Method("lora", "LoRA", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5,
                                        "lr_adapter_image": 4e-4, "lr_adapter_text": 4e-4}, ENCODED | LORA_KEYS),
    Method("bitfit", "BitFit", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5},
           ENCODED),
    # SASRec over item IDs (no encoder): IISAN's batch and recsys learning rate, which the table trains with.
    Method("id", "SASRec-ID", "id", {"batch_size": 64, "lr": 2e-4}),
)}
METHODS = tuple(METHOD_TABLE)
METHOD_NAMES = {name: m.paper_name for name, m in METHOD_TABLE.items()}
METHOD_DEFAULTS = {name: m.defaults for name, m in METHOD_TABLE.items()}


def side_network(method: str) -> bool:
    """Whether ``method``'s item encoder is a side network over frozen towers (kind san, as IISAN's): the kind
    a cache of hidden states can feed, with modalities and gates, that uses every trainable parameter each step."""
    return method in METHOD_TABLE and METHOD_TABLE[method].kind == "san"


def kept_over(method, script: dict, given: dict) -> str:
    """'' or the settings of an entry script for another method (``script``: its defaults and SWEEP lists) that
    stay over ``method``'s paper defaults, where they differ and ``given`` (the user's keys) leaves them be."""
    ours = METHOD_DEFAULTS.get(method, {}) if isinstance(method, str) else {}
    kept = {k: v for k, v in script.items() if k in ours and k not in given and v not in (ours[k], [ours[k]])}
    if not kept:
        return ""
    name, many = METHOD_NAMES[method], len(kept) > 1
    settings = ", ".join(f"{k}={v}" for k, v in kept.items())
    return (f"; the script's own {settings} {'stay' if many else 'stays'} over {name}'s paper settings ("
            f"{', '.join(f'{k}={ours[k]}' for k in kept)}): give {'them as flags' if many else 'it as a flag'}, or run "
            f"{name}'s own script")


def unread_keys(method: str, towers: str = "both", feed: str = "cached") -> frozenset[str]:
    """The config keys a run of ``method`` (``towers``, ``feed``: as its config says) never reads: those of
    ``NOT_EVERY_RUN`` the method does not read, what its feed skips (a cached run encodes nothing live, a live
    run has no cache) and the missing tower's."""
    reads = METHOD_TABLE[method].reads
    skipped = {"cached": LIVE_SHAPE_KEYS | {"text_encoder_dropout"}, "live": {"cache_dtype"}}
    if "cache_dtype" in reads:  # (only a method that can read a cache has a feed to choose)
        reads = reads - skipped.get(feed, frozenset())
    return frozenset(NOT_EVERY_RUN - reads | TOWER_KEYS.get(towers, frozenset()))


UNREAD = "unread key"  # the ``once`` topic of ``newly_unread``: (key, value, method, towers, feed)


def newly_unread(said: dict, defaults: dict, method: str, towers: str, feed: str) -> list[str]:
    """The keys of ``said`` (what a user gave, each with the value the config took from it: a flag's '4' is 4)
    that such a run never reads, given other than their default and not named before in this process (a sweep
    resolves each point's config: one warning, not one a point)."""
    unread = unread_keys(method, towers, feed)
    return [k for k, v in said.items() if k in unread and v != defaults.get(k)
            and once.first(UNREAD, (k, repr(v), method, towers, feed))]


def named_unread(values: dict, method: str, towers: str, feed: str) -> list[str]:
    """The keys of ``values`` (a run's config) that ``newly_unread`` named in this process for such a run, with
    these values: what its console warned of before the run folder, and its train.log, were opened."""
    return sorted({k for k, v, *run in once.said_under(UNREAD) if run == [method, towers, feed]
                   and repr(values.get(k)) == v})

