"""Bad input and faults, met through the command line as a user meets them.

Each case runs ``iisan`` as a separate process (``_cli_driver.run_forked``: a forked child of this
interpreter, so torch is imported once) over one bad input or fault, and checks what the user sees:
exit status 2 (or, where skipping is documented, 0 with the count), the last line of stderr a single
``iisan: error: ...`` naming the path, line or value at fault, no traceback anywhere, every file that
existed before (data, LMDB, caches, checkpoints, results) byte-for-byte unchanged, and no temporary
file or lock left behind. A few run the real ``python -m iisan`` to show the entry point behaves alike.

Faults: a full disk is the kernel's file-size limit (``RLIMIT_FSIZE``: writes past it fail with
EFBIG, in Python and in the Rust of safetensors alike) or, where the exact words matter, an ENOSPC
raised by a patched writer; a read-only folder is one the child cannot write as another user (when
the tests run as root, for whom permissions do not apply, the child drops to ``nobody``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from iisan.config import Config
from iisan.data.cache_build import BUILD_FORMAT
from iisan.locks import OutputLock
from iisan.tensorfiles import write_safetensors
from iisan.train.trainer import train

from ._cli_driver import changed, leftovers, run_forked, run_subprocess, snapshot

# --------------------------------------------------------------------------------------------------
# the workspace: a data set, its LMDB and images, tiny encoders, a cache and a finished run


@pytest.fixture(scope="module")
def arena(tiny, tiny_cache):
    """A world-readable folder (a child that drops to another user must read the inputs) holding the
    workspace ``ws`` and one scratch folder per case; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="iisan-bad-inputs-"))
    ws = root / "ws"
    shutil.copytree(tiny["root"], ws)
    shutil.copytree(tiny_cache, ws / "cache")
    paths = {"ws": ws, "users": ws / "users.tsv", "items": ws / "items.tsv", "images": ws / "images.lmdb",
             "image_dir": ws / "images", "bert": ws / "bert", "vit": ws / "vit", "cache": ws / "cache",
             "runs": ws / "runs"}
    train(Config(users=str(paths["users"]), items=str(paths["items"]), images=str(paths["images"]),
                 text_model=str(paths["bert"]), image_model=str(paths["vit"]), cache_dir=str(paths["cache"]),
                 out_dir=str(paths["runs"]), run_name="done", device="cpu", num_workers=0, progress=False,
                 batch_size=16, epochs=1, max_steps_per_epoch=2, eval_batch_size=64))
    paths["done"] = paths["runs"] / "done"
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    yield {k: str(v) for k, v in paths.items()} | {"root": root}
    for path in root.rglob("*"):  # folders a case made read-only
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


@dataclass
class Case:
    name: str
    argv: Callable[[dict, Path], list[str]]
    expect: tuple[str, ...]  # substrings of the last stderr line (formatted with the paths and s=scratch)
    setup: Callable[[dict, Path], Callable | None] | None = None  # may return a cleanup
    fault: Callable[[dict, Path], None] | None = None  # runs in the child, before main
    code: int = 2
    stdin: bytes = b""
    check: Callable[[dict, Path], None] | None = None
    may_change: tuple[str, ...] = ()  # files that may differ afterwards (a log that records the attempt)


def T(P, s, *extra) -> list[str]:
    """``iisan train`` on the workspace (cached feed, one short epoch), then ``extra`` flags (last wins)."""
    return ["train", "--users", P["users"], "--items", P["items"], "--images", P["images"], "--text-model", P["bert"],
            "--image-model", P["vit"], "--cache-dir", P["cache"], "--device", "cpu", "--no-progress",
            "--num-workers", "0", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16",
            "--eval-batch-size", "64", "--out-dir", f"{s}/runs", "--run-name", "r", *extra]


def T_items(P, s) -> list[str]:
    """``iisan train`` with the case's own ``s/items.tsv``."""
    return T(P, s, "--items", f"{s}/items.tsv")


def T_users(P, s) -> list[str]:
    """``iisan train`` with the case's own ``s/users.tsv``."""
    return T(P, s, "--users", f"{s}/users.tsv")


def C(P, s, *extra) -> list[str]:
    """``iisan cache`` of the workspace into ``s/c``, then ``extra`` flags."""
    return ["cache", "--users", P["users"], "--items", P["items"], "--images", P["images"], "--text-model", P["bert"],
            "--image-model", P["vit"], "--cache-dir", f"{s}/c", "--device", "cpu", "--no-progress",
            "--num-workers", "0", "--encode-batch-size", "32", *extra]


def L(P, s, *extra) -> list[str]:
    """``iisan build-lmdb`` of the workspace's image folder into ``s/new.lmdb``, then ``extra`` flags."""
    return ["build-lmdb", "--images", P["image_dir"], "--out", f"{s}/new.lmdb", "--size", "64", *extra]


# ---- setups ------------------------------------------------------------------------------------


def write(name: str, content: str | bytes, encoding: str = "utf-8"):
    def setup(P, s):
        path = s / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return setup


def items_with(line: str, at: int = 2, encoding: str = "utf-8"):
    """A copy of the items file as ``s/items.tsv`` with ``line`` as line ``at``."""
    def setup(P, s):
        lines = Path(P["items"]).read_text().splitlines(True)
        lines.insert(at - 1, line)
        (s / "items.tsv").write_bytes("".join(lines).encode(encoding))
    return setup


def users_with(line: str):
    def setup(P, s):
        (s / "users.tsv").write_text(Path(P["users"]).read_text() + line)
    return setup


def copy(key: str, name: str):
    def setup(P, s):
        (shutil.copytree if Path(P[key]).is_dir() else shutil.copy)(P[key], s / name)
    return setup


def hold_lock(path: str):
    """The lock of an output, held by this (the parent) process while the child runs."""
    def setup(P, s):
        lock = OutputLock(Path(path.format(s=s, **P)), "held by the test").acquire()
        return lock.release
    return setup


def both(*setups):
    def setup(P, s):
        cleanups = [f(P, s) for f in setups]
        return lambda: [c() for c in cleanups if c]
    return setup


def edited_cache(edit: Callable[[dict, torch.Tensor], torch.Tensor | None]):
    """A copy of the workspace's cache as ``s/c`` whose text file's metadata or states ``edit`` changed
    (in place, or by returning new states)."""
    def setup(P, s):
        from safetensors import safe_open

        shutil.copytree(P["cache"], s / "c")
        path = s / "c" / "text.safetensors"
        with safe_open(str(path), "pt") as fh:
            meta, states = dict(fh.metadata()), fh.get_tensor("states")
        edited = edit(meta, states)
        states = edited if isinstance(edited, torch.Tensor) else states
        write_safetensors(path, {"states": (states.dtype, tuple(states.shape))}, [("states", states)], meta)
    return setup


def linked_sidecar(P, s):
    """``s/c/.building`` a link to a folder of the user's holding a build manifest of other settings (a cache build
    discarded such a folder with rmtree, which refuses a link: a traceback)."""
    mine = s / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"format": BUILD_FORMAT, "key": "x", "chunks": 1, "chunk_size": 1}))
    (s / "c").mkdir()
    (s / "c" / ".building").symlink_to(mine)


def linked_run_log(P, s):
    """A copy of the finished run whose train.log is a link to a file of the user's (a resume appended to it)."""
    shutil.copytree(P["done"], s / "runs" / "r")
    (s / "victim.txt").write_text("mine\n")
    (s / "runs" / "r" / "train.log").unlink()
    (s / "runs" / "r" / "train.log").symlink_to(s / "victim.txt")


def model_folder(name: str, make: Callable[[Path, dict], None]):
    def setup(P, s):
        make(s / name, P)
    return setup


def custom_code(folder: Path, P) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "iisan_evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(folder.parent / 'code-ran')!r}, 'w').write('ran')\n")


def pickled(folder: Path, P) -> None:
    from safetensors.torch import load_file

    shutil.copytree(P["bert"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def damaged_bert(damage: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """A copy of the workspace's BERT that ``damage`` changed."""
    def make(folder: Path, P) -> None:
        shutil.copytree(P["bert"], folder)
        damage(folder)
    return make


def config_edit(**values) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))
    return damage


def truncated_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def config_only(config) -> Callable[[Path, dict], None]:
    def make(folder: Path, P) -> None:
        config.save_pretrained(folder)
    return make


def other_weights(folder: Path, P) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(P["bert"], folder)
    tensors = {k: v + 0.01 for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def short_record(P, s):
    import lmdb

    shutil.copytree(P["images"], s / "short.lmdb")
    with lmdb.open(str(s / "short.lmdb"), lock=False) as env, env.begin(write=True) as txn:
        for key, _ in txn.cursor():
            if key != b"__meta__":
                txn.put(key, b"abc")


def foreign_lmdb(P, s):
    import lmdb

    with lmdb.open(str(s / "foreign.lmdb"), lock=False) as env, env.begin(write=True) as txn:
        txn.put(b"key", b"value")


def best_weights_edited(edit: Callable[[dict], None]):
    """A copy of the finished run as ``s/done`` whose best.safetensors ``edit`` changed (a dict of tensors)."""
    def setup(P, s):
        from safetensors.torch import load_file, save_file

        shutil.copytree(P["done"], s / "done")
        tensors = load_file(s / "done" / "best.safetensors")
        edit(tensors)
        save_file(tensors, s / "done" / "best.safetensors")
    return setup


def damaged_image_meta(P, s):
    import lmdb

    shutil.copytree(P["images"], s / "meta.lmdb")
    with lmdb.open(str(s / "meta.lmdb"), lock=False) as env, env.begin(write=True) as txn:
        txn.put(b"__meta__", b'{"format": "iisan-images/1", "size": "big"}')


def read_only(name: str):
    def setup(P, s):
        (s / name).mkdir(parents=True, exist_ok=True)
        (s / name).chmod(0o555)
    return setup


# ---- faults (in the child) ---------------------------------------------------------------------


def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored, as a shell would
    not: so the process sees the error instead of dying)."""
    def fault(P, s):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return fault


def another_user(P, s):
    if os.geteuid() == 0:  # permissions do not bind root: become nobody
        os.setgid(65534)
        os.setuid(65534)


def permissions_bind_the_child() -> bool:
    """Whether a read-only folder stops the child: always for a plain user; for root, only when it may
    drop to nobody (a container may forbid it)."""
    if os.geteuid() != 0:
        return True
    pid = os.fork()
    if pid == 0:
        try:
            another_user(None, None)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def disk_full_at(name: str):
    """The disk fills while ``iisan.tensorfiles`` writes ``name`` (under its temporary name): part of it
    written, then ENOSPC."""
    def fault(P, s):
        import builtins
        import errno

        from iisan import tensorfiles

        def full_open(path, mode="r", *args, **kwargs):
            fh = builtins.open(path, mode, *args, **kwargs)
            if "w" in mode and Path(path).name.startswith(f".{name}."):
                fh.write(b"\0" * 100)
                fh.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return fh

        tensorfiles.open = full_open
    return fault


# ---- checks after the run ----------------------------------------------------------------------


def nothing_at(name: str):
    def check(P, s):
        assert not (s / name).exists(), f"{s / name} exists"
    return check


def checkpoint_intact(run: str):
    def check(P, s):
        from iisan.train import checkpoint

        root = s / run / "checkpoints"
        found = checkpoint.checkpoints(root)
        assert [p.name for p in found] == ["epoch-0000"] and checkpoint.verify(found[0]) is None
    return check


def damaged_manifest(edit: Callable[[dict], object]):
    """A copy of the finished run as ``s/runs/done`` whose checkpoint's MANIFEST.json is valid JSON of the
    wrong shape: ``edit`` returns the new content (a str is written as it is)."""
    def setup(P, s):
        from iisan.train import checkpoint

        shutil.copytree(P["done"], s / "runs" / "done")
        path = s / "runs" / "done" / "checkpoints" / "epoch-0000" / checkpoint.MANIFEST
        new = edit(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    return setup


# --------------------------------------------------------------------------------------------------
# the cases

LATIN1 = "I0000001\tCaf\xe9 au lait No.x\n"
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))

CASES = [
    # data files: missing, undecodable, malformed, unsafe ids, duplicate users
    Case("users-missing", lambda P, s: T(P, s, "--users", f"{s}/nope.tsv"),
         ("users file {s}/nope.tsv does not exist",)),
    Case("items-missing", lambda P, s: T(P, s, "--items", f"{s}/nope.tsv"),
         ("items file {s}/nope.tsv does not exist",)),
    Case("items-is-a-folder", lambda P, s: T(P, s, "--items", str(s)), ("items file {s} is a folder",)),
    Case("users-symlink-loop", lambda P, s: T(P, s, "--users", f"{s}/a.tsv"),
         ("users file {s}/a.tsv is a symbolic link to no file (to 'b.tsv', which is missing or links back to "
          "itself)",), setup=lambda P, s: os.symlink("b.tsv", s / "a.tsv") or os.symlink("a.tsv", s / "b.tsv")),
    Case("items-latin1", T_items,
         ("{s}/items.tsv:2: byte 0xe9 at column 13 is not utf-8 text", "--encoding"),
         setup=items_with(LATIN1, encoding="latin-1")),
    Case("users-one", T_users,  # trained with loss 0 at every step and finished
         ("{s}/users.tsv: 1 user after the protocol trains nothing: the loss ranks each target against the items "
          "of the other users in its batch, and there are none",),
         setup=write("users.tsv", "U0\tI0000001 I0000002 I0000003 I0000004 I0000005 I0000006\n")),
    Case("items-one", T_users,  # every logit the target's own: loss 0 at every step, and finished
         ("{s}/users.tsv: 1 item after the protocol trains nothing: the loss ranks each target against the other "
          "items in its batch, and there are none",),
         setup=write("users.tsv", "".join(f"U{u}\t" + " ".join(["I0000001"] * 6) + "\n" for u in range(3)))),
    Case("users-three-interactions", lambda P, s: T(P, s, "--users", f"{s}/users.tsv", "--min-seq-len", "3"),
         ("{s}/users.tsv: no user has more than 3 interactions after the protocol, which trains nothing: the "
          "validation and test items leave each user 1 item to train on, and a target needs an item before it "
          "(--min-seq-len 4 or more keeps only users that have one)",),  # loss 0 at every step, and finished
         setup=write("users.tsv", "".join(f"U{u}\tI000000{3 * u + 1} I000000{3 * u + 2} I000000{3 * u + 3}\n"
                                          for u in range(3)))),
    Case("users-binary", T_users,
         ("{s}/users.tsv:1: byte 0x89 at column 1 is not utf-8 text",), setup=write("users.tsv", BINARY)),
    Case("encoding-unknown", lambda P, s: T(P, s, "--encoding", "klingon"),
         ("encoding='klingon' is not a text encoding",)),
    Case("encoding-not-text", lambda P, s: T(P, s, "--encoding", "rot13"), ("encoding='rot13' is not a text",)),
    Case("items-line-without-tab", T_items,
         ("{s}/items.tsv:3: expected item_id<TAB>title, found no tab",), setup=items_with("just words\n", at=3)),
    Case("items-duplicate-id", T_items,
         ("{s}/items.tsv:5: duplicate item id 'I0000003' (first on line 2)",),
         setup=items_with("I0000003\tanother title\n")),
    Case("items-third-column", T_items,
         ("{s}/items.tsv:2: 3 tab-separated fields, expected 2 (item_id<TAB>title)",),
         setup=items_with("X1\ta title\tbrand\n")),
    Case("users-empty-id", T_users, ("{s}/users.tsv:", ": empty user id"), setup=users_with("\tI0000001 I0000002\n")),
    Case("users-utf16-without-bom", T_users,
         ("{s}/users.tsv:1: user id 'U\\x001\\x00' contains the control character U+0000 (a NUL: is the file "
          "UTF-16? --encoding names its encoding)",), setup=write("users.tsv", "U1\tI0000001 I0000002\n",
                                                                "utf-16-le")),
    Case("users-control-character", T_users, ("{s}/users.tsv:", ": user id 'U\\x07' contains the control character "
                                              "U+0007"), setup=users_with("U\x07\tI0000001 I0000002\n")),
    Case("users-third-column", T_users,  # a timestamp column: not more items of the history
         ("{s}/users.tsv:", ": 3 tab-separated fields, expected 2 (user_id<TAB>item item ..., the items separated "
          "by spaces)"), setup=users_with("U9\tI0000001 I0000002 I0000003 I0000004 I0000005\t1712345678\n")),
    Case("items-empty-title", T_items,
         ("{s}/items.tsv:2: empty title for item 'X1'",), setup=items_with("X1\t \n")),
    Case("item-id-with-space", T_items,
         ("{s}/items.tsv:2: item id 'a b' contains whitespace",), setup=items_with("a b\ttitle\n")),
    Case("item-id-traversal", T_items,
         ("{s}/items.tsv:2: item id '../../x' contains a path separator",), setup=items_with("../../x\ttitle\n")),
    Case("item-id-absolute", T_items,
         ("{s}/items.tsv:2: item id '/etc/passwd' contains a path separator",),
         setup=items_with("/etc/passwd\ttitle\n")),
    Case("item-id-reserved", T_items,
         ("{s}/items.tsv:2: item id '__meta__' is reserved",), setup=items_with("__meta__\ttitle\n")),
    Case("item-id-control-char", T_items,
         ("{s}/items.tsv:2: item id 'a\\x07b' contains the control character U+0007",),
         setup=items_with("a\x07b\ttitle\n")),
    Case("users-duplicate-id", T_users,
         ("{s}/users.tsv:161: user 'U0000000' already has a line (1)", "--merge-duplicate-users"),
         setup=users_with("U0000000\tI0000001 I0000002 I0000003 I0000004 I0000005\n")),
    Case("no-user-long-enough", T_users,
         ("{s}/users.tsv: no user has 5 or more interactions",), setup=write("users.tsv", "U1\tI0000001\n")),
    Case("items-empty", T_items, ("items file {s}/items.tsv holds no items",),
         setup=write("items.tsv", "\n")),
    Case("data-stats-duplicate-users", lambda P, s: ["data-stats", "--users", f"{s}/users.tsv", "--items", P["items"]],
         ("{s}/users.tsv:161: user 'U0000000' already has a line",),
         setup=users_with("U0000000\tI0000001\n")),
    # what a first command without its inputs meets
    Case("train-without-data", lambda P, s: ["train", "--out-dir", f"{s}/runs", "--device", "cpu"],
         ("users and items files are required (--users FILE --items FILE)",)),
    Case("train-cached-without-cache-dir", lambda P, s: T(P, s, "--cache-dir", ""),
         ("feed=cached needs --cache-dir (build the cache with `iisan cache`)",), check=nothing_at("runs/r")),
    Case("cache-without-cache-dir", lambda P, s: C(P, s, "--cache-dir", ""),
         ("--cache-dir is required: where text.safetensors / image.safetensors go",)),
    Case("cache-without-items", lambda P, s: C(P, s, "--items", ""), ("--items FILE is required",)),
    Case("import-cache-without-cache-dir",
         lambda P, s: ["import-cache", "--from", str(s), "--dataset", "Scientific", "--items", P["items"],
                       "--users", P["users"], "--cache-dir", ""],
         ("--cache-dir is required: where text.safetensors / image.safetensors go",),
         setup=lambda P, s: [(s / f"{m}_outputs").mkdir() for m in ("bert", "vit")] and None),
    Case("import-cache-of-no-data-set", lambda P, s: ["import-cache", "--from", str(s), "--users", P["users"]],
         ("import-cache: give --dataset (one of the paper's), or --items and --cache-dir (with --users for the items "
          "a run uses, or --all-items)",)),
    Case("config-file-a-list", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: expected a JSON object of config keys",), setup=write("c.json", "[1, 2]")),
    Case("layers-not-integers", lambda P, s: T(P, s, "--text-layers", "a,b"),
         ("text_layers=['a', 'b']: expected a list of integers such as 0,2,4",)),
    Case("layers-an-empty-entry", lambda P, s: T(P, s, "--text-layers", "1,,2"),
         ("text_layers='1,,2': an empty entry between commas; expected a list of integers such as 0,2,4",)),
    Case("device-mps-absent", lambda P, s: T(P, s, "--device", "mps"),
         ("device=mps but no Apple MPS device is available",)),
    Case("cudagraph-on-cpu", lambda P, s: T(P, s, "--compile", "cudagraph"),
         ("compile=cudagraph needs a CUDA device and cached IISAN (static shapes)",)),
    Case("cudagraph-with-fp16", lambda P, s: T(P, s, "--compile", "cudagraph", "--amp", "fp16"),  # a traceback on a GPU
         ("compile=cudagraph needs amp=bf16 or none (fp16's loss scaling asks the host every step); use --amp bf16, or "
          "--compile off to run fp16 eager",)),
    Case("items-empty-id", T_items, ("{s}/items.tsv:2: empty item id",), setup=items_with("\ta title\n")),
    Case("lmdb-images-empty-folder", lambda P, s: L(P, s, "--images", f"{s}/empty"),
         ("no images to store: {s}/empty has no *.jpg files and no item list",),
         setup=lambda P, s: (s / "empty").mkdir()),
    Case("images-meta-damaged", lambda P, s: T(P, s, "--feed", "live", "--images", f"{s}/meta.lmdb"),
         ("{s}/meta.lmdb: the metadata record '__meta__' is damaged; rebuild the store with "
          "`iisan build-lmdb --overwrite`",), setup=damaged_image_meta),
    Case("cache-metadata-encoder-files-damaged", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors: its metadata 'encoder_files' is not a JSON object (damaged)",),
         setup=edited_cache(lambda meta, states: meta.update(encoder_files="[1]"))),
    Case("cache-metadata-width-damaged", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors: its metadata width 'wide' / depth",),
         setup=edited_cache(lambda meta, states: meta.update(width="wide"))),
    Case("cache-metadata-width-a-superscript", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),  # str.isdigit took it
         ("cache {s}/c/text.safetensors: its metadata width '²' / depth",),
         setup=edited_cache(lambda meta, states: meta.update(width="²"))),
    Case("cache-lacks-an-item", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors lacks 1 of the data set's items (e.g. 'I0000001')",),
         setup=edited_cache(lambda meta, states: meta.update(item_ids=meta["item_ids"].replace('"I0000001"',
                                                                                                 '"Z0000001"')))),
    # config and flags
    Case("config-file-missing", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("config file {s}/c.json does not exist",)),
    Case("config-file-not-json", lambda P, s: T(P, s, "--config", f"{s}/c.json"), ("{s}/c.json: not valid JSON",),
         setup=write("c.json", "{lr: 1")),
    Case("config-file-not-utf8", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: not UTF-8 text (at byte offset 8), so not JSON",),
         setup=write("c.json", b'{"lr": "\xe9"}')),
    Case("config-file-duplicate-key", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: key 'lr' appears twice; which value was meant?",), setup=write("c.json", '{"lr": 1, "lr": 2}')),
    Case("config-file-unknown-key", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: unknown key(s) colour",), setup=write("c.json", '{"colour": "red"}')),
    Case("config-file-nested-too-deep", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: not valid JSON (NestedTooDeep: arrays or objects nested",),
         setup=write("c.json", "[" * 100000 + "]" * 100000)),
    Case("config-file-integer-too-long", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: an integer of more than 4300 digits, far more than any config value takes",),
         setup=write("c.json", '{"epochs": 1' + "0" * 5000 + "}")),
    Case("config-file-float-underflow", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: the number 1e-400 is beyond what a float holds (it would be read as 0.0); no config value "
          "is near it",), setup=write("c.json", '{"lr": 1e-400}')),
    Case("config-file-float-overflow", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: the number -2.5E+999 is beyond what a float holds (it would be read as -inf)",),
         setup=write("c.json", '{"lr": -2.5E+999}')),
    Case("config-file-nul-in-path", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: out_dir='a\\x00b': a NUL character",), setup=write("c.json", '{"out_dir": "a\\u0000b"}')),
    Case("config-file-bad-value", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: lr='abc': expected a number",), setup=write("c.json", '{"lr": "abc"}')),
    Case("config-file-layers-float", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: text_layers=[0, 1.7, 2]: expected a list of integers",),
         setup=write("c.json", '{"text_layers": [0, 1.7, 2]}')),
    Case("config-file-layers-bool", lambda P, s: T(P, s, "--config", f"{s}/c.json"),
         ("{s}/c.json: text_layers=[True, 2]: expected a list of integers",),
         setup=write("c.json", '{"text_layers": [true, 2]}')),
    *(Case(f"checkpoint-manifest-{name}", lambda P, s: T(P, s, "--run-name", "done", "--epochs", "2"),
           ("cannot resume: {s}/runs/done/checkpoints/epoch-0000/MANIFEST.json is damaged",),
           setup=damaged_manifest(edit), may_change=("/train.log",))
      for name, edit in [("a-list", lambda m: [m]), ("files-a-list", lambda m: {**m, "files": list(m["files"])}),
                         ("entry-an-int", lambda m: {**m, "files": dict.fromkeys(m["files"], 5)}),
                         ("no-files", lambda m: {"format": m["format"]}),
                         ("nested-too-deep", lambda m: "[" * 100000 + "]" * 100000)]),
    Case("unknown-flag", lambda P, s: ["train", "--learning-rate", "1"], ("unrecognized arguments: --learning-rate",)),
    Case("abbreviated-flag", lambda P, s: ["data-stats", "--user", P["users"], "--items", P["items"]],
         ("the following arguments are required: --users",)),  # flags are taken only when spelled out
    Case("bad-choice", lambda P, s: C(P, s, "--cache-dtype", "float8"),
         ("argument --cache-dtype: invalid choice: 'float8'",)),
    Case("lr-negative", lambda P, s: T(P, s, "--lr", "-1"), ("lr=-1.0 must be a finite, positive learning rate",)),
    Case("lr-nan", lambda P, s: T(P, s, "--lr", "nan"), ("lr=nan must be a finite, positive learning rate",)),
    Case("lr-underflow", lambda P, s: T(P, s, "--lr", "1e-400"),
         ("lr=1e-400: beyond what a float holds (it would be read as 0.0)",)),
    Case("lr-overflow", lambda P, s: T(P, s, "--lr", "1e400"),
         ("lr=1e400: beyond what a float holds (it would be read as inf)",)),
    Case("bucket-growth-nan", lambda P, s: T(P, s, "--item-bucket-growth", "nan"),
         ("item_bucket_growth=nan must be a finite number",)),
    Case("lr-image-inf", lambda P, s: T(P, s, "--lr-image", "inf"), ("lr_image=inf must be a finite, positive",)),
    Case("lr-zero", lambda P, s: T(P, s, "--lr-adapter-text", "0"), ("lr_adapter_text=0.0 must be a finite, posi",)),
    Case("run-name-traversal", lambda P, s: T(P, s, "--run-name", "../../x"),
         ("run_name='../../x' must be a single folder name",), check=nothing_at("x")),
    Case("run-name-absolute", lambda P, s: T(P, s, "--run-name", f"{s}/abs"),
         ("run_name='{s}/abs' must be a single folder name",), check=nothing_at("abs")),
    Case("title-tokens-1", lambda P, s: T(P, s, "--title-tokens", "1"), ("title_tokens=1 must be at least 3",)),
    Case("cache-dir-is-the-encoder", lambda P, s: C(P, s, "--cache-dir", P["bert"]),
         ("--cache-dir {bert} is the input {bert}; writing there would change that input",)),
    Case("cache-dir-inside-the-lmdb", lambda P, s: C(P, s, "--cache-dir", f"{P['images']}/c"),
         ("--cache-dir {images}/c is inside the input {images}; writing there would change that input",)),
    Case("title-tokens-beyond-positions", lambda P, s: C(P, s, "--title-tokens", "100"),
         ("title_tokens=100 is more than the text encoder {bert} takes (max_position_embeddings 64); use "
          "--title-tokens 64 or fewer",)),
    Case("epochs-of-5000-digits", lambda P, s: T(P, s, "--epochs", "9" * 5000),
         ("epochs=999999999999... (5000 digits): far larger than any epochs can be",)),
    Case("seed-overflow", lambda P, s: T(P, s, "--seed", "99999999999999999999999"),
         ("seed=99999999999999999999999 must be in [0, 2**32)",)),
    Case("max-seq-len-huge", lambda P, s: T(P, s, "--max-seq-len", "100000000000000000000"),
         ("max_seq_len=100000000000000000000 must be at most 4096",)),
    Case("bucket-growth-huge", lambda P, s: T(P, s, "--feed", "live", "--item-bucket-growth", "1e30"),
         ("item_bucket_growth=1e+30 must be at most 4.0",)),
    Case("blocks-huge", lambda P, s: T(P, s, "--transformer-blocks", "1000000"),
         ("transformer_blocks=1000000 must be at most 1024",)),
    Case("adapter-down-huge", lambda P, s: T(P, s, "--text-adapter-down", "10000000"),
         ("text_adapter_down=10000000 must be at most 65536",)),
    Case("embedding-dim-huge", lambda P, s: T(P, s, "--embedding-dim", "2000000", "--attention-heads", "2"),
         ("embedding_dim=2000000 must be at most 65536",)),
    Case("device-tpu", lambda P, s: T(P, s, "--device", "tpu"), ("device='tpu' is not one of auto, cpu, cuda",)),
    Case("device-cuda-9", lambda P, s: T(P, s, "--device", "cuda:9"), ("device=cuda:9 but",)),
    Case("batch-size-0", lambda P, s: T(P, s, "--batch-size", "0"), ("batch_size=0 must be positive",)),
    Case("batch-size-1", lambda P, s: T(P, s, "--batch-size", "1"),
         ("batch_size=1 trains nothing: the loss ranks each target against the items of the other users",)),
    Case("layers-unsorted", lambda P, s: T(P, s, "--text-layers", "2,1"), ("text_layers=[2, 1] must be distinct",)),
    Case("layers-beyond-depth", lambda P, s: C(P, s, "--text-layers", "0,9"),
         ("text ({bert}) layers [0, 9] do not fit an encoder with 2 layers",)),
    # values a fuzzer found passed or crashed: a device torch refuses, "2 4" read as 24, 5_0 read as 50
    Case("device-cuda-leading-zero", lambda P, s: T(P, s, "--device", "cuda:01"),
         ("device='cuda:01' is not one of auto, cpu, cuda, cuda:N, mps",)),
    Case("layers-with-a-blank", lambda P, s: C(P, s, "--text-layers", "2 4"),
         ("text_layers='2 4': '2 4' is not one integer; separate the entries with commas, such as 0,2,4",)),
    Case("epochs-with-underscore", lambda P, s: T(P, s, "--epochs", "5_0"), ("epochs='5_0': expected an integer",)),
    Case("lr-in-other-digits", lambda P, s: T(P, s, "--lr", "\u0665e-4"), ("lr='\u0665e-4': expected a number",)),
    Case("lora-alpha-0", lambda P, s: T(P, s, "--method", "lora", "--lora-alpha", "0"),
         ("lora_alpha=0.0 must be positive",)),
    Case("gate-temperature-subnormal", lambda P, s: T(P, s, "--gate-temperature", "1e-320"),
         ("gate_temperature=1e-320 is below 1e-06: the gates' gradient (1 / temperature) would overflow the "
          "optimiser's fp32 state, and they would not train",)),
    Case("run-name-too-long", lambda P, s: T(P, s, "--run-name", "r" * 300),
         (f"run_name='{'r' * 40}'... is 300 bytes long; a folder name may be at most 200",)),
    # build-lmdb: nothing it did not write is ever replaced
    Case("lmdb-out-foreign-folder", lambda P, s: L(P, s, "--out", f"{s}/mine", "--overwrite"),
         ("--out {s}/mine exists and is not an IISAN image LMDB",), setup=write("mine/notes.txt", "my notes")),
    Case("lmdb-out-is-the-images", lambda P, s: L(P, s, "--out", P["image_dir"], "--overwrite"),
         ("--out {image_dir} is the input {image_dir}",)),
    Case("lmdb-out-contains-the-images", lambda P, s: L(P, s, "--out", P["ws"], "--overwrite"),
         ("--out {ws} contains the input {image_dir}",)),
    Case("lmdb-out-is-the-items", lambda P, s: L(P, s, "--items", P["items"], "--out", P["items"], "--overwrite"),
         ("--out {items} is the input {items}",)),
    Case("lmdb-out-is-a-file", lambda P, s: L(P, s, "--out", f"{s}/file.txt", "--overwrite"),
         ("--out {s}/file.txt exists and is not an IISAN image LMDB",), setup=write("file.txt", "mine")),
    Case("lmdb-file-size-limit", L, ("could not write {s}/new.lmdb: mdb_txn_commit: Input/output error (or this "
                                     "process's file-size limit, ulimit -f, of 64.0 KiB: LMDB says it so)",),
         fault=file_size_limit(64 << 10)),
    Case("lmdb-out-exists", lambda P, s: L(P, s, "--out", P["images"], "--size", "32"),  # (the same size: kept)
         ("--out {images} already holds an IISAN image LMDB built with --size 64 (32 now); pass --overwrite to "
          "replace it",)),
    # folders filled with files of fixed names: only new, empty or their own
    Case("demo-out-foreign-folder", lambda P, s: ["demo", "--out", f"{s}/mine", "--epochs", "1", "--no-progress"],
         ("--out {s}/mine exists and is not a demo folder (no .iisan-demo in it)",),
         setup=write("mine/users.tsv", "U1\tmy own data\n")),
    Case("tiny-models-over-a-foreign-model", lambda P, s: ["make-tiny-models", "--out", f"{s}/m"],
         ("--out {s}/m/tiny-bert exists and is not a random model folder IISAN wrote",),
         setup=write("m/tiny-bert/config.json", "{}")),
    Case("base-models-over-a-foreign-model", lambda P, s: ["make-tiny-models", "--base", "--out", f"{s}/m"],
         ("--out {s}/m/vit-base-random exists and is not a random model folder IISAN wrote",),
         setup=write("m/vit-base-random/model.safetensors", "mine")),
    Case("tiny-models-latin-1-items", lambda P, s: ["make-tiny-models", "--out", f"{s}/m", "--items", f"{s}/i.tsv"],
         ("{s}/i.tsv:1: byte 0xe9 at column 7 is not utf-8 text; pass --encoding",),
         setup=write("i.tsv", "I1\tcaf\u00e9 au lait\n", encoding="latin-1")),
    # an empty path would be the working folder: refused where a command line names a file or folder
    Case("export-out-empty", lambda P, s: ["export", P["done"], "--out", ""],
         ("argument --out: '' is empty; expected a path",)),
    Case("train-empty-config", lambda P, s: ["train", "--config", ""],
         ("argument --config: '' is empty; expected a path",)),
    Case("evaluate-empty-run-folder", lambda P, s: ["evaluate", " "],
         ("argument run_dir: ' ' is empty; expected a path",)),
    Case("tiny-models-odd-width", lambda P, s: ["make-tiny-models", "--out", f"{s}/m", "--hidden", "33"],
         ("argument --hidden: '33' is not a multiple of 8",)),
    Case("data-stats-negative-length", lambda P, s: ["data-stats", "--users", P["users"], "--items", P["items"],
                                                    "--max-seq-len", "-5"],
         ("argument --max-seq-len: '-5' is not a positive integer",)),
    Case("recommend-device-gpu", lambda P, s: ["recommend", P["done"], "--user", "U0000001", "--device", "gpu"],
         ("argument --device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps",)),
    Case("lmdb-size-0", lambda P, s: L(P, s, "--size", "0"), ("--size 0: stored images are size x size",)),
    Case("lmdb-size-negative", lambda P, s: L(P, s, "--size", "-5"), ("--size -5: stored images",)),
    Case("lmdb-size-huge", lambda P, s: L(P, s, "--size", "70000"), ("--size 70000: stored images",)),
    Case("lmdb-images-is-a-file", lambda P, s: L(P, s, "--images", P["users"]),
         ("--images {users} is a file; expected a folder",)),
    Case("lmdb-images-missing", lambda P, s: L(P, s, "--images", f"{s}/nope"),
         ("image folder {s}/nope does not exist",)),
    Case("lmdb-items-unsafe-id", lambda P, s: L(P, s, "--items", f"{s}/items.tsv"),
         ("{s}/items.tsv:2: item id '../x' contains a path separator",), setup=items_with("../x\ttitle\n")),
    Case("lmdb-concurrent-build", L, ("image LMDB {s}/new.lmdb is in use by pid",),
         setup=hold_lock("{s}/.new.lmdb.iisan-lock")),
    Case("lmdb-disk-full", lambda P, s: L(P, s, "--out", f"{s}/old.lmdb", "--overwrite"),
         ("could not write {s}/old.lmdb: ",), setup=copy("images", "old.lmdb"),
         fault=file_size_limit(64 << 10)),
    # encoders: nothing fetched, no code run, no pickle read, supported architectures only
    Case("model-missing", lambda P, s: C(P, s, "--text-model", f"{s}/nope"),
         ("model folder '{s}/nope' does not exist", "--allow-download")),
    Case("live-run-model-missing", lambda P, s: T(P, s, "--feed", "live", "--text-model", f"{s}/nope"),
         ("model folder '{s}/nope' does not exist", "--allow-download"), check=nothing_at("runs/r")),
    Case("live-run-lmdb-missing", lambda P, s: T(P, s, "--method", "fft", "--images", f"{s}/none.lmdb"),
         ("image LMDB {s}/none.lmdb does not exist",), check=nothing_at("runs/r")),
    Case("model-hub-id-without-flag", lambda P, s: C(P, s, "--text-model", "someone/model"),
         ("model folder 'someone/model' does not exist", "--allow-download")),
    Case("model-is-a-file", lambda P, s: C(P, s, "--image-model", P["users"]),
         ("model folder '{users}' is a file",)),
    Case("model-custom-code", lambda P, s: C(P, s, "--text-model", f"{s}/evil"),
         ("{s}/evil/config.json needs custom code from its folder (auto_map, model type 'iisan_evil')",),
         setup=model_folder("evil", custom_code), stdin=b"y\ny\ny\n", check=nothing_at("code-ran")),
    Case("model-type-unknown", lambda P, s: C(P, s, "--text-model", f"{s}/unknown"),
         ("{s}/unknown/config.json gives model type 'zzz_unknown', which transformers ", " does not know; IISAN's "
          "towers: text albert, bert, ", "; image clip, "),
         setup=model_folder("unknown", damaged_bert(config_edit(model_type="zzz_unknown")))),
    Case("model-pickled-weights", lambda P, s: C(P, s, "--text-model", f"{s}/pickled"),
         ("{s}/pickled holds pickled weights (pytorch_model.bin) and no .safetensors", "safetensors"),
         setup=model_folder("pickled", pickled)),
    Case("model-weights-truncated", lambda P, s: C(P, s, "--text-model", f"{s}/cut"),
         ("cannot load text encoder from '{s}/cut': a weights file is damaged or truncated",),
         setup=model_folder("cut", damaged_bert(truncated_weights))),
    Case("model-config-wrong-type", lambda P, s: C(P, s, "--text-model", f"{s}/typed"),
         ("cannot load text encoder config from '{s}/typed': TypeError: Field 'num_hidden_layers' expected int, "
          "got str (value: 'two')",), setup=model_folder("typed", damaged_bert(config_edit(num_hidden_layers="two")))),
    Case("model-config-other-sizes", lambda P, s: C(P, s, "--text-model", f"{s}/wide"),
         ("cannot load text encoder from '{s}/wide': its weights do not have the sizes its config.json gives",),
         setup=model_folder("wide", damaged_bert(config_edit(hidden_size=64)))),
    Case("model-config-nested-too-deep", lambda P, s: C(P, s, "--text-model", f"{s}/deep"),
         ("{s}/deep/config.json is not valid JSON (arrays or objects nested deeper",),
         setup=write("deep/config.json", "[" * 100_000)),
    Case("model-config-not-json", lambda P, s: C(P, s, "--text-model", f"{s}/broken"),
         ("{s}/broken/config.json is not valid JSON",), setup=write("broken/config.json", "{")),
    Case("text-tower-bart", lambda P, s: C(P, s, "--text-model", f"{s}/bart"),
         ("text encoder '{s}/bart' is a 'bart' model", "supported: albert, bert"),
         setup=lambda P, s: model_folder("bart", config_only(__import__("transformers").BartConfig(
             d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=50)))(P, s)),
    Case("image-tower-swin", lambda P, s: C(P, s, "--image-model", f"{s}/swin"),
         ("image encoder '{s}/swin' is a 'swin' model",
          "supported: clip, clip_vision_model, deit, dinov2, dinov2_with_registers, siglip, siglip_vision_model, vit"),
         setup=lambda P, s: model_folder("swin", config_only(__import__("transformers").SwinConfig(
             embed_dim=8, depths=[1], num_heads=[1], image_size=32, patch_size=4)))(P, s)),
    Case("vit-as-text-tower", lambda P, s: C(P, s, "--text-model", P["vit"]),
         ("text encoder '{vit}' is a 'vit' model, which IISAN cannot use as the text tower; supported:",)),
    Case("run-log-a-link", lambda P, s: T(P, s, "--epochs", "2"),
         ("{s}/runs/r/train.log is a symbolic link where IISAN writes the run's log; it would write through it",),
         setup=linked_run_log, check=lambda P, s: (s / "victim.txt").read_text() == "mine\n" or pytest.fail("written")),
    # caches: read
    Case("cache-missing", lambda P, s: T(P, s, "--cache-dir", f"{s}/none"),
         ("cache file {s}/none/text.safetensors does not exist",), check=nothing_at("runs/r")),
    Case("cache-dir-a-file", lambda P, s: T(P, s, "--cache-dir", f"{s}/afile"),
         ("cache folder {s}/afile is a file; expected the folder `iisan cache` writes (--cache-dir)",),
         setup=write("afile", "mine"), check=nothing_at("runs/r")),
    Case("cache-not-safetensors", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache file {s}/c/text.safetensors is unreadable",), setup=write("c/text.safetensors", b"not a cache")),
    Case("cache-metadata-not-json", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors: its metadata 'layers' is not a JSON list",),
         setup=edited_cache(lambda meta, states: meta.update(layers="[0, 1"))),
    Case("cache-metadata-layers-of-bools", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),  # (a bool is an int)
         ("cache {s}/c/text.safetensors: its metadata 'layers' is not a JSON list of ints (damaged)",),
         setup=edited_cache(lambda meta, states: meta.update(layers="[false, true]"))),
    Case("cache-metadata-nested-too-deep", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors: its metadata 'layers' is not a JSON list",),
         setup=edited_cache(lambda meta, states: meta.update(layers="[" * 100_000))),
    Case("cache-metadata-lacks-a-key", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors lacks the metadata width", "rebuild it with `iisan cache --overwrite`"),
         setup=edited_cache(lambda meta, states: meta.pop("width") and None)),
    Case("cache-fp16-of-an-earlier-version", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),  # (float32 by default)
         ("cache {s}/c/text.safetensors lacks the metadata encoder_weights (damaged, or built by an earlier version "
          "of IISAN); rebuild it with `iisan cache --overwrite --cache-dtype float16`",),
         setup=edited_cache(lambda meta, states: meta.update(dtype="float16") or meta.pop("encoder_weights")
                            and states.half())),
    Case("cache-other-weights", lambda P, s: T(P, s, "--text-model", f"{s}/bert2"),
         ("cache {cache}/text.safetensors was built for encoder ", " with weights digest ",
          "(the weight, tokenizer and processor files of {s}/bert2 now have "),
         setup=model_folder("bert2", other_weights)),
    Case("cache-item-order-changed", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors lists its item ids in another order",),
         setup=edited_cache(lambda meta, states: meta.update(
             item_ids=json.dumps((lambda ids: [ids[1], ids[0], *ids[2:]])(json.loads(meta["item_ids"])))))),
    Case("cache-non-finite-rows", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors: the states of item", "are not finite"),
         setup=edited_cache(lambda meta, states: states.index_fill_(0, torch.tensor([7]), float("nan")))),
    Case("cache-one-non-finite-value", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),  # in the first layer alone
         ("cache {s}/c/text.safetensors: the states of item", "are not finite (NaN or inf; 1 item(s) in all)"),
         setup=edited_cache(lambda meta, states: (states[7, 0, 0].fill_(float("inf")), None)[1])),
    Case("cache-fp16-non-finite-rows", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),  # rebuilt in float32, its
         ("cache {s}/c/text.safetensors: the states of item",  # runs would be refused it ('float16 then')
          "are not finite (NaN or inf; 1 item(s) in all); rebuild it with `iisan cache --overwrite --cache-dtype "
          "float16`"),
         setup=edited_cache(lambda meta, states: meta.update(dtype="float16") or states.half().index_fill_(
             0, torch.tensor([7]), float("nan")))),
    Case("cache-fp16-stored-as-fp32", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors holds float32 states, but its metadata says float16; rebuild it with "
          "`iisan cache --overwrite --cache-dtype float16`",),
         setup=edited_cache(lambda meta, states: meta.update(dtype="float16") and None)),
    Case("cache-other-layers", lambda P, s: T(P, s, "--cache-dir", f"{s}/c"),
         ("cache {s}/c/text.safetensors was built for layers [0, 2], without [1] (config asks for [0, 1, 2]",),
         setup=edited_cache(lambda meta, states: meta.update(layers="[0, 2]") or states[:, [0, 2]].contiguous())),
    # caches: written
    Case("cache-build-over-a-foreign-file", C, ("--cache-dir {s}/c/text.safetensors exists and is not an IISAN cache",),
         setup=write("c/text.safetensors", "my own file")),
    Case("cache-build-other-settings", lambda P, s: C(P, s, "--cache-dir", P["cache"], "--cache-dtype", "float16"),
         ("--cache-dir {cache}: text.safetensors holds a cache built with other settings (dtype float32 there, "
          "float16 now)",
          "--overwrite")),
    Case("cache-build-dir-is-a-file", lambda P, s: C(P, s, "--cache-dir", f"{s}/file"),
         ("--cache-dir {s}/file is a file",), setup=write("file", "x")),
    Case("cache-build-foreign-sidecar", C, ("{s}/c/.building exists and is not a cache build in progress",),
         setup=write("c/.building/notes.txt", "mine")),
    Case("cache-build-sidecar-a-link", C, ("{s}/c/.building exists and is not a cache build in progress",),
         setup=linked_sidecar),
    Case("cache-concurrent-build", C, ("cache folder {s}/c is in use by pid",), setup=hold_lock("{s}/c/.iisan-lock")),
    Case("cache-build-disk-full", C, ("could not write {s}/c/.building/chunk-000000.safetensors: File too large",
                                    "(this process's file-size limit, ulimit -f, or the file system's)"),
         fault=file_size_limit(8 << 10)),
    # image LMDB: read
    Case("images-is-a-file", lambda P, s: T(P, s, "--feed", "live", "--images", P["users"]),
         ("image LMDB {users} is a file",)),
    Case("images-not-an-lmdb", lambda P, s: T(P, s, "--feed", "live", "--images", P["image_dir"]),
         ("{image_dir} is not an LMDB (no data.mdb); build it with `iisan build-lmdb`",)),
    Case("images-foreign-lmdb", lambda P, s: T(P, s, "--feed", "live", "--images", f"{s}/foreign.lmdb"),
         ("{s}/foreign.lmdb is not an IISAN image LMDB (no __meta__ record)",), setup=foreign_lmdb),
    Case("images-record-shorter-than-header", lambda P, s: T(P, s, "--feed", "live", "--images", f"{s}/short.lmdb"),
         ("{s}/short.lmdb: image", "is truncated (3 bytes"), setup=short_record),
    Case("images-absent-for-live-feed", lambda P, s: T(P, s, "--feed", "live", "--images", ""),
         ("the image tower needs an image LMDB",)),
    # runs
    Case("run-folder-foreign", T, ("run folder {s}/runs/r exists and is not an IISAN run folder",),
         setup=write("runs/r/notes.txt", "mine")),
    Case("run-folder-is-a-file", T, ("run folder {s}/runs/r is a file",), setup=write("runs/r", "mine")),
    Case("run-folder-in-use", T, ("run folder {s}/runs/r is in use by pid",), setup=hold_lock("{s}/runs/r/.lock")),
    Case("out-dir-read-only", lambda P, s: T(P, s, "--out-dir", f"{s}/ro"),
         ("could not write {s}/ro/r: Permission denied",),
         setup=read_only("ro"), fault=another_user),
    Case("checkpoint-disk-full", T, ("could not write checkpoint {s}/runs/r/checkpoints/epoch-0000: File too large",
                                     "ulimit -f", "no earlier checkpoint exists"), fault=file_size_limit(64 << 10)),
    Case("best-weights-disk-full", T, ("could not write {s}/runs/r/best.safetensors: No space left on device",),
         fault=disk_full_at("best.safetensors"), check=checkpoint_intact("runs/r")),
    Case("non-finite-loss", lambda P, s: T(P, s, "--lr", "1e30"),
         ("non-finite loss at step", "(epoch 0, steps 0..1)", "the run diverged",
          "last good checkpoint: none yet; best weights: none yet"), check=nothing_at("runs/r/best.safetensors")),
    Case("resume-with-another-config", lambda P, s: T(P, s, "--run-name", "done", "--lr", "0.001"),
         ("cannot resume: {s}/runs/done/checkpoints/epoch-0000/state.json belongs to a different config",
          "lr=0.0002 there, 0.001 now"), setup=copy("done", "runs/done"), may_change=("/train.log",)),
    Case("resume-nothing", lambda P, s: T(P, s, "--resume"), ("--resume: no checkpoint in {s}/runs/r/checkpoints",)),
    Case("evaluate-without-best-weights", lambda P, s: ["evaluate", f"{s}/done", "--device", "cpu"],
         ("{s}/done is a finished run without its best.safetensors: its command, run again, writes it again from "
          "the checkpoint of its best epoch, where one is kept",),  # (it said: no best.safetensors yet)
         setup=both(copy("done", "done"), lambda P, s: (s / "done" / "best.safetensors").unlink())),
    Case("evaluate-weights-lacking-a-parameter", lambda P, s: ["evaluate", f"{s}/done", "--device", "cpu"],
         ("{s}/done/best.safetensors lacks trained weights for 1 parameters",),
         setup=best_weights_edited(lambda t: t.pop(sorted(t)[0]))),
    Case("evaluate-weights-of-another-model", lambda P, s: ["evaluate", f"{s}/done", "--device", "cpu"],
         ("{s}/done/best.safetensors holds 'lora.extra', which this model does not have",),
         setup=best_weights_edited(lambda t: t.update({"lora.extra": torch.zeros(2)}))),
    Case("recommend-empty-history", lambda P, s: ["recommend", P["done"], "--history", "", "--device", "cpu"],
         ("an empty history (give at least one item id)",)),
    Case("recommend-users-file-a-folder", lambda P, s: ["recommend", P["done"], "--users-file", str(s),
                                                        "--device", "cpu"],
         ("--users-file {s} is a folder; expected a file of user ids, one per line",)),
    Case("evaluate-best-weights-a-folder", lambda P, s: ["evaluate", f"{s}/done", "--device", "cpu"],
         ("{s}/done/best.safetensors is a folder; expected the weights file a run writes",),
         setup=both(copy("done", "done"), lambda P, s: (s / "done" / "best.safetensors").unlink(),
                    lambda P, s: (s / "done" / "best.safetensors").mkdir())),
    # results
    Case("results-sort-unknown", lambda P, s: ["results", P["done"], "--sort", "bogus"],
         ("--sort bogus: not a column",)),
    Case("results-keys-unknown", lambda P, s: ["results", P["runs"], "--keys", "colour"],
         ("--keys: unknown config key(s) colour",)),
    Case("results-damaged-file-is-a-counted-skip", lambda P, s: ["results", f"{s}/runs", P["done"]],
         ("1 of 2 results files skipped",), setup=write("runs/x/results.json", "{"), code=0),
    Case("results-nothing-readable", lambda P, s: ["results", f"{s}/runs"],
         ("none of the 1 results file(s) under {s}/runs could be read",), setup=write("runs/x/results.json", "{")),
]


def _format(text: str, P: dict, s: Path) -> str:
    return text.format(s=s, **{k: v for k, v in P.items() if k != "root"})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_line_and_loses_nothing(case: Case, arena):
    if case.name == "device-cuda-9" and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a cuda:9")
    if case.fault is another_user and not permissions_bind_the_child():
        pytest.skip("running as root without the right to become another user: nothing is read-only here")
    P = arena
    s = P["root"] / "cases" / case.name
    s.mkdir(parents=True)
    cleanup = case.setup(P, s) if case.setup else None
    before = snapshot(Path(P["ws"]), s)
    try:
        outcome = run_forked(case.argv(P, s), s, (lambda: case.fault(P, s)) if case.fault else None, case.stdin)
    finally:
        if cleanup:
            cleanup()
    where = outcome.describe()
    assert outcome.code == case.code, where
    assert "Traceback" not in outcome.out + outcome.err, where
    if case.code == 2:
        assert outcome.last_line.startswith("iisan: error: "), where
        assert outcome.err.count("iisan: error:") == 1, where
    for expected in case.expect:
        assert _format(expected, P, s) in (outcome.last_line if case.code == 2 else outcome.err), where
    assert not changed(before, snapshot(Path(P["ws"]), s), case.may_change), where
    assert not leftovers(Path(P["ws"]), s), where
    if case.check:
        case.check(P, s)


def test_the_suite_covers_enough_distinct_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 40


# --------------------------------------------------------------------------------------------------
# the real entry point behaves the same


@pytest.mark.parametrize("name", ["lmdb-out-foreign-folder"])
def test_python_m_iisan_ends_the_same_way(name, arena):
    case = next(c for c in CASES if c.name == name)
    P = arena
    s = P["root"] / "subprocess" / name
    s.mkdir(parents=True)
    if case.setup:
        case.setup(P, s)
    before = snapshot(Path(P["ws"]), s)
    outcome = run_subprocess(case.argv(P, s), s, stdin=case.stdin)
    where = outcome.describe()
    assert outcome.code == 2 and "Traceback" not in outcome.err, where
    assert outcome.last_line.startswith("iisan: error: ") and outcome.err.count("iisan: error:") == 1, where
    assert all(_format(e, P, s) in outcome.last_line for e in case.expect), where
    assert not changed(before, snapshot(Path(P["ws"]), s)), where
    if case.check:
        case.check(P, s)
