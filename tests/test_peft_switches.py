"""The switches that reproduce the authors' baselines where we differ: ``--lora-random-base`` (their loralib
layers: random frozen Q/V weights, trainable Q/V biases), ``--adapter-position`` (a Houlsby adapter after or
before its branch's dropout) and ``--text-encoder-dropout`` (per-slot dropout masks, so no dedup). Each test
fails when its switch is dropped on the way from the config to the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from iisan.config import Config, choices
from iisan.data.batches import ItemBatch
from iisan.data.run_data import load_data
from iisan.errors import TargetError
from iisan.model.backbones import load_image_encoder, load_text_encoder
from iisan.model.build import build_model
from iisan.model.peft_methods import ADAPTER_INITS, ADAPTER_POSITIONS, WithAdapter, apply_adapters, transformer_blocks
from iisan.precedence import resolve
from iisan.train.optim import make_optimizer, optimizer_groups
from iisan.train.plan import batch_layout
from iisan.train.step import make_train_step
from iisan.train.weights import load_weights, save_weights

from ._batches import first_epoch

RATES = ("batch_size", "lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")
CPU = torch.device("cpu")


def resolved(tiny_config, **changes) -> Config:
    """The tiny config as the command line resolves it: the method's paper rates and batch size apply."""
    values = {k: v for k, v in tiny_config(**changes).to_dict().items() if k not in RATES}
    return resolve(flags=values)


# --- LoRA: --lora-random-base ---------------------------------------------------------------------------


def lora_bases(model) -> dict[str, dict[str, nn.Linear]]:
    """{modality: {module name in the checkpoint: the Linear LoRA wraps}}."""
    out = {}
    for m, encoder in model.item_encoder.encoders.items():
        out[m] = {
            name: module.get_base_layer()
            for name, module in encoder.model.named_modules()
            if hasattr(module, "lora_A") and isinstance(module.get_base_layer(), nn.Linear)
        }
    return out


@pytest.mark.parametrize("random_base", [False, True])
def test_lora_random_base_replaces_query_and_value_and_trains_their_biases(random_base, tiny_config, tiny):
    cfg = resolved(tiny_config, method="lora", lora_random_base=random_base)
    assert cfg.lora_random_base is random_base and cfg.batch_size == 32
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, CPU)
    pretrained = {
        "text": dict(load_text_encoder(tiny["text_model"], (0, 1, 2)).model.named_modules()),
        "image": dict(load_image_encoder(tiny["image_model"], (0, 1, 2, 3)).model.named_modules()),
    }
    groups = optimizer_groups(model, cfg)
    group_of = {id(p): g for g in groups for p in g["params"]}
    bases = lora_bases(model)
    for m, layers in bases.items():
        assert len(layers) == 2 * model.item_encoder.encoders[m].depth  # query and value of every block
        for name, base in layers.items():
            original = pretrained[m][name]
            assert not base.weight.requires_grad
            assert torch.equal(base.weight, original.weight) is not random_base, (m, name)
            assert base.bias.requires_grad is random_base
            if random_base:  # the authors' groups and rates: ViT biases 1e-4, BERT biases 5e-5
                group = group_of[id(base.bias)]
                assert group["name"] == ("image_net" if m == "image" else "text_encoder")
                assert group["lr"] == (1e-4 if m == "image" else 5e-5)
    for name, p in model.named_parameters():  # A and B stay in the adapter groups at 4e-4
        if ".lora_A." in name or ".lora_B." in name:
            assert group_of[id(p)]["name"].startswith("adapter_") and group_of[id(p)]["lr"] == 4e-4
    # a training step moves the biases (with the switch) and never a Q/V weight
    before = {(m, n): (b.weight.detach().clone(), b.bias.detach().clone()) for m in bases for n, b in bases[m].items()}
    step = make_train_step(model, make_optimizer(model, cfg, CPU), None, CPU)
    model.train()
    step(next(iter(first_epoch(data.train_sequences(), 0, pixels=pixels))))
    for (m, n), (weight, bias) in before.items():
        assert torch.equal(bases[m][n].weight, weight)
        assert torch.equal(bases[m][n].bias, bias) is not random_base, (m, n)


def test_lora_random_base_is_drawn_from_the_seed_alone(tiny_config, tmp_path):
    cfg = tiny_config(method="lora", lora_random_base=True)
    data = load_data(cfg)

    def build(config, global_seed):
        torch.manual_seed(global_seed)
        return build_model(config, data, CPU)[0]

    def weights(model):
        return {(m, n): b.weight for m, layers in lora_bases(model).items() for n, b in layers.items()}

    first, again, other_seed = build(cfg, 0), build(cfg, 1), build(cfg.replace(seed=7), 0)
    for key, weight in weights(first).items():  # the run's seed decides them, not the global stream
        assert torch.equal(weight, weights(again)[key])
        assert not torch.equal(weight, weights(other_seed)[key])
    # the global stream is untouched: everything else starts as without the switch
    plain = dict(build(cfg.replace(lora_random_base=False), 0).named_parameters())
    for name, p in first.named_parameters():
        if not name.startswith("item_encoder.encoders."):
            assert torch.equal(p, plain[name]), name
    # the checkpoint holds what trains; a rebuilt model redraws the frozen weights and gives the same items
    first.item_encoder.heads["text"].bias.data.add_(0.5)  # something trained
    save_weights(first, tmp_path / "w.safetensors", cfg)
    rebuilt = build(cfg, 3)
    load_weights(rebuilt, tmp_path / "w.safetensors")
    first.eval()
    rebuilt.eval()
    ids = torch.tensor([1, 2, 3])
    pixels = build_model(cfg, data, CPU)[1]
    items = ItemBatch(ids, pixels(ids.numpy()))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.item_encoder(items), first.item_encoder(items))


# --- Houlsby adapters: --adapter-position ---------------------------------------------------------------


def tiny_encoder(arch: str) -> nn.Module:
    """A transformers 5 BERT or ViT with residual dropout 0.1 (attention dropout 0: no other random draw)."""
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "bert":
        return BertModel(BertConfig(vocab_size=50, **common), add_pooling_layer=False)
    return ViTModel(ViTConfig(image_size=16, patch_size=8, **common), add_pooling_layer=False)


def hand_written_block(
    arch: str,
    layer: nn.Module,
    x: torch.Tensor,
    branch_inputs: list[torch.Tensor],
    wrappers: list[WithAdapter],
    position: str,
) -> torch.Tensor:
    """The block from its definition. ``branch_inputs``: what reached each wrapped projection (the
    attention context, the FFN's inner activations); every random draw is the branch dropout's."""

    def branch(i: int) -> torch.Tensor:
        dense, adapter = wrappers[i].base_layer, wrappers[i].adapter
        y = dense(branch_inputs[i])
        if position == "after_dropout":
            return adapter(F.dropout(y, 0.1, training=True))  # the authors': adapter(dropout(dense h))
        return F.dropout(adapter(y), 0.1, training=True)

    if arch == "bert":  # post-LN: LN(x + branch)
        h = layer.attention.output.LayerNorm(x + branch(0))
        return layer.output.LayerNorm(h + branch(1))
    h = x + branch(0)  # ViT, pre-LN: the LayerNorms sit inside the branches, before the projections
    return h + branch(1)


@pytest.mark.parametrize("position", ["after_dropout", "before_dropout"])
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_adapter_position_gives_the_hand_written_block_in_train_mode(arch, position):
    torch.manual_seed(0)
    model = tiny_encoder(arch)
    adapters = apply_adapters(model, 8, ["attention_output", "ffn_out"], position=position)
    for adapter in adapters:  # large enough that the two placements differ visibly
        for linear in (adapter.down_proj, adapter.up_proj):
            nn.init.normal_(linear.weight, std=0.3)
    model.train()
    _, layer = transformer_blocks(model)[0]
    wrappers = [m for m in layer.modules() if isinstance(m, WithAdapter)]
    assert len(wrappers) == 2
    branch_inputs = []
    hooks = [w.register_forward_pre_hook(lambda _, args: branch_inputs.append(args[0])) for w in wrappers]
    x = torch.randn(3, 5, 32)
    torch.manual_seed(1)
    out = layer(x)
    for hook in hooks:
        hook.remove()
    torch.manual_seed(1)
    with torch.no_grad():
        expected = hand_written_block(arch, layer, x, branch_inputs, wrappers, position)
        other = "before_dropout" if position == "after_dropout" else "after_dropout"
        torch.manual_seed(1)
        swapped = hand_written_block(arch, layer, x, branch_inputs, wrappers, other)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, swapped, atol=1e-3)  # the formulas are told apart


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_adapter_positions_agree_in_eval_mode_and_train_the_same_parameters(arch):
    outputs, counts = [], []
    for position in ("after_dropout", "before_dropout"):
        torch.manual_seed(0)
        model = tiny_encoder(arch)
        apply_adapters(model, 8, ["attention_output", "ffn_out"], position=position)
        model.eval()
        x = torch.randn(2, 5, 32)
        outputs.append(transformer_blocks(model)[0][1](x))
        counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(*outputs)
    assert counts[0] == counts[1]


def test_after_dropout_refuses_to_take_a_shared_dropout_from_a_branch_without_an_adapter():
    with pytest.raises(TargetError, match=r"^image encoder: layers\.0\.dropout follows .*needs adapters on all of"):
        apply_adapters(tiny_encoder("vit"), 8, ["ffn_out"], "image encoder")  # ViT: one dropout, two branches
    apply_adapters(tiny_encoder("vit"), 8, ["ffn_out"], position="before_dropout")
    apply_adapters(tiny_encoder("bert"), 8, ["ffn_out"])  # BERT: a dropout per branch


def test_a_shared_dropout_of_zero_is_left_in_place_for_either_position():
    """ViT-B/16 drops nothing: before and after its shared dropout are one place, so one branch's adapter is
    taken at the default position (it was refused), and computes what --adapter-position before_dropout does."""
    outputs = []
    for position in ("after_dropout", "before_dropout"):
        torch.manual_seed(0)
        model = tiny_encoder("vit")
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        torch.manual_seed(1)
        apply_adapters(model, 8, ["ffn_out"], position=position)
        assert all(isinstance(m, nn.Dropout) for m in transformer_blocks(model)[0][1].modules()
                   if isinstance(m, (nn.Dropout, nn.Identity)))  # none moved
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
        outputs.append(transformer_blocks(model)[0][1](x))
    torch.testing.assert_close(*outputs)


@pytest.mark.parametrize("position", ["after_dropout", "before_dropout"])
def test_adapter_position_reaches_the_built_model(position, tiny_config):
    cfg = tiny_config(method="adapter", adapter_position=position)
    model, _ = build_model(cfg, load_data(cfg), CPU)
    text = model.item_encoder.encoders["text"].model  # tiny BERT: a dropout in every branch
    wrappers = [m for m in text.modules() if isinstance(m, WithAdapter)]
    assert len(wrappers) == 2 * model.item_encoder.encoders["text"].depth
    for block_name, block in transformer_blocks(text):
        branch_dropouts = [block.attention.output.dropout, block.output.dropout]
        if position == "after_dropout":  # moved into the wrappers, before the adapters
            assert all(isinstance(d, nn.Identity) for d in branch_dropouts), block_name
        else:
            assert all(isinstance(d, nn.Dropout) for d in branch_dropouts), block_name
    assert all((w.dropout is not None) is (position == "after_dropout") for w in wrappers)
    assert Config.adapter_position == "after_dropout"  # the authors' placement is the default


# --- --text-encoder-dropout: per-slot masks -------------------------------------------------------------


def test_dropout_in_an_encoder_gives_each_slot_its_own_row(tiny_config, tiny_cache):
    """--dedup-items auto encodes each slot that holds an item once where a training step runs dropout
    inside an encoder (IISAN's frozen BERT under --text-encoder-dropout, a baseline's trained BERT): a
    repeated item gets a mask per slot, as in the authors' code; elsewhere each distinct item once; a
    compiled step every slot; a value given is taken as given."""
    cfg = tiny_config(feed="live", text_encoder_dropout=True)
    model, _ = build_model(cfg, load_data(cfg), CPU)
    model.eval()
    assert batch_layout(cfg, "off", model)[0] == "slots"
    assert not model.training and not model.item_encoder.states.encoders["text"].training  # left as it was
    frozen = tiny_config(feed="live")
    assert batch_layout(frozen, "off", build_model(frozen, load_data(frozen), CPU)[0])[0] == "items"
    assert batch_layout(cfg.replace(dedup_items="on"), "off", model)[0] == "items"  # as given
    assert batch_layout(cfg.replace(dedup_items="off"), "off", model)[0] == "all"
    assert batch_layout(cfg, "inductor", model)[0] == "all"
    fft = tiny_config(method="fft")
    assert batch_layout(fft, "off", build_model(fft, load_data(fft), CPU)[0])[0] == "slots"  # BERT's dropout 0.1
    image_only = tiny_config(method="fft", towers="image")  # the tiny ViT has no dropout
    vit = build_model(image_only, load_data(image_only), CPU)[0]
    assert batch_layout(image_only, "off", vit)[0] == "items"
    # a ViT whose attention drops out (config attention_probs_dropout_prob > 0): a float its attention hands
    # to a functional dropout, no Dropout module, and still a mask per slot
    attentions = [m for m in vit.modules() if type(getattr(m, "attention_dropout", None)) is float]
    assert attentions
    for attention in attentions:
        attention.attention_dropout = 0.1
    assert batch_layout(image_only, "off", vit)[0] == "slots"
    cached = tiny_config(cache_dir=tiny_cache)
    assert batch_layout(cached, "off", build_model(cached, load_data(cached), CPU)[0])[0] == "items"


def test_adapter_switches_take_their_config_fields_choices_and_refuse_another():
    assert ADAPTER_INITS == choices("adapter_init") == ("authors", "identity")
    assert ADAPTER_POSITIONS == choices("adapter_position") == ("after_dropout", "before_dropout")
    with pytest.raises(ValueError) as info:
        WithAdapter(nn.Linear(8, 8), 4, init="zeros")
    assert str(info.value) == "init must be one of authors, identity, not 'zeros'"
    with pytest.raises(ValueError) as info:
        apply_adapters(nn.Linear(8, 8), 4, ["ffn_out"], position="inside")
    assert str(info.value) == "position must be one of after_dropout, before_dropout, not 'inside'"
