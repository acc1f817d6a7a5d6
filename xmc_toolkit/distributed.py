"""Distributed training on ``torch.distributed``: row-sharded label table, sharded softmax losses.

Design (after PartialFC from insightface and Renee): the encoder is data parallel (each rank
sees its own slice of the batch, gradients are combined by ``DistributedDataParallel``) while
the label table ``[L, d]`` is *sharded by rows*: rank ``r`` owns the contiguous range
``shard_range(L, r, W)`` and never sees the other rows. For the loss every rank all-gathers the
queries of the whole (global) batch, scores them against its own shard, and the softmax
normalizer is combined across ranks with two all-reduces (max, then sum of exponentials).

Conventions (identical to :func:`xmc_toolkit.losses.full_softmax_loss`): for a row ``i`` with
positives ``P_i`` and each target ``t`` in ``P_i``::

    loss_it = -x_it + log(exp(x_it) + sum_{c not in P_i} exp(x_ic))

and the loss is the mean over the valid (row, target) pairs of the *global* batch, so every
rank holds the same scalar. Gradients are exact: the gradient of that scalar with respect to
rank ``r``'s queries, weight shard and bias shard equals the single-process gradient on the
concatenated batch. (The encoder gradients must then be *summed* across ranks, not averaged:
see :func:`sum_allreduce_hook`.)

Sampled softmax with per-shard samplers (stratified sampling): rank ``r`` draws a fixed quota
``M_r`` of negatives from its own shard with proposal ``q_r`` (normalized over the shard).
The unbiased estimator of the negative normalizer ``Z_i = sum_{c not in P_i} exp(x_ic)`` is::

    Z_i ~= sum_r (1 / M_r) sum_{j=1..M_r} exp(x_{i c_j}) [c_j not in P_i] / q_r(c_j)

Writing ``M = sum_r M_r`` this is the ordinary importance-sampling estimator
``(1/M) sum_j exp(x_j) / q(c_j)`` over the union of the draws with the *mixture* proposal
``q(c) = (M_r / M) q_r(c)`` for ``c`` in shard ``r`` (a normalized distribution over all ``L``
labels, see :func:`mixture_log_q`). Each rank computes the log-sum-exp of its own terms
``x - log q_r - log M_r`` (accidental hits removed), and the ranks combine them like the full
normalizer.

All collectives degrade to no-ops when ``torch.distributed`` is not initialized, so every
function here also runs in one process (world size 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .device import resolve_device
from .errors import ConfigError, SamplerError
from .losses import MaskedLogSumExp

__all__ = [
    "shard_range",
    "shard_ranges",
    "world_info",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "replicated_all_reduce_sum",
    "combine_logsumexp",
    "sharded_full_softmax_loss",
    "sharded_sampled_softmax_loss",
    "mixture_log_q",
    "merge_topk",
    "sharded_topk",
    "sum_allreduce_hook",
    "DistContext",
    "init_distributed",
]

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------
# sharding
# ------------------------------------------------------------------------------------------
def shard_range(num_labels: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced row range ``[start, stop)`` of the label table owned by ``rank``.

    The first ``num_labels % world_size`` ranks own one extra row; ranges cover
    ``[0, num_labels)`` without overlap and are ordered by rank. A rank may own zero rows when
    ``world_size > num_labels``.

    Args:
        num_labels: ``L >= 0``.
        rank: ``0 <= rank < world_size``.
        world_size: number of shards, ``>= 1``.

    Returns:
        ``(start, stop)`` with ``stop - start`` in ``{L // W, L // W + 1}``.
    """
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1 (torchrun --nproc-per-node)")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, {world_size}) (check RANK / WORLD_SIZE)")
    if num_labels < 0:
        raise ConfigError(f"num_labels={num_labels} must be >= 0")
    base, extra = divmod(num_labels, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def shard_ranges(num_labels: int, world_size: int) -> list[tuple[int, int]]:
    """All ``world_size`` ranges of :func:`shard_range`, in rank order."""
    return [shard_range(num_labels, r, world_size) for r in range(world_size)]


def world_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _is_dist(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _backend(group: Any = None) -> str:
    return str(dist.get_backend(group)) if _is_dist(group) else "none"


# ------------------------------------------------------------------------------------------
# collectives with autograd
# ------------------------------------------------------------------------------------------
def _gather_shapes(x: torch.Tensor, group: Any) -> list[list[int]]:
    _, world = world_info(group)
    mine = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [[int(v) for v in t.tolist()] for t in out]


def _gather_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    return [s[0] for s in _gather_shapes(torch.empty(n, 0, device=device), group)]


def _all_gather_padded(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, list[int]]:
    """All-gather tensors whose shapes may differ across ranks (e.g. ``[B_r, P_r]`` padded
    positives): every dimension is zero-padded to the largest, then the rows are concatenated.

    Returns ``(cat [sum_r B_r, max ...], sizes B_r)``.
    """
    shapes = _gather_shapes(x, group)
    sizes = [s[0] for s in shapes]
    full = [max(s[i] for s in shapes) for i in range(x.dim())]
    padded = x.new_zeros(full)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0), sizes


class _AllGatherGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient and keeps this rank's rows.

    Every rank's loss depends on all ranks' queries through its own shard, so the gradient of
    the (replicated) loss with respect to this rank's queries is the sum over ranks of the
    partial gradients each rank computed for this rank's rows.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out, sizes = _all_gather_padded(x, group)
        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = dist.get_rank(group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        sizes: list[int] = ctx.sizes
        rank: int = ctx.rank
        start = sum(sizes[:rank])
        if _backend(ctx.group) == "nccl" and len(set(sizes)) == 1:
            # reduce-scatter moves 1/W of the data of an all-reduce
            out = grad.new_empty((sizes[rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
            return out, None
        total = grad.contiguous().clone()  # [N, ...]
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[start : start + sizes[rank]], None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, differentiably.

    Args:
        x: ``[B_r, ...]`` on this rank; ``B_r`` may differ across ranks.
        group: process group (default: the world).

    Returns:
        ``[sum_r B_r, ...]`` in rank order. In backward, gradients from every rank are summed
        (all-reduce, or reduce-scatter on NCCL) and this rank's rows are returned.
    """
    if not _is_dist(group):
        return x
    return _AllGatherGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather along dim 0 without autograd (ids, masks); bool tensors are supported."""
    if not _is_dist(group):
        return x
    if x.dtype == torch.bool:
        return _all_gather_padded(x.to(torch.uint8), group)[0].bool()
    return _all_gather_padded(x.detach(), group)[0]


class _ReplicatedSum(torch.autograd.Function):
    """All-reduce SUM whose result feeds a computation replicated on every rank.

    If ``y = sum_r x_r`` and every rank computes the same loss from ``y``, then
    ``dL/dx_r = dL/dy`` on each rank: the backward is the identity (no communication).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def replicated_all_reduce_sum(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable all-reduce SUM for values consumed identically by every rank.

    Only valid when everything downstream of the result is the same on every rank (the
    replicated loss); the backward is then the identity.
    """
    if not _is_dist(group):
        return x
    return _ReplicatedSum.apply(x, group)


def _safe_log(s: torch.Tensor) -> torch.Tensor:
    """``log(s)`` with ``log(0) = -inf`` and a finite (zero) gradient there."""
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))), _NEG_INF)


def combine_logsumexp(local_lse: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Global ``log sum_r exp(local_lse_r)`` over the ranks, differentiably.

    Uses an all-reduce MAX (no gradient needed: the maximum cancels) and an all-reduce SUM of
    ``exp(lse_r - max)``. Rows whose every term is ``-inf`` give ``-inf`` without NaN.

    Args:
        local_lse: ``[N] float`` this rank's log-sum-exp per row (may be ``-inf``).

    Returns:
        ``[N] float``, identical on every rank.
    """
    m = local_lse.detach().clone()
    if _is_dist(group):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # [N]
    s = replicated_all_reduce_sum(torch.exp(local_lse - m), group)  # [N]
    return m + _safe_log(s)


def _bias_at(bias: torch.Tensor, ids: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
    """``bias[ids]``; a ``[L_r, 1]`` bias (an ``nn.Embedding(L_r, 1)`` weight) is looked up with
    ``F.embedding`` so that its gradient can be sparse."""
    if bias.dim() == 2:
        return F.embedding(ids, bias, sparse=sparse_grad).squeeze(-1)
    return bias[ids]


def _owned_positive_scores(
    q: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    local_pos: torch.Tensor,
    own: torch.Tensor,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """Scores of the positives this shard owns, 0 elsewhere: ``[N, P]``."""
    idx = torch.where(own, local_pos, torch.zeros_like(local_pos))  # [N, P] valid local rows
    if weight.shape[0] == 0:
        return q.new_zeros(local_pos.shape)
    rows = F.embedding(idx, weight, sparse=sparse_grad)  # [N, P, d]
    x = (rows * q[:, None, :]).sum(-1)  # [N, P]
    if bias is not None:
        x = x + _bias_at(bias, idx, sparse_grad)
    return torch.where(own, x, torch.zeros_like(x))


def _pair_loss(x_pos: torch.Tensor, lse_neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid pairs of ``-x_t + log(exp(x_t) + exp(lse_neg))``."""
    per_pair = F.softplus(lse_neg[:, None] - x_pos)  # [N, P]
    # softplus(-inf) = 0 exactly: a row with no negative at all has zero loss
    per_pair = torch.where(mask, per_pair, torch.zeros_like(per_pair))
    count = mask.sum()
    return per_pair.sum() / count.clamp_min(1).to(per_pair.dtype)


def _check_inputs(
    queries: torch.Tensor,
    local_weight: torch.Tensor,
    local_bias: torch.Tensor | None,
    pos_ids: torch.Tensor,
    pos_mask: torch.Tensor,
) -> None:
    if queries.dim() != 2 or local_weight.dim() != 2 or queries.shape[1] != local_weight.shape[1]:
        raise ConfigError(
            f"queries {tuple(queries.shape)} and local_weight {tuple(local_weight.shape)} must be "
            "[B, d] and [L_r, d] with the same d (check --dim)"
        )
    if pos_ids.shape != pos_mask.shape or pos_ids.dim() != 2 or pos_ids.shape[0] != queries.shape[0]:
        raise ConfigError(
            f"pos_ids {tuple(pos_ids.shape)} and pos_mask {tuple(pos_mask.shape)} must both be "
            f"[B, P] with B = {queries.shape[0]}"
        )
    if local_bias is not None and local_bias.shape not in (
        (local_weight.shape[0],),
        (local_weight.shape[0], 1),
    ):
        raise ConfigError(
            f"local_bias {tuple(local_bias.shape)} must be [L_r] or [L_r, 1] with "
            f"L_r = {local_weight.shape[0]}"
        )


def sharded_full_softmax_loss(
    queries: torch.Tensor,
    local_weight: torch.Tensor,
    local_bias: torch.Tensor | None,
    pos_ids: torch.Tensor,
    pos_mask: torch.Tensor,
    label_offset: int,
    group: Any = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Exact multi-label softmax loss with the label table sharded by rows across ranks.

    Every rank all-gathers the queries and positives of the global batch, scores them against
    its shard by chunks of ``chunk_size`` labels (never ``[N, L_r]`` at once), masks its own
    positives out of the normalizer, and combines the per-shard log-sum-exp across ranks; the
    score of each positive comes from the shard that owns it (all-reduce SUM).

    Args:
        queries: ``[B_r, d] float`` this rank's queries (requires grad through the encoder).
        local_weight: ``[L_r, d] float`` this rank's rows ``[label_offset, label_offset + L_r)``.
        local_bias: ``[L_r] float`` or ``None``.
        pos_ids: ``[B_r, P] int64`` *global* label ids, padded.
        pos_mask: ``[B_r, P] bool`` valid entries of ``pos_ids``.
        label_offset: first global label id of this rank's shard.
        group: process group (default world; single process when not initialized).
        chunk_size: labels scored at once.

    Returns:
        Scalar, the mean over the valid (row, target) pairs of the global batch; identical on
        every rank. Backward gives exact gradients for this rank's queries and shards.
    """
    _check_inputs(queries, local_weight, local_bias, pos_ids, pos_mask)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1 (--chunk-size)")
    q_all = all_gather_with_grad(queries, group)  # [N, d]
    pos_all = all_gather_no_grad(pos_ids, group)  # [N, P]
    mask_all = all_gather_no_grad(pos_mask.bool(), group)  # [N, P]
    num_local = local_weight.shape[0]
    local_pos = pos_all - label_offset  # [N, P]
    own = mask_all & (local_pos >= 0) & (local_pos < num_local)  # [N, P]
    flat_bias = None if local_bias is None else local_bias.reshape(-1)  # [L_r]
    # the one chunked masked log-sum-exp (that of the one-process full softmax) on this shard
    lse_local = MaskedLogSumExp.apply(
        q_all, local_weight, flat_bias, local_pos, own, int(chunk_size)
    )  # [N]
    lse_neg = combine_logsumexp(lse_local, group)  # [N]
    x_pos = replicated_all_reduce_sum(
        _owned_positive_scores(q_all, local_weight, flat_bias, local_pos, own), group
    )  # [N, P]
    return _pair_loss(x_pos, lse_neg, mask_all)


# ------------------------------------------------------------------------------------------
# sampled softmax with one sampler per shard (stratified sampling)
# ------------------------------------------------------------------------------------------
class _ShardSampler(Protocol):
    num_labels: int

    def sample(
        self,
        queries: torch.Tensor,
        num_samples: int,
        shared: bool = False,
        generator: torch.Generator | None = None,
    ) -> Any: ...


class ShardedSamples(NamedTuple):
    """What one rank drew for the global batch (for diagnostics and tests).

    Attributes:
        ids: ``[N, M_r]`` or ``[M_r]`` int64 *global* ids of this rank's draws.
        log_q: same shape, log of this rank's proposal ``q_r`` (normalized over its shard).
        num_samples: ``M_r``.
    """

    ids: torch.Tensor
    log_q: torch.Tensor
    num_samples: int


def mixture_log_q(log_q_r: torch.Tensor, quota: int, total: int) -> torch.Tensor:
    """Log-probability of the union proposal: ``log q(c) = log q_r(c) + log(M_r / M)``.

    With fixed quotas ``M_r`` per shard, a draw picked uniformly from the pooled ``M`` samples
    has this (normalized) distribution over all labels, and the stratified estimator equals
    ``(1/M) sum_j exp(x_j) / q(c_j)``.
    """
    return log_q_r + (math.log(quota) - math.log(total))


def _accidental_hits(neg_ids: torch.Tensor, pos_ids: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` bool: negative ``neg_ids[i, j]`` (or ``neg_ids[j]`` if 1-D) is a positive of row i.

    The kernel of the one-process losses (:func:`xmc_toolkit.losses._accidental_hits`: a per-row
    sorted search, ``O(N M log P)`` time, ``[N, M]`` memory), argument order of this module.
    """
    from .losses import _accidental_hits as accidental_hits

    return accidental_hits(pos_ids, pos_mask, neg_ids)


def sharded_sampled_softmax_loss(
    queries: torch.Tensor,
    local_weight: torch.Tensor,
    local_bias: torch.Tensor | None,
    pos_ids: torch.Tensor,
    pos_mask: torch.Tensor,
    label_offset: int,
    sampler: _ShardSampler,
    num_samples: int,
    group: Any = None,
    *,
    shared: bool = False,
    generator: torch.Generator | None = None,
    remove_accidental_hits: bool = True,
    correction: str = "plain",
    sparse_grad: bool = False,
    return_samples: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ShardedSamples]:
    """Sampled softmax with a per-shard sampler and an all-reduced normalizer estimate.

    Rank ``r`` draws ``num_samples`` (``M_r``) negatives from *its own shard* with ``sampler``
    (local ids ``0 .. L_r - 1``, exact normalized ``log q_r``) for every query of the global
    batch, and the loss for target ``t`` of row ``i`` is
    ``-x_t + log(exp(x_t) + Zhat_i)`` with the stratified estimate
    ``Zhat_i = sum_r (1/M_r) sum_{c ~ q_r, c not in P_i} exp(x_ic) / q_r(c)``
    (accidental hits removed when ``remove_accidental_hits``).

    Args:
        queries: ``[B_r, d]`` this rank's queries.
        local_weight: ``[L_r, d]`` this rank's shard.
        local_bias: ``[L_r]`` or ``None``.
        pos_ids: ``[B_r, P] int64`` global ids; ``pos_mask``: ``[B_r, P] bool``.
        label_offset: first global id of this shard.
        sampler: object with ``num_labels == L_r`` and
            ``sample(queries [N, d], M, shared, generator) -> (ids, log_q)`` in local ids
            (e.g. an :mod:`xmc_toolkit.sampling` sampler built over this shard only).
        num_samples: this rank's quota ``M_r >= 1`` (ranks may use different quotas).
        group: process group.
        shared: one set of ``M_r`` negatives for the whole batch instead of per query.
        generator: random generator for the draws (seed it per rank).
        remove_accidental_hits: drop sampled negatives that are positives of the row.
        correction: ``"plain"``: the unbiased stratified estimator above (divide by ``M_r``,
            hits count as zero). ``"conditional"``: per shard, divide by the number ``M'_{i,r}``
            of non-hit draws and multiply by ``1 - q_r(P_i in shard r)``, i.e. the per-stratum
            version of :func:`xmc_toolkit.losses.sampled_softmax_loss`'s default; with one
            rank it equals that function (needs ``sampler.log_prob(queries, ids, shared)``).
            With ``shared`` the draws follow the mixture ``qbar_r = (1/N) sum_i q_r(. | q_i)``
            over the gathered batch, so ``q_r(P_i)`` is ``qbar_r(P_i)`` there.
        sparse_grad: sparse gradient for ``local_weight`` (use with ``torch.optim.SparseAdam``).
        return_samples: also return this rank's :class:`ShardedSamples`.

    Returns:
        The scalar loss (identical on every rank), and the samples when ``return_samples``.
    """
    _check_inputs(queries, local_weight, local_bias, pos_ids, pos_mask)
    num_local = local_weight.shape[0]
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be >= 1 (--num-samples)")
    if correction not in ("plain", "conditional"):
        raise ConfigError(f"correction={correction!r} must be 'plain' or 'conditional'")
    if num_local > 0 and int(getattr(sampler, "num_labels", num_local)) != num_local:
        raise SamplerError(
            f"the shard sampler covers {sampler.num_labels} labels but this rank owns "
            f"{num_local}; build the sampler over the shard (shard_range)"
        )
    q_all = all_gather_with_grad(queries, group)  # [N, d]
    pos_all = all_gather_no_grad(pos_ids, group)  # [N, P]
    mask_all = all_gather_no_grad(pos_mask.bool(), group)  # [N, P]
    n = q_all.shape[0]
    local_pos = pos_all - label_offset
    own = mask_all & (local_pos >= 0) & (local_pos < num_local)  # [N, P]

    if num_local > 0:
        drawn = sampler.sample(q_all.detach(), num_samples, shared=shared, generator=generator)
        ids, log_q = drawn[0], drawn[1]  # [N, M_r] or [M_r], local ids
        ids = ids.to(q_all.device)
        log_q = log_q.to(q_all.device, q_all.dtype)
        if shared:
            rows = F.embedding(ids, local_weight, sparse=sparse_grad)  # [M_r, d]
            neg = q_all @ rows.t()  # [N, M_r]
            if local_bias is not None:
                neg = neg + _bias_at(local_bias, ids, sparse_grad)[None, :]
        else:
            rows = F.embedding(ids, local_weight, sparse=sparse_grad)  # [N, M_r, d]
            neg = (rows * q_all[:, None, :]).sum(-1)  # [N, M_r]
            if local_bias is not None:
                neg = neg + _bias_at(local_bias, ids, sparse_grad)
        lq = log_q[None, :] if shared else log_q  # [1 or N, M_r]
        if remove_accidental_hits:
            hits = _accidental_hits(ids + label_offset, pos_all, mask_all)  # [N, M_r]
        else:
            hits = torch.zeros(neg.shape, dtype=torch.bool, device=neg.device)
        if correction == "plain":
            logits = neg - lq - math.log(num_samples)  # [N, M_r]
        else:
            m_eff = (~hits).sum(1).clamp_min(1).to(neg.dtype)  # [N] non-hit draws M'_{i,r}
            idx = torch.where(own, local_pos, torch.zeros_like(local_pos))  # [N, P]
            # the positives' log q under the law of the draws: q_r(. | q_i) per query, the
            # batch mixture (1/N) sum_i q_r(. | q_i) in shared mode (docs/losses.md)
            lq_pos = sampler.log_prob(q_all.detach(), idx, shared=shared).to(
                neg.device, neg.dtype)  # [N, P]
            q_own = torch.where(own, lq_pos.exp(), torch.zeros_like(lq_pos)).sum(1)  # [N]
            tiny = torch.finfo(neg.dtype).tiny
            log_rest = torch.log((1.0 - q_own).clamp_min(tiny))  # [N] log(1 - q_r(P_i))
            logits = neg - lq - torch.log(m_eff)[:, None] + log_rest[:, None]  # [N, M_r]
        logits = logits.masked_fill(hits, _NEG_INF)
        lse_local = torch.logsumexp(logits, dim=1)  # [N]
    else:  # empty shard: contributes nothing
        ids = torch.zeros((0,) if shared else (n, 0), dtype=torch.int64, device=q_all.device)
        log_q = torch.zeros(ids.shape, dtype=q_all.dtype, device=q_all.device)
        lse_local = q_all.new_full((n,), _NEG_INF) + 0.0 * q_all.sum()
    lse_neg = combine_logsumexp(lse_local, group)  # [N]
    x_pos = replicated_all_reduce_sum(
        _owned_positive_scores(q_all, local_weight, local_bias, local_pos, own, sparse_grad),
        group,
    )  # [N, P]
    loss = _pair_loss(x_pos, lse_neg, mask_all)
    if return_samples:
        return loss, ShardedSamples(ids + label_offset, log_q, num_samples)
    return loss


# ------------------------------------------------------------------------------------------
# exact top-k across shards
# ------------------------------------------------------------------------------------------
def merge_topk(
    scores: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard top-k lists into the global top-k, equal scores by increasing id.

    The same order as :func:`xmc_toolkit.output_layer.chunked_topk` (the one top-k kernel, which
    each shard runs on its own rows), so a sharded top-k equals the one-process top-k, ties
    included.

    Args:
        scores: per shard ``[N, k_r] float`` (pad with ``-inf``).
        ids: per shard ``[N, k_r] int64`` global ids (pad with ``-1``).
        k: how many to keep.

    Returns:
        ``(scores [N, k], ids [N, k])`` sorted by decreasing score, then increasing id.
    """
    s = torch.cat(list(scores), dim=1)  # [N, sum k_r]
    i = torch.cat(list(ids), dim=1)
    kk = min(k, s.shape[1])
    by_id = torch.sort(i, dim=1, stable=True).indices  # ties of the next sort: id order
    s, i = s.gather(1, by_id), i.gather(1, by_id)
    where = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kk]  # [N, k]
    return s.gather(1, where), i.gather(1, where)


def _local_topk(
    q: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's top-``k`` (local ids) by :func:`~xmc_toolkit.output_layer.chunked_topk`,
    padded with ``(-inf, -1)`` to ``k`` columns when the shard holds fewer rows."""
    from .output_layer import chunked_topk

    n = q.shape[0]
    kk = min(k, w.shape[0])
    if kk == 0:
        return q.new_full((n, k), _NEG_INF), torch.full((n, k), -1, dtype=torch.int64,
                                                         device=q.device)
    s, i = chunked_topk(q, w, b, kk, chunk_size=chunk_size)  # [N, kk]
    if kk < k:
        s = torch.cat([s, s.new_full((n, k - kk), _NEG_INF)], dim=1)
        i = torch.cat([i, i.new_full((n, k - kk), -1)], dim=1)
    return s, i


@torch.no_grad()
def sharded_topk(
    queries: torch.Tensor,
    local_weight: torch.Tensor,
    local_bias: torch.Tensor | None,
    k: int,
    label_offset: int,
    group: Any = None,
    chunk_size: int = 65536,
    replicated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the whole (sharded) label table for this rank's queries.

    Each rank scores the gathered queries on its shard by chunks, keeps its top-k, and the
    per-shard lists are all-gathered and merged.

    Args:
        queries: ``[B_r, d]`` this rank's queries.
        local_weight: ``[L_r, d]``; ``local_bias``: ``[L_r]`` or ``None``.
        k: number of labels to return (``1 <= k``; at most ``L`` are returned).
        label_offset: first global id of this shard.
        replicated: every rank passes the *same* queries (no gather; all rows are returned).

    Returns:
        ``(scores [B_r, k'] float, ids [B_r, k'] int64 global)`` with ``k' = min(k, L)``.
    """
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1 (--k)")
    rank, world = world_info(group)
    q_all = queries if replicated else all_gather_no_grad(queries, group)  # [N, d]
    s, i = _local_topk(q_all, local_weight, local_bias, k, chunk_size)  # [N, k]
    i = torch.where(i >= 0, i + label_offset, i)
    if _is_dist(group):
        s_parts = [torch.empty_like(s) for _ in range(world)]
        i_parts = [torch.empty_like(i) for _ in range(world)]
        dist.all_gather(s_parts, s.contiguous(), group=group)
        dist.all_gather(i_parts, i.contiguous(), group=group)
        sizes = (
            [queries.shape[0]] * world
            if replicated
            else _gather_sizes(queries.shape[0], queries.device, group)
        )
    else:
        s_parts, i_parts, sizes = [s], [i], [queries.shape[0]]
    top_s, top_i = merge_topk(s_parts, i_parts, k)  # [N, k]
    total = torch.tensor([local_weight.shape[0]], dtype=torch.int64, device=queries.device)
    if _is_dist(group):
        dist.all_reduce(total, group=group)
    kk = min(k, int(total.item()))
    if replicated:
        return top_s[:, :kk], top_i[:, :kk]
    start = sum(sizes[:rank])
    return top_s[start : start + sizes[rank], :kk], top_i[start : start + sizes[rank], :kk]


# ------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or run alone when ``WORLD_SIZE`` <= 1.

    The device is chosen per ``LOCAL_RANK`` (``cuda:LOCAL_RANK`` when ``device`` resolves to
    CUDA); the backend is NCCL on CUDA and gloo on CPU unless ``backend`` names one.
    An already initialized default group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                "lower --nproc-per-node or use --device cpu"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                           str(dist.get_backend()))
    if world <= 1:
        return DistContext(0, 1, 0, dev, "none")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"backend={backend!r} is unknown; use auto, nccl or gloo (--backend)")
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)



# ------------------------------------------------------------------------------------------
# DDP helper
# ------------------------------------------------------------------------------------------
def sum_allreduce_hook(state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that *sums* gradients across ranks instead of averaging.

    With the sharded losses every rank's loss is already the mean over the global batch and
    the gradient reaching each rank's queries is exact, so the encoder gradients of the ranks
    must be added. Register with ``ddp.register_comm_hook(group_or_None, sum_allreduce_hook)``.
    """
    buf = bucket.buffer()
    fut = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks the hook's annotations as objects (this module uses postponed annotations)
sum_allreduce_hook.__annotations__ = {
    "state": Any,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


if __name__ == "__main__":  # pragma: no cover - `torchrun -m xmc_toolkit.distributed` (old name)
    # the flags of `xmc train` (the only flag parser); imported, this module never imports cli
    from cli.main import train_module_main

    train_module_main()
