"""MIDX: the inverted-multi-index adaptive sampler (Chen et al., 2025).

The label embeddings ``W [L, d]`` are quantized with two codebooks of ``K`` codewords
(product quantization ``pq``: one codebook per half of the dimensions; residual quantization
``rq``: the second codebook quantizes the residual of the first). Every label falls in one of
``K * K`` cells ``(k1, k2)``. For a query ``q`` with codeword scores ``a1 = C1 q1``, ``a2 = C2 q2``
(pq) or ``a1 = C1 q``, ``a2 = C2 q`` (rq), both ``[K]``, the proposal is

    q(i | q) = exp(a1[k1(i)] + a2[k2(i)]) * w_i / Z,   Z = sum_{k1,k2} N[k1,k2] exp(a1[k1] + a2[k2])

with per-label static weights ``w_i`` (1; or ``(count_i + smoothing) ** alpha`` with
``within_cell="popularity"``; times ``exp(b_i)`` when a bias is given to :meth:`update`) and
``N[k1, k2] = sum_{i in cell} w_i``. ``log q`` is exact and normalized (``log Z`` included).
With ``within_cell="exact"`` the within-cell weight becomes ``exp(q . (w_i - w^_i) + b_i)`` and the
proposal equals the true softmax (``O(L d)`` per query; for tests and diagnostics).

Sampling draws the cell jointly (inverse CDF over the ``[B, K^2]`` cell weights: one cumulative
sum a row and a binary search a draw, the law of ``torch.multinomial``),
then an item inside the cell: uniformly (``offset = floor(u * count)``) or, with weights, by
inverse CDF over a per-cell cumulative weight array (``torch.searchsorted``). Shared mode draws
from the batch mixture ``(1/B) sum_b q(. | q_b)`` whose cell marginal has the closed form
``N * (E1^T diag(1/Z') E2) / B`` (``E = exp(a - max a)``), a ``[K, B] x [B, K]`` product.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..codebook import (
    codewords_from_cells,
    nearest_codes,
    product_quantize,
    reconstruct,
    residual_quantize,
)
from ..device import branch_free as _branch_free
from ..errors import CheckpointError, ConfigError, SamplerError
from ..native import kernels_for
from .base import Sampler, Samples, _check_embeddings, _check_queries
from .static import _load_strict

__all__ = ["MIDXSampler", "QUANTIZERS", "WITHIN_CELL", "merge_cells", "cell_sums"]

logger = logging.getLogger(__name__)

QUANTIZERS = ("pq", "rq")
WITHIN_CELL = ("uniform", "popularity", "exact")


# ---------------------------------------------------------------------------------------------
# pure kernels
# ---------------------------------------------------------------------------------------------
def codeword_scores(
    queries: Tensor, codebooks: tuple[Tensor, Tensor], quantizer: str
) -> tuple[Tensor, Tensor]:
    """Scores of the queries against both codebooks.

    Args:
        queries: ``[B, d]`` float.
        codebooks: ``(C1, C2)``: pq ``[K, d1]``, ``[K, d - d1]``; rq ``[K, d]`` each.
        quantizer: ``"pq"`` or ``"rq"``.

    Returns:
        ``(a1, a2)``, each ``[B, K]`` float32.
    """
    c1, c2 = codebooks
    q = queries.to(c1.dtype)
    if quantizer == "pq":
        d1 = c1.shape[1]
        return q[:, :d1] @ c1.t(), q[:, d1:] @ c2.t()
    return q @ c1.t(), q @ c2.t()


_TINY = 1e-280  # below this a max-shifted float64 normalizer has lost precision: go dense
_DENSE_CHUNK = 1 << 22  # [rows, K^2] entries per chunk of the dense fallback


def _dense_cell_logits(a1: Tensor, a2: Tensor, log_n: Tensor) -> Tensor:
    """``[B, K^2]`` float64 cell logits ``a1[k1] + a2[k2] + log N[k1, k2]``."""
    b, k = a1.shape
    return (a1.double().unsqueeze(2) + a2.double().unsqueeze(1)).reshape(b, k * k) + log_n.double()


def _dense_log_normalizer(a1: Tensor, a2: Tensor, log_n: Tensor) -> Tensor:
    """``[B]`` float64 ``log Z_b`` by a dense log-sum-exp over the cells, in row chunks of at most
    ``_DENSE_CHUNK`` entries (chunk sizes depend on shapes only: no host synchronisation)."""
    rows = max(1, _DENSE_CHUNK // log_n.numel())
    return torch.cat([
        torch.logsumexp(_dense_cell_logits(a1[s : s + rows], a2[s : s + rows], log_n), dim=1)
        for s in range(0, a1.shape[0], rows)
    ])


def _dense_mixture(a1: Tensor, a2: Tensor, log_n: Tensor) -> Tensor:
    """``[K^2]`` float64 log cell marginal of the batch mixture, exactly: a log-sum-exp over the
    batch of the dense ``[rows, K^2]`` cell log-probs, row chunks as in
    :func:`_dense_log_normalizer` (no host synchronisation)."""
    b = a1.shape[0]
    rows = max(1, _DENSE_CHUNK // log_n.numel())
    acc = None
    for start in range(0, b, rows):
        lg = _dense_cell_logits(a1[start : start + rows], a2[start : start + rows], log_n)
        lp = lg - torch.logsumexp(lg, dim=1, keepdim=True)  # [rows, K^2] cell log-probs
        part = torch.logsumexp(lp, dim=0)  # [K^2]
        acc = part if acc is None else torch.logaddexp(acc, part)
    assert acc is not None
    return acc - math.log(b)


def cell_log_normalizer(a1: Tensor, a2: Tensor, log_n: Tensor) -> Tensor:
    """``log Z_b = log sum_{k1,k2} N[k1,k2] exp(a1[b,k1] + a2[b,k2])``.

    Off the CPU, and on the CPU when ``B * K^2 <= 4M``: a dense float64 log-sum-exp over the
    cells (in row chunks): exact, robust, and free of host synchronisation (on a GPU this costs
    less than one synchronisation). Larger CPU batches use the max-shifted closed form
    ``log rowsum((E1 @ N') * E2) + shift`` in float64 without a ``[B, K^2]`` tensor; rows whose
    shifted sum underflows (score spreads of hundreds of nats where the best codewords meet only
    empty cells) are then recomputed densely -- a data-dependent branch, which is why it is used
    on the CPU only (where reading a value has no device to wait for).

    Args:
        a1, a2: ``[B, K]`` codeword scores.
        log_n: ``[K * K]`` log cell weights (``-inf`` for empty cells).

    Returns:
        ``[B]`` float64.
    """
    if _branch_free(a1.device) or a1.shape[0] * log_n.numel() <= _DENSE_CHUNK:
        return _dense_log_normalizer(a1, a2, log_n)
    e1, e2, nm, shift = _exp_factors(a1, a2, log_n)
    z = ((e1 @ nm) * e2).sum(1)  # [B]
    out = torch.log(z) + shift
    bad = ~(z > _TINY)
    if bool(bad.any()):  # CPU only: no device synchronisation
        rows = bad.nonzero().flatten()
        out[rows] = torch.logsumexp(_dense_cell_logits(a1[rows], a2[rows], log_n), dim=1)
    return out


def _exp_factors(a1: Tensor, a2: Tensor, log_n: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Max-shifted float64 factors: E1 [B, K], E2 [B, K], N' [K, K], and the total shift [B]."""
    k = a1.shape[1]
    a1 = a1.double()
    a2 = a2.double()
    m1 = a1.amax(1)  # [B]
    m2 = a2.amax(1)  # [B]
    ln = log_n.double()
    nmax = ln.max()
    e1 = torch.exp(a1 - m1.unsqueeze(1))  # [B, K]
    e2 = torch.exp(a2 - m2.unsqueeze(1))  # [B, K]
    nm = torch.exp(ln - nmax).view(k, k)  # [K, K], 0 for empty cells
    return e1, e2, nm, m1 + m2 + nmax


def mixture_cell_log_prob(a1: Tensor, a2: Tensor, log_n: Tensor) -> Tensor:
    """Log cell marginal of the batch mixture ``(1/B) sum_b q(. | q_b)``.

    On the CPU: ``P[k1, k2] = N'[k1, k2] * sum_b E1[b, k1] E2[b, k2] / Z'_b / B`` -- a
    ``[K, B] x [B, K]`` product, with the max-shifted factors of :func:`cell_log_normalizer`
    (cells whose mixture probability is below ~1e-300 may come out as 0); when some ``Z'_b``
    underflows, the mixture is computed exactly as a log-sum-exp over the batch of dense
    ``[rows, K^2]`` cell log-probs. That choice is a data-dependent branch, so off the CPU the
    dense, exact form is always used (no host synchronisation; ``O(B K^2)`` like per-query
    sampling, cheap on a GPU).

    Returns:
        ``[K * K]`` float64, ``-inf`` for empty cells; ``logsumexp == 0``.
    """
    if _branch_free(a1.device):
        return _dense_mixture(a1, a2, log_n)
    b = a1.shape[0]
    e1, e2, nm, _ = _exp_factors(a1, a2, log_n)
    zp = ((e1 @ nm) * e2).sum(1)  # [B]
    if bool((zp > _TINY).all()):  # CPU only: no device synchronisation
        mix = (e1 / zp.unsqueeze(1)).t() @ e2  # [K, K]
        return torch.log(nm * mix / b).flatten()
    return _dense_mixture(a1, a2, log_n)


def _inverse_cdf_rows(weights: Tensor, num_samples: int,
                      generator: torch.Generator | None) -> Tensor:
    """``num_samples`` draws with replacement from each row of ``weights`` by inverse CDF.

    The law of ``torch.multinomial(weights, num_samples, True)`` (entry ``j`` of row ``b`` with
    probability ``weights[b, j] / weights[b].sum()``; zero-weight entries never), from float64
    uniforms of ``generator``: see :func:`_inverse_cdf_draw`.

    Args:
        weights: ``[B, C]`` float, non-negative, every row with a positive sum.
        num_samples: ``M``.
        generator: optional ``torch.Generator`` for the uniforms.

    Returns:
        ``[B, M] int64`` column indices.
    """
    u = torch.rand(weights.shape[0], num_samples, generator=generator, device=weights.device,
                   dtype=torch.float64)  # [B, M]
    return _inverse_cdf_draw(weights, u)


def _inverse_cdf_draw(weights: Tensor, u: Tensor) -> Tensor:
    """The draw of each uniform ``u [B, M]`` in ``[0, 1)`` from its row of ``weights [B, C]``.

    A float64 cumulative sum of each row and one binary search a draw: the first entry whose
    inclusive cumulative weight exceeds ``t = u * total``, with ``t`` kept below the row total,
    so that entry always exists and has a positive weight (``u = 0`` skips leading zeros). On
    the CPU the native ``cdf_draw`` kernel (:mod:`xmc_toolkit.native`) computes the same numbers
    (12x faster than ``torch.multinomial`` at ``[256, 4096] x 1024``; ``torch.searchsorted``
    alone is no faster than ``multinomial``).

    Returns:
        ``[B, M] int64`` column indices.
    """
    mod = kernels_for(weights)
    if mod is not None:
        return mod.cdf_draw(weights.contiguous(), u.contiguous())
    cum = weights.cumsum(1, dtype=torch.float64)  # [B, C] inclusive
    total = cum[:, -1:]  # [B, 1]
    t = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(cum, t, right=True)  # [B, M], first entry with cum > t


def _draw_in_cells(
    cells: Tensor,
    u: Tensor,
    indptr: Tensor,
    items: Tensor,
    cum: Tensor | None,
    base: Tensor | None,
    mass: Tensor | None,
) -> Tensor:
    """Pick one item inside each drawn cell.

    Args:
        cells: any-shape int64 cell ids (non-empty cells only).
        u: same shape, float64 uniforms in [0, 1).
        indptr: ``[K^2 + 1]`` CSR offsets into ``items``.
        items: ``[L]`` labels sorted by cell.
        cum, base, mass: weighted mode: inclusive cumulative weights ``[L]`` (in ``items``
            order), the cumulative weight before each cell ``[K^2]`` and the cell mass ``[K^2]``;
            all ``None`` for uniform within-cell sampling.

    Returns:
        label ids, the shape of ``cells``.
    """
    start = _lookup(indptr, cells)
    count = _lookup(indptr, cells + 1) - start
    if cum is None:
        off = (u * count).long()
        off = torch.minimum(off, count - 1)
        return _lookup(items, start + off)
    t = _lookup(base, cells) + u * _lookup(mass, cells)  # target cumulative weight
    pos = torch.searchsorted(cum, t, right=True)
    pos = torch.maximum(torch.minimum(pos, start + count - 1), start)
    return _lookup(items, pos)


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 1-D ``table`` and any-shape ``idx``, by ``index_select`` (4-6x
    faster on the CPU than advanced indexing at ``[256, 1024]`` ids; the same values)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def merge_cells(items: Tensor, cell: Tensor, moved: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """CSR of the labels by cell after some labels changed cell, without sorting all ``L``.

    Args:
        items: ``[L] int64`` labels sorted by (previous cell, label) -- the previous
            ``cell_items``.
        cell: ``[L] int64`` the *new* cell of every label.
        moved: ``[R] int64`` distinct labels whose cell changed (every other label keeps its
            previous cell).
        num_cells: ``K * K``.

    Returns:
        ``(indptr [K^2 + 1], items [L])``: labels sorted by (new cell, label), i.e. exactly
        ``torch.argsort(cell, stable=True)``, in ``O(L + R log L)``: the unmoved labels keep
        their order, the moved ones are merged in by binary search on the key
        ``cell * L + label`` (on the CPU the native ``merge_cells``: one sequential merge).
    """
    n = items.numel()
    mkeys, order = torch.sort(_lookup(cell, moved) * n + moved)  # [R] by (new cell, label)
    mv = _lookup(moved, order)
    mod = kernels_for(items, float32=False) if moved.numel() else None
    if mod is not None:  # the same result in one sequential pass
        return mod.merge_cells(items.contiguous(), cell.contiguous(), mv, num_cells)
    counts = torch.bincount(cell, minlength=num_cells)  # [K^2]
    indptr = torch.zeros(num_cells + 1, dtype=torch.int64, device=items.device)
    indptr[1:] = torch.cumsum(counts, 0)
    if moved.numel() == 0:
        return indptr, items
    is_moved = torch.zeros(n, dtype=torch.bool, device=items.device)
    is_moved[moved] = True
    kept = items[~_lookup(is_moved, items)]  # [L - R], still sorted by (cell, label)
    kkeys = _lookup(cell, kept) * n + kept  # [L - R] ascending
    pos = torch.arange(mv.numel(), device=items.device) + torch.searchsorted(kkeys, mkeys)
    out = torch.empty_like(items)
    free = torch.ones(n, dtype=torch.bool, device=items.device)
    free[pos] = False
    out[pos] = mv
    out.masked_scatter_(free, kept)
    return indptr, out


def cell_sums(indptr: Tensor, items: Tensor, x: Tensor) -> Tensor:
    """``[K^2, d]`` sum of the rows of ``x [L, d]`` in every cell, one pass over ``x`` (a
    sparse ``[K^2, L]`` membership matrix, the CSR ``(indptr, items)``, times ``x``)."""
    ones = torch.ones(items.numel(), dtype=x.dtype, device=x.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        member = torch.sparse_csr_tensor(
            indptr, items, ones, size=(indptr.numel() - 1, x.shape[0]), check_invariants=False
        )
        return member @ x


class _TablePass(NamedTuple):
    """What one read of the label table gives an index refresh (see
    ``MIDXSampler._table_pass``); each field ``None`` when not asked for."""

    fingerprints: Tensor | None  # [L] float32 x . r
    sums: Tensor | None  # [K^2, d] per-cell sums of the rows under the current index
    changed: Tensor | None  # [R] int64 ascending ids of the rows whose fingerprint changed


# ---------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------
class MIDXSampler(Sampler):
    """Adaptive sampler over an inverted multi-index of the label embeddings.

    Args:
        num_labels: number of labels ``L``.
        num_codewords: ``K`` codewords per codebook (``K * K`` cells), ``1 <= K <= L``.
        quantizer: ``"pq"`` (product) or ``"rq"`` (residual) quantization.
        within_cell: ``"uniform"``, ``"popularity"`` (needs ``label_counts``) or ``"exact"``.
        label_counts: ``[L]`` label frequencies for ``within_cell="popularity"``.
        alpha: popularity exponent; weights are ``(count + smoothing) ** alpha``.
        smoothing: added to every count (``+1`` smoothing keeps unseen labels reachable).
        seed: seed of the k-means generator (``None``: random).
        kmeans_iters: k-means iterations of the first :meth:`update`.
        warm_start_iters: k-means iterations of later updates (warm-started from the previous
            codebooks).
        points_per_centroid: k-means trains on ``points_per_centroid * K`` sampled labels, then
            assigns every label once (``0`` or ``None``: train on all labels).
        chunk_size: rows per chunk of the k-means distance computation.
        recluster_every: every ``recluster_every``-th :meth:`update` re-clusters fully (warm
            k-means over all labels); the others are incremental: only the labels whose
            embedding changed since the previous update are reassigned (against the current
            codebooks), then the codewords take one Lloyd step from per-cell sums. ``1``: every
            update re-clusters (the behaviour before incremental refreshes).
        max_incremental_fraction: an update where more than this fraction of the labels changed
            re-clusters fully instead.

    Attributes (after :meth:`update`; all on the label embeddings' device):
        codebooks: ``(C1, C2)`` float32.
        codes: ``[L, 2] int64`` cell coordinates ``(k1, k2)`` of every label.
        cell_indptr: ``[K*K + 1] int64`` CSR offsets; cell ``c = k1 * K + k2`` holds
            ``cell_items[cell_indptr[c]:cell_indptr[c + 1]]``.
        cell_items: ``[L] int64`` labels sorted by cell id.
        cell_log_weight: ``[K*K]`` float32 ``log N[k1, k2]`` (``-inf`` for empty cells).
        item_log_weight: ``[L]`` float32 ``log w_i`` (zeros when unweighted).
        cell_bias_max: ``[K*K]`` float32 largest bias among a cell's labels (0 without a bias,
            ``-inf`` for empty cells): with the codeword scores, the bias part of an upper
            bound on the cell's scores (``approx_topk(..., bias_bound=True)``).
    """

    needs_update = True

    def __init__(
        self,
        num_labels: int,
        num_codewords: int = 64,
        quantizer: str = "pq",
        within_cell: str = "uniform",
        label_counts: Tensor | np.ndarray | Sequence[float] | None = None,
        alpha: float = 0.75,
        smoothing: float = 1.0,
        seed: int | None = None,
        kmeans_iters: int = 20,
        warm_start_iters: int = 5,
        points_per_centroid: int | None = 256,
        chunk_size: int = 262144,
        recluster_every: int = 50,
        max_incremental_fraction: float = 0.25,
    ) -> None:
        problems: list[str] = []

        def _pos_int(name: str, v: object, flag: str) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r} ({flag})")

        _pos_int("num_labels", num_labels, "the label count of the data")
        _pos_int("num_codewords", num_codewords, "--num-codewords")
        _pos_int("kmeans_iters", kmeans_iters, "--kmeans-iters")
        _pos_int("warm_start_iters", warm_start_iters, "--warm-start-iters")
        _pos_int("chunk_size", chunk_size, "chunk_size")
        _pos_int("recluster_every", recluster_every, "recluster_every (1: always re-cluster)")
        if not (isinstance(max_incremental_fraction, (int, float))
                and 0.0 <= max_incremental_fraction <= 1.0):
            problems.append(
                f"max_incremental_fraction must be in [0, 1], got {max_incremental_fraction!r}"
            )
        if quantizer not in QUANTIZERS:
            problems.append(f"quantizer must be one of {list(QUANTIZERS)}, got {quantizer!r}")
        if within_cell not in WITHIN_CELL:
            problems.append(f"within_cell must be one of {list(WITHIN_CELL)}, got {within_cell!r}")
        if not problems and num_codewords > num_labels:
            problems.append(
                f"num_codewords={num_codewords} is larger than num_labels={num_labels}; "
                f"use --num-codewords <= {num_labels} (about sqrt(L) is a good start)"
            )
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            problems.append(f"alpha must be >= 0, got {alpha!r} (--alpha)")
        if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing >= 0):
            problems.append(f"smoothing must be >= 0, got {smoothing!r}")
        counts: Tensor | None = None
        if within_cell == "popularity":
            if label_counts is None:
                problems.append(
                    "within_cell='popularity' needs label_counts (label frequencies of the "
                    "training set); pass them or use within_cell='uniform'"
                )
            else:
                counts = torch.as_tensor(np.asarray(label_counts, dtype=np.float64)).flatten()
                if isinstance(num_labels, int) and counts.numel() != num_labels:
                    problems.append(
                        f"label_counts has {counts.numel()} entries, expected num_labels="
                        f"{num_labels}"
                    )
                elif not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
                    problems.append("label_counts must be finite and non-negative")
                elif smoothing == 0 and bool((counts == 0).any()):
                    problems.append(
                        "label_counts has zeros and smoothing=0: those labels could never be "
                        "sampled; use smoothing > 0"
                    )
        if problems:
            raise ConfigError(problems)

        self.num_labels = int(num_labels)
        self.num_codewords = int(num_codewords)
        self.quantizer = quantizer
        self.within_cell = within_cell
        self.alpha = float(alpha)
        self.smoothing = float(smoothing)
        self.kmeans_iters = int(kmeans_iters)
        self.warm_start_iters = int(warm_start_iters)
        self.points_per_centroid = points_per_centroid
        self.chunk_size = int(chunk_size)
        self.recluster_every = int(recluster_every)
        self.max_incremental_fraction = float(max_incremental_fraction)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(int(seed))
        # log prior of the popularity within-cell weights, [L] float64 (CPU)
        self._log_prior: Tensor | None = None
        if counts is not None:
            self._log_prior = self.alpha * torch.log(counts + self.smoothing)

        self.codebooks: tuple[Tensor, Tensor] | None = None
        self.codes: Tensor | None = None
        self.cell_indptr: Tensor | None = None
        self.cell_items: Tensor | None = None
        self.cell_log_weight: Tensor | None = None
        self.item_log_weight: Tensor | None = None
        self.cell_bias_max: Tensor | None = None
        self._residual: Tensor | None = None  # [L, d] (exact mode only)
        self._weighted = False
        self._cum: Tensor | None = None
        self._base: Tensor | None = None
        self._mass: Tensor | None = None
        self._device_cache: dict[torch.device, dict[str, Tensor | None]] = {}
        # incremental refreshes: a random projection of every indexed row (change detection)
        self._fingerprint: Tensor | None = None  # [L] float32
        self._cell: Tensor | None = None  # [L] int64 cell k1 * K + k2 of every label (= codes)
        # the last batch mixture: (key, queries, [K^2] log cell marginal), see _mixture; every
        # new index clears it
        self._mixture_memo: tuple[tuple[object, ...], Tensor, Tensor] | None = None
        self._since_full = 0  # updates since the last full re-cluster
        self.last_refresh: dict[str, object] = {}

    # -- index construction -------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """Dimension ``d`` of the indexed label embeddings (``None`` before :meth:`update`)."""
        if self.codebooks is None:
            return None
        c1, c2 = self.codebooks
        return c1.shape[1] + c2.shape[1] if self.quantizer == "pq" else c1.shape[1]

    @property
    def is_built(self) -> bool:
        """Whether :meth:`update` (or :meth:`load_state_dict`) has built the index."""
        return self.codebooks is not None

    @property
    def cell_counts(self) -> Tensor:
        """``[K*K] int64`` number of labels per cell."""
        self._require_built()
        assert self.cell_indptr is not None
        return self.cell_indptr[1:] - self.cell_indptr[:-1]

    def update(
        self,
        label_embeddings: Tensor,
        bias: Tensor | None = None,
        *,
        rows: Tensor | None = None,
        full: bool = False,
    ) -> None:
        """(Re)build codebooks and index from ``label_embeddings [L, d]`` (and ``bias [L]``).

        The first call (and every ``recluster_every``-th, a call with ``full=True``, or one
        where more than ``max_incremental_fraction`` of the rows changed) clusters with k-means,
        warm-started from the previous codebooks (``warm_start_iters`` iterations) when there are
        any. The other calls are incremental: the rows whose embedding changed since the
        previous call (found by a fixed random projection of every row, or given as ``rows``)
        are reassigned to their nearest codewords, the CSR index is merged rather than re-sorted,
        and the codewords take one Lloyd step from per-cell sums over all rows. Either way the
        index is rebuilt consistently (codes, cell weights, bias), so ``log q`` stays exact.
        The index lives on the embeddings' device. Inputs are never modified.

        Args:
            label_embeddings: ``[L, d]`` float.
            bias: optional ``[L]`` float (always taken in full: cheap, ``O(L)``).
            rows: optional int64 ids of the rows that changed (skips the change detection; rows
                that changed but are not listed keep their cell until a later update finds them).
            full: re-cluster now.
        """
        _check_embeddings(label_embeddings, bias, self.num_labels, finite=rows is not None)
        d = label_embeddings.shape[1]
        if self.quantizer == "pq" and d < 2:
            raise ConfigError(
                f"quantizer='pq' splits the embedding in two halves and needs d >= 2, got d={d}; "
                "use quantizer='rq'"
            )
        with torch.no_grad():
            x = label_embeddings.detach().to(torch.float32)  # [L, d]
            can_increment = (
                not full
                and self.codebooks is not None
                and self.dim == d
                and self._fingerprint is not None
                and self._fingerprint.device == x.device
                and self._since_full + 1 < self.recluster_every
            )
            fp_all = None
            tp = _TablePass(None, None, None)
            if rows is None:
                # the fingerprints double as the NaN/inf check: x . r is finite for every row
                # exactly when every entry is (no entry of r is 0); where the pass is native,
                # the same read of the table lists the changed rows and gives the per-cell
                # sums of an incremental refresh
                native = can_increment and kernels_for(x) is not None
                tp = self._table_pass(x, sums=native,
                                      since=self._fingerprint if can_increment else None)
                fp_all = tp.fingerprints
                assert fp_all is not None
                if not bool(torch.isfinite(fp_all).all()):
                    _check_embeddings(label_embeddings, bias, self.num_labels)  # raises, names rows
            if can_increment:
                assert self._fingerprint is not None
                if fp_all is not None:
                    fp = fp_all
                    assert tp.changed is not None
                    changed = tp.changed
                else:
                    changed = torch.unique(torch.as_tensor(rows, dtype=torch.int64).to(x.device))
                    if changed.numel() and (int(changed.min()) < 0 or int(changed.max()) >= self.num_labels):
                        raise SamplerError(
                            f"rows must lie in [0, {self.num_labels}); got ids from "
                            f"{int(changed.min())} to {int(changed.max())}"
                        )
                    fp = self._fingerprint.clone()
                    fp[changed] = self._project(x[changed])
                if changed.numel() <= self.max_incremental_fraction * self.num_labels:
                    self._incremental(x, bias, changed, tp.sums)
                    self._fingerprint = fp
                    self._since_full += 1
                    return
            self._full(x, bias)
            self._fingerprint = self._project(x) if fp_all is None else fp_all
            self._since_full = 0

    def _project(self, x: Tensor) -> Tensor:
        """``[N]`` float32 fingerprint ``x . r`` of rows ``x [N, d]`` (``r``: fixed, seeded)."""
        fp = self._table_pass(x, sums=False).fingerprints
        assert fp is not None
        return fp

    def _table_pass(self, x: Tensor, sums: bool, project: bool = True,
                    since: Tensor | None = None) -> _TablePass:
        """One read of the table ``x [L, d]``: the fingerprints ``x . r [L]`` (``project``),
        the per-cell sums ``[K^2, d]`` of its rows under the *current* index (``sums``), and
        with ``since`` (the previous fingerprints, ``[L]``) the ascending ids of the rows whose
        fingerprint changed.

        With the native kernels (CPU, float32) all of it comes from one sequential pass
        (``project_rows``), and every fingerprint of this process is computed by that kernel (a
        row's ``x . r`` summed in a fixed order: the same number for the same row whatever the
        batch of rows, which the change detection needs); else ``x @ r``, the CSR product
        :func:`cell_sums` and a ``nonzero``.
        """
        g = torch.Generator().manual_seed(0x5EED)
        r = torch.randn(x.shape[1], generator=g, dtype=torch.float64)
        r = torch.where(r.abs() < 0.1, r.sign() + (r == 0).double(), r)  # no tiny or zero entry
        r = r.to(device=x.device, dtype=x.dtype)
        mod = kernels_for(x)
        if mod is not None:
            cell = torch.empty(0, dtype=torch.int64)  # no sums
            if sums:
                assert self._cell is not None
                cell = self._cell.to(x.device)
            fp, s, changed = mod.project_rows(
                x.contiguous(), r, cell, self.num_codewords ** 2 if sums else 0,
                torch.empty(0) if since is None else since.contiguous())
            return _TablePass(fp, s if sums else None, None if since is None else changed)
        fp = x @ r if project or since is not None else None
        changed = None
        if since is not None:
            assert fp is not None
            changed = (fp != since).nonzero().flatten()  # [R] ascending
        s_out = None
        if sums:
            assert self.cell_indptr is not None and self.cell_items is not None
            s_out = cell_sums(self.cell_indptr.to(x.device), self.cell_items.to(x.device), x)
        return _TablePass(fp, s_out, changed)

    def _full(self, x: Tensor, bias: Tensor | None) -> None:
        """Re-cluster: warm (or cold) k-means over all rows, then a fresh index."""
        d = x.shape[1]
        k = self.num_codewords
        init = self.codebooks if self.dim == d else None
        iters = self.warm_start_iters if init is not None else self.kmeans_iters
        if init is not None:
            init = (init[0].to(x.device), init[1].to(x.device))
        sample_size = None
        if self.points_per_centroid:
            sample_size = self.points_per_centroid * k
            if sample_size >= self.num_labels:
                sample_size = None
        quantize = product_quantize if self.quantizer == "pq" else residual_quantize
        quant = quantize(
            x,
            k,
            init=init,
            iters=iters,
            generator=self._generator,
            sample_size=sample_size,
            chunk_size=self.chunk_size,
        )
        logger.debug("MIDX index rebuilt: L=%d d=%d K=%d (%s)", self.num_labels, d, k, self.quantizer)
        residual = None
        if self.within_cell == "exact":
            residual = x - reconstruct(quant.codebooks, quant.codes, self.quantizer)  # [L, d]
        self._set_index(quant.codebooks, quant.codes, bias, residual)
        self.last_refresh = {"kind": "full", "changed": self.num_labels, "moved": self.num_labels}

    def _incremental(self, x: Tensor, bias: Tensor | None, changed: Tensor,
                     sums: Tensor | None = None) -> None:
        """Reassign the ``changed [R]`` rows, merge them into the CSR index, one Lloyd step.

        ``sums``: the ``[K^2, d]`` per-cell sums of ``x`` under the current index when the
        caller has them (the native table pass), else computed here; either way the moved rows
        are then taken out of their old cells' sums and put into their new ones.
        """
        assert self.codebooks is not None and self.codes is not None
        assert self.cell_items is not None and self._cell is not None
        k = self.num_codewords
        codebooks = (self.codebooks[0].to(x.device), self.codebooks[1].to(x.device))
        codes = self.codes.to(x.device)
        cell = old_cell = self._cell.to(x.device)  # [L]
        if sums is None:
            sums = self._table_pass(x, sums=True, project=False).sums  # [K^2, d] old cells
        assert sums is not None
        moved = changed[:0]
        if changed.numel():
            # [R, 2] in cache-sized chunks of rows (no [R, K] distance block, and no [R, d]
            # copy of the changed rows: a fresh block that size costs more in page faults than
            # the gather itself)
            chunk = min(self.chunk_size, 16384)
            new = torch.cat([
                nearest_codes(x.index_select(0, changed[i : i + chunk]), codebooks,
                              self.quantizer, chunk)
                for i in range(0, changed.numel(), chunk)])
            codes = codes.clone().index_copy_(0, changed, new)
            new_cell = new[:, 0] * k + new[:, 1]  # [R]
            was = _lookup(old_cell, changed)  # [R]
            is_moved = new_cell != was  # [R]
            at = is_moved.nonzero().flatten()  # [R']
            moved = _lookup(changed, at)  # [R'] rows that changed cell
            to, frm = _lookup(new_cell, at), _lookup(was, at)  # [R'] new and old cells
            cell = old_cell.clone().index_copy_(0, moved, to)  # [L]
            xm = x.index_select(0, moved)  # [R', d]
            sums.index_add_(0, to, xm).index_add_(0, frm, xm, alpha=-1)
        indptr, items = merge_cells(self.cell_items.to(x.device), cell, moved, k * k)
        counts = indptr[1:] - indptr[:-1]  # [K^2]
        new_books = codewords_from_cells(sums, counts, codebooks, self.quantizer)
        residual = None
        if self.within_cell == "exact":
            residual = x - reconstruct(new_books, codes, self.quantizer)  # [L, d]
        self._set_index(new_books, codes, bias, residual, csr=(indptr, items), cell=cell)
        self.last_refresh = {
            "kind": "incremental", "changed": int(changed.numel()), "moved": int(moved.numel())
        }
        logger.debug("MIDX index refreshed incrementally: %d rows changed, %d moved cell",
                     int(changed.numel()), int(moved.numel()))

    def _set_index(
        self,
        codebooks: tuple[Tensor, Tensor],
        codes: Tensor,
        bias: Tensor | None,
        residual: Tensor | None,
        csr: tuple[Tensor, Tensor] | None = None,
        cell: Tensor | None = None,
    ) -> None:
        """Install an index: codebooks, ``codes [L, 2]``, item weights from ``bias`` and the
        popularity prior, and the CSR by cell (``csr = (indptr, items)`` when the caller has it
        already, else ``argsort`` of the cell ids; ``cell [L]`` the cell ids when known)."""
        device = codes.device
        k = self.num_codewords
        if cell is None:
            cell = codes[:, 0] * k + codes[:, 1]  # [L]
        if csr is None:
            counts = torch.bincount(cell, minlength=k * k)  # [K^2]
            indptr = torch.zeros(k * k + 1, dtype=torch.int64, device=device)
            indptr[1:] = torch.cumsum(counts, 0)
            items = torch.argsort(cell, stable=True)  # [L] labels sorted by cell
        else:
            indptr, items = csr
            counts = indptr[1:] - indptr[:-1]

        lw = torch.zeros(self.num_labels, dtype=torch.float64, device=device)  # log w_i
        weighted = False
        if self.within_cell == "popularity" and self._log_prior is not None:
            lw = lw + self._log_prior.to(device)
            weighted = True
        if bias is not None:
            lw = lw + bias.detach().to(device=device, dtype=torch.float64)
            weighted = True

        if self.within_cell == "exact":
            # the bias enters the exact scores; cells carry plain counts (unused by exact mode)
            log_n = torch.log(counts.double())
            weighted = False
        elif not weighted:
            log_n = torch.log(counts.double())  # -inf for empty cells
        else:
            cmax = torch.full((k * k,), -math.inf, dtype=torch.float64, device=device)
            cmax = cmax.scatter_reduce(0, cell, lw, reduce="amax")  # [K^2] max log w per cell
            # [L] per-cell scaled weights in cell order (index_select: 4x faster than [] here)
            v = _lookup(torch.exp(lw - _lookup(cmax, cell)), items)
            cum = torch.cumsum(v, 0)  # [L]
            cum0 = torch.cat([cum.new_zeros(1), cum])  # [L + 1]
            base = cum0[indptr[:-1]]  # [K^2]
            mass = cum0[indptr[1:]] - base  # [K^2], 0 for empty cells
            log_n = cmax + torch.log(mass)  # -inf for empty cells (cmax = -inf there)
            self._cum, self._base, self._mass = cum, base, mass
        if not weighted:
            self._cum = self._base = self._mass = None

        if bias is None:
            cb = torch.where(counts > 0, 0.0, -math.inf).to(device=device, dtype=torch.float32)
        else:
            cb = torch.full((k * k,), -math.inf, dtype=torch.float32, device=device)
            cb = cb.scatter_reduce(0, cell, bias.detach().to(device=device, dtype=torch.float32),
                                   reduce="amax")
        self.cell_bias_max = cb  # [K^2] max bias of a cell's labels (-inf: empty cell)
        self.codebooks = (codebooks[0].float().contiguous(), codebooks[1].float().contiguous())
        self.codes = codes.long()
        self._cell = cell.long()
        self._mixture_memo = None
        self.cell_indptr = indptr
        self.cell_items = items
        self.cell_log_weight = log_n.float()
        self.item_log_weight = lw.float()
        self._residual = None if residual is None else residual.float().contiguous()
        self._weighted = weighted
        self._device_cache = {}

    # -- helpers ------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self.codebooks is None:
            raise SamplerError(
                "MIDXSampler has no index yet: call sampler.update(label_embeddings) (under "
                "torch.no_grad()) before sample() / log_prob()"
            )

    def _on(self, device: torch.device) -> dict[str, Tensor | None]:
        """Index tensors on ``device`` (moved once and cached)."""
        self._require_built()
        if device not in self._device_cache:
            assert self.codebooks is not None
            src: dict[str, Tensor | None] = {
                "c1": self.codebooks[0],
                "c2": self.codebooks[1],
                "codes": self.codes,
                "cell": self._cell,
                "indptr": self.cell_indptr,
                "items": self.cell_items,
                "log_n": self.cell_log_weight,
                "lw": self.item_log_weight,
                "cum": self._cum,
                "base": self._base,
                "mass": self._mass,
                "residual": self._residual,
            }
            self._device_cache[device] = {
                key: None if t is None else t.to(device) for key, t in src.items()
            }
        return self._device_cache[device]

    def _scores(self, s: dict[str, Tensor | None], queries: Tensor) -> tuple[Tensor, Tensor]:
        _check_queries(queries, self.dim)
        return codeword_scores(queries, (s["c1"], s["c2"]), self.quantizer)  # type: ignore[arg-type]

    def _exact_log_softmax(self, s: dict[str, Tensor | None], queries: Tensor) -> Tensor:
        """``[B, L]`` log q for ``within_cell="exact"`` (= log_softmax of the true scores)."""
        a1, a2 = self._scores(s, queries)
        codes, lw, res = s["codes"], s["lw"], s["residual"]
        assert codes is not None and lw is not None and res is not None
        logits = a1[:, codes[:, 0]] + a2[:, codes[:, 1]]  # [B, L] = q . w^_i
        logits = logits + queries.to(res.dtype) @ res.t() + lw  # [B, L] = q . w_i + b_i
        return torch.log_softmax(logits, dim=1)

    # -- sampling -----------------------------------------------------------------------------
    def _sample(
        self, queries: Tensor, num_samples: int, shared: bool, generator: torch.Generator | None
    ) -> Samples:
        s = self._on(queries.device)
        dev = queries.device
        b = queries.shape[0]
        if self.within_cell == "exact":
            logp = self._exact_log_softmax(s, queries)  # [B, L]
            if shared:
                mix = torch.logsumexp(logp, 0) - math.log(b)  # [L]
                ids = torch.multinomial(mix.exp(), num_samples, True, generator=generator)
                return Samples(ids, mix[ids].float())
            ids = torch.multinomial(logp.exp(), num_samples, True, generator=generator)  # [B, M]
            return Samples(ids, logp.gather(1, ids).float())

        if shared:
            cell_lp = self._mixture(s, queries, reuse=False)  # [K^2] float64
            cells = torch.multinomial(cell_lp.exp(), num_samples, True, generator=generator)  # [M]
            u = torch.rand(num_samples, generator=generator, device=dev, dtype=torch.float64)
            ids = self._in_cells(s, cells, u)  # [M]
            return Samples(ids, self._shared_log_q(s, cell_lp, ids))

        a1, a2 = self._scores(s, queries)  # [B, K] each
        log_n = s["log_n"]
        assert log_n is not None
        k = self.num_codewords
        logits = (a1.unsqueeze(2) + a2.unsqueeze(1)).reshape(b, k * k) + log_n  # [B, K^2]
        m = logits.amax(1, keepdim=True)  # [B, 1] (amax: no index tracking)
        weights = torch.exp(logits - m)  # [B, K^2], 0 for empty cells, max entry 1
        cells = _inverse_cdf_rows(weights, num_samples, generator)  # [B, M]
        u = torch.rand(b, num_samples, generator=generator, device=dev, dtype=torch.float64)
        ids = self._in_cells(s, cells, u)  # [B, M]
        # log Z from the weights at hand (sum >= 1: no underflow, no host sync)
        log_z = m.squeeze(1).double() + torch.log(weights.sum(1, dtype=torch.float64))  # [B]
        # the drawn cells give the items' codes (cell = k1 * K + k2): no [B, M] random gather
        # of codes[ids] for the log q (the same numbers)
        return Samples(ids, self._item_log_q(s, a1, a2, log_z, ids, cells=cells, k=k))

    def _in_cells(self, s: dict[str, Tensor | None], cells: Tensor, u: Tensor) -> Tensor:
        return _draw_in_cells(
            cells, u, s["indptr"], s["items"], s["cum"], s["base"], s["mass"]  # type: ignore[arg-type]
        )

    @staticmethod
    def _item_log_q(
        s: dict[str, Tensor | None], a1: Tensor, a2: Tensor, log_z: Tensor, ids: Tensor,
        cells: Tensor | None = None, k: int = 0,
    ) -> Tensor:
        """``log q(i | q_b) = a1[b, k1(i)] + a2[b, k2(i)] + log w_i - log Z_b`` for ids [B, M].

        ``cells`` (``[B, M]``, the cells the ids were drawn from, ``k1 * k + k2``) replaces the
        lookup of ``codes[ids]``.
        """
        codes, lw = s["codes"], s["lw"]
        assert codes is not None and lw is not None
        if cells is None:
            c = codes[ids]  # [B, M, 2]
            k1, k2 = c[..., 0], c[..., 1]
        else:
            k1 = torch.div(cells, k, rounding_mode="floor")  # [B, M]
            k2 = cells - k1 * k
        out = a1.double().gather(1, k1) + a2.double().gather(1, k2)  # [B, M]
        out = out + _lookup(lw, ids).double() - log_z.unsqueeze(1)
        return out.float()

    def _shared_log_q(self, s: dict[str, Tensor | None], cell_lp: Tensor, ids: Tensor) -> Tensor:
        """Mixture log-prob: ``log P[c(i)] + log w_i - log N[c(i)]`` (within-cell law is static)."""
        cells, lw, log_n = s["cell"], s["lw"], s["log_n"]
        assert cells is not None and lw is not None and log_n is not None
        cell = _lookup(cells, ids)  # the shape of ids
        return (_lookup(cell_lp, cell) + _lookup(lw, ids).double()
                - _lookup(log_n, cell).double()).float()

    def _log_prob(self, queries: Tensor, ids: Tensor, shared: bool) -> Tensor:
        s = self._on(queries.device)
        b = queries.shape[0]
        if not shared and ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(b, -1)  # [B, M]
        if self.within_cell == "exact":
            logp = self._exact_log_softmax(s, queries)  # [B, L]
            if shared:
                mix = torch.logsumexp(logp, 0) - math.log(b)  # [L]
                return mix[ids].float()
            return logp.gather(1, ids).float()
        if shared:
            return self._shared_log_q(s, self._mixture(s, queries, reuse=True), ids)
        a1, a2 = self._scores(s, queries)
        log_n = s["log_n"]
        assert log_n is not None
        return self._item_log_q(s, a1, a2, cell_log_normalizer(a1, a2, log_n), ids)

    def _mixture(self, s: dict[str, Tensor | None], queries: Tensor, reuse: bool) -> Tensor:
        """``[K^2]`` float64 log cell marginal of the batch mixture of ``queries [B, d]``
        (:func:`mixture_cell_log_prob`).

        A shared draw (``reuse=False``) computes it and remembers it, keyed by the queries'
        storage, version counter, shape and strides (a new index clears it); the positives'
        ``log_prob(..., shared=True)`` on the same batch right after (``reuse=True``: every
        shared sampled step) takes it from there. The memo holds the queries, so their storage
        cannot be reused by another tensor meanwhile, and any in-place change bumps the
        version, so a hit is always the same numbers."""
        key = (queries.data_ptr(), queries._version, tuple(queries.shape), queries.stride(),
               queries.dtype, queries.device)
        memo = self._mixture_memo
        if reuse and memo is not None and memo[0] == key:
            return memo[2]
        a1, a2 = self._scores(s, queries)  # [B, K] each
        log_n = s["log_n"]
        assert log_n is not None
        lp = mixture_cell_log_prob(a1, a2, log_n)  # [K^2]
        self._mixture_memo = (key, queries, lp)
        return lp

    # -- index queries for approximate top-k --------------------------------------------------
    def cell_logits(self, queries: Tensor) -> Tensor:
        """Approximate score of every cell: ``a1[k1] + a2[k2]`` (``-inf`` for empty cells).

        Args:
            queries: ``[B, d]`` float.

        Returns:
            ``[B, K*K]`` float32 on the queries' device; column ``k1 * K + k2``.
        """
        _check_queries(queries)
        s = self._on(queries.device)
        with torch.no_grad():
            a1, a2 = self._scores(s, queries.detach())
            k = self.num_codewords
            out = (a1.unsqueeze(2) + a2.unsqueeze(1)).reshape(-1, k * k)  # [B, K^2]
            empty = (s["indptr"][1:] == s["indptr"][:-1])  # type: ignore[index]
            return out.masked_fill(empty.unsqueeze(0), -math.inf)

    # -- checkpoints --------------------------------------------------------------------------
    def _hparams(self) -> dict[str, int]:
        return {
            "num_labels": self.num_labels,
            "num_codewords": self.num_codewords,
            "quantizer": QUANTIZERS.index(self.quantizer),
            "within_cell": WITHIN_CELL.index(self.within_cell),
        }

    def state_dict(self) -> dict[str, Tensor]:
        """Hyper-parameters (int64 scalars), the k-means generator state and, once built, the
        codebooks, codes, item log-weights (and exact-mode residuals), and what the next
        incremental update needs: the row fingerprints ``[L]`` and the count of updates since
        the last full re-cluster (so a resumed run refreshes exactly like an uninterrupted one).
        CSR arrays and cumulative weights are derived and rebuilt by :meth:`load_state_dict`."""
        state = {k: torch.tensor(v, dtype=torch.int64) for k, v in self._hparams().items()}
        state["generator_state"] = self._generator.get_state()
        if self.codebooks is not None:
            assert self.codes is not None and self.item_log_weight is not None
            state["codebook1"] = self.codebooks[0].detach().clone()
            state["codebook2"] = self.codebooks[1].detach().clone()
            state["codes"] = self.codes.clone()
            state["item_log_weight"] = self.item_log_weight.clone()
            state["weighted"] = torch.tensor(int(self._weighted), dtype=torch.int64)
            if self._residual is not None:
                state["residual"] = self._residual.clone()
            if self._fingerprint is not None:
                state["fingerprint"] = self._fingerprint.detach().clone()
                state["updates_since_full"] = torch.tensor(self._since_full, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (strict; a state without fingerprints -- saved before
        incremental refreshes -- loads too, and its next update re-clusters fully)."""
        state = dict(state)
        fingerprint = state.pop("fingerprint", None)
        since_full = state.pop("updates_since_full", None)
        built = "codebook1" in state
        expected: dict[str, tuple[int, ...] | None] = {k: () for k in self._hparams()}
        expected["generator_state"] = None
        if built:
            expected.update(
                codebook1=None,
                codebook2=None,
                codes=(self.num_labels, 2),
                item_log_weight=(self.num_labels,),
                weighted=(),
            )
            if self.within_cell == "exact":
                expected["residual"] = None
        _load_strict(state, expected)
        mismatch = [
            f"{k}: saved {int(state[k].item())}, this sampler {v}"
            for k, v in self._hparams().items()
            if int(state[k].item()) != v
        ]
        if mismatch:
            raise CheckpointError(
                "sampler state was saved with other hyper-parameters (" + "; ".join(mismatch)
                + "); build the MIDXSampler with the saved settings"
            )
        self._generator.set_state(state["generator_state"].cpu())
        if not built:
            self.codebooks = None
            self._cell = None
            self._device_cache = {}
            self._fingerprint = None
            self._since_full = 0
            return
        codes = state["codes"].long()
        device = codes.device
        lw = state["item_log_weight"].to(device)
        weighted = bool(int(state["weighted"].item()))
        # the bias part of the item weights: whatever log w_i is beyond the popularity prior
        bias = None
        if weighted:
            prior = self._log_prior.to(device) if self._log_prior is not None and self.within_cell == "popularity" else 0.0
            bias = lw.double() - prior
        elif self.within_cell == "exact":
            bias = lw.double()
        residual = state.get("residual")
        self._set_index(
            (state["codebook1"].to(device), state["codebook2"].to(device)),
            codes,
            bias,
            None if residual is None else residual.to(device),
        )
        if fingerprint is not None and tuple(fingerprint.shape) != (self.num_labels,):
            raise CheckpointError(
                f"sampler state: fingerprint has shape {list(fingerprint.shape)}, expected "
                f"[{self.num_labels}] (was it saved by a sampler with the same num_labels?)"
            )
        self._fingerprint = None if fingerprint is None else fingerprint.to(device).float()
        self._since_full = 0 if since_full is None else int(since_full.item())

    def __repr__(self) -> str:
        return (
            f"MIDXSampler(num_labels={self.num_labels}, num_codewords={self.num_codewords}, "
            f"quantizer={self.quantizer!r}, within_cell={self.within_cell!r})"
        )
