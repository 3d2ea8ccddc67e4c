"""Cache and live feed: the same tiny model gives the same item embeddings; mismatching caches are refused."""

from __future__ import annotations

import json

import pytest
import torch

from iisan.data.cache import read_metadata
from iisan.errors import CacheError
from iisan.model.build import build_model, load_data

from .conftest import cached_and_live_tables


@pytest.fixture()
def cached_cfg(tiny_config, tiny_cache):
    return tiny_config(cache_dir=tiny_cache)


def test_cache_holds_selected_layers_as_one_contiguous_array(cached_cfg, tiny):
    meta = read_metadata(f"{cached_cfg.cache_dir}/text.safetensors")
    assert json.loads(meta["layers"]) == [0, 1, 2]  # tiny BERT: 2 layers, groups capped at depth
    assert json.loads(read_metadata(f"{cached_cfg.cache_dir}/image.safetensors")["layers"]) == [0, 1, 2, 3]
    assert meta["width"] == "32" and meta["dtype"] == "float32" and meta["modality"] == "text"
    from safetensors import safe_open

    with safe_open(f"{cached_cfg.cache_dir}/text.safetensors", "pt") as fh:
        states = fh.get_tensor("states")
    data = load_data(cached_cfg)
    assert states.shape == (data.num_items + 1, 3, 32)
    assert states[0].abs().sum() == 0  # padding row
    assert json.loads(meta["item_ids"]) == data.item_ids[1:]


def test_cached_and_live_feeds_give_the_same_item_embeddings(cached_cfg):
    a, b, _ = cached_and_live_tables(cached_cfg, torch.device("cpu"))
    assert a.shape == (load_data(cached_cfg).num_items + 1, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the SAN tower really depends on the states (not a constant)
    assert a[1:].std(0).mean() > 1e-3


def test_cache_built_for_other_layers_is_refused(cached_cfg):
    data = load_data(cached_cfg)
    with pytest.raises(CacheError, match=r"built for layers \[0, 1, 2\] \(config asks for \[1, 2\]\)"):
        build_model(cached_cfg.replace(text_layers=(1, 2)), data, torch.device("cpu"))


def test_cache_built_for_another_items_file_is_refused(cached_cfg, tmp_path, tiny):
    other = tmp_path / "items.tsv"
    other.write_text(open(tiny["items"]).read().replace("No.1\n", "No.one\n", 1))
    cfg = cached_cfg.replace(items=str(other))
    with pytest.raises(CacheError, match=r"built for items file .* with fingerprint .*config's items file has"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_cache_for_another_encoder_is_refused(cached_cfg, tmp_path, tiny):
    from iisan.model.tiny import vocabulary, write_bert

    other = write_bert(tmp_path / "bert64", vocabulary(["x"]), hidden=16, layers=2)
    cfg = cached_cfg.replace(text_model=str(other))
    with pytest.raises(CacheError, match=r"width 32 \(config's encoder has 16\)"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_missing_cache_names_the_file(tiny_config):
    cfg = tiny_config(cache_dir="/nonexistent/cache")
    with pytest.raises(CacheError, match=r"cache file /nonexistent/cache/text.safetensors does not exist"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))
