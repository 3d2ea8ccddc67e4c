"""The verdicts of the IISAN-Versa GPU check (``experiments/versa_check.py``), without a GPU and without its
stages: ``checks`` on reports as its stages record them (the cache tolerance on either side of its bound, each
way a check fails, the CUDA-graph check on a CUDA device given as a plain ``torch.device``), and ``passed`` as
``versa_gpu_check`` writes it when a stage recorded a failure or raised (its stages replaced by stand-ins)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from iisan.experiments import versa_check
from iisan.experiments.versa_check import checks, versa_gpu_check
from iisan.files import json_text

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU is needed to take its branch
TOLERANCE = 0.05  # the bound the module states: per item, GPU (bf16 LLM, fp16 store) against fp32


def _passing() -> dict:
    """What the three stages of a run that passed record (the fields ``checks`` reads)."""
    return {"text_relative_error_max": 0.009, "image_relative_error_max": 0.004,
            "interrupted": "simulated interruption", "resumed_bytes_equal": True,
            "chunks": 5, "chunks_kept": 2, "chunks_encoded_on_resume": 3,
            "train_auto": {"losses": [5.2, 4.9], "step": {"compiled": "cudagraph"}},
            "train_off": {"losses": [5.2, 4.9], "step": {"compiled": "off"}}}


def test_a_passing_report_passes_every_check_and_a_cpu_has_no_cuda_graph_check():
    resume = {"interruption_simulated": True, "chunks_reused": True, "resumed_bytes_equal": True}
    assert checks(_passing(), CUDA) == {"caches_close": True, **resume, "losses_finite": True, "cuda_graph_step": True}
    assert checks(_passing(), CPU) == {"caches_close": True, **resume, "losses_finite": True}
    assert checks({}, CUDA) == {}  # no stage ran: nothing passed


@pytest.mark.parametrize("modality", ["text", "image"])
def test_a_cache_just_past_the_stated_tolerance_is_not_close(modality):
    """0.05 is the bound the check states (a simulation gave about 0.009): 0.051 in either tower fails it,
    0.049 in both passes; a bound loosened unnoticed (5.0) would pass a GPU cache 5 % off in every item."""
    report = {"text_relative_error_max": 0.0, "image_relative_error_max": 0.0}
    assert checks({**report, f"{modality}_relative_error_max": TOLERANCE * 1.02}, CPU) == {"caches_close": False}
    assert checks({**report, f"{modality}_relative_error_max": TOLERANCE * 0.98}, CPU) == {"caches_close": True}
    assert checks({**report, f"{modality}_relative_error_max": 0.5}, CPU) == {"caches_close": False}
    assert checks({**report, f"{modality}_relative_error_max": math.nan}, CPU) == {"caches_close": False}


@pytest.mark.parametrize("interrupted", [None, "CUDA error: an illegal memory access was encountered"])
def test_a_build_that_was_not_interrupted_by_the_simulation_fails_the_interruption_check(interrupted):
    """The resumed bytes equal the uninterrupted build's trivially when nothing interrupted the first build (no
    ``interrupted``) or something else did: the interruption check fails, whatever the bytes say."""
    report = {k: v for k, v in _passing().items() if k != "interrupted"}
    if interrupted is not None:
        report["interrupted"] = interrupted
    found = checks(report, CPU)
    assert found["interruption_simulated"] is False and found["resumed_bytes_equal"] is True


@pytest.mark.parametrize("counts", [{"chunks_kept": 0, "chunks_encoded_on_resume": 5},  # nothing kept
                                    {"chunks_kept": 2, "chunks_encoded_on_resume": 5},  # kept, encoded again
                                    {"chunks_kept": 2, "chunks_encoded_on_resume": None}])  # not counted
def test_a_resume_that_did_not_reuse_the_kept_chunks_fails_even_with_equal_bytes(counts):
    found = checks({**_passing(), **counts}, CPU)
    assert found["chunks_reused"] is False and found["resumed_bytes_equal"] is True


def test_resumed_bytes_that_differ_fail_their_check():
    found = checks({**_passing(), "resumed_bytes_equal": False}, CPU)
    assert found["resumed_bytes_equal"] is False and found["interruption_simulated"] is True


@pytest.mark.parametrize("run", ["train_auto", "train_off"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_loss_that_is_not_finite_in_either_run_fails_the_loss_check(run, bad):
    report = _passing()
    report[run] = {**report[run], "losses": [5.2, bad]}
    assert checks(report, CUDA)["losses_finite"] is False


@pytest.mark.parametrize("compiled", ["off", "eager", None])
def test_on_cuda_a_default_step_that_is_not_a_cuda_graph_fails(compiled):
    """A failed capture trains eagerly and would pass unseen: on a CUDA device the default run's step must be
    the CUDA graph. The device is a plain ``torch.device('cuda')``; ``checks`` reads its type only."""
    report = _passing()
    report["train_auto"] = {**report["train_auto"], "step": {} if compiled is None else {"compiled": compiled}}
    assert checks(report, CUDA)["cuda_graph_step"] is False
    assert "cuda_graph_step" not in checks(report, CPU)


def _run(tmp_path, monkeypatch, recorded: dict, error: BaseException | None = None, device: str = "cpu") -> dict:
    """``versa_gpu_check`` with stages that record ``recorded`` and then raise ``error`` (if any); on
    ``device='cuda'`` the device is resolved to a plain CUDA device object and named without a GPU."""
    def stages(report, out, work, dev, resolved, quick):
        report.update(json.loads(json.dumps(recorded)))
        if error is not None:
            raise error

    monkeypatch.setattr(versa_check, "stages", stages)
    if device == "cuda":
        monkeypatch.setattr(versa_check, "resolve_device", lambda name: CUDA)
        monkeypatch.setattr(versa_check.torch.cuda, "get_device_name", lambda device: "a stand-in GPU")
    if error is None:
        report = versa_gpu_check(tmp_path / "out", tmp_path / "work", device=device)
    else:
        with pytest.raises(type(error)):
            versa_gpu_check(tmp_path / "out", tmp_path / "work", device=device)
    written = json.loads((tmp_path / "out" / "versa_gpu.json").read_text())
    if error is None:
        assert written == json.loads(json_text(report))  # (a NaN loss written null)
    return written


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_report_that_passes_every_check_is_passed(tmp_path, monkeypatch, device):
    written = _run(tmp_path, monkeypatch, _passing(), device=device)
    assert written["passed"] is True and all(written["checks"].values()) and "error" not in written
    assert ("cuda_graph_step" in written["checks"]) == (device == "cuda")


@pytest.mark.parametrize(("change", "failed"), [
    ({"text_relative_error_max": 0.06}, "caches_close"),
    ({"interrupted": None}, "interruption_simulated"),
    ({"resumed_bytes_equal": False}, "resumed_bytes_equal"),
    ({"train_off": {"losses": [5.2, math.nan], "step": {"compiled": "off"}}}, "losses_finite"),
    ({"train_auto": {"losses": [5.2, 4.9], "step": {"compiled": "off"}}}, "cuda_graph_step"),
])
def test_one_failed_check_fails_the_run(tmp_path, monkeypatch, change, failed):
    """Each check failing alone (on a CUDA device, so that the CUDA-graph check is made) fails ``passed``."""
    recorded = {k: v for k, v in {**_passing(), **change}.items() if v is not None}
    written = _run(tmp_path, monkeypatch, recorded, device="cuda")
    assert [k for k, ok in written["checks"].items() if not ok] == [failed]
    assert written["passed"] is False and written["device"] == "a stand-in GPU"


def test_a_stage_that_raised_fails_the_run_whatever_the_stages_before_it_found(tmp_path, monkeypatch):
    """Training that raised (a non-finite loss stops it with an error) after the caches and the resume passed,
    and before the other run recorded anything: every check recorded holds, yet the run did not pass."""
    recorded = {k: v for k, v in _passing().items() if k != "train_auto"}
    written = _run(tmp_path, monkeypatch, recorded, RuntimeError("loss is nan at step 3"))
    assert written["checks"] and all(written["checks"].values())
    assert written["error"] == "RuntimeError: loss is nan at step 3" and written["passed"] is False


def test_a_stage_that_raised_before_recording_anything_is_not_passed(tmp_path, monkeypatch):
    written = _run(tmp_path, monkeypatch, {}, OSError("No space left on device"))
    assert written["checks"] == {} and written["passed"] is False
    assert written["error"] == "OSError: No space left on device"


# --- the Versa presets the check's pairs come from (experiments/presets.py) -----------------------------------


def _versa_config(argv):
    """The config ``Code_Cached/scripts/run_IISAN_Versa.py`` runs for ``argv`` (as tests/test_faithful.py)."""
    import importlib.util
    from pathlib import Path

    from iisan.experiments.sweep import parse_script_args

    path = Path(__file__).resolve().parents[1] / "Code_Cached" / "scripts" / "run_IISAN_Versa.py"
    spec = importlib.util.spec_from_file_location("run_IISAN_Versa_verdicts", path)
    versa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(versa)
    (point,), _ = parse_script_args(versa.defaults_for(argv), versa.SWEEP, argv, extra_arguments=versa.extra_arguments)
    return point.config


def test_the_microlens_preset_is_the_authors_run_iisan_micro():
    """The authors' run_IISAN_micro.py (their MicroLens run script): BERT-base + ViT-B, batch
    512, cv_down 512 (the image bottleneck), bert_down 64, 200 epochs, empty titles allowed; and their Versa
    draft's narrow SAN heads."""
    from pathlib import Path

    cfg = _versa_config(["--preset", "microlens", "--dataset", "MicroLens"])
    assert (cfg.batch_size, cfg.image_adapter_down, cfg.text_adapter_down, cfg.epochs) == (512, 512, 64, 200)
    assert cfg.allow_empty_titles is True and cfg.san_heads == "versa"
    assert (Path(cfg.text_model).name, Path(cfg.image_model).name) == ("bert-base-uncased", "vit-base-patch16-224")


PRESET_FOLDERS = {  # preset -> the folders under pretrained_models/ its name says (text, image)
    "llama3-70b+vit-base": ("Meta-Llama-3-70B", "vit-base-patch16-224"),
    "llama3-8b+vit-base": ("Meta-Llama-3-8B", "vit-base-patch16-224"),
    "bert-large+vit-base": ("bert-large-uncased", "vit-base-patch16-224"),
    "bert-base+vit-base": ("bert-base-uncased", "vit-base-patch16-224"),
    "microlens": ("bert-base-uncased", "vit-base-patch16-224"),  # the authors' MicroLens pair
}


def _squashed(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


@pytest.mark.parametrize("preset", sorted(PRESET_FOLDERS))
def test_every_presets_encoders_are_the_ones_its_name_says(preset):
    """A preset named text+image runs (and ``iisan fetch encoders`` fetches) the folders of those names: a
    bert-large preset reading bert-base-uncased would be IISAN filed as BERT-large, in a cache of its own."""
    from pathlib import Path

    from iisan.experiments.encoders import ENCODER_PRESETS, ENCODERS
    from iisan.experiments.presets import VERSA_PRESETS

    assert set(PRESET_FOLDERS) == set(VERSA_PRESETS)  # every preset of the table is named here
    cfg = _versa_config(["--preset", preset])
    folders = (Path(cfg.text_model).name, Path(cfg.image_model).name)
    assert folders == PRESET_FOLDERS[preset] == ENCODER_PRESETS[preset]
    assert all(folder in ENCODERS for folder in folders)  # `iisan fetch encoders` knows where each comes from
    if "+" in preset:  # the name itself: llama3-8b -> Meta-Llama-3-8B, bert-large -> bert-large-uncased
        for part, folder in zip(preset.split("+"), folders, strict=True):
            assert _squashed(part) in _squashed(folder), (part, folder)
