"""Downloads, resuming and manifests against a local HTTP server started here; Google Drive and the
Hugging Face Hub through stand-ins of their client interfaces; offline runs end in one line. No test
reaches the network."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iisan.data.datasets import DATASETS, FETCHABLE, dataset_paths
from iisan.data.download import Expected, git_blob_id, http_download, mismatch, partial_path
from iisan.data.fetch import MANIFEST, fetch_dataset, unpack_images
from iisan.data.interactions import load_dataset
from iisan.data.manifest import FORMAT, Manifest
from iisan.data.sources import SOURCES, DataSource, DriveArchive, RepoFile
from iisan.errors import DataError, FetchError, OutputError

from .conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]
CONTENT = bytes(range(256)) * 64  # 16 KiB


class FileHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.seen.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and server.ranges:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if server.drop_after is not None:  # the connection breaks part-way
            self.wfile.write(payload[: server.drop_after])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    httpd.files, httpd.seen, httpd.ranges, httpd.drop_after = {"/f.bin": CONTENT}, [], True, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)  # (0.5 s a
    # test at shutdown by default: the interval is how often it looks for a shutdown, not how it answers)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def full(data: bytes = CONTENT) -> Expected:
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return Expected(len(data), hashlib.sha256(data).hexdigest(), blob)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------------------------------
# one file


def test_a_download_is_checked_and_renamed_into_place(server, tmp_path):
    dest = http_download(server.url + "/f.bin", tmp_path / "f.bin", full())
    assert dest.read_bytes() == CONTENT and not partial_path(dest).exists()
    assert git_blob_id(dest) == full().git_blob  # what `git hash-object` gives
    assert server.seen == [("/f.bin", None)]


def test_a_truncated_download_resumes_where_it_stopped(server, tmp_path):
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(CONTENT[:5000])
    http_download(server.url + "/f.bin", dest, full())
    assert dest.read_bytes() == CONTENT
    assert server.seen == [("/f.bin", "bytes=5000-")]


def test_a_server_that_cannot_resume_makes_the_download_restart(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(CONTENT[:5000])
    http_download(server.url + "/f.bin", dest, full())
    assert dest.read_bytes() == CONTENT  # not the first 5000 bytes twice


def test_a_part_as_long_as_the_file_restarts_when_the_range_cannot_be_served(server, tmp_path):
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(b"x" * len(CONTENT))  # no size known: only the server can tell
    http_download(server.url + "/f.bin", dest, Expected(sha256=full().sha256))
    assert dest.read_bytes() == CONTENT
    assert server.seen == [("/f.bin", f"bytes={len(CONTENT)}-"), ("/f.bin", None)]


def test_a_complete_part_left_before_its_rename_is_checked_and_used_without_a_request(server, tmp_path):
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(CONTENT)
    assert http_download(server.url + "/f.bin", dest, full()).read_bytes() == CONTENT
    assert server.seen == [] and not partial_path(dest).exists()
    dest.unlink()
    partial_path(dest).write_bytes(b"x" * len(CONTENT))  # as long as the file, not it: fetched whole
    assert http_download(server.url + "/f.bin", dest, full()).read_bytes() == CONTENT
    assert server.seen == [("/f.bin", None)]


def test_a_broken_connection_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    dest = tmp_path / "f.bin"
    server.drop_after = 6000
    with pytest.raises(FetchError) as err:
        http_download(server.url + "/f.bin", dest, full())
    assert "kept for the next run" in one_line(err) and str(dest) in one_line(err)
    assert partial_path(dest).read_bytes() == CONTENT[:6000] and not dest.exists()
    server.drop_after = None
    http_download(server.url + "/f.bin", dest, full())
    assert dest.read_bytes() == CONTENT and server.seen[-1] == ("/f.bin", "bytes=6000-")


def test_a_download_that_fails_its_check_is_removed_and_named(server, tmp_path):
    dest = tmp_path / "f.bin"
    partial_path(dest).write_bytes(b"not the start of the file")  # resumed: a wrong prefix
    with pytest.raises(FetchError, match="has sha256") as err:
        http_download(server.url + "/f.bin", dest, full())
    assert server.url in one_line(err)
    assert not partial_path(dest).exists() and not dest.exists()
    http_download(server.url + "/f.bin", dest, full())  # the next run starts clean
    assert dest.read_bytes() == CONTENT
    with pytest.raises(FetchError, match="git blob id"):
        http_download(server.url + "/f.bin", tmp_path / "g.bin", Expected(git_blob="0" * 40))


@pytest.mark.parametrize("had", [0, 5000])
def test_a_server_sending_more_than_the_known_size_is_cut_off_one_byte_past_it(server, tmp_path, had):
    """A file of known size (the TSVs) is never written past it: a server sending more (or without end) is
    stopped one byte past the size, and the size check names the file and removes it."""
    server.files["/big.bin"] = CONTENT * 64  # 1 MiB where 16 KiB are known
    dest = tmp_path / "f.bin"
    if had:
        partial_path(dest).write_bytes(CONTENT[:had])  # resumed: the server sends the rest of its 1 MiB
    with pytest.raises(FetchError) as caught:
        http_download(server.url + "/big.bin", dest, full())
    assert one_line(caught) == (f"the file downloaded from {server.url}/big.bin has 16,385 bytes, expected 16,384; "
                                f"it was removed, run the command again to retry, or download it by hand to {dest}")
    assert not partial_path(dest).exists() and not dest.exists()


def test_an_unreachable_server_is_one_line_naming_the_address_and_the_destination(server, tmp_path):
    url = server.url + "/f.bin"
    server.shutdown()
    server.server_close()
    with pytest.raises(FetchError, match="cannot download") as err:
        http_download(url, tmp_path / "f.bin", full(), timeout=5)
    assert url in one_line(err) and str(tmp_path / "f.bin") in one_line(err)
    assert not (tmp_path / "f.bin").exists()


# --------------------------------------------------------------------------------------------------
# a data set: TSVs over HTTP, images from a Drive stand-in, LMDB, statistics, manifest


class FakeDrive:
    """Serves one zip by id; ``fail`` makes the next call raise like a blocked Drive would."""

    def __init__(self, archives: dict[str, Path]):
        self.archives, self.calls, self.fail = archives, [], False

    def download(self, file_id: str, dest: Path) -> None:
        self.calls.append(file_id)
        if self.fail:
            raise ConnectionError("Too many users have viewed or downloaded this file recently")
        shutil.copyfile(self.archives[file_id], dest)


@pytest.fixture()
def served_data(tiny, server, tmp_path):
    """The tiny data set as the authors publish theirs: TSVs on a server, images as a zip on 'Drive'."""
    users, items = Path(tiny["users"]).read_bytes(), Path(tiny["items"]).read_bytes()
    source = DataSource(
        folder="Tiny",
        users=RepoFile("Dataset/Tiny/users.tsv", full(users), server.url + "/{path}"),
        items=RepoFile("Dataset/Tiny/items.tsv", full(items), server.url + "/{path}"),
        images=DriveArchive("am_image_tn.zip", "drive-id-1", "am_image_tn"),
        stats=tuple(load_dataset(tiny["users"], tiny["items"]).stats().values()),
    )
    server.files.update({"/Dataset/Tiny/users.tsv": users, "/Dataset/Tiny/items.tsv": items})
    archive = tmp_path / "drive" / "am_image_tn.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted(Path(tiny["image_dir"]).iterdir()):
            zf.write(image, f"am_image_tn/{image.name}")
    return {"sources": {"Tiny": source}, "drive": FakeDrive({"drive-id-1": archive}), "root": tmp_path / "repo"}


def fetch(served, **kw):
    return fetch_dataset("Tiny", served["root"], served["drive"], sources=served["sources"], **kw)


@pytest.mark.slow
def test_a_data_set_is_fetched_recorded_and_verified_by_a_second_run(served_data, server, tiny, caplog):
    root = served_data["root"]
    stats = fetch(served_data)
    assert tuple(stats.values()) == served_data["sources"]["Tiny"].stats
    base = root / "Dataset"
    assert (base / "Tiny" / "users.tsv").read_bytes() == Path(tiny["users"]).read_bytes()
    assert sorted(p.name for p in (base / "am_image_tn").iterdir()) == \
        sorted(p.name for p in Path(tiny["image_dir"]).iterdir())
    assert (base / "Tiny" / "images.lmdb" / "data.mdb").is_file()
    manifest = Manifest(base / "Tiny" / MANIFEST, root)
    assert list(manifest.data["steps"]) == ["tsv", "archive", "images", "lmdb", "stats"]
    recorded = manifest.info("tsv")["files"]["Dataset/Tiny/items.tsv"]
    assert recorded == {"size": len(Path(tiny["items"]).read_bytes()),
                        "sha256": hashlib.sha256(Path(tiny["items"]).read_bytes()).hexdigest()}
    assert len(manifest.info("images")["files"]) == len(list(Path(tiny["image_dir"]).iterdir()))

    requests, drive_calls = len(server.seen), len(served_data["drive"].calls)
    with caplog.at_level(logging.INFO, logger="iisan.data.fetch"):
        fetch(served_data)  # everything done: verified, nothing downloaded again
    assert len(server.seen) == requests and len(served_data["drive"].calls) == drive_calls
    said = [r.getMessage() for r in caplog.records]
    assert "Tiny: step tsv was done before; its 2 file(s) are unchanged" in said
    assert "Tiny: step stats was done before (it wrote no file)" in said  # not "its 0 files are unchanged"

    (base / "am_image_tn.zip").unlink()  # the archive is not needed once unpacked
    fetch(served_data)
    first_image = sorted((base / "am_image_tn").iterdir())[0]
    first_image.write_bytes(first_image.read_bytes()[:-1] + b"\0")
    with pytest.raises(FetchError, match="changed since it was fetched") as err:
        fetch(served_data)
    assert str(first_image) in one_line(err) and "--dataset Tiny" in one_line(err)


def test_a_changed_tsv_fails_the_second_run_with_one_line(served_data):
    fetch(served_data)
    users = served_data["root"] / "Dataset" / "Tiny" / "users.tsv"
    users.write_text(users.read_text().replace("\t", "\t ", 1))
    with pytest.raises(FetchError) as err:
        fetch(served_data)
    assert f"{users} has " in one_line(err) and "manifest says" in one_line(err)


def test_a_blocked_drive_is_one_line_and_the_next_run_goes_on_from_there(served_data, server):
    served_data["drive"].fail = True
    with pytest.raises(FetchError) as err:
        fetch(served_data)
    message = one_line(err)
    assert "https://drive.google.com/file/d/drive-id-1/view" in message and "am_image_tn.zip" in message
    manifest = Manifest(served_data["root"] / "Dataset" / "Tiny" / MANIFEST, served_data["root"])
    assert list(manifest.data["steps"]) == ["tsv"]  # the finished step stays finished
    assert not (served_data["root"] / "Dataset" / "am_image_tn").exists()
    requests = len(server.seen)
    served_data["drive"].fail = False
    fetch(served_data)
    assert len(server.seen) == requests  # the TSVs were not downloaded again


def test_files_put_in_place_by_hand_are_used_and_a_foreign_tsv_is_refused(served_data, tiny):
    base = served_data["root"] / "Dataset"
    shutil.copytree(tiny["image_dir"], base / "am_image_tn")  # unzipped by hand: Drive is not needed
    (base / "Tiny").mkdir(parents=True)
    shutil.copyfile(tiny["items"], base / "Tiny" / "items.tsv")
    fetch(served_data)
    assert served_data["drive"].calls == []
    other = served_data["root"] / "other"
    (other / "Dataset" / "Tiny").mkdir(parents=True)
    (other / "Dataset" / "Tiny" / "users.tsv").write_text("u1\tA B C D E\n")
    with pytest.raises(FetchError, match="is not the authors' file") as err:
        fetch({**served_data, "root": other})
    assert "move it away" in one_line(err)


@pytest.mark.parametrize("off", [0, 1, 2], ids=["users", "items", "interactions"])
def test_statistics_unlike_the_papers_fail_with_the_numbers(served_data, off):
    source = served_data["sources"]["Tiny"]
    stats = [n + (i == off) for i, n in enumerate(source.stats)]
    served_data["sources"]["Tiny"] = replace(source, stats=tuple(stats))
    with pytest.raises(DataError, match="the paper's data set has") as err:
        fetch(served_data)
    users, items, interactions = source.stats
    assert f"{users:,} users / {items:,} items / {interactions:,} interactions" in one_line(err)


def test_a_digest_that_differs_only_in_its_tail_is_a_mismatch_and_said_whole(tmp_path):
    """The downloads' and the manifest's sha256 checks compare every digit; where the first 16 agree, the
    message shows both whole (two equal prefixes read as a match)."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"data")
    digest = hashlib.sha256(b"data").hexdigest()
    tail = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    assert mismatch(path, Expected(sha256=digest)) is None
    assert mismatch(path, Expected(sha256=tail)) == f"has sha256 {digest}, expected {tail}"
    manifest = Manifest(tmp_path / MANIFEST, tmp_path)
    manifest.record("step", [path])
    assert manifest.verify("step") == 1
    manifest.data["steps"]["step"]["files"]["f.bin"]["sha256"] = tail
    with pytest.raises(FetchError, match=rf"f.bin has sha256 {digest}, the manifest says {tail}"):
        manifest.verify("step")


def test_a_file_that_is_not_a_fetch_manifest_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text('{"steps": {}}')
    with pytest.raises(FetchError, match=r"is not an IISAN fetch manifest \(format None, expected "):
        Manifest(tmp_path / MANIFEST, tmp_path)


def fetch_manifest(steps=None, **data) -> str:
    """A fetch manifest's text: our format, with ``steps`` where given and ``data`` beside them."""
    return json.dumps({"format": FORMAT, **({} if steps is None else {"steps": steps}), **data})


NO_RECORD = "damaged (step 'tsv' records 'x' without an integer size and a sha256 string)"
DAMAGED_DATA = [  # (manifest text, what the one line says is wrong)
    ("[]", "damaged (not a JSON object)"),
    ("[" * 100_000, "not a readable manifest (NestedTooDeep)"),
    (fetch_manifest(), "damaged (no 'steps' object)"),
    (fetch_manifest([]), "damaged (no 'steps' object)"),
    (fetch_manifest({"tsv": []}), "damaged (step 'tsv' is not an object)"),
    (fetch_manifest({"tsv": {}}), "damaged (step 'tsv' has no 'files' object)"),
    (fetch_manifest({"tsv": {"files": []}}), "damaged (step 'tsv' has no 'files' object)"),
    (fetch_manifest({"tsv": {"files": {"x": {}}}}), NO_RECORD),
    (fetch_manifest({"tsv": {"files": {"x": {"size": "4", "sha256": "ab"}}}}), NO_RECORD),
    (fetch_manifest({"tsv": {"files": {"x": {"size": True, "sha256": "ab"}}}}), NO_RECORD),
    (fetch_manifest({"tsv": {"files": {"x": {"size": 4, "sha256": None}}}}), NO_RECORD),
    (fetch_manifest({"tsv": {"files": {"../x": {"size": 4, "sha256": "ab"}}}}),
     "damaged (step 'tsv' names '../x', not a path inside the folder it records)"),
    (fetch_manifest({"stats": {"files": {}, "users": 1, "items": "2", "interactions": 3}}),
     "damaged (step 'stats' has no items (an integer))"),
]


@pytest.mark.parametrize(("text", "wrong"), DAMAGED_DATA, ids=range(len(DAMAGED_DATA)))
def test_a_damaged_data_manifest_is_one_line_and_left_in_place(tmp_path, text, wrong):
    manifest = tmp_path / "Dataset" / "Scientific" / MANIFEST
    manifest.parent.mkdir(parents=True)
    manifest.write_text(text)
    (tmp_path / "x").write_bytes(b"data")  # the file some of them name, 4 bytes

    def no_download(url, dest, expected):
        raise AssertionError(f"downloaded {url}")

    with pytest.raises(FetchError) as err:
        fetch_dataset("Scientific", tmp_path, download=no_download)
    assert one_line(err) == f"{manifest} is {wrong}; move it away and run `iisan fetch data --dataset Scientific` again"
    assert manifest.read_text() == text  # the user's file: never replaced or removed


def test_a_damaged_manifest_ends_the_fetch_commands_in_one_line(tmp_path):
    manifest = tmp_path / "Dataset" / "Scientific" / MANIFEST
    manifest.parent.mkdir(parents=True)
    manifest.write_text(fetch_manifest({"tsv": {"files": {"x": {}}}}))
    line = error_line(run_cli("fetch", "data", "--dataset", "Scientific", "--root", str(tmp_path)))
    assert line.startswith(f"iisan: error: {manifest} is damaged (step 'tsv' records 'x' without an integer size")
    encoder = tmp_path / "models" / "bert-base-uncased"
    encoder.mkdir(parents=True)
    (encoder / "iisan-fetch.json").write_text(fetch_manifest())
    line = error_line(run_cli("fetch", "encoders", "--root", str(tmp_path / "models")))
    assert line == (f"iisan: error: {encoder / 'iisan-fetch.json'} is damaged (no 'steps' object); move {encoder} "
                    "away and run `iisan fetch encoders` again")


def test_an_archive_member_outside_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escaped.jpg", b"x")
    with pytest.raises(FetchError, match="outside"):
        unpack_images(archive, tmp_path / "Dataset" / "am_image_xx")
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "Dataset" / "am_image_xx").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FetchError, match="not a complete zip archive"):
        unpack_images(tmp_path / "bad.zip", tmp_path / "Dataset" / "am_image_yy")


def test_an_archive_zipfile_cannot_unpack_is_one_line_saying_to_unzip_it_by_hand(tmp_path):
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("1.jpg", b"one" * 100)
    data = bytearray(archive.read_bytes())
    for header, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers' method
        at = data.index(header) + method_at
        data[at:at + 2] = (99).to_bytes(2, "little")  # AES encryption's method: zipfile has no unpacker for it
    archive.write_bytes(bytes(data))
    target = tmp_path / "Dataset" / "am_image_xx"
    with pytest.raises(FetchError) as caught:
        unpack_images(archive, target)
    assert one_line(caught).startswith(f"{archive} cannot be unpacked here (")
    assert one_line(caught).endswith(f"); unzip it by hand into {target}/ and run the fetch again")
    assert not target.exists() and not (tmp_path / "Dataset" / ".am_image_xx.unpacking").exists()


@pytest.mark.parametrize("inner", ["", "am_image_xx/"])
def test_what_the_macos_archiver_adds_stays_out_of_the_image_folder(tmp_path, inner):
    archive = tmp_path / "mac.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{inner}1.jpg", b"one")
        zf.writestr(f"__MACOSX/{inner}._1.jpg", b"resource fork")
        zf.writestr(".DS_Store", b"finder")
    target = tmp_path / "Dataset" / "am_image_xx"
    target.parent.mkdir()
    unpack_images(archive, target)
    assert sorted(p.name for p in target.iterdir()) == ["1.jpg"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["am_image_xx"]  # nothing left beside it


def test_every_source_is_a_data_set_of_the_registry_at_its_paths():
    """The registry's fetched rows are the download table's, in its order (``fetch data --dataset`` lists
    them so), read from where the download puts them; each source's statistics fit the protocol."""
    assert FETCHABLE == tuple(SOURCES) and {"Scientific", "Instrument"} <= set(FETCHABLE)
    for name, source in SOURCES.items():
        spec, paths = DATASETS[name], dataset_paths(name, Path("/repo"))
        assert spec.source is source and spec.name == name and spec.folder == source.folder
        assert (paths["users"], paths["items"]) == (f"/repo/{source.users.path}", f"/repo/{source.items.path}")
        users, items, interactions = source.stats  # >= 5 and <= 13 (max_seq_len + 3) interactions a user
        assert 5 * users <= interactions <= 13 * users and items <= interactions


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["Scientific", "Instrument"])
def test_the_sources_table_matches_the_shared_copies(name):
    copies = [shared_file(name, Path(f.path).name) for f in (SOURCES[name].users, SOURCES[name].items)]
    for copy, repo_file in zip(copies, (SOURCES[name].users, SOURCES[name].items), strict=True):
        assert mismatch(copy, repo_file.expected) is None  # size, sha256 and git blob id
        assert git_blob_id(copy) == repo_file.expected.git_blob
    assert tuple(load_dataset(*copies).stats().values()) == SOURCES[name].stats


# --------------------------------------------------------------------------------------------------
# the command line without the network


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iisan", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (its progress log lines may come before it)."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("iisan: error:")]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0])
    return errors[0]


@pytest.mark.slow
def test_offline_fetches_end_in_one_line_and_leave_nothing_presented_as_complete(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port: every connection is refused
    proxies = {"https_proxy": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "HTTP_PROXY": dead, "no_proxy": ""}
    line = error_line(run_cli("fetch", "data", "--dataset", "Scientific", "--root", str(tmp_path), env=proxies))
    assert line.startswith("iisan: error: cannot download https://raw.githubusercontent.com/GAIR-Lab/IISAN/")
    assert "am_Industrial_and_Scientific_users.tsv" in line
    assert not (tmp_path / "Dataset" / "Scientific" / "am_Industrial_and_Scientific_users.tsv").exists()

    line = error_line(run_cli("fetch", "encoders", "--root", str(tmp_path / "models"), env={"HF_HUB_OFFLINE": "1"}))
    assert "google-bert/bert-base-uncased@86b5e0934494" in line
    assert "https://huggingface.co/google-bert/bert-base-uncased/tree/86b5e0934494" in line
    assert str(tmp_path / "models" / "bert-base-uncased") in line
    assert not (tmp_path / "models" / "bert-base-uncased").exists()


def test_a_broken_archive_is_not_recorded_so_deleting_it_fetches_it_again(served_data):
    base = served_data["root"] / "Dataset"
    base.mkdir(parents=True)
    (base / "am_image_tn.zip").write_bytes(b"PK\x03\x04 cut short")  # put there by hand, incomplete
    with pytest.raises(FetchError, match="not a complete zip archive"):
        fetch(served_data)
    assert served_data["drive"].calls == []
    (base / "am_image_tn.zip").unlink()
    fetch(served_data)
    assert served_data["drive"].calls == ["drive-id-1"] and (base / "am_image_tn").is_dir()


def test_a_link_where_the_archive_unpacks_is_refused_and_what_it_points_to_is_left_alone(tmp_path):
    """The unpacking folder has a fixed name beside the target: a link planted there was written through (the
    archive's files landed in the folder it named) and then renamed into place as the image folder."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("precious.txt", b"from the archive")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_bytes(b"the user's")
    target = tmp_path / "Dataset" / "am_image_xx"
    target.parent.mkdir()
    (target.parent / ".am_image_xx.unpacking").symlink_to(mine)
    with pytest.raises(OutputError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == (f"{target.parent / '.am_image_xx.unpacking'} is a symbolic link where IISAN writes "
                                "the members of a.zip; it would write through it: move it away")
    assert (mine / "precious.txt").read_bytes() == b"the user's" and not os.path.lexists(target)


def test_an_archive_whose_members_the_disk_cannot_hold_is_refused_before_a_byte_is_unpacked(tmp_path, monkeypatch):
    """The Drive archive has no pinned size: its members' stated sizes are added up before unpacking (a small
    zip can stand for gigabytes); a member both a file and a folder fails in one line; neither leaves a thing."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("1.jpg", bytes(3 * 2**20))  # 3 MiB of zeros: a few KiB packed
        zf.writestr("2.jpg", b"two")
    target = tmp_path / "Dataset" / "am_image_xx"
    target.parent.mkdir()
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("iisan.files.shutil.disk_usage", lambda _: free._replace(free=2**20))
    with pytest.raises(OutputError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == (f"could not write {target.parent}: the 2 files of bomb.zip need about 3.0 MiB; the "
                                f"disk holding {target.parent} has 1.0 MiB free: free some space there, or write "
                                "elsewhere")
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/a", b"a file")
        zf.writestr("x/a/b", b"and a folder")
    with pytest.raises(OutputError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == (f"could not unpack {archive} beside {target}: "
                                f"{target.parent / '.am_image_xx.unpacking' / 'x' / 'a' / 'b'}: Not a directory")
    assert list(target.parent.iterdir()) == []  # (the half-unpacked folder had stayed until the next run)


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # zipfile, writing the archive
def test_member_names_that_come_twice_are_counted_in_a_warning(tmp_path, caplog):
    archive = tmp_path / "twice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in (("1.jpg", b"old"), ("2.jpg", b"two"), ("1.jpg", b"new")):
            zf.writestr(name, data)
    target = tmp_path / "am_image_xx"
    unpack_images(archive, target)
    assert (target / "1.jpg").read_bytes() == b"new"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{archive}: 1 members repeat an earlier one's name (the first: '1.jpg'); the last of each is unpacked"]


def test_a_link_where_a_partial_download_goes_is_refused_and_its_file_left_alone(server, tmp_path):
    """``f.bin.part`` is opened to append (or rewrite): a link there had the download written into its file."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"mine")
    dest = tmp_path / "f.bin"
    partial_path(dest).symlink_to(victim)
    with pytest.raises(OutputError) as caught:
        http_download(server.url + "/f.bin", dest, full())
    assert one_line(caught) == (f"{partial_path(dest)} is a symbolic link where IISAN writes a partial download of "
                                "f.bin; it would write through it: move it away")
    assert victim.read_bytes() == b"mine" and server.seen == [] and not dest.exists()


def test_a_full_local_disk_is_said_as_such_not_blamed_on_the_download(server, served_data, tmp_path, monkeypatch):
    """ENOSPC while writing a download was "cannot download <url> (...); download it by hand": the network and
    the URL are not at fault, and downloading by hand to the same disk fails the same way."""
    import iisan.data.download as download

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", lambda *args: FullDisk(), raising=False)
    with pytest.raises(OutputError) as caught:
        http_download(server.url + "/f.bin", tmp_path / "f.bin", full())
    assert one_line(caught) == f"could not write {tmp_path / 'f.bin.part'}: No space left on device"
    monkeypatch.undo()

    def full_disk(file_id, dest):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    served_data["drive"].download = full_disk
    with pytest.raises(OutputError) as caught:
        fetch(served_data)
    archive = served_data["root"] / "Dataset" / "am_image_tn.zip"
    assert one_line(caught) == f"could not write {archive}: Disk quota exceeded"


def test_damaged_compressed_data_and_a_file_where_the_images_go_are_one_line_and_leave_nothing(tmp_path):
    """zlib's own error (the Drive archive has no digest pinned before its first unpack) and a file at the
    image folder's name (the last rename) had been tracebacks, the second leaving the unpacked folder behind."""
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("1.jpg", bytes(range(256)) * 200)
    data = bytearray(archive.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("1.jpg")  # the member's compressed bytes
    data[start + 2:start + 12] = b"\xff" * 10
    archive.write_bytes(bytes(data))
    target = tmp_path / "Dataset" / "am_image_xx"
    target.parent.mkdir()
    with pytest.raises(FetchError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == (f"{archive} is not a complete zip archive (Error -3 while decompressing data: "
                                "invalid code lengths set); delete it and run the fetch again")
    assert list(target.parent.iterdir()) == []
    target.write_text("mine")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("1.jpg", b"one")
    with pytest.raises(FetchError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == (f"{target} is in the way of the images of damaged.zip: move it away and run the "
                                "fetch again")
    assert [p.name for p in target.parent.iterdir()] == ["am_image_xx"] and target.read_text() == "mine"


@pytest.mark.parametrize("code, said", [
    (errno.EROFS, "Read-only file system"),
    (errno.EFBIG, "File too large (this process's file-size limit, ulimit -f, or the file system's)")])
def test_a_read_only_or_size_limited_disk_is_said_as_such_not_blamed_on_the_download(server, tmp_path, monkeypatch,
                                                                                     code, said):
    import iisan.data.download as download

    class Refused(io.BytesIO):
        def write(self, data):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(download, "open", lambda *args: Refused(), raising=False)
    with pytest.raises(OutputError) as caught:
        http_download(server.url + "/f.bin", tmp_path / "f.bin", full())
    assert one_line(caught) == f"could not write {tmp_path / 'f.bin.part'}: {said}"


def test_a_link_to_nothing_where_a_partial_download_goes_is_refused_and_nothing_made_where_it_points(server,
                                                                                                    tmp_path):
    """A dangling link is a link too: opening it to write creates the file it names, outside the data folder."""
    dest = tmp_path / "f.bin"
    partial_path(dest).symlink_to(tmp_path / "planted.bin")
    with pytest.raises(OutputError) as caught:
        http_download(server.url + "/f.bin", dest, full())
    assert one_line(caught) == (f"{partial_path(dest)} is a symbolic link where IISAN writes a partial download of "
                                "f.bin; it would write through it: move it away")
    assert not (tmp_path / "planted.bin").exists() and server.seen == []


def zipped(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_a_leftover_unpacking_folder_is_ours_to_replace_and_a_file_there_is_refused(tmp_path):
    """An unpack stopped half-way leaves ``.<target>.unpacking/``: the next unpack replaces it (its files do not
    join the images). A file at that name is not ours: refused, left alone."""
    archive = zipped(tmp_path / "a.zip", [("1.jpg", b"one")])
    target = tmp_path / "Dataset" / "am_image_xx"
    (target.parent / ".am_image_xx.unpacking").mkdir(parents=True)
    (target.parent / ".am_image_xx.unpacking" / "half.jpg").write_bytes(b"half")
    unpack_images(archive, target)
    assert sorted(p.name for p in target.iterdir()) == ["1.jpg"]
    assert [p.name for p in target.parent.iterdir()] == ["am_image_xx"]
    other = tmp_path / "Dataset" / "am_image_yy"
    (other.parent / ".am_image_yy.unpacking").write_text("mine")
    with pytest.raises(FetchError) as caught:
        unpack_images(archive, other)
    assert one_line(caught) == (f"{other.parent / '.am_image_yy.unpacking'} is a file where IISAN unpacks a.zip: "
                                "move it away and run the fetch again")
    assert (other.parent / ".am_image_yy.unpacking").read_text() == "mine"


def test_a_link_to_nothing_where_the_images_go_is_in_the_way(tmp_path):
    archive = zipped(tmp_path / "a.zip", [("1.jpg", b"one")])
    target = tmp_path / "Dataset" / "am_image_xx"
    target.parent.mkdir()
    target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FetchError) as caught:
        unpack_images(archive, target)
    assert one_line(caught) == f"{target} is in the way of the images of a.zip: move it away and run the fetch again"
    assert target.is_symlink() and [p.name for p in target.parent.iterdir()] == ["am_image_xx"]


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # zipfile, writing the archive
def test_the_warning_names_the_first_name_that_comes_twice_not_the_first_member(tmp_path, caplog):
    archive = zipped(tmp_path / "twice.zip", [("1.jpg", b"one"), ("2.jpg", b"old"), ("2.jpg", b"new")])
    unpack_images(archive, tmp_path / "am_image_xx")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{archive}: 1 members repeat an earlier one's name (the first: '2.jpg'); the last of each is unpacked"]


def test_gdowns_bar_is_drawn_on_a_terminal_only(monkeypatch, tmp_path):
    """gdown draws its bar into a batch job's log as well, a carriage return at a time: thousands of updates on
    one line for a large archive."""
    import io
    import sys
    import types

    from iisan.data.fetch import GdownDrive

    asked = []
    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=lambda **kw: asked.append(kw["quiet"])))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stderr in (io.StringIO(), Terminal()):
        monkeypatch.setattr(sys, "stderr", stderr)
        GdownDrive().download("abc", tmp_path / "x.zip")
    assert asked == [True, False]
