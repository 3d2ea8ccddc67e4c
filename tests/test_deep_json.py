"""JSON nested thousands deep (a hostile or damaged file) makes Python's decoder raise RecursionError, which
no ``except ValueError`` catches: the package parses JSON only through ``errors.parse_json``, which makes it a
ValueError, so every reader of a JSON file that a user or a model folder supplies says what it says of any other
damage, in one line or by passing the file over, never with a traceback."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from iisan.data.cache import _json
from iisan.data.cache_build import manifest_in
from iisan.efficiency.diagnose import is_diagnosis
from iisan.efficiency.report_checks import read_benchmark
from iisan.errors import DataError, EncoderError, NestedTooDeep, parse_json
from iisan.experiments.demo import read_settings
from iisan.model.encoder_files import check_index, processor_file
from iisan.model.encoder_loading import custom_code, unreadable_json

DEEP = "[" * 100_000


def test_the_decoder_itself_raises_recursion_error_on_such_a_file():
    import json

    with pytest.raises(RecursionError):
        json.loads(DEEP)


def test_parse_json_makes_it_a_value_error_and_keeps_everything_else():
    with pytest.raises(NestedTooDeep, match="nested deeper than Python's JSON reader goes") as info:
        parse_json(DEEP.encode())
    assert isinstance(info.value, ValueError)
    assert parse_json('{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    assert parse_json(b'{"a": 1.5}', parse_float=str) == {"a": "1.5"}  # hooks reach the decoder
    with pytest.raises(ValueError, match="Expecting value"):
        parse_json("[1,")


def test_nothing_in_the_package_parses_json_but_parse_json():
    """A direct ``json.loads`` or ``json.load`` would bring the RecursionError back to its callers."""
    package = Path(__file__).resolve().parents[1] / "iisan"
    direct = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
                    isinstance(node.value, ast.Name) and node.value.id == "json":
                direct.append(f"{path.relative_to(package)}:{node.lineno}")
    assert [where.split(":")[0] for where in direct] == ["errors.py"], direct  # parse_json's own call


def test_model_folder_files_nested_too_deep_are_named_or_left_to_what_reads_them(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(DEEP)
    with pytest.raises(EncoderError, match=r"index.json is not valid JSON \(arrays or objects nested deeper"):
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
    with pytest.raises(DataError, match=r"bench.json is not JSON \(arrays or objects nested deeper than") as info:
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
