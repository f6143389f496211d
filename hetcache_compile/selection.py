"""Token selection for partial steps, done at full steps: S = G ∪ M_sel ∪ C_sel.

- relevance of a context token c: the attention mass generative queries put on key c, softmax
  over *all* keys, summed over G, averaged over heads and batch;
- representativeness: deterministic k-means over the context tokens' final hidden states;
  each cluster gets a quota proportional to its size and fills it with its most relevant tokens;
- margin: a spatially uniform share of each frame's margin tokens.

|S| depends only on the mask and the ratios, so it stays fixed within a video and the partial
variant compiles once.
"""

from __future__ import annotations

import torch

from .priors import TokenClasses


def relevance(query: torch.Tensor, key: torch.Tensor, generative: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Attention mass from generative queries onto every key: ``[N]``.

    ``query``/``key`` are ``[B, H, N, d]`` as attention reads them. The softmax runs over all N
    keys (not over G only, which would make every score 1); queries go in chunks so memory stays
    ``B * H * chunk * N``.
    """
    scale = query.shape[-1] ** -0.5
    keys = key.float()
    total = torch.zeros(key.shape[-2], dtype=torch.float32, device=key.device)
    for start in range(0, generative.numel(), chunk):
        rows = generative[start:start + chunk].to(query.device)
        q = query.index_select(-2, rows).float()
        weights = torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1)  # [B, H, g, N]
        total += weights.sum(dim=-2).mean(dim=(0, 1))
    return total


def kmeans(points: torch.Tensor, k: int, iterations: int = 10) -> torch.Tensor:
    """Cluster labels ``[n]`` of ``points`` ``[n, D]``; deterministic (evenly spaced initial centres)."""
    n = points.shape[0]
    k = max(1, min(k, n))
    points = points.float()
    centres = points[torch.linspace(0, n - 1, k).round().long()].clone()
    labels = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1).to(points.dtype)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty cluster: keep centre
    return labels


def proportional_quotas(sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Split ``budget`` over clusters in proportion to ``sizes`` (largest remainder, never above size)."""
    budget = min(budget, int(sizes.sum()))
    exact = sizes.double() * budget / max(int(sizes.sum()), 1)
    quotas = exact.floor().long()
    remainder = budget - int(quotas.sum())
    if remainder > 0:
        order = torch.argsort(exact - quotas, descending=True, stable=True)
        quotas[order[:remainder]] += 1
    return torch.minimum(quotas, sizes)


def select_context(context: torch.Tensor, scores: torch.Tensor, hidden: torch.Tensor, ratio: float,
                   num_clusters: int, budget: int | None = None) -> torch.Tensor:
    """Pick ``round(ratio * |C|)`` context tokens (or ``budget``, at most |C|): quotas by cluster size, most
    relevant first."""
    budget = round(ratio * context.numel()) if budget is None else min(budget, context.numel())
    if budget == 0 or context.numel() == 0:
        return context[:0]
    labels = kmeans(hidden[context.to(hidden.device)], num_clusters).cpu()
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1)
    quotas = proportional_quotas(sizes, budget)
    context_scores = scores.cpu()[context]
    chosen = []
    for cluster, quota in enumerate(quotas.tolist()):
        if quota == 0:
            continue
        members = (labels == cluster).nonzero().flatten()
        best = torch.argsort(context_scores[members], descending=True, stable=True)[:quota]
        chosen.append(context[members[best]])
    picked = torch.cat(chosen)
    if picked.numel() < budget:  # quotas were capped by tiny clusters: top up by relevance
        rest = context[~torch.isin(context, picked)]
        extra = torch.argsort(scores.cpu()[rest], descending=True, stable=True)[:budget - picked.numel()]
        picked = torch.cat([picked, rest[extra]])
    return picked


def select_margin(margin: torch.Tensor, grid: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """A spatially uniform ``ratio`` of each frame's margin tokens (evenly spaced in raster order)."""
    if ratio >= 1.0 or margin.numel() == 0:
        return margin
    per_frame = grid[1] * grid[2]
    frames = margin // per_frame
    chosen = []
    for frame in torch.unique(frames).tolist():
        members = margin[frames == frame]
        count = round(ratio * members.numel())
        if count > 0:
            chosen.append(members[torch.linspace(0, members.numel() - 1, count).round().long()])
    return torch.cat(chosen) if chosen else margin[:0]


def complement(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The sorted token indices in ``range(num_tokens)`` that are not in ``indices``."""
    keep = torch.ones(num_tokens, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(1)


def round_up_size(size: int, num_tokens: int, buckets: int) -> int:
    """``size`` rounded up to a multiple of ``ceil(num_tokens / buckets)`` (at most ``num_tokens``)."""
    if buckets == 0 or size == 0:
        return size
    step = -(-num_tokens // buckets)
    return min(num_tokens, -(-size // step) * step)


def budget_size(classes: TokenClasses, context_ratio: float, margin_ratio: float, buckets: int = 0) -> int:
    """|S| for these classes and ratios (what the partial variant is specialised for)."""
    margin = select_margin(classes.margin, classes.grid, margin_ratio).numel()
    size = classes.generative.numel() + margin + round(context_ratio * classes.context.numel())
    return round_up_size(size, classes.num_tokens, buckets)


def select_tokens(classes: TokenClasses, scores: torch.Tensor, hidden: torch.Tensor, context_ratio: float,
                  margin_ratio: float, num_clusters: int, buckets: int = 0) -> torch.Tensor:
    """Sorted indices S = G ∪ M_sel ∪ C_sel, int64 on the CPU, of size ``budget_size(...)``.

    With ``buckets > 0`` the most relevant tokens left fill S up to its rounded size.
    """
    parts = [
        classes.generative,
        select_margin(classes.margin, classes.grid, margin_ratio),
        select_context(classes.context, scores, hidden, context_ratio, num_clusters),
    ]
    chosen = torch.cat(parts)
    missing = round_up_size(chosen.numel(), classes.num_tokens, buckets) - chosen.numel()
    if missing > 0:
        rest = complement(chosen, classes.num_tokens)
        best = torch.argsort(scores.cpu()[rest], descending=True, stable=True)[:missing]
        chosen = torch.cat([chosen, rest[best]])
    return torch.sort(chosen).values


__all__ = ["budget_size", "complement", "kmeans", "proportional_quotas", "relevance", "round_up_size",
           "select_context", "select_margin", "select_tokens"]
