"""JSON nested thousands deep (a hostile or damaged file) makes Python's decoder raise RecursionError, which
no ``except ValueError`` catches: every reader of a JSON file that a user or a model folder supplies says what
it says of any other damage, in one line or by passing the file over, never with a traceback."""

from __future__ import annotations

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from iisan.data.cache import _json
from iisan.data.cache_build import manifest_in
from iisan.efficiency.diagnose import is_diagnosis
from iisan.efficiency.report_checks import read_benchmark
from iisan.errors import DataError, EncoderError
from iisan.experiments.demo import read_settings
from iisan.model.encoder_files import check_index, processor_file
from iisan.model.encoder_loading import custom_code, unreadable_json

DEEP = "[" * 100_000


def test_the_decoder_itself_raises_recursion_error_on_such_a_file():
    import json

    with pytest.raises(RecursionError):
        json.loads(DEEP)


def test_model_folder_files_nested_too_deep_are_named_or_left_to_what_reads_them(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(DEEP)
    with pytest.raises(EncoderError, match=r"model.safetensors.index.json is not valid JSON \(maximum recursion"):
        check_index(tmp_path / "model.safetensors.index.json", set())
    (tmp_path / "processor_config.json").write_text(DEEP)
    assert processor_file(tmp_path) == "preprocessor_config.json"
    (tmp_path / "tokenizer_config.json").write_text(DEEP)
    assert custom_code(tmp_path, AutoTokenizer) == (None, None)
    assert unreadable_json(tmp_path, AutoTokenizer).startswith("tokenizer_config.json is not valid JSON (")
    assert unreadable_json(tmp_path, AutoImageProcessor).startswith("processor_config.json is not valid JSON (")


def test_iisan_files_nested_too_deep_are_damage_said_in_one_line_or_not_ours(tmp_path):
    assert _json(DEEP) is None  # a cache's metadata value: said "not a JSON list" by its caller
    (tmp_path / ".building").mkdir()
    (tmp_path / ".building" / "manifest.json").write_text(DEEP)
    assert manifest_in(tmp_path / ".building") is None  # not a build of ours: refused, never removed
    (tmp_path / "demo-settings.json").write_text(DEEP)
    assert read_settings(tmp_path / "demo-settings.json") is None  # the data decides, as without one
    (tmp_path / "diagnosis.json").write_text(DEEP)
    assert not is_diagnosis(tmp_path / "diagnosis.json")
    (tmp_path / "bench.json").write_text(DEEP)
    with pytest.raises(DataError, match=r"bench.json is not JSON \(maximum recursion depth exceeded") as info:
        read_benchmark(tmp_path / "bench.json")
    assert "\n" not in str(info.value)


def test_an_image_lmdb_whose_metadata_record_is_nested_too_deep_is_said_damaged(tmp_path):
    import lmdb

    from iisan.data.images import META_KEY, read_meta
    from iisan.errors import ImageStoreError

    with lmdb.open(str(tmp_path / "x.lmdb"), map_size=1 << 22) as env, env.begin(write=True) as txn:
        txn.put(META_KEY, DEEP.encode())
    with pytest.raises(ImageStoreError, match="the metadata record '__meta__' is damaged; rebuild the store"):
        read_meta(tmp_path / "x.lmdb")
