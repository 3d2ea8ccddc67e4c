"""Command line and config: unknown flags, bad values, precedence, entry scripts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iisan.cli.main import main
from iisan.config import Config
from iisan.efficiency import benchmark
from iisan.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--learning-rate", "0.1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


def test_invalid_choice_and_type(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--modality", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--users", "u", "--items", "i", "--batch-size", "many"])
    assert info.value.code == 2 and "batch_size='many': expected an integer" in capsys.readouterr().err


def test_an_integer_with_the_blanks_strip_removes_is_read_as_with_spaces():
    """str.strip() removes the separator characters U+001C..U+001F and int() does not: '32\\x1f' passed the
    check and then ended in a traceback (a value of a --config file or a flag, and a --seed)."""
    from iisan.bounds import coerce, int_in, seed_arg

    for blank in (" ", "\x1c", "\x1f", "\x85"):
        assert coerce("batch_size", f"32{blank}", int) == 32 == seed_arg(f"{blank}32") == int_in(1, 64)(f"32{blank}")


@pytest.mark.parametrize("values,message", [
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"text_layers": "2,1"}, r"text_layers=\[2, 1\] must be distinct, increasing"),
    ({"lr": "fast"}, "lr='fast': expected a number"),
    ({"run_name": " r"}, r"run_name=' r' must not start or end with a blank or start with '-'$"),
    ({"run_name": "-x"}, r"run_name='-x' must not start or end with a blank or start with '-'$"),
    ({"run_name": "a\nb"}, r"run_name='a\\nb' contains the control character U\+000A; use letters, digits"),
    ({"min_seq_len": 2}, r"min_seq_len=2: leave-one-out needs at least 3 interactions per user$"),
    ({"device": "cuda:128"}, r"device='cuda:128': a device index above 127, the largest torch takes$"),
    ({"run_name": "\ud800"}, r"run_name='\\ud800': holds a lone surrogate, which no text can$"),
    ({"drop_rate": 10**400}, r"drop_rate=100000000000\.\.\. \(401 digits\): expected a number a float can hold$"),
    ({"towers": "text", "modality": "inter"}, "towers=text needs modality=intra"),
    ({"colour": "red"}, "unknown key"),
    # int() reads no more than 4,300 digits: a longer index was a ValueError traceback; the value is shown cut short
    ({"device": "cuda:" + "1" * 4400}, r"^device='cuda:1{54}\.\.\. \(4,405 characters\): a device index above 127, "
                                       r"the largest torch takes$"),
    ({"device": "cuda:1000"}, r"^device='cuda:1000': a device index above 127"),
    ({"encoding": "utf-8\0"}, r"^encoding='utf-8\\x00' is not a text encoding Python knows"),  # a ValueError
    ({"text_layers": list(range(5000, 0, -1))}, r"^text_layers=\[5000, 4999, [0-9, ]{47}\.\.\. \(5,000 entries\) "
                                                r"must be distinct, increasing, non-negative indices$"),
])
def test_config_validation(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


def test_strings_of_booleans_and_numbers_are_read_alike_blanks_and_all():
    cfg = Config.from_dict({"smoke": " true ", "progress": "No", "batch_size": " 3 ", "lr": " 0.5"})
    assert (cfg.smoke, cfg.progress, cfg.batch_size, cfg.lr) == (True, False, 3, 0.5)
    with pytest.raises(ConfigError, match=r"^smoke='t rue': expected true or false$"):
        Config.from_dict({"smoke": "t rue"})


def test_precedence_cli_over_file_over_defaults(tmp_path):
    import argparse

    from iisan.flags import add_config_arguments, config_from_args

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "batch_size": 8}))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--batch-size", "4"]), {"epochs": 7})
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.seed) == (0.5, 4, 7, 12345)
    path.write_text(json.dumps({"lr": 0.5, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"c.json: unknown key\(s\) bogus$"):
        config_from_args(parser.parse_args(["--config", str(path)]))
    path.write_text(json.dumps({"batch_sise": 8, "l\u0000r": 0.5}))  # a typo, and a key with a NUL in it
    with pytest.raises(ConfigError, match=r"c.json: unknown key\(s\) batch_sise \(did you mean batch_size\?\), "
                                          r"'l\\x00r' \(did you mean lr\?\)$"):
        config_from_args(parser.parse_args(["--config", str(path)]))


def test_a_config_file_s_values_refused_only_together_are_judged_once_merged(tmp_path):
    """A --config file is checked alone, naming it; but values each fine alone and wrong together (heads that do
    not divide the width) may be mended by a later file or a flag, so they are judged on the merged config."""
    import argparse

    from iisan.errors import ValuesTogether
    from iisan.flags import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    (heads := tmp_path / "heads.json").write_text(json.dumps({"attention_heads": 3}))
    (dims := tmp_path / "dims.json").write_text(json.dumps({"embedding_dim": 96}))
    (text := tmp_path / "text.json").write_text(json.dumps({"towers": "text", "modality": "inter"}))
    for argv in (["--config", str(heads), "--embedding-dim", "96"], ["--config", str(heads), "--config", str(dims)]):
        cfg = config_from_args(parser.parse_args(argv))
        assert (cfg.embedding_dim, cfg.attention_heads) == (96, 3)
    assert config_from_args(parser.parse_args(["--config", str(text), "--modality", "intra"])).modality == "intra"
    with pytest.raises(ValuesTogether, match=r"^embedding_dim=64 is not divisible by attention_heads=3$"):
        config_from_args(parser.parse_args(["--config", str(heads)]))
    (both := tmp_path / "both.json").write_text(json.dumps({"attention_heads": 3, "lr": -1}))
    with pytest.raises(ConfigError, match=rf"^{both}: lr=-1.0 must be a finite, positive learning rate$"):
        config_from_args(parser.parse_args(["--config", str(both), "--embedding-dim", "96"]))


def test_missing_model_folder_from_the_command_line(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path),
              "--text-model", str(tmp_path / "missing-bert"), "--towers", "text", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"iisan: error: model folder '{tmp_path / 'missing-bert'}' does not exist; put the model " \
                  "there (see pretrained_models/README.md in the repository), or pass --allow-download to fetch a " \
                  "Hugging Face Hub id"


def test_cache_help_lists_what_a_cache_depends_on_and_takes_training_flags(tiny, tmp_path, capsys):
    """``iisan cache --help`` lists the flags of the data, the encoders and the cache, not the training ones;
    a training command line is still taken whole (here it gets as far as the missing encoder)."""
    from iisan.cli.data import CACHE_KEYS
    from iisan.config import Config

    assert set(CACHE_KEYS) <= set(Config.__dataclass_fields__)
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    shown = capsys.readouterr().out
    assert all(f"--{k.replace('_', '-')} " in shown for k in CACHE_KEYS) and "--cache-dir CACHE_DIR" in shown
    assert "--lr " not in shown and "--epochs" not in shown and "--lora-rank" not in shown
    assert "--image-norm " in shown  # a cache records it, and a run of another rule refuses that cache
    assert "Every other `iisan train` flag is taken too" in shown
    with pytest.raises(SystemExit):
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path),
              "--text-model", str(tmp_path / "absent"), "--towers", "text", "--lr", "1e-3", "--epochs", "3"])
    assert "model folder" in capsys.readouterr().err


def test_the_cache_script_help_lists_the_flags_iisan_cache_lists():
    """``preprocess_vectors.py --help`` lists what a cache depends on, as ``iisan cache --help`` does, not the
    training flags it takes unlisted (its run test passes one)."""
    from iisan.cli.data import CACHE_KEYS

    out = subprocess.run([sys.executable, "preprocess_vectors.py", "--help"], cwd=ROOT / "Code_Cached",
                         capture_output=True, text=True)
    flags = {word.strip("[]").split("=")[0] for word in out.stdout.split() if word.startswith(("--", "[--"))}
    assert out.returncode == 0 and {f"--{k.replace('_', '-')}" for k in CACHE_KEYS} <= flags
    assert {"--all-items", "--all-layers", "--overwrite", "--dataset"} <= flags
    assert not flags & {"--lr", "--epochs", "--lora-rank", "--method", "--feed", "--out-dir", "--run-name"}
    assert "Every other training flag is taken too" in " ".join(out.stdout.split())


def test_entry_script_rejects_unknown_flags():
    out = subprocess.run([sys.executable, "run_IISAN.py", "--no-such-flag"], cwd=ROOT / "Code_Cached" / "scripts",
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_entry_script_runs_a_sweep_in_process(tiny, tmp_path):
    from iisan.model.caching import build_cache_from_config

    base = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    build_cache_from_config(Config(**base, cache_dir=str(tmp_path / "c"), progress=False), dtype="float32")
    args = [sys.executable, "run_IISAN.py", "--lr", "1e-3", "2e-3", "--epochs", "1", "--device", "cpu",
            "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "runs"), "--no-progress"]
    for key, value in base.items():
        args += ["--" + key.replace("_", "-"), value]
    out = subprocess.run(args, cwd=ROOT / "Code_Cached" / "scripts", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted((tmp_path / "runs").glob("*/results.json"))
    assert [json.loads(p.read_text())["config"]["lr"] for p in results] == [1e-3, 2e-3]


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130(tiny_config, tiny, monkeypatch, capsys):
    """Ctrl-C while a cache builds (or a model loads) ends like every other stop: one line, no traceback."""
    import iisan.model.caching as caching

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caching, "build_caches", interrupted)
    cfg = tiny_config()
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
              "--text-model", tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir",
              cfg.cache_dir, "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("iisan: interrupted; nothing is left half-written (every output is "
                                            "written whole or not at all): a training run resumes from its last "
                                            "checkpoint and a cache build from its finished chunks when the same "
                                            "command runs again")


def test_ctrl_c_while_the_command_imports_is_one_line_and_exit_130(monkeypatch, capsys):
    """The installed command's first seconds go to importing torch and transformers; Ctrl-C there is no
    traceback either."""
    import iisan.cli

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "iisan.cli.main":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "iisan.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as info:
        iisan.cli.launch()
    assert info.value.code == 130
    assert capsys.readouterr().err == "iisan: interrupted while starting; nothing was done\n"


def test_make_tiny_models_prints_only_its_folders(tmp_path, capfd, caplog):
    """No "Writing model shards" bar and no notice about ViT's processor backend: three paths, nothing else."""
    with caplog.at_level(logging.INFO, logger="iisan.cli"):
        main(["make-tiny-models", "--out", str(tmp_path)])
    assert not caplog.records  # nothing there before: nothing written again
    out, err = capfd.readouterr()
    assert out.split() == [str(tmp_path / name) for name in ("tiny-bert", "tiny-vit", "tiny-llama")]
    assert "Writing model shards" not in err and "torchvision" not in err
    with caplog.at_level(logging.INFO, logger="iisan.cli"):  # run again (another --hidden, say): said, not silent
        main(["make-tiny-models", "--out", str(tmp_path), "--hidden", "24"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / name}: written again (a random model folder this command made before)"
        for name in ("tiny-bert", "tiny-vit", "tiny-llama")]


@pytest.mark.parametrize("flags, message", [
    (["--method", "fft", "--feed", "cached"], "feed=cached: method=fft trains through the backbones, so it runs live"),
    (["--method", "id", "--feed", "cached"], "feed=cached: method=id has no item encoder (only IISAN's states"),
    (["--towers", "text", "--modality", "intra_inter"], "modality=intra_inter: towers=text is one modality"),
    (["--config", "."], "config file . is a folder"),
    (["--text-encoder-dropout"], "text_encoder_dropout: the authors' dropout in IISAN's frozen text encoder, which "
                                 "only a live IISAN run with a text tower has (this one: method=iisan, feed=cached,"),
    (["--method", "lora", "--text-encoder-dropout"], "(this one: method=lora, feed=live, towers=both)"),
    (["--feed", "live", "--towers", "image", "--text-encoder-dropout"], "feed=live, towers=image); leave --text-"),
])
def test_a_value_given_that_cannot_apply_is_refused_not_replaced(flags, message, capsys):
    """A flag given wins or is an error: it is never quietly changed to what the method or towers allow."""
    with pytest.raises(SystemExit) as info:
        main(["params", *flags])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_the_defaults_a_method_changes_are_not_errors():
    from iisan.precedence import resolve

    assert resolve(flags={"method": "fft"}).feed == "live"  # the field default, cached, gives way
    assert resolve(flags={"towers": "image"}).modality == "intra"
    assert resolve(flags={"method": "iisan", "feed": "cached"}).feed == "cached"
    assert resolve(flags={"feed": "live", "text_encoder_dropout": True}).text_encoder_dropout


def test_script_help_describes_each_script_in_its_whole_first_paragraph():
    """--help shows a script's first docstring paragraph on one line (``console.summary``), never a line
    cut mid-sentence."""
    import ast

    from iisan.console import summary

    assert summary("Reproduce cached IISAN: fetch,\nbuild, train.\n\n    python x.py\n") == \
        "Reproduce cached IISAN: fetch, build, train."
    root = Path(__file__).resolve().parents[1]
    for script in sorted(root.glob("scripts/*.py")) + [root / "Dataset" / "build_lmdb.py"]:
        source = script.read_text()
        assert "__doc__.splitlines()" not in source, script
        if "description=" in source:
            assert summary(ast.get_docstring(ast.parse(source))).endswith((".", ")")), script


@pytest.mark.parametrize("flags, message", [
    (["--users", "-5"], "argument --users: -5 is not from 100 to 1,000,000"),
    (["--seed", "-1"], "argument --seed: -1 is not from 0 to 4,294,967,295"),
    (["--items", "many"], "argument --items: 'many' is not a whole number"),
    (["--epochs", "0"], "argument --epochs: 0 is not from 1 to 10,000"),
    (["--seed", "1_0"], "argument --seed: '1_0' is not a whole number"),  # int() read it as 10
    (["--seed", "\u0665"], "argument --seed: '\u0665' is not a whole number"),  # and this as 5
])
def test_demo_sizes_and_seed_are_bounded(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(tmp_path / "d"), *flags])
    assert info.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "d").exists()


def test_a_device_or_pipe_where_a_file_is_expected_is_not_called_missing(tmp_path, capsys):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv, message in ((["params", "--config", "/dev/null"], "config file /dev/null is not a regular file"),
                          (["data-stats", "--users", str(fifo), "--items", str(fifo)],
                           f"file {fifo} is not a regular file (a pipe or a device), expected a file")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_data_stats_bounds_the_sequence_lengths_as_a_config_does(tiny, capsys):
    """100,000,000 items before a target would allocate 894 GiB for 1,200 users: refused as train refuses it."""
    with pytest.raises(SystemExit):
        main(["data-stats", "--users", tiny["users"], "--items", tiny["items"], "--max-seq-len", "100000000"])
    assert "argument --max-seq-len: 100000000 is more than 4096, the most max_seq_len may be" in capsys.readouterr().err


def test_half_precision_asked_for_on_a_cpu_is_said_to_be_fp32(tiny_config, caplog):
    """--amp bf16 (a config from a GPU run) on a CPU: the run computes in fp32, and a warning says so."""
    import logging

    import torch

    from iisan.data.run_data import load_data
    from iisan.model.build import build_model
    from iisan.train.plan import plan_step

    cfg = tiny_config(amp="bf16", method="id")
    model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="iisan"):
        assert plan_step(cfg, torch.device("cpu"), model).amp is None
        plan_step(cfg.replace(amp="auto"), torch.device("cpu"), model)
    assert [r.getMessage() for r in caplog.records] == [
        "--amp bf16 applies on a CUDA GPU only: on CPU this run computes in fp32 (half precision is often emulated "
        "there, and slow)"]


def test_half_encoders_on_a_cpu_are_warned_of_once(caplog):
    """--encoder-dtype float16 on a CPU ran the encoders 2.5x slower than fp32 without a word (--amp says so)."""
    import logging

    import torch

    from iisan.model.backbones import resolve_encoder_dtype

    with caplog.at_level(logging.WARNING, logger="iisan"):
        for _ in range(2):
            assert resolve_encoder_dtype("float16", "m", "text", torch.device("cpu")) == torch.float16
        assert resolve_encoder_dtype("float32", "m", "text", torch.device("cpu")) == torch.float32
        assert resolve_encoder_dtype("bfloat16", "m", "text", torch.device("mps")) == torch.bfloat16  # a GPU's own
    assert [r.getMessage() for r in caplog.records] == [
        "--encoder-dtype float16 on a CPU: often emulated there, slower than fp32 (auto's)"]


def test_fetch_into_a_file_is_refused_before_any_download(tmp_path, capsys):
    """fetch's --root is a folder to write into: a file there is named as one, up front, not a raw 'File exists'."""
    (file := tmp_path / "users.tsv").write_text("U1\tI1\n")
    for argv in (["fetch", "encoders", "--root", str(file)], ["fetch", "data", "--dataset", "Scientific", "--root",
                                                              str(file)]):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"--root {file} is a file; expected a folder" in capsys.readouterr().err


def test_a_run_name_that_is_not_utf8_is_refused_before_anything_is_written(tiny_config, tiny_cache, tmp_path):
    """A byte like 0x80 in --run-name (a surrogate in Python): such a run trained once, then could not be
    resumed or used (safetensors opens no such path), so the name is refused up front, in one line."""
    from iisan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^run_name='b\\x80c' \(--run-name\) is not valid UTF-8"):
        tiny_config(cache_dir=tiny_cache, out_dir=str(tmp_path), run_name="b\udc80c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [(["--hidden", "100000"], "argument --hidden: 100000 is more than 4096"),
                                            (["--layers", "100000"], "argument --layers: 100000 is more than 64")])
def test_tiny_model_sizes_are_bounded(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-tiny-models", "--out", str(tmp_path / "m"), *flags])
    assert info.value.code == 2 and capsys.readouterr().err.strip().endswith(message)


def test_tiny_model_vocabulary_from_items_in_another_encoding(tmp_path):
    """``make-tiny-models --items`` reads the titles in ``--encoding``, as every other reader of an items file."""
    items = tmp_path / "items.tsv"
    items.write_bytes("I1\tcaf\u00e9 noir\n".encode("latin-1"))
    main(["make-tiny-models", "--out", str(tmp_path / "m"), "--items", str(items), "--encoding", "latin-1"])
    vocab = (tmp_path / "m" / "tiny-bert" / "vocab.txt").read_text(encoding="utf-8").split()
    assert {"caf\u00e9", "noir"} <= set(vocab)


def test_an_empty_out_dir_and_a_tower_of_width_0_are_one_line(tiny, tmp_path, capsys):
    """--out-dir '' would put run folders in the working folder; a width of 0 reached transformers' arithmetic
    in `iisan params` (a ZeroDivisionError traceback)."""
    import shutil

    data = ["--users", tiny["users"], "--items", tiny["items"]]
    with pytest.raises(SystemExit) as info:
        main(["train", *data, "--out-dir", ""])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("out_dir='' is empty; expected the folder run folders go in "
                                                    "(default: runs)")
    folder = tmp_path / "bert"
    shutil.copytree(tiny["text_model"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 0}))
    with pytest.raises(SystemExit) as info:
        main(["params", *data, "--text-model", str(folder), "--image-model", tiny["image_model"]])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"iisan: error: {folder}: its config.json gives 2 layers of width 0; "
                                               "expected positive integers (num_hidden_layers, hidden_size)")


def test_output_cut_short_by_its_reader_ends_quietly():
    """``iisan recommend ... | head -1``: once head has its line, the rest ends without a traceback, with
    the status a Unix tool killed by SIGPIPE reports (141)."""
    code = ("from iisan.console import entry_point\n"
            "entry_point('x', lambda: [print('item ' * 20) for _ in range(10**6)])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"item item")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141 and err == b""


def test_closed_standard_streams_are_pointed_at_dev_null_and_a_closed_stdout_is_said(tmp_path):
    """``iisan train ... 2>&-``: the first file the command opened took descriptor 2, and what a library
    writes to stderr went into it (a run's lock file). ``iisan results runs >&-`` ended 0 without a word."""
    import os

    code = ("import os; from iisan.console import entry_point\n"
            "fd = entry_point('x', lambda: os.open('opened', os.O_CREAT | os.O_WRONLY))\n"
            "os.write(fd, str(fd).encode())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, preexec_fn=lambda: os.close(2), timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and int((tmp_path / "opened").read_text()) > 2
    code = "from iisan.console import entry_point; entry_point('x', lambda: print('a table'))"
    done = subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stderr) == (0, "x: standard output is closed: what this command prints is lost\n")


def test_the_cpu_allocator_out_of_memory_is_one_line(capsys):
    """torch says so as a plain RuntimeError (a GPU's is torch.OutOfMemoryError, answered in the step)."""
    import torch

    from iisan.console import entry_point

    with pytest.raises(SystemExit) as info:
        entry_point("iisan", lambda: torch.empty(2**45, dtype=torch.uint8))  # 32 TiB
    assert info.value.code == 2
    advice = ("what this command asks for does not fit in this machine's memory; lower --batch-size or the "
              "model's sizes (e.g. --embedding-dim, --lora-rank), or check the sizes in the encoders' config.json\n")
    assert capsys.readouterr().err == "iisan: error: out of memory on the CPU (32,768.0 GiB at once): " + advice

    def python_runs_out():  # as transformers building a config.json's 100,000 layers did, inside torch's error
        try:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        except RuntimeError:
            raise MemoryError() from None

    with pytest.raises(SystemExit) as info:
        entry_point("iisan", python_runs_out)
    assert info.value.code == 2 and capsys.readouterr().err == "iisan: error: out of memory on the CPU: " + advice
    with pytest.raises(RuntimeError, match="^another$"):  # any other RuntimeError is a bug: its traceback
        entry_point("iisan", lambda: (_ for _ in ()).throw(RuntimeError("another")))


def test_limits_of_the_process_are_named_as_the_cause(capsys, monkeypatch):
    """Under `ulimit -v` the advice was to lower --batch-size (even for data-stats, which has none) on a machine
    of 128 GiB; under `ulimit -u` a thread that could not start was a traceback. A small allocation is said in
    MiB, not as 0.0 GiB."""
    import resource

    from iisan.console import entry_point
    from iisan.system_errors import host_memory_error, out_of_memory

    small = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9600000 bytes.")
    assert host_memory_error(small).startswith("out of memory on the CPU (9.2 MiB at once): ")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 * 2**30, resource.RLIM_INFINITY))
    assert out_of_memory() == ("out of memory on the CPU: this process may use no more than 3.0 GiB of address space "
                               "(ulimit -v, or the batch job's memory limit), which torch and the models need far more "
                               "of; raise that limit")
    with pytest.raises(SystemExit) as info:
        entry_point("iisan", lambda: (_ for _ in ()).throw(RuntimeError("can't start new thread")))
    assert info.value.code == 2 and capsys.readouterr().err == (
        "iisan: error: could not start a thread: this user's limit of processes and threads is reached (ulimit -u, "
        "or a batch job's task limit); raise it, or run fewer processes at once\n")
    import tempfile

    def no_temporary_folder():
        monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [])
        monkeypatch.setattr(tempfile, "tempdir", None)
        return tempfile.gettempdir()  # as torch's import asks for one

    with pytest.raises(SystemExit) as info:
        entry_point("iisan", no_temporary_folder)
    assert info.value.code == 2 and capsys.readouterr().err == (
        "iisan: error: no writable temporary folder (TMPDIR, /tmp, /var/tmp, the working folder): set TMPDIR to one "
        "this user may write\n")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGHUP"])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_stop_signal_anywhere_in_a_command_is_one_line_and_leaves_nothing_half_written(name, tiny, tmp_path,
                                                                                         monkeypatch, capsys):
    """A preempted job's SIGTERM (a SLURM job's SIGUSR1, a closed terminal's SIGHUP) during build-lmdb (or while
    any command loads): the Ctrl-C ending, exit 128 + the signal's number (143 for SIGTERM), no store and no
    temporary; the handler before the command is put back."""
    import signal

    import iisan.data.image_build as image_build

    sig = getattr(signal, name)

    calls, encode = [], image_build.encode_record

    def terminated_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(sig)
        return encode(*args, **kwargs)

    monkeypatch.setattr(image_build, "encode_record", terminated_at_the_third)
    handler = signal.getsignal(sig)
    out = tmp_path / "images.lmdb"
    with pytest.raises(SystemExit) as info:
        main(["build-lmdb", "--images", tiny["image_dir"], "--out", str(out), "--size", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 128 + sig and len(err) == 1
    assert err[0] == ("iisan: interrupted; no store was written (it is written whole or not at all): run the same "
                      "command again to build it from the start")  # (no checkpoint, no chunks: a build-lmdb's own)
    assert signal.getsignal(sig) is handler and sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_says_what_each_command_leaves(monkeypatch, capsys, tmp_path):
    """Every command said that a training run resumes and a cache build goes on from its chunks: iisan evaluate's
    and the benchmark's Ctrl-C too, which leave neither."""
    import iisan.cli.use as use

    from ._scripts import load_script

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(use, "cmd_evaluate", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(tmp_path)])
    assert info.value.code == 130 and capsys.readouterr().err.strip() == "iisan: interrupted; nothing was written"
    import iisan.model.caching as caching  # an import keeps no chunks to go on from, as a cache build does

    monkeypatch.setattr(caching, "import_cache_from_config", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["import-cache", "--from", str(tmp_path), "--items", str(tmp_path / "i"), "--cache-dir", str(tmp_path)])
    assert info.value.code == 130 and capsys.readouterr().err.strip() == (
        "iisan: interrupted; no cache file was written (each is written whole or not at all): run the same command "
        "again to import the states")
    bench = load_script("benchmark_efficiency.py")
    monkeypatch.setattr(benchmark, "run_benchmark", interrupted)
    with pytest.raises(SystemExit) as info:
        bench.main(["--few-steps", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert info.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "interrupted; the rows measured so far are in the JSON and its table (each written whole): run the same "
        "command again to measure them all")


def test_a_rank_alone_in_the_environment_is_no_launch_for_what_is_said(monkeypatch, capsys):
    """RANK=1 left in a plain run's environment hid the resume line of a Ctrl-C (and every INFO line), though
    the run itself, rightly, was no launch (distributed.launched needs WORLD_SIZE too)."""
    from iisan.console import exit_interrupted

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for world in (None, "2"):
        if world:
            monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit):
            exit_interrupted("iisan", "interrupted; to resume, run the same command again")
    assert capsys.readouterr().err == "iisan: interrupted; to resume, run the same command again\n"  # once


def test_tiny_models_take_an_items_file_with_empty_titles(tmp_path, capsys):
    """A MicroLens items file has empty titles: make-tiny-models said 'pass --allow-empty-titles', a flag it lacks,
    so no such file could give it its vocabulary. An empty title adds no word."""
    items = tmp_path / "items.tsv"
    items.write_text("I1\tzebra quartz\nI2\t\nI3\tquartz lantern\n")
    main(["make-tiny-models", "--out", str(tmp_path / "m"), "--items", str(items)])
    vocab = (tmp_path / "m" / "tiny-bert" / "vocab.txt").read_text().split()
    assert {"zebra", "quartz", "lantern"} <= set(vocab)


def test_a_working_folder_deleted_under_the_shell_is_one_line_before_torch(tmp_path):
    """torch's import there ended the process in "Intel oneMKL FATAL ERROR", and data-stats in a traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = (f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); sys.argv = ['iisan', 'data-stats', "
              "'--users', 'u.tsv', '--items', 'i.tsv']; from iisan.cli.main import main; main()")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "iisan: error: the working folder no longer exists (deleted after "
                                                 "this shell entered it): cd to an existing folder\n")


def test_folders_and_backends_the_environment_names_are_said_with_their_variable(tmp_path, monkeypatch, capsys):
    """TORCHINDUCTOR_CACHE_DIR under a file (torch makes it at import), an MPLBACKEND matplotlib lacks, no folder
    for matplotlib's cache: each was a traceback or a path the user never named, without its variable."""
    from iisan.console import entry_point
    from iisan.system_errors import environment_problem

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "afile" / "inductor"))
    monkeypatch.setenv("MPLBACKEND", "bogus")
    made = NotADirectoryError(20, "Not a directory", str(tmp_path / "afile" / "inductor"))
    assert environment_problem(made) == (
        f"TORCHINDUCTOR_CACHE_DIR={tmp_path / 'afile' / 'inductor'} names a folder this user cannot make or use "
        f"({tmp_path / 'afile' / 'inductor'}: Not a directory): point TORCHINDUCTOR_CACHE_DIR at a folder this user "
        "may write, or unset it")
    above = PermissionError(13, "Permission denied", str(tmp_path))  # a folder above it, which could not be made
    assert environment_problem(above) == (
        f"{tmp_path}: Permission denied; TORCHINDUCTOR_CACHE_DIR={tmp_path / 'afile' / 'inductor'} names a folder "
        "under it, which cannot be made: point TORCHINDUCTOR_CACHE_DIR at a folder this user may write, or unset it")
    assert environment_problem(IsADirectoryError(21, "Is a directory", str(tmp_path))) == ""  # (no folder's making)
    assert environment_problem(PermissionError(13, "Permission denied", "/")) == ""  # (above everything)
    assert environment_problem(PermissionError(13, "Permission denied", str(tmp_path / "other"))) == ""
    assert environment_problem(OSError("Matplotlib requires access to a writable cache directory, but ...")) == (
        "matplotlib has no folder to write its cache in (neither HOME's nor a temporary one may be written): set "
        "MPLCONFIGDIR to a folder this user may write")
    backend = ValueError("Key backend: 'bogus' is not a valid value for backend; supported values are ['agg']")
    cache = OSError("Matplotlib requires access to a writable cache directory, but ...")
    for err, said in ((made, environment_problem(made)), (backend, environment_problem(backend)),
                      (cache, environment_problem(cache))):
        with pytest.raises(SystemExit) as info:
            entry_point("iisan", lambda err=err: (_ for _ in ()).throw(err))
        assert info.value.code == 2 and capsys.readouterr().err == f"iisan: error: {said}\n"
    assert environment_problem(backend) == ("matplotlib cannot use the backend MPLBACKEND='bogus' names: unset "
                                            "MPLBACKEND, or set it to Agg")
    with pytest.raises(ValueError, match="^another$"):  # any other ValueError is a bug: its traceback
        entry_point("iisan", lambda: (_ for _ in ()).throw(ValueError("another")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "there" / "inductor"))
    (tmp_path / "there" / "inductor").mkdir(parents=True)  # there: an error above it is not its making
    assert environment_problem(PermissionError(13, "Permission denied", str(tmp_path / "there"))) == ""


def test_no_cuda_device_says_whether_torch_has_cuda_and_what_cuda_visible_devices_chose(monkeypatch):
    import torch

    from iisan.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^device=cuda but no CUDA device is available \(this torch is a build "
                                          r"without CUDA\)$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match=r"^device=cuda but no CUDA device is available$"):
        resolve_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"^device=cuda:1 but no CUDA device is available with "
                                          r"CUDA_VISIBLE_DEVICES='', which chooses the GPUs this process sees$"):
        resolve_device("cuda:1")
