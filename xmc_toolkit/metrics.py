"""Ranking metrics of extreme multi-label classification (numpy/scipy, vectorized).

Definitions follow the Extreme Classification Repository's evaluation code (pyxclib,
``xclib/evaluation/xc_metrics.py``) with one documented difference: rows of ``Y_true`` without
any relevant label are *skipped* (they are counted in ``num_rows_without_labels``) instead of
contributing zeros to the averages. See ``docs/metrics.md`` for the exact formulas.

Inputs everywhere:

* ``Y_true``: scipy sparse ``[N, L]``; every stored non-zero entry is a relevant label.
* ``topk_ids``: integer array ``[N, >=k]``, label ids sorted best first; ``-1`` is padding and is
  never relevant. A label id may appear at most once per row among the first ``k`` columns.

Every ``*_at_k`` function returns a float64 array ``[k]`` with the metric at ``1..k`` as a
fraction in ``[0, 1]``. All work is vectorized over rows; :class:`MetricsAccumulator` evaluates
huge ``N`` chunk by chunk with the same results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from xmc_toolkit.errors import XMCError

__all__ = [
    "MetricsInputError",
    "MetricsAccumulator",
    "inverse_propensity",
    "inverse_propensity_from_counts",
    "precision_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "psp_at_k",
    "psndcg_at_k",
    "evaluate",
    "metric_keys",
    "METRIC_NAMES",
]

logger = logging.getLogger(__name__)

#: The metric names, in the order every report shows them.
METRIC_NAMES: tuple[str, ...] = ("P", "nDCG", "PSP", "PSnDCG", "R")


class MetricsInputError(XMCError, ValueError):
    """The inputs of a metric are inconsistent (shapes, ids out of range, duplicate ids, ...)."""


def metric_keys(k: int) -> list[str]:
    """The metric keys ``P@1..P@k, nDCG@1.., PSP@1.., PSnDCG@1.., R@1..`` in report order."""
    return [f"{name}@{j}" for name in METRIC_NAMES for j in range(1, k + 1)]


# --------------------------------------------------------------------------------------------
# input checks and the shared per-chunk kernel
# --------------------------------------------------------------------------------------------


def _as_csr(Y_true: object) -> sp.csr_matrix:
    """A canonical binary CSR copy-or-view of ``Y_true`` (sorted indices, no duplicates/zeros).

    The input is never modified: a copy is made whenever canonicalisation is needed.
    """
    if not sp.issparse(Y_true):
        raise MetricsInputError(
            f"Y_true must be a scipy sparse matrix [N, L], got {type(Y_true).__name__}; "
            "wrap dense labels with scipy.sparse.csr_matrix(Y)"
        )
    Y = sp.csr_matrix(Y_true)  # no copy when already csr_matrix
    needs_copy = not Y.has_canonical_format or (Y.nnz and np.any(Y.data == 0))
    if needs_copy:
        Y = Y.copy()
        Y.sum_duplicates()
        Y.eliminate_zeros()
    return Y


def _check_topk(topk_ids: object, n_rows: int, num_labels: int, k: int) -> np.ndarray:
    """Validate ``topk_ids`` and return its first ``k`` columns as int64 ``[N, k]``."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise MetricsInputError(f"k must be a positive integer, got {k!r}")
    ids = np.asarray(topk_ids)
    if ids.ndim != 2:
        raise MetricsInputError(
            f"topk_ids must be a 2-D integer array [N, k], got shape {ids.shape}"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise MetricsInputError(
            f"topk_ids must hold integer label ids, got dtype {ids.dtype}; "
            "pass the ids of the top-k labels (argsort of the scores), not the scores"
        )
    if ids.shape[0] != n_rows:
        raise MetricsInputError(
            f"topk_ids has {ids.shape[0]} rows but Y_true has {n_rows}; "
            "predictions and labels must describe the same points in the same order"
        )
    if ids.shape[1] < k:
        raise MetricsInputError(
            f"topk_ids has {ids.shape[1]} columns but k={k}; predict at least k labels per "
            f"point or evaluate with k <= {ids.shape[1]} (--k)"
        )
    ids = ids[:, :k].astype(np.int64, copy=False)  # [N, k]
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1:
            r, c = np.argwhere(ids < -1)[0]
            raise MetricsInputError(
                f"topk_ids[{r}, {c}] = {ids[r, c]} is negative; only -1 may mark padding"
            )
        if hi >= num_labels:
            r, c = np.argwhere(ids >= num_labels)[0]
            raise MetricsInputError(
                f"topk_ids[{r}, {c}] = {ids[r, c]} is out of range for {num_labels} labels; "
                "are the predictions from a model trained on another label set?"
            )
        if k > 1:
            s = np.sort(ids, axis=1)  # [N, k]
            dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)  # [N, k-1]
            if dup.any():
                r, c = np.argwhere(dup)[0]
                raise MetricsInputError(
                    f"row {r} of topk_ids lists label {s[r, c + 1]} more than once among its "
                    f"top {k}; each label may be predicted at most once per point"
                )
    return ids


def _check_inv_prop(inv_prop: object, num_labels: int) -> np.ndarray:
    w = np.asarray(inv_prop, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != num_labels:
        raise MetricsInputError(
            f"inv_prop must be a 1-D array with one weight per label ({num_labels}), got shape "
            f"{w.shape}; compute it with inverse_propensity(Y_train) on labels with the same L"
        )
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise MetricsInputError("inv_prop must hold finite positive weights")
    return w


def _hits(Y: sp.csr_matrix, ids: np.ndarray) -> np.ndarray:
    """Relevance of each prediction: ``hits[i, j] = ids[i, j] in Y[i]``.

    Vectorized membership test by binary search of ``row * L + id`` in the sorted CSR keys.

    Args:
        Y: canonical CSR ``[n, L]``.
        ids: int64 ``[n, k]``, ``-1`` = padding.

    Returns:
        bool ``[n, k]``.
    """
    n, L = Y.shape
    if Y.nnz == 0 or ids.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(Y.indptr))  # [nnz]
    keys = rows * L + Y.indices.astype(np.int64)  # [nnz], sorted (canonical CSR)
    query = np.arange(n, dtype=np.int64)[:, None] * L + ids  # [n, k]
    pos = np.searchsorted(keys, query)  # [n, k]
    pos = np.minimum(pos, keys.shape[0] - 1)
    return (keys[pos] == query) & (ids >= 0)  # [n, k]


def _best_weights(Y: sp.csr_matrix, w: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest propensity weights among each row's relevant labels, descending.

    Args:
        Y: canonical CSR ``[n, L]``.
        w: float64 ``[L]`` inverse propensities.
        k: how many to keep.

    Returns:
        float64 ``[n, k]``, zero-padded for rows with fewer than ``k`` labels.
    """
    n = Y.shape[0]
    out = np.zeros((n, k), dtype=np.float64)
    if Y.nnz == 0:
        return out
    counts = np.diff(Y.indptr)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)  # [nnz]
    vals = w[Y.indices]  # [nnz]
    order = np.lexsort((-vals, rows))  # by row, then weight descending
    rank = np.arange(Y.nnz, dtype=np.int64) - Y.indptr[rows]  # [nnz] position within its row
    keep = rank < k  # rows stay contiguous after the sort, so rank applies to order
    out[rows[keep], rank[keep]] = vals[order][keep]
    return out


def _discounts(k: int) -> np.ndarray:
    """``1 / log2(j + 1)`` for ranks ``j = 1..k``: float64 ``[k]``."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _idcg(num_rel: np.ndarray, k: int) -> np.ndarray:
    """Ideal DCG at ``1..k`` for rows with ``num_rel >= 1`` relevant labels: float64 ``[n, k]``.

    ``IDCG_i@j = sum_{r=1}^{min(j, |y_i|)} 1 / log2(r + 1)``.
    """
    cum = np.cumsum(_discounts(k))  # [k]
    upto = np.minimum(np.arange(1, k + 1)[None, :], num_rel[:, None])  # [n, k]
    return cum[np.maximum(upto, 1) - 1]  # [n, k]


@dataclass
class _Sums:
    """Additive per-chunk sums over evaluated rows; every array is float64 ``[k]``."""

    k: int
    rows: int = 0
    empty: int = 0
    p: np.ndarray = field(default=None)  # type: ignore[assignment]
    ndcg: np.ndarray = field(default=None)  # type: ignore[assignment]
    r: np.ndarray = field(default=None)  # type: ignore[assignment]
    psp: np.ndarray = field(default=None)  # type: ignore[assignment]
    psp_best: np.ndarray = field(default=None)  # type: ignore[assignment]
    psdcg: np.ndarray = field(default=None)  # type: ignore[assignment]
    psdcg_best: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("p", "ndcg", "r", "psp", "psp_best", "psdcg", "psdcg_best"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.k, dtype=np.float64))


def _chunk_sums(Y: sp.csr_matrix, ids: np.ndarray, w: np.ndarray | None, k: int) -> _Sums:
    """Per-chunk sums of every metric's per-row terms (rows without labels skipped).

    Args:
        Y: canonical CSR ``[n, L]``.
        ids: validated int64 ``[n, k]``.
        w: float64 ``[L]`` inverse propensities, or ``None`` to skip the PS metrics.
        k: cut-off.
    """
    out = _Sums(k)
    num_rel = np.diff(Y.indptr).astype(np.int64)  # [n]
    keep = num_rel > 0  # [n]
    out.rows = int(keep.sum())
    out.empty = int(Y.shape[0] - out.rows)
    if out.rows == 0:
        return out
    if not keep.all():
        Y = Y[keep]
        ids = ids[keep]
        num_rel = num_rel[keep]
    ranks = np.arange(1, k + 1, dtype=np.float64)  # [k]
    disc = _discounts(k)  # [k]
    idcg = _idcg(num_rel, k)  # [n, k]
    hits = _hits(Y, ids).astype(np.float64)  # [n, k]
    cum_hits = np.cumsum(hits, axis=1)  # [n, k]
    out.p = (cum_hits / ranks).sum(axis=0)
    out.r = (cum_hits / num_rel[:, None]).sum(axis=0)
    out.ndcg = (np.cumsum(hits * disc, axis=1) / idcg).sum(axis=0)
    if w is not None:
        gains = hits * w[np.maximum(ids, 0)]  # [n, k]; padding has hits == 0
        best = _best_weights(Y, w, k)  # [n, k]
        out.psp = (np.cumsum(gains, axis=1) / ranks).sum(axis=0)
        out.psp_best = (np.cumsum(best, axis=1) / ranks).sum(axis=0)
        out.psdcg = (np.cumsum(gains * disc, axis=1) / idcg).sum(axis=0)
        out.psdcg_best = (np.cumsum(best * disc, axis=1) / idcg).sum(axis=0)
    return out


class MetricsAccumulator:
    """Accumulates every metric over chunks of rows; for evaluation of huge ``N``.

    Feeding all rows at once or in any chunking gives the same result (the metrics are ratios
    of sums of per-row terms).

    Example:
        >>> acc = MetricsAccumulator(num_labels=L, k=5, inv_prop=w)
        >>> for Y_chunk, ids_chunk in chunks:
        ...     acc.update(Y_chunk, ids_chunk)
        >>> metrics = acc.result()

    Args:
        num_labels: ``L``; every chunk of ``Y_true`` must have ``L`` columns.
        k: largest cut-off; the result holds the metrics at ``1..k``.
        inv_prop: float ``[L]`` inverse propensities, or ``None`` to leave out ``PSP`` and
            ``PSnDCG``.
    """

    def __init__(self, num_labels: int, k: int, inv_prop: np.ndarray | None = None) -> None:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise MetricsInputError(f"k must be a positive integer, got {k!r}")
        self.num_labels = int(num_labels)
        self.k = int(k)
        self._w = None if inv_prop is None else _check_inv_prop(inv_prop, self.num_labels)
        self._sums = _Sums(self.k)

    def update(self, Y_true: sp.spmatrix, topk_ids: np.ndarray) -> None:
        """Add a chunk of rows: ``Y_true`` sparse ``[n, L]``, ``topk_ids`` int ``[n, >=k]``."""
        Y = _as_csr(Y_true)
        if Y.shape[1] != self.num_labels:
            raise MetricsInputError(
                f"Y_true has {Y.shape[1]} label columns, expected {self.num_labels}"
            )
        ids = _check_topk(topk_ids, Y.shape[0], self.num_labels, self.k)
        part = _chunk_sums(Y, ids, self._w, self.k)
        s = self._sums
        s.rows += part.rows
        s.empty += part.empty
        for name in ("p", "ndcg", "r", "psp", "psp_best", "psdcg", "psdcg_best"):
            setattr(s, name, getattr(s, name) + getattr(part, name))

    @property
    def num_rows_evaluated(self) -> int:
        """Rows with at least one relevant label seen so far."""
        return self._sums.rows

    @property
    def num_rows_without_labels(self) -> int:
        """Rows without any relevant label seen so far (skipped)."""
        return self._sums.empty

    def arrays(self) -> dict[str, np.ndarray]:
        """The metrics so far as float64 arrays ``[k]`` keyed by ``P``, ``nDCG``, ``R`` (and
        ``PSP``, ``PSnDCG`` when propensities were given).

        Raises:
            MetricsInputError: when no row with a relevant label was seen.
        """
        s = self._sums
        if s.rows == 0:
            raise MetricsInputError(
                f"none of the {s.empty} evaluated rows has a relevant label; nothing to "
                "evaluate (check that the label file is the right one)"
            )
        out = {"P": s.p / s.rows, "nDCG": s.ndcg / s.rows, "R": s.r / s.rows}
        if self._w is not None:
            out["PSP"] = s.psp / s.psp_best
            out["PSnDCG"] = s.psdcg / s.psdcg_best
        return out

    def result(self) -> dict[str, float | int]:
        """The metrics dict (keys ``P@1..``, ``nDCG@1..``, ``PSP@1..``, ``PSnDCG@1..``,
        ``R@1..`` as Python floats in ``[0, 1]``, plus ``num_rows_evaluated`` and
        ``num_rows_without_labels``)."""
        arrays = self.arrays()
        out: dict[str, float | int] = {}
        for name in METRIC_NAMES:
            if name in arrays:
                for j, v in enumerate(arrays[name], start=1):
                    out[f"{name}@{j}"] = float(v)
        out["num_rows_evaluated"] = self.num_rows_evaluated
        out["num_rows_without_labels"] = self.num_rows_without_labels
        return out


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


#: ``ln N - 1 > 0`` needs ``N >= 3``; fewer rows would give weights below 1 (or negative).
_MIN_PROPENSITY_ROWS = 3


def inverse_propensity(Y_train: sp.spmatrix, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Inverse propensity weights of Jain et al. (2016), as in the XC repository.

    ``w_l = 1 + C (N_l + B)^(-A)`` with ``C = (ln N - 1) (B + 1)^A``, ``N`` the number of
    training points and ``N_l`` the number of them labelled ``l``. Usual ``(A, B)``: Wikipedia
    ``(0.5, 0.4)``, Amazon ``(0.6, 2.6)``, anything else ``(0.55, 1.5)``.

    Args:
        Y_train: sparse ``[N, L]`` training labels (non-zeros = relevant).
        A: exponent, > 0.
        B: offset, >= 0.

    Returns:
        float64 ``[L]``, every entry > 1.

    Raises:
        MetricsInputError: on ``A <= 0``, ``B < 0`` or fewer than 3 rows.
    """
    if not (np.isfinite(A) and A > 0):
        raise MetricsInputError(f"propensity parameter A must be > 0, got {A} (-A)")
    if not (np.isfinite(B) and B >= 0):
        raise MetricsInputError(f"propensity parameter B must be >= 0, got {B} (-B)")
    Y = _as_csr(Y_train)
    n = Y.shape[0]
    if n < _MIN_PROPENSITY_ROWS:
        raise MetricsInputError(
            f"propensities need at least {_MIN_PROPENSITY_ROWS} label rows (C = ln N - 1 must be "
            f"> 0), got N={n}; pass the training labels (--train-labels)"
        )
    freq = np.bincount(Y.indices, minlength=Y.shape[1]).astype(np.float64)  # [L]
    return inverse_propensity_from_counts(freq, n, A, B)


def inverse_propensity_from_counts(counts: np.ndarray, num_points: int, A: float = 0.55,
                                   B: float = 1.5) -> np.ndarray:
    """Inverse propensities ``1 + C (N_l + B)^-A``, ``C = (ln N - 1)(B + 1)^A`` from label counts.

    The one propensity formula (:func:`inverse_propensity` computes the counts from a label
    matrix and calls this), from stored training label counts ``[L]`` and the number of
    training points, so a saved model can compute PSP@k without its training data.

    Returns:
        float64 ``[L]``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    C = (math.log(max(num_points, 1)) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * np.power(counts + B, -A)


def _arrays(
    Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int, inv_prop: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    Y = _as_csr(Y_true)
    acc = MetricsAccumulator(Y.shape[1], k, inv_prop)
    acc.update(Y, topk_ids)
    return acc.arrays()


def precision_at_k(Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int) -> np.ndarray:
    """Precision ``P@j = |top-j ∩ y| / j`` averaged over rows with labels, ``j = 1..k``.

    Args:
        Y_true: sparse ``[N, L]``.
        topk_ids: int ``[N, >=k]`` best first, ``-1`` = padding.
        k: largest cut-off.

    Returns:
        float64 ``[k]``.
    """
    return _arrays(Y_true, topk_ids, k)["P"]


def ndcg_at_k(Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int) -> np.ndarray:
    """``nDCG@j = DCG@j / IDCG@j`` averaged over rows with labels, ``j = 1..k``.

    ``DCG@j = sum_{r<=j} rel_r / log2(r + 1)``; ``IDCG@j`` is the DCG of ``min(j, |y|)`` hits.

    Returns:
        float64 ``[k]``.
    """
    return _arrays(Y_true, topk_ids, k)["nDCG"]


def recall_at_k(Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int) -> np.ndarray:
    """Recall ``R@j = |top-j ∩ y| / |y|`` averaged over rows with labels, ``j = 1..k``.

    Returns:
        float64 ``[k]``.
    """
    return _arrays(Y_true, topk_ids, k)["R"]


def psp_at_k(
    Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int, inv_prop: np.ndarray
) -> np.ndarray:
    """Propensity-scored precision, normalized by its best achievable value.

    ``PSP@j = sum_i sum_{r<=j} w[p_ir] rel_ir / sum_i (sum of the j largest w over y_i)``, the
    sums over rows with labels (the XC repository's data-set-level normalization).

    Args:
        inv_prop: float ``[L]`` from :func:`inverse_propensity`.

    Returns:
        float64 ``[k]``.
    """
    return _arrays(Y_true, topk_ids, k, inv_prop)["PSP"]


def psndcg_at_k(
    Y_true: sp.spmatrix, topk_ids: np.ndarray, k: int, inv_prop: np.ndarray
) -> np.ndarray:
    """Propensity-scored nDCG, normalized by its best achievable value.

    ``PSnDCG@j = sum_i PSDCG_i@j / IDCG_i@j  /  sum_i PSDCG*_i@j / IDCG_i@j`` where ``PSDCG``
    weighs each hit by ``w`` and ``PSDCG*`` ranks ``y_i`` by decreasing ``w``.

    Returns:
        float64 ``[k]``.
    """
    return _arrays(Y_true, topk_ids, k, inv_prop)["PSnDCG"]


def evaluate(
    Y_true: sp.spmatrix,
    topk_ids: np.ndarray,
    ks: Iterable[int] = (1, 3, 5),
    inv_prop: np.ndarray | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """Every metric at ``1..max(ks)``.

    Rows of ``Y_true`` without labels are skipped and counted.

    Args:
        Y_true: sparse ``[N, L]``.
        topk_ids: int ``[N, >=max(ks)]`` best first, ``-1`` = padding.
        ks: cut-offs; the result holds every ``k`` in ``1..max(ks)``.
        inv_prop: float ``[L]`` inverse propensities (from the *training* labels). ``None``
            computes them from ``Y_true`` itself with ``A=0.55, B=1.5`` (logged); with fewer
            than 3 rows that is impossible and ``PSP``/``PSnDCG`` are left out (warning).
        chunk_size: rows per chunk (``None``: all at once); bounds temporary memory.

    Returns:
        ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., "PSnDCG@1": ..., "R@1": ..., ...,
        "num_rows_evaluated": int, "num_rows_without_labels": int}``; values in ``[0, 1]``.
    """
    ks_list: Sequence[int] = list(ks)
    if not ks_list:
        raise MetricsInputError("ks is empty; give at least one cut-off such as (1, 3, 5)")
    k = max(ks_list)
    if min(ks_list) < 1:
        raise MetricsInputError(f"every k must be >= 1, got ks={tuple(ks_list)}")
    Y = _as_csr(Y_true)
    if inv_prop is None:
        if Y.shape[0] >= _MIN_PROPENSITY_ROWS:
            logger.info(
                "no propensities given: computing them from the evaluated labels (A=0.55, B=1.5)"
            )
            inv_prop = inverse_propensity(Y)
        else:
            logger.warning(
                "no propensities given and only %d rows to compute them from: PSP@k and "
                "PSnDCG@k left out (pass inv_prop from the training labels)",
                Y.shape[0],
            )
    acc = MetricsAccumulator(Y.shape[1], int(k), inv_prop)
    n = Y.shape[0]
    ids = np.asarray(topk_ids)
    if ids.ndim >= 1 and ids.shape[0] != n:
        raise MetricsInputError(
            f"topk_ids has {ids.shape[0]} rows but Y_true has {n}; predictions and labels "
            "must describe the same points in the same order"
        )
    if chunk_size is None or chunk_size >= n:
        acc.update(Y, ids)
    else:
        if chunk_size < 1:
            raise MetricsInputError(f"chunk_size must be >= 1, got {chunk_size}")
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            acc.update(Y[start:stop], ids[start:stop])
    return acc.result()
