"""The promises that bad input cannot break: nothing this project did not write is deleted or
overwritten, no code from a model folder ever runs, and nothing is downloaded unless asked for.

Each test here failed on the code before these guarantees (``build-lmdb --out`` deleted whatever was
there; an ``auto_map`` config prompted and, answered "y", ran the folder's Python; the default text
model was fetched from the Hub when run outside the repository; and so on). They run the real command
line in a separate process (``_cli_driver``) and compare every file's bytes before and after.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ._cli_driver import changed, run_forked, run_subprocess, snapshot


def mine(folder: Path) -> dict[str, str]:
    """A folder of the user's own files; returns their digests."""
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "results.csv").write_text("a,b\n1,2\n")
    return snapshot(folder)


def lmdb_args(tiny, out, *extra) -> list[str]:
    return ["build-lmdb", "--images", tiny["image_dir"], "--items", tiny["items"], "--out", str(out), "--size",
            "16", *extra]


def test_build_lmdb_never_replaces_a_folder_it_did_not_write(tiny, tmp_path):
    before = mine(tmp_path / "mine")
    for extra in ([], ["--overwrite"]):
        outcome = run_forked(lmdb_args(tiny, tmp_path / "mine", *extra), tmp_path / "s")
        assert outcome.code == 2, outcome.describe()
        assert f"--out {tmp_path / 'mine'} exists and is not an IISAN image LMDB" in outcome.last_line
        assert not changed(before, snapshot(tmp_path / "mine"))


def test_build_lmdb_never_replaces_its_own_images(tiny, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny["image_dir"], images)
    before = snapshot(images)
    for out, extra in ((images, []), (images, ["--overwrite"]), (tmp_path, ["--overwrite"])):
        # the image folder itself, and a folder that holds it: not even --overwrite replaces an input
        outcome = run_forked(["build-lmdb", "--images", str(images), "--out", str(out), "--size", "16", *extra],
                             tmp_path / "s")
        assert outcome.code == 2, outcome.describe()
        assert f"--out {out} {'is' if out == images else 'contains'} the input {images}" in outcome.last_line
        assert not changed(before, snapshot(images))


def test_the_demo_and_tiny_models_never_write_into_a_folder_they_did_not_make(tmp_path):
    """``iisan demo --out`` rewrote users.tsv, items.tsv and models/ of whatever folder it was given, and
    ``make-tiny-models`` the files of any model folder of the same name."""
    mine(tmp_path / "mine")
    (tmp_path / "mine" / "users.tsv").write_text("U1\tmy own interactions\n")
    (tmp_path / "mine" / "tiny-bert").mkdir()
    (tmp_path / "mine" / "tiny-bert" / "config.json").write_text("{}")
    before = snapshot(tmp_path / "mine")
    for argv, refused in ((["demo", "--out", str(tmp_path / "mine"), "--epochs", "1"], tmp_path / "mine"),
                          (["make-tiny-models", "--out", str(tmp_path / "mine")], tmp_path / "mine" / "tiny-bert")):
        outcome = run_forked(argv, tmp_path / "s")
        assert outcome.code == 2, outcome.describe()
        assert f"--out {refused} exists and is not" in outcome.last_line
        assert not changed(before, snapshot(tmp_path / "mine"))
    # a folder the command made is its own: the second run reuses it
    for _ in range(2):
        outcome = run_forked(["make-tiny-models", "--out", str(tmp_path / "models")], tmp_path / "s")
        assert outcome.code == 0, outcome.describe()
    assert (tmp_path / "models" / "tiny-llama" / ".iisan-random-model").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_what_make_made_and_never_the_runs(tmp_path):
    """`make clean` (to reinstall .venv) also removed runs/, where `iisan train` keeps a researcher's results."""
    import subprocess

    from ._scripts import ROOT

    for folder in (".venv", "demo_data", ".pytest_cache", "runs/r", "results", "Dataset"):
        (tmp_path / folder).mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset", "Makefile", "results", "runs"]
    assert (tmp_path / "runs" / "r").is_dir()


def test_a_stray_temporary_name_beside_an_output_is_not_deleted(tiny, tmp_path):
    """The old writer built ``<out>.tmp`` after deleting whatever had that name."""
    before = mine(tmp_path / "images.lmdb.tmp")
    outcome = run_forked(lmdb_args(tiny, tmp_path / "images.lmdb"), tmp_path / "s")
    assert outcome.code == 0, outcome.describe()
    assert not changed(before, snapshot(tmp_path / "images.lmdb.tmp"))
    assert (tmp_path / "images.lmdb" / "data.mdb").is_file()


def test_a_cache_build_keeps_a_folder_named_like_its_sidecar(tiny, tmp_path):
    before = mine(tmp_path / "c" / ".building")
    outcome = run_forked(["cache", "--users", tiny["users"], "--items", tiny["items"], "--text-model",
                          tiny["text_model"], "--towers", "text", "--modality", "intra", "--cache-dir",
                          str(tmp_path / "c"), "--device", "cpu", "--no-progress"], tmp_path / "s")
    assert outcome.code == 2, outcome.describe()
    assert f"{tmp_path / 'c' / '.building'} exists and is not a cache build in progress" in outcome.last_line
    assert not changed(before, snapshot(tmp_path / "c"))


def train_args(tiny, cache, out_dir, run_name) -> list[str]:
    return ["train", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"], "--text-model",
            tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir", cache, "--device", "cpu",
            "--no-progress", "--num-workers", "0", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size",
            "16", "--eval-batch-size", "64", "--out-dir", str(out_dir), "--run-name", run_name]


def test_a_run_never_writes_into_a_folder_that_is_not_a_run(tiny, tiny_cache, tmp_path):
    """A model folder's config.json is not a run's: the old trainer wrote its own over it."""
    folder = tmp_path / "models" / "bert"
    shutil.copytree(tiny["text_model"], folder)
    before = snapshot(folder)
    outcome = run_forked(train_args(tiny, tiny_cache, tmp_path / "models", "bert"), tmp_path / "s")
    assert outcome.code == 2, outcome.describe()
    assert f"run folder {folder} exists and is not an IISAN run folder" in outcome.last_line
    assert snapshot(folder) == before


def test_a_run_name_never_leaves_the_out_dir(tiny, tiny_cache, tmp_path):
    outcome = run_forked(train_args(tiny, tiny_cache, tmp_path / "runs" / "deep", "../../escaped"), tmp_path / "s")
    assert outcome.code == 2, outcome.describe()
    assert "run_name='../../escaped' must be a single folder name" in outcome.last_line
    assert not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------------------------------
# foreign code


def evil_folder(folder: Path, marker: Path, config: dict) -> None:
    """A model folder whose config asks transformers to run its ``evil.py``, which leaves ``marker``."""
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def cache_text_args(tiny, model, cache) -> list[str]:
    return ["cache", "--users", tiny["users"], "--items", tiny["items"], "--text-model", str(model), "--towers",
            "text", "--modality", "intra", "--cache-dir", str(cache), "--device", "cpu", "--no-progress"]


def test_custom_code_in_a_model_folder_never_runs_even_when_the_user_says_yes(tiny, tmp_path):
    folder, marker = tmp_path / "evil", tmp_path / "code-ran"
    folder.mkdir()
    evil_folder(folder, marker, {"model_type": "iisan_evil"})
    outcome = run_subprocess(cache_text_args(tiny, folder, tmp_path / "c"), tmp_path, stdin=b"y\ny\ny\n",
                             env={"HF_HOME": str(tmp_path / "hf")})
    assert not marker.exists(), outcome.describe()
    assert outcome.code == 2 and "Traceback" not in outcome.err, outcome.describe()
    assert outcome.last_line.startswith(f"iisan: error: {folder / 'config.json'} needs custom code")
    assert "Do you wish to run the custom code" not in outcome.out + outcome.err


def test_custom_code_on_a_known_architecture_is_ignored(tiny, tmp_path):
    folder, marker = tmp_path / "bert", tmp_path / "code-ran"
    shutil.copytree(tiny["text_model"], folder)
    evil_folder(folder, marker, json.loads((folder / "config.json").read_text()))
    outcome = run_forked(cache_text_args(tiny, folder, tmp_path / "c"), tmp_path / "s", stdin=b"y\ny\ny\n")
    assert outcome.code == 0 and not marker.exists(), outcome.describe()
    assert outcome.err.count("asks for custom code (auto_map); ignored") == 1, outcome.describe()  # once per folder


def test_custom_code_in_a_tokenizer_or_image_processor_is_ignored_or_refused_in_our_words(tiny, tmp_path):
    """A tokenizer's or image processor's auto_map: transformers loads its own class (said once, as for
    config.json's). An image processor only the folder's code could load: one line of IISAN's, not
    transformers' advice to trust the code; nothing runs either way."""
    text, image, marker = tmp_path / "bert", tmp_path / "vit", tmp_path / "code-ran"
    shutil.copytree(tiny["text_model"], text)
    shutil.copytree(tiny["image_model"], image)
    for folder, name, cls in ((text, "tokenizer_config.json", "AutoTokenizer"),
                              (image, "preprocessor_config.json", "AutoImageProcessor")):
        settings = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**settings, "auto_map": {cls: f"evil.Evil{cls}"}}))
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    outcome = run_forked(cache_text_args(tiny, text, tmp_path / "c"), tmp_path / "s")
    assert outcome.code == 0 and not marker.exists(), outcome.describe()
    assert outcome.err.count("tokenizer_config.json asks for custom code (auto_map); ignored") == 1, outcome.describe()
    images = shutil.copytree(tiny["images"], tmp_path / "images.lmdb")  # one this (forked) process never opened
    args = ["cache", "--users", tiny["users"], "--items", tiny["items"], "--image-model", str(image), "--towers",
            "image", "--modality", "intra", "--images", str(images), "--cache-dir", str(tmp_path / "c2"),
            "--device", "cpu", "--no-progress"]
    outcome = run_forked(args, tmp_path / "s2")
    assert outcome.code == 0 and not marker.exists(), outcome.describe()
    assert outcome.err.count("preprocessor_config.json asks for custom code (auto_map); ignored") == 1
    settings = json.loads((image / "preprocessor_config.json").read_text())
    (image / "preprocessor_config.json").write_text(json.dumps({**settings, "auto_map": None}))
    outcome = run_forked([*args[:-5], "--cache-dir", str(tmp_path / "c4"), *args[-3:]], tmp_path / "s4")
    assert outcome.code == 2 and outcome.last_line == (  # transformers fails on it with a TypeError
        f"iisan: error: cannot load image processor from {str(image)!r}: preprocessor_config.json gives auto_map "
        "None; expected an object (or no auto_map)"), outcome.describe()
    (image / "preprocessor_config.json").write_text(json.dumps({**settings, "image_processor_type": "EvilProcessor"}))
    outcome = run_forked([*args[:-5], "--cache-dir", str(tmp_path / "c3"), *args[-3:]], tmp_path / "s3")
    assert outcome.code == 2 and not marker.exists(), outcome.describe()
    assert "asks for custom code" not in outcome.err, outcome.describe()  # no 'ignored' before the refusal
    assert outcome.last_line == (
        f"iisan: error: cannot load image processor from {str(image)!r}: it needs custom code from its folder "
        "(auto_map); IISAN never runs code from a model folder: use a model whose tokenizer and image processor "
        "transformers provides"), outcome.describe()


def test_custom_code_on_a_known_architecture_iisan_cannot_use_is_refused_without_a_warning(tiny, tmp_path):
    """BART is known to transformers but no IISAN tower: the refusal alone, not first a warning that the map
    is ignored (as if the folder would load)."""
    folder, marker = tmp_path / "bart", tmp_path / "code-ran"
    folder.mkdir()
    evil_folder(folder, marker, {"model_type": "bart"})
    outcome = run_forked(cache_text_args(tiny, folder, tmp_path / "c"), tmp_path / "s")
    assert outcome.code == 2 and not marker.exists(), outcome.describe()
    assert "asks for custom code" not in outcome.err and "WARNING" not in outcome.err, outcome.describe()
    assert outcome.last_line.startswith(f"iisan: error: text encoder {str(folder)!r} is a 'bart' model"), \
        outcome.describe()


# --------------------------------------------------------------------------------------------------
# downloads


@pytest.fixture()
def fake_hub():
    """A stand-in for the Hugging Face Hub on localhost that answers 404 and records every request."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            requests.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b'{"error": "Repository not found"}')

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def hub_env(endpoint: str, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_the_default_model_is_never_fetched_outside_the_repository(tiny, tmp_path, fake_hub):
    """Run from a folder without ./pretrained_models: the default resolves against the repository."""
    endpoint, requests = fake_hub
    args = ["cache", "--users", tiny["users"], "--items", tiny["items"], "--towers", "text", "--modality", "intra",
            "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--no-progress"]
    outcome = run_subprocess(args, tmp_path, env=hub_env(endpoint, tmp_path))
    assert requests == [], outcome.describe()
    default = Path(__file__).resolve().parents[1] / "pretrained_models" / "bert-base-uncased"
    if not default.is_dir():
        assert outcome.code == 2, outcome.describe()
        assert outcome.last_line == (f"iisan: error: model folder '{default}' (the default, under the checkout) "
                                     "does not exist; `iisan fetch encoders` puts it there (see pretrained_models/"
                                     "README.md in the repository), or pass --allow-download to fetch a Hugging Face "
                                     "Hub id")
    else:  # a real BERT-base was put there: the cache is built from it, still without a request
        assert outcome.code == 0 and (tmp_path / "c" / "text.safetensors").is_file(), outcome.describe()


def test_a_hub_id_is_fetched_with_allow_download(tiny, tmp_path, fake_hub):
    """The fake Hub does see requests (so the test above is not vacuous); without the flag the same id is
    refused as a missing folder (``test_bad_inputs``: model-hub-id-without-flag)."""
    endpoint, requests = fake_hub
    args = cache_text_args(tiny, "someone/some-model", tmp_path / "c")
    asked = run_subprocess([*args, "--allow-download"], tmp_path, env=hub_env(endpoint, tmp_path))
    assert requests, asked.describe()  # it did go to the (fake) Hub
    assert asked.code == 2 and "Traceback" not in asked.err, asked.describe()
    assert asked.last_line.startswith("iisan: error: cannot load text encoder config from 'someone/some-model'")
