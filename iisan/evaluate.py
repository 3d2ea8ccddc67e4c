"""Full-ranking evaluation (authors' ``metrics.py``, vectorised): every item is a candidate, the
user's history is masked, the target's rank is ``1 + #(score > target score)``.

A target that repeats a history item is masked with the history, so it always counts as a miss (the
paper's protocol, 4-6 % of users); ``rank_repeated_targets=True`` keeps such targets rankable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (5, 10, 20)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """ranks (U,) 1-based (inf = never ranked) -> ``hit@K`` and ``ndcg@K`` averaged over users."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hit@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks.clamp(max=1e9) + 1), 0.0).mean().item()
    return out


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor,
                 rank_repeated_targets: bool = False) -> torch.Tensor:
    """scores (U, N+1) over item indices (column 0 = padding), targets (U,), history (U, H) with 0 =
    padding -> 1-based ranks (U,) as float; a masked target gets rank inf (a miss at every K).
    ``scores`` is overwritten (masked in place: one pass less over the largest array of evaluation)."""
    scores = scores.float()
    target_score = scores.gather(1, targets[:, None])  # (U, 1)
    scores.scatter_(1, history, -math.inf)
    if rank_repeated_targets:
        scores.scatter_(1, targets[:, None], target_score)  # the target keeps its own score
    else:
        target_score = scores.gather(1, targets[:, None])  # -inf when the target repeats the history
    scores[:, 0] = -math.inf
    ranks = 1.0 + (scores > target_score).sum(1).float()
    return torch.where(torch.isinf(target_score.squeeze(1)), torch.full_like(ranks, math.inf), ranks)


def score_ranks(score_fn, targets: np.ndarray, history: np.ndarray, batch_users: int = 1024,
                rank_repeated_targets: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """``score_fn(slice) -> (u, N+1)`` scores for those users -> (U,) ranks, computed chunk by chunk."""
    ranks = []
    for start in range(0, len(targets), batch_users):
        sl = slice(start, start + batch_users)
        ranks.append(rank_targets(score_fn(sl), torch.as_tensor(targets[sl], device=device),
                                  torch.as_tensor(history[sl], device=device), rank_repeated_targets).cpu())
    return torch.cat(ranks) if ranks else torch.empty(0)


def evaluate_scores(score_fn, targets: np.ndarray, history: np.ndarray, batch_users: int = 1024,
                    rank_repeated_targets: bool = False, device: torch.device | str = "cpu",
                    ks: tuple[int, ...] = KS) -> dict[str, float]:
    ranks = score_ranks(score_fn, targets, history, batch_users, rank_repeated_targets, device)
    return metrics_from_ranks(ranks, ks)


@torch.no_grad()
def split_ranks(user_vectors, table: torch.Tensor, inputs: np.ndarray, targets: np.ndarray,
                history: np.ndarray, batch_users: int = 1024,
                rank_repeated_targets: bool = False) -> torch.Tensor:
    """(U,) ranks of the targets. ``user_vectors(table, inputs (u, L)) -> (u, D)``; ``table`` (N+1, D)."""
    table = table.float()

    def scores(sl):
        users = user_vectors(table, torch.as_tensor(inputs[sl], device=table.device))  # (u, D)
        return users.float() @ table.T  # (u, N+1)

    return score_ranks(scores, targets, history, batch_users, rank_repeated_targets, table.device)


@torch.no_grad()
def evaluate_split(user_vectors, table: torch.Tensor, inputs: np.ndarray, targets: np.ndarray,
                   history: np.ndarray, batch_users: int = 1024, rank_repeated_targets: bool = False,
                   ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``user_vectors(table, inputs (u, L)) -> (u, D)``; ``table`` (N+1, D) item embeddings."""
    return metrics_from_ranks(split_ranks(user_vectors, table, inputs, targets, history, batch_users,
                                          rank_repeated_targets), ks)


def popularity_scores(train_sequences: np.ndarray, num_items: int) -> torch.Tensor:
    """(N+1,) train-part counts: the most-popular baseline's score for every item."""
    counts = np.bincount(train_sequences.ravel(), minlength=num_items + 1).astype(np.float32)
    counts[0] = 0
    return torch.from_numpy(counts)


def popularity_metrics(data, split: str, rank_repeated_targets: bool = False,
                       batch_users: int = 1024) -> dict[str, float]:
    """The most-popular baseline under the same protocol (history masked, same ranks and metrics)."""
    _, targets, history = data.eval_split(split)
    pop = popularity_scores(data.train_sequences(), data.num_items)
    return evaluate_scores(lambda sl: pop[None, :].repeat(len(targets[sl]), 1), targets, history, batch_users,
                           rank_repeated_targets)
