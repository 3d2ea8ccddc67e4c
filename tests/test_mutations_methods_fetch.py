"""Behaviour of the method table, the downloads, the fetch manifest and steps, the encoder fetch, the
presets, the seed table, the demo's refusals and the provenance record that no other test pins down: each
test here fails when one condition, call or table entry of that code is changed (a mutation that the rest
of the suite let through). No test reaches the network: downloads go to a local HTTP server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from iisan import provenance as provenance_module
from iisan.config import Config
from iisan.data.datasets import DATASETS, dataset_paths
from iisan.data.download import Expected, http_download, mismatch, partial_path
from iisan.data.fetch import fetch_images, fetch_tsvs, shortened, unpack_images
from iisan.data.manifest import Manifest, folder_files
from iisan.data.sources import SOURCES, DriveArchive
from iisan.errors import ConfigError, DataError, FetchError
from iisan.experiments.demo import demo_config, describe, generation_settings, refuse_fewer_epochs
from iisan.experiments.encoders import ENCODERS, MANIFEST, by_hand, fetch_encoders, missing_files, unreachable
from iisan.experiments.params import count, random_encoders
from iisan.experiments.presets import own_cache_dir
from iisan.experiments.seed_table import data_files, markdown, point_config, point_name, verify_point
from iisan.methods import LIVE_SHAPE_KEYS, METHOD_DEFAULTS, named_unread, newly_unread, unread_keys
from iisan.train.trainer import train

from .test_fetch import CONTENT, fetch, full, served_data, server  # noqa: F401 (fixtures: served data, its server)
from .test_fetch_encoders import FakeHub, hub  # noqa: F401 (hub: the stand-in Hub's fixture)

# --------------------------------------------------------------------------------------------------
# methods: the baselines' paper settings, and what a run never reads


def test_every_baselines_paper_settings():
    assert {m: METHOD_DEFAULTS[m] for m in ("fft", "adapter", "lora", "bitfit", "id")} == {
        "fft": {"batch_size": 32, "lr": 1e-4, "lr_image": 1e-4, "lr_text": 5e-5},
        "adapter": {"batch_size": 32, "lr": 2e-4, "lr_adapter_image": 4e-4, "lr_adapter_text": 4e-4},
        "lora": {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5, "lr_adapter_image": 4e-4,
                 "lr_adapter_text": 4e-4},
        "bitfit": {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5},
        "id": {"batch_size": 64, "lr": 2e-4},
    }


def test_a_cached_run_never_reads_the_live_encoding_keys_and_a_live_run_never_reads_the_cache_dtype():
    cached, live = unread_keys("iisan", "both", "cached"), unread_keys("iisan", "both", "live")
    assert cached - live == LIVE_SHAPE_KEYS | {"text_encoder_dropout"}
    assert live - cached == {"cache_dtype"}
    # the baselines train their backbones live whatever the feed says: the feed changes nothing for them
    assert unread_keys("fft", "both", "cached") == unread_keys("fft", "both", "live")
    assert "cache_dtype" in unread_keys("fft", "both", "live")


def test_a_one_tower_run_never_reads_the_other_towers_keys():
    both = unread_keys("iisan", "both", "live")
    assert unread_keys("iisan", "text", "live") - both == {"image_adapter_down", "image_layers", "image_model",
                                                           "image_norm", "images"}
    assert unread_keys("iisan", "image", "live") - both == {"text_adapter_down", "text_encoder_dropout",
                                                            "text_layers", "text_model", "text_pooling",
                                                            "title_multiple"}


def test_a_key_named_unread_for_one_kind_of_run_is_not_named_for_another():
    assert newly_unread({"lora_rank": 16}, {"lora_rank": 8}, "fft", "both", "cached") == ["lora_rank"]
    assert named_unread({"lora_rank": 16}, "fft", "both", "cached") == ["lora_rank"]
    # LoRA reads its rank, and a live FFT run or a text-only one is another run: none of them was warned of it
    assert named_unread({"lora_rank": 16}, "lora", "both", "cached") == []
    assert named_unread({"lora_rank": 16}, "fft", "both", "live") == []
    assert named_unread({"lora_rank": 16}, "fft", "text", "cached") == []
    assert named_unread({"lora_rank": 4}, "fft", "both", "cached") == []  # nor with another value


# --------------------------------------------------------------------------------------------------
# downloads


def test_a_file_of_another_size_is_said_by_its_size_when_only_the_size_is_known(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1234)
    assert mismatch(path, Expected(size=1234)) is None
    assert mismatch(path, Expected(size=1_234_567)) == "has 1,234 bytes, expected 1,234,567"
    # the size is said before the digests, which would differ too
    assert mismatch(path, Expected(size=5, sha256="0" * 64)) == "has 1,234 bytes, expected 5"


def test_a_part_longer_than_the_file_is_dropped_before_any_request(server, tmp_path):  # noqa: F811
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(b"x" * (len(CONTENT) + 1))
    http_download(server.url + "/f.bin", dest, full())
    assert dest.read_bytes() == CONTENT
    assert server.seen == [("/f.bin", None)]  # no range asked from past the file's end


def test_a_download_shorter_than_expected_is_removed_and_said_by_its_size(server, tmp_path):  # noqa: F811
    dest = tmp_path / "f.bin"
    with pytest.raises(FetchError) as err:
        http_download(server.url + "/f.bin", dest, Expected(size=len(CONTENT) + 10))
    assert str(err.value) == (f"the file downloaded from {server.url}/f.bin has 16,384 bytes, expected 16,394; it "
                              f"was removed, run the command again to retry, or download it by hand to {dest}")
    assert not partial_path(dest).exists() and not dest.exists()




# --------------------------------------------------------------------------------------------------
# the fetch manifest


def _two_files_recorded(tmp_path: Path) -> Manifest:
    for name in ("a.tsv", "b.tsv"):
        (tmp_path / name).write_text(name)
    manifest = Manifest(tmp_path / "m.json", tmp_path, "`iisan fetch data --dataset X`")
    manifest.record("tsv", [tmp_path / "a.tsv", tmp_path / "b.tsv"])
    return manifest


def test_a_manifest_names_the_first_changed_file_and_counts_the_others(tmp_path):
    manifest = _two_files_recorded(tmp_path)
    (tmp_path / "a.tsv").write_text("changed")
    (tmp_path / "b.tsv").unlink()
    with pytest.raises(FetchError) as err:
        manifest.verify("tsv")
    assert str(err.value) == (f"{tmp_path / 'a.tsv'} has 7 bytes, the manifest says 5 (and 1 more files of step "
                              f"'tsv'): it changed since it was fetched (manifest {tmp_path / 'm.json'}); restore "
                              "it, or delete it and run `iisan fetch data --dataset X` again")


def test_a_missing_first_file_is_told_to_be_restored_or_the_manifest_deleted(tmp_path):
    manifest = _two_files_recorded(tmp_path)
    (tmp_path / "a.tsv").unlink()
    (tmp_path / "b.tsv").write_text("changed")
    with pytest.raises(FetchError) as err:
        manifest.verify("tsv")
    assert str(err.value) == (f"{tmp_path / 'a.tsv'} is missing (and 1 more files of step 'tsv'): it changed since "
                              f"it was fetched (manifest {tmp_path / 'm.json'}); restore it, or delete the manifest "
                              "and run `iisan fetch data --dataset X` again")


def test_a_folder_is_recorded_with_the_files_of_its_subfolders(tmp_path):
    folder = tmp_path / "am_image_xx"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"one")
    (folder / "sub" / "2.jpg").write_bytes(b"two")
    assert folder_files(folder) == [folder / "1.jpg", folder / "sub" / "2.jpg"]
    manifest = Manifest(tmp_path / "m.json", tmp_path)
    manifest.record("images", folder_files(folder))
    (folder / "sub" / "2.jpg").write_bytes(b"TWO")
    with pytest.raises(FetchError, match=r"am_image_xx/sub/2.jpg has sha256 "):
        manifest.verify("images")


# --------------------------------------------------------------------------------------------------
# the fetch steps


def test_an_archive_member_with_an_absolute_path_is_refused(tmp_path):
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("/1.jpg", b"x")
    target = tmp_path / "Dataset" / "am_image_xx"
    with pytest.raises(FetchError) as err:
        unpack_images(archive, target)
    assert str(err.value) == f"{archive}: member '/1.jpg' would be written outside {target}; refusing to unpack it"
    assert not target.exists()


def test_an_archive_of_one_folder_beside_hidden_files_unpacks_that_folder(tmp_path):
    archive = tmp_path / "am_image_xx.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("am_image_xx/1.jpg", b"one")
        zf.writestr(".DS_Store", b"finder")
        zf.writestr("__MACOSX/._1.jpg", b"resource fork")
    target = tmp_path / "Dataset" / "am_image_xx"
    unpack_images(archive, target)
    assert sorted(p.name for p in target.iterdir()) == ["1.jpg"]
    assert not (tmp_path / "Dataset" / ".am_image_xx.unpacking").exists()


class SilentDrive:
    """A Drive client that returns as if it had downloaded the file, and wrote nothing."""

    def download(self, file_id, dest):
        pass


def test_a_drive_client_that_wrote_nothing_is_not_taken_for_a_download(tmp_path):
    src = replace(SOURCES["Scientific"], images=DriveArchive("am_image_xx.zip", "DRIVE-ID", "am_image_xx"))
    base = tmp_path / "Dataset"
    base.mkdir()
    manifest = Manifest(base / "m.json", tmp_path)
    with pytest.raises(FetchError) as err:
        fetch_images(src, base, manifest, SilentDrive())
    assert str(err.value) == f"the Drive client reported success but {base / 'am_image_xx.zip'} does not exist"
    assert not manifest.done("archive") and not manifest.done("images")


def test_a_changed_archive_is_named_though_the_images_are_unpacked(served_data):  # noqa: F811
    fetch(served_data)
    archive = served_data["root"] / "Dataset" / "am_image_tn.zip"
    archive.write_bytes(archive.read_bytes() + b"\0")
    with pytest.raises(FetchError, match=rf"^{archive} has [0-9,]+ bytes, the manifest says "):
        fetch(served_data)
    lmdb = Manifest(served_data["root"] / "Dataset" / "Tiny" / "fetch-manifest.json", served_data["root"]).info("lmdb")
    assert sorted(lmdb["files"]) == ["Dataset/Tiny/images.lmdb.report.tsv", "Dataset/Tiny/images.lmdb/data.mdb"]


def test_a_foreign_tsv_in_place_is_refused_naming_the_authors_commit(tmp_path):
    src = SOURCES["Scientific"]
    (tmp_path / src.users.path).parent.mkdir(parents=True)
    (tmp_path / src.users.path).write_text("not theirs")
    with pytest.raises(FetchError) as err:
        fetch_tsvs(src, tmp_path, Manifest(tmp_path / "m.json", tmp_path), None)
    assert str(err.value) == (f"{tmp_path / src.users.path} is not the authors' file (has 10 bytes, expected "
                              "1,115,425; GAIR-Lab/IISAN at 67f5c1faf12a); move it away and run the fetch again")


def test_the_sources_are_the_archives_and_files_the_data_readme_names():
    readme = (Path(__file__).resolve().parents[1] / "Dataset" / "README.md").read_text()
    for name, src in SOURCES.items():
        users, items = (Path(f.path).relative_to("Dataset").as_posix() for f in (src.users, src.items))
        assert f"| {name} | `{users}`, `{items}` | `{src.images.name}`: {src.images.url()}?usp=sharing |" in readme
        counts = ("{:,} users / {:,} items / {:,} interactions" if name == "Scientific" else "{:,} / {:,} / {:,}")
        assert f"{name} {counts.format(*src.stats)}" in " ".join(readme.split())  # the statistics it states
    assert SOURCES["Scientific"].users.url() == (
        "https://raw.githubusercontent.com/GAIR-Lab/IISAN/67f5c1faf12a1f9fc3258922bb05684561532d1d/"
        "Dataset/Scientific/am_Industrial_and_Scientific_users.tsv")


def test_a_long_error_is_cut_to_its_head_and_tail_at_spaces():
    assert shortened("x" * 300) == "x" * 300  # as long as allowed: whole
    words = " ".join(f"w{i}" for i in range(100))
    assert shortened(words, 60) == "w0 w1 w2 w3 w4 w5 … w91 w92 w93 w94 w95 w96 w97 w98 w99"
    assert shortened("x" * 301) == "x" * 99 + " … " + "x" * 198


# --------------------------------------------------------------------------------------------------
# parameter counts and the seed table


def test_random_backbones_of_an_unknown_size_are_refused():
    with pytest.raises(ConfigError, match=r"^--random-backbones 'large': expected one of base$"):
        random_encoders(Config(), "large")


def test_a_cache_folder_given_outside_the_data_sets_is_kept_for_other_items(tmp_path):
    items = str(tmp_path / "mine" / "items.tsv")
    assert own_cache_dir(str(tmp_path / "elsewhere"), items, "Scientific") == str(tmp_path / "elsewhere")
    paper = dataset_paths("Scientific")["cache_dir"]
    own = own_cache_dir(paper + "_llama", items, "Scientific")  # the data set's, moved to one of their own
    assert Path(own).parent == Path(paper).parent and Path(own).name.startswith("stored_vectors_mine_")
    assert own.endswith("_llama") and own_cache_dir(paper, dataset_paths("Scientific")["items"], "Scientific") == paper


def test_params_names_the_method_as_the_paper_does():
    assert count(Config(method="bitfit"), "base")["method"] == "BitFit"


def test_a_seed_table_point_is_named_by_data_set_setting_and_seed():
    assert point_name("iisan-text", "Scientific", 12345) == "Scientific-iisan-text-seed12345"


def test_a_data_set_with_one_of_its_files_missing_is_not_found(tmp_path):
    spec = DATASETS["Scientific"]
    (tmp_path / spec.folder).mkdir()
    (tmp_path / spec.folder / spec.users_file).write_text("")
    users, items = tmp_path / spec.folder / spec.users_file, tmp_path / spec.folder / spec.items_file
    with pytest.raises(DataError, match=rf"^data not found: {users} / {items}$"):
        data_files(tmp_path, "Scientific")


def test_a_seed_table_row_without_seeds_shows_dashes():
    stat = {"mean": 0.5, "std": None, "n": 1}
    table = markdown({"table": {"Scientific/most-popular": {"hit@10": stat, "ndcg@10": stat}}, "points": {}})
    assert table.splitlines()[-1] == "| Scientific | most-popular | - | 0.5000 | 0.5000 | - |"


def test_a_recorded_point_with_fewer_epochs_than_compared_is_not_called_identical(tiny, tmp_path):
    spec = DATASETS["Scientific"]
    (tmp_path / "data" / spec.folder).mkdir(parents=True)
    shutil.copy(tiny["users"], tmp_path / "data" / spec.folder / spec.users_file)
    shutil.copy(tiny["items"], tmp_path / "data" / spec.folder / spec.items_file)
    train(point_config("id", "Scientific", 12345, tmp_path / "data", tmp_path / "work").replace(epochs=1))
    report = verify_point("id", "Scientific", 12345, tmp_path / "data", tmp_path / "work", tmp_path / "scratch",
                          epochs=2)
    assert [c["epoch"] for c in report["compared"]] == [0] and report["identical"] is False


# --------------------------------------------------------------------------------------------------
# encoders


def test_an_encoder_folder_without_its_config_lacks_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "vocab.txt").write_text("")
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == ["config.json"]


@pytest.mark.parametrize("index", ['{"weight_map": {"w": "model-1.safetensors"', '{"metadata": {}}', "[1]",
                                   '{"weight_map": {"w": 5}}', '{"weight_map": {}}', '{"weight_map": ["w"]}'])
def test_a_sharded_encoder_folder_whose_index_is_cut_short_or_damaged_lacks_a_readable_one(tmp_path, index):
    """The fetch of a sharded checkpoint stopped mid-write, or its index edited: it had ended in a traceback."""
    for name in ("config.json", "vocab.txt", "model-1.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == [
        "a model.safetensors.index.json that names its weight files"]
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-2.safetensors"}}')
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == ["model-2.safetensors"]


def test_a_text_encoder_folder_without_a_vocabulary_lacks_one(tmp_path):
    """tokenizer_config.json alone is no tokenizer: transformers 5 would build one of special tokens only and
    read every title as [UNK]. Any vocabulary file will do; an image folder needs its processor config."""
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == [
        "a vocabulary (tokenizer.json, vocab.txt, vocab.json, ...)"]
    (tmp_path / "spiece.model").write_bytes(b"")
    assert missing_files(tmp_path, ENCODERS["bert-base-uncased"]) == []
    assert missing_files(tmp_path, ENCODERS["vit-base-patch16-224"]) == ["preprocessor_config.json"]


def test_an_image_encoder_is_fetched_by_hand_with_its_image_processor_files():
    assert by_hand(ENCODERS["vit-base-patch16-224"], "abc", Path("/x/vit")) == (
        "download config.json, the image-processor files and the safetensors weights (model*.safetensors) from "
        "https://huggingface.co/google/vit-base-patch16-224/tree/abc into /x/vit/")


def test_a_connection_error_that_another_was_raised_while_handling_is_an_unreachable_hub():
    try:
        try:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        except ConnectionError:
            raise RuntimeError("snapshot failed")  # noqa: B904 (as a client's own code raises it)
    except RuntimeError as err:
        assert unreachable(err) == "ConnectionError: Failed to resolve 'huggingface.co'"


class CachingHub(FakeHub):
    """As huggingface_hub's snapshot_download leaves it: its resume bookkeeping under ``.cache``."""

    def download(self, repo_id, revision, allow_patterns, local_dir):
        super().download(repo_id, revision, allow_patterns, local_dir)
        (local_dir / ".cache" / "huggingface" / "download").mkdir(parents=True, exist_ok=True)
        (local_dir / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("etag\n")


def test_the_hub_clients_bookkeeping_is_not_kept_nor_recorded(hub, tmp_path):  # noqa: F811
    text, _ = fetch_encoders("iisan", tmp_path / "pretrained_models", CachingHub(hub.repos))
    assert not (text / ".cache").exists()
    files = Manifest(text / MANIFEST, text).info("download")["files"]
    assert "config.json" in files and not [name for name in files if name.startswith(".cache")]


# --------------------------------------------------------------------------------------------------
# the demo


def test_a_demo_run_may_go_on_with_as_many_epochs_as_it_has_trained_but_not_fewer(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"epochs": [{}, {}]}))
    refuse_fewer_epochs(tmp_path, 2)  # the same command again: nothing to refuse
    with pytest.raises(ConfigError) as err:
        refuse_fewer_epochs(tmp_path, 1)
    assert str(err.value) == (f"--epochs 1: {tmp_path} has trained 2 epochs already; give at least that many to go "
                              "on with it, or another --out")


def test_demo_settings_are_described_with_every_other_setting_that_differs():
    settings = generation_settings(0, {"num_users": 100})
    other = {**settings, "num_topics": 7}
    assert describe(settings, other) == "100 users, 400 items, seed 0, num_topics 20"
    assert describe(settings, settings) == "100 users, 400 items, seed 0"


def test_a_demo_run_is_named_by_its_seed(tmp_path):
    assert demo_config({}, tmp_path, seed=3).run_name == "demo-seed3"
    assert demo_config({}, tmp_path).run_name == "demo-seed12345"
    assert demo_config({}, tmp_path, run_name="mine").run_name == "mine"


# --------------------------------------------------------------------------------------------------
# provenance


def test_a_copied_tree_records_the_commit_it_is_given_and_a_checkout_its_own(monkeypatch):
    """$IISAN_COMMIT is for a tree git cannot name (a copy without .git on a lent GPU); left exported, it
    relabelled every later run of a checkout."""
    monkeypatch.setenv("IISAN_COMMIT", "abc1234+dirty")
    no_git = subprocess.CompletedProcess(["git"], 128, "", "fatal: not a git repository")
    monkeypatch.setattr(provenance_module.subprocess, "run", lambda argv, **kw: no_git)
    assert provenance_module.git_commit() == "abc1234+dirty"
    said = {"rev-parse": "def5678\n", "status": ""}
    monkeypatch.setattr(provenance_module.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 0, said[argv[1]], ""))
    assert provenance_module.git_commit() == "def5678"


@pytest.mark.parametrize("status,commit", [(" M iisan/methods.py\n", "abc1234+dirty"), ("", "abc1234")])
def test_a_checkout_with_local_changes_is_recorded_dirty(monkeypatch, status, commit):
    monkeypatch.delenv("IISAN_COMMIT", raising=False)
    said = {"rev-parse": "abc1234\n", "status": status}
    monkeypatch.setattr(provenance_module.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 0, said[argv[1]], ""))
    assert provenance_module.git_commit() == commit


def test_a_status_naming_a_file_in_another_encoding_is_read_as_dirty(monkeypatch):
    """Under core.quotePath=false git prints a file's name as its bytes: a latin-1 name made every run's
    ``git_commit`` raise UnicodeDecodeError (``text=True`` decodes strictly, as this stand-in does)."""
    monkeypatch.delenv("IISAN_COMMIT", raising=False)
    said = {"rev-parse": b"abc1234\n", "status": b" M caf\xe9.txt\n"}

    def run(argv, **kw):
        out = said[argv[1]]
        return subprocess.CompletedProcess(argv, 0, out.decode("utf-8") if kw.get("text") else out, b"")

    monkeypatch.setattr(provenance_module.subprocess, "run", run)
    assert provenance_module.git_commit() == "abc1234+dirty"


def test_provenance_records_the_command_an_absent_package_and_the_commit_read_before(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/bench.py", "--out", "a b.json"])
    monkeypatch.setattr(provenance_module, "PACKAGES", ("torch", "no-such-package-iisan"))
    record = provenance_module.provenance(commit="abc1234")
    assert record["command"] == "python scripts/bench.py --out 'a b.json'"
    assert record["versions"]["no-such-package-iisan"] == "absent"
    assert record["git_commit"] == "abc1234" and record["device"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}", record["date"])  # with its zone, as ended_at
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/iisan/__main__.py", "demo", "--out", "d"])  # python -m iisan
    assert provenance_module.command_line() == "python -m iisan demo --out d"  # (the file alone would not run)
    monkeypatch.setattr(sys, "argv", ["/home/me/.venv/bin/iisan", "train", "--lr", "1e-3"])  # the console script
    assert provenance_module.command_line() == "/home/me/.venv/bin/iisan train --lr 1e-3"


def test_the_recorded_command_leaves_out_a_urls_credentials(monkeypatch):
    """train.log, cache-build.log and a benchmark's JSON record the command, and get shared: a token in a URL
    argument (a mirror, a fetch source) would go with them."""
    monkeypatch.setattr(sys, "argv", ["/v/bin/iisan", "fetch", "--mirror", "https://me:hf_SECRET@example.org/x",
                                      "--other", "s3://KEY:pw@bucket/a", "--plain", "https://example.org/a@b"])
    assert provenance_module.command_line() == ("/v/bin/iisan fetch --mirror 'https://***@example.org/x' --other "
                                                "'s3://***@bucket/a' --plain https://example.org/a@b")


def test_the_peak_memory_is_read_when_the_process_name_is_cut_inside_a_character(monkeypatch):
    """The kernel cuts a process's name at 15 bytes, perhaps inside a UTF-8 character (a script of a non-ASCII
    name): /proc/self/status read strictly raised, and the benchmark fell back to ru_maxrss, the parent's too.
    The stand-in decodes as ``open`` would with the arguments given."""
    import io

    from iisan import memory

    status = b"Name:\tbench_\xc3\nVmHWM:\t    2048 kB\n"
    monkeypatch.setattr(memory, "open", lambda path, *args, encoding=None, errors=None: io.TextIOWrapper(
        io.BytesIO(status), encoding=encoding or "utf-8", errors=errors or "strict"), raising=False)
    assert memory.own_peak_rss() == 2048 * 1024
