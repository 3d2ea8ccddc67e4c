"""Where a number came from: package versions, the device, the commit and the command. Every results
file, benchmark and script records ``provenance(device)``."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from .config import CHECKOUT, SOURCE
from .devices import device_name

PACKAGES = ("torch", "transformers", "peft", "safetensors", "numpy", "lmdb", "iisan")
CREDENTIALS = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")  # scheme://user:password@ of a URL given as an argument


def versions() -> dict[str, str]:
    """Installed versions; torch's with its build tag (``2.11.0+cu130``, ``2.13.0+cpu``), which a wheel's
    metadata may leave out."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        if name == "torch":
            out[name] = torch.__version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with local changes), or $IISAN_COMMIT where git cannot say (a copied
    working tree without .git, e.g. on a remote GPU: a variable left set never relabels a checkout's runs);
    ``unknown`` for an installed package (its version is in ``versions``), whose folder may sit inside another
    project's repository."""
    given = os.environ.get("IISAN_COMMIT") or "unknown"
    if not CHECKOUT:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE, capture_output=True, text=True,
                             timeout=5, check=False)
        # (file names as git prints them: not UTF-8 under core.quotePath=false; only whether there are any counts)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE,
                               capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return given
    if out.returncode != 0 or not (commit := out.stdout.strip()):
        return given
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    """The command that is running, as typed (program relative to the working directory); ``python -m iisan``
    (and torchrun's ``-m iisan``) as such: the path of ``iisan/__main__.py`` does not run as a script; the
    ``iisan`` command (pip's launcher, as the shell found it) without ``python``, as it was run. A URL's
    credentials (``https://user:token@host``) are written as ``***``: logs and results get shared."""
    program, args = Path(sys.argv[0]), [CREDENTIALS.sub(r"\1***@", a) for a in sys.argv[1:]]
    if program.name == "__main__.py" and program.parent.name == "iisan":
        return shlex.join(["python", "-m", "iisan", *args])
    if program.name == "iisan":
        return shlex.join([program.as_posix(), *args])
    return shlex.join(["python", program.as_posix(), *args])


def provenance(device: torch.device | str | None = None, commit: str | None = None) -> dict:
    """``device``, ``versions``, ``git_commit``, ``command`` and ``date``. Pass ``commit`` when it was read
    before the run wrote into the checkout (a benchmark's own results would make it ``+dirty``)."""
    return {"device": device_name(device) if device is not None else None, "versions": versions(),
            "git_commit": commit or git_commit(), "command": command_line(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
