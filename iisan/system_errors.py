"""One-line explanations of what the machine or its environment refused a command (``console.entry_point``
ends it with them): CPU memory, a thread, a lost torchrun peer, a working folder deleted under the shell, a
folder an environment variable names for a library's cache, and a matplotlib set up to fail.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from .files import shown_bytes
from .once import in_a_launch

# Environment variables that name folders libraries create at import or first use (torch's compile caches,
# Hugging Face's, matplotlib's, the temporary folder): one that cannot be made is named with its variable.
FOLDER_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCH_HOME", "HF_HOME", "HF_HUB_CACHE",
                    "XDG_CACHE_HOME", "MPLCONFIGDIR", "TMPDIR")
# what making a folder fails with (not, say, EISDIR: a folder above it given where a file was asked for)
MAKING = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.EEXIST}


def working_folder_gone() -> str:
    """The one line when the working folder was deleted under the shell ('' when it is there): torch's import
    would end the process in a fatal MKL error, and relative paths would mean nothing."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the working folder no longer exists (deleted after this shell entered it): cd to an existing folder"
    return ""


def environment_problem(err: BaseException) -> str:
    """The one line for an error that an environment variable's setting caused ('' for any other error)."""
    text = str(err)
    if isinstance(err, ValueError) and text.startswith("Key backend:"):  # matplotlib's rcParams, at its import
        return (f"matplotlib cannot use the backend MPLBACKEND={os.environ.get('MPLBACKEND', '')!r} names: unset "
                "MPLBACKEND, or set it to Agg")
    if not isinstance(err, OSError):
        return ""
    if err.filename is None and "Matplotlib requires access to a writable cache directory" in text:
        return ("matplotlib has no folder to write its cache in (neither HOME's nor a temporary one may be "
                "written): set MPLCONFIGDIR to a folder this user may write")
    if not isinstance(err.filename, str) or not err.filename:
        return ""
    path = Path(os.path.abspath(err.filename))
    for name in FOLDER_VARIABLES:
        if not (value := os.environ.get(name)):
            continue
        named = Path(os.path.abspath(value))
        if path == named:
            return (f"{name}={value} names a folder this user cannot make or use ({err.filename}: "
                    f"{err.strerror or err}): point {name} at a folder this user may write, or unset it")
        # a folder above it, while it is not there: making it may be what failed (the user's own path may be too)
        if path in named.parents and path != Path(path.anchor) and err.errno in MAKING and not named.is_dir():
            return (f"{err.filename}: {err.strerror or err}; {name}={value} names a folder under it, which cannot be "
                    f"made: point {name} at a folder this user may write, or unset it")
    return ""


def host_memory_error(err: RuntimeError) -> str:
    """The one line for torch's CPU allocator out of memory ('' for any other error)."""
    text = str(err)
    if "DefaultCPUAllocator: can't allocate memory" not in text:
        return ""
    asked = re.search(r"allocate (\d+) bytes", text)
    size = f" ({shown_bytes(int(asked.group(1)))} at once)" if asked else ""
    return out_of_memory(size)


def out_of_memory(size: str = "") -> str:
    """The one line for memory the CPU could not give (``size``: how much one allocation asked, if known); a
    limit on the process's address space (``ulimit -v``, a batch job's memory limit) is named as the cause."""
    try:
        import resource  # (Unix's)

        limit, unlimited = resource.getrlimit(resource.RLIMIT_AS)[0], resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        limit = unlimited = -1
    if limit != unlimited:
        return (f"out of memory on the CPU{size}: this process may use no more than {limit / 2**30:,.1f} GiB of "
                "address space (ulimit -v, or the batch job's memory limit), which torch and the models need far "
                "more of; raise that limit")
    return (f"out of memory on the CPU{size}: what this command asks for does not fit in this machine's memory; "
            "lower --batch-size or the model's sizes (e.g. --embedding-dim, --lora-rank), or check the sizes in the "
            "encoders' config.json")


def no_thread(err: RuntimeError) -> str:
    """The one line for a thread the system would not start ('' for any other error)."""
    if "can't start new thread" not in str(err):
        return ""
    return ("could not start a thread: this user's limit of processes and threads is reached (ulimit -u, or a "
            "batch job's task limit); raise it, or run fewer processes at once")


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_lost(err: RuntimeError) -> str:
    """The one line for a collective that failed because another process of a torchrun launch died (killed,
    out of memory) while this one waited for it ('' for any other error, and outside torchrun)."""
    text = str(err).strip()
    if not in_a_launch() or not (type(err).__name__ == "DistBackendError" or any(s in text for s in PEER_GONE)):
        return ""
    first = re.split(r"(?<=\.)\s", text.splitlines()[0], maxsplit=1)[0] if text else type(err).__name__
    if len(first) > 160:  # cut between words, not inside one (gloo's 'This is typically caused by a rem')
        first = first[:160].rsplit(" ", 1)[0] + " ..."
    return (f"lost contact with another process of this torchrun launch (it stopped or was killed: {first}); "
            "the checkpoints already written are intact: run the same command again to resume")
