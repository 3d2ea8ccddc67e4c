"""Encoder folders with one damaged file, as a fuzzer made them: a config value torch or transformers
cannot use, a tokenizer file of the wrong JSON shape or not UTF-8, an image processor of negative sizes.
Each is refused in one line naming the folder when it is loaded, never a traceback or a failure at the
first batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from iisan.cli.main import main


def set_values(file: str, **values):
    """A damage: ``values`` written into the JSON object in ``file``."""

    def damage(folder: Path) -> None:
        data = json.loads((folder / file).read_text(encoding="utf-8"))
        (folder / file).write_text(json.dumps({**data, **values}), encoding="utf-8")

    return damage


def drop_key(file: str, key: str):
    """A damage: the JSON object in ``file`` without ``key``."""

    def damage(folder: Path) -> None:
        data = json.loads((folder / file).read_text(encoding="utf-8"))
        (folder / file).write_text(json.dumps({k: v for k, v in data.items() if k != key}), encoding="utf-8")

    return damage


def replace(file: str, content: bytes, remove: tuple[str, ...] = ()):
    """A damage: ``file`` holding ``content``, and the files ``remove`` gone."""

    def damage(folder: Path) -> None:
        for name in remove:
            (folder / name).unlink()
        (folder / file).write_bytes(content)

    return damage


MATRIX = {"text": "encoder.layer.0.attention.self.query.weight",
          "image": "embeddings.patch_embeddings.projection.weight"}


def stored_as(dtype: torch.dtype, tower: str, prefix: str = ""):
    """A damage: one weight in model.safetensors (``MATRIX``) stored as ``dtype`` (a quantised checkpoint's
    values without their scales), and every key under ``prefix``."""

    def damage(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        weights[MATRIX[tower]] = (weights[MATRIX[tower]] * 100).to(dtype)
        save_file({prefix + k: v for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})

    return damage


CASES = [
    pytest.param("text", set_values("config.json", dtype="banana"), "text encoder config",
                 "config.json gives dtype 'banana', which is not a torch dtype (e.g. 'float32', 'bfloat16')",
                 id="dtype-not-a-torch-dtype"),
    pytest.param("text", set_values("config.json", vocab_size=0), "text encoder config",
                 "config.json gives vocab_size 0; expected a positive whole number", id="vocab-size-zero"),
    pytest.param("text", set_values("config.json", pad_token_id=100000), "text encoder",
                 "its config.json gives values the model cannot be built with (Padding_idx must be within "
                 "num_embeddings)", id="pad-token-past-vocabulary"),
    pytest.param("text", replace("tokenizer_config.json", b"[1]"), "text tokenizer",
                 "tokenizer_config.json does not hold a JSON object", id="tokenizer-config-a-list"),
    pytest.param("text", lambda folder: (folder / "tokenizer_config.json").write_bytes(
                     b"\xef\xbb\xbf" + (folder / "tokenizer_config.json").read_bytes()), "text tokenizer",
                 "tokenizer_config.json starts with a byte-order mark, which its JSON readers refuse: save it as "
                 "UTF-8 without one", id="tokenizer-config-with-a-bom"),
    pytest.param("text", replace("vocab.txt", b"\xff\xfe\x00" * 8, remove=("tokenizer.json",)), "text tokenizer",
                 "its tokenizer files are damaged (Error while initializing WordPiece: stream did not contain "
                 "valid UTF-8)", id="vocabulary-not-utf8"),
    pytest.param("text", lambda folder: (folder / "tokenizer.json").write_bytes(
                     (folder / "tokenizer.json").read_bytes()[:200]), "text tokenizer",
                 "tokenizer.json is not valid JSON (JSONDecodeError: ", id="tokenizer-json-cut-short"),
    pytest.param("text", drop_key("tokenizer.json", "added_tokens"), "text tokenizer",
                 "its files lack the entry 'added_tokens' that transformers reads (damaged, or of another format)",
                 id="tokenizer-json-without-a-key"),
    pytest.param("image", set_values("preprocessor_config.json", size={"height": -1, "width": 0}), "image processor",
                 "its preprocessor_config.json gives size {'height': -1, 'width': 0}; expected positive whole "
                 "numbers of pixels (height and width, or shortest_edge)", id="image-size-negative"),
    pytest.param("image", lambda folder: (folder / "preprocessor_config.json").unlink(), "image processor",
                 "the folder has no preprocessor_config.json (nor a processor_config.json): copy it from the "
                 "model's source; it gives the image size, mean and std the model was trained with",
                 id="no-processor-config"),
    pytest.param("text", stored_as(torch.int8, "text"), "text encoder",
                 f"model.safetensors holds '{MATRIX['text']}' as I8, which transformers would cast into "
                 "BertModel's float weights (a quantised checkpoint?); IISAN needs weights stored as F32, F16 or BF16",
                 id="int8-weights"),
    pytest.param("text", stored_as(torch.uint8, "text", prefix="bert."), "text encoder",
                 f"model.safetensors holds 'bert.{MATRIX['text']}' as U8, which transformers would cast into "
                 "BertModel's float weights (a quantised checkpoint?); IISAN needs weights stored as F32, F16 or BF16",
                 id="packed-weights-under-a-prefix"),
    pytest.param("image", stored_as(torch.float8_e4m3fn, "image"), "image encoder",
                 f"model.safetensors holds '{MATRIX['image']}' as F8_E4M3, which transformers would cast into "
                 "ViTModel's float weights (a quantised checkpoint?); IISAN needs weights stored as F32, F16 or BF16",
                 id="fp8-weights"),
]


@pytest.mark.parametrize(("tower", "damage", "what", "reason"), CASES)
def test_damaged_encoder_folder_is_refused_in_one_line(tiny, tmp_path, capsys, tower, damage, what, reason):
    folder = tmp_path / tower
    shutil.copytree(tiny[f"{tower}_model"], folder)
    damage(folder)
    encoder = (["--text-model", str(folder)] if tower == "text" else
               ["--images", tiny["images"], "--image-model", str(folder)])
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path / "cache"),
              "--towers", tower, *encoder, "--no-progress"])
    assert info.value.code == 2
    said = capsys.readouterr().err.strip()
    if reason.endswith(": "):  # the parser's own words follow
        assert said.startswith(f"iisan: error: cannot load {what} from '{folder}': {reason}") and "\n" not in said
    else:
        assert said == f"iisan: error: cannot load {what} from '{folder}': {reason}"


def test_integer_buffers_and_half_precision_weights_load(tiny, tmp_path):
    """Only a weight stored as integers is refused: BERT's int64 position_ids (a buffer older checkpoints
    save) and weights stored in fp16 or bf16 load."""
    folder = tmp_path / "text"
    shutil.copytree(tiny["text_model"], folder)
    weights = {k: v.to(torch.bfloat16) if v.dim() == 2 else v.half()
               for k, v in load_file(folder / "model.safetensors").items()}
    weights["embeddings.position_ids"] = torch.arange(16)[None]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path / "cache"),
                 "--towers", "text", "--text-model", str(folder), "--no-progress"]) in (0, None)
    assert (tmp_path / "cache" / "text.safetensors").is_file()
