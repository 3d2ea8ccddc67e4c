"""Stored dtypes and text encodings that used to pass unnoticed or end in a traceback: integer weights in a
weights file, a hidden-state cache stored as integers or in another precision than its metadata says,
and ``--encoding`` values whose decoder refuses the file (UTF-16/32 without a byte-order mark) or
refuses to keep undecodable bytes (idna, punycode). Each is one line naming the file or value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from iisan.bounds import check_encoding
from iisan.cli.main import main
from iisan.data.cache import CacheExpectation, load_cache, read_metadata
from iisan.data.textfile import decoded_lines
from iisan.errors import CacheError, ConfigError, DataError, TrainingError
from iisan.train.weights import load_weights, save_weights


def rewrite(path: Path, change) -> None:
    """Rewrite the safetensors file ``path`` with ``change(tensors, metadata)`` applied, metadata kept."""
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def one_error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("iisan: error: ")
    return err[0]


# -- weights files ---------------------------------------------------------------------------------


def test_integer_weights_are_refused_by_the_loader(tiny_config, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    path = tmp_path / "best.safetensors"
    save_weights(model, path, tiny_config())
    load_weights(model, path)  # as written: fine

    def to_int(tensors, _):
        tensors["0.weight"] = (tensors["0.weight"] * 100).to(torch.int64)

    rewrite(path, to_int)
    before = model[0].weight.detach().clone()
    with pytest.raises(TrainingError) as info:
        load_weights(model, path)
    assert str(info.value).startswith(f"{path}: '0.weight' is int64, the model's parameter is float32; expected a "
                                      "floating type")
    assert torch.equal(model[0].weight, before)  # nothing was cast into it


def test_integer_weights_in_a_run_are_one_line(tiny, tiny_cache, tmp_path, capsys):
    from iisan.config import Config
    from iisan.train.trainer import train

    base = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                  cache_dir=tiny_cache, out_dir=str(tmp_path / "runs"), device="cpu", num_workers=0, progress=False,
                  batch_size=16, epochs=1, max_steps_per_epoch=1, eval_batch_size=64, encode_batch_size=32)
    run_dir = Path(train(base.replace(run_name="int"))["run_dir"])
    weights = run_dir / "best.safetensors"
    name = sorted(n for n in load_file(weights) if load_file(weights)[n].is_floating_point())[0]
    rewrite(weights, lambda tensors, _: tensors.update({name: tensors[name].to(torch.int64)}))
    err = one_error_line(["evaluate", str(run_dir), "--device", "cpu"], capsys)
    assert err.startswith(f"iisan: error: {weights}: {name!r} is int64, the model's parameter is float32")


# -- hidden-state caches ---------------------------------------------------------------------------


@pytest.fixture()
def cache_copy(tiny_cache, tmp_path) -> Path:
    path = tmp_path / "text.safetensors"
    shutil.copyfile(Path(tiny_cache) / "text.safetensors", path)
    return path


def load(path: Path):
    ids = json.loads(read_metadata(path)["item_ids"])
    return load_cache(path, CacheExpectation(), ["<pad>", *ids])


def test_a_data_set_keeping_some_of_the_cache_items_gets_their_rows(cache_copy):
    """The whole cache in its own order is read as it is (no gather); a data set keeping every other item
    gets exactly those rows of it, in its order, row 0 zeros."""
    ids = json.loads(read_metadata(cache_copy)["item_ids"])
    whole, _ = load(cache_copy)
    some, _ = load_cache(cache_copy, CacheExpectation(), ["<pad>", *ids[::2]])
    assert whole.shape[0] == len(ids) + 1 and not whole[0].any()
    assert torch.equal(some, whole[[0, *range(1, len(ids) + 1, 2)]])


def test_the_undamaged_cache_copy_loads(cache_copy):
    table, meta = load(cache_copy)
    assert table.dtype == torch.float32 and meta["dtype"] == "float32"


def test_a_cache_stored_as_integers_is_refused(cache_copy):
    rewrite(cache_copy, lambda tensors, _: tensors.update(states=(tensors["states"] * 100).to(torch.int32)))
    with pytest.raises(CacheError, match=r"^cache .*text.safetensors holds states of dtype int32, expected a "
                                         r"floating type \(float32, as its metadata says\)"):
        load(cache_copy)


def test_a_cache_in_another_precision_than_its_metadata_is_refused(cache_copy):
    rewrite(cache_copy, lambda tensors, _: tensors.update(states=tensors["states"].to(torch.float16)))
    with pytest.raises(CacheError, match=r"^cache .*text.safetensors holds float16 states, but its metadata says "
                                         r"float32"):
        load(cache_copy)


@pytest.mark.parametrize("dtype", ["weird", "int32", "float16"])
def test_a_cache_whose_metadata_dtype_is_not_its_precision_is_refused(cache_copy, dtype):
    rewrite(cache_copy, lambda _, metadata: metadata.update(dtype=dtype))
    if dtype == "float16":  # a valid name, but not what the states are stored in
        with pytest.raises(CacheError, match=r"holds float32 states, but its metadata says float16"):
            load(cache_copy)
    else:
        with pytest.raises(CacheError, match=rf"text.safetensors: its metadata dtype '{dtype}' is not one of "
                                             r"float32, float16, bfloat16"):
            read_metadata(cache_copy)


# -- text encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, message", [
    ("utf-16", "items.tsv: not utf-16 text (UTF-16 stream does not start with BOM); pass --encoding"),
    ("utf-32", "items.tsv: not utf-32 text ("),
    ("idna", "encoding='idna' is not an encoding of text files"),
    ("punycode", "encoding='punycode' is not an encoding of text files"),
])
def test_encodings_that_cannot_read_the_files_are_one_line(tiny, encoding, message, capsys):
    err = one_error_line(["data-stats", "--users", tiny["users"], "--items", tiny["items"],
                          "--encoding", encoding], capsys)
    assert message in err


def test_files_in_utf16_with_a_byte_order_mark_are_read(tiny, tmp_path, capsys):
    for name in ("users", "items"):
        text = Path(tiny[name]).read_text(encoding="utf-8")
        (tmp_path / f"{name}.tsv").write_text(text, encoding="utf-16")
    main(["data-stats", "--users", str(tmp_path / "users.tsv"), "--items", str(tmp_path / "items.tsv"),
          "--encoding", "utf-16"])
    read = capsys.readouterr().out
    main(["data-stats", "--users", tiny["users"], "--items", tiny["items"]])
    assert "users: " in read and read == capsys.readouterr().out  # the same counts as the UTF-8 originals


def test_a_decoder_error_later_in_the_file_names_the_line_before(tmp_path):
    path = tmp_path / "odd.tsv"
    path.write_bytes("a\tb\n".encode("utf-16") + b"\x00")  # a truncated last code unit
    with pytest.raises(DataError, match=r"odd.tsv: not utf-16 text after line 1 \(truncated data\); pass --encoding"):
        list(decoded_lines(path, "utf-16"))


def test_the_hint_suits_an_input_without_an_encoding_flag(tmp_path):
    path = tmp_path / "users.txt"
    path.write_bytes(b"u1\nu\xff2\n")
    with pytest.raises(DataError, match=r"users.txt:2: byte 0xff at column 2 is not utf-8 text; save it as UTF-8"):
        list(decoded_lines(path))
    with pytest.raises(DataError, match=r"is not utf-8 text; pass --encoding with the file's encoding"):
        list(decoded_lines(path, "utf-8"))
    with pytest.raises(DataError, match=r"is not utf-8 text; convert it$"):
        list(decoded_lines(path, "utf-8", hint="convert it"))


@pytest.mark.parametrize("encoding", ["idna", "punycode", "undefined"])
def test_check_encoding_refuses_codecs_that_cannot_keep_undecodable_bytes(encoding):
    with pytest.raises(ConfigError, match=rf"^encoding='{encoding}' is not an encoding of text files"):
        check_encoding(encoding)


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "cp1252", "utf-16", "utf-32", "utf-8-sig"])
def test_check_encoding_accepts_file_encodings(encoding):
    check_encoding(encoding)
