"""The baselines' parameter-efficient methods, applied to a transformers encoder by *structure*.

Module names differ between architectures and library versions (BERT: ``attention.self.query``;
ViT in transformers 5: ``attention.q_proj``; older ViT: ``attention.attention.query``), so targets are
resolved by role: in every transformer block the Linear layers appear in the order query, key, value,
attention output (all width -> width), then FFN in (width -> inner; a gated FFN has two, and no one
``ffn_in`` role) and FFN out (inner -> width).
A target that is not a role is matched as a module-name suffix; no match is an error listing the
Linear modules that exist.

- FFT: every weight trains (poolers excluded: their output is never read).
- Adapter: Houlsby bottleneck adapters (64, ReLU) on the attention-output and FFN-output projections
  of every block; both projections N(0, 0.01^2) as the authors' ``AdapterBlock`` (``init='authors'``),
  or an up projection of zeros, so each adapter starts as the identity (``init='identity'``). Each sits
  after the dropout of its residual branch, as the authors' (``position='after_dropout'``), or before it.
- LoRA: peft's LoRA on query and value of every block, wrapping the pretrained weights. The authors'
  loralib layers replaced them with fresh random ones whose biases trained (a bug); ``random_base``
  reproduces that.
- BitFit: every bias trains.
"""

from __future__ import annotations

import peft
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import choices
from ..errors import TargetError
from .backbones import depth_and_width

ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
# The names transformers gives the query, key and value projections (BERT, ViT; CLIP, LLaMA; DistilBERT; T5).
QKV_NAMES = {"query": ("query", "q_proj", "q_lin", "q"), "key": ("key", "k_proj", "k_lin", "k"),
             "value": ("value", "v_proj", "v_lin", "v")}
# What a target can be: a Linear, or GPT-2's Conv1D (a Linear whose weight is stored transposed).
PROJECTIONS = (nn.Linear, Conv1D)


def features(projection: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a Conv1D."""
    if isinstance(projection, Conv1D):
        return projection.weight.shape[0], projection.nf
    return projection.in_features, projection.out_features


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's block list: the ModuleList whose length is the config's depth (``depth_and_width``)."""
    depth, _ = depth_and_width(model.config)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise TargetError(f"{type(model).__name__}: no list of {depth} transformer blocks found")


def block_roles(block_name: str, block: nn.Module, width: int) -> dict[str, str]:
    """{role: module name} of a block of four width x width projections and one FFN pair, or a gated FFN
    (two input projections, gate and up: flan-T5, LLaMA-2), which has no one ``ffn_in``. Other shapes
    (grouped-query attention, GPT-2's fused query-key-value) are an error naming the block's projections."""
    shapes = [(n, features(m)) for n, m in block.named_modules() if isinstance(m, PROJECTIONS)]
    square = [n for n, (i, o) in shapes if i == width and o == width]
    ffn_in = [n for n, (i, o) in shapes if i == width and o != width]
    ffn_out = [n for n, (i, o) in shapes if i != width and o == width]
    if len(square) != 4 or len(ffn_in) not in (1, 2) or len(ffn_out) != 1:
        names = ", ".join(f"{block_name}.{n}" for n, _ in shapes)
        raise TargetError(f"cannot tell attention and FFN projections apart in {block_name} ({names})")
    names = attention_order(square) + (ffn_in if len(ffn_in) == 1 else [""]) + ffn_out
    return {role: f"{block_name}.{name}" for role, name in zip(ROLES, names) if name}


def attention_order(square: list[str]) -> list[str]:
    """A block's four square projections as query, key, value, output: by their names where each of the
    first three has one (CLIP registers k_proj, v_proj, q_proj, out_proj), else as registered (q, k, v,
    output: every BERT and ViT)."""
    picked = [[n for n in square if n.split(".")[-1] in QKV_NAMES[role]] for role in ("query", "key", "value")]
    if any(len(names) != 1 for names in picked):
        return square
    qkv = [names[0] for names in picked]
    return qkv + [n for n in square if n not in qkv]


def resolve_targets(model: nn.Module, targets: list[str], what: str = "encoder", *, flag: str) -> list[str]:
    """Full module names for ``targets`` (roles or name suffixes) across all blocks. Roles are found only
    when one is asked for: name suffixes reach towers whose blocks have no BERT/ViT shape (``q_proj`` in a
    grouped-query LLaMA block). ``flag``: the option a refusal names."""
    width = model.config.hidden_size
    roles = None
    projections = [n for n, m in model.named_modules() if isinstance(m, PROJECTIONS)]
    found = []
    suffixes = sorted({n.split(".")[-1] for n in projections})
    by_name = f"{flag} with some of its Linear/Conv1D modules: {', '.join(suffixes)}"  # what a refusal offers
    for target in targets:
        matches = [n for n in projections if n == target or n.endswith("." + target)]
        if target in ROLES:
            try:
                roles = roles or [block_roles(name, block, width) for name, block in transformer_blocks(model)]
            except TargetError as err:
                if matches:  # no roles here, but modules of that name (ALBERT's shared ``query``, ``value``)
                    found += matches
                    continue
                raise TargetError(f"{err}; target the {what}'s modules by name instead of by role ({by_name}; "
                                  "text:/image: prefixes for one tower)") from None
            if not all(target in r for r in roles):
                raise TargetError(f"{target}: the {what}'s FFN is gated (two input projections), so it has no one "
                                  f"FFN input; name them ({by_name})")
            found += [r[target] for r in roles]
            continue
        if not matches:
            raise TargetError(f"target {target!r} matches no module in the {what} "
                              f"({type(model).__name__}); roles: {', '.join(ROLES)}; Linear/Conv1D modules: "
                              f"{', '.join(suffixes)}")
        found += matches
    return list(dict.fromkeys(found))  # targets that overlap (output.dense, attention_output) name a module once


def _get(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def freeze_poolers(model: nn.Module) -> None:
    """Poolers (BERT's; nothing reads their output) stay frozen, as does a masked-image-modelling
    ``mask_token`` (DINOv2's: used only when patches are masked, which no step does); transformers names
    every one so."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "pooler":
            for p in module.parameters():
                p.requires_grad_(False)
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "mask_token":
            p.requires_grad_(False)


def apply_fft(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_poolers(model)


def apply_bitfit(model: nn.Module) -> None:
    """Every bias trains: the ``bias`` parameter of each module (Linear, LayerNorm, ...), found on the
    modules, and a bias a module keeps under a name of its own (DeBERTa's ``q_bias`` and ``v_bias``,
    beside a fused projection that has none)."""
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    biases |= {id(p) for name, p in model.named_parameters() if name.rpartition(".")[2].endswith("_bias")}
    for p in model.parameters():
        p.requires_grad_(id(p) in biases)
    freeze_poolers(model)


ADAPTER_INITS = choices("adapter_init")


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


ADAPTER_POSITIONS = choices("adapter_position")
OUTPUT_ROLES = ("attention_output", "ffn_out")  # the projections that end a residual branch


class WithAdapter(nn.Module):
    """A frozen projection followed by an adapter. ``dropout``: the residual branch's dropout, moved in
    here so that the adapter reads its output, as the authors' ``BertAdaptedSelfOutput`` and
    ``VITAdapted*``: ``LN(x + adapter(dropout(dense h)))``. Without it the block's dropout stays in place
    and follows the adapter: ``LN(x + dropout(adapter(dense h)))``. The two agree in eval mode and
    wherever the dropout is 0 (ViT-B/16)."""

    def __init__(self, base_layer: nn.Module, bottleneck: int, init: str = "authors",
                 dropout: nn.Dropout | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.dropout = dropout
        self.adapter = HoulsbyAdapter(features(base_layer)[1], bottleneck, init)

    @property
    def weight(self) -> torch.Tensor:  # read by the model around it (T5 casts its FFN input to wo's dtype)
        return self.base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)
        if self.dropout is not None:
            y = self.dropout(y)
        return self.adapter(y)


def branch_dropout(model: nn.Module, block_name: str, name: str, query: str) -> str | None:
    """The name of the Dropout the block applies to projection ``name``'s output before the residual
    add: a Dropout child of the projection's parent, else of the nearest ancestor up to the block. BERT
    and transformers 4 ViT: ``output.dropout`` beside ``output.dense``; transformers 5 ViT: the layer's
    one ``dropout``, which serves both branches. None where a block has none (CLIP, LLaMA; DistilBERT's
    attention). A Dropout beside the ``query`` projection drops attention probabilities, not a branch's
    output (DistilBERT's ``attention.dropout`` beside ``q_lin`` and ``out_lin``): passed over. One beside
    the FFN's input projection may act inside the FFN (T5's ``DenseReluDense.dropout``, between ``wi`` and
    ``wo``): taken only when no ancestor up to the block has one (DistilBERT's ``ffn.dropout``, after
    ``lin2``; T5's ``layer.1.dropout`` ends its branch)."""
    parent_name, probabilities = name.rpartition(".")[0], query.rpartition(".")[0]
    width, inner = model.config.hidden_size, None
    while True:
        parent = model.get_submodule(parent_name)
        found = [n for n, m in parent.named_children() if isinstance(m, nn.Dropout) and parent_name != probabilities]
        if len(found) > 1:
            raise TargetError(f"cannot tell which dropout follows {name}: {parent_name} has "
                              f"{', '.join(found)}; use --adapter-position before_dropout")
        ffn_in = any(isinstance(m, PROJECTIONS) and features(m)[0] == width != features(m)[1]
                     for m in parent.children())
        if found and ffn_in and inner is None:
            inner = f"{parent_name}.{found[0]}"
        elif found:
            return f"{parent_name}.{found[0]}"
        if parent_name == block_name:
            return inner
        parent_name = parent_name.rpartition(".")[0]


def moved_dropouts(model: nn.Module, names: list[str], what: str = "encoder") -> dict[str, str]:
    """{target: the dropout to move into its wrapper} for the targets that end a residual branch (other
    targets have no dropout between them and the adapter). A dropout that also serves a branch without
    an adapter cannot move (that branch would lose it): an error, unless it drops nothing (p = 0, as in
    ViT-B/16), where before and after it are one place."""
    width = model.config.hidden_size
    served: dict[str, list[str]] = {}
    try:
        blocks = transformer_blocks(model)
    except TargetError as err:  # ALBERT's one shared layer
        raise TargetError(f"{err}; --adapter-position after_dropout needs them to find each branch's dropout: "
                          "use --adapter-position before_dropout") from None
    for block_name, block in blocks:
        if not any(isinstance(m, nn.Dropout) for m in block.modules()):
            continue  # nothing to move (CLIP, LLaMA), whatever the block's shape
        try:
            roles = block_roles(block_name, block, width)
        except TargetError as err:
            raise TargetError(f"{err}; --adapter-position after_dropout needs them to find each branch's dropout: "
                              "use --adapter-position before_dropout") from None
        for role in OUTPUT_ROLES:
            dropout = branch_dropout(model, block_name, roles[role], roles["query"])
            if dropout is not None:
                served.setdefault(dropout, []).append(roles[role])
    moved = {}
    for dropout, branches in served.items():
        if any(b in names for b in branches):
            if not all(b in names for b in branches):
                if model.get_submodule(dropout).p == 0:
                    continue  # left where it is: the adapters before it compute what they would after it
                raise TargetError(f"{what}: {dropout} follows {' and '.join(branches)}: --adapter-position "
                                  "after_dropout needs adapters on all of them (or use --adapter-position "
                                  "before_dropout)")
            moved.update(dict.fromkeys(branches, dropout))
    return moved


def apply_adapters(model: nn.Module, bottleneck: int, targets: list[str], what: str = "encoder",
                   init: str = "authors", position: str = "after_dropout") -> list[nn.Module]:
    if position not in ADAPTER_POSITIONS:
        raise ValueError(f"position must be one of {', '.join(ADAPTER_POSITIONS)}, not {position!r}")
    names = resolve_targets(model, targets, what, flag="--adapter-targets")
    for p in model.parameters():
        p.requires_grad_(False)
    moved = moved_dropouts(model, names, what) if position == "after_dropout" else {}
    dropouts = {name: model.get_submodule(name) for name in set(moved.values())}
    adapters = []
    for name in names:
        parent, child = _get(model, name)
        dropout = dropouts[moved[name]] if name in moved else None
        wrapped = WithAdapter(getattr(parent, child), bottleneck, init, dropout)
        setattr(parent, child, wrapped)
        adapters.append(wrapped.adapter)
    for name in dropouts:  # now inside the wrappers, before the adapters
        parent, child = _get(model, name)
        setattr(parent, child, nn.Identity())
    return adapters


def fresh_linears(model: nn.Module, names: list[str], seed: int) -> None:
    """Replace each of ``names`` by a new Linear of its shape with nn.Linear's default initialisation,
    drawn from ``seed`` (a rebuilt model gets the same weights; its checkpoint holds only what trains)
    without touching the global random stream (the rest of the model starts as without them). This is
    what the authors' ``lora.Linear(768, 768, r)`` did to the pretrained query and value layers."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for name in names:
            parent, child = _get(model, name)
            old = getattr(parent, child)
            if not isinstance(old, nn.Linear):
                raise TargetError(f"lora_random_base replaces Linear layers, as the authors' loralib did; {name} "
                                  f"is a {type(old).__name__}")
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                            device="meta" if old.weight.is_meta else "cpu")
            setattr(parent, child, new.to(old.weight.device, old.weight.dtype))


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], what: str = "encoder",
               random_base: bool = False, seed: int = 0) -> list[nn.Module]:
    """peft LoRA (B = 0 at start, so the identity) on the resolved targets; only A and B train.
    ``random_base``: the authors' loralib layers instead. Each target is first replaced by a fresh random
    Linear (``fresh_linears``), whose weight stays frozen and whose bias trains."""
    names = resolve_targets(model, targets, what, flag="--lora-targets")
    if random_base:
        fresh_linears(model, names, seed)
    conv1d = any(isinstance(model.get_submodule(name), Conv1D) for name in names)  # GPT-2: weights transposed
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names,
                             fan_in_fan_out=conv1d)
    for p in model.parameters():
        p.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    trains = {id(p) for layer in lora_layers for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]}
    if random_base:  # loralib froze only the weight
        trains |= {id(layer.get_base_layer().bias) for layer in lora_layers if layer.get_base_layer().bias is not None}
    for p in model.parameters():  # A and B train; the base weights stay frozen whatever peft defaults to
        p.requires_grad_(id(p) in trains)
    return lora_layers


def added_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules`` that a method added (what ``apply_adapters`` / ``apply_lora`` return):
    a Houlsby adapter's all, a LoRA layer's less the backbone layer it wraps (``get_base_layer``), whose
    bias under ``random_base`` trains in the image/text group, as the authors'."""
    added = []
    for module in modules:
        base = {id(p) for p in module.get_base_layer().parameters()} if hasattr(module, "get_base_layer") else set()
        added += [p for p in module.parameters() if id(p) not in base]
    return added
