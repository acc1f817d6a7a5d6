"""Losses for extreme multi-label classification: full softmax, sampled softmax, negative sampling.

Every loss here is a pure function of scores (or queries and a label table), the padded positive
labels of each row and, for the sampled losses, the exact log-proposal probabilities of the ids
that were scored. The ``nn.Module`` wrappers at the bottom only store hyper-parameters.

Multi-label convention (see ``docs/losses.md``): a row ``b`` has a set of positives ``P_b`` given
as ``pos_ids [B, P] int64`` padded, with ``pos_mask [B, P] bool`` marking the valid entries. Each
valid ``(b, t)`` pair is one softmax term in which the *other* positives of the row are left out of
the normaliser::

    loss_bt = -x_bt + log(exp(x_bt) + N_b),        N_b = sum_{c not in P_b} exp(x_bc)

and a loss is the mean of ``loss_bt`` over the valid pairs. Rows without positives contribute
nothing; a batch without any positive returns ``0`` (still attached to the graph, never NaN).

The sampled softmax replaces ``N_b`` by the importance-sampling estimate built from ``M`` draws of
a proposal ``q`` (Bengio & Senecal 2008; Blanc & Rendle 2018; Chen et al. 2025, "Adaptive Sampled
Softmax with Inverted Multi-Index"), with accidental hits removed and the ``1 - q(P_b)`` factor of
the proposal restricted to the non-positives::

    N_b ~= sum_{valid m} exp(x_bm - log(M'_b q_m / (1 - q(P_b)))).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from xmc_toolkit.device import branch_free as _branch_free
from xmc_toolkit.errors import XMCError

__all__ = [
    "LossInputError",
    "full_softmax_loss",
    "full_softmax_loss_from_scores",
    "MaskedLogSumExp",
    "sampled_softmax_loss",
    "negative_sampling_loss",
    "FullSoftmaxLoss",
    "SampledSoftmaxLoss",
    "NegativeSamplingLoss",
]

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")


class LossInputError(XMCError, ValueError):
    """A loss was called with tensors of the wrong shape, dtype or value range."""


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_float(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise LossInputError(
            f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
            f"convert it with {name}.float()"
        )
    if t.dim() != ndim:
        raise LossInputError(f"{name} must have {ndim} dimension(s), got shape {_shape(t)}")


def _check_int(name: str, t: Tensor, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise LossInputError(
            f"{name} must be an integer (int64) tensor of label ids, got dtype {t.dtype}; "
            f"convert it with {name}.long()"
        )
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise LossInputError(f"{name} must have {want} dimension(s), got shape {_shape(t)}")


def _check_positives(pos_ids: Tensor, pos_mask: Tensor) -> None:
    _check_int("pos_ids", pos_ids, (2,))
    if not isinstance(pos_mask, Tensor) or pos_mask.dtype != torch.bool:
        got = pos_mask.dtype if isinstance(pos_mask, Tensor) else type(pos_mask).__name__
        raise LossInputError(
            f"pos_mask must be a bool tensor, got {got}; build it with (pos_ids >= 0) or "
            "convert it with pos_mask.bool()"
        )
    if pos_mask.shape != pos_ids.shape:
        raise LossInputError(
            f"pos_mask has shape {_shape(pos_mask)} but pos_ids has shape {_shape(pos_ids)}; "
            "they must be equal ([B, P])"
        )


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise LossInputError(
            f"{name_a} has shape {_shape(a)} but {name_b} has shape {_shape(b)}; they must be equal"
        )


def _check_negatives(
    neg_scores: Tensor, neg_ids: Tensor, neg_log_q: Tensor | None, batch: int
) -> None:
    _check_float("neg_scores", neg_scores, 2)
    _check_int("neg_ids", neg_ids, (1, 2))
    if neg_scores.shape[0] != batch:
        raise LossInputError(
            f"neg_scores has shape {_shape(neg_scores)} but the batch has {batch} rows "
            f"(pos_scores/pos_ids have {batch}); neg_scores must be [B, M]"
        )
    m = neg_scores.shape[1]
    if neg_ids.dim() == 1 and neg_ids.shape[0] != m:
        raise LossInputError(
            f"shared neg_ids has shape {_shape(neg_ids)} but neg_scores has shape "
            f"{_shape(neg_scores)}; shared ids must be [M] with M = neg_scores.shape[1]"
        )
    if neg_ids.dim() == 2 and neg_ids.shape != neg_scores.shape:
        raise LossInputError(
            f"neg_ids has shape {_shape(neg_ids)} but neg_scores has shape "
            f"{_shape(neg_scores)}; per-query ids must be [B, M] like the scores"
        )
    if neg_log_q is not None:
        _check_float("neg_log_q", neg_log_q, neg_ids.dim())
        _check_same("neg_log_q", neg_log_q, "neg_ids", neg_ids)


# --------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------


class _RowLogSumExp(torch.autograd.Function):
    """``log sum_m exp(z[b, m])`` over the last dimension of ``z [B, M]`` -> ``[B]``.

    Entries at ``-inf`` are left out (that is how masks enter); a row with no finite entry gives
    ``-inf`` and a zero gradient (never NaN); NaN scores stay NaN. The forward is torch's fused
    row softmax (one pass, kept for the backward) and ``lse_b = max_b - log max_m softmax_bm``
    (the largest entry's probability is ``1 / sum_m exp(z_bm - max_b)``), so the backward is one
    ``[B, M]`` pass, ``grad_z = g_b * softmax(z_b)``, instead of autograd's chain through the
    shift, ``exp``, sum and mask.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:  # type: ignore[override]
        if z.shape[-1] == 0:
            ctx.save_for_backward(z)
            return z.new_full(z.shape[:-1], _NEG_INF)
        mx = z.amax(dim=-1)  # [B], -inf on a row with no finite entry
        finite = mx != _NEG_INF  # [B] (NaN counts as finite: it propagates)
        if _branch_free(z.device) or not bool(finite.all()):  # CPU: reading it is no sync
            # -inf -> the lowest float: a row of only -inf then has a finite (uniform) softmax,
            # not 0/0; elsewhere exp(lowest - max) is exactly 0 like exp(-inf)
            z = z.clamp_min(torch.finfo(z.dtype).min)
        p = torch.softmax(z, dim=-1)  # [B, M]
        lse = mx - torch.log(p.amax(dim=-1))  # [B]
        ctx.save_for_backward(p, finite)
        return torch.where(finite, lse, torch.full_like(lse, _NEG_INF))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        if len(ctx.saved_tensors) == 1:
            return torch.zeros_like(ctx.saved_tensors[0])
        p, finite = ctx.saved_tensors
        g = torch.where(finite, g, torch.zeros_like(g))  # [B] an empty row passes nothing
        return p * g.unsqueeze(-1)  # [B, M]


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """``log sum_{valid} exp(x)`` over the last dimension, ``-inf`` (with zero grad) if none.

    Args:
        x: ``[B, M]`` float scores.
        valid: ``[B, M]`` bool, which entries enter the sum.

    Returns:
        ``[B]`` float; rows with no valid entry give ``-inf`` and pass no NaN gradient back.
    """
    return _RowLogSumExp.apply(torch.where(valid, x, _NEG_INF))


def _mean_over_valid(loss_bt: Tensor, pos_mask: Tensor) -> Tensor:
    """Mean of ``loss_bt [B, P]`` over ``pos_mask``; 0 (attached to the graph) when empty."""
    total = torch.where(pos_mask, loss_bt, torch.zeros_like(loss_bt)).sum()
    count = pos_mask.sum().clamp(min=1).to(loss_bt.dtype)
    return total / count


def _accidental_hits(pos_ids: Tensor, pos_mask: Tensor, neg_ids: Tensor) -> Tensor:
    """Which sampled ids equal any valid positive of their row.

    Uses a per-row sort and ``searchsorted`` instead of a ``[B, M, P]`` comparison.

    Args:
        pos_ids: ``[B, P]`` int64.
        pos_mask: ``[B, P]`` bool.
        neg_ids: ``[B, M]`` or shared ``[M]`` int64.

    Returns:
        ``[B, M]`` bool, True where the sample is an accidental hit.
    """
    b, p = pos_ids.shape
    ids = neg_ids.to(pos_ids.dtype)
    if ids.dim() == 1 and p > 0:
        return _shared_accidental_hits(pos_ids, pos_mask, ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(b, -1)  # [B, M] view
    if p == 0:
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    # Padding becomes a sentinel that no sampled id can equal (ids are >= 0, sentinel < min id).
    sentinel = torch.minimum(ids.min(), pos_ids.min()) - 1 if ids.numel() else pos_ids.min() - 1
    keyed = torch.where(pos_mask, pos_ids, sentinel)
    sorted_pos, _ = torch.sort(keyed, dim=1)  # [B, P]
    idx = torch.searchsorted(sorted_pos, ids.contiguous())  # [B, M]
    found = sorted_pos.gather(1, idx.clamp(max=p - 1))  # [B, M]
    return found == ids


def _drop_hits_(z: Tensor, pos_ids: Tensor, pos_mask: Tensor, neg_ids: Tensor) -> Tensor:
    """Set ``z[b, m] = -inf`` in place where sample ``m`` of row ``b`` is an accidental hit.

    Args:
        z: ``[B, M]`` float, modified in place (may be part of the autograd graph).
        pos_ids: ``[B, P]`` int64; pos_mask ``[B, P]`` bool.
        neg_ids: per-query ``[B, M]`` or shared ``[M]`` int64 sampled ids.

    Returns:
        ``[B] int64``: the number of hits of each row.
    """
    if neg_ids.dim() == 1 and pos_ids.shape[1] > 0:
        ids = neg_ids.to(pos_ids.dtype)
        if _branch_free(z.device):
            bias, n_hits = _shared_hit_bias(pos_ids, pos_mask, ids, z.dtype)  # [B, M], [B]
            z.add_(bias)
            return n_hits
        rows, cols, n_hits = _shared_hit_list(pos_ids, pos_mask, ids)  # [H], [H], [B]
        z.index_put_((rows, cols), torch.tensor(_NEG_INF, dtype=z.dtype, device=z.device))
        return n_hits
    hits = _accidental_hits(pos_ids, pos_mask, neg_ids)  # [B, M]
    z.masked_fill_(hits, _NEG_INF)
    return hits.sum(dim=1)


def _shared_accidental_hits(pos_ids: Tensor, pos_mask: Tensor, ids: Tensor) -> Tensor:
    """:func:`_accidental_hits` for shared ids ``[M]`` (see :func:`_shared_hit_bias`).

    Returns:
        ``[B, M]`` bool, True where ``ids[m]`` equals a valid positive of row ``b``.
    """
    bias, _ = _shared_hit_bias(pos_ids, pos_mask, ids, torch.float32)
    return bias == _NEG_INF


def _shared_hit_runs(pos_ids: Tensor, pos_mask: Tensor,
                     ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Where each positive's draws lie among the once-sorted shared ids ``[M]``: ``B * P``
    binary searches instead of ``B * M``.

    Returns:
        ``(sorted_ids [M], perm [M], lo [B, P], times [B, P], hits [B])``: the draws equal to
        positive ``(b, p)`` are ``perm[lo : lo + times]`` (``times = 0`` for a padded or
        undrawn positive); ``hits[b]`` counts row ``b``'s hits, each drawn id once also when
        the row lists it twice.
    """
    p = pos_ids.shape[1]
    sorted_ids, perm = torch.sort(ids)  # [M]
    pos = pos_ids.contiguous()
    lo = torch.searchsorted(sorted_ids, pos)  # [B, P]
    hi = torch.searchsorted(sorted_ids, pos, right=True)  # [B, P]
    times = torch.where(pos_mask, hi - lo, 0)  # [B, P] draws of each valid positive
    key, order = torch.where(times > 0, pos, -1).sort(dim=1)  # [B, P]
    once = times.gather(1, order)  # [B, P]
    if p > 1:
        once[:, 1:] *= key[:, 1:] != key[:, :-1]  # a repeated positive's draws count once
    return sorted_ids, perm, lo, times, once.sum(dim=1)


def _shared_hit_list(pos_ids: Tensor, pos_mask: Tensor,
                     ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The accidental hits of shared ids ``[M]`` as a list of ``(row, draw)`` entries: the runs
    of :func:`_shared_hit_runs` expanded (``O(B P + hits)``, no ``[B, M]`` tensor). The list's
    length is read on the host: for the CPU, where that is no device synchronisation.

    Returns:
        ``(rows [H], cols [H], hits [B])`` int64: ``ids[cols[h]]`` is a valid positive of row
        ``rows[h]`` (an entry may repeat when a row lists a positive twice); ``hits`` as in
        :func:`_shared_hit_runs`.
    """
    p = pos_ids.shape[1]
    _, perm, lo, times, n_hits = _shared_hit_runs(pos_ids, pos_mask, ids)
    t = times.flatten()  # [B * P]
    owner = torch.repeat_interleave(torch.arange(t.numel(), device=t.device), t)  # [H]
    start = torch.cumsum(t, 0) - t  # [B * P] first list entry of each positive
    within = torch.arange(owner.numel(), device=t.device) - start[owner]  # [H]
    cols = perm[lo.flatten()[owner] + within]  # [H] draw position
    return torch.div(owner, p, rounding_mode="floor"), cols, n_hits


def _shared_hit_bias(pos_ids: Tensor, pos_mask: Tensor, ids: Tensor,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The accidental hits of shared ids ``[M]`` as an additive mask, and their count per row.

    A drawn positive (:func:`_shared_hit_runs`) marks its first sorted position in a
    ``[B, M + 1]`` table (column ``M`` takes the positives that were not drawn), which every
    draw reads at the first sorted position of its own id (one ``[B, M]`` gather). Static shapes
    only: no tensor value is read on the host (no device synchronisation).

    Args:
        pos_ids: ``[B, P]`` int64; pos_mask ``[B, P]`` bool; ids ``[M]`` int64.
        dtype: float dtype of the mask.

    Returns:
        ``(bias [B, M] dtype, hits [B] int64)``: ``bias`` is ``-inf`` where ``ids[m]`` equals a
        valid positive of row ``b`` and ``0`` elsewhere; ``hits[b]`` counts those entries.
    """
    b = pos_ids.shape[0]
    m = ids.numel()
    sorted_ids, _, lo, times, n_hits = _shared_hit_runs(pos_ids, pos_mask, ids)
    first = torch.searchsorted(sorted_ids, ids)  # [M] first sorted position of each draw's id
    table = torch.zeros(b, m + 1, dtype=dtype, device=ids.device)  # [B, M + 1]
    table.scatter_(1, torch.where(times > 0, lo, m), _NEG_INF)
    return table.index_select(1, first), n_hits  # [B, M], [B]


# --------------------------------------------------------------------------------------------
# full softmax
# --------------------------------------------------------------------------------------------


def full_softmax_loss_from_scores(scores: Tensor, pos_ids: Tensor, pos_mask: Tensor) -> Tensor:
    """Dense reference multi-label full softmax loss.

    ``loss = mean over valid (b, t) of -x_bt + log(exp(x_bt) + sum_{c not in P_b} exp(x_bc))``.
    Materialises ``[B, L]``; use :func:`full_softmax_loss` for large ``L``.

    Args:
        scores: ``[B, L] float`` logits of every label.
        pos_ids: ``[B, P] int64`` padded positive label ids (padding values are ignored).
        pos_mask: ``[B, P] bool`` valid positives.

    Returns:
        Scalar tensor.

    Raises:
        LossInputError: on shape / dtype mismatches or positive ids outside ``[0, L)``.
    """
    _check_float("scores", scores, 2)
    _check_positives(pos_ids, pos_mask)
    if scores.shape[0] != pos_ids.shape[0]:
        raise LossInputError(
            f"scores has shape {_shape(scores)} but pos_ids has shape {_shape(pos_ids)}; "
            "both need the same batch size B"
        )
    num_labels = scores.shape[1]
    _check_id_range(pos_ids, pos_mask, num_labels)
    ids = torch.where(pos_mask, pos_ids, torch.zeros_like(pos_ids))  # [B, P] safe for gather
    # is_pos[b, c] = c is a valid positive of row b; scatter_add copes with duplicate ids.
    is_pos = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    is_pos.scatter_add_(1, ids, pos_mask.to(torch.int32))
    neg_valid = is_pos == 0  # [B, L]
    log_n = _masked_logsumexp(scores, neg_valid)  # [B]
    x_t = scores.gather(1, ids)  # [B, P]
    loss_bt = -x_t + torch.logaddexp(x_t, log_n.unsqueeze(1))  # [B, P]
    return _mean_over_valid(loss_bt, pos_mask)


def _check_id_range(pos_ids: Tensor, pos_mask: Tensor, num_labels: int) -> None:
    if pos_mask.any():
        valid = pos_ids[pos_mask]
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0 or hi >= num_labels:
            bad = lo if lo < 0 else hi
            raise LossInputError(
                f"positive label id {bad} is outside [0, {num_labels}) (number of labels); "
                "check pos_ids / pos_mask (padding must be masked out)"
            )


def _chunk_scores(
    queries: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, dtype: torch.dtype
) -> Tensor:
    """``[B, C]`` scores of labels ``start:stop`` in the accumulation dtype."""
    s = queries @ weight[start:stop].t()  # [B, C]
    if bias is not None:
        s = s + bias[start:stop]
    return s.to(dtype)


def _chunk_pos_mask(pos_ids: Tensor, pos_mask: Tensor, start: int, stop: int) -> Tensor:
    """``[B, C]`` bool: label ``start + j`` is a valid positive of row ``b``; no ``[B, L]``."""
    c = stop - start
    inside = pos_mask & (pos_ids >= start) & (pos_ids < stop)  # [B, P]
    cols = torch.where(inside, pos_ids - start, torch.full_like(pos_ids, c))  # [B, P]; c = trash
    buf = torch.zeros(pos_ids.shape[0], c + 1, dtype=torch.bool, device=pos_ids.device)
    buf.scatter_(1, cols, True)
    return buf[:, :c]


def _masked_chunk_lse(queries: Tensor, weight: Tensor, bias: Tensor | None, pos_ids: Tensor,
                      pos_mask: Tensor, chunk_size: int, acc: torch.dtype) -> Tensor:
    """``log sum_{c not in P_b} exp(q_b . w_c + b_c)`` over the rows of ``weight``, by chunks.

    The one chunked masked log-sum-exp (the full softmax here and the sharded one of
    :mod:`xmc_toolkit.distributed`, whose ``weight`` is a rank's rows and ``pos_ids`` local
    ids: ids outside ``[0, L)`` are in no chunk, so they mask nothing).

    Args:
        queries: ``[B, d]``; weight ``[L, d]``; bias ``[L]`` or ``None``.
        pos_ids: ``[B, P]`` int64 ids into ``weight``; pos_mask ``[B, P]`` bool.
        chunk_size: labels scored at once (never ``[B, L]``).
        acc: accumulation dtype.

    Returns:
        ``[B]`` in ``acc``; ``-inf`` for a row whose every label is a positive.
    """
    b = queries.shape[0]
    num_labels = weight.shape[0]
    log_n = torch.full((b,), _NEG_INF, dtype=acc, device=queries.device)  # [B]
    for start in range(0, num_labels, chunk_size):
        stop = min(start + chunk_size, num_labels)
        s = _chunk_scores(queries, weight, bias, start, stop, acc)  # [B, C]
        s = s.masked_fill(_chunk_pos_mask(pos_ids, pos_mask, start, stop), _NEG_INF)
        log_n = torch.logaddexp(log_n, torch.logsumexp(s, dim=1))  # [B]
    return log_n


def _masked_chunk_lse_backward(queries: Tensor, weight: Tensor, bias: Tensor | None,
                               pos_ids: Tensor, pos_mask: Tensor, chunk_size: int,
                               log_n_safe: Tensor, coef: Tensor, grad_q: Tensor | None,
                               grad_w: Tensor | None, grad_b: Tensor | None) -> None:
    """Add ``coef_b * d log_n_b / d (queries, weight, bias)`` of :func:`_masked_chunk_lse`
    into ``grad_q [B, d]``, ``grad_w [L, d]``, ``grad_b [L]`` (each optional), by chunks.

    ``log_n_safe [B]``: the forward's result with ``-inf`` replaced by 0; ``coef [B]``.
    ``grad_w`` / ``grad_b`` rows are *set* (each chunk is visited once), ``grad_q`` summed.
    """
    acc = log_n_safe.dtype
    q_acc = queries.to(acc)
    num_labels = weight.shape[0]
    for start in range(0, num_labels, chunk_size):
        stop = min(start + chunk_size, num_labels)
        s = _chunk_scores(queries, weight, bias, start, stop, acc)  # [B, C]
        s = s.masked_fill(_chunk_pos_mask(pos_ids, pos_mask, start, stop), _NEG_INF)
        gc = torch.exp(s - log_n_safe.unsqueeze(1)) * coef.unsqueeze(1)  # [B, C]
        if grad_q is not None:
            grad_q += gc @ weight[start:stop].to(acc)  # [B, d]
        if grad_w is not None:
            grad_w[start:stop] = gc.t() @ q_acc  # [C, d]
        if grad_b is not None:
            grad_b[start:stop] = gc.sum(dim=0)  # [C]


class MaskedLogSumExp(torch.autograd.Function):
    """Differentiable :func:`_masked_chunk_lse` (``[B]``): the negatives' log-normalizer of a
    (shard of the) label table, never ``[B, L]`` at once. ``apply(queries, weight, bias,
    pos_ids, pos_mask, chunk_size)``; rows whose result is ``-inf`` pass no gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        queries: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        pos_ids: Tensor,
        pos_mask: Tensor,
        chunk_size: int,
    ) -> Tensor:
        acc = torch.float64 if torch.float64 in (queries.dtype, weight.dtype) else torch.float32
        with torch.no_grad():
            lse = _masked_chunk_lse(queries, weight, bias, pos_ids, pos_mask, chunk_size, acc)
        ctx.save_for_backward(queries, weight, bias, pos_ids, pos_mask, lse)
        ctx.chunk_size = chunk_size
        return lse.to(queries.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        queries, weight, bias, pos_ids, pos_mask, lse = ctx.saved_tensors
        finite = torch.isfinite(lse)
        coef = torch.where(finite, g.to(lse.dtype), torch.zeros_like(lse))  # [B]
        lse0 = torch.where(finite, lse, torch.zeros_like(lse))  # [B]
        need_q, need_w, need_b = ctx.needs_input_grad[:3]
        grad_q = torch.zeros_like(queries, dtype=lse.dtype) if need_q else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        grad_b = (torch.zeros_like(bias, dtype=lse.dtype)
                  if (need_b and bias is not None) else None)
        _masked_chunk_lse_backward(queries, weight, bias, pos_ids, pos_mask, ctx.chunk_size,
                                   lse0, coef, grad_q, grad_w, grad_b)
        return (
            None if grad_q is None else grad_q.to(queries.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


class _ChunkedFullSoftmax(torch.autograd.Function):
    """Custom autograd for the chunked multi-label full softmax (see docs/losses.md)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        queries: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        pos_ids: Tensor,
        pos_mask: Tensor,
        chunk_size: int,
    ) -> Tensor:
        acc = torch.float64 if torch.float64 in (queries.dtype, weight.dtype) else torch.float32
        ids = torch.where(pos_mask, pos_ids, torch.zeros_like(pos_ids))  # [B, P]
        w_pos = weight[ids]  # [B, P, d]
        x_t = torch.einsum("bd,bpd->bp", queries, w_pos)  # [B, P]
        if bias is not None:
            x_t = x_t + bias[ids]
        x_t = x_t.to(acc)
        log_n = _masked_chunk_lse(queries, weight, bias, pos_ids, pos_mask, chunk_size, acc)
        loss_bt = -x_t + torch.logaddexp(x_t, log_n.unsqueeze(1))  # [B, P]
        count = int(pos_mask.sum())
        total = torch.where(pos_mask, loss_bt, torch.zeros_like(loss_bt)).sum()
        loss = total / max(count, 1)
        ctx.save_for_backward(queries, weight, bias, pos_ids, pos_mask, x_t, log_n)
        ctx.chunk_size = chunk_size
        ctx.count = count
        return loss.to(queries.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        queries, weight, bias, pos_ids, pos_mask, x_t, log_n = ctx.saved_tensors
        acc = x_t.dtype
        need_q, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.to(acc) / max(ctx.count, 1)
        # w_bt = g / n on valid pairs. d loss_bt / d x_bt = -sigmoid(log N_b - x_bt); for a
        # non-positive c: d loss_bt / d x_bc = exp(x_bc - log N_b) * sigmoid(log N_b - x_bt).
        sig = torch.sigmoid(log_n.unsqueeze(1) - x_t)  # [B, P]; 0 when N_b = 0
        w_bt = torch.where(pos_mask, sig * g, torch.zeros_like(sig))  # [B, P]
        g_row = w_bt.sum(dim=1)  # [B]
        has_neg = torch.isfinite(log_n)
        log_n_safe = torch.where(has_neg, log_n, torch.zeros_like(log_n))  # [B]
        ids = torch.where(pos_mask, pos_ids, torch.zeros_like(pos_ids))  # [B, P]
        gpos = -w_bt  # [B, P]: gradient w.r.t. the positive logits x_bt

        grad_q = torch.zeros_like(queries, dtype=acc) if need_q else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        q_acc = queries.to(acc)
        _masked_chunk_lse_backward(queries, weight, bias, pos_ids, pos_mask, ctx.chunk_size,
                                   log_n_safe, g_row, grad_q, grad_w, grad_b)
        # Positive-target terms.
        if grad_q is not None:
            grad_q += torch.einsum("bp,bpd->bd", gpos, weight[ids].to(acc))  # [B, d]
        if grad_w is not None:
            contrib = gpos.unsqueeze(2) * q_acc.unsqueeze(1)  # [B, P, d]
            grad_w.index_add_(0, ids.reshape(-1), contrib.reshape(-1, weight.shape[1]))
        if grad_b is not None:
            grad_b.index_add_(0, ids.reshape(-1), gpos.reshape(-1))
        return (
            None if grad_q is None else grad_q.to(queries.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def full_softmax_loss(
    queries: Tensor,
    weight: Tensor,
    pos_ids: Tensor,
    pos_mask: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 65536,
) -> Tensor:
    """Exact multi-label full softmax loss, chunked over labels with a custom backward.

    Scores ``x = queries @ weight.T + bias`` are never materialised as ``[B, L]``: forward and
    backward each hold one ``[B, chunk_size]`` block at a time (the backward recomputes the
    scores). The gradient w.r.t. ``weight`` is dense ``[L, d]`` (also when ``weight`` is the
    weight of an ``nn.Embedding(..., sparse=True)``); use a sampled loss for sparse updates.

    Args:
        queries: ``[B, d] float`` query embeddings.
        weight: ``[L, d] float`` label embeddings (e.g. ``nn.Embedding.weight``).
        pos_ids: ``[B, P] int64`` padded positive ids.
        pos_mask: ``[B, P] bool`` valid positives.
        bias: optional ``[L] float`` label bias.
        chunk_size: labels scored per block; memory is ``O(B * chunk_size)``.

    Returns:
        Scalar tensor, equal to :func:`full_softmax_loss_from_scores` on the dense scores.

    Raises:
        LossInputError: on shape / dtype mismatches, bad ``chunk_size`` or ids outside ``[0, L)``.
    """
    _check_float("queries", queries, 2)
    _check_float("weight", weight, 2)
    _check_positives(pos_ids, pos_mask)
    if queries.shape[1] != weight.shape[1]:
        raise LossInputError(
            f"queries has shape {_shape(queries)} but weight has shape {_shape(weight)}; "
            "the embedding dimension d must match ([B, d] and [L, d])"
        )
    if queries.shape[0] != pos_ids.shape[0]:
        raise LossInputError(
            f"queries has shape {_shape(queries)} but pos_ids has shape {_shape(pos_ids)}; "
            "both need the same batch size B"
        )
    if bias is not None:
        _check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise LossInputError(
                f"bias has shape {_shape(bias)} but weight has shape {_shape(weight)}; "
                "bias must be [L]"
            )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise LossInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_id_range(pos_ids, pos_mask, weight.shape[0])
    return _ChunkedFullSoftmax.apply(queries, weight, bias, pos_ids, pos_mask, chunk_size)


# --------------------------------------------------------------------------------------------
# sampled softmax
# --------------------------------------------------------------------------------------------


def sampled_softmax_loss(
    pos_scores: Tensor,
    pos_ids: Tensor,
    pos_mask: Tensor,
    pos_log_q: Tensor,
    neg_scores: Tensor,
    neg_ids: Tensor,
    neg_log_q: Tensor,
    correct_target: bool = False,
) -> Tensor:
    """Multi-label sampled softmax with log-q correction and accidental-hit removal.

    Default (``correct_target=False``), for each valid target ``t`` of row ``b``::

        loss_bt = -x_bt + log(exp(x_bt) + sum_{m valid} exp(x_bm - log(M'_b q_m / (1 - q(P_b)))))

    where samples equal to any positive of the row are removed, ``M'_b`` is the number of
    remaining samples and ``q(P_b) = sum_p exp(pos_log_q[b, p])``. With ``q`` equal to the
    softmax itself the estimate of ``N_b`` is exact for every draw.

    ``correct_target=True`` follows TensorFlow's ``tf.nn.sampled_softmax_loss``
    (``subtract_log_q=True``, ``remove_accidental_hits=True``, sampling with replacement): both
    the target and the sampled logits are shifted by ``-log(M q)`` with ``M`` the number of
    samples drawn (hits included), and there is no ``1 - q(P)`` factor::

        loss_bt = -x'_bt + log(exp(x'_bt) + sum_{m valid} exp(x_bm - log(M q_m))),
        x'_bt = x_bt - log(M q_t).

    Args:
        pos_scores: ``[B, P] float`` logits of the positives.
        pos_ids: ``[B, P] int64`` padded positive ids.
        pos_mask: ``[B, P] bool`` valid positives.
        pos_log_q: ``[B, P] float`` log-proposal of each positive (normalised over all labels).
        neg_scores: ``[B, M] float`` logits of the sampled ids (with shared ids, every row scores
            the same ``M`` ids).
        neg_ids: ``[B, M]`` per-query or ``[M]`` shared ``int64`` sampled ids.
        neg_log_q: ``[B, M]`` or ``[M] float`` log-proposal of each sample, same shape as
            ``neg_ids``.
        correct_target: use the TensorFlow convention described above.

    Returns:
        Scalar tensor (mean over valid pairs).

    Raises:
        LossInputError: on shape or dtype mismatches.
    """
    _check_float("pos_scores", pos_scores, 2)
    _check_positives(pos_ids, pos_mask)
    _check_same("pos_scores", pos_scores, "pos_ids", pos_ids)
    _check_float("pos_log_q", pos_log_q, 2)
    _check_same("pos_log_q", pos_log_q, "pos_ids", pos_ids)
    _check_negatives(neg_scores, neg_ids, neg_log_q, pos_scores.shape[0])

    m = neg_scores.shape[1]
    dtype = torch.promote_types(pos_scores.dtype, neg_scores.dtype)
    x_t = pos_scores.to(dtype)  # [B, P]
    x_c = neg_scores.to(dtype)  # [B, M]
    lq_c = neg_log_q.to(dtype)  # [B, M] or shared [M] (broadcast below)
    lq_t = pos_log_q.to(dtype)
    z = x_c - lq_c  # [B, M] a fresh tensor
    n_hits = _drop_hits_(z, pos_ids, pos_mask, neg_ids)  # [B]; z = -inf at the hits
    # log sum_{valid m} exp(x_bm - log q_m); the row constants of the correction added after
    lse = _RowLogSumExp.apply(z)  # [B]
    if correct_target:
        log_m = math.log(m) if m > 0 else 0.0
        log_n = lse - log_m  # [B]
        x_t = x_t - torch.where(pos_mask, lq_t, torch.zeros_like(lq_t)) - log_m  # [B, P]
    else:
        m_eff = (m - n_hits).clamp(min=1).to(dtype)  # [B] M'_b (clamped; -inf lse if 0)
        q_pos = torch.where(pos_mask, lq_t.exp(), torch.zeros_like(lq_t)).sum(dim=1)  # [B]
        tiny = torch.finfo(dtype).tiny
        log_rest = torch.log((1.0 - q_pos).clamp(min=tiny))  # [B] log(1 - q(P_b)), clamped
        log_n = lse - torch.log(m_eff) + log_rest  # [B] estimate of log N_b
    loss_bt = -x_t + torch.logaddexp(x_t, log_n.unsqueeze(1))  # [B, P]
    return _mean_over_valid(loss_bt, pos_mask)


# --------------------------------------------------------------------------------------------
# negative sampling
# --------------------------------------------------------------------------------------------


def negative_sampling_loss(
    pos_scores: Tensor,
    pos_ids: Tensor,
    pos_mask: Tensor,
    neg_scores: Tensor,
    neg_ids: Tensor,
    neg_log_q: Tensor | None = None,
    log_q_correction: bool = False,
) -> Tensor:
    """Word2vec-style negative sampling (binary logistic) loss, multi-label.

    For each valid target ``t`` of row ``b``::

        loss_bt = -log sigmoid(x_bt) - sum_{m valid} log sigmoid(-x'_bm)

    with the sum over the row's samples that are not accidental hits and, with
    ``log_q_correction=True``, ``x'_bm = x_bm - log(M q_m)`` (``M`` = samples drawn per row),
    else ``x'_bm = x_bm``. The loss is the mean of ``loss_bt`` over valid pairs (sum over
    negatives, mean over targets), so a row's negatives are counted once per positive.

    Args:
        pos_scores: ``[B, P] float`` logits of the positives.
        pos_ids: ``[B, P] int64`` padded positive ids.
        pos_mask: ``[B, P] bool`` valid positives.
        neg_scores: ``[B, M] float`` logits of the sampled ids.
        neg_ids: ``[B, M]`` or shared ``[M] int64`` sampled ids.
        neg_log_q: ``[B, M]`` or ``[M] float`` log-proposal of the samples; needed only with
            ``log_q_correction=True``.
        log_q_correction: subtract ``log(M q)`` from the negative logits.

    Returns:
        Scalar tensor.

    Raises:
        LossInputError: on shape / dtype mismatches, or ``log_q_correction=True`` without
            ``neg_log_q``.
    """
    _check_float("pos_scores", pos_scores, 2)
    _check_positives(pos_ids, pos_mask)
    _check_same("pos_scores", pos_scores, "pos_ids", pos_ids)
    _check_negatives(neg_scores, neg_ids, neg_log_q, pos_scores.shape[0])
    if log_q_correction and neg_log_q is None:
        raise LossInputError(
            "log_q_correction=True needs neg_log_q (the samples' log-proposal); pass "
            "neg_log_q=samples.log_q or set log_q_correction=False"
        )
    b, m = neg_scores.shape
    dtype = torch.promote_types(pos_scores.dtype, neg_scores.dtype)
    x_c = neg_scores.to(dtype)  # [B, M]
    if log_q_correction and neg_log_q is not None:
        lq = neg_log_q.to(dtype)
        if lq.dim() == 1:
            lq = lq.unsqueeze(0).expand(b, m)
        x_c = x_c - lq - (math.log(m) if m > 0 else 0.0)
    valid = ~_accidental_hits(pos_ids, pos_mask, neg_ids)  # [B, M]
    neg_term = torch.where(valid, -nn.functional.logsigmoid(-x_c), torch.zeros_like(x_c))
    neg_row = neg_term.sum(dim=1)  # [B]
    loss_bt = -nn.functional.logsigmoid(pos_scores.to(dtype)) + neg_row.unsqueeze(1)  # [B, P]
    return _mean_over_valid(loss_bt, pos_mask)


# --------------------------------------------------------------------------------------------
# thin modules
# --------------------------------------------------------------------------------------------


class FullSoftmaxLoss(nn.Module):
    """Module form of :func:`full_softmax_loss`; stores only ``chunk_size``.

    Args:
        chunk_size: labels scored per block.
    """

    def __init__(self, chunk_size: int = 65536) -> None:
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise LossInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(
        self,
        queries: Tensor,
        weight: Tensor,
        pos_ids: Tensor,
        pos_mask: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        """See :func:`full_softmax_loss`."""
        return full_softmax_loss(queries, weight, pos_ids, pos_mask, bias, self.chunk_size)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


class SampledSoftmaxLoss(nn.Module):
    """Module form of :func:`sampled_softmax_loss`; stores only ``correct_target``."""

    def __init__(self, correct_target: bool = False) -> None:
        super().__init__()
        self.correct_target = bool(correct_target)

    def forward(
        self,
        pos_scores: Tensor,
        pos_ids: Tensor,
        pos_mask: Tensor,
        pos_log_q: Tensor,
        neg_scores: Tensor,
        neg_ids: Tensor,
        neg_log_q: Tensor,
    ) -> Tensor:
        """See :func:`sampled_softmax_loss`."""
        return sampled_softmax_loss(
            pos_scores,
            pos_ids,
            pos_mask,
            pos_log_q,
            neg_scores,
            neg_ids,
            neg_log_q,
            correct_target=self.correct_target,
        )

    def extra_repr(self) -> str:
        return f"correct_target={self.correct_target}"


class NegativeSamplingLoss(nn.Module):
    """Module form of :func:`negative_sampling_loss`; stores only ``log_q_correction``."""

    def __init__(self, log_q_correction: bool = False) -> None:
        super().__init__()
        self.log_q_correction = bool(log_q_correction)

    def forward(
        self,
        pos_scores: Tensor,
        pos_ids: Tensor,
        pos_mask: Tensor,
        neg_scores: Tensor,
        neg_ids: Tensor,
        neg_log_q: Tensor | None = None,
    ) -> Tensor:
        """See :func:`negative_sampling_loss`."""
        return negative_sampling_loss(
            pos_scores,
            pos_ids,
            pos_mask,
            neg_scores,
            neg_ids,
            neg_log_q,
            log_q_correction=self.log_q_correction,
        )

    def extra_repr(self) -> str:
        return f"log_q_correction={self.log_q_correction}"
