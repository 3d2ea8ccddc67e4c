"""A machine whose Python reads and writes in ASCII (a C or POSIX locale with PYTHONUTF8=0, as some clusters
run batch jobs): titles and tables with characters ASCII lacks are printed as escapes, not a crash; UTF-8 file
names are refused with the setting that reads them; a full disk under standard output is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASCII = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "",
         "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def iisan(*argv, env=ASCII, **kwargs) -> subprocess.CompletedProcess:
    outputs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.run([sys.executable, "-m", "iisan", *argv], env=env, timeout=300, **outputs)


def test_this_python_reads_ascii_under_that_locale():
    """The premise: without it the tests below would pass on any code."""
    code = "import sys; print(sys.stdout.encoding, sys.getfilesystemencoding())"
    probe = subprocess.run([sys.executable, "-c", code], env=ASCII, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["ascii", "ascii"]


def test_help_with_a_plus_minus_sign_is_printed_with_its_ascii_stand_in():
    done = iisan("results", "--help")
    assert done.returncode == 0, done.stderr.decode()
    assert b"mean +/- std" in done.stdout  # the table's own words; "mean \\xb1 std" before


def test_a_message_on_stderr_writes_this_librarys_signs_in_ascii():
    """A log line's dash or ellipsis (the cache's "— rebuild it ...") came out as \\u2014 under that locale."""
    code = ("import logging, sys; from iisan.streams import printable_streams; printable_streams(); "
            "logging.basicConfig(format='%(message)s'); logging.warning('cache differs \\u2014 rebuild it \\u2026 "
            "caf\\xe9 \\u00b1 2\\u00d7 10\\u201320 a\\u00b7b')")
    done = subprocess.run([sys.executable, "-c", code], env=ASCII, capture_output=True, timeout=60)
    assert done.stderr == b"cache differs -- rebuild it ... caf\\xe9 +/- 2x 10-20 a.b\n"


def test_what_a_command_prints_that_ascii_cannot_hold_is_escaped_not_a_crash():
    """`iisan recommend` of a run with titles in French or Chinese, `iisan results --average-seeds` (its ±):
    a UnicodeEncodeError half way through the table. A file name Python could not decode prints as its bytes."""
    code = ("import os; from iisan.console import entry_point; entry_point('iisan', lambda: print("
            "'titre num\\xe9ro 1 \\u4e2d\\u6587 \\xb1', os.fsdecode(b'donn\\xc3\\xa9es')))")
    done = subprocess.run([sys.executable, "-c", code], env=ASCII, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"titre num\\xe9ro 1 \\u4e2d\\u6587 +/- donn\xc3\xa9es\n"


def test_a_utf8_file_name_is_refused_with_the_setting_that_reads_it(tmp_path):
    folder = os.fsencode(tmp_path) + b"/donn\xc3\xa9es"
    done = iisan("make-tiny-models", "--out", folder)
    assert done.returncode == 2
    said = done.stderr.decode("ascii", "backslashreplace").strip().splitlines()[-1]
    assert said.endswith("is a UTF-8 name that Python reads as ascii here (a C or POSIX locale with PYTHONUTF8=0); "
                         "run with PYTHONUTF8=1 or a UTF-8 locale (LC_ALL=C.UTF-8)"), said
    assert not os.path.lexists(folder)
    done = iisan("make-tiny-models", "--out", os.fsencode(tmp_path) + b"/bad\xff")  # not UTF-8 at all: as before
    assert done.returncode == 2 and b"is not valid UTF-8, which safetensors and LMDB cannot open" in done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_standard_output_on_a_full_disk_is_one_line():
    """`iisan results RUNS > /dev/full`: an OSError without a file name came through as a traceback."""
    code = "from iisan.console import entry_point; entry_point('iisan', lambda: print('row ' * 100_000))"
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-c", code], env={**ASCII, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "1"},
                              stdout=full, stderr=subprocess.PIPE, timeout=60)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, lines
    assert lines == ["iisan: error: could not write the output: No space left on device"]
