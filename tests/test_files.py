"""Writing outputs: atomic writes that leave nothing behind and name the path when they fail, claims
that replace only the project's own artifacts and never an input, and locks that keep a second writer
out and go with their holder."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from iisan.claims import claim_output, refuse_inputs
from iisan.errors import OutputError, in_the_way
from iisan.files import atomic_path, failure_reason, stale_temporaries, temporary_sibling, write_json_atomic
from iisan.locks import OutputLock


def test_a_failed_write_keeps_the_old_file_removes_its_temporary_and_names_the_target(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"old": 1})
    with pytest.raises(OutputError, match=rf"^could not write {target}: No space left on device$"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert target.read_text() == '{\n  "old": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_weights_are_as_readable_as_any_new_file(tmp_path):
    """safetensors makes its files owner-only (0600); written through atomic_path, as a tiny model or in a
    checkpoint, they get the umask's permissions, as results.json does."""
    import torch

    from iisan.model.tiny import write_vit
    from iisan.tensorfiles import save_safetensors_atomic
    from iisan.train.checkpoint_writing import write_checkpoint

    old = os.umask(0o027)
    try:
        save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "best.safetensors", {})
        write_json_atomic(tmp_path / "results.json", {})
        write_vit(tmp_path / "vit", hidden=8, layers=1, heads=1, image_size=16, patch_size=8)
        saved = write_checkpoint(tmp_path / "checkpoints", "epoch-0000", {"w": torch.zeros(2)},
                                 {"step": torch.zeros(1)}, {"epoch": 0}, keep=2)
    finally:
        os.umask(old)
    checkpoint = sorted(saved.iterdir())
    assert [p.name for p in checkpoint] == ["MANIFEST.json", "model.safetensors", "state.json",
                                            "train_state.safetensors"]
    for path in (tmp_path / "best.safetensors", tmp_path / "results.json", tmp_path / "vit" / "model.safetensors",
                 *checkpoint):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_an_image_lmdb_takes_a_shared_groups_umask(tmp_path):
    """LMDB makes its folder 755 and data.mdb 644 whatever the umask: under umask 002 a group could not replace
    a store it shares, as it can every other output."""
    import numpy as np

    from iisan.data.image_build import write_image_lmdb

    old = os.umask(0o002)
    try:
        write_image_lmdb(tmp_path / "images.lmdb", ["a"], lambda _: (np.zeros((4, 4, 3), np.uint8), None), size=4,
                         progress=False)
    finally:
        os.umask(old)
    store = tmp_path / "images.lmdb"
    assert {p.name: p.stat().st_mode & 0o777 for p in [store, *store.iterdir()]} == {"images.lmdb": 0o775,
                                                                                      "data.mdb": 0o664}


def test_a_rewritten_file_keeps_the_permissions_and_group_it_was_given(tmp_path):
    """A results file made private (640, a project's group) came back 644 and the user's own group when a
    resumed run rewrote it: the replacement takes the old file's mode and group; a new file the umask's."""
    path = write_json_atomic(tmp_path / "results.json", {"status": "running"})
    os.chmod(path, 0o640)
    group = next((g for g in (1, 2, 3) if g != path.stat().st_gid), None) if os.geteuid() == 0 else None
    if group is not None:  # (only root may give a file any group)
        os.chown(path, -1, group)
    write_json_atomic(path, {"status": "finished"})
    assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text())["status"] == "finished"
    assert group is None or path.stat().st_gid == group
    old = os.umask(0o027)
    try:
        fresh = write_json_atomic(tmp_path / "new.json", {})
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o640


def test_the_umask_is_read_without_setting_it_where_linux_shows_it(monkeypatch):
    """Reading it through os.umask sets it for every thread for a moment: a file another thread created then
    (a cache's writer's) took 022 under a private 077."""
    from iisan import files

    old = os.umask(0o077)
    try:
        with monkeypatch.context() as m:
            m.setattr(files.os, "umask", lambda mask: pytest.fail("the umask was set to be read"))
            assert files.umask() == 0o077
        monkeypatch.setattr(files, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
        assert files.umask() == 0o077 and os.umask(0o077) == 0o077  # elsewhere: set and put back
    finally:
        os.umask(old)


def test_errors_that_are_not_writes_pass_through_and_still_clean_up(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise KeyError("a bug, not a full disk")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_are_hidden_fresh_and_recognised_as_stale(tmp_path):
    target = tmp_path / "images.lmdb"
    taken = temporary_sibling(target)
    taken.mkdir()
    other = temporary_sibling(target)
    assert other != taken and other.name.startswith(".images.lmdb.") and not other.exists()
    (tmp_path / "images.lmdb.tmp").mkdir()  # a user's folder with the old fixed name: not ours
    (tmp_path / ".other.lmdb.1-0123abcd.tmp").mkdir()  # another output's temporary
    assert stale_temporaries(target) == [taken]


NO_PID = 2 ** 22 + 1  # above any pid_max Linux allows: no process has it


def _left(target: Path, pid: int, hours: float, folder: bool = False) -> Path:
    """A temporary of ``target`` as a writer ``pid`` leaves it when killed, last touched ``hours`` ago."""
    tmp = target.with_name(f".{target.name}.{pid}-{os.urandom(4).hex()}.tmp")
    tmp.mkdir() if folder else tmp.write_text("half")
    os.utime(tmp, (then := time.time() - hours * 3600, then))
    return tmp


def test_a_write_removes_the_temporaries_its_target_was_left_by_killed_writers_an_hour_on(tmp_path):
    target = tmp_path / "table.csv"
    gone = _left(target, NO_PID, 2)
    kept = [_left(target, NO_PID, 0.5),                # touched half an hour ago: maybe a writer elsewhere
            _left(target, os.getpid(), 2),             # its writer is running
            _left(target, NO_PID, 2, folder=True),     # a folder: a build, which its lock tidies
            _left(tmp_path / "other.csv", NO_PID, 2)]  # another output's
    (mine := tmp_path / f".table.csv.{NO_PID}-tmp").write_text("not a temporary's name")
    os.utime(mine, (0, 0))
    write_json_atomic(target, {"new": 1})
    assert not gone.exists() and all(p.exists() for p in [*kept, mine]) and json.loads(target.read_text()) == {"new": 1}
    gone = _left(target, NO_PID, 2)
    with atomic_path(tmp_path / "table.csv", bulk=True) as tmp:  # an image per item: no scan per file
        tmp.write_text("x")
    assert gone.exists() and all(p.exists() for p in kept)


def test_a_node_whose_clock_runs_ahead_leaves_another_nodes_live_temporary(tmp_path, monkeypatch):
    """On a shared file system the server stamps every file: a node whose own clock ran two hours ahead took a
    temporary another node wrote a minute ago (its pid unknown here) for an abandoned one, and removed it under
    that writer. Ages are read on the file system's clock, by the file just written."""
    target = tmp_path / "table.csv"
    live, dead = _left(target, NO_PID, 1 / 60), _left(target, NO_PID, 2)
    ahead = time.time() + 2 * 3600
    monkeypatch.setattr(time, "time", lambda: ahead)  # this node's clock
    write_json_atomic(target, {"new": 1})
    assert live.exists() and not dead.exists()


def test_a_tidying_that_fails_leaves_the_write_done(tmp_path, monkeypatch):
    """The look for abandoned temporaries comes after the rename: a folder it may not list is no failed write."""
    import iisan.files as files

    def unlistable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "stale_temporaries", unlistable)
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}


def test_a_file_is_on_disk_before_the_rename_that_publishes_it_but_not_one_of_many(tmp_path, monkeypatch):
    import iisan.files as files

    done = []
    monkeypatch.setattr(files, "fsync", lambda path: done.append(("sync", Path(path).read_text())))
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (done.append(("rename", Path(b).name)), real(a, b)))
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert done == [("sync", '{\n  "a": 1\n}\n'), ("rename", "results.json")]
    done.clear()
    with atomic_path(tmp_path / "1.jpg", bulk=True) as tmp:
        tmp.write_text("pixels")
    assert done == [("rename", "1.jpg")]


def test_the_reason_of_a_safetensors_write_failure_is_the_os_words():
    from safetensors import SafetensorError

    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert failure_reason(err) == "No space left on device"
    assert failure_reason(OSError(errno.EACCES, "Permission denied")) == "Permission denied"


def test_claims_replace_only_own_artifacts_and_only_when_asked(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    owned = lambda path: path == ours  # noqa: E731
    assert claim_output(tmp_path / "absent", owned, "a store", "--out", overwrite=False) is False
    assert claim_output(ours, owned, "a store", "--out", overwrite=True) is True
    with pytest.raises(OutputError, match="already holds a store; pass --overwrite"):
        claim_output(ours, owned, "a store", "--out", overwrite=False)
    with pytest.raises(OutputError, match="exists and is not a store"):
        claim_output(theirs, owned, "a store", "--out", overwrite=True)
    (tmp_path / "link").symlink_to(ours)
    with pytest.raises(OutputError, match="is a symbolic link"):
        claim_output(tmp_path / "link", owned, "a store", "--out", overwrite=True)


def test_an_output_may_not_be_or_contain_an_input(tmp_path):
    data = tmp_path / "data" / "images"
    refuse_inputs(tmp_path / "out", [data, None, ""], "--out")  # beside: fine
    refuse_inputs(data / "sub", [data], "--out")  # inside an input folder: writes there, replaces nothing of it
    with pytest.raises(OutputError, match=r"--out .*data/images is the input"):
        refuse_inputs(data, [data], "--out")
    with pytest.raises(OutputError, match=r"--out .*data contains the input .*images"):
        refuse_inputs(tmp_path / "data", [data], "--out")


def in_child(action) -> int:
    """``action()`` in a forked child (another process, for locks); its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(action())
        except BaseException:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_lock_keeps_other_processes_out_and_is_removed_when_released(tmp_path):
    path = tmp_path / ".out.iisan-lock"

    def try_lock() -> int:
        try:
            OutputLock(path, "store X", "wait").acquire()
        except OutputError as err:
            return 3 if f"store X is in use by pid {os.getppid()} on " in str(err) else 4
        return 0

    with OutputLock(path, "store X", "wait"):
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        assert in_child(try_lock) == 3
    assert not path.exists()
    assert in_child(try_lock) == 0


def test_a_lock_goes_with_a_holder_that_dies(tmp_path):
    path = tmp_path / ".lock"

    def die_holding() -> int:
        OutputLock(path, "run folder").acquire()
        os.kill(os.getpid(), 9)  # SIGKILL: no release, no cleanup
        return 0

    assert in_child(die_holding) == -9
    assert path.exists()  # left behind, but no longer locked
    with OutputLock(path, "run folder"):
        assert path.read_text().startswith(f"pid {os.getpid()}")


def test_a_lock_taken_on_a_file_that_was_just_removed_is_retaken_on_the_new_one(tmp_path, monkeypatch):
    """A holder releasing (unlink, then close) while another process opens the file: the latecomer
    ends up holding a lock on the unlinked file, sees that, and locks the file that is there now."""
    path = tmp_path / ".lock"
    real_open, opened = open, []

    def open_then_lose_the_race(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if Path(file) == path and not opened:
            opened.append(1)
            os.unlink(path)  # the previous holder's release, between our open and our lock
        return handle

    monkeypatch.setattr("builtins.open", open_then_lose_the_race)
    lock = OutputLock(path, "x").acquire()
    assert opened == [1]  # the race did happen
    assert os.path.samestat(os.fstat(lock.handle.fileno()), os.stat(path))
    lock.release()


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_that_takes_no_flock_locks_is_one_line_and_keeps_no_lock_file_it_made(tmp_path, monkeypatch,
                                                                                          capsys, code):
    """Lustre mounted without -o flock (ENOSYS), NFS without its lock service (ENOLCK), some FUSE mounts
    (EOPNOTSUPP): every command that took or checked a lock ended in a traceback, leaving an empty lock file."""
    import fcntl
    import socket

    from iisan.cli.main import main
    from iisan.locks import held

    def refuse(fd, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", refuse)
    path = tmp_path / "out" / ".lock"
    with pytest.raises(OutputError) as caught:
        OutputLock(path, "cache folder out").acquire()
    assert str(caught.value) == (
        f"could not lock {path} (cache folder out): {os.strerror(getattr(errno, code))}; the file system there takes "
        "no flock locks (Lustre mounted without -o flock, NFS without its lock service?): use a folder on a local "
        "disk or on one that does, or ask its administrators")
    assert not path.exists() and path.parent.is_dir()
    path.write_text(f"pid 1 on {socket.gethostname()}\n")  # a lock file left before: not this process's to remove
    with pytest.raises(OutputError, match="takes no flock locks"):
        OutputLock(path, "x").acquire()
    assert path.read_text() == f"pid 1 on {socket.gethostname()}\n"
    assert held(path) is None  # cannot be told: not called stopped, nor held
    with pytest.raises(SystemExit) as stopped:
        main(["make-tiny-models", "--out", str(tmp_path / "models")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iisan: error: could not lock ") and "takes no flock locks" in err[0]


def test_a_lock_file_a_node_of_a_network_file_system_removed_under_the_lock_is_taken_again(tmp_path, monkeypatch):
    """NFS says ESTALE when another node removed the file between this one's open and its lock: tried again."""
    import fcntl

    real, calls = fcntl.flock, []

    def stale_once(fd, operation):
        calls.append(operation)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", stale_once)
    lock = OutputLock(tmp_path / ".lock", "x").acquire()
    assert len(calls) == 2 and lock.handle is not None
    lock.release()

    def always_stale(fd, operation):
        calls.append(operation)
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(fcntl, "flock", always_stale)
    with pytest.raises(OutputError) as refused:  # never a lock: not tried for ever
        OutputLock(tmp_path / ".lock", "x").acquire()
    assert len(calls) == 2 + 10
    assert str(refused.value) == (f"could not lock {tmp_path / '.lock'} (x): {os.strerror(errno.ESTALE)}; another "
                                  "node keeps removing it (a network file system): try again once the other writer "
                                  "is done")

    def failing(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", failing)
    with pytest.raises(OutputError, match=r"\(x\): Input/output error; the file system failed: try again, or "):
        OutputLock(tmp_path / ".lock", "x").acquire()  # not blamed on locks it may well take


def test_a_lock_file_a_full_disk_cannot_hold_is_one_line_and_is_removed(tmp_path, monkeypatch):
    """The holder's pid line does not fit (a full disk): one error naming the lock file, which goes again."""
    path = tmp_path / ".out.iisan-lock"
    real_open = open

    class Full:  # the lock file's handle, its writes refused as a full disk refuses them
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")  # what closing with bytes unwritten does

    def open_on_a_full_disk(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        return Full(handle) if Path(file) == path else handle

    monkeypatch.setattr("builtins.open", open_on_a_full_disk)
    with pytest.raises(OutputError) as info:
        OutputLock(path, "store X").acquire()
    assert str(info.value) == f"could not write {path}: No space left on device"
    assert not path.exists()
    monkeypatch.undo()
    with OutputLock(path, "store X"):  # free again
        assert path.read_text().startswith(f"pid {os.getpid()} on ")


def test_a_temporary_that_cannot_be_removed_does_not_hide_the_write_error(tmp_path, monkeypatch):
    """On a read-only file system the temporary was never made and removing it fails too: the error
    names the target and the first failure, not the hidden temporary."""
    import errno
    from pathlib import Path

    from iisan.errors import OutputError
    from iisan.files import atomic_path

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(OutputError, match=r"^could not write .*table.csv: Read-only file system$"):
        with atomic_path(tmp_path / "table.csv") as tmp:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp))


def test_a_lock_that_cannot_be_removed_does_not_hide_the_error_that_ended_its_holder(tmp_path, monkeypatch):
    """A run folder made read-only while it ran: results.json could not be written, and then neither could the
    lock be removed; the lock's PermissionError was the one line said, and the handle stayed open."""
    lock = OutputLock(tmp_path / "run" / ".lock", "the run")

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with pytest.raises(RuntimeError, match="^could not write results.json$"):
        with lock:
            handle = lock.handle
            monkeypatch.setattr(Path, "unlink", refuse)
            raise RuntimeError("could not write results.json")
    assert handle.closed and lock.handle is None
    monkeypatch.undo()
    with OutputLock(tmp_path / "run" / ".lock", "the run"):  # the file left is taken over: it is ours
        pass
    assert not (tmp_path / "run" / ".lock").exists()


def test_another_users_lock_file_is_named_as_one_with_its_holder(tmp_path, monkeypatch):
    """A killed writer's lock, mode 644 in a group-writable cache folder: the next user got 'could not write
    .iisan-lock: Permission denied', with nothing to say that it was a lock left behind, nor whose."""
    import builtins

    from iisan import locks

    path = tmp_path / "cache" / ".iisan-lock"
    path.parent.mkdir()
    path.write_text("pid 4242 on node7\n")

    def refuse(file, mode="r", *args, **kwargs):
        if Path(file) == path and "a" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(locks, "open", refuse, raising=False)
    with pytest.raises(OutputError) as err:
        OutputLock(path, "cache folder x").acquire()
    assert str(err.value) == (f"could not write {path}: Permission denied; it is the lock file of cache folder x that "
                              "pid 4242 on node7 took, which this user may not replace: if that process has ended, its "
                              "owner (or anyone who may) can remove the file")
    path.write_text("not a lock")  # someone else's file: the plain words
    with pytest.raises(OutputError, match=rf"^could not write {path}: Permission denied$"):
        OutputLock(path, "cache folder x").acquire()


def test_folders_a_failed_block_made_are_removed_only_when_empty(tmp_path):
    from iisan.files import folders_kept_on_success

    with pytest.raises(RuntimeError), folders_kept_on_success(tmp_path / "a" / "b"):
        (tmp_path / "a" / "b").mkdir(parents=True)
        raise RuntimeError
    assert not (tmp_path / "a").exists()  # the parent it made too
    with pytest.raises(RuntimeError), folders_kept_on_success(tmp_path / "c" / "d"):
        (tmp_path / "c" / "d").mkdir(parents=True)
        (tmp_path / "c" / "d" / "chunk").write_text("x")  # e.g. a cut build's shard, kept for the resume
        raise RuntimeError
    assert (tmp_path / "c" / "d" / "chunk").read_text() == "x"
    with folders_kept_on_success(tmp_path / "e"):
        (tmp_path / "e").mkdir()
    assert (tmp_path / "e").is_dir()  # success: kept, empty or not


def test_an_output_the_disk_cannot_hold_is_refused_before_it_is_written(tiny, tiny_config, tmp_path, monkeypatch):
    """LMDB reports a full disk midway as an 'Input/output error': the image store and the cache check
    the free space first and say what is short, and where; nothing is written."""
    import shutil
    from collections import namedtuple

    from iisan.data.image_build import build_image_lmdb
    from iisan.data.interactions import read_items
    from iisan.model.caching import build_cache_from_config

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free
    ids = read_items(tiny["items"]).ids
    out = tmp_path / "new" / "images.lmdb"
    # a record (its 10-byte header, the pixels, the page header's 16) in 37 whole 4 KiB LMDB pages, its leaf
    # entry; then the store's meta pages
    needed = (len(ids) * (37 * 4096 + 64) + 2**16) / 2**20
    with pytest.raises(OutputError, match=rf"^could not write {out}: {len(ids)} images of 224x224 pixels need "
                                          rf"about {needed:.1f} MiB; the disk holding {out.parent} has 1.0 MiB free: "
                                          r"free some space there, or write elsewhere$"):
        build_image_lmdb(tiny["image_dir"], out, ids, size=224, progress=False)
    assert not out.exists() and not stale_temporaries(out)
    cfg = tiny_config(cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 512, 512))  # the tiny cache is small
    with pytest.raises(OutputError, match=r"^could not write .*cache: the text, image states of \d+ items \(float32\) "
                                          r"need about [\d.]+ KiB; the disk holding .*cache has 512 bytes free: free "
                                          r"some space there, or write elsewhere$"):
        build_cache_from_config(cfg, dtype="float32")
    assert not list((tmp_path / "cache").glob("*.safetensors"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    build_image_lmdb(tiny["image_dir"], out, ids, size=16, progress=False)  # what fits is written
    assert out.is_dir()


@pytest.mark.parametrize("failure", [OSError(errno.EXDEV, "Invalid cross-device link"), KeyboardInterrupt()],
                         ids=["rename-fails", "ctrl-c-between-the-renames"])
def test_a_folder_replaced_by_a_rename_that_fails_is_put_back(tmp_path, monkeypatch, failure):
    """replace_folder moves the old folder aside, then renames the new one in: when that rename fails
    (a full disk, another file system), or a Ctrl-C lands between the two (it left the old store aside, under
    a temporary's name the next build removes), the old folder comes back whole, nothing lost."""
    from iisan.files import replace_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    real, calls = os.replace, []

    def failing_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise failure
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(type(failure)):
        replace_folder(tmp_path / "new", tmp_path / "out")
    monkeypatch.undo()
    assert (tmp_path / "out" / "a").read_text() == "old" and (tmp_path / "new" / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # nothing left aside


def test_a_folder_holding_only_a_hidden_file_is_not_empty(tmp_path):
    from iisan.claims import claim_folder

    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(OutputError, match=r"^--out .*repo exists and is not a demo folder"):
        claim_folder(tmp_path / "repo", ".iisan-demo", "a demo folder", "--out")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [".git"]


def test_a_text_file_is_ours_only_when_its_whole_head_matches(tmp_path):
    from iisan.files import starts_with

    mine, theirs = tmp_path / "a.md", tmp_path / "b.md"
    mine.write_text("# Efficiency: tiny, demo\n")
    theirs.write_text("# Efficiency notes (mine)\n")
    assert starts_with(mine, "# Efficiency: ") and not starts_with(theirs, "# Efficiency: ")
    assert not starts_with(tmp_path / "missing.md", "# Efficiency: ") and not starts_with(tmp_path, "#")


def test_a_lock_held_on_another_host_cannot_be_told_from_here(tmp_path):
    """A run on another node of a shared file system: its lock names that host, and no local check can say
    it is dead, so it is not called stopped (iisan results shows it running)."""
    import socket

    from iisan.experiments.results_file import status
    from iisan.locks import held

    lock = tmp_path / ".lock"
    lock.write_text("pid 4242 on gpu-node-17-not-this-host\n")
    assert socket.gethostname() != "gpu-node-17-not-this-host" and held(lock) is None
    assert status(tmp_path / "results.json", {"status": "running"}) == "running"
    lock.write_text(f"pid 4242 on {socket.gethostname()}\n")  # here, and no process holds it: stopped
    assert held(lock) is False and status(tmp_path / "results.json", {"status": "running"}) == "stopped"


def test_a_file_where_an_output_folder_belongs_is_named_not_file_exists(tmp_path, capsys):
    """`results --csv items.tsv/x.csv` said 'could not write .../x.csv: File exists' (the mkdir of the folder
    met the file); `make-tiny-models --out items.tsv` said '.../tiny-bert: Not a directory'."""
    from iisan.cli.main import main

    (tmp_path / "items.tsv").write_text("I1\ta title\n")
    with pytest.raises(OutputError) as caught, atomic_path(tmp_path / "items.tsv" / "deeper" / "x.csv"):
        pass
    assert str(caught.value) == f"could not write {tmp_path}/items.tsv/deeper/x.csv: {tmp_path}/items.tsv is a file, " \
                                "not a folder"
    with pytest.raises(SystemExit) as stopped:
        main(["make-tiny-models", "--out", str(tmp_path / "items.tsv")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"iisan: error: {tmp_path}/items.tsv/tiny-bert: {tmp_path}/items.tsv is a file, not a folder"
    assert in_the_way(tmp_path / "nothing" / "x", FileExistsError()) == ""  # nothing in the way: the OS's words
    assert in_the_way(tmp_path / "items.tsv" / "x", PermissionError()) == ""
    assert in_the_way(b"/bytes/path", NotADirectoryError()) == ""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert in_the_way(tmp_path / "dangling" / "sub" / "x.csv", FileExistsError()) == \
        f"{tmp_path}/dangling is a symbolic link to nothing, not a folder"


def test_a_checkpoint_whose_folder_cannot_be_synced_after_its_rename_is_said_to_be_written(tmp_path, monkeypatch):
    """The folder's sync after the rename failed inside the write's own handler: the error said the checkpoint
    could not be written and called it 'the previous checkpoint ... intact' while it was in place."""
    import errno

    import torch

    import iisan.train.checkpoint_writing as writing
    from iisan.errors import CheckpointError

    root = tmp_path / "checkpoints"
    synced = writing.fsync

    def failing(path):
        if Path(path) == root:
            raise OSError(errno.EIO, "Input/output error")
        synced(path)

    monkeypatch.setattr(writing, "fsync", failing)
    with pytest.raises(CheckpointError) as caught:
        writing.write_checkpoint(root, "epoch-0000", {"w": torch.zeros(2)}, {"step": torch.zeros(1)}, {"epoch": 0},
                                 keep=2)
    assert str(caught.value) == (f"wrote checkpoint {root / 'epoch-0000'}, but could not sync the folder {root} after "
                                 "renaming it into place (Input/output error): the disk may be failing")
    assert (root / "epoch-0000" / "MANIFEST.json").is_file()


def test_a_failed_write_of_a_relative_path_names_the_folder_it_is_in(tmp_path, monkeypatch):
    """``--out table.csv`` in a read-only working folder: the message says which folder refused it."""
    from iisan.files import write_failure

    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.chdir(tmp_path)
    assert str(write_failure("table.csv", denied)) == f"could not write table.csv (in {tmp_path}): Permission denied"
    assert str(write_failure(tmp_path / "t.csv", denied)) == f"could not write {tmp_path / 't.csv'}: Permission denied"
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # a working folder removed under the command: the path as given
    assert str(write_failure("table.csv", denied)) == "could not write table.csv: Permission denied"


def test_json_has_no_infinity_or_nan_tokens():
    """An infinite loss kept under --nonfinite authors went into results.json as a bare Infinity token, which
    JavaScript's JSON.parse refuses and jq reads as 1.8e308."""
    import math

    from iisan.files import json_text

    text = json_text({"loss": math.inf, "valid": {"hit@10": 0.25}, "seen": [math.nan, 1.5, (-math.inf, 2)], "n": 3})
    assert text == '{"loss": null, "valid": {"hit@10": 0.25}, "seen": [null, 1.5, [null, 2]], "n": 3}'


def test_json_text_writes_a_finite_payload_as_json_does_and_walks_only_one_that_is_not():
    """The common case goes straight to json's encoder (a run's history, rewritten each epoch, made the walk
    cost more each epoch); what it writes is what the walk wrote: tuples as lists, keyword arguments kept."""
    import math

    from iisan.files import json_text

    payload = {"epochs": [{"epoch": 0, "loss": 1.5, "pair": (1, 2.0)}], "path": Path("/x"), "n": None}
    assert json_text(payload, indent=2, default=str) == json.dumps(payload, indent=2, default=str)
    assert json_text({"b": (math.nan,), "a": 1}, sort_keys=True) == '{"a": 1, "b": [null]}'
