"""CSR rows -> torch batches: EmbeddingBag inputs for features, padded positives for labels.

Pure functions on ``scipy.sparse`` CSR matrices (no file I/O, no printing) plus a deterministic,
resumable :class:`BatchIterator`.

Public API::

    csr_to_bag(X)          -> (indices int64 [nnz], offsets int64 [B], weights float32 [nnz])
    csr_to_padded(Y)       -> (pos_ids int64 [B, P], pos_mask bool [B, P]),  P = max(1, max row nnz)
    fit_idf(X)             -> idf float32 [D]      (smooth idf, as scikit-learn)
    tfidf_transform(X, idf)-> X * idf column-wise  (new CSR; the input is not modified)
    l2_normalize_rows(X)   -> rows of unit L2 norm (empty rows stay empty)
    BatchIterator(X, Y, batch_size, shuffle=True, seed=0, drop_last=False, device="cpu")
        yields Batch(indices, offsets, weights, pos_ids, pos_mask, rows) on ``device``;
        ``state_dict()`` / ``load_state_dict()`` give exact resume at (epoch, batch index).

Padding convention: padded slots of ``pos_ids`` hold 0 (a valid id) and are ``False`` in
``pos_mask``; consumers must use the mask. Every stored entry of ``Y`` counts as a positive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from .device import resolve_device
from .errors import ConfigError, DataFormatError

__all__ = [
    "Batch",
    "BatchIterator",
    "csr_to_bag",
    "csr_to_padded",
    "fit_idf",
    "is_weighted",
    "tfidf_transform",
    "l2_normalize_rows",
]

logger = logging.getLogger(__name__)


def _as_csr(M: Any, name: str) -> sp.csr_matrix:
    if not sp.issparse(M):
        raise DataFormatError(
            None, None, f"{name} must be a scipy.sparse matrix, got {type(M).__name__}"
        )
    return M.tocsr() if M.format != "csr" else M


def csr_to_bag(
    X: sp.spmatrix, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn CSR rows into ``nn.EmbeddingBag`` inputs (``mode="sum"``, ``per_sample_weights``).

    Args:
        X: ``[B, D]`` sparse features (any scipy sparse format; converted to CSR).
        device: where to put the tensors (``None``: CPU).

    Returns:
        ``indices`` int64 ``[nnz]`` feature ids, ``offsets`` int64 ``[B]`` start of each row in
        ``indices`` (empty rows allowed: they give a zero bag), ``weights`` float32 ``[nnz]``
        feature values.
    """
    X = _as_csr(X, "X")
    indices = torch.from_numpy(np.asarray(X.indices, dtype=np.int64))  # [nnz]
    offsets = torch.from_numpy(np.asarray(X.indptr[:-1], dtype=np.int64))  # [B]
    weights = torch.from_numpy(np.asarray(X.data, dtype=np.float32))  # [nnz]
    if device is not None:
        dev = resolve_device(device)
        indices, offsets, weights = (t.to(dev) for t in (indices, offsets, weights))
    return indices, offsets, weights


def csr_to_padded(
    Y: sp.spmatrix, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the positive label ids of each CSR row to a rectangle (vectorized, no row loop).

    Args:
        Y: ``[B, L]`` sparse labels; every stored entry is a positive.
        device: where to put the tensors (``None``: CPU).

    Returns:
        ``pos_ids`` int64 ``[B, P]`` (padding holds 0) and ``pos_mask`` bool ``[B, P]`` where
        ``P = max(1, max positives per row)``. Ids keep the row's stored order. Every id is
        checked here, on the host, to lie in ``[0, L)``, so that consumers on a device need not
        check them again (a device-side check costs a synchronisation).

    Raises:
        DataFormatError: a stored column index lies outside ``[0, L)`` (a malformed matrix).
    """
    Y = _as_csr(Y, "Y")
    B = Y.shape[0]
    indptr = np.asarray(Y.indptr, dtype=np.int64)
    counts = np.diff(indptr)  # [B]
    P = max(1, int(counts.max()) if B else 1)
    nnz = int(indptr[-1])
    if nnz:
        lo, hi = int(Y.indices[:nnz].min()), int(Y.indices[:nnz].max())
        if lo < 0 or hi >= Y.shape[1]:
            raise DataFormatError(
                None, None,
                f"label id {lo if lo < 0 else hi} is outside [0, {Y.shape[1]}) in a label "
                "matrix of that width; the CSR matrix is malformed -- rebuild it "
                "(scipy.sparse.csr_matrix((data, indices, indptr), shape=(N, L)) with every "
                "index < L)",
            )
    rows = np.repeat(np.arange(B, dtype=np.int64), counts)  # [nnz]
    cols = np.arange(nnz, dtype=np.int64) - np.repeat(indptr[:-1], counts)  # [nnz] slot in row
    ids = np.zeros((B, P), dtype=np.int64)
    mask = np.zeros((B, P), dtype=bool)
    ids[rows, cols] = Y.indices[:nnz]
    mask[rows, cols] = True
    pos_ids, pos_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    if device is not None:
        dev = resolve_device(device)
        pos_ids, pos_mask = pos_ids.to(dev), pos_mask.to(dev)
    return pos_ids, pos_mask


def is_weighted(X: sp.spmatrix) -> bool:
    """Whether some stored value of ``X [N, D]`` is not a whole number.

    Counts and binary indicators are whole numbers; TF-IDF, BM25 or distance-weighted features
    are not. ``TrainConfig.tfidf = "auto"`` applies the IDF only to unweighted inputs, so that a
    file that is already TF-IDF (the XC repository's, ``../shared/data/real``) is not weighted
    twice.
    """
    data = _as_csr(X, "X").data
    return bool(data.size) and bool(np.any(data != np.round(data)))


def fit_idf(X: sp.spmatrix) -> np.ndarray:
    """Smooth inverse document frequency ``log((1 + N) / (1 + df)) + 1`` per feature.

    Args:
        X: ``[N, D]`` sparse features (explicit zeros are not counted).

    Returns:
        float32 ``[D]``.
    """
    X = _as_csr(X, "X")
    N, D = X.shape
    nz = X.data != 0
    df = np.bincount(X.indices[nz], minlength=D).astype(np.float64)  # [D]
    return (np.log((1.0 + N) / (1.0 + df)) + 1.0).astype(np.float32)


def tfidf_transform(X: sp.spmatrix, idf: np.ndarray) -> sp.csr_matrix:
    """Scale each column ``j`` of ``X`` by ``idf[j]``; returns a new float32 CSR matrix.

    Raises:
        DataFormatError: ``idf`` does not have one entry per feature column.
    """
    X = _as_csr(X, "X")
    idf = np.asarray(idf, dtype=np.float32).reshape(-1)
    if idf.shape[0] != X.shape[1]:
        raise DataFormatError(
            None,
            None,
            f"idf has {idf.shape[0]} entries but X has {X.shape[1]} feature columns; "
            "fit the idf on data with the same feature space (fit_idf(X_train))",
        )
    data = np.asarray(X.data, dtype=np.float32) * idf[X.indices]  # [nnz]
    return sp.csr_matrix((data, X.indices.copy(), X.indptr.copy()), shape=X.shape)


def l2_normalize_rows(X: sp.spmatrix) -> sp.csr_matrix:
    """Rows scaled to unit L2 norm (rows of norm 0 are left as they are); new float32 CSR."""
    X = _as_csr(X, "X")
    data = np.asarray(X.data, dtype=np.float32)
    counts = np.diff(X.indptr)  # [N]
    rows = np.repeat(np.arange(X.shape[0]), counts)  # [nnz]
    sq = np.bincount(rows, weights=np.square(data, dtype=np.float64), minlength=X.shape[0])  # [N]
    norms = np.sqrt(sq)
    norms[norms == 0] = 1.0
    scale = np.repeat(norms, counts)  # [nnz]
    out = (data / scale).astype(np.float32)
    return sp.csr_matrix((out, X.indices.copy(), X.indptr.copy()), shape=X.shape)


class Batch(NamedTuple):
    """One mini-batch, all tensors on the iterator's device.

    Attributes:
        indices: int64 ``[nnz]`` feature ids (EmbeddingBag input).
        offsets: int64 ``[B]`` row starts in ``indices``.
        weights: float32 ``[nnz]`` feature values (``per_sample_weights``).
        pos_ids: int64 ``[B, P]`` positive label ids (padding 0), or ``None`` without labels.
        pos_mask: bool ``[B, P]``, or ``None`` without labels.
        rows: int64 ``[B]`` (CPU) row numbers of this batch in the full matrix.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    pos_ids: torch.Tensor | None
    pos_mask: torch.Tensor | None
    rows: torch.Tensor


class BatchIterator:
    """Deterministic, resumable mini-batches over CSR rows.

    The row order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed,
    e])``, so it depends only on ``(seed, e)``: resuming at ``(epoch, batch_index)`` reproduces
    the exact same remaining batches. Iterating the object runs the *current* epoch from the
    current batch index and then advances to the next epoch::

        it = BatchIterator(X, Y, batch_size=256, seed=0, device="auto")
        for epoch in range(epochs):
            for batch in it:          # it.epoch == epoch during the loop
                ...                   # it.state_dict() here resumes right after this batch

    Args:
        X: ``[N, D]`` sparse features.
        Y: ``[N, L]`` sparse labels, or ``None`` (inference: ``pos_ids``/``pos_mask`` are None).
        batch_size: rows per batch (> 0).
        shuffle: shuffle rows each epoch; ``False`` keeps the file order.
        seed: base seed; ``None`` draws one (recorded in ``state_dict`` so resume still works).
        generator: optional ``numpy.random.Generator`` or ``torch.Generator`` used only to draw
            the base seed when ``seed`` is ``None``.
        drop_last: drop the last incomplete batch.
        device: device of the yielded tensors (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(
        self,
        X: sp.spmatrix,
        Y: sp.spmatrix | None,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = 0,
        generator: np.random.Generator | torch.Generator | None = None,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.X = _as_csr(X, "X")
        self.Y = None if Y is None else _as_csr(Y, "Y")
        if self.Y is not None and self.Y.shape[0] != self.X.shape[0]:
            raise DataFormatError(
                None,
                None,
                f"X has {self.X.shape[0]} rows but Y has {self.Y.shape[0]}; "
                "features and labels must describe the same points",
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (--batch-size)")
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.device = resolve_device(device)
        if seed is None:
            if isinstance(generator, torch.Generator):
                seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            elif isinstance(generator, np.random.Generator):
                seed = int(generator.integers(0, 2**62))
            else:
                seed = int(np.random.SeedSequence().entropy % (2**62))
        self.seed = int(seed)
        self.epoch = 0
        self.batch_index = 0

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.X.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = self.num_rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    # -- order --------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``: int64 ``[N]`` (a permutation, or ``arange`` without shuffle)."""
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)

    def make_batch(self, rows: np.ndarray) -> Batch:
        """Build the batch of the given row numbers (int array ``[B]``) on ``self.device``."""
        rows = np.asarray(rows, dtype=np.int64)
        dev = self.device
        nb = dev.type == "cuda"
        idx, off, w = csr_to_bag(self.X[rows])
        if nb:
            idx, off, w = idx.pin_memory(), off.pin_memory(), w.pin_memory()
        idx, off, w = (t.to(dev, non_blocking=nb) for t in (idx, off, w))
        pos_ids = pos_mask = None
        if self.Y is not None:
            pos_ids, pos_mask = csr_to_padded(self.Y[rows])
            pos_ids = pos_ids.to(dev, non_blocking=nb)
            pos_mask = pos_mask.to(dev, non_blocking=nb)
        return Batch(idx, off, w, pos_ids, pos_mask, torch.from_numpy(rows))

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_batch`` on, without touching the iterator's state."""
        order = self.epoch_order(epoch)
        for b in range(int(start_batch), len(self)):
            yield self.make_batch(order[b * self.batch_size : (b + 1) * self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order(self.epoch)
        while self.batch_index < len(self):
            b = self.batch_index
            batch = self.make_batch(order[b * self.batch_size : (b + 1) * self.batch_size])
            self.batch_index += 1  # state now points at the next batch to yield
            yield batch
        self.epoch += 1
        self.batch_index = 0

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "batch_index"}``: the next batch to yield (JSON-able)."""
        return {"seed": self.seed, "epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output."""
        try:
            seed, epoch, bi = int(state["seed"]), int(state["epoch"]), int(state["batch_index"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"batch iterator state {state!r} needs integer 'seed', 'epoch', 'batch_index'"
            ) from exc
        if epoch < 0 or not 0 <= bi <= len(self):
            raise ConfigError(
                f"batch iterator state epoch={epoch}, batch_index={bi} is out of range "
                f"(0..{len(self)} batches per epoch); was it saved with another --batch-size?"
            )
        self.seed, self.epoch, self.batch_index = seed, epoch, bi
