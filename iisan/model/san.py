"""The side adapter network (SAN): IISAN's trainable item tower over frozen backbone states.

Reads bottom-up: the block, the intra-modal chain, the inter-modal chain, then the item tower.
Each modality has its own width and its own list of layers, so the same code serves IISAN (equal
towers) and IISAN-Versa (any pair: the inter SAN runs at the smaller width, with a learned linear map
per step for the wider modality, and the longer chain runs its extra leading blocks alone). With equal
widths and depths there are no maps and no extra blocks: Versa reduces exactly to IISAN.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import choices
from .item_encoder import MODALITIES, LrGroup, init_image_head


class SideAdapterBlock(nn.Module):
    """``x + up(relu(down(x)))`` (authors' ``AdapterBlock``), initialised near the identity.

    Weights ~ N(0, 0.01^2), biases 0. The authors' block builds a dropout it never applies; we leave
    it out (same function, same parameter count)."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        for linear in (self.down_proj, self.up_proj):
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up_proj(torch.relu(self.down_proj(x)))


FUSIONS = ("gated", "add")  # what the chains below implement; --fusion offers the same (a test holds the two)


def gate_logits(fusion: str, blocks: int) -> nn.Parameter | None:
    """A chain's gate parameters, theta = 0 (None for 'add'). A fusion no chain implements is refused, for the
    intra and the inter SANs both: a new one needs their ``forward`` too, not only a --fusion choice."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r} is not implemented by the SAN chains ({', '.join(FUSIONS)}): a new one "
                         "needs IntraSAN.forward, InterSAN.forward and SANItemTower.param_groups")
    return nn.Parameter(torch.zeros(blocks)) if fusion == "gated" else None


def gate_values(logits: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    """``g_k = sigmoid(theta_k / T)`` per block (None: fusion 'add', no gates)."""
    return None if logits is None else torch.sigmoid(logits / temperature)


class IntraSAN(nn.Module):
    """One modality's chain: ``s = block_k(g_k * h_k + (1 - g_k) * s)``, ``g_k = sigmoid(theta_k / T)``,
    theta = 0 and s = 0 at start (paper Eq. 2-3). ``fusion='add'``: ``s = block_k(h_k + s)``.

    ``seeded``: the first state is not read through a block but starts the chain (``s = h_0``), as the
    authors' ``remove_first == "TRUE"`` branch does with the embedding output; ``steps`` states then
    feed ``steps - 1`` blocks."""

    def __init__(self, width: int, steps: int, bottleneck: int, fusion: str = "gated", temperature: float = 0.1,
                 seeded: bool = False):
        super().__init__()
        self.seeded, self.steps = seeded, steps
        blocks = steps - seeded
        self.blocks = nn.ModuleList(SideAdapterBlock(width, bottleneck) for _ in range(blocks))
        self.gate_logits = gate_logits(fusion, blocks)
        self.temperature = temperature
        self.width = width

    def gates(self) -> torch.Tensor | None:
        return gate_values(self.gate_logits, self.temperature)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states (n, steps, width) -> (n, width)."""
        if states.shape[1] != self.steps:  # more were read as the first ``steps``: another model, silently
            raise ValueError(f"an intra SAN of {self.steps} states got {states.shape[1]} (states (n, steps, width))")
        s = states[:, 0] if self.seeded else states.new_zeros(states.shape[0], self.width)
        gates = self.gates()
        for k, block in enumerate(self.blocks):
            h = states[:, k + self.seeded]
            # lerp(s, h, g) = g * h + (1 - g) * s, in one kernel forward and backward
            s = block(h + s if gates is None else torch.lerp(s, h, gates[k]))
        return s


class InterSAN(nn.Module):
    """The inter-modal chain: ``s = block_k(s + g_k * img_k + (1 - g_k) * txt_k)`` (paper Eq. 4).

    Its inputs are the backbones' own states of each modality, never what the intra chains made of them, at
    the smaller width; a wider modality's state passes through a per-step ``Linear(wide -> narrow)`` first
    (Versa's dimension transformation layer). Pairs of states are aligned at the end of both layer lists: when
    one modality feeds more blocks, its extra leading states run only through its own intra SAN. The
    intra chains never read the inter chain, so no further ordering is needed."""

    def __init__(self, text_width: int, image_width: int, steps: int, bottleneck: int, fusion: str = "gated",
                 temperature: float = 0.1):
        super().__init__()
        self.width = min(text_width, image_width)
        self.blocks = nn.ModuleList(SideAdapterBlock(self.width, bottleneck) for _ in range(steps))
        self.gate_logits = gate_logits(fusion, steps)
        self.temperature = temperature

        def align(width):
            if width == self.width:
                return None
            return nn.ModuleList(nn.Linear(width, self.width) for _ in range(steps))

        self.text_align = align(text_width)
        self.image_align = align(image_width)

    def gates(self) -> torch.Tensor | None:
        return gate_values(self.gate_logits, self.temperature)

    def forward(self, text_states: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """text (n, kt, dt), image (n, ki, di) -> (n, width); uses the last ``steps`` states of each."""
        steps = len(self.blocks)
        text_states, image_states = text_states[:, -steps:], image_states[:, -steps:]
        s = text_states.new_zeros(text_states.shape[0], self.width)
        gates = self.gates()
        for k in range(steps):
            txt, img = text_states[:, k], image_states[:, k]
            if self.text_align is not None:
                txt = self.text_align[k](txt)
            if self.image_align is not None:
                img = self.image_align[k](img)
            if gates is None:
                mixed = img + txt
            else:  # g * img + (1 - g) * txt; lerp does not promote, and under autocast an align's output is half
                common = torch.promote_types(txt.dtype, img.dtype)
                mixed = torch.lerp(txt.to(common), img.to(common), gates[k].to(common))
            s = self.blocks[k](s + mixed)
        return s


class Head(nn.Sequential):
    """width -> hidden -> out, no activation. IISAN: hidden = width (``fc_*`` 768->768, then the reused
    768->64 layer). Versa draft: hidden = out (``fc_*`` width->64, then ``*_pre_fc`` 64->64), which keeps
    an 8192-wide LLM's head at 0.5 M parameters instead of 67 M."""

    def __init__(self, width: int, out: int, hidden: int | None = None):
        hidden = width if hidden is None else hidden
        super().__init__(nn.Linear(width, hidden), nn.Linear(hidden, out))


HEADS = choices("san_heads")


def head_style(widths: dict[str, int], heads: str = "auto") -> str:
    """'auto': IISAN's heads when both towers have the same width (so an equal pair is exactly IISAN) or one
    tower is used (IISAN's one-tower ablations), the Versa draft's narrow heads otherwise."""
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {', '.join(HEADS)}, not {heads!r}")
    if heads != "auto":
        return heads
    return "iisan" if len(set(widths.values())) == 1 else "versa"


class SANItemTower(nn.Module):
    """Item embeddings from per-layer backbone states: ``{'text': (n, kt, dt), 'image': (n, ki, di)}``
    -> (n, embedding_dim).

    ``modality``: 'intra_inter' (both intra SANs and the inter SAN, com_dense 192->64), 'intra'
    (intra SANs only, 128->64; crashes in the authors' code) or 'inter' (64->64). With one tower
    ('text' or 'image') only that intra SAN is built (64->64). ``heads``: see ``head_style``; the inter
    head is width->width->64 in both designs. ``seeded``: each modality's first state starts its intra
    chain instead of feeding a block (authors' ``remove_first``); the inter chain, which starts from
    zeros either way, then reads one state fewer.

    Built on its own (without a Config): ``bottleneck`` names every modality of ``widths`` (None: 64 each),
    and the states come in the tower's dtype (fp32 as built; a half cache is converted by ``CachedStates``).
    """

    def __init__(self, widths: dict[str, int], steps: dict[str, int], embedding_dim: int = 64,
                 bottleneck: dict[str, int] | None = None, modality: str = "intra_inter", fusion: str = "gated",
                 temperature: float = 0.1, heads: str = "auto", seeded: bool = False):
        super().__init__()
        # a misspelt setting built another model without a word (fusion='gate' was add; widths {'txt': ...}
        # an image-only tower): checked here too, for a tower built without a Config
        for name, value, known in (("modality", modality, choices("modality")), ("fusion", fusion, choices("fusion"))):
            if value not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, not {value!r}")
        if not widths or set(widths) - set(MODALITIES) or set(widths) - set(steps):
            raise ValueError(f"widths {widths} and steps {steps}: expected keys among {', '.join(MODALITIES)}, the "
                             "same in both")
        self.head_style = head_style(widths, heads)
        head_hidden = embedding_dim if self.head_style == "versa" else None
        bottleneck = bottleneck or {m: 64 for m in widths}
        if missing := sorted(set(widths) - set(bottleneck)):
            raise ValueError(f"bottleneck {bottleneck}: expected one for {', '.join(missing)} too (a key per tower)")
        self.modalities = tuple(m for m in MODALITIES if m in widths)
        self.use_intra = modality in ("intra", "intra_inter") or len(self.modalities) == 1
        self.use_inter = modality in ("inter", "intra_inter") and len(self.modalities) == 2
        self.intra = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        if self.use_intra:
            for m in self.modalities:
                self.intra[m] = IntraSAN(widths[m], steps[m], bottleneck[m], fusion, temperature, seeded)
                self.heads[m] = Head(widths[m], embedding_dim, head_hidden)
        self.inter = None
        if self.use_inter:
            shared = min(steps["text"], steps["image"]) - seeded
            # Versa: the inter adapters take the narrower side's bottleneck setting (authors' draft).
            narrow = "text" if widths["text"] <= widths["image"] else "image"
            self.inter = InterSAN(widths["text"], widths["image"], shared, bottleneck[narrow], fusion, temperature)
            self.heads["inter"] = Head(self.inter.width, embedding_dim)
        branches = len(self.intra) + (self.inter is not None)
        self.combine = nn.Linear(branches * embedding_dim, embedding_dim)  # the authors' com_dense
        # The Versa draft's image head ends in a fresh Linear (cv_pre_fc) with torch's default init.
        if "image" in self.heads and self.head_style == "iisan":
            init_image_head(self.heads["image"][1])

    def forward(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for m, san in self.intra.items():
            parts.append(self.heads[m](san(states[m])))  # (n, D)
        if self.inter is not None:
            parts.append(self.heads["inter"](self.inter(states["text"], states["image"])))
        return self.combine(torch.cat(parts, dim=-1))  # (n, branches * D) -> (n, D)

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        """The authors' learning-rate groups (their substring rules in ``run.py``, made explicit):

        recsys: text/image/inter output layers, fc_mm, com_dense, text and inter gates (and Versa maps);
        image_net: fc_cv and the image gates; text_encoder: fc_bert; adapter_image: image and inter
        blocks; adapter_text: text blocks."""
        groups: dict[LrGroup, list[nn.Parameter]] = {k: [] for k in LrGroup}
        groups[LrGroup.RECSYS] += list(self.combine.parameters())
        for m, san in self.intra.items():
            head_in, head_out = self.heads[m]
            groups[LrGroup.RECSYS] += list(head_out.parameters())
            groups[LrGroup.backbone(m)] += list(head_in.parameters())
            if san.gate_logits is not None:
                groups[LrGroup.IMAGE if m == "image" else LrGroup.RECSYS].append(san.gate_logits)
            groups[LrGroup.adapter(m)] += list(san.blocks.parameters())
        if self.inter is not None:
            groups[LrGroup.RECSYS] += list(self.heads["inter"].parameters())
            if self.inter.gate_logits is not None:
                groups[LrGroup.RECSYS].append(self.inter.gate_logits)
            for align in (self.inter.text_align, self.inter.image_align):
                if align is not None:
                    groups[LrGroup.RECSYS] += list(align.parameters())
            groups[LrGroup.ADAPTER_IMAGE] += list(self.inter.blocks.parameters())
        return groups
