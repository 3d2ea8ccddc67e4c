"""A tokenizer reads a whole text before it truncates: a title of 30 MB took 3.4 GB. Titles are cut to whole
words first (``inputs.title_head``); the rows they give are the rows the whole titles give, for every
tokenizer family a tower may bring (WordPiece, byte-level BPE, word-level, T5's), in both layouts. Words of
thousands of characters are cut at the limit itself, counted in a warning."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import AutoTokenizer

from iisan.data.interactions import read_items
from iisan.model import inputs
from iisan.model.inputs import title_head, tokenize_titles, tokenize_titles_as_authors_llm

# blanks a head is cut at, and characters Python calls blanks that BERT's normaliser deletes or keeps inside a
# word (a cut there had joined two words into another token)
GAPS = [" ", "  ", "\t", "\n", "\r\n", " \u00a0 ", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u2028", "\u3000"]


def worded_titles(words: list[str], seed: int = 0) -> list[str]:
    """Titles of real words joined by every kind of gap, some blank-led or blank-ended; row 0 the padding item."""
    rng = random.Random(seed)
    out = [""]
    for _ in range(150):
        parts = [rng.choice(words) for _ in range(rng.randint(1, 150))]
        text = "".join(p + rng.choice(GAPS) for p in parts)
        out.append(rng.choice([text, text.strip(), " " + text]))
    return out


def tokenizer_of(towers, name):
    tokenizer = AutoTokenizer.from_pretrained(towers[name])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 ships none (as the encoders set it)
    return tokenizer


@pytest.mark.parametrize("name", ["bert32x2", "llama48x6", "qwen2_40x3", "gpt2_24x4", "t5_32x3"])
@pytest.mark.parametrize("per_token", [25, 40])
def test_heads_give_the_rows_whole_titles_give(towers, tiny, monkeypatch, caplog, name, per_token):
    tokenizer = tokenizer_of(towers, name)
    titles = worded_titles([w for t in read_items(tiny["items"]).titles[1:40] for w in t.split()])
    whole = tokenize_titles(tokenizer, titles, 8), tokenize_titles_as_authors_llm(tokenizer, titles, 8)
    monkeypatch.setattr(inputs, "TITLE_CHARS_PER_TOKEN", per_token)  # 200 or 320 characters: most titles are cut
    assert sum(title_head(t, 8)[0] is not t for t in titles) > 75
    cut = tokenize_titles(tokenizer, titles, 8), tokenize_titles_as_authors_llm(tokenizer, titles, 8)
    for (ids, mask), (cut_ids, cut_mask) in zip(whole, cut):
        assert torch.equal(ids, cut_ids) and torch.equal(mask, cut_mask)
    assert "perhaps cut" not in caplog.text


def test_titles_tokenized_a_few_calls_at_a_time_give_the_rows_of_one_call(towers, tiny, monkeypatch):
    """One tokenizer call over every title held its objects for all of them (500k titles: 2.8 GB); calls of
    ``TITLES_PER_CALL`` give the same rows, the rough heads (read again up to the limit) included."""
    tokenizer = tokenizer_of(towers, "bert32x2")
    titles = worded_titles([w for t in read_items(tiny["items"]).titles[1:40] for w in t.split()])
    titles[5] = "x" * 50_000  # a head with no whole word: read again up to the limit
    one_call = tokenize_titles(tokenizer, titles, 8)
    calls = []
    monkeypatch.setattr(inputs, "TITLES_PER_CALL", 7)
    chunked = tokenize_titles(lambda texts, **kw: calls.append(len(texts)) or tokenizer(texts, **kw), titles, 8)
    assert all(torch.equal(a, b) for a, b in zip(one_call, chunked))
    assert calls == [7, 1] + [7] * 20 + [4] and sum(calls) - 1 == len(titles)  # (title 5's rough head read again)


def test_a_head_ends_a_whole_word_at_a_space_tab_or_line_break_within_the_limit():
    assert title_head("red lamp", 1) == ("red lamp", True)  # within 1000 characters
    assert title_head("ab " * 600, 1) == (("ab " * 333).rstrip(), True)  # at the last blank within the limit
    assert title_head("ab " * 333 + "cd", 1) == (("ab " * 333).rstrip(), True)
    for other in GAPS[6:]:  # no blank to cut at: BERT deletes \x0b and \x1c, joining the words around them
        assert title_head(f"ab{other}" * 600, 1) == ((f"ab{other}" * 600)[:1000], False), repr(other)
    assert title_head("a" * 1200 + " b", 1) == ("a" * 1000, False)


def test_words_of_thousands_of_characters_are_cut_at_the_limit_and_counted(towers, caplog):
    """No whole word, or too few tokens in them, within the limit: the title is read up to the limit (memory
    stays bounded), and the warning says its last token may be cut."""
    tokenizer = tokenizer_of(towers, "bert32x2")
    titles = ["", "x" * 50_000, "a " + "x" * 50_000 + " b", "red lamp"]
    for tokenize, level in ((tokenize_titles, "WARNING"), (tokenize_titles_as_authors_llm, "INFO")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="iisan"):
            ids, _ = tokenize(tokenizer, titles, 8)
        limited, _ = tokenize(tokenizer, [t[:8000] for t in titles], 8)
        assert torch.equal(ids, limited)
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(level,
            "2 titles have fewer than 8 tokens in whole words within their first 8000 characters (words of thousands "
            "of characters): read up to there, their last token perhaps cut")]  # said once a process (a sweep)


@pytest.mark.parametrize("name", ["bert32x2", "llama48x6"])
def test_the_title_table_is_int32_ids_and_a_bool_mask_and_a_batch_gets_the_tokenizers_int64(towers, tiny, name):
    """The tokenizer's int64 ids and mask took 458 MiB at a million titles of 30 tokens; int32 and bool 143 MiB.
    ``title_inputs`` gives a batch's rows back as the tokenizer made them."""
    tokenizer = tokenizer_of(towers, name)
    titles = [""] + read_items(tiny["items"]).titles[1:40]
    ids, mask = tokenize_titles(tokenizer, titles, 8)
    assert (ids.dtype, mask.dtype) == (torch.int32, torch.bool)
    direct = tokenizer([t.lower() for t in titles], max_length=8, padding="max_length", truncation=True,
                       return_tensors="pt")
    rows = torch.tensor([3, 0, 7, 3])
    batch = inputs.title_inputs(ids, mask, rows)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], direct["input_ids"][rows])
    assert torch.equal(batch["attention_mask"], direct["attention_mask"][rows])
    authors_ids, authors_mask = tokenize_titles_as_authors_llm(tokenizer, titles, 8)
    assert (authors_ids.dtype, authors_mask.dtype) == (torch.int32, torch.bool) and bool(authors_mask.all())
