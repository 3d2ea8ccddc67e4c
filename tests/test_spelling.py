"""One value, one run: a setting spelt another way (-0 for 0, a target list with blanks, an encoder folder with a
trailing slash, from another working folder, under ~) names the same run folder, resumes the same run and picks
the same cache as its plain spelling."""

from __future__ import annotations

import math

import pytest

from iisan.config import DEFAULT_MODELS, REPOSITORY, Config
from iisan.experiments.presets import versa_defaults
from iisan.spelling import one_spelling
from iisan.train.checkpoint import config_differences
from iisan.train.runnames import config_hash

PLAIN = {"users": "/data/Sci/u.tsv", "items": "/data/Sci/i.tsv", "cache_dir": "/c"}


def test_minus_zero_is_zero():
    """json.dumps spells -0.0 apart from 0.0: --drop-rate -0 named a second run of the same computation. The
    config keeps what was given (config.json records it); names, resumes and tables read one spelling."""
    spelt = Config(**PLAIN, drop_rate=-0.0, item_bucket_growth=-0.0)
    assert math.copysign(1.0, spelt.drop_rate) == -1.0  # as given
    assert math.copysign(1.0, one_spelling(spelt.to_dict())["drop_rate"]) == 1.0
    plain = Config(**PLAIN, drop_rate=0.0, item_bucket_growth=0.0)
    assert config_hash(spelt) == config_hash(plain) and config_differences(spelt.to_dict(), plain.to_dict()) == []


def test_a_precision_spelt_as_a_record_or_another_flag_spells_it_is_the_flags_own_value(capsys):
    """results.json and `iisan results` show --amp bf16 as bfloat16, and --cache-dtype takes bfloat16 where --amp
    takes bf16: copying one into the other was refused. A config stores the key's own spelling, so the run is one."""
    from iisan.cli.main import build_parser
    from iisan.flags import config_from_args

    given = ["--amp", "bfloat16", "--cache-dtype", "bf16", "--encoder-dtype", "fp32"]
    args = build_parser().parse_args(["train", *(a for k, v in PLAIN.items() for a in ("--" + k.replace("_", "-"), v)),
                                      *given])
    cfg = config_from_args(args)
    assert (cfg.amp, cfg.cache_dtype, cfg.encoder_dtype) == ("bf16", "bfloat16", "float32")
    plain = Config(**PLAIN, amp="bf16", cache_dtype="bfloat16", encoder_dtype="float32")
    assert config_hash(cfg) == config_hash(plain) and cfg.to_dict() == plain.to_dict()
    assert Config(**PLAIN, amp="float32").amp == "none" and Config(**PLAIN, amp="float16").amp == "fp16"  # a file's
    assert build_parser().parse_args(["import-cache", "--from", "x", "--dtype", "fp16"]).dtype == "float16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--amp", "float8"])
    assert "argument --amp: invalid choice: 'float8' (choose from " in capsys.readouterr().err


def test_target_lists_are_one_spelling_of_what_the_model_builds():
    """The model reads "query, value," as query,value; the run's name and a resume compared the strings."""
    for key, plain, spelt in (("lora_targets", "query,value", " query, value,"),
                              ("adapter_targets", "text:ffn_out,attention_output", "text:ffn_out , attention_output")):
        cfg = Config(**PLAIN, method="lora" if key == "lora_targets" else "adapter", **{key: spelt})
        assert one_spelling(cfg.to_dict())[key] == plain
        other = Config(**{**cfg.to_dict(), key: plain})
        assert config_hash(cfg) == config_hash(other) and config_differences(cfg.to_dict(), other.to_dict()) == []


def test_a_default_encoder_spelt_with_a_slash_or_dot_is_the_repositorys_from_any_folder(tmp_path, monkeypatch):
    """From another working folder pretrained_models/bert-base-uncased is the checkout's; with the slash a shell's
    completion adds, or a leading ./, it was a folder under the working folder: another run, another cache."""
    monkeypatch.chdir(tmp_path)
    plain = Config(**PLAIN, text_model=DEFAULT_MODELS["text"])
    text = DEFAULT_MODELS["text"]
    for spelt in (text + "/", "./" + text, str(REPOSITORY / text)):
        cfg = Config(**PLAIN, text_model=spelt)
        assert config_hash(cfg) == config_hash(plain), spelt
        assert config_differences(plain.to_dict(), cfg.to_dict()) == []
    versa = versa_defaults("llama3-8b+vit-base", "Scientific", DEFAULT_MODELS["text"] + "/")
    assert versa["cache_dir"] == versa_defaults("llama3-8b+vit-base", "Scientific", DEFAULT_MODELS["text"])["cache_dir"]
    assert versa["cache_dir"].endswith("stored_vectors_sci")  # the symmetric pair reads IISAN's cache


def test_an_encoder_folder_not_here_or_under_home_is_one_setting_however_spelt(tmp_path, monkeypatch):
    """A cached run may name an encoder folder absent here (its states are in the cache): elsewhere/bert,
    elsewhere/bert/ and ./elsewhere/bert were three runs; ~/models/bert, found by the loader under $HOME, was
    another setting than the same folder spelt from the working folder."""
    home = tmp_path / "home"
    (home / "models" / "bert").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    absent = [Config(**PLAIN, text_model=spelt) for spelt in ("elsewhere/bert", "elsewhere/bert/", "./elsewhere/bert")]
    assert len({config_hash(cfg) for cfg in absent}) == 1
    here, under_home = Config(**PLAIN, text_model="models/bert"), Config(**PLAIN, text_model="~/models/bert")
    assert config_hash(here) == config_hash(under_home)
    assert config_differences(here.to_dict(), under_home.to_dict()) == []
    assert config_hash(Config(**PLAIN, text_model="google-bert/bert-base-uncased")) != config_hash(absent[0])


def test_auto_layers_undo_a_config_files_list(tmp_path):
    """A layer list in a --config file could not be given back to --layer-rule from the command line (no value
    meant 'not given'): --text-layers auto is what leaving the key out means."""
    from iisan.cli.main import build_parser
    from iisan.flags import config_from_args

    config = tmp_path / "layers.json"
    config.write_text('{"text_layers": [0, 2], "image_layers": [0, 4]}')
    parse = build_parser().parse_args
    base = ["train", "--config", str(config), *(a for k, v in PLAIN.items() for a in ("--" + k.replace("_", "-"), v))]
    listed = config_from_args(parse(base))
    assert (listed.text_layers, listed.image_layers) == ((0, 2), (0, 4))
    auto = config_from_args(parse([*base, "--text-layers", "auto", "--image-layers", "auto"]))
    assert (auto.text_layers, auto.image_layers) == (None, None)
    assert config_hash(auto) == config_hash(Config(**PLAIN))


def test_a_run_named_before_one_spelling_is_found_by_its_spelling_and_resumed(tmp_path):
    """A run saved as -0.0 or "query, value" before names hashed one spelling: the same command finds its
    folder (an earlier scheme), and its checkpoint's config, compared in one spelling, is this config's."""
    from iisan.train.runnames import HASHES, default_run_name, known_run_name

    cfg = Config(**PLAIN, out_dir=str(tmp_path), method="lora", lora_targets="query, value", drop_rate=-0.0)
    earlier = default_run_name(cfg, scheme="read")  # the name fe0d88d gave it
    assert earlier != default_run_name(cfg) and HASHES[3:5] == ("one-spelling", "read")
    (tmp_path / earlier).mkdir()
    assert known_run_name(cfg) == earlier
    saved = {**cfg.to_dict(), "lora_targets": "query, value"}
    assert config_differences(saved, Config(**{**cfg.to_dict(), "lora_targets": "query,value"}).to_dict()) == []


@pytest.mark.parametrize("spelt, earlier", [
    ("~/models/bert", "a49a7cc3"), ("elsewhere/bert/", "40d8dfe0"), ("./elsewhere/bert", "a09aaaea"),
    (DEFAULT_MODELS["text"] + "/", "97cd496c"), ("./" + DEFAULT_MODELS["text"], "091be948")])
def test_encoder_spellings_keep_the_names_runs_had_before_one_spelling(spelt, earlier, tmp_path, monkeypatch):
    """The hash fe0d88d named these runs by (computed by that commit's code, from a folder where none of these
    encoder folders is): the 'read' scheme still gives it, so their folders are found."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_hash(Config(**PLAIN, text_model=spelt), "read") == earlier


def test_an_encoding_spelt_otherwise_is_one_setting_and_runs_named_before_are_found(tmp_path):
    """latin-1, latin1 and ISO-8859-1 are one encoding: they named three runs of one computation, and a run saved
    with one was not resumed by another ('encoding differs'). The hash the runs saved before had (b6b659d's,
    computed by that commit's code) still finds them."""
    from iisan.train.runnames import HASHES, default_run_name, known_run_name

    names = [config_hash(Config(**PLAIN, encoding=spelt)) for spelt in ("latin-1", "latin1", "ISO-8859-1", "L1")]
    assert len(set(names)) == 1 and config_hash(Config(**PLAIN, encoding="UTF8")) == config_hash(Config(**PLAIN))
    assert one_spelling({"encoding": "Latin_1"}) == {"encoding": "iso8859-1"}
    assert one_spelling({"encoding": "latin1"}, encodings=False) == {"encoding": "latin1"}
    cfg = Config(**PLAIN, out_dir=str(tmp_path), encoding="latin-1")
    assert HASHES[2] == "encoding-names" and config_hash(cfg, "one-spelling") == "bc1375b6"  # b6b659d's hash
    (tmp_path / (before := default_run_name(cfg, scheme="one-spelling"))).mkdir()
    assert before != default_run_name(cfg) and known_run_name(cfg) == before
    assert config_differences({**cfg.to_dict(), "encoding": "latin1"}, cfg.to_dict()) == []
