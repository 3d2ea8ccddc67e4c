"""Tiny random-initialised encoders written with ``save_pretrained``, so tests and the demo go through
the same loading code as real checkpoints, offline. Also the full-size *architectures* (BERT-base,
ViT-B/16) with random weights, for parameter counts and benchmarks without a download.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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

from ..files import usual_permissions
from .encoder_files import quiet_transformers

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

TINY_MARKER = ".iisan-random-model"  # in each folder `iisan make-tiny-models` made (``files.claim_folder``)


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
    out_dir = write_bert_tokenizer(out_dir, vocab)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 4, max_position_embeddings=64)
    torch.manual_seed(seed)
    save_model(BertModel(config), out_dir)
    return out_dir


@quietly
def write_bert_tokenizer(out_dir: str | Path, vocab: list[str]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary itself, not vocab_file: transformers 5 ignores vocab_file and keeps the 5 special
    # tokens only, which makes every word [UNK] (tests/test_tiny_models.py checks a title's tokens)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@quietly
def write_vit(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, image_size: int = 224,
              patch_size: int = 32, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=hidden * 4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    save_model(ViTModel(config, add_pooling_layer=False), out_dir)
    tf.ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(out_dir)
    return out_dir


@quietly
def write_llama(out_dir: str | Path, vocab: list[str], hidden: int = 48, layers: int = 4, heads: int = 4,
                seed: int = 0) -> Path:
    """A tiny decoder LLM (LLaMA architecture) with a word-level tokenizer over ``vocab``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [w for w in vocab if w not in SPECIALS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", padding_side="right")
    tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden * 2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    save_model(LlamaModel(config), out_dir)
    return out_dir


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
    write_bert_tokenizer(text_dir, vocabulary(["a"]) + [f"w{i}" for i in range(bert.config.vocab_size - 6)])
    save_model(bert, text_dir)
    save_model(vit, image_dir)
    tf.ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(image_dir)
    return text_dir, image_dir


# --------------------------------------------------------------------------------------------------
# IISAN-Versa: tiny towers of other families (decoder LLMs, other vision transformers)


@quietly
def write_bpe_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 400,
                        pad: bool = True) -> Path:
    """A byte-level BPE trained on ``texts`` (the LLM tokenizers' kind), saved with ``save_pretrained``.

    ``pad=False`` leaves it without a pad token, like GPT-2 and LLaMA checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([t.lower() for t in texts], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<pad>" if pad else None)
    tokenizer.save_pretrained(out_dir)
    return out_dir


DECODERS = ("llama", "qwen2", "gpt2")


@quietly
def write_decoder(out_dir: str | Path, family: str, texts: list[str], hidden: int = 48, layers: int = 4,
                  heads: int = 4, seed: int = 0) -> Path:
    """A tiny random decoder LLM of ``family`` (llama, qwen2, gpt2) loadable with ``AutoModel``, and a
    BPE tokenizer over ``texts``. GPT-2 gets no pad token, as the real checkpoints ship."""
    out_dir = write_bpe_tokenizer(out_dir, texts, pad=family != "gpt2")
    vocab = len(AutoTokenizer.from_pretrained(out_dir, trust_remote_code=False))
    if family == "gpt2":  # GPT-2 names its sizes n_layer / n_embd / n_head
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
    elif family in ("llama", "qwen2"):
        cls = LlamaConfig if family == "llama" else Qwen2Config
        config = cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden * 2,
                     max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(f"family must be one of {', '.join(DECODERS)}, not {family!r}")
    torch.manual_seed(seed)
    save_model(AutoModel.from_config(config), out_dir)
    return out_dir


IMAGE_FAMILIES = ("vit", "deit", "dinov2", "clip")


@quietly
def write_image_tower(out_dir: str | Path, family: str, hidden: int = 32, layers: int = 2, heads: int = 2,
                      image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny random vision transformer of ``family`` (vit, deit, dinov2, clip: a CLIP vision tower) with
    its family's image processor, loadable with ``AutoModel`` / ``AutoImageProcessor``."""
    if family not in IMAGE_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(IMAGE_FAMILIES)}, not {family!r}")
    if family == "vit":
        return write_vit(out_dir, hidden, layers, heads, image_size, patch_size, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 image_size=image_size, patch_size=patch_size)
    crop = {"height": image_size, "width": image_size}
    if family == "deit":
        config = tf.DeiTConfig(intermediate_size=hidden * 2, **sizes)
        resize = {"height": image_size + 4, "width": image_size + 4}  # resize, then crop: DeiT's recipe
        processor = tf.DeiTImageProcessor(size=resize, crop_size=crop)
    elif family == "dinov2":
        config = tf.Dinov2Config(mlp_ratio=2, **sizes)
        processor = tf.BitImageProcessor(size={"shortest_edge": image_size + 4}, crop_size=crop,
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    else:
        config = tf.CLIPVisionConfig(intermediate_size=hidden * 2, **sizes)
        processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    torch.manual_seed(seed)
    save_model(tf.AutoModel.from_config(config), out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
