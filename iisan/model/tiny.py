"""Tiny random-initialised encoders written with ``save_pretrained``, so tests and the demo go through
the same loading code as real checkpoints, offline. Also the full-size *architectures* (BERT-base,
ViT-B/16) with random weights, for parameter counts and benchmarks without a download.

Each model folder appears whole or not at all (``model_folder``): it is written into a hidden temporary
sibling, flushed to disk and renamed into place, so a kill mid-write never leaves a partial folder under
the model's name (where ``claims.claim_folder``'s marker would let a rerun take it for finished). A
temporary folder left by a killed writer is removed by the next one. An existing folder is replaced only
when it is one of ours: empty, marked with ``TINY_MARKER`` (which every folder written here gets), or
holding nothing but files of the names written here (a folder written before the marker was).
"""

from __future__ import annotations

import functools
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    ViTConfig,
    ViTModel,
)

from ..bounds import not_utf8
from ..errors import OutputError
from ..files import atomic_path, fsync, remove, stale_temporaries, usual_permissions
from ..locks import OutputLock
from .encoder_files import TINY_MARKER
from .encoder_loading import quiet_transformers

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def quietly(write):
    """A writer without transformers' chatter: no "Writing model shards" bar (``--no-progress`` or not:
    writing a tiny model is instant) and no notice that ViT's processor falls back to PIL without
    torchvision (it is saved as a ViTImageProcessor all the same)."""

    @functools.wraps(write)
    def quiet(*args, **kwargs):
        with quiet_transformers():
            return write(*args, **kwargs)

    return quiet

MARKER_TEXT = "a random model folder, written by IISAN; it may replace this folder\n"


def _ours(folder: Path, written: Path) -> bool:
    """Whether the existing ``folder`` may be replaced by the freshly ``written`` one: it is empty, holds
    the marker, or holds only names the new folder has (a folder written here before the marker was)."""
    names = {p.name for p in folder.iterdir()}
    return TINY_MARKER in names or names <= {p.name for p in written.iterdir()}


@contextmanager
def model_folder(out_dir: str | Path):
    """A fresh hidden folder beside ``out_dir`` to write a model into; when the block succeeds it gets
    ``TINY_MARKER``, is flushed to disk and renamed onto ``out_dir`` (module docstring), and when it
    fails it is removed and ``out_dir`` keeps what it held. One writer at a time (a lock beside it); a
    temporary folder of a writer that was killed is removed first. A write the OS refuses is one
    ``OutputError`` naming ``out_dir``; a link, a file or a folder of someone else's is refused the same way."""
    out_dir = Path(out_dir)
    if (spelt := not_utf8(str(out_dir))) is not None:  # a tokenizer's writer fails on it (a traceback)
        raise OutputError(f"model folder {spelt} is not valid UTF-8, which safetensors and tokenizers cannot open: "
                          "rename it, or give another")
    if out_dir.is_symlink():
        raise OutputError(f"model folder {out_dir} is a symbolic link; give the path it points to")
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(f"model folder {out_dir} is a file, expected a folder")
    lock = out_dir.with_name(f".{out_dir.name}.iisan-lock")
    with OutputLock(lock, f"model folder {out_dir}", "another process is writing it; wait for it to finish"):
        for stale in stale_temporaries(out_dir):  # of writers that were killed (we hold the lock)
            remove(stale)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            yield tmp
            (tmp / TINY_MARKER).write_text(MARKER_TEXT, encoding="utf-8")
            if out_dir.is_dir() and not _ours(out_dir, tmp):
                raise OutputError(f"model folder {out_dir} exists and is not a random model folder IISAN "
                                  f"wrote (no {TINY_MARKER} in it, and files IISAN does not write there); "
                                  "choose another path or move that one away")
            for path in [*tmp.rglob("*"), tmp]:  # on disk before the rename that publishes them
                fsync(path)


def vocabulary(texts: list[str], limit: int = 30000) -> list[str]:
    """Specials plus the lower-cased word and punctuation tokens of ``texts`` (BERT's basic split)."""
    words: dict[str, int] = {}
    for text in texts:
        for token in re.findall(r"\w+|[^\w\s]", text.lower()):
            words[token] = words.get(token, 0) + 1
    ranked = sorted(words, key=lambda w: (-words[w], w))[: limit - len(SPECIALS)]
    return SPECIALS + ranked


def save_model(model, out_dir: Path) -> None:
    """``save_pretrained``, its weights then as readable as any new file (safetensors makes them owner-only)."""
    model.save_pretrained(out_dir)
    usual_permissions(*Path(out_dir).glob("*.safetensors"))


@quietly
def write_bert(out_dir: str | Path, vocab: list[str], hidden: int = 32, layers: int = 2, heads: int = 2,
               seed: int = 0) -> Path:
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 4, max_position_embeddings=64)
    with model_folder(out_dir) as folder:
        _bert_tokenizer(folder, vocab)
        torch.manual_seed(seed)
        save_model(BertModel(config), folder)
    return Path(out_dir)


@quietly
def _bert_tokenizer(folder: Path, vocab: list[str]) -> None:
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary itself, not vocab_file: transformers 5 ignores vocab_file and keeps the 5 special
    # tokens only, which makes every word [UNK] (tests/test_backbones.py checks a title's tokens)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)


@quietly
def write_vit(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, image_size: int = 224,
              patch_size: int = 32, seed: int = 0) -> Path:
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=hidden * 4, image_size=image_size, patch_size=patch_size)
    with model_folder(out_dir) as folder:
        torch.manual_seed(seed)
        save_model(ViTModel(config, add_pooling_layer=False), folder)
        tf.ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(folder)
    return Path(out_dir)


@quietly
def write_llama(out_dir: str | Path, vocab: list[str], hidden: int = 48, layers: int = 4, heads: int = 4,
                seed: int = 0) -> Path:
    """A tiny decoder LLM (LLaMA architecture) with a word-level tokenizer over ``vocab``."""
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [w for w in vocab if w not in SPECIALS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", padding_side="right")
    config = LlamaConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden * 2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with model_folder(out_dir) as folder:
        tokenizer.save_pretrained(folder)
        torch.manual_seed(seed)
        save_model(LlamaModel(config), folder)
    return Path(out_dir)


def base_architectures():
    """BERT-base-uncased and ViT-B/16 (224 px) built from their default configs with random weights."""
    bert = BertModel(BertConfig())  # 12 x 768, vocab 30522: bert-base-uncased
    vit = ViTModel(ViTConfig(image_size=224, patch_size=16), add_pooling_layer=False)  # ViT-B/16
    return bert, vit


@quietly
def write_base_architectures(out_dir: str | Path) -> tuple[Path, Path]:
    """Random-weight BERT-base and ViT-B/16 folders (with a toy tokenizer) for benchmarks offline."""
    out_dir = Path(out_dir)
    bert, vit = base_architectures()
    text_dir, image_dir = out_dir / "bert-base-random", out_dir / "vit-base-random"
    with model_folder(text_dir) as folder:
        _bert_tokenizer(folder, vocabulary(["a"]) + [f"w{i}" for i in range(bert.config.vocab_size - 6)])
        save_model(bert, folder)
    with model_folder(image_dir) as folder:
        save_model(vit, folder)
        tf.ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(folder)
    return text_dir, image_dir


# --------------------------------------------------------------------------------------------------
# IISAN-Versa: tiny towers of other families (decoder LLMs, other vision transformers)


@quietly
def _bpe_tokenizer(folder: Path, texts: list[str], vocab_size: int = 400, pad: bool = True) -> None:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([t.lower() for t in texts], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<pad>" if pad else None)
    tokenizer.save_pretrained(folder)


DECODERS = ("llama", "qwen2", "gpt2")


@quietly
def write_decoder(out_dir: str | Path, family: str, texts: list[str], hidden: int = 48, layers: int = 4,
                  heads: int = 4, seed: int = 0) -> Path:
    """A tiny random decoder LLM of ``family`` (llama, qwen2, gpt2) loadable with ``AutoModel``, and a
    BPE tokenizer over ``texts``. GPT-2 gets no pad token, as the real checkpoints ship."""
    if family not in DECODERS:
        raise ValueError(f"family must be one of {', '.join(DECODERS)}, not {family!r}")
    with model_folder(out_dir) as folder:
        _bpe_tokenizer(folder, texts, pad=family != "gpt2")
        vocab = len(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
        if family == "gpt2":  # GPT-2 names its sizes n_layer / n_embd / n_head
            config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                                bos_token_id=0, eos_token_id=0)
        else:
            cls = LlamaConfig if family == "llama" else Qwen2Config
            config = cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden * 2,
                         max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(seed)
        save_model(AutoModel.from_config(config), folder)
    return Path(out_dir)


@quietly
def write_t5(out_dir: str | Path, vocab: list[str], hidden: int = 32, layers: int = 2, heads: int = 2,
             gated: bool = False, seed: int = 0) -> Path:
    """A tiny random T5 (encoder and decoder, as the Hub's checkpoints are; ``gated``: flan-T5's gated-GELU
    FFN) with a word-level tokenizer over ``vocab`` that ends each text with ``</s>``, as T5's does."""
    words = ["<pad>", "</s>", "<unk>"] + [w for w in vocab if w not in SPECIALS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="right")
    config = tf.T5Config(vocab_size=len(words), d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 2,
                         num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu" if gated else "relu",
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with model_folder(out_dir) as folder:
        tokenizer.save_pretrained(folder)
        torch.manual_seed(seed)
        save_model(tf.T5ForConditionalGeneration(config), folder)
    return Path(out_dir)


IMAGE_FAMILIES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "siglip")


@quietly
def write_image_tower(out_dir: str | Path, family: str, hidden: int = 32, layers: int = 2, heads: int = 2,
                      image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny random vision transformer of ``family`` (``IMAGE_FAMILIES``; clip, siglip: a vision tower) with
    its family's image processor, loadable with ``AutoModel`` / ``AutoImageProcessor``."""
    if family not in IMAGE_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(IMAGE_FAMILIES)}, not {family!r}")
    if family == "vit":
        return write_vit(out_dir, hidden, layers, heads, image_size, patch_size, seed)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 image_size=image_size, patch_size=patch_size)
    crop = {"height": image_size, "width": image_size}
    if family == "deit":
        config = tf.DeiTConfig(intermediate_size=hidden * 2, **sizes)
        resize = {"height": image_size + 4, "width": image_size + 4}  # resize, then crop: DeiT's recipe
        processor = tf.DeiTImageProcessor(size=resize, crop_size=crop)
    elif family.startswith("dinov2"):  # with registers: 4 learned tokens after the CLS, before the patches
        config = (tf.Dinov2Config if family == "dinov2" else tf.Dinov2WithRegistersConfig)(mlp_ratio=2, **sizes)
        processor = tf.BitImageProcessor(size={"shortest_edge": image_size + 4}, crop_size=crop,
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    elif family == "clip":
        config = tf.CLIPVisionConfig(intermediate_size=hidden * 2, **sizes)
        processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    else:  # SigLIP: no CLS token, an attention-pooling head; resized straight to its side, mean = std = 0.5
        config = tf.SiglipVisionConfig(intermediate_size=hidden * 2, **sizes)
        processor = tf.SiglipImageProcessor(size=crop)
    with model_folder(out_dir) as folder:
        torch.manual_seed(seed)
        save_model(tf.AutoModel.from_config(config), folder)
        processor.save_pretrained(folder)
    return Path(out_dir)
