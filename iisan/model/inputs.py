"""Encoder inputs: stored uint8 pixels to a vision model's normalised input, titles to token ids, and
``EncodedItems``, the base of the two modules that run encoders on a batch's items (the live feed and
the baselines' trained backbones)."""

from __future__ import annotations

import functools
import logging
import math
import re

import numpy as np
import torch
from torch import nn

from .. import once
from ..bounds import finite_number
from ..errors import EncoderError

log = logging.getLogger(__name__)


def pixels_to_input(pixels: torch.Tensor, norm: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised (n, 3, size, size) float, contiguous, on the pixels' device.

    Equivalent to the authors' ToTensor + Normalize; resizes (bilinear) only when the store's size
    differs from the model's. Contiguous on purpose: a plain permute of HWC pixels is channels-last,
    which sends the patch embedding (a conv with 3 input channels) to cuDNN's NHWC kernels, a poor fit
    for 3 channels, forward and, when the backbone trains, backward."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    if x.shape[-1] != norm["size"] or x.shape[-2] != norm["size"]:
        x = nn.functional.interpolate(x, size=(norm["size"], norm["size"]), mode="bilinear",
                                      align_corners=False, antialias=True)
    mean, std = _channel_stats(tuple(norm["mean"]), tuple(norm["std"]), x.device)
    return x.sub_(mean).div_(std).to(dtype)  # in place: x is this call's own (two batch-sized buffers fewer)


def processor_norm(processor, name: str, default_side: int, rule: str,
                   file: str = "preprocessor_config.json") -> dict:
    """``pixels_to_input``'s ``norm`` from an image processor: {'mean', 'std', 'size', 'rule'}. Mean and std
    are the processor's (0 and 1 where it does not normalise), or 0.5 and 0.5 under the authors' rule whatever
    the tower (their Versa code). The side is the crop when the processor crops (DeiT, DINOv2, CLIP), else its
    resize, else ``default_side`` (the config's image_size); stored images are squashed to it (the authors'
    Resize((224, 224)), no crop). Values of a damaged processor ``file`` are refused here, not at the first
    batch, and so is a processor that does not rescale pixels to 0..1 (``pixels_to_input`` does)."""
    where = f"cannot load image processor from {name!r}: its {file} gives"
    rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else None
    if not (finite_number(rescale) and math.isclose(rescale, 1 / 255, rel_tol=1e-6)):
        raise EncoderError(f"{where} do_rescale {getattr(processor, 'do_rescale', True)}, rescale_factor {rescale!r}; "
                           "IISAN feeds the tower pixels rescaled to 0..1 (do_rescale true, rescale_factor 1/255)")
    plain = rule != "authors" and getattr(processor, "do_normalize", True) is False  # pixels left at 0..1
    crops = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None)
    key = "crop_size" if crops else "size"
    size = getattr(processor, key, None) or {}
    given = dict(size) if hasattr(size, "get") else size  # a transformers SizeDict lists its values set
    if not isinstance(given, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in given.values() if v is not None):
        raise EncoderError(f"{where} {key} {given!r}; expected positive whole numbers of pixels (height and "
                           "width, or shortest_edge)")
    stats = {}
    for stat in ("mean", "std"):
        value = 0.5 if rule == "authors" else {"mean": 0.0, "std": 1.0}[stat] if plain else \
            getattr(processor, f"image_{stat}", None)
        values = [0.5] * 3 if value is None else [value] * 3 if finite_number(value) else value
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(map(finite_number, values))
                and (stat == "mean" or min(values) > 0)):
            raise EncoderError(f"{where} image_{stat} {value!r}; expected three numbers, one per channel"
                               + (", each above 0" if stat == "std" else ""))
        stats[stat] = list(values)
    side = given.get("height") or given.get("shortest_edge") or default_side
    return {**stats, "size": int(side), "rule": rule}  # the rule is what the cache records


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std on ``device``, made once: making them per batch would copy from pageable
    host memory, which on a GPU waits for all queued work to finish, every step."""
    return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device))


TITLE_CHARS_PER_TOKEN = 1000  # far more than a token covers (BERT reads a word of over 100 as one [UNK])
# The longest head that ends a word at a space, tab or line break: BERT's normaliser deletes some other
# characters that Python calls blanks (\x0b, \x1c, \x85), joining the words on either side into one.
_LAST_WORD_END = re.compile(r"(.*[^ \t\n\r])[ \t\n\r]", re.DOTALL)


def title_limit(max_tokens: int) -> int:
    """The characters of a title read for ``max_tokens`` tokens (``title_head``)."""
    return max_tokens * TITLE_CHARS_PER_TOKEN


def title_head(title: str, max_tokens: int) -> tuple[str, bool]:
    """(``title`` cut to its whole words within ``max_tokens`` x ``TITLE_CHARS_PER_TOKEN`` characters, whether
    the cut fell between words). A tokenizer reads a whole text before it truncates (one title of 30 MB took
    3.4 GB). A word's tokens do not depend on the words after it, so a head cut between words with more
    tokens than are kept begins as the whole title does. A title with no blank there is cut at the limit
    itself; so is one whose head has too few tokens, by the callers: words of thousands of characters, whose
    last token may differ from the whole title's (``_said_cut``)."""
    limit = title_limit(max_tokens)
    if len(title) <= limit:
        return title, True
    found = _LAST_WORD_END.match(title, 0, limit + 1)  # (a blank just past the limit ends a whole word too)
    return (found.group(1), True) if found else (title[:limit], False)


def _said_cut(rough: int, max_tokens: int) -> None:
    if rough:
        log.log(once.level("cut titles", (rough, max_tokens)), "%d titles have fewer than %d tokens in whole words "
                "within their first %d characters (words of thousands of characters): read up to there, their last "
                "token perhaps cut", rough, max_tokens, title_limit(max_tokens))


TITLES_PER_CALL = 10_000  # one tokenizer call over 500k titles held 2.8 GB of its Python objects at once
# The title table's dtypes: a tokenizer's int64 ids and mask took 480 MB at a million items of 30 tokens,
# these 150 MB. No vocabulary comes near int32's 2**31 ids (int16 holds BERT's 30,522, not RoBERTa's 50,265
# or LLaMA 3's 128,256); ``title_inputs`` gives the encoders int64 per batch, as the tokenizer made them.
TOKEN_DTYPE, MASK_DTYPE = torch.int32, torch.bool


def tokenize_titles(tokenizer, titles: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-cased titles -> ``(ids (n, max_tokens), mask (n, max_tokens))`` (``TOKEN_DTYPE``, ``MASK_DTYPE``),
    each a title's first tokens (the tokenizer truncates on the right); ``titles[0]`` is the padding item. Long
    titles are read by their heads (``title_head``). ``TITLES_PER_CALL`` titles at a time, each call's rows
    written into the two tables: no list of every title's lowered text and head, nor parts and their cat."""
    settings = {"max_length": max_tokens, "padding": "max_length", "truncation": True, "return_tensors": "pt"}
    ids = torch.empty((len(titles), max_tokens), dtype=TOKEN_DTYPE)
    mask = torch.empty((len(titles), max_tokens), dtype=MASK_DTYPE)
    rough_titles = 0
    for start in range(0, len(titles), TITLES_PER_CALL):  # each call's per-title objects dropped before the next
        lowered = [t.lower() for t in titles[start:start + TITLES_PER_CALL]]
        heads = [title_head(t, max_tokens) for t in lowered]
        rows = slice(start, start + len(lowered))
        part = tokenizer([head for head, _ in heads], **settings)
        ids[rows], mask[rows] = part["input_ids"], part["attention_mask"]
        rough = [i for i, (title, (head, between)) in enumerate(zip(lowered, heads)) if head is not title
                 and (not between or int(mask[start + i].sum()) < max_tokens)]
        if rough:  # a head that does not fill the row: read up to the limit
            cut = tokenizer([lowered[i][:title_limit(max_tokens)] for i in rough], **settings)
            at = [start + i for i in rough]
            ids[at], mask[at] = cut["input_ids"].to(TOKEN_DTYPE), cut["attention_mask"].to(MASK_DTYPE)
        rough_titles += len(rough)
    _said_cut(rough_titles, max_tokens)
    empty = int((mask[1:].sum(1) == 0).sum())  # row 0 is the padding item
    if empty:
        log.log(once.level("empty titles", empty), "%d titles have no token at all (empty titles and a tokenizer that "
                "adds no special tokens); their pooled text states are zeros", empty)
    return ids, mask


def title_inputs(tokens: torch.Tensor, attention: torch.Tensor, ids: torch.Tensor,
                 columns: int | None = None) -> dict[str, torch.Tensor]:
    """The text tower's inputs for items ``ids`` (n,) from the title table (N+1, T): ``input_ids`` and
    ``attention_mask`` (n, T), or (n, columns) with ``columns``. Titles are right-padded, so columns past
    every title's end hold padding only: cutting them changes no real token's state (attention never
    reads a masked key), only the work. Both int64 (the table's compact dtypes widened per batch)."""
    if columns is not None:
        tokens, attention = tokens[:, :columns], attention[:, :columns]
    return {"input_ids": tokens[ids].long(), "attention_mask": attention[ids].long()}


def title_lengths(attention: torch.Tensor) -> np.ndarray:
    """(N+1, T) attention mask -> (N+1,) on the host: each title's last real column + 1 (its length when
    right-padded; a left-padded title counts as full, so it is never cut)."""
    positions = torch.arange(1, attention.shape[1] + 1, device=attention.device)
    return (attention.bool() * positions).amax(1).cpu().numpy()


def tokenize_titles_as_authors_llm(tokenizer, titles: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Titles -> ``(ids (n, max_tokens), mask (n, max_tokens))`` (``TOKEN_DTYPE``, ``MASK_DTYPE``) as the authors'
    LLM preprocessing (``preprocess_llama-3-70b_*.py``) makes them: titles as written (not lower-cased; their line
    ``strip`` drops trailing blanks), the tokenizer's special tokens (LLaMA: BOS) added, cut to
    ``max_tokens`` and right-padded with id 0, whatever the tokenizer's pad token. They pass no
    attention mask, so every position attends as a real token: the mask returned is all ones.
    ``titles[0]`` is the padding item."""
    rows, rough = [], 0
    for title in titles:
        head, between = title_head(title, max_tokens)
        ids = tokenizer(head.rstrip(), add_special_tokens=True)["input_ids"]
        filled = len(ids) > max_tokens  # (a special token at the end is not the title's: one more is needed)
        if head is not title and not (between and filled):
            rough += 1
            ids = tokenizer(title[:title_limit(max_tokens)].rstrip(), add_special_tokens=True)["input_ids"]
        ids = ids[:max_tokens]
        rows.append(ids + [0] * (max_tokens - len(ids)))
    _said_cut(rough, max_tokens)
    ids = torch.tensor(rows, dtype=TOKEN_DTYPE)
    return ids, torch.ones_like(ids, dtype=MASK_DTYPE)


def tokenize_for_pooling(tokenizer, titles: list[str], max_tokens: int,
                         pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tower's inputs for its pooling: the authors' LLM inputs for 'authors', else ours."""
    if pooling == "authors":
        return tokenize_titles_as_authors_llm(tokenizer, titles, max_tokens)
    return tokenize_titles(tokenizer, titles, max_tokens)


class EncodedItems(nn.Module):
    """Encoders by modality and the title table (``tokens``/``attention`` (N+1, T), indexed by item),
    with what running them on an ``ItemBatch`` takes: the rows they run on, each encoder's inputs for
    those rows, and their outputs spread back to every row of the batch, padding (index 0) as zeros.

    Padding never reaches the loss: without static shapes it never runs (only the real rows do); with
    them (``encode_all``, the row count a bucket size) every row runs and the padding rows' outputs are
    masked to zeros after, so no gradient flows through them."""

    def __init__(self, encoders: dict, tokens: torch.Tensor | None, attention: torch.Tensor | None):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("attention", attention, persistent=False)

    def title_lengths(self) -> np.ndarray | None:
        """(N+1,) real tokens per title on the host, or None without a text tower."""
        return None if self.attention is None else title_lengths(self.attention)

    @staticmethod
    def rows(items) -> torch.Tensor | None:
        """The positions in ``items.ids`` the encoders run on; None: every row (static shapes)."""
        return None if items.encode_all else items.real_positions()

    def inputs(self, name: str, items, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Encoder ``name``'s keyword inputs for the rows ``rows`` of ``items``."""
        ids = items.ids if rows is None else items.ids[rows]
        if name == "text":
            return title_inputs(self.tokens, self.attention, ids, items.title_columns)
        encoder = self.encoders[name]
        pixels = items.pixels if rows is None else items.pixels[rows]
        return {"pixel_values": pixels_to_input(pixels, encoder.norm, encoder.dtype)}

    def encode(self, name: str, items, run, shape: tuple[int, ...]) -> torch.Tensor:
        """``run(encoder, inputs)``'s (rows, *shape) outputs of encoder ``name`` on the rows it runs on
        (``ItemBatch.tower``: the batch's own, or its distinct items), as (U, *shape) for every row of
        ``items``, padding zeros. A batch without a real item runs nothing."""
        batch, index = items.tower(name)
        rows = self.rows(batch)
        if rows is not None and not len(rows):
            return torch.zeros(len(items.ids), *shape, device=items.ids.device)
        out = self.spread(run(self.encoders[name], self.inputs(name, batch, rows)), batch, rows)
        # index_select, not out[index]: its backward sums a repeated item's rows in a fixed order on a CPU
        # with several threads (indexing's index_put_ does not), so that same seeds give the same gradients
        return out if index is None else out.index_select(0, index)

    @staticmethod
    def spread(values: torch.Tensor, items, rows: torch.Tensor | None) -> torch.Tensor:
        """(rows, ...) outputs of the encoded rows -> (U, ...) for every row of ``items``, padding zeros."""
        if rows is None:
            real = (items.ids != 0).view(-1, *[1] * (values.dim() - 1))
            return torch.where(real, values, 0.0)
        return values.new_zeros(len(items.ids), *values.shape[1:]).index_copy(0, rows, values)
