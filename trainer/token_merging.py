"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), an
alternative token level for the sparse ViT.

In every block, between attention and MLP, ``r`` patch tokens are merged into others by
*bipartite soft matching*: the patch tokens are split alternately into sets A and B; each token of
A finds its most similar token of B (cosine similarity of the attention keys, averaged over heads);
the ``r`` best-matched A tokens are merged into their B partners, the rest of A stay. A merged
token is the size-weighted mean of the tokens it stands for, and its *size* (how many input patches
it holds) is carried to the following blocks, whose attention adds ``log(size)`` to every query's
score for that key (*proportional attention*: a token of size s weighs as s copies would). Prefix
tokens (class, distillation, registers) never merge and stay first, with size 1.

Unlike pruning nothing is thrown away, and no score map is needed: the matching reads the keys the
block computed anyway. The matching is chosen without autograd (indices carry no gradient); the
merge itself (gather, scatter-add) is differentiable. With ``r = 0`` nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Merge:
    """One block's matching over the patch tokens (after ``prefix`` prefix tokens): of set A (patch
    tokens 0, 2, 4, ...), ``sources`` merge into set B's (1, 3, 5, ...) ``destinations``, ``kept`` stay."""

    prefix: int
    kept: torch.Tensor  # (B, |A| - r) positions in A, increasing
    sources: torch.Tensor  # (B, r) positions in A
    destinations: torch.Tensor  # (B, r) positions in B, one per source

    def summed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): prefix tokens, A's kept tokens, then B's with the sources added in."""
        prefix, patches = x[:, : self.prefix], x[:, self.prefix:]
        a, b = patches[:, ::2], patches[:, 1::2]
        width = x.shape[-1]

        def rows(index: torch.Tensor) -> torch.Tensor:
            return index.unsqueeze(-1).expand(-1, -1, width)

        b = b.scatter_add(1, rows(self.destinations), a.gather(1, rows(self.sources)))
        return torch.cat([prefix, a.gather(1, rows(self.kept)), b], dim=1)


def bipartite_matching(metric: torch.Tensor, r: int, prefix: int) -> Merge | None:
    """The merge of ``r`` patch tokens (fewer if there are fewer than ``2r`` patches) from the
    (B, N, C) ``metric``; None when nothing merges."""
    r = min(r, (metric.shape[1] - prefix) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        patches = metric[:, prefix:]
        patches = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = patches[:, ::2] @ patches[:, 1::2].transpose(-1, -2)
        best, partner = similarity.max(dim=-1)
        # stable: equal similarities merge in token order, the same on every device and run
        order = best.argsort(dim=-1, descending=True, stable=True)
        sources = order[:, :r]
        return Merge(prefix, order[:, r:].sort(dim=-1).values, sources, partner.gather(1, sources))


def merge_tokens(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and sizes after ``merge``: each merged token the size-weighted mean of those it joins.
    ``size`` is (B, N, 1), None meaning every token stands for one patch."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    size = size.to(x.dtype)
    merged_size = merge.summed(size)
    return merge.summed(x * size) / merged_size, merged_size


def proportional_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias (B, 1, 1, N) of proportional attention: ``log(size)`` per key."""
    return size.log().to(dtype).squeeze(-1)[:, None, None, :]
