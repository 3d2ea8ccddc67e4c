"""`iisan fetch encoders` through a stand-in Hub client: only the files a run loads, at the pinned
commit, recorded in a manifest that a second run verifies; failures are one line and leave no folder
under the model's name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from iisan.data.manifest import FORMAT
from iisan.errors import FetchError
from iisan.experiments.encoders import ENCODER_PRESETS, ENCODERS, MANIFEST, RUN_FILES, fetch_encoders
from iisan.model.backbones import load_image_encoder, load_text_encoder

EXTRA = {"pytorch_model.bin": b"pickled", "tf_model.h5": b"h5", "flax_model.msgpack": b"flax",
         "original/params.json": b"{}", "README.md": b"# card", "coreml/model.mlmodel": b"ml"}


class FakeHub:
    """Repositories as local folders, filtered exactly as huggingface_hub filters a snapshot."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.downloads, self.resolved, self.error = repos, [], [], None

    def resolve(self, repo_id: str, revision: str) -> str:
        self.resolved.append((repo_id, revision))
        return "c0ffee" * 6 + "beef"

    def download(self, repo_id: str, revision: str, allow_patterns: list[str], local_dir: Path) -> None:
        self.downloads.append((repo_id, revision))
        if self.error:
            raise self.error
        repo = self.repos[repo_id]
        names = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, local_dir / name)
        (local_dir / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as snapshot_download leaves


def repo_from(folder: str, root: Path, name: str) -> Path:
    repo = root / "hub" / name
    shutil.copytree(folder, repo)
    for extra, data in EXTRA.items():
        (repo / extra).parent.mkdir(parents=True, exist_ok=True)
        (repo / extra).write_bytes(data)
    return repo


@pytest.fixture()
def hub(tiny, tmp_path):
    return FakeHub({"google-bert/bert-base-uncased": repo_from(tiny["text_model"], tmp_path, "bert"),
                    "google/vit-base-patch16-224": repo_from(tiny["image_model"], tmp_path, "vit"),
                    "meta-llama/Meta-Llama-3-8B": repo_from(tiny["text_model"], tmp_path, "llama")})


def test_only_the_files_a_run_loads_arrive_at_the_pinned_commit_and_load_offline(hub, tmp_path):
    root = tmp_path / "pretrained_models"
    text, image = fetch_encoders("iisan", root, hub)
    assert hub.downloads == [("google-bert/bert-base-uncased", ENCODERS["bert-base-uncased"].revision),
                             ("google/vit-base-patch16-224", ENCODERS["vit-base-patch16-224"].revision)]
    names = {p.relative_to(text).as_posix() for p in text.rglob("*") if p.is_file()}
    assert "model.safetensors" in names and "config.json" in names and MANIFEST in names
    assert not names & set(EXTRA) and not any(n.startswith(".cache") for n in names)
    manifest = json.loads((text / MANIFEST).read_text())["steps"]["download"]
    assert manifest["revision"] == ENCODERS["bert-base-uncased"].revision
    assert set(manifest["files"]) == names - {MANIFEST}
    assert manifest["files"]["config.json"]["size"] == (text / "config.json").stat().st_size
    assert not list(root.glob(".*.partial"))
    assert load_text_encoder(str(text), (0, 1)).width == 32  # the folder is what a run loads
    assert load_image_encoder(str(image), (0, 1)).width == 24


def test_a_second_run_verifies_and_a_changed_file_fails_in_one_line(hub, tmp_path):
    root = tmp_path / "pretrained_models"
    fetch_encoders("iisan", root, hub)
    fetch_encoders("iisan", root, hub)
    assert len(hub.downloads) == 2  # nothing fetched twice
    config = root / "vit-base-patch16-224" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    with pytest.raises(FetchError, match="changed since it was fetched") as err:
        fetch_encoders("iisan", root, hub)
    assert str(config) in str(err.value) and "\n" not in str(err.value)


def test_an_unpinned_encoder_records_the_commit_it_resolved(hub, tmp_path):
    (text, _) = fetch_encoders("llama3-8b+vit-base", tmp_path, hub)
    assert hub.resolved == [("meta-llama/Meta-Llama-3-8B", "main")]
    manifest = json.loads((text / MANIFEST).read_text())["steps"]["download"]
    assert manifest["revision"] == "c0ffee" * 6 + "beef" and manifest["requested"] == "main"


def test_a_failed_download_is_one_line_and_leaves_no_folder_under_the_models_name(hub, tmp_path):
    hub.error = ConnectionError("[Errno 101] Network is unreachable")
    with pytest.raises(FetchError) as err:
        fetch_encoders("iisan", tmp_path, hub)
    message = str(err.value)
    assert "\n" not in message and "google-bert/bert-base-uncased@86b5e0934494" in message
    assert "https://huggingface.co/google-bert/bert-base-uncased/tree/86b5e0934494" in message
    assert f"into {tmp_path / 'bert-base-uncased'}/" in message
    assert not (tmp_path / "bert-base-uncased").exists()


def test_a_repository_without_safetensors_is_refused_and_a_folder_placed_by_hand_is_kept(hub, tmp_path):
    (hub.repos["google-bert/bert-base-uncased"] / "model.safetensors").unlink()
    with pytest.raises(FetchError, match="lacks safetensors weights"):
        fetch_encoders("iisan", tmp_path, hub)
    assert not (tmp_path / "bert-base-uncased").exists()  # only the .partial folder holds the attempt
    by_hand = tmp_path / "bert-base-uncased"
    by_hand.mkdir()
    (by_hand / "config.json").write_text("{}")
    fetch_encoders("iisan", tmp_path, hub)
    assert [p.name for p in by_hand.iterdir()] == ["config.json"]  # left as it is


def download_step(**facts) -> str:
    """A fetch manifest's text with a download step of ``facts`` (and no files)."""
    return json.dumps({"format": FORMAT, "steps": {"download": {"files": {}, **facts}}})


PIN = ENCODERS["bert-base-uncased"].revision
DAMAGED = [  # (manifest text, what the one line says is wrong)
    ("[]", "damaged (not a JSON object)"),
    (json.dumps({"format": FORMAT}), "damaged (no 'steps' object)"),
    (json.dumps({"format": FORMAT, "steps": {}}), "damaged (no step 'download')"),
    (download_step(repo_id="r"), "damaged (step 'download' has no revision (a string))"),
    (download_step(repo_id="r", revision=7), "damaged (step 'download' has no revision (a string))"),
    (download_step(revision=PIN), "damaged (step 'download' has no repo_id (a string))"),
    (download_step(repo_id="r", revision=PIN, files={"/etc/hosts": {}}),
     "damaged (step 'download' names '/etc/hosts', not a path inside the folder it records)"),
]


@pytest.mark.parametrize(("text", "wrong"), DAMAGED, ids=range(len(DAMAGED)))
def test_a_damaged_manifest_is_one_line_naming_it_and_the_folder_stays(hub, tmp_path, text, wrong):
    target = tmp_path / "bert-base-uncased"
    target.mkdir()
    (target / MANIFEST).write_text(text)
    with pytest.raises(FetchError) as err:
        fetch_encoders("iisan", tmp_path, hub)
    assert str(err.value) == f"{target / MANIFEST} is {wrong}; move {target} away and run `iisan fetch encoders` again"
    assert hub.downloads == [] and (target / MANIFEST).read_text() == text  # nothing fetched, nothing removed


def test_the_presets_name_known_encoders_and_every_pin_is_a_full_commit():
    from iisan.cli.main import build_parser

    from .test_cli_help import parsers

    assert all(name in ENCODERS for names in ENCODER_PRESETS.values() for name in names)
    fetch = next(p for p in parsers(build_parser()) if p.prog.endswith("fetch encoders"))
    preset = next(a for a in fetch._actions if a.dest == "preset")
    assert preset.choices == sorted(ENCODER_PRESETS)  # named without loading huggingface_hub for --help
    assert all(m.revision is None or len(m.revision) == 40 for m in ENCODERS.values())
    assert not list(filter_repo_objects(list(EXTRA), allow_patterns=RUN_FILES))
    # what loading reads: a processor_config.json first, where a repository has one (encoder_files)
    assert list(filter_repo_objects(["processor_config.json", "preprocessor_config.json"], allow_patterns=RUN_FILES))\
        == ["processor_config.json", "preprocessor_config.json"]
