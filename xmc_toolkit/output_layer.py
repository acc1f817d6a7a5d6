"""Label table ``[L, d]`` (+ bias) with sparse gradients, exact chunked top-k, MIDX approximate top-k.

Scores are inner products plus an optional bias: ``s(q, j) = q . w_j + b_j``.

Public API::

    LabelTable(num_labels, dim, bias=True, init_std=0.01, sparse=True)      nn.Module
        .weight: nn.Embedding(L, d, sparse=True)      .bias: nn.Embedding(L, 1, sparse=True) | None
        .score_ids(queries [B, d], ids [B, M] | [M]) -> [B, M]   (differentiable, sparse grads)
        .full_scores(queries [B, d], ids=None)       -> [B, L]   (small L; sparse grads)
        .topk(queries [B, d], k, chunk_size=65536)   -> (scores [B, k], ids [B, k])  (no grad)
        .label_embeddings() -> [L, d] (detached)      .bias_vector() -> [L] | None (detached)
    chunked_topk(queries [B, d], weight [L, d], bias [L] | None, k, chunk_size) -> (scores, ids)
    approx_topk(queries, weight, bias, sampler, k, num_cells=16, max_candidates=None)
    recall_at_k_vs_exact(approx_ids [B, k], exact_ids [B, k]) -> float

Ties in every top-k are broken deterministically: equal scores are ordered by increasing label
id, exactly like ``torch.sort(scores, descending=True, stable=True)`` on the dense scores.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, XMCError
from .native import kernels_for

__all__ = [
    "LabelTable",
    "chunked_topk",
    "approx_topk",
    "recall_at_k_vs_exact",
    "CellIndex",
]

logger = logging.getLogger(__name__)


class CellIndex(Protocol):
    """What :func:`approx_topk` needs from an index (``MIDXSampler`` after ``update()``)."""

    cell_indptr: torch.Tensor  # [C + 1] int64, C = K * K cells
    cell_items: torch.Tensor  # [L] int64 label ids sorted by cell

    def cell_logits(self, queries: torch.Tensor) -> torch.Tensor:  # [B, C], -inf for empty cells
        ...


def _check_k(k: int, num_labels: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"k={k!r} must be a positive integer (--topk / --k)")
    if k > num_labels:
        raise ConfigError(f"k={k} exceeds the number of labels ({num_labels}); lower --topk "
                          "(xmc predict) or --k (xmc eval)")


def _topk_fast(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row without a host sync, plus a flag telling whether it may be ambiguous.

    Args:
        scores: ``[B, c]`` float.
        k: ``1 <= k <= c``.

    Returns:
        ``(values [B, k], cols [B, k], ambiguous [] bool)``; columns in increasing order. When
        ``ambiguous`` is False the selected set is the unique top-k (no tie straddles the k-th
        place and no NaN), so tie-breaking cannot change it.
    """
    c = scores.shape[1]
    top = torch.topk(scores, min(k + 1, c), dim=1, sorted=True)  # one extra to detect ties
    ambiguous = torch.isnan(top.values[:, :1]).any()  # [] bool (topk ranks NaN first)
    if k < c:  # the set is unique iff the k-th and (k+1)-th values differ
        ambiguous = ambiguous | (top.values[:, k - 1] == top.values[:, k]).any()
    cols = torch.sort(top.indices[:, :k], dim=1).values  # [B, k]
    return scores.gather(1, cols), cols, ambiguous


def _select_topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row with ties at the boundary resolved to the smallest column.

    Args:
        scores: ``[B, c]`` float, no NaN.
        k: ``1 <= k <= c``.

    Returns:
        ``(values [B, k], cols [B, k])`` with columns in *increasing* order (not by score).

    Raises:
        XMCError: the scores contain NaN.
    """
    B, c = scores.shape
    vals, cols, ambiguous = _topk_fast(scores, k)
    if not bool(ambiguous):
        return vals, cols
    kth = vals.min(dim=1, keepdim=True).values  # [B, 1]
    gt = scores > kth  # [B, c]
    eq = scores == kth  # [B, c]
    need = k - gt.sum(dim=1, keepdim=True)  # [B, 1] how many of the ties to take
    take = gt | (eq & (eq.cumsum(dim=1) <= need))  # [B, c] exactly k per row
    cols = take.nonzero()[:, 1]  # [B * k] row-major, increasing within a row
    if cols.numel() != B * k:
        raise XMCError(
            "top-k scores contain NaN; check the input rows for huge or non-finite values "
            "and the label embeddings for NaN (a diverged model: retrain with a lower --lr)"
        )
    cols = cols.view(B, k)  # [B, k]
    return scores.gather(1, cols), cols


def _merge(
    run_s: torch.Tensor | None,
    run_i: torch.Tensor | None,
    new_s: torch.Tensor,
    new_i: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k (smaller ids) with a new block; keep the best ``k`` (ties: id order)."""
    if run_s is None or run_i is None:
        s, i = new_s, new_i
    else:
        s = torch.cat([run_s, new_s], dim=1)  # [B, k_run + kc]
        i = torch.cat([run_i, new_i], dim=1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]  # [B, <=k]
    return s.gather(1, order), i.gather(1, order)


@torch.no_grad()
def chunked_topk(
    queries: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` labels of ``queries . weight^T + bias`` without the full ``[B, L]`` matrix.

    Labels are scored in chunks of ``chunk_size``; each chunk's top-k is merged into a running
    top-k, so at most ``[B, chunk_size]`` scores (+ ``[B, 2k]`` for the merge) exist at once.

    Args:
        queries: ``[B, d]`` float.
        weight: ``[L, d]`` label embeddings (same device and dtype as ``queries``).
        bias: ``[L]`` (or ``[L, 1]``) label biases, or ``None``.
        k: labels to return per query (``1 <= k <= L``).
        chunk_size: labels scored at once.

    Returns:
        ``(scores [B, k] float, ids [B, k] int64)``, sorted by decreasing score; equal scores by
        increasing id.
    """
    if queries.dim() != 2 or weight.dim() != 2 or queries.shape[1] != weight.shape[1]:
        raise XMCError(
            f"queries {tuple(queries.shape)} and weight {tuple(weight.shape)} must be [B, d] and "
            "[L, d] with the same d"
        )
    L = weight.shape[0]
    _check_k(k, L)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive integer (--chunk-size)")
    if bias is not None:
        bias = bias.reshape(-1)  # [L]
    # Pass 1 uses the sync-free top-k; if any chunk had a tie straddling its k-th place (or a
    # NaN), pass 2 redoes the scan with exact id-order tie-breaking. Float scores rarely tie.
    for exact_ties in (False, True):
        run_s: torch.Tensor | None = None
        run_i: torch.Tensor | None = None
        ambiguous = torch.zeros((), dtype=torch.bool, device=queries.device)
        for start in range(0, L, chunk_size):
            stop = min(L, start + chunk_size)
            if bias is None:
                s = queries @ weight[start:stop].T  # [B, c]
            else:  # one fused op: no second [B, c] block for the bias add
                s = torch.addmm(bias[start:stop].to(queries.dtype), queries, weight[start:stop].T)
            kc = min(k, stop - start)
            if exact_ties:
                vals, cols = _select_topk_stable(s, kc)  # [B, kc]
            else:
                vals, cols, amb = _topk_fast(s, kc)
                ambiguous |= amb
            run_s, run_i = _merge(run_s, run_i, vals, cols + start, k)
        if exact_ties or not bool(ambiguous):  # one host sync per call
            break
    assert run_s is not None and run_i is not None  # L >= k >= 1, so at least one chunk
    return run_s, run_i


@torch.no_grad()
def approx_topk(
    queries: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sampler: CellIndex | Any,
    k: int,
    num_cells: int = 16,
    max_candidates: int | None = None,
    row_block: int | None = None,
    bias_bound: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``k`` through the MIDX inverted multi-index, re-ranked exactly.

    For each query: score all ``K * K`` codeword-pair cells with ``sampler.cell_logits``, keep
    the ``num_cells`` best non-empty cells, gather their member labels (in cell-rank order, cut at
    ``max_candidates``), score those candidates exactly (``q . w + b``) and return the best ``k``.
    With ``num_cells = K * K`` and no cap this is exact.

    Args:
        queries: ``[B, d]`` float.
        weight: ``[L, d]`` label embeddings (those the index was built from, or newer).
        bias: ``[L]`` or ``None``.
        sampler: an updated ``MIDXSampler`` (anything with ``cell_indptr`` ``[C + 1]``,
            ``cell_items`` ``[L]`` and ``cell_logits(queries) -> [B, C]``).
        k: results per query.
        num_cells: cells probed per query (``<= C``; clamped).
        max_candidates: cap on candidates per query (``None``: no cap).
        row_block: queries re-ranked at once (``None``: chosen to keep the gathered
            ``[rows, candidates, d]`` block under about 16M floats on CPU, 64M on GPU).
        bias_bound: rank the cells by ``a1 + a2 + max bias in the cell`` (the index's
            ``cell_bias_max``) instead of ``a1 + a2``: labels with a large bias are no longer
            hidden in cells whose codewords score low. With ``num_cells = K * K`` and a
            ``max_candidates`` budget the probe is adaptive per query: cells are taken in that
            order until the budget is filled.

    Returns:
        ``(scores [B, k], ids [B, k] int64)`` sorted by decreasing score (ties by id). Slots
        without a candidate (fewer than ``k`` labels in the probed cells) hold score ``-inf``
        and id ``-1``: probe more cells (``num_cells``) or raise ``max_candidates``.
    """
    for attr in ("cell_indptr", "cell_items", "cell_logits"):
        if not hasattr(sampler, attr):
            raise XMCError(
                f"approx_topk needs a MIDX index with {attr!r}; got {type(sampler).__name__} "
                "(use --sampler midx and call sampler.update(label_embeddings) first)"
            )
    L = weight.shape[0]
    _check_k(k, L)
    if isinstance(num_cells, bool) or not isinstance(num_cells, int) or num_cells <= 0:
        raise ConfigError(f"num_cells={num_cells!r} must be a positive integer (--num-cells)")
    if max_candidates is not None and (not isinstance(max_candidates, int) or max_candidates < k):
        raise ConfigError(f"max_candidates={max_candidates!r} must be an integer >= k={k}")
    dev = queries.device
    indptr = sampler.cell_indptr.to(dev)  # [C + 1]
    items = sampler.cell_items.to(dev)  # [L]
    C = indptr.numel() - 1
    logits = sampler.cell_logits(queries)  # [B, C]
    if logits.shape != (queries.shape[0], C):
        raise XMCError(
            f"cell_logits returned {tuple(logits.shape)}, expected {(queries.shape[0], C)}"
        )
    if bias_bound:
        cb = getattr(sampler, "cell_bias_max", None)
        if cb is None or cb.shape != (C,):
            raise XMCError("bias_bound=True needs the index's cell_bias_max [C] (an updated "
                           "MIDXSampler); use bias_bound=False")
        logits = logits + cb.to(dev)  # [B, C]
    nc = min(num_cells, C)
    cells = torch.topk(logits, nc, dim=1).indices  # [B, nc] best cells first
    counts = indptr[cells + 1] - indptr[cells]  # [B, nc] (empty cells: 0)
    ends = counts.cumsum(dim=1)  # [B, nc] end of each cell in the row's candidate list
    total = ends[:, -1]  # [B]
    if max_candidates is not None:
        total = total.clamp(max=max_candidates)
    B, d = queries.shape
    M_all = max(int(total.max().item()) if total.numel() else 0, 1)
    kk = min(k, M_all)
    bias_flat = None if bias is None else bias.reshape(-1)
    # Rows sorted by candidate count, so each block pads only to its own largest row (a few
    # queries that hit huge cells no longer inflate every block).
    order = torch.argsort(total)  # [B]
    tot_sorted = total[order].cpu().numpy()  # [B] ascending
    budget = 1 << (26 if dev.type == "cuda" else 24)  # gathered [rows, M, d] floats per block
    scores = queries.new_full((B, kk), float("-inf"))  # [B, kk]
    ids = torch.full((B, kk), -1, dtype=torch.long, device=dev)  # [B, kk]
    start = 0
    while start < B:
        if row_block is not None:
            stop = min(B, start + row_block)
        else:  # the most rows with rows x (largest count among them) x d <= budget
            rows = np.arange(1, B - start + 1)
            fits = rows * np.maximum(tot_sorted[start:], 1) * d <= budget
            stop = start + max(1, int(np.count_nonzero(fits)))  # fits is monotone: a prefix
        sel = order[start:stop]  # [b] original row ids
        start = stop
        M = max(int(tot_sorted[stop - 1]), 1)  # this block's largest candidate count
        cl, en, tt = cells[sel], ends[sel], total[sel]  # [b, nc], [b, nc], [b]
        cn = counts[sel]
        slot = torch.arange(M, device=dev).expand(sel.numel(), M)  # [b, M]
        rank = torch.searchsorted(en, slot.contiguous(), right=True).clamp(max=nc - 1)  # [b, M]
        within = slot - (en - cn).gather(1, rank)  # [b, M] position inside its cell
        pos = indptr[cl.gather(1, rank)] + within  # [b, M] position in cell_items
        v = slot < tt.unsqueeze(1)  # [b, M]
        c = torch.where(v, items[pos.clamp(max=items.numel() - 1)], -1)  # [b, M] label ids
        w = weight[c.clamp(min=0)]  # [b, M, d]
        sc = torch.einsum("bmd,bd->bm", w, queries[sel])  # [b, M]
        if bias_flat is not None:
            sc = sc + bias_flat[c.clamp(min=0)]
        sc = sc.masked_fill(~v, float("-inf"))
        # Order candidates by id so ties resolve to the smallest id (-1 padding sorts first but
        # carries -inf, so it only appears when a row has fewer than k candidates).
        c_sorted, perm = torch.sort(c, dim=1)
        s_sorted = sc.gather(1, perm)
        kb = min(kk, M)
        vals, cols = _select_topk_stable(s_sorted, kb)  # [b, kb] in id order
        bid = c_sorted.gather(1, cols)
        o = torch.sort(vals, dim=1, descending=True, stable=True).indices
        scores[sel, :kb] = vals.gather(1, o)
        ids[sel, :kb] = bid.gather(1, o)
    if kk < k:  # fewer candidates than k everywhere: pad
        pad = k - kk
        scores = torch.cat([scores, scores.new_full((B, pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((B, pad), -1)], 1)
    return scores, ids


@torch.no_grad()
def recall_at_k_vs_exact(approx_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean fraction of the exact top-k ids found by the approximate top-k.

    Args:
        approx_ids: ``[B, k]`` int64 (``-1`` = no result, never a hit).
        exact_ids: ``[B, k]`` int64 distinct ids per row.

    Returns:
        Recall in ``[0, 1]`` averaged over rows (``|approx ∩ exact| / k``).
    """
    if approx_ids.shape != exact_ids.shape or approx_ids.dim() != 2:
        raise XMCError(
            f"approx_ids {tuple(approx_ids.shape)} and exact_ids {tuple(exact_ids.shape)} must "
            "both be [B, k]"
        )
    if approx_ids.numel() == 0:
        return 1.0
    ex = torch.sort(exact_ids.to(approx_ids.device), dim=1).values  # [B, k]
    pos = torch.searchsorted(ex, approx_ids.contiguous()).clamp(max=ex.shape[1] - 1)  # [B, k]
    hit = (ex.gather(1, pos) == approx_ids) & (approx_ids >= 0)  # [B, k]
    return float(hit.float().mean().item())


# floats in one gathered block of label rows (``[rows, M, d]``) when scoring per-query ids on
# the CPU: big enough that the per-block overhead vanishes, small enough to stay in cache
_SCORE_BLOCK_FLOATS = 1 << 17


def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A row-sparse COO tensor of *sorted, distinct* ``rows [U]`` and ``values [U, ...]``."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, size, is_coalesced=True,
                                   check_invariants=False)


_workspace_lock = threading.Lock()
# (dtype, d) -> (block, the use count of its storage when nothing else refers to it)
_workspaces: dict[tuple[torch.dtype, int], tuple[torch.Tensor, int]] = {}


def _storage_uses(t: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


def _gradient_workspace(rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``[rows, dim]`` CPU block for a row gradient, reused across steps when it is free.

    A fresh ``[U, d]`` block each step costs its page faults (at ``U = 2.3e5, d = 128`` about
    55 ms on one core, more than filling it): the block of the previous step is handed out again
    when nothing but this cache refers to its storage any more (the gradient that used it was
    freed by ``zero_grad(set_to_none=True)``); while a gradient still holds it (kept, or being
    accumulated over several backward passes) a fresh block is allocated, so a live gradient is
    never overwritten.
    """
    key = (dtype, dim)
    with _workspace_lock:
        held = _workspaces.get(key)
        free = held is not None and _storage_uses(held[0]) == held[1]
        if held is not None and free and held[0].shape[0] >= rows:
            return held[0][:rows]
        fresh = torch.empty(max(rows, 1), dim, dtype=dtype)
        if held is None or free:  # keep the larger one for the next step
            _workspaces[key] = (fresh, _storage_uses(fresh))
        return fresh[:rows]


def _query_bags(queries: torch.Tensor, perm: torch.Tensor, gs: torch.Tensor,
                starts: torch.Tensor, per_query: int) -> torch.Tensor:
    """``out[u] = sum_{e in row u's sorted entries} gs[e] * queries[perm[e] // per_query]``.

    Args:
        queries: ``[B, d]``.
        perm: ``[N] int64`` flat entry (``b * per_query + m``) of each sorted entry.
        gs: ``[N]`` the gradient of each sorted entry.
        starts: ``[U] int64`` first sorted entry of each distinct row (increasing).
        per_query: ``M``, entries a query.

    Returns:
        ``[U, d]``: through the native ``bag_rows_`` into a reused workspace
        (:func:`_gradient_workspace`) for float32, else one ``embedding_bag`` over the queries
        (the same sums, to float rounding; tested).
    """
    mod = kernels_for(queries) if hasattr(torch._C, "_storage_Use_Count") else None
    if mod is not None:
        out = _gradient_workspace(starts.numel(), queries.shape[1], queries.dtype)
        mod.bag_rows_(out, queries.contiguous(), perm.contiguous(), gs.contiguous(),
                      starts.contiguous(), per_query)
        return out
    qrow = torch.div(perm, per_query, rounding_mode="floor")  # [N] query of each entry
    return F.embedding_bag(qrow, queries, starts, mode="sum", per_sample_weights=gs)


class _PerQueryScores(torch.autograd.Function):
    """``s[b, m] = q_b . w[ids[b, m]] (+ bias[ids[b, m]])`` on the CPU, with coalesced row gradients.

    Forward: the rows of a few queries at a time are gathered (a cache-sized ``[b, M, d]``
    block) and scored by one ``bmm``; no ``[B, M, d]`` block is kept for the backward.
    Backward: the ``B * M`` ids are sorted once; the weight gradient of each *distinct* row
    (the sum over its entries of ``g[b, m] q_b``) is one weighted bag of queries, so one
    ``embedding_bag`` over the sorted entries writes it straight into ``[U, d]`` (no ``[B, M,
    d]`` block), returned as a COO tensor flagged coalesced (rows sorted and distinct by
    construction): the optimizer never sorts the ``B * M`` gradient rows again. The bias
    gradient is a segment sum of ``g`` (``[U, 1]``); the query gradient one weighted bag of
    label rows per query (``embedding_bag`` again).

    On CUDA the sort of the ids would need the number of distinct rows on the host (a sync),
    so :meth:`LabelTable.score_ids` uses this only on the CPU.
    """

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        B, M = ids.shape
        d = weight.shape[1]
        out = torch.empty(B, M, dtype=weight.dtype, device=weight.device)  # [B, M]
        if B and M:
            step = max(1, _SCORE_BLOCK_FLOATS // (M * d))
            for s in range(0, B, step):
                e = min(B, s + step)
                w = weight.index_select(0, ids[s:e].reshape(-1)).view(e - s, M, d)  # [b, M, d]
                torch.bmm(w, queries[s:e].unsqueeze(-1), out=out[s:e].unsqueeze(-1))
            if bias is not None:
                out.add_(bias.view(-1).index_select(0, ids.reshape(-1)).view(B, M))
        ctx.save_for_backward(queries, weight, ids)
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        queries, weight, ids = ctx.saved_tensors
        B, M = ids.shape
        L, d = weight.shape
        g = grad_out.contiguous()  # [B, M]
        need_q, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            ctx.has_bias and ctx.needs_input_grad[2])
        grad_q = grad_w = grad_b = None
        n = B * M
        if need_q:  # grad_q[b] = sum_m g[b, m] w[ids[b, m]]: one weighted bag of rows a query
            if n:
                offsets = torch.arange(0, n, M, device=ids.device)  # [B]
                grad_q = F.embedding_bag(ids.reshape(-1), weight, offsets, mode="sum",
                                         per_sample_weights=g.reshape(-1))  # [B, d]
            else:
                grad_q = torch.zeros_like(queries)
        if (need_w or need_b) and n == 0:  # nothing scored: empty row gradients
            rows = ids.new_empty(0)
            if need_w:
                grad_w = _sparse_rows(rows, weight.new_empty(0, d), (L, d))
            if need_b:
                grad_b = _sparse_rows(rows, weight.new_empty(0, 1), ctx.bias_shape)
        elif need_w or need_b:
            keys = ids.reshape(-1)  # [N]
            if L <= torch.iinfo(torch.int32).max:  # int32 keys sort in half the time
                keys = keys.to(torch.int32)
            srt, perm = torch.sort(keys)  # [N] rows in order, and their entries
            new = torch.ones(n, dtype=torch.bool, device=ids.device)  # first entry of a row
            new[1:] = srt[1:] != srt[:-1]
            starts = new.nonzero().squeeze(1)  # [U] first sorted entry of each distinct row
            rows = srt.index_select(0, starts).long()  # [U] sorted, distinct
            gs = g.reshape(-1).index_select(0, perm)  # [N] gradient of each sorted entry
            if need_w:  # grad_w[u] = sum over row u's entries of g[b, m] q_b: a bag of queries
                vals = _query_bags(queries, perm, gs, starts, M)  # [U, d]
                grad_w = _sparse_rows(rows, vals, (L, d))
            if need_b:
                seg = new.cumsum(0) - 1  # [N] distinct row of each sorted entry
                bvals = torch.zeros(rows.numel(), dtype=g.dtype, device=g.device)
                bvals.index_add_(0, seg, gs)
                grad_b = _sparse_rows(rows, bvals.view(-1, 1), ctx.bias_shape)
        return grad_q, grad_w, grad_b, None


class LabelTable(nn.Module):
    """Label embeddings ``[L, d]`` and biases ``[L]`` stored as sparse-gradient embeddings.

    Gradients only touch the rows that were looked up, so a step with ``M`` sampled labels costs
    ``O(M d)``, not ``O(L d)``; optimise the parameters with ``torch.optim.SparseAdam`` (or SGD /
    Adagrad, which accept sparse gradients).

    Args:
        num_labels: ``L``.
        dim: ``d``.
        bias: keep a per-label bias (initialised to 0).
        init_std: std of the normal initialisation of the embeddings.
        sparse: sparse gradients (``False``: dense, e.g. for small L and AdamW).
    """

    def __init__(
        self,
        num_labels: int,
        dim: int,
        bias: bool = True,
        init_std: float = 0.01,
        sparse: bool = True,
    ) -> None:
        super().__init__()
        probs = []
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels <= 0:
            probs.append(f"num_labels={num_labels!r} must be a positive integer")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            probs.append(f"dim={dim!r} must be a positive integer (--dim)")
        if not init_std >= 0:
            probs.append(f"init_std={init_std!r} must be >= 0")
        if probs:
            raise ConfigError(probs)
        self.num_labels = num_labels
        self.dim = dim
        self.weight = nn.Embedding(num_labels, dim, sparse=sparse)
        nn.init.normal_(self.weight.weight, std=init_std)
        self.bias: nn.Embedding | None = None
        if bias:
            self.bias = nn.Embedding(num_labels, 1, sparse=sparse)
            nn.init.zeros_(self.bias.weight)

    # -- accessors ----------------------------------------------------------------------------
    def label_embeddings(self) -> torch.Tensor:
        """Detached ``[L, d]`` weight (a view; for samplers, export, top-k)."""
        return self.weight.weight.detach()

    def bias_vector(self) -> torch.Tensor | None:
        """Detached ``[L]`` bias, or ``None``."""
        return None if self.bias is None else self.bias.weight.detach().view(-1)

    # -- scoring ------------------------------------------------------------------------------
    def score_ids(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scores of given labels (differentiable; sparse gradients on the touched rows).

        Args:
            queries: ``[B, d]``.
            ids: ``[B, M]`` int64 per-query ids, or ``[M]`` ids shared by every query.

        Returns:
            ``[B, M]`` scores ``q_b . w_id + b_id``.
        """
        if ids.dim() == 1:
            w = self.weight(ids)  # [M, d]
            s = queries @ w.T  # [B, M] one dense matmul
            if self.bias is not None:
                s = s + self.bias(ids).view(1, -1)
            return s
        if ids.dim() != 2 or ids.shape[0] != queries.shape[0]:
            raise XMCError(
                f"ids {tuple(ids.shape)} must be [M] or [B, M] with B = {queries.shape[0]}"
            )
        if self._coalesced_scores(queries, ids):
            bias = None if self.bias is None else self.bias.weight
            return _PerQueryScores.apply(queries, self.weight.weight, bias, ids)
        w = self.weight(ids)  # [B, M, d]
        s = torch.bmm(w, queries.unsqueeze(-1)).squeeze(-1)  # [B, M]
        if self.bias is not None:
            s = s + self.bias(ids).squeeze(-1)  # [B, M]
        return s

    def _coalesced_scores(self, queries: torch.Tensor, ids: torch.Tensor) -> bool:
        """Whether per-query ``ids`` are scored by :class:`_PerQueryScores`: on the CPU, with
        sparse gradients, outside autocast, queries of the table's dtype, int64 ids."""
        w = self.weight.weight
        return (w.device.type == "cpu" and queries.device.type == "cpu" and self.weight.sparse
                and queries.dtype == w.dtype and ids.dtype == torch.int64
                and not torch.is_autocast_enabled("cpu"))

    def full_scores(self, queries: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """All ``[B, L]`` scores (or ``[B, M]`` for shared ``ids [M]``); for small ``L`` only.

        The rows are looked up through the embeddings, so gradients stay sparse (SparseAdam).
        """
        if ids is None:
            ids = torch.arange(self.num_labels, device=self.weight.weight.device)
        return self.score_ids(queries, ids)

    @torch.no_grad()
    def topk(
        self, queries: torch.Tensor, k: int, chunk_size: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` labels by chunks (see :func:`chunked_topk`): ``(scores, ids) [B, k]``."""
        return chunked_topk(
            queries, self.label_embeddings(), self.bias_vector(), k, chunk_size=chunk_size
        )

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, dim={self.dim}, bias={self.bias is not None}"
