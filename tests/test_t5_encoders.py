"""T5's encoder as a text tower (and flan-T5's, with a gated FFN): only the encoder is loaded from an
encoder-decoder checkpoint, titles pool the mean of their real tokens, the cache holds what runs live,
and the baselines find their targets, with the adapters' dropouts where T5 applies them."""

from __future__ import annotations

import logging

import pytest
import torch

from iisan.errors import TargetError
from iisan.model.backbones import architecture, load_text_encoder, read_spec
from iisan.model.peft_methods import apply_adapters, moved_dropouts, resolve_targets

from .conftest import BASELINES

TITLES = ["red lamp with a big shade", "blue chair", "green table small and round"]


def test_t5_loads_its_encoder_alone_and_pools_the_mean_of_real_tokens(towers, caplog):
    """A T5 checkpoint (encoder and decoder) gives ``T5EncoderModel``: no decoder weight is read or counted;
    each selected layer pools the mean over a title's real tokens (its ``</s>`` included, padding not), so
    more padding changes nothing; cls pooling, its first word's state, is warned about."""
    spec = read_spec(towers["t5_32x3"], "text")
    assert (spec.model_type, spec.depth, spec.width) == ("t5", 3, 32)
    enc = load_text_encoder(towers["t5_32x3"], (0, 1, 3))
    assert type(enc.model).__name__ == "T5EncoderModel" and enc.pooling == "mean"
    assert not [n for n, _ in enc.model.named_parameters() if "decoder" in n]
    with torch.device("meta"):
        counted = architecture(towers["t5_32x3"], "text")
    assert type(counted).__name__ == "T5EncoderModel"
    assert sum(p.numel() for p in counted.parameters()) == sum(p.numel() for p in enc.model.parameters())

    ids, mask = enc.title_inputs(TITLES, 12)
    assert ids[1, :3].tolist()[-1] == 1 and mask[1].tolist() == [1] * 3 + [0] * 9  # "blue chair </s>"
    with torch.no_grad():
        states = enc.layer_states(input_ids=ids, attention_mask=mask)
        hidden = enc.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        shorter = enc.layer_states(**dict(zip(("input_ids", "attention_mask"), enc.title_inputs(TITLES, 8))))
    for row in range(len(TITLES)):
        n = int(mask[row].sum())
        for j, layer in enumerate(enc.layers):
            torch.testing.assert_close(states[row, j], hidden[layer][row, :n].mean(0))
    torch.testing.assert_close(shorter, states, atol=1e-5, rtol=1e-5)
    with caplog.at_level(logging.WARNING, logger="iisan"):
        assert load_text_encoder(towers["t5_32x3"], (0, 3), pooling="cls").pooling == "cls"
    assert any("has no CLS token" in r.getMessage() for r in caplog.records)


def test_a_t5_tower_caches_what_it_runs_live(towers, tiny_config, tmp_path):
    from iisan.model.caching import build_cache_from_config

    from .conftest import cached_and_live_tables

    cfg = tiny_config(towers="text", modality="intra", text_model=towers["t5_32x3"], cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    cached, live, _ = cached_and_live_tables(cfg, torch.device("cpu"))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


def test_t5_adapters_take_the_dropout_that_ends_each_branch_not_the_one_inside_its_ffn(towers):
    """T5's FFN drops between ``wi`` and ``wo`` (``DenseReluDense.dropout``) and again as its branch ends
    (``layer.1.dropout``): the adapter after ``wo`` takes the second. In training, identity adapters then
    leave the model's output as it was, dropout masks included (moving the inner one would change it)."""
    from transformers import AutoModelForTextEncoding

    model = AutoModelForTextEncoding.from_pretrained(towers["t5_32x3"])
    model.config.dropout_rate = 0.3
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    names = resolve_targets(model, ["attention_output", "ffn_out"], flag="--adapter-targets")
    assert [n.split(".")[-1] for n in names[:2]] == ["o", "o"] and names[-1].endswith("DenseReluDense.wo")
    block = "encoder.block.{}.layer"
    assert moved_dropouts(model, names) == {
        **{f"{block.format(i)}.0.SelfAttention.o": f"{block.format(i)}.0.dropout" for i in range(3)},
        **{f"{block.format(i)}.1.DenseReluDense.wo": f"{block.format(i)}.1.dropout" for i in range(3)}}
    ids = torch.randint(3, 20, (2, 6))
    model.train()
    torch.manual_seed(0)
    before = model(input_ids=ids).last_hidden_state
    apply_adapters(model, 4, ["attention_output", "ffn_out"], init="identity")
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.dropout, torch.nn.Dropout)  # stays inside
    torch.manual_seed(0)
    after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before)
    after.sum().backward()


def test_a_gated_ffn_has_roles_but_no_one_ffn_input(towers):
    """flan-T5's FFN reads the width through two projections (gate and up): attention roles and the FFN
    output are found, asking for the FFN input is a one-line refusal naming its projections."""
    enc = load_text_encoder(towers["flan16x2"], (0, 2))
    named = resolve_targets(enc.model, ["query", "value", "attention_output", "ffn_out"], flag="--lora-targets")
    assert [n.split(".")[-1] for n in named] == ["q", "q", "v", "v", "o", "o", "wo", "wo"]
    with pytest.raises(TargetError, match=r"^ffn_in: the encoder's FFN is gated \(two input projections\), so it has "
                                          r"no one FFN input; name them \(.*: k, o, q, v, wi_0, wi_1, wo\)$"):
        resolve_targets(enc.model, ["ffn_in"], flag="--lora-targets")


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("tower", ["t5_32x3", "flan16x2"])
def test_every_baseline_trains_a_t5_tower(tiny_config, towers, tower, method, caplog):
    """Each baseline trains what it declares on T5 and flan-T5: FFT every encoder weight, Adapter and
    LoRA their own modules; BitFit finds no bias in T5 and says so."""
    from iisan.train.trainer import train

    cfg = tiny_config(method=method, towers="text", text_model=towers[tower], run_name=f"{tower}-{method}",
                      epochs=1, smoke=True)
    with caplog.at_level(logging.WARNING, logger="iisan"):
        results = train(cfg)
    assert results["status"] == "finished"
    by_rate = results["parameters"]["by_rate"]
    encoder = sum(p.numel() for p in load_text_encoder(towers[tower], (0, 2)).model.parameters())
    if method == "fft":
        assert by_rate == {"lr": by_rate["lr"], "lr_text": encoder}
    elif method == "bitfit":
        assert set(by_rate) == {"lr"} and any("bias" in r.getMessage() for r in caplog.records)
    else:
        assert set(by_rate) == {"lr", "lr_adapter_text"} and by_rate["lr_adapter_text"] > 0
