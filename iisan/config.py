"""One typed, validated configuration for every method, feed and entry point.

Unknown keys and wrong types are errors, and the resolved config is written into every checkpoint and
results file (``Config.to_dict``). Which layer of values wins over which (flags, a ``--config`` file, an
entry script's grid, the method's paper defaults, the field defaults below) is ``precedence.resolve``:
``Config(method="fft")`` itself takes the field defaults alone, ``resolve(flags={"method": "fft"})`` FFT's.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .bounds import check_bounds, coerce, not_utf8, said
from .errors import ConfigError, ValuesTogether
from .methods import METHODS, side_network
from .metric_names import SELECTED_BY, label
from .spelling import own_spelling


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def is_checkout(folder: Path) -> bool:
    """``folder`` holds this project's source (its pyproject.toml names iisan), not an installed package's
    site-packages."""
    try:
        return 'name = "iisan"' in (folder / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _repository() -> Path:
    """Where the paper's data sets, encoders and caches go by default (``Dataset/``, ``pretrained_models/``,
    ``Code_Cached/``): the checkout this package runs from; for an installed package (site-packages is no
    place for data) the folder the command started in."""
    if CHECKOUT:
        return SOURCE
    try:
        return Path.cwd()
    except OSError:  # a working folder removed under the process: its relative paths say the same
        return Path(".")


SOURCE = Path(__file__).resolve().parents[1]  # the folder holding the package
CHECKOUT = is_checkout(SOURCE)  # run from this project's source, not installed (``provenance.git_commit``)
REPOSITORY = _repository()
DEFAULT_MODELS = {"text": "pretrained_models/bert-base-uncased", "image": "pretrained_models/vit-base-patch16-224"}
SMOKE_EPOCHS, SMOKE_STEPS = 2, 5
# Fields added after runs were saved whose default is not what those runs did: a saved config (a
# checkpoint's, a run folder's, a results file's) without the field did this (``Config.from_saved``).
BEFORE_THE_FIELD = {"layer_rule": "groups"}
# Fields naming what the safetensors and LMDB libraries open, which take only paths that are valid UTF-8 (the
# users and items files are read by Python, which takes any name).
UTF8_PATHS = ("images", "text_model", "image_model", "cache_dir", "out_dir", "run_name")
PRECISIONS = ("float32", "float16", "bfloat16")  # what encoders may run in and caches be stored in
SHOWN_KEYS = 10  # unknown keys an error names (then "and N more")

@dataclass
class Config:
    # --- data --------------------------------------------------------------------------------------
    users: str = _opt("", "users file: user_id<TAB>item item ... (oldest first), or a CSV of user,item,timestamp")
    items: str = _opt("", "items file: item_id<TAB>title, or a CSV of item,title")
    images: str = _opt("", "LMDB of pre-resized item images (built by `iisan build-lmdb`)")
    max_seq_len: int = _opt(10, "items fed to the user encoder; each user keeps the last max_seq_len + 3")
    min_seq_len: int = _opt(5, "users with fewer interactions are skipped (counted and logged)")
    title_tokens: int = _opt(30, "title length in tokens, [CLS] and [SEP] included")
    allow_empty_titles: bool = _opt(False, "accept empty titles (MicroLens) instead of rejecting the file")
    encoding: str = _opt("utf-8", "text encoding of the users and items files (e.g. latin-1)")
    merge_duplicate_users: bool = _opt(False, "join the lines of a user id that appears on several lines of the "
                                       "users file (in file order) instead of rejecting the file")
    rank_repeated_targets: bool = _opt(False, "keep a target that repeats a history item rankable (paper: masked, "
                                       "so always a miss)")
    # --- encoders ----------------------------------------------------------------------------------
    text_model: str = _opt(DEFAULT_MODELS["text"], "text encoder folder (a Hub id with --allow-download); "
                           "the default is under the checkout (an installed package: the working folder)")
    image_model: str = _opt(DEFAULT_MODELS["image"], "image encoder folder (a Hub id with --allow-download)")
    allow_download: bool = _opt(False, "let a --text-model / --image-model that is not a folder be fetched "
                                "from the Hugging Face Hub (never runs code from it)")
    text_layers: tuple[int, ...] | None = _opt(None, "hidden-state indices fed to the text SAN (0 = embeddings; "
                                               "auto: --layer-rule's, over a --config file's list); "
                                               "default: --layer-rule's choice")
    image_layers: tuple[int, ...] | None = _opt(None, "image SAN's hidden-state indices (auto: as --text-layers); "
                                                "default: --layer-rule's choice")
    layer_groups: int = _opt(6, "how many layers (above the embeddings) automatic layer selection picks; "
                                "all of them in an encoder of fewer layers")
    layer_rule: str = _opt("stride", "automatic layer selection: stride = the last layer and every k-th below it, "
                           "k as large as keeps --layer-groups layers (the authors' lists: 32 layers -> "
                           "2,8,14,20,26,32; 80 -> 5,20,...,80); groups = the last layer of each of --layer-groups "
                           "equal runs (32 -> 5,11,16,21,27,32); both pick 2,4,...,12 of 12 and 4,8,...,24 of 24. The "
                           "paper's 'group layer-dropping' is stride",
                           ("stride", "groups"))
    include_embedding_state: bool = _opt(True, "prepend hidden state 0 to the layers --layer-groups picks, read by "
                                         "the SANs' first block (authors' remove_first=None); explicit --text-layers "
                                         "/ --image-layers are read as listed (list 0 to read it); without it, see "
                                         "intra_start")
    intra_start: str = _opt("embedding", "with --no-include-embedding-state: each intra chain starts from the "
                            "first state read (hidden state 0, or an explicit list's first), which feeds no block "
                            "(the authors' remove_first=TRUE), or from zeros with every state read feeding a block "
                            "(state 0 not read unless listed)", ("embedding", "zeros"))
    text_pooling: str = _opt("auto", "text pooling: cls, mean (over real tokens), last (real token), or "
                             "authors (their LLM caches: mean over all title_tokens positions, padding "
                             "included, pad id 0, no attention mask, titles not lower-cased); auto: cls for "
                             "BERT-family encoders, mean for decoder LLMs", ("auto", "cls", "mean", "last", "authors"))
    text_encoder_dropout: bool = _opt(
        False, "authors' bug: keep BERT dropout active in the frozen uncached text encoder; turns --dedup-items "
        "auto into slots, so that each slot of a batch that holds an item gets its own dropout mask, as theirs did")
    encoder_dtype: str = _opt("auto", "precision of the frozen encoders' weights; auto: fp32 on CPU, on GPU "
                              "the checkpoint's own half precision if it has one (LLMs), else fp32 (bf16, fp16 "
                              "and fp32 are taken too)", ("auto", *PRECISIONS))
    patch_embedding: str = _opt("matmul", "image towers' patch-embedding convolution (kernel = stride) run as "
                                "one matmul over patches (the same map, never at the mercy of cuDNN's kernel "
                                "choice) or as the model's own conv", ("matmul", "conv"))
    image_norm: str = _opt("processor", "image towers' pixel normalisation: processor = each model's image processor "
                           "mean and std (ImageNet's for DeiT, CLIP's for CLIP; 0.5 for ViT-B/16); authors = mean = "
                           "std = 0.5 for every tower, as the authors' Versa code", ("processor", "authors"))
    # --- model -------------------------------------------------------------------------------------
    method: str = _opt("iisan", "training method (id: SASRec over learned item-ID embeddings, no encoder)", METHODS)
    towers: str = _opt("both", "item towers used", ("both", "text", "image"))
    modality: str = _opt("intra_inter", "SANs used by IISAN (not text or image: that is --towers)",
                         ("intra_inter", "intra", "inter"))
    fusion: str = _opt("gated", "how a SAN mixes backbone states into its chain", ("gated", "add"))
    text_adapter_down: int = _opt(64, "bottleneck of the text side-adapter blocks and the text tower's Houlsby "
                                  "adapters; also of the inter blocks unless the image tower is narrower")
    image_adapter_down: int = _opt(64, "bottleneck of the image side-adapter blocks and the image tower's Houlsby "
                                   "adapters; the inter blocks take the narrower tower's bottleneck (the text one "
                                   "for equal widths, as the authors'), so this one only when the image tower is "
                                   "narrower than the text tower")
    gate_temperature: float = _opt(0.1, "gate = sigmoid(theta / temperature)")
    san_heads: str = _opt("auto", "SAN intra heads: iisan (width->width->D), versa (width->D->D; the inter head is "
                          "width->width->D in both); auto: iisan when both towers have the same width or one tower "
                          "is used (a wide LLM alone: versa keeps its head small)", ("auto", "iisan", "versa"))
    embedding_dim: int = _opt(64, "item and user embedding width")
    transformer_blocks: int = _opt(2, "SASRec blocks")
    attention_heads: int = _opt(2, "SASRec attention heads")
    drop_rate: float = _opt(0.1, "SASRec dropout")
    lora_rank: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(1.0, "LoRA alpha (authors: 1, so the scale is 1/8)")
    lora_random_base: bool = _opt(
        False, "authors' bug: LoRA over a fresh Linear of default init (seeded by --seed) in place of each "
        "pretrained target, its weight frozen and its bias trained in the image/text groups (--lr-image, "
        "--lr-text), as their loralib layers (BERT-base + ViT-B/16: 833,600 trainable, not 796,736)")
    lora_targets: str = _opt("query,value", "LoRA targets: roles (query, key, value, attention_output, "
                             "ffn_in, ffn_out) or module-name suffixes (Linear or GPT-2's Conv1D), each for "
                             "both towers or after text: / image: for one (text:c_attn,image:query)")
    adapter_targets: str = _opt("attention_output,ffn_out", "Houlsby adapter positions: roles or module-name "
                                "suffixes, each for both towers or after text: / image: for one")
    adapter_init: str = _opt("authors", "Houlsby adapters' start: authors (both projections N(0, 0.01^2)) or "
                             "identity (up projection zero: each adapter starts as the identity)",
                             ("authors", "identity"))
    adapter_position: str = _opt("after_dropout", "Houlsby adapters in their residual branch: after_dropout "
                                 "(the authors': LN(x + adapter(dropout(dense h)))) or before_dropout "
                                 "(LN(x + dropout(adapter(dense h)))); the same in eval mode and where the "
                                 "dropout is 0 (ViT-B/16)", ("after_dropout", "before_dropout"))
    # --- training ----------------------------------------------------------------------------------
    feed: str = _opt("cached", "where IISAN's backbone states come from", ("cached", "live"))
    cache_dir: str = _opt("", "folder with text.safetensors / image.safetensors (cached feed)")
    cache_dtype: str = _opt("auto", "precision the cache is computed and stored in; auto: float32 (the authors': "
                            "fp32 encoders, no autocast) unless the encoders run in half precision (an LLM "
                            "on a GPU: its own type); float16/bfloat16 over fp32 encoders compute under "
                            "autocast on a GPU, over half encoders in the encoders' own type (stored as asked), "
                            "so the authors' fp16 LLM features need --encoder-dtype float16 too. "
                            "Training refuses a cache of another precision unless this is auto (bf16, fp16 and "
                            "fp32 are taken too)", ("auto", *PRECISIONS))
    batch_size: int = _opt(64, "users per batch")
    epochs: int = _opt(100, "maximum epochs")
    patience: int = _opt(10, f"stop once valid {label(SELECTED_BY)} has not improved for more than this many epochs")
    lr: float = _opt(2e-4, "recsys group: SASRec, heads, com_dense, text and inter gates")
    lr_image: float = _opt(1e-4, "image group: fc_cv, image gates (FFT: ViT weights; BitFit: ViT biases; LoRA "
                           "with --lora-random-base: ViT Q/V biases)")
    lr_text: float = _opt(5e-5, "text group: fc_bert (FFT: BERT weights; BitFit: BERT biases; LoRA with "
                          "--lora-random-base: BERT Q/V biases)")
    lr_adapter_image: float = _opt(1e-4, "image and inter side-adapter blocks (Adapter/LoRA: 4e-4)")
    lr_adapter_text: float = _opt(1e-4, "text side-adapter blocks (Adapter/LoRA: 4e-4)")
    seed: int = _opt(12345, "seed for Python, NumPy and torch (initial weights, dropout) and, under --user-order "
                     "seeded, each epoch's user order")
    user_order: str = _opt("seeded", "each epoch's order of the training users: seeded = drawn from --seed and the "
                           "epoch; authors = the authors' DistributedSampler order, the same for every seed "
                           "(a permutation seeded with the epoch + 1)", ("seeded", "authors"))
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")
    amp: str = _opt("auto", "mixed precision: auto = bf16 on CUDA, none on CPU; fp16 = the authors' (with a "
                    "GradScaler; the step then runs eager); bfloat16, float16 and float32 (= none) are taken too, "
                    "as results show them", ("auto", "none", "bf16", "fp16"))
    compile: str = _opt("auto", "training step: eager (off), one CUDA graph (cudagraph) or torch.compile "
                        "(inductor: it compiles for each batch shape, a minute or more each); auto = cudagraph for "
                        "cached IISAN on CUDA in one process without fp16, else off",
                        ("auto", "off", "cudagraph", "inductor"))
    dedup_items: str = _opt(
        "auto", "how a step runs the item tower over a batch: on = once per distinct item; slots = once per "
        "slot that holds an item (padding once); off = once per slot, padding included (the authors' way); "
        "auto = off for a compiled step, slots where training runs dropout inside an encoder (a mask per "
        "slot, as the authors': the baselines' BERT, --text-encoder-dropout), else on",
        ("auto", "on", "slots", "off"))
    static_shapes: bool = _opt(True, "live steps (uncached IISAN, baselines): pad a batch's distinct items up to a "
                               "bucket size and cut titles to the batch's longest, so that steps meet a few shapes "
                               "(padding is masked: the same losses and gradients, but dropout inside an encoder, "
                               "the baselines' BERT, draws other masks: another draw, not the same bits); off: "
                               "each batch its own")
    item_bucket_growth: float = _opt(0.125, "static shapes: each item-count bucket is at least this fraction above "
                                     "the previous one (a geometric ladder on multiples of 16); 0: no padding rows")
    title_multiple: int = _opt(8, "static shapes: titles are cut to the batch's longest title rounded up to a "
                               "multiple of this many tokens; 0: every title keeps title_tokens tokens")
    num_workers: int = _opt(4, "threads reading images from the LMDB (live feed, baselines, cache builds)")
    eval_batch_size: int = _opt(0, "users per evaluation chunk (0: 128 on CPU, where a chunk's score matrix "
                                "should fit the cache, 2048 on CUDA; fewer past 65k items on CUDA, 1M on CPU, so that "
                                "a chunk's scores stay within 2**27)")
    encode_batch_size: int = _opt(256, "items per chunk when encoding the item table or building a cache")
    max_steps_per_epoch: int = _opt(0, "cap on training steps per epoch (0 = all; smoke runs): steps, not users, "
                                       "so batch 64 (IISAN) sees twice the users of batch 32 (baselines)")
    smoke: bool = _opt(False, f"smoke run of the same config: at most {SMOKE_EPOCHS} epochs of at most "
                       f"{SMOKE_STEPS} steps, full evaluation (checks the wiring before a long run)")
    out_dir: str = _opt("runs", "where run folders go")
    run_name: str = _opt("", "run folder name (default: method, feed, data set and a hash of the config, so "
                         "that running the same command again resumes or skips its run)")
    progress: bool = _opt(True, "show progress bars")
    resume: bool = _opt(False, "insist on continuing from the run folder's newest intact checkpoint (an error when "
                        "there is none; a finished run is reused, as without it); without it (--no-resume too) a "
                        "run folder with checkpoints is resumed anyway: to start over, give another --run-name")
    report_to: str = _opt("none", "also write per-epoch scalars to <run folder>/tensorboard (needs the "
                          "tensorboard package)", ("none", "tensorboard"))
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep (one is written per epoch); 0 = "
                                 "the newest while training, none once the run has finished (best.safetensors "
                                 "stays; a longer run cannot then go on from it): an FFT checkpoint is ~3x its "
                                 "weights")
    checkpoint_every: int = _opt(0, "also checkpoint every N training steps inside an epoch (0: at its end only), "
                                 "for long epochs: a kill or a lost machine then costs at most N steps; each is "
                                 "removed once a newer checkpoint is written, and writing it is not training time")
    fused_adam: bool = _opt(True, "Adam as one fused kernel per learning-rate group (several times faster on a CPU "
                            "for IISAN's ~130 small tensors); --no-fused-adam: torch's loop over the parameters, as "
                            "the authors' code ran it (the same update up to rounding)")
    nonfinite: str = _opt("fail", "a non-finite training loss (or validation metric, as a NaN loss): fail = the "
                          "run stops, marked failed, naming what went non-finite (its last good checkpoint and best "
                          "weights kept); authors = as the authors' code: a NaN ends training with the best epoch "
                          "so far as the result, an infinite loss alone goes on", ("fail", "authors"))
    deterministic: bool = _opt(False, "deterministic CUDA kernels (torch.use_deterministic_algorithms; slower) for "
                               "bit-exact GPU runs; CPU runs are bit-exact without it")

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """``_check`` refuses what is wrong, then ``_normalise`` makes the changes other values imply: in that
        order, the checks read the values as given (towers=text, modality=inter is refused, not made intra)."""
        self._check()
        self._normalise()

    def _check(self) -> None:
        """The refusals, the first found raised; each field is coerced to its type first ("5" -> 5), as they need."""
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, own_spelling(f.name, coerce(f.name, value, hints[f.name])))
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(allowed)}")
        for name in UTF8_PATHS:  # before anything is written under them
            if (spelt := not_utf8(getattr(self, name))) is not None:
                raise ConfigError(f"{name}={spelt} (--{name.replace('_', '-')}) is not valid UTF-8, which safetensors "
                                  "and LMDB cannot open: rename it, or give another")
        check_bounds(self)
        # last: values each fine alone (a --config file's are judged alone first: ``read_config_file``)
        if self.embedding_dim % self.attention_heads:
            raise ValuesTogether(f"embedding_dim={self.embedding_dim} is not divisible by "
                                 f"attention_heads={self.attention_heads}")
        if self.towers != "both" and side_network(self.method) and self.modality == "inter":
            raise ValuesTogether(f"towers={self.towers} needs modality=intra (inter fuses both towers)")

    def _normalise(self) -> None:
        """Values that follow from others: one tower has intra only, a smoke run is shrunk, baselines run live.
        (A value keeps its spelling, as config.json records it: ``spelling.one_spelling`` is how runs compare.)"""
        if self.towers != "both":
            self.modality = "intra"
        if self.smoke:  # big_vision's idea: the smoke run is the real config, shrunk, so it cannot drift
            self.epochs = min(self.epochs, SMOKE_EPOCHS)
            self.max_steps_per_epoch = min(self.max_steps_per_epoch or SMOKE_STEPS, SMOKE_STEPS)
        if not side_network(self.method) and self.feed == "cached":  # baselines train through the backbones
            self.feed = "live"

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:  # (dataclasses.asdict's deep copy of scalars took most of a grid's naming time)
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @property
    def cached(self) -> bool:
        """IISAN reading its backbones' hidden states from the cache (no other method can: ``validate``)."""
        return side_network(self.method) and self.feed == "cached"

    @property
    def order_seed(self) -> int | None:
        """What ``epoch_order`` draws each epoch's user order from: the seed, or None for the authors' order."""
        return self.seed if self.user_order == "seeded" else None

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> Config:
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a dict of config keys, not {said(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:  # the first few, each shown quoted where a character would not show, a long one cut short,
            # with the key it likely misspells ("LR": lr); a file of a million keys is one short line, at once
            def named(key: str) -> str:
                shown = repr(key) if not key.isprintable() or not key.strip() else key
                shown = shown if len(shown) <= 60 else f"{shown[:40]}... ({len(key):,} characters)"
                meant = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.8) if len(key) <= 60 else []
                return shown + "".join(f" (did you mean {m}?)" for m in meant)

            more = f" and {len(unknown) - SHOWN_KEYS:,} more" if len(unknown) > SHOWN_KEYS else ""
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(named, unknown[:SHOWN_KEYS]))}{more}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict, source: str = "config") -> Config:
        """A config this library saved, a field it predates at what it did then (``BEFORE_THE_FIELD``), else
        at its default."""
        return cls.from_dict({**{k: v for k, v in BEFORE_THE_FIELD.items() if k not in values}, **values}, source)


@functools.cache
def field_types(cls: type) -> dict:
    """``cls``'s field types, resolved once (``typing.get_type_hints`` took 1.7 ms, for every Config made)."""
    return typing.get_type_hints(cls)


def choices(name: str) -> tuple[str, ...]:
    """The values Config field ``name`` takes, declared once on the field, for lower modules to check against."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)}[name]


def model_location(name: str) -> Path:
    """Where the encoder folder ``name`` is: a default (``DEFAULT_MODELS``, however spelt: a trailing ``/``, a
    leading ``./``) under the repository, wherever the command runs; any other name as given."""
    return REPOSITORY / name if is_default_model(name) else Path(name).expanduser()


def is_default_model(name: str) -> bool:
    return os.path.normpath(name) in DEFAULT_MODELS.values()
