"""The SASRec user encoder as in the authors' ``User_Encoder``: learned positions, post-LN blocks with
bias-free attention projections, causal attention that also ignores padded keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loss import MASK_VALUE


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # (B, H, L, D/H) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, D))  # (B, H, L, D/H) -> (B, L, D)


class Block(nn.Module):
    """Post-LN: ``a = LN(x + Drop(MHA(x)))``, ``out = LN(a + Drop(W2 relu(W1 a)))``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, bias)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class SASRec(nn.Module):
    def __init__(self, dim: int = 64, max_len: int = 10, blocks: int = 2, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.position = nn.Embedding(max_len, dim)
        self.input_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(blocks))
        for module in self.modules():  # authors: xavier_normal on Linear/Embedding, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """items (B, L, D) left-padded item embeddings, valid (B, L) bool -> (B, L, D) user states.

        Query q attends to key k iff k <= q and k is not padding. Padded queries (left of every real item)
        are allowed no key: every key gets ``MASK_VALUE``, so their softmax runs over all keys' raw scores,
        later real ones included (the authors' -1e9 makes it uniform). Their outputs are never read, and
        no real query sees the difference."""
        B, L, _ = items.shape
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        allowed = causal[None] & valid[:, None, :]  # (B, L, L)
        bias = torch.zeros(B, 1, L, L, device=items.device).masked_fill(~allowed[:, None], MASK_VALUE)
        x = self.dropout(self.input_norm(items + self.position.weight[:L]))
        for block in self.blocks:
            x = block(x, bias)
        return x
