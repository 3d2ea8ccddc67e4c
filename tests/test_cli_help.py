"""What a user reads before anything runs: ``--help`` of every command and entry script (each flag says
what it does and, where it has one, its default, once), and the one line that ends a flag argparse
refuses (the subcommand's usage, the flag meant, a sweep's values given to ``iisan train``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from iisan.cli.main import build_parser, main
from iisan.config import Config
from iisan.errors import ConfigError
from iisan.experiments.report import sorted_by
from iisan.experiments.report_rows import collect
from iisan.experiments.sweep import parse_script_args, script_parser
from iisan.flags import add_config_arguments
from iisan.methods import METHOD_DEFAULTS

from ._scripts import load_script
from .conftest import BASELINES

ROOT = Path(__file__).resolve().parents[1]


def refused(argv: list[str], capsys) -> list[str]:
    """``iisan argv``, expected to end as argparse refusing it: exit status 2 -> the lines of stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------------------------------
# an unknown flag: the subcommand's usage and parser, and the flag meant


def test_an_unknown_flag_after_a_subcommand_is_that_subcommands_error(capsys):
    err = refused(["train", "--config", "c.json", "--learning-rate", "1e-3"], capsys)
    assert err[0].startswith("usage: iisan train [-h] [-v] [--config FILE]")
    assert err[-1] == "iisan: error: unrecognized arguments: --learning-rate 1e-3"  # no flag is that close
    assert sum("error" in line for line in err) == 1


@pytest.mark.parametrize("argv, usage, last", [
    (["train", "--text_layers", "0,2"], "usage: iisan train ",  # the config key's spelling
     "unrecognized arguments: --text_layers 0,2; did you mean --text-layers?"),
    (["train", "--learning_rate", "1e-3"], "usage: iisan train ", "unrecognized arguments: --learning_rate 1e-3"),
    (["train", "--epoch=2", "--patiance", "3"], "usage: iisan train ",
     "unrecognized arguments: --epoch=2 --patiance 3; did you mean --epochs for --epoch, --patience for --patiance?"),
    (["evaluate", "runs/r", "--devic", "cpu"], "usage: iisan evaluate ",
     "unrecognized arguments: --devic cpu; did you mean --device?"),
    (["fetch", "encoders", "--presets", "iisan"], "usage: iisan fetch encoders ",
     "unrecognized arguments: --presets iisan; did you mean --preset?"),
    (["train", "--smoke", "3"], "usage: iisan train ", "unrecognized arguments: 3; --smoke takes no value"),
    (["params", "--lr", "1e-3", "2e-3"], "usage: iisan params ", "unrecognized arguments: 2e-3; --lr takes one value"),
    (["-x", "train"], "usage: iisan [-h] [-v] [--version] COMMAND ...", "unrecognized arguments: -x"),  # before it
])
def test_the_parser_given_the_flag_names_it_and_the_flag_meant(argv, usage, last, capsys):
    err = refused(argv, capsys)
    assert err[0].startswith(usage) and err[-1] == f"iisan: error: {last}"


@pytest.mark.parametrize("lr", [["--lr", "1e-3", "2e-3"], ["--lr=1e-3", "2e-3"]])
def test_several_values_for_train_say_that_a_sweep_is_the_entry_scripts(lr, capsys):
    err = refused(["train", *lr, "--epochs", "1"], capsys)
    assert err[-1] == (
        "iisan: error: unrecognized arguments: 2e-3; --lr takes one value: several values are a sweep, which the "
        "entry scripts run, not iisan train (e.g. python Code_Cached/scripts/run_IISAN.py --lr 1e-3 2e-3; README "
        "\"Running the paper's experiments\")")


def test_reproduce_names_the_flag_meant_and_passes_no_progress_on(capsys):
    reproduce = load_script("reproduce.py")
    with pytest.raises(SystemExit) as stopped:
        reproduce.parser().parse_args(["--seed", "1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: unrecognized arguments: --seed 1; did you mean --seeds?")
    overrides = {argv: reproduce.reproduction(reproduce.parser().parse_args(argv.split())).overrides
                 for argv in ("--dataset Office", "--dataset Office --no-progress", "--dataset demo --epochs 2")}
    assert overrides == {"--dataset Office": {}, "--dataset Office --no-progress": {"progress": False},
                         "--dataset demo --epochs 2": {"epochs": 2}}  # (a million demo users: minutes an epoch)


# --------------------------------------------------------------------------------------------------
# --help: every flag explained, a default stated once and never empty


def parsers(parser: argparse.ArgumentParser):
    """``parser`` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def every_parser() -> list[argparse.ArgumentParser]:
    versa = load_script(ROOT / "Code_Cached" / "scripts" / "run_IISAN_Versa.py", "run_IISAN_Versa")
    iisan = load_script(ROOT / "Code_Cached" / "scripts" / "run_IISAN.py", "run_IISAN")
    return [*parsers(build_parser()), load_script("reproduce.py").parser(),
            script_parser({"method": "iisan", "feed": "cached"}, iisan.SWEEP),
            script_parser(versa.defaults_for([]), versa.SWEEP, extra_arguments=versa.extra_arguments)]


def test_help_states_no_empty_and_no_doubled_default():
    for parser in every_parser():
        text = " ".join(parser.format_help().split())
        assert "(default: )" not in text and "(default: None)" not in text, parser.prog
        for action in parser._actions:
            if action.option_strings:
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
                assert action.help.count("default:") <= 1, f"{parser.prog} {action.option_strings[0]}: {action.help}"


def flag_of(argv: list[str], flag: str) -> argparse.Action:
    """The action of ``flag`` in the parser of the subcommand ``iisan argv``."""
    parser = build_parser()
    for name in argv:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser._option_string_actions[flag]


def help_of(argv: list[str], flag: str) -> str:
    return " ".join(flag_of(argv, flag).help.split())


def test_the_demos_data_sizes_say_what_they_take():
    """``iisan demo --users 10`` was refused with a range its help did not give."""
    from iisan.bounds import DEMO_ITEMS, DEMO_USERS

    reproduce = load_script("reproduce.py").parser()._option_string_actions
    for (low, high), helps in ((DEMO_USERS, (help_of(["demo"], "--users"), reproduce["--demo-users"].help)),
                               (DEMO_ITEMS, (help_of(["demo"], "--items"), reproduce["--demo-items"].help))):
        assert all(f", {low:,} to {high:,} (default: " in text for text in helps), helps


@pytest.mark.parametrize("argv, flag, default", [
    (["demo"], "--out", "(default: demo_data)"), (["demo"], "--epochs", "(default: 20)"),
    (["demo"], "--seed", "(default: 0)"), (["make-tiny-models"], "--out", "(default: pretrained_models)"),
    (["make-tiny-models"], "--hidden", "(default: 32)"), (["make-tiny-models"], "--layers", "(default: 2)"),
    (["build-lmdb"], "--size", "(default: 224)"), (["build-lmdb"], "--extension", "(default: .jpg)"),
    (["fetch", "encoders"], "--preset", "(default: iisan)"),
])
def test_a_flags_default_is_the_one_the_code_uses(argv, flag, default):
    assert help_of(argv, flag).endswith(default) and default == f"(default: {flag_of(argv, flag).default})"


@pytest.mark.parametrize("method, feed", [("iisan", "cached"), ("iisan", "live"), ("id", None),
                                          *((m, None) for m in BASELINES)])
def test_an_entry_scripts_help_shows_the_values_its_method_runs_with(method, feed):
    """run_fft.py --help said feed 'cached' (a baseline runs live) and its adapter rates by method ('iisan, fft,
    bitfit, id 0.0001; adapter, lora 0.0004'): each key a method sets now shows this script's own value."""
    defaults = {"method": method, **({"feed": feed} if feed else {})}
    points, _ = parse_script_args(defaults, {"seed": [12345]}, [])
    cfg = points[0].config.to_dict()
    parser = script_parser(defaults, {"seed": [12345]})
    keys = {"feed", *(k for values in METHOD_DEFAULTS.values() for k in values)}
    for key in sorted(keys):
        shown = " ".join(parser._option_string_actions["--" + key.replace("_", "-")].help.split())
        assert shown.endswith(f"(default: {cfg[key]})"), (method, key, shown)


def test_a_config_key_without_a_value_shows_none_and_a_given_default_replaces_the_words():
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    assert help_of(["train"], "--users") == help_text["users"]
    assert help_of(["train"], "--text-layers") == help_text["text_layers"]  # "...; default: group selection"
    assert help_of(["train"], "--batch-size") == f"{help_text['batch_size']} (default: iisan, id 64; fft, adapter, " \
                                                 "lora, bitfit 32)"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, {"text_layers": (0, 2), "run_name": "mine"}, only=("text_layers", "run_name"))
    assert parser._option_string_actions["--text-layers"].help == \
        "hidden-state indices fed to the text SAN (0 = embeddings; auto: --layer-rule's, over a --config file's " \
        "list) (default: (0, 2))"
    assert parser._option_string_actions["--run-name"].help == "run folder name (default: mine)"


# --------------------------------------------------------------------------------------------------
# iisan results: --keys and --sort name what they take


def test_results_keys_names_every_accepted_key_and_the_one_meant():
    with pytest.raises(ConfigError) as err:
        collect(["nowhere"], ["seed", "sed"])
    assert str(err.value) == (
        f"--keys: unknown config key(s) sed (did you mean seed?); a key is a config key "
        f"({', '.join(f.name for f in dataclasses.fields(Config))}) or processes (how many processes trained the run)")


def test_results_sort_names_the_columns_the_table_has():
    rows = pd.DataFrame({"run": ["a", "b"], "test_hit@10": [0.1, 0.3], "test_hit@10_std": [0.0, 0.1],
                         "non_finite": ["", ""]})
    assert list(sorted_by(rows, "test_hit@10")["run"]) == ["b", "a"]
    for column in ("speed", "non_finite"):
        with pytest.raises(ConfigError) as err:
            sorted_by(rows, column)
        assert str(err.value) == f"--sort {column}: not a column; columns are run, test_hit@10, test_hit@10_std"


@pytest.mark.parametrize("argv, verbose", [
    (["params"], False), (["-v", "params"], True), (["params", "-v"], True), (["params", "--verbose"], True),
    (["fetch", "data", "-v", "--dataset", "Scientific"], True),
    (["-v", "fetch", "data", "--dataset", "Scientific"], True), (["fetch", "data", "--dataset", "Scientific"], False)])
def test_verbose_goes_before_or_after_the_command(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_verbose_is_iisans_debug_lines_not_those_of_the_libraries_it_calls(monkeypatch):
    """-v with --curves wrote 220 lines of matplotlib's font manager among iisan's 7 (and PIL's, of each image)."""
    import logging

    from iisan.console import setup_logging

    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)  # put back after the test
    setup_logging(verbose=True)
    assert logging.getLogger("iisan").getEffectiveLevel() == logging.DEBUG
    for library in ("matplotlib", "matplotlib.font_manager", "PIL.PngImagePlugin", "transformers", "httpx"):
        assert logging.getLogger(library).getEffectiveLevel() == logging.WARNING, library


# --------------------------------------------------------------------------------------------------
# --help answers at once: torch and transformers are imported by what runs, not by defining the flags

HELP_IMPORTS = """
import runpy, sys
from contextlib import redirect_stdout
from io import StringIO
from iisan.cli.main import main
helps = [[*command, "--help"] for command in {commands!r}] + [["--version"]]
for argv in helps:
    try:
        with redirect_stdout(StringIO()):
            main(argv)
    except SystemExit as stop:
        assert stop.code == 0, argv
for script in {scripts!r}:
    sys.argv = [script, "--help"]
    try:
        with redirect_stdout(StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0, script
print(sorted(m for m in ("torch", "transformers", "pandas", "matplotlib", "tqdm") if m in sys.modules))
"""


def test_help_of_every_command_and_entry_script_imports_no_torch():
    commands = [p.prog.split()[1:] for p in parsers(build_parser())]  # [], [data-stats], ..., [fetch, data]
    assert len(commands) == 16 and ["fetch", "encoders"] in commands
    scripts = sorted(str(p) for d in ("Code_Cached", "Code_Uncached") for p in (ROOT / d).rglob("*.py"))
    scripts += sorted(str(p) for p in (ROOT / "scripts").glob("*.py"))  # `make reproduce`, the measuring ones:
    # the benchmark's, the diagnosis's, the profile's and the seeds' loaded torch, transformers and peft (5 s)
    assert len(scripts) >= 18
    code = HELP_IMPORTS.format(commands=commands, scripts=scripts)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


ERROR_IMPORTS = """
import sys
from contextlib import redirect_stderr
from io import StringIO
from iisan.cli.main import main
for argv in {errors!r}:
    said = StringIO()
    try:
        with redirect_stderr(said):
            main(argv)
    except SystemExit as stop:
        assert stop.code == 2 and said.getvalue().startswith("iisan: error: "), (argv, said.getvalue())
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_a_bad_config_or_run_folder_is_said_before_torch_loads(tmp_path):
    """`iisan train --config typo.json` or `iisan evaluate runs/typo` took 5 s (torch, transformers, peft)
    to say one line it knew from the arguments."""
    errors = [["train", "--config", str(tmp_path / "typo.json")], ["params", "--lr", "-1"],
              ["evaluate", str(tmp_path / "typo")], ["recommend", str(tmp_path / "typo"), "--user", "1"],
              ["export", str(tmp_path / "typo"), "--out", str(tmp_path / "out")]]
    code = ERROR_IMPORTS.format(errors=errors)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_evaluation_and_the_model_load_no_transformers():
    """Code that scores its own model with iisan's evaluation, or reads a cache into the side network, waited 2 s
    for transformers (a type annotation of the live feed imported the encoder wrappers)."""
    code = ("import sys; import iisan.evaluate, iisan.model.recommender, iisan.model.san, iisan.data.cache; "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_cached_iisan_run_imports_neither_transformers_model_code_nor_peft(tiny_config, tiny_cache):
    """A cached run reads its encoders' configs, never their weights: the import of transformers' model and image
    processor code (which naming AutoModel or AutoImageProcessor brings) and of peft (the baselines') took 1.7 of
    the 4.8 s a cached run spent importing before its first step."""
    import json

    cfg = tiny_config(cache_dir=tiny_cache, epochs=1, max_steps_per_epoch=2)
    code = ("import json, sys; from iisan.config import Config; from iisan.train.trainer import train; "
            "train(Config.from_dict(json.loads(sys.argv[1]))); print(sorted(m for m in ('peft', "
            "'transformers.modeling_utils', 'transformers.image_processing_utils') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert (Path(cfg.out_dir) / "t" / "results.json").is_file()  # it trained, and evaluated


def test_on_windows_it_says_in_one_line_where_it_runs():
    """Windows lacks the resource module, fcntl locks and a folder's fsync: every command ended in a traceback
    (ModuleNotFoundError: resource), or, past that, failed its first lock or write."""
    code = "import os; os.name = 'nt'; import iisan"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stderr) == (1, "iisan: runs on Linux and macOS, not on Windows itself: run it under "
                                                 "WSL 2 (Windows Subsystem for Linux)\n")


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"iisan {version('iisan')}\n"


def test_build_lmdb_takes_no_progress_as_every_long_command_does(monkeypatch, tmp_path):
    """docs/runs.md: a progress bar on long work (build-lmdb's too), and --no-progress turns it off."""
    import iisan.data.image_build as image_build
    from iisan.cli.main import main

    seen = []
    monkeypatch.setattr(image_build, "build_image_lmdb", lambda *a, **k: seen.append(k["progress"]) or
                        {"stored": 0, "path": "x", "blank": 0, "report": "y"})
    for extra, progress in (([], True), (["--no-progress"], False)):
        main(["build-lmdb", "--images", str(tmp_path), "--out", str(tmp_path / "x.lmdb"), *extra])
        assert seen.pop() is progress


def test_under_python_OO_help_works_and_a_command_says_in_one_line_why_it_cannot_run():
    """``python -OO`` drops docstrings: help had crashed on the missing module docstring, and transformers
    cannot define its models without theirs (a ValueError from inside it)."""
    run = [sys.executable, "-OO", "-m", "iisan"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert helped.returncode == 0 and "usage: iisan" in helped.stdout
    ran = subprocess.run([*run, "params", "--text-model", "x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (ran.returncode, ran.stderr) == (1, "iisan: python -OO (or PYTHONOPTIMIZE=2) drops the docstrings "
                                               "transformers defines its models from; run without it (-O works)\n")
