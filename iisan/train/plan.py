"""How a run's steps run, decided once for the trainer and the benchmark alike (``plan_step``): precision,
eager or compiled (one CUDA graph, torch.compile), which item rows a batch encodes (each distinct item,
each slot that holds one, every slot) and static shapes or not."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .. import once
from ..config import Config
from ..data.shapes import ShapeBuckets
from ..devices import amp_dtype, resolve_device
from ..errors import TrainingError, UserError
from ..model.inputs import EncodedItems
from ..model.recommender import Recommender, in_mode

log = logging.getLogger(__name__)


def use_compile(cfg: Config, device: torch.device) -> str:
    """'off', 'cudagraph' or 'inductor'. auto: CUDA graphs for cached IISAN on a GPU, else eager."""
    if cfg.compile == "auto":
        graphable = device.type == "cuda" and cfg.cached and cfg.amp != "fp16"
        return "cudagraph" if graphable else "off"
    if cfg.compile == "cudagraph" and cfg.amp == "fp16":  # (before the device: a CPU can tell it too)
        raise TrainingError("compile=cudagraph needs amp=bf16 or none (fp16's loss scaling asks the host every "
                            "step); use --amp bf16, or --compile off to run fp16 eager")
    if cfg.compile == "cudagraph" and (device.type != "cuda" or not cfg.cached):
        raise TrainingError("compile=cudagraph needs a CUDA device and cached IISAN (static shapes)")
    return cfg.compile


def ran_otherwise(cfg: Config, results: dict) -> str:
    """'' or, where a finished run's ``results`` are taken for ``cfg`` but ran under another compile mode or
    precision than ``cfg`` comes to here, what that means (``runfolder.reusable_results``): another mode is the
    same step with other random streams (inductor's dropout masks are not eager's) and, under --dedup-items
    auto, another item encoding (a compiled step encodes every slot); --amp auto is fp32 on a CPU and bf16 on a
    GPU, so a run finished on one is another precision's numbers on the other."""
    step = results.get("step") or {}
    said = str(step.get("compiled") or "")  # its last attempt's: "off (cudagraph capture failed)" when a capture
    ran = said.split(" ")[0]  # failed, which another run may meet again
    try:
        device = resolve_device(cfg.device)
        asked = use_compile(cfg, device)
    except UserError:  # refused as the run would be: not this note's to say
        return ""
    notes = ""
    if ran and ran != asked:
        notes += (f"; it ran with compile {said}, and this config's comes to {asked}: its numbers are {ran}'s "
                  f"(random streams, item encoding); another --run-name trains it with {asked}")
    trained, now = step.get("amp"), str(amp_dtype(cfg.amp, device) or "fp32").replace("torch.", "")
    if isinstance(trained, str) and trained and trained != now:
        notes += (f"; it trained in {trained}, and this config's --amp {cfg.amp} comes to {now} here: its numbers "
                  f"are {trained}'s; another --run-name trains it in {now}")
    return notes


def cache_precision(step: dict) -> str:
    """', cache float16' for a cached run (``describe_step``'s ``cache_dtypes``: what cache_dtype auto came to)."""
    return "".join(f", cache {d}" for d in sorted(set((step.get("cache_dtypes") or {}).values())))


def describe_step(step, model: Recommender, plan: StepPlan) -> dict:
    """How steps ran (results.json's ``step``): its ``compiled`` (the step's mode) says whether a CUDA graph
    ran; a cached run also says what precision its cache is stored in (what ``cache_dtype`` 'auto' came to);
    a run with a row per slot, which towers ran on each distinct item once instead (``per_item_towers``). The
    towers whose encoder drew dropout masks while training (the baselines' BERT; none of IISAN's frozen towers
    but under --text-encoder-dropout) say what differs between methods beside their trained parameters."""
    stored, amp = model.cache_dtypes(), plan.amp
    return {"compiled": step.mode, "item_encoding": plan.encoding, "static_shapes": plan.buckets is not None,
            "encoder_dropout": sorted(m for m, drops in dropping_out(model).items() if drops),  # towers masking
            "amp": str(amp).replace("torch.", "") if amp else "fp32", **({"cache_dtypes": stored} if stored else {}),
            **({"towers_by_item": list(plan.per_item)} if plan.per_item else {})}


ENCODING_OF = {"on": "items", "slots": "slots", "off": "all"}  # --dedup-items -> ``CollateTrain``'s encoding


def item_encoding(cfg: Config, compiled: str, model: Recommender) -> str:
    """How a step runs the item tower over a batch (``CollateTrain``): 'items', 'slots' or 'all'. auto: all
    slots for a compiled step (static shapes); each slot that holds an item where training runs dropout
    inside an encoder, so that each slot gets its own mask, as in the authors' code (the baselines' trained
    BERT, IISAN's frozen one under ``text_encoder_dropout``); else each distinct item once."""
    if cfg.dedup_items != "auto":
        return ENCODING_OF[cfg.dedup_items]
    if compiled != "off":
        return "all"
    return "slots" if encoders_drop_out(model) else "items"


def encoders_drop_out(model: Recommender) -> bool:
    """Whether a training step runs dropout of p > 0 inside one of the item tower's encoders."""
    return any(dropping_out(model).values())


def dropping_out(model: Recommender) -> dict[str, bool]:
    """Per encoder of the item tower (by modality), whether a training step runs dropout of p > 0 inside it."""
    found: dict[str, bool] = {}
    with in_mode(model, training=True):
        for inputs in model.item_encoder.modules():
            if isinstance(inputs, EncodedItems):
                for name, encoder in inputs.encoders.items():
                    found[name] = found.get(name, False) or any(drops_out(m) for m in encoder.modules())
    return found


def per_item_towers(encoding: str, model: Recommender) -> tuple[str, ...]:
    """Where a batch has a row per slot ('slots'), the encoders that drop nothing out: they run on each
    distinct item once (the ViT beside the baselines' BERT, ViT-B/16's dropout being 0), as their output is
    the same for every slot of an item; the others keep a row, so a mask, per slot."""
    return tuple(name for name, drops in dropping_out(model).items() if not drops) if encoding == "slots" else ()


RANDOM_DROPS = ("dropout", "drop_prob", "drop_path")  # names of the probabilities modules draw masks with


def drops_out(module: nn.Module) -> bool:
    """A training module that draws random masks: a Dropout of p > 0, an attention that hands a probability
    of its own to a functional dropout (ViT's ``attention_dropout``, CLIP's ``dropout``: floats, not
    modules), or stochastic depth (DINOv2's DropPath, its ``drop_prob``)."""
    if isinstance(module, nn.Dropout):
        return module.training and module.p > 0
    return module.training and any(any(word in name for word in RANDOM_DROPS) and type(value) is float and value > 0
                                   for name, value in vars(module).items())


def shape_buckets(cfg: Config, model: Recommender) -> ShapeBuckets | None:
    """Static shapes of a live step (``cfg.static_shapes``: uncached IISAN and the baselines), or None.
    Cached IISAN takes none: on a GPU its step is already static (every slot, one CUDA graph), and on a
    CPU padding would only add work. The ID baseline reads no content: its rows cost nothing to pad away."""
    if not cfg.static_shapes or cfg.method == "id" or cfg.cached:
        return None
    return ShapeBuckets(cfg.item_bucket_growth, cfg.title_multiple, model.item_encoder.title_lengths(),
                        cfg.title_tokens)


def batch_layout(cfg: Config, compiled: str, model: Recommender) -> tuple[str, ShapeBuckets | None]:
    """How a step's batches are made: which items the tower runs on (``item_encoding``), and static shapes
    or not."""
    return item_encoding(cfg, compiled, model), shape_buckets(cfg, model)


@dataclass(frozen=True)
class StepPlan:
    """How a run's steps run, decided once for the trainer and the benchmark alike (``plan_step``)."""

    amp: torch.dtype | None  # autocast dtype, None for fp32
    compiled: str  # 'off', 'cudagraph' or 'inductor' (``use_compile``)
    encoding: str  # 'items', 'slots' or 'all' (``item_encoding``)
    buckets: ShapeBuckets | None  # static shapes of live steps (``shape_buckets``)
    per_item: tuple[str, ...] = ()  # under 'slots', the towers that run on each distinct item once


def plan_step(cfg: Config, device: torch.device, model: Recommender, processes: int = 1) -> StepPlan:
    """``compile=auto`` compiles single-process runs only: CUDA graphs around DDP's gradient hooks are not
    checked here; ``--compile cudagraph|inductor`` asks for it under torchrun anyway."""
    if cfg.amp in ("bf16", "fp16") and device.type != "cuda":
        log.log(once.level("amp off the GPU", (cfg.amp, device.type)), "--amp %s applies on a CUDA GPU only: on %s "
                "this run computes in fp32 (half precision is often emulated there, and slow)", cfg.amp,
                device.type.upper())
    compiled = "off" if processes > 1 and cfg.compile == "auto" else use_compile(cfg, device)
    encoding, buckets = batch_layout(cfg, compiled, model)
    return StepPlan(amp_dtype(cfg.amp, device), compiled, encoding, buckets, per_item_towers(encoding, model))
