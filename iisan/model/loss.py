"""In-batch softmax cross-entropy with the log-popularity (logQ) correction (authors' ``ModelMM.forward``).

Every slot of the batch is a candidate column. Row (i, j) predicts slot j + 1 of user i. Masked
columns: padding slots, and every slot whose item appears anywhere in user i's own row, except the
row's true target column. The authors build that mask with Python loops over the batch; here it is
one broadcast comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_VALUE = -1e4  # the authors' loss value (SASRec's attention uses it too, where theirs used -1e9: sasrec.py);
# exp(-1e4) is 0 in every float type, and fp16-safe


def in_batch_softmax_loss(user_states: torch.Tensor, item_embs: torch.Tensor, ids: torch.Tensor,
                          log_pop: torch.Tensor) -> torch.Tensor:
    """user_states (B, L, D), item_embs (B, L+1, D), ids (B, L+1) with 0 = padding, log_pop (N+1,).

    Returns the mean cross-entropy over the valid positions (those whose input slot is an item)."""
    B, L, D = user_states.shape
    N = B * (L + 1)
    flat_ids = ids.reshape(N)
    logits = user_states.reshape(B * L, D) @ item_embs.reshape(N, D).T  # (B*L, N)
    logits = logits.float() - log_pop[flat_ids].float()[None, :]
    same_user = (ids[:, :, None] == flat_ids[None, None, :]).any(1)  # (B, N): item in user i's row
    masked = (same_user | (flat_ids == 0)[None, :])[:, None, :].expand(B, L, N).clone()  # (B, L, N)
    rows = torch.arange(B, device=ids.device)[:, None]
    target = rows * (L + 1) + torch.arange(1, L + 1, device=ids.device)[None, :]  # (B, L) column index
    masked.scatter_(2, target[:, :, None], False)
    logits = logits.masked_fill(masked.reshape(B * L, N), MASK_VALUE)
    valid = (ids[:, :-1] != 0).reshape(B * L).float()  # input slot is an item <=> its target is one too
    # Weighted mean instead of boolean indexing keeps shapes static (torch.compile, CUDA graphs).
    per_row = F.cross_entropy(logits, target.reshape(B * L), reduction="none")
    return (per_row * valid).sum() / valid.sum().clamp_min(1.0)
