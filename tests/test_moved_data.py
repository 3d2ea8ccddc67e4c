"""Data that moves between attempts of a run: a cluster job that copies the data set to its node's own disk
before each attempt, or a project moved to another folder. The data counts by what it holds (the users and
items files' fingerprints, an image LMDB's digest), so the same command on a copy finds, resumes and reuses
the same run; a copy that holds something else is another run, and where the content cannot be told the
place counts, as before."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from iisan.config import Config
from iisan.data.images import recorded_digest
from iisan.digests import file_fingerprint, known_fingerprint, sha256
from iisan.model.caching import build_cache_from_config
from iisan.train import checkpoint
from iisan.train.runnames import HASHES, config_hash, default_run_name, known_run_name, run_dir
from iisan.train.trainer import train

FAST = {k: 3e-3 for k in ("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")}


def staged(tiny: dict, where: Path) -> dict[str, str]:
    """A copy of the tiny data set's users and items files under ``where/Scientific`` (a job's own disk)."""
    folder = where / "Scientific"
    folder.mkdir(parents=True)
    return {key: shutil.copy(tiny[key], folder / Path(tiny[key]).name) for key in ("users", "items")}


@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):
    """A cached IISAN config on a copy of the data in job-1 (its cache built once), and a maker of the same
    config on a copy made by job ``n``."""
    root = tmp_path_factory.mktemp("moved")
    settings = dict(images=tiny["images"], text_model=tiny["text_model"], image_model=tiny["image_model"],
                    cache_dir=str(root / "cache"), out_dir=str(root / "runs"), device="cpu", num_workers=0,
                    progress=False, batch_size=16, epochs=2, patience=20, encode_batch_size=32,
                    eval_batch_size=64, **FAST)
    jobs = {1: Config(**staged(tiny, root / "job-1"), **settings)}
    build_cache_from_config(jobs[1], dtype="float32")

    def on_job(n: int) -> Config:
        if n not in jobs:
            jobs[n] = jobs[1].replace(**staged(tiny, root / f"job-{n}"))
        return jobs[n]
    return on_job


def test_a_copy_of_the_data_elsewhere_names_the_same_run_and_other_content_another(job):
    """The name: two copies of one data set name one run (each attempt of a job copying the data to its own
    disk); a copy that holds other users is another run."""
    first, second = job(6), job(7)
    assert first.users != second.users and default_run_name(first) == default_run_name(second)
    assert default_run_name(second).startswith("iisan-cached-Scientific-")
    Path(second.users).write_text(Path(first.users).read_text().replace("\n", "\n", 1)[:-1])  # one byte less
    assert config_hash(second) != config_hash(first)


def test_a_run_whose_data_was_copied_elsewhere_resumes_is_reused_and_records_where_it_is_now(job, caplog):
    """Job 5 trains two epochs; job 2, on its own copy (job 5's gone), is asked for three: it resumes from
    epoch 1's checkpoint in the same folder (before: a new folder, trained from scratch; with --run-name:
    refused, 'users=... there, ... now'); job 3 asks for the same three and is answered from the finished run."""
    first = job(5)
    done = train(first)
    shutil.rmtree(Path(first.users).parent.parent)
    second = job(2).replace(epochs=3)
    again = train(second)
    assert again["run_dir"] == done["run_dir"] and again["resumed_from"] == ["epoch-0001"]
    assert [e["epoch"] for e in again["epochs"]] == [0, 1, 2] and again["epochs"][:2] == done["epochs"]
    assert again["config"]["users"] == second.users  # where it read the data last
    state = json.loads((Path(again["run_dir"]) / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["data_content"] == {"users": file_fingerprint(second.users), "items": file_fingerprint(second.items),
                                     "images": recorded_digest(second.images)}  # (as the cache records it)
    with caplog.at_level(logging.INFO):
        third = train(job(3).replace(epochs=3))
    assert "finished before with this config; not training it again" in caplog.text
    assert third["epochs"] == again["epochs"]


def test_a_named_run_resumes_on_a_copy_of_its_data_and_refuses_other_content(job, tmp_path):
    """--run-name: a checkpoint of the same data at another place is resumed (epoch 0's, which job 1 wrote); one
    of other data is not; one written before checkpoints recorded their data counts paths, and says so."""
    first = job(1).replace(run_name="named", out_dir=str(tmp_path), epochs=1)
    train(first)
    moved = job(4).replace(run_name="named", out_dir=str(tmp_path), epochs=2)
    assert len(train(moved)["epochs"]) == 2
    written = tmp_path / "named" / "checkpoints" / "epoch-0000"
    state = json.loads((written / "state.json").read_text())
    assert state["config"]["users"] == first.users and checkpoint.checked_state(written, moved.to_dict()) == state
    del state["data_content"]  # as commit b583a5a and earlier wrote it: the paths count, and the refusal says why
    (written / "state.json").write_text(json.dumps(state))
    manifest = json.loads((written / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {"bytes": (written / "state.json").stat().st_size,
                                       "sha256": sha256(written / "state.json")}
    (written / "MANIFEST.json").write_text(json.dumps(manifest))
    reason = checkpoint.checked_state(written, moved.to_dict())
    assert isinstance(reason, str) and reason.endswith(
        "now) (saved by commit b583a5a or earlier, before checkpoints recorded what the data held: data paths count "
        f"as they are); {checkpoint.NEW_RUN}")
    written = tmp_path / "named" / "checkpoints" / "epoch-0001"  # (recorded: job 4's data; job 10's is edited)
    edited = Path(job(10).users)
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))
    reason = checkpoint.checked_state(written, job(10).replace(run_name="named", out_dir=str(tmp_path)).to_dict())
    assert isinstance(reason, str) and "belongs to a different config (users=" in reason and "b583a5a" not in reason


def test_data_paths_differ_only_where_their_content_differs_or_cannot_be_told(tiny, tmp_path):
    """``config_differences``' ``content``: a users file, items file or image LMDB elsewhere holding what the
    saved run recorded is no difference; other content, a record of none (a checkpoint of an earlier version)
    or data that is not there now is, as before."""
    there, here = staged(tiny, tmp_path / "there"), staged(tiny, tmp_path / "here")
    lmdb = shutil.copytree(tiny["images"], tmp_path / "here" / "images.lmdb")
    saved = Config(**there, images=tiny["images"], feed="live").to_dict()
    now = Config(**here, images=str(lmdb), feed="live").to_dict()
    content = {"users": file_fingerprint(there["users"]), "items": file_fingerprint(there["items"]),
               "images": recorded_digest(tiny["images"])}
    assert content["images"] and checkpoint.config_differences(saved, now, content=content) == []
    assert [d.split("=")[0] for d in checkpoint.config_differences(saved, now)] == ["images", "items", "users"]
    assert [d.split("=")[0] for d in checkpoint.config_differences(saved, now, content={"users": "0" * 16})] == [
        "images", "items", "users"]
    os.remove(here["items"])
    assert [d.split("=")[0] for d in checkpoint.config_differences(saved, now, content=content)] == ["items"]
    assert checkpoint.config_differences(saved, now, content="not a record") != []  # (a hand-edited state.json)


def test_what_a_results_file_records_of_its_data_is_read_from_its_fields():
    """``recorded_content``: the fingerprints, and the image LMDB's digest as a live run's encoders record or a
    cached run's cache records it; fields absent or of another type are left out."""
    assert checkpoint.recorded_content({"users_fingerprint": "a" * 16, "items_fingerprint": "",
                                        "encoders": {"image": {"images": "d1"}}, "cache": {"image": {"images": "d2"}}}
                                       ) == {"users": "a" * 16, "images": "d1"}
    assert checkpoint.recorded_content({"cache": {"image": {"images": "d2"}}, "encoders": {}}) == {"images": "d2"}
    assert checkpoint.recorded_content({"users_fingerprint": 3, "encoders": [], "cache": {"image": "x"}}) == {}


def test_a_run_named_before_data_counted_by_content_is_found_by_its_earlier_name(job, tmp_path):
    """A run folder named by the previous scheme (data by place) is still this config's run."""
    cfg = job(1).replace(out_dir=str(tmp_path))
    assert HASHES[1:3] == ("data-content", "encoding-names")
    earlier = default_run_name(cfg, scheme="encoding-names")
    assert earlier != default_run_name(cfg)
    (Path(cfg.out_dir) / earlier).mkdir(parents=True)
    assert known_run_name(cfg) == earlier and run_dir(cfg) == Path(cfg.out_dir) / earlier


def test_a_fingerprint_is_read_once_a_process_until_the_file_changes(tmp_path, monkeypatch):
    """``known_fingerprint``: a sweep names each point without reading its users file again; a file rewritten
    (another size or time) is read again."""
    import iisan.digests as digests

    path, reads = tmp_path / "u.tsv", []
    path.write_text("u1\ti1 i2\n")
    read = digests.file_fingerprint
    monkeypatch.setattr(digests, "file_fingerprint", lambda p: reads.append(p) or read(p))
    assert [known_fingerprint(path) for _ in range(3)] == [file_fingerprint(path)] * 3 and len(reads) == 1
    path.write_text("u1\ti1 i3\n")
    os.utime(path, ns=(1, 1))
    assert known_fingerprint(path) == file_fingerprint(path) and len(reads) == 2


def test_a_run_killed_as_it_set_up_on_other_copy_of_the_data_starts_again(job, tmp_path, caplog):
    """Killed after its config.json, before its results.json: the requeued job, on its own copy of the data, found
    'config.json belongs to a run of another config (users=... there, ... now)' and stopped, for a person to
    resubmit. Nothing was kept (no checkpoint, no weights): it starts again."""
    first, second = (job(n).replace(epochs=1, out_dir=str(tmp_path)) for n in (8, 9))
    folder = Path(first.out_dir) / default_run_name(first)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(first.to_dict()))
    with caplog.at_level(logging.INFO):
        done = train(second)
    assert done["run_dir"] == str(folder) and done["status"] == "finished"
    assert "left no results, checkpoint or best weights (killed as it set up); it starts again" in caplog.text


def test_the_same_data_under_another_folders_name_finds_its_run_by_the_hash(job, tmp_path, caplog):
    """Copied flat ($TMPDIR/users.tsv): the data folder's name in the run's name differs, its hash does not; the
    one folder of this hash is this config's run (before: a new folder at every requeue, trained from scratch)."""
    flat = []
    for n in (1, 2):
        (tmp_path / f"flat-{n}").mkdir()
        flat.append(job(1).replace(out_dir=str(tmp_path / "runs"), epochs=n, **{
            key: shutil.copy(getattr(job(1), key), tmp_path / f"flat-{n}") for key in ("users", "items")}))
    first = train(flat[0])
    assert Path(first["run_dir"]).name == default_run_name(flat[0]) != default_run_name(flat[1])
    with caplog.at_level(logging.INFO):
        assert known_run_name(flat[1]) == Path(first["run_dir"]).name
        again = train(flat[1])
    assert again["run_dir"] == first["run_dir"] and again["resumed_from"] == ["epoch-0000"]
    assert "this config's run, named by the folder its data was in then" in caplog.text


def test_the_hash_alone_finds_no_run_where_two_folders_have_it_or_one_of_another_process_count(job, tmp_path):
    """The flat-copy fallback takes the one folder of this hash: two under other data folders' names could each be
    this run, and one of four torchrun processes (-4proc-) computes something else: neither is taken."""
    cfg = job(1).replace(out_dir=str(tmp_path))
    head, tail = f"{cfg.method}-{cfg.feed}", default_run_name(cfg).rsplit("-", 1)[-1]
    (tmp_path / f"{head}-elsewhere-4proc-{tail}").mkdir()
    assert known_run_name(cfg) == default_run_name(cfg)
    (tmp_path / f"{head}-job-1-{tail}").mkdir()
    assert known_run_name(cfg) == f"{head}-job-1-{tail}"
    (tmp_path / f"{head}-job-2-{tail}").mkdir()
    assert known_run_name(cfg) == default_run_name(cfg)


def test_an_image_lmdb_copied_elsewhere_names_the_same_live_run_and_other_images_another(tiny, tmp_path):
    """The image LMDB counts by the digest it records: a copy names the same run, an LMDB of other pictures
    another, one that records no digest (or is not there) by its path."""
    copy = shutil.copytree(tiny["images"], tmp_path / "images.lmdb")
    live = Config(users=tiny["users"], items=tiny["items"], images=tiny["images"], feed="live", method="lora")
    assert config_hash(live) == config_hash(live.replace(images=str(copy)))
    assert config_hash(live) != config_hash(live.replace(images=str(tmp_path / "absent.lmdb")))
    assert config_hash(live.replace(images=str(tmp_path / "absent.lmdb"))) != \
        config_hash(live.replace(images=str(tmp_path / "other.lmdb")))


@pytest.mark.slow
def test_under_torchrun_rank_0s_copy_names_the_run_and_a_rank_reading_other_data_is_refused(job, tmp_path):
    """Two processes, each on its own copy of the data (a job that copies the data set to each node's disk): rank
    1's under another folder's name. Before, each rank named the run folder from its own copy, and looked for a
    finished run there; a copy not yet whole on one rank trained on other users, or waited for ever in a step the
    other never took. Now rank 0's copy names the folder, its look at it answers for both, and a rank reading other
    data is refused in the same line on every rank."""
    from .test_distributed import ROOT, torchrun

    base = job(8).replace(epochs=1, max_steps_per_epoch=2, out_dir=str(tmp_path / "runs"))
    whole = {0: base, 1: base.replace(**{k: shutil.copy(getattr(base, k), tmp_path / f"Elsewhere-{k}.tsv")
                                         for k in ("users", "items")})}
    lines = Path(base.users).read_text().splitlines(keepends=True)
    (tmp_path / "part").mkdir()
    (part := tmp_path / "part" / "users.tsv").write_text("".join(lines[: len(lines) // 2]))  # still being copied
    build_cache_from_config(base.replace(cache_dir=str(tmp_path / "cache16")), dtype="float16")  # another cache
    lost = tmp_path / "not-copied-bert"  # an encoder folder rank 1's node lacks
    steps = {"whole": whole, "again": whole, "again-partial": {0: base, 1: whole[1].replace(users=str(part))},
             "other-cache": {0: base.replace(epochs=2),
                             1: whole[1].replace(epochs=2, cache_dir=str(tmp_path / "cache16"))},
             "partial": {0: base.replace(epochs=2), 1: whole[1].replace(epochs=2, users=str(part))},
             "no-encoder": {0: base.replace(feed="live"), 1: whole[1].replace(feed="live", text_model=str(lost))}}
    for step, configs in steps.items():
        for rank, cfg in configs.items():
            (tmp_path / f"config.json.{step}.{rank}").write_text(json.dumps(cfg.to_dict()))
    proc = torchrun(ROOT / "tests" / "_torchrun_worker.py", [str(tmp_path / "config.json"), str(tmp_path / "got"),
                                                             "copies"], 2, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"got.{rank}").read_text()) for rank in (0, 1)]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [Path(got[0][0]["run_dir"]).name]
    assert Path(got[0][0]["run_dir"]).name.startswith("iisan-cached-Scientific-2proc-")  # rank 0's data folder
    assert got[0][:3] == got[1][:3] and got[0][0] == got[0][1] == got[0][2]  # trained once, in one folder; then
    # found finished, also by rank 1 on a copy not yet whole: rank 0's look answers for both (a rank of its own look
    # trained alone, and waited for ever)
    assert got[0][0]["epochs"] == 1
    said = ("the processes of this launch read different data: the {} of rank(s) 1 differs from rank 0's ({}) (a "
            "copy missing, not yet whole, or of another version). Every process must read the same data: launch "
            "again once they do")  # (the same words on every rank: rank 0's path)
    assert got[0][4] == got[1][4] == {"error": said.format("users file", base.users), "kind": "DataError"}
    # another cache on rank 1 (fp16): refused, not trained on silently
    assert got[0][3] == got[1][3] == {"error": said.format("cache", base.cache_dir), "kind": "DataError"}
    # a check each rank makes of its own node, failed on rank 1: every rank's error (before, rank 0 waited for ever
    # in its next collective, or lost its peer in a traceback), and no run folder made (the listing above)
    missing = got[1][5]["error"]
    assert str(lost) in missing and got[1][5]["kind"] == "EncoderError"
    assert got[0][5] == {"error": f"rank 1: {missing}", "kind": "EncoderError"}


def test_each_part_of_the_data_that_differs_on_some_rank_is_named_with_those_ranks(job, monkeypatch):
    """Rank 1 of 4 hears rank 0's record of the data and flags what differs here; every rank then names, part by part,
    the ranks whose copy differs and rank 0's path, in one line; a launch whose ranks read the same data goes on."""
    from iisan.distributed import Dist
    from iisan.errors import DataError
    from iisan.train import same_inputs

    cfg, heard = job(9), {}
    zero = {"users": "another fingerprint", "items": file_fingerprint(cfg.items),
            "images": None, "cache": same_inputs.cache_record(cfg)}  # (a cached run: its cache stands for its images)
    paths = {"users": "/node0/users.tsv", "items": "/node0/items.tsv", "images": "/node0/images.lmdb",
             "cache": "/node0/cache"}

    def gather(local, dist):  # rank 1's flags as computed; ranks 0, 2 and 3 as the test says
        heard["flags"] = local.tolist()
        return [torch.tensor(f) for f in ([0, 0, 0, 0], local.tolist(), [0, 0, 0, 0], [1, 0, 0, 1])]

    monkeypatch.setattr(same_inputs, "broadcast_text", lambda text, dist: json.dumps({"content": zero, "paths": paths}))
    monkeypatch.setattr(same_inputs, "gather_same", gather)
    with pytest.raises(DataError) as refused:
        same_inputs.refuse_other_data_on_ranks(cfg, Dist(1, 4, 1, "gloo"))
    assert heard["flags"] == [1, 0, 0, 0]  # users, items, images, cache
    assert str(refused.value) == (
        "the processes of this launch read different data: the users file of rank(s) 1, 3 differs from rank 0's "
        "(/node0/users.tsv); the cache of rank(s) 3 differs from rank 0's (/node0/cache) (a copy missing, not yet "
        "whole, or of another version). Every process must read the same data: launch again once they do")
    zero["users"] = file_fingerprint(cfg.users)
    monkeypatch.setattr(same_inputs, "gather_same",  # rank 1's flags; the other ranks read what rank 0 does
                        lambda local, _: heard.update(flags=local.tolist()) or [0 * local, local, 0 * local, 0 * local])
    same_inputs.refuse_other_data_on_ranks(cfg, Dist(1, 4, 1, "gloo"))  # the same data everywhere: no error
    assert heard["flags"] == [0, 0, 0, 0]
    # a cached run never opens its LMDB: a node with the cache alone reads what rank 0's does
    heard.clear()
    same_inputs.refuse_other_data_on_ranks(cfg.replace(images=cfg.images + "-not-here"), Dist(1, 4, 1, "gloo"))
    assert heard["flags"] == [0, 0, 0, 0]
    # a live run reads its LMDB: one not there is other data (its cache is not read: {} on every rank)
    zero.update(images=recorded_digest(cfg.images), cache={})
    live = cfg.replace(feed="live")
    same_inputs.refuse_other_data_on_ranks(live, Dist(1, 4, 1, "gloo"))
    assert heard["flags"] == [0, 0, 0, 0]
    with pytest.raises(DataError, match=r"the image LMDB of rank\(s\) 1 differs from rank 0's \(/node0/images.lmdb\)"):
        same_inputs.refuse_other_data_on_ranks(live.replace(images=cfg.images + "-not-here"), Dist(1, 4, 1, "gloo"))
    assert heard["flags"] == [0, 0, 1, 0]
    # rank 0's own copy missing (its content None), rank 1's whole: rank 0's is named, not rank 1's blamed
    zero.update(users=None)
    with pytest.raises(DataError, match=r"data: rank 0's users file \(/node0/users.tsv\) is not there or tells "
                                        r"nothing of its content, where that of rank\(s\) 1 does \(a copy missing"):
        same_inputs.refuse_other_data_on_ranks(live, Dist(1, 4, 1, "gloo"))
    same_inputs.refuse_other_data_on_ranks(cfg, Dist())  # one process: nothing to compare (no collective)


def test_a_cached_run_on_a_node_without_its_image_lmdb_keeps_its_name_and_resumes(job, tmp_path):
    """A cached run never opens its image LMDB, so a job may copy the cache and not the LMDB: its images are then
    named by what the image cache records of them (the LMDB's digest it was built from). Before, the path of the
    LMDB not there counted: a new folder, trained from scratch (and its earlier name is still found)."""
    first = job(20).replace(out_dir=str(tmp_path / "runs"))
    done = train(first)
    second = job(21).replace(out_dir=first.out_dir, images=str(tmp_path / "not-copied.lmdb"), epochs=3)
    assert checkpoint.data_content("images", second.images, second.cache_dir) == recorded_digest(first.images)
    assert checkpoint.data_content("images", second.images) is None  # (the LMDB alone: not here)
    assert default_run_name(second) == default_run_name(first)
    again = train(second)
    assert again["run_dir"] == done["run_dir"] and again["resumed_from"] == ["epoch-0001"]
    assert again["epochs"][:2] == done["epochs"]
    earlier = default_run_name(second, scheme="data-content")  # the name 9cada80 gave it: by that path
    assert earlier != default_run_name(first) and HASHES[0] == "cached-images"
    shutil.rmtree(done["run_dir"])
    (Path(first.out_dir) / earlier).mkdir()
    assert known_run_name(second) == earlier
    live = second.replace(feed="live")  # a live run opens its LMDB: one not here tells nothing of its images
    assert not live.cached and checkpoint.data_content("images", live.images) is None  # (no cache is passed)


@pytest.mark.slow
def test_a_sweep_under_torchrun_takes_rank_0s_look_at_each_point(tiny, tiny_cache, tmp_path):
    """An entry script's grid under torchrun, each rank in its own folder with its own copy of the data (relative
    paths, as a job on each node's disk): trained once; run again with rank 1's users file gone, both ranks find
    both points finished by rank 0's look (before: rank 1 looked at its own copy, failed alone, and rank 0 waited
    for ever in its next collective)."""
    from .test_distributed import ROOT, torchrun

    wrapper = tmp_path / "in_rank_folder.py"  # each rank in {tmp_path}/r{RANK}, then the script
    wrapper.write_text("import os, runpy, sys\nos.chdir(os.path.join(sys.argv[1], 'r' + os.environ['RANK']))\n"
                       "sys.argv = sys.argv[2:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    for rank in (0, 1):
        (data := tmp_path / f"r{rank}" / "data").mkdir(parents=True)
        for key in ("users", "items"):
            shutil.copy(tiny[key], data / f"{key}.tsv")
    flags = ["--users", "data/users.tsv", "--items", "data/items.tsv", "--images", tiny["images"], "--text-model",
             tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir", tiny_cache, "--device", "cpu",
             "--out-dir", str(tmp_path / "runs"), "--no-progress", "--batch-size", "16", "--epochs", "1",
             "--max-steps-per-epoch", "2", "--eval-batch-size", "64", "--lr", "1e-3", "2e-3"]
    script = [str(tmp_path), str(ROOT / "Code_Cached" / "scripts" / "run_IISAN.py"), *flags]
    first = torchrun(wrapper, script, 2, tmp_path, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("grid summary: 2 point(s): 2 finished") == 1
    (tmp_path / "r1" / "data" / "users.tsv").unlink()
    again = torchrun(wrapper, script, 2, tmp_path, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("grid summary: 2 point(s): 2 finished before") == 1
    assert len(list((tmp_path / "runs").iterdir())) == 2
