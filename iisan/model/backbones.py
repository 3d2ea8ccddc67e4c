"""Text and image backbone towers from transformers, and their pooled per-layer hidden states.

Hidden-state index 0 is the embedding output, index i the output of layer i (``output_hidden_states``
gives depth + 1 states). For ViT the last of them is taken *before* the final LayerNorm; IISAN's SANs
read these states, while the baselines' heads read the final (LayerNormed) CLS (``final_cls``).
Decoder LLMs in transformers 5 (LLaMA, Qwen2) report their last state *after* the final norm.
Widths and depths always come from the loaded model's config (GPT-2's ``n_layer``/``n_embd`` too).

IISAN-Versa accepts any pair (``families``): BERT-family text towers pool their CLS token, decoder LLMs
and T5's encoder (loaded without its decoder) the mean over real tokens or the last real token (right
padding, so padding never changes a title's state), or, as the authors' LLM preprocessing does
(``authors``), the mean over every position, padding included; image towers (ViT, DeiT, DINOv2, CLIP
vision) their CLS token, and SigLIP, which has none, the mean over its patches (its final states, as
``SiglipForImageClassification`` pools them, for the baselines' heads; its attention-pooling head, which
nothing reads, is dropped as ViT's pooler is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from .. import once
from ..config import choices
from ..errors import EncoderError
from .encoder_files import local_folder, processor_file
from .encoder_loading import load_from_folder, load_tokenizer
from .families import (
    INTERPOLATING,
    NORM_AFTER_POOLING,
    TEXT_DECODERS,
    TEXT_ENCODER_HALVES,
    check_architecture,
    model_class,
    one_tower,
    resolve_pooling,
    tower_config,
)
from .inputs import processor_norm, tokenize_for_pooling
from .layer_rules import MAX_DEPTH, check_layers
from .patches import patches_as_matmul

if TYPE_CHECKING:  # an annotation only: importing it brings transformers' tokenizer code
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def depth_and_width(config, name: str = "") -> tuple[int, int]:
    """Layers and width of a transformers config (BERT's names or GPT-2's); ``name`` (folder or id) names
    the config.json in the error when they are missing, not positive integers or too many layers."""
    config = getattr(config, "text_config", None) or config
    depth = getattr(config, "num_hidden_layers", getattr(config, "n_layer", None))
    width = getattr(config, "hidden_size", getattr(config, "n_embd", None))
    where = f"{name}: " if name else ""
    if depth is None or width is None:
        raise EncoderError(f"{where}cannot read depth and width from a {type(config).__name__}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (depth, width)):
        raise EncoderError(f"{where}its config.json gives {depth!r} layers of width {width!r}; expected positive "
                           "integers (num_hidden_layers, hidden_size)")
    if depth > MAX_DEPTH:  # built, they would take minutes and all memory before the weights could refuse
        raise EncoderError(f"{where}its config.json gives {depth:,} layers; no encoder has more than {MAX_DEPTH}")
    return depth, width


@dataclass
class EncoderSpec:
    """What a cache or a model needs to know about an encoder without loading its weights."""

    name: str
    model_type: str
    depth: int
    width: int
    dtype: str = "float32"  # the checkpoint's stored precision (LLMs usually ship in bfloat16)
    vocab_size: int | None = None  # rows of a text tower's token embedding (``load_tokenizer`` checks against it)


def read_spec(name: str, modality: str, allow_download: bool = False) -> EncoderSpec:
    """The encoder's architecture, depth, width and stored precision, from its config alone; an
    architecture IISAN cannot use as this tower is refused here, before any weight is read."""
    config = load_from_folder(AutoConfig, name, f"{modality} encoder config", allow_download)
    check_architecture(config.model_type, modality, name)
    stored = getattr(config, "dtype", None)  # transformers 5 reads a legacy torch_dtype into it
    vocab = getattr(getattr(config, "text_config", None) or config, "vocab_size", None)
    config = tower_config(config, modality)
    depth, width = depth_and_width(config, name)
    return EncoderSpec(name, config.model_type, depth, width, str(stored or "float32").replace("torch.", ""),
                       vocab if modality == "text" and isinstance(vocab, int) and vocab > 0 else None)


HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
IMAGE_NORMS = choices("image_norm")  # --image-norm
# Encoders whose transformers code builds the attention mask with ``create_bidirectional_mask``, which
# passes a mask that is already 4D through unchanged (``masking_utils._preprocess_mask_arguments``).
PREPARED_MASK_MODELS = frozenset({"bert", "roberta", "camembert", "xlm-roberta", "electra", "ernie"})


def resolve_encoder_dtype(choice: str, name: str, modality: str, device: torch.device,
                          allow_download: bool = False) -> torch.dtype:
    """The precision frozen encoder weights are loaded in. 'auto': fp32 on the CPU (exact; half math is often
    emulated there: a half choice is warned of); on a GPU the checkpoint's own when half (a 70B LLM in fp32 would
    not fit), else fp32 (BERT and ViT checkpoints are stored in fp32)."""
    if choice != "auto":
        if choice in HALF and device.type == "cpu" and once.first("half encoders on a CPU", choice):
            log.warning("--encoder-dtype %s on a CPU: often emulated there, slower than fp32 (auto's)", choice)
        return {"float32": torch.float32, **HALF}[choice]
    if device.type != "cuda":
        return torch.float32
    return HALF.get(read_spec(name, modality, allow_download).dtype, torch.float32)


class BackboneEncoder(nn.Module):
    """A backbone tower (a transformers encoder) returning pooled states of chosen layers: frozen for IISAN
    and the cache (the loaders ``freeze`` it), trained by the baselines (FFT, Adapter, LoRA, BitFit).

    ``modality`` is 'text' (inputs: token ids and attention mask) or 'image' (inputs: normalised
    pixels). Pooling for text: 'cls' (BERT family), 'mean' over real tokens, or 'last' real token
    (decoder LLMs), or 'authors': the mean over all positions, padding included (their LLaMA caches;
    titles then come from ``inputs.tokenize_titles_as_authors_llm``); images the CLS token, or the mean
    over every patch for towers without one (SigLIP).
    """

    def __init__(self, model: nn.Module, modality: str, layers: tuple[int, ...], pooling: str = "cls",
                 name: str = "", *, folder: Path | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 norm: dict | None = None):
        super().__init__()
        self.model = model
        self.modality = modality
        self.name = name
        self.depth, self.width = depth_and_width(model.config)
        check_layers(layers, self.depth, modality)
        self.layers = tuple(layers)
        self.pooling = pooling
        self.folder = folder  # where its files are (the cache records their digest)
        self.tokenizer = tokenizer  # text: what ``title_inputs`` tokenizes with
        self.norm = norm  # image: {'mean', 'std', 'size'} from the image processor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def title_inputs(self, titles: list[str], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's (ids, attention) for ``titles`` at ``tokens`` tokens, for its pooling; titles
        longer than the encoder's learned positions are refused."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        # RoBERTa's family numbers positions from its pad id + 1 (514 positions, 512 tokens)
        table = getattr(getattr(self.model, "embeddings", None), "position_embeddings", None)
        skipped = table.padding_idx + 1 if isinstance(table, nn.Embedding) and table.padding_idx is not None else 0
        if isinstance(positions, int) and positions > 0 and tokens > (limit := positions - skipped):  # (<= 0: none)
            raise EncoderError(f"title_tokens={tokens} is more than the text encoder {self.name} takes "
                               f"(max_position_embeddings {positions}" + (f", numbered from {skipped}" if skipped
                               else "") + f"); use --title-tokens {limit} or fewer")
        return tokenize_for_pooling(self.tokenizer, titles, tokens, self.pooling)

    def model_inputs(self, inputs: dict) -> dict:
        """``inputs`` as the model gets them. A BERT-family text tower gets its attention mask ready-made,
        in the 4D form and with the values transformers would build from the 2D mask. Built there, the mask
        costs a read-back from the device (are all titles unpadded? then no mask, and flash attention),
        which makes the host wait for the device once per text forward instead of queueing ahead. Pooling
        keeps the 2D mask."""
        mask = inputs.get("attention_mask")
        config = self.model.config
        implementation = getattr(config, "_attn_implementation", None)
        if (mask is None or mask.dim() != 2 or getattr(config, "model_type", "") not in PREPARED_MASK_MODELS
                or getattr(config, "is_decoder", False) or implementation not in ("sdpa", "eager")):
            return inputs
        n, T = mask.shape
        keep = mask.bool()[:, None, None, :].expand(n, 1, T, T)  # (n, 1, T, T): query i may read key j
        if implementation == "eager":  # added to the attention scores: 0 or the dtype's lowest value
            keep = torch.where(keep, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        return {**inputs, "attention_mask": keep}

    def forward_states(self, **inputs) -> tuple[torch.Tensor, ...]:
        """Run the model: all depth + 1 hidden states (index 0: the embeddings), which live only for one chunk
        of items; callers keep the selected, pooled ones (``layer_states``)."""
        who = self.name or type(self.model).__name__
        try:
            out = self.model(**self.model_inputs(inputs), output_hidden_states=True, return_dict=True)
        except TypeError as err:  # a forward without the standard keyword arguments, or needing others
            raise EncoderError(f"{who}'s forward does not take the inputs a tower is given ({err})") from None
        hidden = getattr(out, "hidden_states", None)
        if hidden is None:
            raise EncoderError(f"{who} returns no hidden states (output_hidden_states is not supported); "
                               "IISAN needs one state per layer")
        if len(hidden) != self.depth + 1:
            raise EncoderError(f"{who} returned {len(hidden)} hidden states, expected depth + 1 = {self.depth + 1}")
        if (index := next((i for i, h in enumerate(hidden) if h.shape[-1] != self.width), None)) is not None:
            raise EncoderError(f"{who}: hidden state {index} is {hidden[index].shape[-1]} wide, not the config's "
                               f"{self.width}; a SAN reads every state at one width (a model that projects its "
                               "embeddings or its last state to another width cannot be a tower)")
        if (index := next((i for i, h in enumerate(hidden) if h.shape[1] != hidden[0].shape[1]), None)) is not None:
            raise EncoderError(f"{who}: hidden state {index} has {hidden[index].shape[1]} positions, state 0 "
                               f"{hidden[0].shape[1]}; every state is pooled over the same positions (a model that "
                               "shortens its sequence between blocks cannot be a tower)")
        return hidden

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, T, d) -> (n, d). Only real tokens count, so appending padding never changes the result;
        a row without any real token (an empty title with no special tokens) pools to zeros. Except
        'authors': every position counts, padding too, as in the authors' LLM caches."""
        if self.pooling == "authors":  # authors' LLM preprocessing: torch.mean(layer[i], dim=0)
            return hidden.mean(1)
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:  # an image: every position is a patch
            return hidden.mean(1) if self.pooling == "mean" else hidden[:, 0]
        real = attention_mask.bool().unsqueeze(-1)  # (n, T, 1)
        # where, not a product: whatever a model leaves at padded positions (even NaN) never leaks in
        hidden = torch.where(real, hidden, hidden.new_zeros(()))
        if self.pooling == "mean":
            return hidden.sum(1) / real.sum(1).clamp_min(1).to(hidden.dtype)
        T = attention_mask.shape[1]
        positions = torch.arange(T, device=hidden.device).expand_as(attention_mask)
        last = torch.where(attention_mask.bool(), positions, -1).amax(1).clamp_min(0)  # last real token, (n,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # zeros when none is real

    def layer_states(self, **inputs) -> torch.Tensor:
        """(n, len(layers), width): pooled state of every selected hidden-state index."""
        hidden = self.forward_states(**inputs)
        mask = inputs.get("attention_mask")
        return torch.stack([self.pool(hidden[i], mask) for i in self.layers], dim=1)

    def final_cls(self, **inputs) -> torch.Tensor:
        """(n, width): the pooled final output (ViT and SigLIP: after their final LayerNorm; CLIP's vision
        tower leaves its own, ``post_layernorm``, to its pooled token: applied here) for the baselines' heads."""
        out = self.model(**self.model_inputs(inputs), return_dict=True)
        pooled = self.pool(out.last_hidden_state, inputs.get("attention_mask"))
        if self.model.config.model_type in NORM_AFTER_POOLING:
            return self.model.post_layernorm(pooled)
        return pooled


def _load_tower(spec: EncoderSpec, modality: str, dtype: torch.dtype | None, allow_download: bool) -> nn.Module:
    """``spec``'s weights in ``dtype`` (fp32 unless given); of a CLIP-style dual model, the ``modality`` tower;
    of an encoder-decoder (T5), the encoder alone."""
    # transformers 5 loads a checkpoint in its stored precision by default (bf16 for most LLMs)
    model = load_from_folder(model_class(spec.model_type), spec.name, f"{modality} encoder", allow_download,
                             dtype=dtype or torch.float32, use_safetensors=True)
    return one_tower(model, modality)


def load_text_encoder(name: str, layers: tuple[int, ...], pooling: str = "auto", dtype: torch.dtype | None = None,
                      allow_download: bool = False) -> BackboneEncoder:
    """A ``BackboneEncoder`` with its tokenizer; weights frozen, model in eval mode, fp32 unless ``dtype``.

    BERT-family encoders pool their CLS token; decoder LLMs (LLaMA, Qwen, GPT-2, ... through
    ``AutoModel``) and T5's encoder the mean over real tokens ('auto'), the last real token ('last') or, as
    the authors' LLM caches, the mean over every position, padding included ('authors')."""
    spec = read_spec(name, "text", allow_download)  # refuses an unsupported architecture before loading weights
    tokenizer = load_tokenizer(name, spec.vocab_size, allow_download)  # none, or another model's: refused
    model = _load_tower(spec, "text", dtype, allow_download)
    pooling = resolve_pooling(pooling, model.config.model_type)
    if pooling == "cls" and model.config.model_type in TEXT_DECODERS:
        log.warning("%s looks like a causal decoder: its first token sees only itself, so cls pooling "
                    "carries almost no title information; use --text-pooling mean or last", name)
    if pooling == "cls" and model.config.model_type in TEXT_ENCODER_HALVES:
        log.warning("%s has no CLS token: cls pooling reads the state of a title's first word; use "
                    "--text-pooling mean", name)
    encoder = freeze(BackboneEncoder(model, "text", layers, pooling, name, folder=local_folder(name, allow_download),
                                     tokenizer=tokenizer))
    if tokenizer.pad_token is None:  # decoder LLMs often ship without one; masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise EncoderError(f"tokenizer of {name!r} has no pad, eos or unk token to pad titles with")
    # Right padding: real tokens keep positions 0..n-1 and (causal attention) never see the padding, so a
    # title's states do not depend on how much follows; right truncation: a title keeps its first tokens.
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    return encoder


def load_image_encoder(name: str, layers: tuple[int, ...], dtype: torch.dtype | None = None,
                       patch_embedding: str = "matmul", allow_download: bool = False,
                       image_norm: str = "processor") -> BackboneEncoder:
    """A ``BackboneEncoder`` with ``.norm`` = dict(mean, std, size, rule) from the model's image processor;
    weights frozen, model in eval mode, fp32 unless ``dtype``. ``patch_embedding``: 'matmul' computes the
    patch-embedding convolution as a matmul over patches (``PatchProjection``; the same map), 'conv' keeps
    the model's own convolution. ``image_norm``: 'processor' normalises pixels with the processor's mean
    and std, 'authors' with 0.5 and 0.5 whatever the tower (the authors' Versa code)."""
    if image_norm not in IMAGE_NORMS:
        raise ValueError(f"image_norm {image_norm!r} is not one of {', '.join(IMAGE_NORMS)}")
    spec = read_spec(name, "image", allow_download)  # refuses an unsupported architecture before loading weights
    processor = load_from_folder(transformers.AutoImageProcessor, name, "image processor", allow_download)
    model = _load_tower(spec, "image", dtype, allow_download)
    drop_pooler(model)
    if patch_embedding == "matmul":
        patches_as_matmul(model)
    folder = local_folder(name, allow_download)
    file = processor_file(folder)
    side = getattr(model.config, "image_size", None)
    norm = processor_norm(processor, name, side or 224, image_norm, file)
    if side and norm["size"] != side and model.config.model_type not in INTERPOLATING:
        raise EncoderError(f"image encoder {name!r}: its {file} sizes images to {norm['size']} pixels, its "
                           f"config.json's image_size is {side} (what its position embeddings are for); make the "
                           "two agree")
    pooling = resolve_pooling("auto", model.config.model_type, "image")
    return freeze(BackboneEncoder(model, "image", layers, pooling, name, folder=folder, norm=norm))


def architecture(name: str, modality: str) -> nn.Module:
    """The model ``load_text_encoder`` / ``load_image_encoder`` would load from ``name``, built from its
    config alone with random weights (call it under ``torch.device("meta")`` to allocate nothing): what
    parameter counts need, without reading a 70B checkpoint."""
    config = load_from_folder(AutoConfig, name, f"{modality} encoder config")
    check_architecture(config.model_type, modality, name)  # as loading does (``read_spec``)
    depth_and_width(tower_config(config, modality), name)  # a size of 0: one line, not transformers' error
    model = one_tower(model_class(config.model_type).from_config(config), modality)
    return drop_pooler(model) if modality == "image" else model


def drop_pooler(model: nn.Module) -> nn.Module:
    """ViT and DeiT without their pooler, which nothing reads and the authors' ViTForImageClassification
    lacks (AutoModel adds a random one; it would count in "all params"); SigLIP without its attention-pooling
    head, which nothing reads either (its states pool the mean, ``families.MEAN_POOLED_IMAGES``)."""
    if model.config.model_type in ("vit", "deit"):
        model.pooler = None
    if getattr(model, "use_head", False):  # SiglipVisionModel: forward skips the head when use_head is off
        model.use_head = False
        del model.head
    return model


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module
