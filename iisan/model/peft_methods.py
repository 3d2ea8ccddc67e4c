"""The baselines' parameter-efficient methods, applied to a transformers encoder by *structure*.

Module names differ between architectures and library versions (BERT: ``attention.self.query``;
ViT in transformers 5: ``attention.q_proj``; older ViT: ``attention.attention.query``), so targets are
resolved by role: in every transformer block the Linear layers appear in the order query, key, value,
attention output (all width -> width), then FFN in (width -> inner) and FFN out (inner -> width).
A target that is not a role is matched as a module-name suffix; no match is an error listing the
Linear modules that exist.

- FFT: every weight trains (poolers excluded: their output is never read).
- Adapter: Houlsby bottleneck adapters (64, ReLU) on the attention-output and FFN-output projections
  of every block; both projections N(0, 0.01^2) as the authors' ``AdapterBlock`` (``init='authors'``),
  or an up projection of zeros, so each adapter starts as the identity (``init='identity'``).
- LoRA: peft's LoRA on query and value of every block, wrapping the pretrained weights (the authors'
  loralib code replaced them with random ones; we do not).
- BitFit: every bias trains.
"""

from __future__ import annotations

import peft
from torch import nn

from ..errors import TargetError

ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's block list: the ModuleList whose length is the config's depth."""
    depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise TargetError(f"{type(model).__name__}: no list of {depth} transformer blocks found")


def block_roles(block_name: str, block: nn.Module, width: int) -> dict[str, str]:
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    square = [n for n, m in linears if m.in_features == width and m.out_features == width]
    ffn_in = [n for n, m in linears if m.in_features == width and m.out_features != width]
    ffn_out = [n for n, m in linears if m.in_features != width and m.out_features == width]
    if len(square) != 4 or len(ffn_in) != 1 or len(ffn_out) != 1:
        names = ", ".join(f"{block_name}.{n}" for n, _ in linears)
        raise TargetError(f"cannot tell attention and FFN projections apart in {block_name} ({names})")
    names = square + ffn_in + ffn_out
    return {role: f"{block_name}.{name}" for role, name in zip(ROLES, names)}


def resolve_targets(model: nn.Module, targets: list[str], what: str = "encoder") -> list[str]:
    """Full module names for ``targets`` (roles or name suffixes) across all blocks."""
    width = model.config.hidden_size
    roles = [block_roles(name, block, width) for name, block in transformer_blocks(model)]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = []
    for target in targets:
        if target in ROLES:
            found += [r[target] for r in roles]
            continue
        matches = [n for n in linear_names if n == target or n.endswith("." + target)]
        if not matches:
            suffixes = sorted({n.split(".")[-1] for n in linear_names})
            raise TargetError(f"target {target!r} matches no module in the {what} "
                              f"({type(model).__name__}); roles: {', '.join(ROLES)}; Linear modules: "
                              f"{', '.join(suffixes)}")
        found += matches
    return found


def _get(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def freeze_poolers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "pooler":
            for p in module.parameters():
                p.requires_grad_(False)


def apply_fft(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_poolers(model)


def apply_bitfit(model: nn.Module) -> None:
    """Every bias trains: the ``bias`` parameter of each module (Linear, LayerNorm, ...), found on the
    modules, not by parameter name."""
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    for p in model.parameters():
        p.requires_grad_(id(p) in biases)
    freeze_poolers(model)


ADAPTER_INITS = ("authors", "identity")


class HoulsbyAdapter(nn.Module):
    """``y + up(relu(down(y)))`` on a projection's output (authors' ``AdapterBlock``). Biases start at 0,
    weights N(0, 0.01^2): both (``init='authors'``, near the identity), or down only with up at zero
    (``init='identity'``: exactly the identity at start, peft's habit)."""

    def __init__(self, width: int, bottleneck: int, init: str = "authors"):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"init must be one of {', '.join(ADAPTER_INITS)}, not {init!r}")
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down_proj.weight, std=0.01)
        nn.init.zeros_(self.down_proj.bias)
        if init == "authors":
            nn.init.normal_(self.up_proj.weight, std=0.01)
        else:
            nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, y):
        return y + self.up_proj(self.down_proj(y).relu())


class WithAdapter(nn.Module):
    """A frozen projection followed by an adapter. The authors put the adapter after the projection's
    dropout; here it sits before that dropout (identical in eval mode and for ViT, whose dropout is 0)."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, init: str = "authors"):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = HoulsbyAdapter(base_layer.out_features, bottleneck, init)

    def forward(self, x):
        return self.adapter(self.base_layer(x))


def apply_adapters(model: nn.Module, bottleneck: int, targets: list[str], what: str = "encoder",
                   init: str = "authors") -> list[nn.Module]:
    names = resolve_targets(model, targets, what)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for name in names:
        parent, child = _get(model, name)
        wrapped = WithAdapter(getattr(parent, child), bottleneck, init)
        setattr(parent, child, wrapped)
        adapters.append(wrapped.adapter)
    return adapters


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], what: str = "encoder") -> list[nn.Module]:
    """peft LoRA (B = 0 at start, so the identity) on the resolved targets; only A and B train."""
    names = resolve_targets(model, targets, what)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names)
    for p in model.parameters():
        p.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    factors = {id(p) for layer in lora_layers for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]}
    for p in model.parameters():  # A and B train; the base weights stay frozen whatever peft defaults to
        p.requires_grad_(id(p) in factors)
    return lora_layers


def injected_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters a method added to ``model`` (Houlsby adapters, LoRA layers and their
    frozen base layers), found by module type: the optimizer's adapter groups."""
    return {id(p) for m in model.modules() if isinstance(m, (HoulsbyAdapter, peft.tuners.lora.LoraLayer))
            for p in m.parameters()}
