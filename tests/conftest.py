"""Shared fixtures: a small synthetic data set, tiny random encoders saved with save_pretrained, the
image LMDB and fp32 caches, all built once per test session in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from iisan.config import Config
from iisan.data.image_build import build_image_lmdb
from iisan.data.interactions import read_items
from iisan.data.synthetic import generate
from iisan.methods import METHOD_TABLE
from iisan.model.backbones import read_spec
from iisan.model.layer_rules import group_layers
from iisan.model.tiny import vocabulary, write_bert, write_vit

# The PEFT baselines (a method added to METHOD_TABLE joins every test that takes them all)
BASELINES = tuple(name for name, method in METHOD_TABLE.items() if method.kind == "baseline")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon"
CHECKOUT_RUNS = Path(__file__).resolve().parents[1] / "runs"  # the default --out-dir, run from the checkout
CHECKOUT_REPRODUCE = CHECKOUT_RUNS.parent / "results" / "reproduce"  # scripts/reproduce.py's default --out


def _entries(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


@pytest.fixture(autouse=True, scope="session")
def _no_run_folders_in_the_checkout():
    """Tests write under their tmp_path: a run folder that lands in the checkout's runs/ (a train without
    --out-dir / out_dir, run from the repository root), or a reproduction's table or log in results/reproduce/,
    fails the session instead of piling up unseen."""
    before = {folder: _entries(folder) for folder in (CHECKOUT_RUNS, CHECKOUT_REPRODUCE)}
    yield
    for folder, was in before.items():
        if new := sorted(_entries(folder) - was):
            pytest.fail(f"this test session created {len(new)} entr{'y' if len(new) == 1 else 'ies'} in {folder}: "
                        f"{', '.join(new[:10])}{' ...' if len(new) > 10 else ''}; some test trains or reproduces "
                        "without an output folder under its tmp_path (pass --out-dir / out_dir or --out; a run "
                        "folder's train.log names the test's tmp folders)", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Tiny ops: one thread is as fast and immune to contention. Session scope, so that it is set before
    # any module-scoped fixture trains: a reference run made with another thread count differs from
    # later runs in the last bits (test_resume compares them exactly).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_heard():
    """The suite started as a script's background job (``make test &``) inherits SIGINT ignored, which Python and
    a run keep ignored (robust_runs.md): the tests that send themselves Ctrl-C would then see nothing happen.
    Python's own handler for the session, as in a terminal; tests that ignore it set SIG_IGN themselves."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture()
def stop_signals_as_in_a_terminal():
    """SIGHUP and SIGTERM at their defaults for one test that sends them: a suite started under nohup (SIGHUP
    ignored) or after `trap '' TERM` inherits them ignored, which a run keeps (robust_runs.md), and keeps them
    ignored between such tests, so that a closed terminal still leaves a nohup suite running."""
    import signal

    ignored = [stop for stop in (signal.SIGHUP, signal.SIGTERM) if signal.getsignal(stop) is signal.SIG_IGN]
    for stop in ignored:
        signal.signal(stop, signal.SIG_DFL)
    yield
    for stop in ignored:
        signal.signal(stop, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def _library_logging_put_back():
    """A command run in this process (``main([...])``) sets the libraries' loggers to WARNING and takes
    huggingface_hub's own handler (``setup_logging``): put back after each test, as a fresh process has them,
    so that no test's records depend on which ran before it. (The root logger's handlers are pytest's.)"""
    import logging

    from huggingface_hub.utils import logging as hub_logging  # noqa: F401 (its import adds the handler kept here)

    from iisan.console import NOISY

    loggers = [logging.getLogger(name) for name in NOISY]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers], logging.getLogger().level
    yield
    for logger, level, handlers in saved[0]:
        logger.setLevel(level)
        logger.handlers[:] = handlers
    logging.getLogger().setLevel(saved[1])


@pytest.fixture(autouse=True)
def _said_once_per_test(monkeypatch):
    """What a process says once (a key a run never reads; an image store of another size than its tower) is
    said once per test, as in a fresh process: no test's warning depends on which tests ran before it."""
    from iisan import once

    monkeypatch.setattr(once, "_SAID", {})


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a small data set (images, LMDB) and tiny BERT/ViT checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    paths = generate(root, num_users=160, num_items=60, num_topics=6, seed=1, image_size=64)
    items = read_items(paths["items"])
    text = write_bert(root / "bert", vocabulary(items.titles), hidden=32, layers=2, heads=2, seed=1)
    image = write_vit(root / "vit", hidden=24, layers=3, heads=2, image_size=32, patch_size=8, seed=1)
    lmdb_path = root / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb_path, items.ids, size=64, progress=False)
    return {"root": root, "users": str(paths["users"]), "items": str(paths["items"]),
            "images": str(lmdb_path), "image_dir": str(paths["images"]), "text_model": str(text),
            "image_model": str(image)}


@pytest.fixture(scope="session")
def tiny_cache(tiny, tmp_path_factory) -> str:
    """An fp32 cache of the tiny data set (both towers), built once per session; read it, never write."""
    from iisan.model.caching import build_cache_from_config

    path = tmp_path_factory.mktemp("tiny-cache")
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                 cache_dir=str(path), device="cpu", num_workers=0, progress=False)
    build_cache_from_config(cfg, dtype="float32")
    return str(path)


@pytest.fixture()
def tiny_config(tiny, tmp_path):
    """A Config on the tiny data; callers override fields with ``.replace``."""

    def make(**overrides) -> Config:
        values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
        values.update(cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"), run_name="t",
                      device="cpu", num_workers=0, progress=False, batch_size=16, epochs=2,
                      encode_batch_size=32, eval_batch_size=64)
        values.update(overrides)
        return Config(**values)

    return make


def six_groups(name: str, modality: str) -> tuple[int, ...]:
    """Layers to load ``name``'s tower with: hidden state 0 and the last layer of each of six groups
    (``group_layers(depth, 6)``; every state of a tower up to six layers deep)."""
    return group_layers(read_spec(name, modality).depth, 6)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"shared data {path} is absent")
    return path


@pytest.fixture(scope="session")
def towers(tiny, tmp_path_factory) -> dict:
    """IISAN-Versa: tiny random encoders of several families, widths and depths (name -> folder).
    Text: BERT, and decoder LLMs with BPE tokenizers (GPT-2 without a pad token, as shipped)."""
    from iisan.model.tiny import write_decoder, write_image_tower, write_t5

    root = tmp_path_factory.mktemp("towers")
    titles = read_items(tiny["items"]).titles
    out = {"bert32x2": tiny["text_model"], "vit24x3": tiny["image_model"]}
    out["bert16x2"] = str(write_bert(root / "bert16x2", vocabulary(titles), hidden=16, layers=2, heads=2,
                                     seed=2))
    for name, family, hidden, layers in [("llama48x6", "llama", 48, 6), ("qwen2_40x3", "qwen2", 40, 3),
                                         ("gpt2_24x4", "gpt2", 24, 4)]:
        out[name] = str(write_decoder(root / name, family, titles, hidden=hidden, layers=layers, heads=2,
                                      seed=3))
    for name, family, hidden, layers in [("deit40x4", "deit", 40, 4), ("dinov2_32x5", "dinov2", 32, 5),
                                         ("dinoreg16x2", "dinov2_with_registers", 16, 2), ("clip24x3", "clip", 24, 3),
                                         ("siglip24x3", "siglip", 24, 3)]:
        out[name] = str(write_image_tower(root / name, family, hidden=hidden, layers=layers, image_size=32,
                                          patch_size=8, seed=4))
    out["t5_32x3"] = str(write_t5(root / "t5_32x3", vocabulary(titles), hidden=32, layers=3, heads=2, seed=5))
    out["flan16x2"] = str(write_t5(root / "flan16x2", vocabulary(titles), hidden=16, layers=2, heads=2, gated=True,
                                   seed=6))
    return out


def cached_and_live_tables(cfg: Config, device: torch.device):
    """Item tables of the same model fed from the cache and from the live encoders, and the cached
    model: both built from one seed, the live one given the cached one's trainable weights."""
    from iisan.data.run_data import load_data
    from iisan.evaluate import item_table
    from iisan.model.build import build_model

    data = load_data(cfg)
    torch.manual_seed(0)
    cached, _ = build_model(cfg, data, device)
    live, pixels = build_model(cfg.replace(feed="live"), data, device)
    live.load_state_dict(cached.state_dict(), strict=False)
    return (item_table(cached, data.num_items, 16, None, device), item_table(live, data.num_items, 16, pixels, device),
            cached)
