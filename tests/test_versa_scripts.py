"""IISAN-Versa entry points: the run script's presets (the symmetric one is cached IISAN's config), a
tiny asymmetric run through the script, and ``iisan demo --versa``."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import pytest

from iisan.cli.main import main
from iisan.experiments.sweep import parse_script_args

SCRIPTS = Path(__file__).resolve().parents[1] / "Code_Cached" / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(versa, argv):
    points, args = parse_script_args(versa.defaults_for(argv), versa.SWEEP, argv,
                                     extra_arguments=versa.extra_arguments)
    return [p.config for p in points], args


def test_symmetric_preset_is_cached_iisans_config():
    versa, iisan = _script("run_IISAN_Versa"), _script("run_IISAN")
    argv = ["--preset", "bert-base+vit-base"]
    (a,), _ = _parse(versa, argv)
    (point,), _ = parse_script_args({"method": "iisan", "feed": "cached"}, iisan.SWEEP, [])  # what run_IISAN.py runs
    assert a.replace(run_name="") == point.config.replace(run_name="") and a.run_name == point.config.run_name
    argv = ["--preset", "llama3-70b+vit-base", "--dataset", "Instrument"]
    (c,), _ = _parse(versa, argv)
    assert c.text_layers == (0, 5, 20, 35, 50, 65, 80) and c.text_pooling == "authors"
    assert c.cache_dir.endswith("stored_vectors_ins_llama3-70b+vit-base") and "Instrument" in c.users


def test_run_script_builds_the_cache_and_trains_an_asymmetric_pair(tiny, towers, tmp_path, capsys):
    argv = ["--preset", "llama3-8b+vit-base", "--build-cache", "--cache-dtype", "float32",
            "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
            "--text-model", towers["qwen2_40x3"], "--image-model", towers["dinov2_32x5"], "--text-layers", "0,1,3",
            "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "runs"), "--epochs", "1",
            "--max-steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu", "--num-workers", "0",
            "--no-progress"]
    versa = _script("run_IISAN_Versa")
    without = [a for a in argv if a != "--build-cache"]
    with pytest.raises(SystemExit) as failed:  # no cache, not asked to build one: the flag that would is named
        versa.main(without)
    assert failed.value.code == 2 and not (tmp_path / "cache" / "text.safetensors").exists()
    assert f"{tmp_path / 'cache' / 'text.safetensors'} does not exist (build it with `iisan cache --cache-dir " \
           f"{tmp_path / 'cache'}` and the same data and encoder flags, or preprocess_vectors.py); --build-cache " \
           "builds it first" in capsys.readouterr().err
    (results,) = versa.main(argv)
    assert (tmp_path / "cache" / "text.safetensors").is_file()
    assert math.isfinite(results["epochs"][0]["loss"]) and results["config"]["text_pooling"] == "auto"
    assert versa.main(without)[0]["test"] == results["test"]  # the cache is there now: no flag needed


def test_build_cache_builds_only_the_missing_tower_and_nothing_for_a_finished_run(tiny, towers, tmp_path, caplog):
    """An LLM's cache may be the only copy of its states here: with the text cache built and its encoder gone,
    --build-cache encodes the image tower alone and trains; once the run finished, a rerun with the cache
    deleted builds nothing and returns the run's results."""
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(towers["qwen2_40x3"], llm)
    argv = ["--preset", "llama3-8b+vit-base", "--build-cache", "--cache-dtype", "float32",
            "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
            "--text-model", str(llm), "--image-model", towers["vit24x3"], "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "runs"), "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16",
            "--device", "cpu", "--num-workers", "0", "--no-progress"]
    versa = _script("run_IISAN_Versa")
    text_only = [*argv, "--towers", "text"]
    versa.main(text_only)
    text_cache = tmp_path / "cache" / "text.safetensors"
    built = text_cache.stat().st_mtime_ns
    shutil.rmtree(llm)
    caplog.clear()  # (the text build's lines: its log file took them at INFO)
    with caplog.at_level("INFO", logger="iisan"):
        (results,) = versa.main(argv)
    assert text_cache.stat().st_mtime_ns == built and (tmp_path / "cache" / "image.safetensors").is_file()
    assert "caching" in caplog.text and "(image)" in caplog.text and "(text" not in caplog.text
    for m in ("text", "image"):
        (tmp_path / "cache" / f"{m}.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="iisan"):
        (again,) = versa.main(argv)
    assert again["test"] == results["test"] and "caching" not in caplog.text
    assert not (tmp_path / "cache" / "text.safetensors").exists()


def test_build_cache_waits_for_another_process_building_the_same_cache(tiny, towers, tmp_path, monkeypatch,
                                                                       caplog):
    """A job array's tasks share one cache: a task that finds another one building it waits for that build
    and uses what it wrote (it had failed its grid point, training nothing), encoding nothing itself."""
    import shutil

    from iisan import locks
    from iisan.locks import OutputLock
    from iisan.model import caching

    argv = ["--preset", "llama3-8b+vit-base", "--build-cache", "--cache-dtype", "float32", "--towers", "text",
            "--users", tiny["users"], "--items", tiny["items"], "--text-model", towers["qwen2_40x3"],
            "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
            "--num-workers", "0", "--no-progress"]
    versa = _script("run_IISAN_Versa")
    # what the other task will have written (its run in a folder of its own: this run is not finished)
    versa.main([*argv, "--cache-dir", str(tmp_path / "built"), "--out-dir", str(tmp_path / "other-runs")])
    shared = tmp_path / "shared"
    other = OutputLock(shared / caching.LOCK, f"cache folder {shared}").acquire()  # the other task, building
    waits, sleep = [], locks.time.sleep

    def other_task_finishes(seconds):
        if seconds != locks.WAIT_SECONDS:  # someone else's short sleep
            return sleep(seconds)
        waits.append(seconds)
        shared.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "built" / "text.safetensors", shared / "text.safetensors")
        other.release()

    monkeypatch.setattr(locks.time, "sleep", other_task_finishes)
    monkeypatch.setattr(caching, "_build", lambda *args: pytest.fail("encoded a cache the other task built"))
    with caplog.at_level("INFO", logger="iisan"):
        (results,) = versa.main([*argv, "--cache-dir", str(shared), "--out-dir", str(tmp_path / "runs")])
    assert waits == [locks.WAIT_SECONDS] and results["status"] == "finished"
    assert caplog.text.count(f"cache folder {shared} is in use by pid {os.getpid()} on ") == 1
    assert "waiting for it to be free" in caplog.text and "built meanwhile by another process" in caplog.text


def test_the_microlens_preset_trains_on_microlens(capsys):
    """--preset microlens is the authors' run_IISAN_micro.py set-up: it trained Scientific with MicroLens's batch,
    bottleneck and epochs (and IISAN's Scientific cache) unless --dataset MicroLens was added by hand."""
    from iisan.data.datasets import dataset_paths

    versa = _script("run_IISAN_Versa")
    (cfg,), args = _parse(versa, versa.with_presets_dataset(["--preset", "microlens"]))
    paths = dataset_paths("MicroLens")
    assert args.dataset == "MicroLens" and (cfg.users, cfg.items, cfg.images, cfg.cache_dir) == \
        (paths["users"], paths["items"], paths["images"], paths["cache_dir"])
    assert (cfg.batch_size, cfg.image_adapter_down, cfg.epochs, cfg.san_heads) == (512, 512, 200, "versa")
    assert versa.with_presets_dataset(["--preset", "llama3-8b+vit-base"]) == ["--preset", "llama3-8b+vit-base"]
    versa.main(["--preset", "microlens", "--list-grid"])
    assert "iisan-cached-MicroLens-" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        versa.main(["--preset", "microlens", "--dataset", "Scientific", "--list-grid"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "\n" not in err
    assert err.endswith("error: --preset microlens is the authors' set-up for MicroLens (batch_size=512, "
                        "image_adapter_down=512, text_adapter_down=64, epochs=200, allow_empty_titles=True, "
                        "san_heads=versa); --dataset Scientific: leave --dataset out, or give such settings as flags "
                        "with another preset")


def test_a_sweep_over_encoders_is_refused_in_one_line(monkeypatch, capsys):
    """The preset's layers, pooling and cache folder are chosen for one encoder pair before the grid is made:
    a SWEEP over text models gave every point the preset's LLaMA layers and one shared cache."""
    versa = _script("run_IISAN_Versa")
    monkeypatch.setitem(versa.SWEEP, "text_model", ["models/a", "models/b"])
    with pytest.raises(SystemExit) as stopped:
        versa.main(["--preset", "llama3-8b+vit-base"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "run_IISAN_Versa.py: error: SWEEP lists text_model: each encoder pair takes its own layers, pooling and cache "
        "folder")
    monkeypatch.delitem(versa.SWEEP, "text_model")
    with pytest.raises(SystemExit):  # the flag's own advice does not lead there
        versa.main(["--preset", "llama3-8b+vit-base", "--text-model", "models/a", "models/b"])
    assert "not --text-model nor --image-model: run the script once per encoder" in capsys.readouterr().err


def test_another_text_model_than_the_presets_drops_its_layers_and_pooling(caplog):
    """The llama3-8b preset's layer list (0..32) fits LLaMA-3-8B only: with another text encoder (a
    28-layer Qwen2.5-7B) the layer rule picks its layers and the family its pooling (said); flags still win."""
    versa = _script("run_IISAN_Versa")
    own = versa.defaults_for(["--preset", "llama3-8b+vit-base"])
    assert own["text_layers"] == (0, 2, 8, 14, 20, 26, 32) and own["cache_dir"].endswith("_llama3-8b+vit-base")
    with caplog.at_level(logging.INFO, logger="iisan.experiments.presets"):
        other = versa.defaults_for(["--preset", "llama3-8b+vit-base", "--text-model", "models/Qwen2.5-7B"])
    assert caplog.messages == ["--text-model models/Qwen2.5-7B is not preset llama3-8b+vit-base's own text encoder: "
                               "its text_layers=(0, 2, 8, 14, 20, 26, 32) and text_pooling=authors give way to the "
                               "layer rule's and the family's pooling (--text-layers / --text-pooling set them)"]
    assert "text_layers" not in other and "text_pooling" not in other
    assert other["cache_dir"].endswith("stored_vectors_sci_Qwen2.5-7B")
    argv = ["--preset", "llama3-8b+vit-base", "--text-model", "models/Qwen2.5-7B", "--text-pooling", "last",
            "--text-layers", "0,14,28"]
    (cfg,), _ = _parse(versa, argv)
    assert (cfg.text_model, cfg.text_layers, cfg.text_pooling) == ("models/Qwen2.5-7B", (0, 14, 28), "last")
    (same,), _ = _parse(versa, ["--preset", "llama3-8b+vit-base", "--text-model", own["text_model"]])
    assert same.text_layers == own["text_layers"] and same.text_pooling == "authors"  # the preset's own model
    for spelt in (own["text_model"] + "/", os.path.relpath(own["text_model"])):  # the same folder, spelt otherwise
        assert {**versa.defaults_for(["--preset", "llama3-8b+vit-base", "--text-model", spelt]),
                "text_model": own["text_model"]} == own
        (again,), _ = _parse(versa, ["--preset", "llama3-8b+vit-base", "--text-model", spelt])
        assert (again.text_layers, again.text_pooling, again.cache_dir) == (same.text_layers, "authors", same.cache_dir)


@pytest.mark.parametrize(("choice", "layers"), [
    (["--layer-rule", "groups"], (0, 5, 11, 16, 21, 27, 32)), (["--config", "rule.json"], (0, 5, 11, 16, 21, 27, 32)),
    (["--layer-groups", "3"], (0, 2, 17, 32)), (["--layer-groups=3"], (0, 2, 17, 32)),
    (["--no-include-embedding-state", "--intra-start", "zeros"], (2, 8, 14, 20, 26, 32)),
    (["--no-include-embedding-state"], (0, 2, 8, 14, 20, 26, 32)),  # state 0 still seeds the chains
])
def test_a_layer_choice_reaches_the_presets_own_text_tower(choice, layers, tmp_path, monkeypatch):
    """The llama3-8b preset's list is what --layer-rule stride picks of 32 layers; an ablation of the rule
    (--layer-rule groups, --layer-groups, no embedding state) must change the layers read, not leave the
    list in place while the run is filed as another experiment. The preset's pooling stays."""
    from iisan.model.build import layers_for

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rule.json").write_text('{"layer_rule": "groups"}')
    versa = _script("run_IISAN_Versa")
    argv = ["--preset", "llama3-8b+vit-base", *choice]
    assert "text_layers" not in versa.defaults_for(argv)
    (cfg,), _ = _parse(versa, argv)
    assert (cfg.text_layers, cfg.text_pooling, layers_for(cfg, "text", 32)) == (None, "authors", layers)
    (plain,), _ = _parse(versa, ["--preset", "llama3-8b+vit-base", "--epochs", "3"])
    assert plain.text_layers == (0, 2, 8, 14, 20, 26, 32) == layers_for(plain.replace(text_layers=None), "text", 32)


def test_a_layer_choice_in_the_scripts_sweep_reaches_the_presets_text_tower(monkeypatch):
    """SWEEP = {"layer_groups": [3, 6]} is --layer-groups 3 6: each point's text layers are the rule's, not the
    preset's list left in place under a folder named for the groups."""
    from iisan.model.build import layers_for

    versa = _script("run_IISAN_Versa")
    monkeypatch.setattr(versa, "SWEEP", {"layer_groups": [3, 6], "seed": [12345]})
    swept, _ = _parse(versa, ["--preset", "llama3-8b+vit-base"])
    flagged, _ = _parse(versa, ["--preset", "llama3-8b+vit-base", "--layer-groups", "3", "6"])
    assert [c.text_layers for c in swept] == [None, None] and layers_for(swept[0], "text", 32) == (0, 2, 17, 32)
    assert swept == flagged  # the same configs and run folders as the flag's


def test_a_text_model_in_the_config_file_drops_the_presets_layers_too(tmp_path, capsys):
    versa = _script("run_IISAN_Versa")
    config = tmp_path / "qwen.json"
    config.write_text('{"text_model": "models/Qwen2.5-7B", "epochs": 3}')
    argv = ["--preset", "llama3-8b+vit-base", "--config", str(config)]
    assert "text_layers" not in versa.defaults_for(argv)
    (cfg,), _ = _parse(versa, argv)
    assert cfg.text_model == "models/Qwen2.5-7B" and cfg.text_pooling == "auto" and cfg.epochs == 3
    assert cfg.cache_dir.endswith("stored_vectors_sci_Qwen2.5-7B")
    (flag,), _ = _parse(versa, [*argv, "--text-model", "models/Other-LLM"])  # the flag wins over the file
    assert flag.text_model == "models/Other-LLM" and flag.cache_dir.endswith("stored_vectors_sci_Other-LLM")
    config.write_text('{"text_model": 7')  # not JSON: refused by the parse proper, in one line
    with pytest.raises(SystemExit) as stopped:
        versa.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()  # prog: error: ... (prog: sys.argv[0], pytest's under pytest)
    assert err.split(": error: ", 1)[1] == f"{config}: not valid JSON (Expecting ',' delimiter at line 1)"
    assert "\n" not in err


@pytest.mark.slow
def test_demo_versa_runs_an_asymmetric_pair_end_to_end(tmp_path, capsys):
    main(["demo", "--versa", "--out", str(tmp_path / "demo"), "--epochs", "1", "--users", "200",
          "--items", "80", "--no-progress"])  # exits 1 if it does not beat most-popular
    out = capsys.readouterr().out
    assert "text: llama 6 layers x 64, SAN reads states [0, 1, 2, 3, 4, 5, 6]" in out
    assert "image: vit 3 layers x 48, SAN reads states [0, 1, 2, 3]" in out
    assert "IISAN-Versa beats the most-popular baseline on test" in out
    assert (tmp_path / "demo" / "cache-versa" / "text.safetensors").is_file()


def test_another_image_model_caches_into_a_folder_of_its_own(tmp_path):
    """ViT-B/16's place taken by SigLIP (by flag or in the config file): its cache folder is not the ViT
    pair's, whose files a refusal would otherwise tell to rebuild with --overwrite."""
    versa = _script("run_IISAN_Versa")
    base = versa.defaults_for(["--preset", "bert-base+vit-base"])["cache_dir"]
    assert base.endswith("stored_vectors_sci")
    siglip = versa.defaults_for(["--preset", "bert-base+vit-base", "--image-model", "models/siglip-base"])
    assert siglip["cache_dir"] == base + "_siglip-base"
    both = versa.defaults_for(["--preset", "llama3-8b+vit-base", "--image-model", "models/siglip-base"])
    assert both["cache_dir"] == base + "_llama3-8b+vit-base_siglip-base"
    from iisan.experiments.presets import BACKBONES

    vit = versa.defaults_for(["--preset", "bert-base+vit-base", "--image-model", BACKBONES["image_model"] + "/"])
    assert vit["cache_dir"] == base  # the preset's own ViT, spelt otherwise
    config = tmp_path / "pair.json"
    config.write_text('{"text_model": "models/Qwen2.5-7B", "image_model": "models/dinov2-base"}')
    (cfg,), _ = _parse(versa, ["--preset", "bert-base+vit-base", "--config", str(config)])
    assert cfg.cache_dir == base + "_Qwen2.5-7B_dinov2-base" and cfg.image_model == "models/dinov2-base"


@pytest.mark.slow
def test_the_versa_gpu_check_runs_dry_on_a_cpu_says_what_passed_and_starts_afresh(tmp_path):
    """The check's CPU dry run (quick: one eager epoch): every check of a CPU holds, the report says so,
    and a second run in the same work folder builds and trains in a folder of its own (a rerun once
    found the first run's caches refused and its runs 'finished before', with their old timings)."""
    from iisan.experiments.versa_check import versa_gpu_check

    first = versa_gpu_check(tmp_path / "out", tmp_path / "work", device="cpu", quick=True)
    assert first["checks"] == {"caches_close": True, "interruption_simulated": True, "chunks_reused": True,
                               "resumed_bytes_equal": True, "losses_finite": True}
    assert first["passed"] and "error" not in first
    # the two chunks encoded before the third call's interruption, kept; the rest encoded on resuming
    assert first["chunks_kept"] == 2 and first["chunks_encoded_on_resume"] == first["chunks"] - 2 > 0
    assert first["cache_precision"]["gpu"]["text"] == {"encoder_dtype": "float32", "dtype": "float16"}
    assert first["train_off"]["step"]["compiled"] == "off"
    assert json.loads((tmp_path / "out" / "versa_gpu.json").read_text()) == json.loads(json.dumps(first))
    second = versa_gpu_check(tmp_path / "out", tmp_path / "work", device="cpu", quick=True)
    assert second["passed"] and second["folder"] != first["folder"]
    assert Path(second["folder"], "runs", "versa-off", "results.json").is_file()


def test_under_torchrun_build_cache_builds_nothing_and_rank_0s_look_decides(tmp_path, monkeypatch):
    """Under torchrun no rank builds a missing cache (each would, locking the others out) nor looks for a finished
    run on its own copy (before: a rank's own look, so one rank returned a finished run while another refused);
    train()'s look (rank 0's, for every rank) decides, and a missing cache is refused saying how to build it."""
    from iisan.config import Config
    from iisan.errors import CacheError
    from iisan.experiments import versa_run

    cfg = Config(cache_dir=str(tmp_path / "no-cache"), out_dir=str(tmp_path / "runs"))
    calls = []
    monkeypatch.setattr(versa_run, "launched", lambda: True)
    monkeypatch.setattr(versa_run, "build_missing", lambda c: calls.append("built"))
    monkeypatch.setattr(versa_run, "reusable_results", lambda c: calls.append("own look"))
    monkeypatch.setattr(versa_run, "train", lambda c: {"status": "finished", "run_dir": "runs/r"})  # rank 0's look
    assert versa_run.train_cached(cfg, build_cache=True) == {"status": "finished", "run_dir": "runs/r"}
    monkeypatch.setattr(versa_run, "train", lambda c: (_ for _ in ()).throw(CacheError(f"{c.cache_dir}: no cache")))
    with pytest.raises(CacheError, match=r"no cache; under torchrun --build-cache builds no cache: build it first "
                                         r"with this command without torchrun \(or `iisan cache`\), then launch$"):
        versa_run.train_cached(cfg, build_cache=True)
    assert calls == []
