"""A tokenizer reads a whole text before it truncates: a title of 30 MB took 4 GB. Titles are cut to whole
words first (``inputs.title_head``); the rows they give are the rows the whole titles give, for every
tokenizer family a tower may bring (WordPiece, byte-level BPE, word-level, T5's), in both layouts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from iisan.data.interactions import read_items
from iisan.model import inputs
from iisan.model.inputs import title_head, tokenize_titles, tokenize_titles_as_authors_llm


def titles_of_every_shape(words: list[str], seed: int = 0) -> list[str]:
    """Titles of real words and of huge ones, joined by runs of spaces, tabs and newlines, some with no blank
    at all, some blank-led or blank-ended; row 0 the padding item."""
    rng = random.Random(seed)
    out = [""]
    for _ in range(120):
        parts = [rng.choice(words) if rng.random() < 0.8 else "x" * rng.randint(20, 300)
                 for _ in range(rng.randint(1, 60))]
        gaps = [rng.choice([" ", "  ", "\t", "\n", " \u00a0 "]) for _ in parts]
        text = "".join(p + g for p, g in zip(parts, gaps))
        out.append(rng.choice([text, text.strip(), " " + text, text.replace(" ", "").replace("\t", "")]))
    return out


@pytest.mark.parametrize("name", ["bert32x2", "llama48x6", "qwen2_40x3", "gpt2_24x4", "t5_32x3"])
@pytest.mark.parametrize("per_token", [1, 3, 7])
def test_heads_give_the_rows_whole_titles_give(towers, tiny, monkeypatch, name, per_token):
    tokenizer = AutoTokenizer.from_pretrained(towers[name])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 ships none (as the encoders set it)
    titles = titles_of_every_shape(read_items(tiny["items"]).titles[1:40])
    whole = tokenize_titles(tokenizer, titles, 8), tokenize_titles_as_authors_llm(tokenizer, titles, 8)
    monkeypatch.setattr(inputs, "TITLE_CHARS_PER_TOKEN", per_token)  # 8 to 56 characters: most titles are cut
    assert sum(title_head(t, 8) is not t for t in titles) > 60
    cut = tokenize_titles(tokenizer, titles, 8), tokenize_titles_as_authors_llm(tokenizer, titles, 8)
    for (ids, mask), (cut_ids, cut_mask) in zip(whole, cut):
        assert torch.equal(ids, cut_ids) and torch.equal(mask, cut_mask)


def test_a_head_ends_a_whole_word_within_the_limit_or_is_the_title():
    assert title_head("red lamp", 1) == "red lamp"  # within 1000 characters
    long = "ab " * 600  # 1800 characters
    assert title_head(long, 1) == ("ab " * 333).rstrip()  # 999 characters; the blank at 1000 ends a word too
    assert title_head("ab " * 333 + "cd", 1) == ("ab " * 333).rstrip()
    assert title_head("a" * 1500, 1) == "a" * 1500  # no blank to cut at: read whole
    assert title_head("a" * 1200 + " b", 1) == "a" * 1200 + " b"
