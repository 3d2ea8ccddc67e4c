"""Tests that kill the mutants a mutation round on the fetch, download, title-head, put-back and deep-JSON code
found surviving the tests written with it: each pins a branch those tests left free to change."""

from __future__ import annotations

import logging

import pytest
import torch

from iisan.errors import OutputError
from iisan.model.inputs import title_head, tokenize_titles, tokenize_titles_as_authors_llm

from .test_title_heads import tokenizer_of

DEEP = "[" * 100_000
ROUGH = ("1 titles have fewer than 8 tokens in whole words within their first 8000 characters (words of thousands "
         "of characters): read up to there, their last token perhaps cut")


# ---- inputs.py: title_head, _said_cut, tokenize_titles, tokenize_titles_as_authors_llm


def test_a_blank_just_past_the_limit_ends_the_word_before_it():
    """The window reaches one character past the limit: a word ending exactly at the limit is whole (a window of
    the limit alone had called it cut, and read the title again up to the limit, counted in the warning)."""
    assert title_head("a" * 1000 + " b", 1) == ("a" * 1000, True)
    assert title_head("a" * 1001 + " b", 1) == ("a" * 1000, False)


def test_one_title_without_a_blank_within_the_limit_is_counted_in_both_layouts(towers, caplog):
    """A single title cut at the limit is warned about (the warning is not kept for two or more), also when its
    tokens fill the row ("a." has no blank, and BERT splits it into tokens): both layouts count the same titles."""
    tokenizer = tokenizer_of(towers, "bert32x2")
    for tokenize in (tokenize_titles, tokenize_titles_as_authors_llm):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="iisan"):
            tokenize(tokenizer, ["", "a." * 5000, "red lamp"], 8)
        assert caplog.messages == [ROUGH], tokenize.__name__  # (a warning the first time, INFO after: once.level)


@pytest.mark.parametrize("name", ["bert32x2", "llama48x6", "gpt2_24x4", "t5_32x3"])
def test_a_title_read_to_the_limit_is_lower_cased_and_masked_as_its_first_characters(towers, name):
    """A head of too few tokens is read again up to the limit: those rows (ids and mask) are exactly the rows of
    the title's first 8000 characters, lower-cased as every title is (a cased tokenizer sees the difference)."""
    tokenizer = tokenizer_of(towers, name)
    titles = ["", "Red " + "X" * 50_000 + " Lamp", "Blue LAMP"]
    ids, mask = tokenize_titles(tokenizer, titles, 8)
    limited_ids, limited_mask = tokenize_titles(tokenizer, [t[:8000] for t in titles], 8)
    assert torch.equal(ids, limited_ids) and torch.equal(mask, limited_mask)


def test_a_head_whose_tokens_end_with_the_closing_special_token_is_read_on(towers):
    """"red lamp" gives [CLS] red lamp [SEP], as many ids as the row holds: the [SEP] is not the title's, so the
    row must be the whole title's ([CLS] red lamp [UNK]), not end with [SEP]."""
    tokenizer = tokenizer_of(towers, "bert32x2")
    titles = ["", "red lamp " + "x" * 5000 + " blue"]
    ids, _ = tokenize_titles_as_authors_llm(tokenizer, titles, 4)
    whole = tokenizer(titles[1], add_special_tokens=True)["input_ids"][:4]
    assert ids[1].tolist() == whole and whole[-1] != tokenizer.sep_token_id


# ---- files.py: put_back_on_failure


def test_files_replaced_in_a_block_stopped_by_ctrl_c_are_put_back(tmp_path):
    """Ctrl-C (KeyboardInterrupt, no Exception) between two renames must put the first back too: it is the
    usual way a build is stopped."""
    from iisan.files import put_back_on_failure, write_text_atomic

    old, new = tmp_path / "text.safetensors", tmp_path / "image.safetensors"
    old.write_text("old")
    with pytest.raises(KeyboardInterrupt), put_back_on_failure(old, new):
        write_text_atomic(new, "new")
        write_text_atomic(old, "new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.safetensors"] and old.read_text() == "old"


# ---- cache_build.ShardDir.open


def test_a_sidecar_linked_to_an_empty_folder_is_refused_and_left_alone(tiny_config, tmp_path):
    """A link at .building is not ours whatever it points to: an empty folder there had been taken as ours and
    rmtree refused the link (a traceback)."""
    from iisan.data.cache_build import SIDECAR
    from iisan.model.caching import build_cache_from_config

    (tmp_path / "empty").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / SIDECAR).symlink_to(tmp_path / "empty")
    with pytest.raises(OutputError, match=f"{tmp_path / 'c' / SIDECAR} exists and is not a cache build in progress"):
        build_cache_from_config(tiny_config(cache_dir=str(tmp_path / "c")), dtype="float32")
    assert (tmp_path / "c" / SIDECAR).is_symlink() and (tmp_path / "empty").is_dir()


# ---- encoders.missing_files


@pytest.mark.parametrize("damage", ["nested too deep", "a folder"])
def test_a_sharded_encoder_folder_whose_index_is_nested_too_deep_or_a_folder_lacks_a_readable_one(tmp_path, damage):
    from iisan.experiments.encoders import ENCODERS, missing_files

    for name in ("config.json", "vocab.txt", "model-1.safetensors"):
        (tmp_path / name).write_text("{}")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(DEEP) if damage == "nested too deep" else index.mkdir()
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == [
        "a model.safetensors.index.json that names its weight files"]


# ---- nested too deep: demo.refuse_fewer_epochs, demo.refuse_copied_run, same_inputs.differs


def test_a_demo_run_folder_whose_files_are_nested_too_deep_is_left_to_the_trainer(tmp_path):
    from iisan.config import Config
    from iisan.experiments.demo import refuse_copied_run, refuse_fewer_epochs

    (tmp_path / "results.json").write_text(DEEP)
    (tmp_path / "config.json").write_text(DEEP)
    assert refuse_fewer_epochs(tmp_path, 1) is None
    assert refuse_copied_run(tmp_path, Config(method="id", users=str(tmp_path / "users.tsv"))) is None


def test_a_cache_record_whose_layers_are_nested_too_deep_differs():
    from iisan.train.same_inputs import differs

    assert differs("layers", {"layers": DEEP}, {"layers": "[0, 1]"})
    assert differs("layers", {"layers": "[0, 1]"}, {"layers": DEEP})
