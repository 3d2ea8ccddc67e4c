"""Running the repository's scripts in this process: loaded afresh from their files (they are not a
package), and their ``main(argv)`` ending checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """The script at ``path`` (relative paths: under ``scripts/``) as a fresh module. ``sys.path`` is put back
    after it: each script puts the checkout first to run uninstalled, once more at every load (the checkout is
    on the path already here)."""
    path = Path(path)
    path = path if path.is_absolute() else SCRIPTS / path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    before = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = before
    return module


def script_error(name: str, argv: list[str], capsys) -> str:
    """``scripts/<name>.py``'s ``main(argv)``, expected to end with exit status 2 -> its stderr."""
    with pytest.raises(SystemExit) as stopped:
        load_script(f"{name}.py").main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err
