"""One precedence rule everywhere: flags > --config file > a script's SWEEP lists > the method's paper
defaults > Config defaults, for the entry scripts, ``iisan train`` and the efficiency benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from iisan.cli.main import build_parser
from iisan.experiments.sweep import parse_script_args, script_parser
from iisan.flags import config_from_args
from iisan.methods import METHOD_DEFAULTS, METHODS

from .conftest import BASELINES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"iisan": ROOT / "Code_Cached" / "scripts" / "run_IISAN.py",
           "iisan-live": ROOT / "Code_Uncached" / "scripts" / "run_IISAN.py",
           **{m: ROOT / "Code_Uncached" / "scripts" / f"run_{m}.py" for m in ("fft", "adapter", "lora", "bitfit")}}
RATES = ("batch_size", "lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")


def test_every_method_has_its_entry_script_here():
    assert not (missing := sorted(set(METHODS) - set(SCRIPTS) - {"id"})), (
        f"method(s) {missing} have no entry script in SCRIPTS here (Code_Uncached/scripts/run_<method>.py)")


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name.replace('-', '_')}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_configs(name: str, argv: list[str]):
    """What an entry script would run: (config, varying values) of each grid point."""
    module = script(name)
    method = "iisan" if name.startswith("iisan") else name
    defaults = {"method": method, **({"feed": "cached" if name == "iisan" else "live"} if method == "iisan" else {})}
    points, _ = parse_script_args(defaults, module.SWEEP, argv)
    assert all(p.config is not None for p in points), [p.error for p in points]
    return [p.config for p in points]


@pytest.fixture()
def config_file(tmp_path):
    def write(values: dict) -> str:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(values))
        return str(path)

    return write


# (flags, config file, expected lr, expected batch size) for Code_Cached/scripts/run_IISAN.py, whose SWEEP
# has lr [2e-4] and whose method (IISAN) has batch 64.
SCRIPT_TABLE = [
    ([], None, [2e-4], 64),  # SWEEP, method default
    ([], {"lr": 0.005}, [0.005], 64),  # file > SWEEP
    (["--lr", "3e-4"], {"lr": 0.005}, [3e-4], 64),  # flag > file
    (["--lr", "2e-4"], {"lr": 0.005}, [2e-4], 64),  # a flag equal to the default still beats the file
    (["--lr", "1e-4", "2e-4"], {"lr": 0.005}, [1e-4, 2e-4], 64),  # a flag's list replaces the file's value
    ([], {"batch_size": 16}, [2e-4], 16),  # file > method default
    (["--batch-size", "64"], {"batch_size": 16}, [2e-4], 64),  # flag equal to the method default > file
]


@pytest.mark.parametrize("flags, file_values, lrs, batch", SCRIPT_TABLE)
def test_entry_script_precedence(flags, file_values, lrs, batch, config_file):
    argv = flags + (["--config", config_file(file_values)] if file_values else [])
    configs = script_configs("iisan", argv)
    assert [c.lr for c in configs] == lrs and {c.batch_size for c in configs} == {batch}
    assert {c.lr_text for c in configs} == {5e-5} and {c.epochs for c in configs} == {100}  # method, Config
    if len(lrs) > 1:  # folder names come from the resolved values
        assert [c.run_name.split("-")[-2] for c in configs] == [f"lr{lr}" for lr in lrs]
    assert len({c.run_name for c in configs}) == len(configs)


# (argv, expected (batch_size, lr, lr_image, lr_text)) for `iisan train`.
TRAIN_TABLE = [
    (["--method", "fft"], (32, 1e-4, 1e-4, 5e-5)),
    (["--method", "fft", "--lr", "3e-4"], (32, 3e-4, 1e-4, 5e-5)),
    (["--config", "{file}"], (8, 1e-3, 1e-4, 5e-5)),  # file names the method (fft): its defaults below it
    (["--config", "{file}", "--method", "iisan"], (8, 1e-3, 1e-4, 5e-5)),  # the file's keys win over IISAN's
    (["--config", "{file}", "--batch-size", "32", "--lr", "1e-4"], (32, 1e-4, 1e-4, 5e-5)),  # flags = defaults
    (["--method", "adapter"], (32, 2e-4, 1e-4, 5e-5)),
]


@pytest.mark.parametrize("argv, expected", TRAIN_TABLE)
def test_iisan_train_precedence(argv, expected, config_file):
    path = config_file({"method": "fft", "batch_size": 8, "lr": 1e-3})
    args = build_parser().parse_args(["train", *(a.format(file=path) for a in argv)])
    cfg = config_from_args(args)
    assert (cfg.batch_size, cfg.lr, cfg.lr_image, cfg.lr_text) == expected


@pytest.mark.parametrize("name", [*BASELINES, "iisan-live"])  # each has an entry script
def test_iisan_train_applies_a_methods_defaults_as_its_entry_script_does(name):
    method = "iisan" if name == "iisan-live" else name
    (from_script,) = script_configs(name, [])
    args = build_parser().parse_args(["train", "--method", method] + (["--feed", "live"] if method == "iisan" else []))
    from_cli = config_from_args(args)
    assert {k: getattr(from_cli, k) for k in RATES} == {k: getattr(from_script, k) for k in RATES}
    assert from_cli.batch_size == METHOD_DEFAULTS[method]["batch_size"]


def test_fft_gets_its_paper_settings():
    cfg = config_from_args(build_parser().parse_args(["train", "--method", "fft"]))
    assert (cfg.batch_size, cfg.lr, cfg.lr_image, cfg.lr_text) == (32, 1e-4, 1e-4, 5e-5)


def test_help_shows_the_sweep_and_the_methods_defaults():
    fft = script("fft")
    text = " ".join(script_parser({"method": "fft"}, fft.SWEEP).format_help().split())
    assert "--lr LR [LR ...]" in text and "(default: 0.0001 (SWEEP))" in text
    assert "users per batch (default: 32)" in text and "(default: 5e-05)" in text
    assert "--grid-index I" in text and "--list-grid" in text
    train_help = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "users per batch (default: iisan, id 64; fft, adapter, lora, bitfit 32)" in train_help


def test_the_benchmark_rows_get_their_methods_defaults_below_its_flags():
    from iisan.efficiency.benchmark import method_config
    from iisan.efficiency.options import BENCH_KEYS

    assert not set(BENCH_KEYS) & {k for values in METHOD_DEFAULTS.values() for k in values}
    base = {"users": "u.tsv", "items": "i.tsv", "device": "cpu", "amp": "none"}
    fft, cached = method_config(base, "FFT"), method_config(base, "IISAN (cached)", 8)
    assert (fft.batch_size, fft.lr, fft.device, fft.amp) == (32, 1e-4, "cpu", "none")
    assert (cached.batch_size, cached.lr, cached.feed) == (8, 2e-4, "cached")


def test_a_config_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    from iisan.precedence import read_config_file

    plain, marked = tmp_path / "plain.json", tmp_path / "marked.json"
    plain.write_text('{"lr": 0.002, "epochs": 3}', encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as some Windows editors save JSON
    assert read_config_file(marked) == read_config_file(plain) == {"lr": 0.002, "epochs": 3}


def test_config_files_given_twice_are_merged_in_order(config_file, tmp_path):
    """--config base.json --config lr.json: lr.json's keys win and base.json's others stay (argparse kept
    only the last file, silently dropping the first)."""
    base = config_file({"method": "fft", "batch_size": 8, "lr": 1e-3})
    lr = tmp_path / "lr.json"
    lr.write_text(json.dumps({"lr": 5e-3}))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", base, "--config", str(lr)]))
    assert (cfg.method, cfg.batch_size, cfg.lr) == ("fft", 8, 5e-3)
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(lr), "--config", base]))
    assert cfg.lr == 1e-3  # the later file wins


def test_unknown_keys_are_named_briefly_with_the_key_meant():
    from iisan.config import Config
    from iisan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^f.json: unknown key\(s\) LR \(did you mean lr\?\)$"):
        Config.from_dict({"LR": 0.1}, source="f.json")
    with pytest.raises(ConfigError, match=r"^f.json: unknown key\(s\) ''$"):
        Config.from_dict({"": 1}, source="f.json")
    with pytest.raises(ConfigError, match=r"^f.json: unknown key\(s\) x{40}\.\.\. \(100,000 characters\)$"):
        Config.from_dict({"x" * 100_000: 1}, source="f.json")
    with pytest.raises(ConfigError) as many:  # a file of 200,000 keys: one short line
        Config.from_dict({f"k{i:06d}": 1 for i in range(200_000)}, source="f.json")
    assert str(many.value) == ("f.json: unknown key(s) " + ", ".join(f"k{i:06d}" for i in range(10))
                               + " and 199,990 more")
