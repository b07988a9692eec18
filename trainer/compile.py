"""``torch.compile`` for the training step.

The keep-rate schedule quantises its rates, so a run meets only a handful of distinct pairs of keep
rates; with ``dynamic=False`` each becomes one static graph (the token rate fixes the token counts,
the attention rate how many keys each query keeps: two pairs with the same token counts are two
graphs). Only full batches run compiled: the
trainer runs an epoch's last, partial batch eagerly (its size changes from epoch to epoch once
examples are pruned per epoch, and each size would be a graph compiled for one step). The recompile
limit is raised so those few graphs never fall back to eager, and ``compiled_graphs()`` reports how
many were built.
"""
from __future__ import annotations

import torch

GRAPH_LIMIT = 64  # far above the distinct pairs of rates a quantised schedule produces


def allow_static_graphs() -> None:
    """Let each compiled function keep up to ``GRAPH_LIMIT`` static-shape graphs before dynamo gives up."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPH_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * GRAPH_LIMIT)


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` itself for ``mode`` "off", else its compiled wrapper (same parameters)."""
    if mode == "off":
        return model
    allow_static_graphs()
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (every compiled function together)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
