"""Keys a run never reads (``methods.unread_keys``): changing them changes nothing the run computes (checked by
training), names the same run folder, is not a difference on resume, shows as '-' in result tables, and is
named in a warning when given."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from iisan.config import Config
from iisan.experiments.report_rows import collect
from iisan.methods import METHOD_TABLE, NOT_EVERY_RUN, unread_keys
from iisan.precedence import resolve
from iisan.train.checkpoint import config_differences
from iisan.train.runnames import config_hash, default_run_name, known_run_name
from iisan.train.trainer import train

# A value other than the default for every key some run does not read; each valid with the tiny towers.
OTHER = {
    "images": "missing.lmdb", "text_model": "missing-text", "image_model": "missing-image", "text_pooling": "mean",
    "encoder_dtype": "bfloat16", "image_norm": "authors", "towers": "text", "title_tokens": 16,
    "lr_image": 0.5, "lr_text": 0.5, "lr_adapter_image": 0.5, "lr_adapter_text": 0.5,
    "text_layers": (0, 1), "image_layers": (0, 1), "layer_groups": 1, "layer_rule": "groups",
    "include_embedding_state": False, "intra_start": "zeros", "modality": "intra", "fusion": "add",
    "gate_temperature": 0.5, "san_heads": "versa", "lora_rank": 2, "lora_alpha": 4.0, "lora_random_base": True,
    "lora_targets": "query", "adapter_targets": "ffn_out", "adapter_init": "identity",
    "adapter_position": "before_dropout", "text_adapter_down": 8, "image_adapter_down": 8, "static_shapes": False,
    "item_bucket_growth": 0.5, "title_multiple": 4, "cache_dtype": "float16",
    "text_encoder_dropout": True,
}

SETTINGS = [("iisan", "both", "cached"), ("iisan", "both", "live"), ("iisan", "text", "cached"),
            ("iisan", "text", "live"), ("iisan", "image", "cached"), ("iisan", "image", "live"),
            ("fft", "both", "live"), ("fft", "text", "live"), ("adapter", "both", "live"),
            ("adapter", "image", "live"), ("lora", "both", "live"), ("bitfit", "both", "live"),
            ("id", "both", "live")]



def test_every_method_is_a_setting_here():
    assert not (missing := sorted(set(METHOD_TABLE) - {m for m, _, _ in SETTINGS})), (
        f"method(s) {missing} in METHOD_TABLE but not in SETTINGS here: the keys they never read go untested")


def test_a_method_reads_only_keys_of_the_groups():
    for name, method in METHOD_TABLE.items():  # a key outside NOT_EVERY_RUN is read by every run anyway
        assert method.reads <= NOT_EVERY_RUN, (name, sorted(method.reads - NOT_EVERY_RUN))
    assert METHOD_TABLE["id"].reads == frozenset()  # no encoder: every encoder key unread
    assert unread_keys("id") == NOT_EVERY_RUN


def test_every_unread_key_has_another_value_here():
    every = set().union(*(unread_keys(m, t, f) for m in METHOD_TABLE for t in ("both", "text", "image")
                          for f in ("cached", "live")))
    assert every == set(OTHER)  # a key added to a set gets a value above, so the training test covers it
    assert every <= set(Config.__dataclass_fields__)
    assert "lr" not in every and "users" not in every and "seed" not in every  # what every run reads


def _config(tiny, cache_dir, tmp_path, method, towers, feed, **changes) -> Config:
    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    values.update(method=method, towers=towers, feed=feed, modality="intra" if towers != "both" else "intra_inter",
                  cache_dir=cache_dir, out_dir=str(tmp_path / "runs"), device="cpu", num_workers=0, progress=False,
                  batch_size=16, epochs=1, max_steps_per_epoch=2, eval_batch_size=64, encode_batch_size=32)
    return Config(**{**values, **changes})


@pytest.mark.parametrize("method,towers,feed", SETTINGS)
def test_unread_keys_change_nothing_a_run_computes(tiny, tiny_cache, tmp_path, monkeypatch, method, towers, feed):
    monkeypatch.chdir(tmp_path)  # the missing folders above are relative: here, and absent
    unread = unread_keys(method, towers, feed)
    plain = _config(tiny, tiny_cache, tmp_path, method, towers, feed)
    other = plain.replace(**{k: OTHER[k] for k in unread})
    assert config_hash(plain) == config_hash(other) and not config_differences(plain.to_dict(), other.to_dict())
    assert config_hash(plain) != config_hash(plain.replace(lr=1e-3))  # a key it reads still names another run
    first = train(plain.replace(run_name="plain"))
    second = train(other.replace(run_name="other"))
    assert first["test"] == second["test"] and first["valid"] == second["valid"]
    assert first["parameters"] == second["parameters"]  # the same parameters train, at the same rates
    weights = [load_file(str(tmp_path / "runs" / name / "best.safetensors")) for name in ("plain", "other")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_a_finished_id_run_is_found_whatever_encoders_it_is_given(tiny, tmp_path, caplog):
    cfg = _config(tiny, "", tmp_path, "id", "both", "live")
    done = train(cfg)
    other = cfg.replace(text_model=str(tmp_path / "other-text"), images=str(tmp_path / "other.lmdb"), towers="text")
    assert known_run_name(other) == known_run_name(cfg)
    with caplog.at_level(logging.INFO):
        again = train(other)
    assert "finished before with this config" in caplog.text and again["test"] == done["test"]
    rows, _ = collect([str(tmp_path / "runs")])
    assert rows.loc[0, "text_model"] == rows.loc[0, "images"] == rows.loc[0, "lora_rank"] == "-"
    assert rows.loc[0, "lr"] == str(cfg.lr)  # what it reads is shown


def test_a_key_another_method_reads_is_still_compared(tiny, tmp_path):
    lora = _config(tiny, "", tmp_path, "lora", "both", "live")
    assert config_hash(lora) != config_hash(lora.replace(lora_rank=2))
    assert config_differences(lora.to_dict(), lora.replace(lora_rank=2).to_dict()) == ["lora_rank=8 there, 2 now"]
    fft = _config(tiny, "", tmp_path, "fft", "both", "live")
    assert config_differences(fft.to_dict(), lora.to_dict()) == ["method='fft' there, 'lora' now"]


def test_an_unread_key_given_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        resolve(flags={"method": "fft", "lora_rank": 16, "lr": 1e-4})
    assert "lora_rank: not read by this run (method=fft, feed=live, towers=both)" in caplog.text
    assert "lr" not in caplog.text.split(":")[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve(flags={"method": "lora", "lora_rank": 16})
    assert "not read" not in caplog.text


def test_an_unread_key_from_a_shared_config_file_is_an_info_line_a_typed_one_a_warning(caplog):
    """One --config file for several methods holds keys some of them never read: each run warned of them as if
    typed. A typed key stays a warning; the file's is said at INFO, naming where it came from."""
    with caplog.at_level(logging.INFO, logger="iisan.precedence"):
        resolve(file_values={"lora_rank": 4, "gate_temperature": 0.5, "lora_alpha": 8},
                flags={"method": "fft", "lora_alpha": 8})  # typed too: a warning
    said = {r.getMessage(): r.levelname for r in caplog.records}
    assert said == {
        "lora_alpha: not read by this run (method=fft, feed=live, towers=both), so it changes nothing": "WARNING",
        "lora_rank, gate_temperature (from the --config file): not read by this run (method=fft, feed=live, "
        "towers=both), so it changes nothing": "INFO"}


def test_an_unread_key_given_is_named_in_train_log_too(tiny, tiny_cache, tmp_path):
    """The warning comes when the config is resolved, before the run folder and its train.log exist: the log's
    header names the key, so a run's folder says it too. A key at its default, or one the run reads, is not."""
    from pathlib import Path

    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    cfg = resolve({**values, "cache_dir": tiny_cache, "out_dir": str(tmp_path), "run_name": "unread", "device": "cpu",
                   "num_workers": 0, "progress": False, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 2,
                   "eval_batch_size": 64, "encode_batch_size": 32},
                  flags={"method": "iisan", "feed": "cached", "lora_rank": 4, "lr": 1e-3, "adapter_init": "authors"})
    head = (Path(train(cfg)["run_dir"]) / "train.log").read_text().split("\n===")[0]
    assert "not read by this run (method=iisan, towers=both, feed=cached), given other than their defaults: " \
           "lora_rank=4\n" in head


def test_unread_flags_as_typed_are_named_in_train_log_and_not_at_their_default(caplog, tiny, tiny_cache, tmp_path):
    """argparse gives a flag's value as typed, the string '4': compared with the default 8 it always differed
    (``--lora-rank 8`` was warned of), and train.log's header, which compares the config's 4, named nothing."""
    from pathlib import Path

    from iisan.cli.main import build_parser
    from iisan.flags import config_from_args

    paths = [a for k in ("users", "items", "images", "text_model", "image_model")
             for a in ("--" + k.replace("_", "-"), tiny[k])]
    run = [*paths, "--cache-dir", tiny_cache, "--out-dir", str(tmp_path), "--device", "cpu", "--num-workers", "0",
           "--no-progress", "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "2",
           "--eval-batch-size", "64", "--encode-batch-size", "32", "--feed", "cached"]
    with caplog.at_level(logging.WARNING, logger="iisan.precedence"):
        config_from_args(build_parser().parse_args(["train", *run, "--lora-rank", "8", "--lora-alpha", "1.0"]))
    assert "not read" not in caplog.text
    cfg = config_from_args(build_parser().parse_args(["train", *run, "--lora-rank", "6", "--run-name", "typed"]))
    head = (Path(train(cfg)["run_dir"]) / "train.log").read_text().split("\n===")[0]
    assert "not read by this run (method=iisan, towers=both, feed=cached), given other than their defaults: " \
           "lora_rank=6\n" in head


def test_an_unread_layer_list_is_named_in_train_log_as_in_the_warning(tiny, tmp_path):
    """The warning's record held the list as the config holds it, (0, 1); train.log's header compared the saved
    [0, 1]: the console named text_layers and the log did not."""
    from pathlib import Path

    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    cfg = resolve({**values, "out_dir": str(tmp_path), "run_name": "layers", "device": "cpu", "num_workers": 0,
                   "progress": False, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 1, "eval_batch_size": 64},
                  file_values={"text_layers": [0, 1]}, flags={"method": "fft", "towers": "text"})
    head = (Path(train(cfg)["run_dir"]) / "train.log").read_text().split("\n===")[0]
    assert "not read by this run (method=fft, towers=text, feed=live), given other than their defaults: " \
           "text_layers=(0, 1)\n" in head


def test_text_encoder_dropout_false_spelt_as_a_string_is_not_refused():
    from iisan.errors import ConfigError

    for spelt in ("false", "0", False):  # what coerce reads as False
        assert resolve(file_values={"text_encoder_dropout": spelt}).text_encoder_dropout is False
    with pytest.raises(ConfigError, match="^text_encoder_dropout: the authors' dropout"):
        resolve(file_values={"text_encoder_dropout": "true"})


def test_a_setting_turned_off_is_named_in_every_such_runs_train_log(tiny, tiny_cache, tmp_path):
    """The console says it once, when the config is resolved, before a run folder exists: each run of a sweep
    with that value says it in its train.log's header too; a run where it is in use does not."""
    from pathlib import Path

    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    base = {**values, "cache_dir": tiny_cache, "out_dir": str(tmp_path), "device": "cpu", "num_workers": 0,
            "progress": False, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 1, "eval_batch_size": 64}
    heads = []
    for name, fusion in (("a", "add"), ("b", "add"), ("c", "gated")):
        cfg = resolve({**base, "run_name": name}, flags={"fusion": fusion, "gate_temperature": 0.5})
        heads.append((Path(train(cfg)["run_dir"]) / "train.log").read_text().split("\n===")[0])
    line = "said when the config was read: gate_temperature=0.5: fusion=add has no gates, so it changes nothing\n"
    assert [line in head for head in heads] == [True, True, False]


def test_the_baselines_do_not_read_the_encoder_precision(caplog, tiny, tmp_path):
    """Their backbones load in fp32, trained or frozen: --encoder-dtype bfloat16 on LoRA did nothing, yet
    named another run folder and a column of its own in result tables. Uncached IISAN reads it."""
    with caplog.at_level(logging.WARNING):
        resolve(flags={"method": "lora", "encoder_dtype": "bfloat16"})
    assert "encoder_dtype: not read by this run (method=lora, feed=live, towers=both)" in caplog.text
    lora = _config(tiny, "", tmp_path, "lora", "both", "live")
    assert config_hash(lora) == config_hash(lora.replace(encoder_dtype="bfloat16"))
    live = _config(tiny, "", tmp_path, "iisan", "both", "live")
    assert config_hash(live) != config_hash(live.replace(encoder_dtype="bfloat16"))


def test_a_run_named_before_unread_keys_left_the_hash_is_still_found(tiny, tmp_path):
    cfg = _config(tiny, "", tmp_path, "id", "both", "live", text_model=str(tmp_path / "other-text"))
    earlier = default_run_name(cfg, scheme="canonical")  # the name this config had until unread keys left the hash
    assert earlier != default_run_name(cfg) and earlier.startswith("id-live-")
    (tmp_path / "runs" / earlier).mkdir(parents=True)
    assert known_run_name(cfg) == earlier


def test_an_unread_key_is_named_once_and_not_at_its_default(caplog):
    with caplog.at_level(logging.WARNING):
        for lr in (1e-4, 2e-4, 3e-4):  # a sweep resolves each point
            resolve(flags={"method": "bitfit", "lora_rank": 12, "lr": lr})
        resolve(flags={"method": "bitfit", "lora_alpha": 1.0})  # a full config names every key: at its default
    assert caplog.text.count("lora_rank: not read by this run (method=bitfit") == 1
    assert "lora_alpha" not in caplog.text


def test_a_modality_a_method_does_not_read_is_not_refused_for_one_tower(caplog):
    """--towers text --modality intra_inter is refused for IISAN (one tower has intra only), but FFT reads no
    modality: there the value is one the run ignores, as for both towers, not an error."""
    from iisan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^modality=intra_inter: towers=text is one modality, so only intra"):
        resolve(flags={"towers": "text", "modality": "intra_inter"})
    with caplog.at_level(logging.WARNING, logger="iisan.precedence"):
        assert resolve(flags={"method": "fft", "towers": "text", "modality": "intra_inter"}).method == "fft"
        assert resolve(flags={"method": "fft", "towers": "text", "modality": "inter"}).method == "fft"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["modality"]  # (intra_inter is the default)


def test_a_setting_another_setting_turns_off_is_named_once(caplog):
    """--fusion add has no gates, only --no-include-embedding-state reads --intra-start, and an image tower alone
    reads no --title-tokens: each changed nothing the run computes, without a word; a sweep's points say it
    once."""
    with caplog.at_level(logging.WARNING, logger="iisan.precedence"):
        for lr in (1e-4, 2e-4):
            resolve(flags={"fusion": "add", "gate_temperature": 1.0, "intra_start": "zeros", "lr": lr})
        resolve(flags={"gate_temperature": 1.0, "intra_start": "zeros", "include_embedding_state": False})
        resolve(flags={"method": "fft", "fusion": "add", "gate_temperature": 1.0})  # named as not read instead
        resolve(flags={"method": "fft", "towers": "image", "title_tokens": 12})  # an image tower reads no title
        resolve(flags={"method": "fft", "towers": "text", "title_tokens": 12})
        # a run's own config.json given as --config names every key, each at its value: a default is not said
        resolve(file_values={**Config().to_dict(), "fusion": "add", "towers": "image", "modality": "intra"})
    said = [r.getMessage() for r in caplog.records]
    assert said.count("gate_temperature=1.0: fusion=add has no gates, so it changes nothing") == 1
    assert said.count("intra_start=zeros: only a run with --no-include-embedding-state reads it, so it changes "
                      "nothing") == 1
    assert len(said) == 4 and said[2].startswith("fusion, gate_temperature: not read by this run (method=fft")
    assert said[3] == "title_tokens=12: towers=image reads no titles, so it changes nothing"


@pytest.mark.parametrize("method, towers, modality, flags, idle", [
    ("adapter", "both", "intra_inter", {"lr_image": 0.5, "lr_adapter_text": 0.5}, ["lr_image"]),
    ("fft", "both", "intra_inter", {"lr_adapter_image": 0.5, "lr_adapter_text": 0.5},
     ["lr_adapter_image", "lr_adapter_text"]),
    ("iisan", "text", "intra", {"lr_image": 0.5, "lr_adapter_image": 0.5, "lr_text": 0.5},
     ["lr_image", "lr_adapter_image"]),
    ("iisan", "both", "inter", {"lr_text": 0.5, "lr_image": 0.5}, ["lr_image", "lr_text"]),  # no intra chain
    ("lora", "both", "intra_inter", {"lr_text": 0.5}, ["lr_text"]),  # trains nothing without its random base
    ("lora", "both", "intra_inter", {"lr_text": 0.5, "lora_random_base": True}, []),
    ("bitfit", "both", "intra_inter", {"lr_text": 0.5, "lr_image": 0.5}, []),
])
def test_a_learning_rate_no_parameter_trains_at_is_named(tiny, tiny_cache, tmp_path, caplog, method, towers, modality,
                                                         flags, idle):
    """A learning rate set for a group the model has no parameter in (Adapter's --lr-image) changed nothing,
    without a word: the optimizer's groups name it, and results.json's parameters.by_rate lacks it."""
    from iisan.data.run_data import load_data
    from iisan.model.build import build_model
    from iisan.train.optim import make_optimizer, trained_by_rate

    cfg = resolve(flags={**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                         "cache_dir": tiny_cache, "device": "cpu", "method": method, "towers": towers,
                         "modality": modality, **flags})
    with caplog.at_level(logging.WARNING, logger="iisan.train.optim"):
        model, _ = build_model(cfg, load_data(cfg), "cpu")
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    said = [r.getMessage() for r in caplog.records if r.name == "iisan.train.optim"]
    assert not set(idle) & trained_by_rate(optimizer).keys()
    if not idle:
        assert said == []
        return
    (line,) = said
    assert line.startswith(", ".join(f"{k}=0.5" for k in idle) + ": no parameter of this run trains at ")
    assert f"(method={method}, towers={towers}" in line and line.endswith("so it changes nothing" if len(idle) == 1
                                                                           else "so they change nothing")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan.train.optim"):  # a sweep's next run: said for its train.log
        make_optimizer(model, cfg, torch.device("cpu"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "iisan.train.optim"] == \
        [(logging.INFO, line)]


def test_once_is_a_warning_the_first_time_then_info_and_remembers_what_was_said():
    from iisan import once

    assert [once.level("topic", ("k", 1)), once.level("topic", ("k", 1)), once.level("other", ("k", 1))] == \
        [logging.WARNING, logging.INFO, logging.WARNING]
    assert once.first("topic", ("k", 2)) and not once.first("topic", ("k", 2))
    assert once.said("topic", ("k", 2)) and not once.said("topic", ("k", 3)) and not once.said("none", ("k", 2))
    assert once.said_under("topic") == {("k", 1), ("k", 2)} and once.said_under("none") == frozenset()
