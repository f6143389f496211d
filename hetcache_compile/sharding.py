"""Context parallelism at run time: ranks that agree on every step, and partial steps balanced over them.

Under context parallelism (Ulysses or Ring) each rank's graph runs the block stack on its shard of the
tokens (rank r holds tokens ``[r * n, (r + 1) * n)``, ``n = N / world``) and exchanges keys and values
(Ulysses: queries too) with the other ranks at every self-attention. So:

- **Agreement.** Every rank must take the same step kind at every call: a rank that reuses while another
  computes would wait forever in an all-to-all. The step kind comes from signals that are the same on
  every rank (the timestep, the schedule, the mask, the modulation), and ``RankGroup.agree`` checks it
  with one small all-reduce per call, with a partial step's size: where kinds or sizes differ (a per-rank
  option or mask, a rank whose caches were dropped), every rank takes a full step, which any rank can.
- **Balance.** Every rank computes the same number ``k`` of its own tokens in a partial step (the
  all-to-alls need equal shapes): each keeps its generative and selected margin tokens and fills up to
  ``k`` with its most relevant, most representative context tokens. ``k`` is the larger of an equal
  share of |S| and the most generative + margin tokens any one shard holds, so no rank idles while
  another computes, and an edit that lies in one shard makes the others recompute more of their
  context rather than wait.
- **Caches of 1/world.** Under Ulysses the context caches are attention's operands after the all-to-all:
  this rank's heads for every rank's context tokens, so their rows are the complement of every rank's
  selection (``all_gather`` of the selections, once per selection), and the relevance of a token is
  averaged over the ranks' heads (one all-reduce). Under Ring they are this rank's own context rows, all
  heads, and relevance is what this rank's generative queries give its own keys.

>>> import torch
>>> from hetcache_compile.priors import classify_tokens
>>> edit = torch.zeros(4, 4, 4, dtype=torch.bool)  # 4 frames of 4 x 4 tokens; 2 ranks hold 2 frames each
>>> edit[:, 1:3, 1:3] = True  # 4 generative tokens a frame: 8 in each shard
>>> shard_size(classify_tokens(edit, radius=0), world=2, context_ratio=0.0, margin_ratio=1.0)
8
>>> edit[2:] = False  # the same box in the first shard's frames only: it still sets the size
>>> shard_size(classify_tokens(edit, radius=0), world=2, context_ratio=0.0, margin_ratio=1.0)
8
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .passes.shards import ShardLayout
from .priors import TokenClasses
from .schedule import StepKind
from .selection import budget_size, complement, select_context, select_margin

logger = logging.getLogger("hetcache_compile")

_COST = {StepKind.REUSE: 0, StepKind.PARTIAL: 1, StepKind.FULL: 2}


@dataclass
class RankGroup:
    """The process group a sharded graph's collectives run in, and this process's place in it."""

    group: dist.ProcessGroup
    rank: int
    world: int

    @classmethod
    def of(cls, shards: ShardLayout) -> RankGroup:
        group = dist.distributed_c10d._resolve_process_group(shards.group)
        return cls(group=group, rank=dist.get_rank(group), world=shards.world)

    def agree(self, kind: StepKind, device: torch.device, size: int = 0) -> StepKind:
        """``kind`` if every rank chose it, with the same ``size`` (a partial step's tokens a rank: the
        exchanges need equal shapes), else ``FULL`` on every rank."""
        cost = _COST[kind]
        extremes = torch.tensor([cost, -cost, size, -size], device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        highest, lowest, largest, smallest = extremes.tolist()
        if highest == -lowest and largest == -smallest:
            return kind
        logger.warning("hetcache: rank %d chose a %s step (%d tokens) while another rank chose otherwise (different "
                       "options, masks or timesteps on the ranks?); every rank takes a full step",
                       self.rank, kind.value, size)
        return StepKind.FULL

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The average of ``tensor`` over the ranks (the same on every rank)."""
        total = tensor.clone()
        dist.all_reduce(total, group=self.group)
        return total / self.world

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (all the same shape), concatenated in rank order."""
        out = tensor.new_empty((self.world * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(out, tensor.contiguous(), group=self.group)
        return out


def local_rows(indices: torch.Tensor, rank: int, per_shard: int) -> torch.Tensor:
    """The token ``indices`` that lie in ``rank``'s shard, as rows of it."""
    low = rank * per_shard
    return indices[(indices >= low) & (indices < low + per_shard)] - low


def shard_size(classes: TokenClasses, world: int, context_ratio: float, margin_ratio: float, buckets: int = 0) -> int:
    """``k``: the tokens each of ``world`` shards computes in a partial step (the same on every rank)."""
    per_shard = classes.num_tokens // world
    required = _required(classes, margin_ratio)
    busiest = int(torch.bincount(required // per_shard, minlength=world).max()) if required.numel() else 0
    share = -(-budget_size(classes, context_ratio, margin_ratio, buckets) // world)
    return min(per_shard, max(share, busiest))


def _required(classes: TokenClasses, margin_ratio: float) -> torch.Tensor:
    """The tokens a partial step always computes: generative and selected margin tokens."""
    return torch.cat([classes.generative, select_margin(classes.margin, classes.grid, margin_ratio)])


def select_shard_tokens(classes: TokenClasses, scores: torch.Tensor, hidden: torch.Tensor, rank: int, world: int,
                        context_ratio: float, margin_ratio: float, num_clusters: int, buckets: int = 0) -> torch.Tensor:
    """This rank's sorted local indices of S: its generative and selected margin tokens, then its context
    tokens picked as on one device (cluster quotas, most relevant first) up to ``shard_size``. ``scores``
    are the relevance of this shard's tokens ``[n]``, ``hidden`` their final hidden states ``[n, D]``."""
    per_shard = classes.num_tokens // world
    size = shard_size(classes, world, context_ratio, margin_ratio, buckets)
    required = local_rows(_required(classes, margin_ratio), rank, per_shard)
    local_scores = scores.cpu()
    picked = select_context(local_rows(classes.context, rank, per_shard), local_scores, hidden, 0.0, num_clusters,
                            budget=size - required.numel())
    chosen = torch.cat([required, picked])
    missing = size - chosen.numel()
    if missing > 0:  # too few context tokens here: the margin tokens left, most relevant first
        rest = complement(chosen, per_shard)
        chosen = torch.cat([chosen, rest[torch.argsort(local_scores[rest], descending=True, stable=True)[:missing]]])
    return torch.sort(chosen).values


__all__ = ["RankGroup", "local_rows", "select_shard_tokens", "shard_size"]
