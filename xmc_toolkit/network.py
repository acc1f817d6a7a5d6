"""The network a :class:`~xmc_toolkit.train_config.TrainConfig` describes, and its inputs.

:class:`Preprocessor` (TF-IDF + L2 rows), :func:`build_encoder` / :func:`init_bag`,
:class:`XMCNetwork` (``SparseEncoder`` queries ``[B, d]`` scored against a ``LabelTable``
``[L, d]`` + bias ``[L]``), its exact / approximate top-k (:func:`predict_topk_network`), its size
without allocating it (:func:`network_bytes`) and the PIFA label init. Nothing here trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .distributed import shard_range, sharded_topk
from .progress import progress_bar as _progress
from .train_config import AUTO_DROPOUT, AUTO_INPUT_DROPOUT, TrainConfig

if TYPE_CHECKING:
    from .encoder import EnsembleEncoder, SparseEncoder

__all__ = [
    "Preprocessor",
    "build_encoder",
    "init_bag",
    "XMCNetwork",
    "predict_topk_network",
    "network_bytes",
    "host_memory_bytes",
    "pifa_init_",
    "init_label_rows",
    "label_table_rows",
    "ShardedXMCNetwork",
    "sharded_predict_topk",
    "pifa_init_shard_",
]


@dataclass
class Preprocessor:
    """A power of the stored values, TF-IDF scaling (with the training set's IDF) and row L2
    normalization of inputs, in that order.

    Attributes:
        idf: float32 ``[D]`` or ``None`` (no TF-IDF).
        l2_normalize: normalize rows to unit L2 norm.
        power: every stored value ``v`` becomes ``v ** power`` first (1: unchanged; below 1
            needs non-negative values).
    """

    idf: np.ndarray | None
    l2_normalize: bool
    power: float = 1.0

    @classmethod
    def fit(cls, X: sp.csr_matrix, tfidf: bool, l2_normalize: bool,
            power: float = 1.0) -> "Preprocessor":
        from .batching import fit_idf

        return cls(fit_idf(X) if tfidf else None, l2_normalize, float(power))

    def transform(self, X: sp.spmatrix) -> sp.csr_matrix:
        """Return the transformed ``[N, D]`` float32 CSR (the input is not modified).

        Raises:
            DataFormatError: a row's values are not finite after the transform (a value such
                as 3e38 overflows float32 under TF-IDF or the L2 norm): the input is at fault,
                not the model, and the message names the row and its largest value.
        """
        from .batching import l2_normalize_rows, tfidf_transform

        from .errors import DataFormatError

        def first_row(bad: np.ndarray) -> tuple[int, int]:  # (entry, row) of the first True
            entry = int(np.flatnonzero(bad)[0])
            return entry, int(np.searchsorted(X.indptr, entry, side="right")) - 1

        raw = X
        X = sp.csr_matrix(X, dtype=np.float32)
        if self.power != 1.0:
            if X.nnz and X.data.min() < 0:
                entry, row = first_row(X.data < 0)
                raise DataFormatError(None, None, f"input row {row + 1} (1-based) has the negative"
                                      f" feature value {float(X.data[entry])!r}; the model raises"
                                      f" feature values to the power {self.power} (feature_power),"
                                      " which needs values >= 0; train with --feature-power 1")
            # a new data array (rebinding, not writing in place): the caller's matrix is untouched
            X.data = np.power(X.data, np.float32(self.power))
        if self.idf is not None:
            X = tfidf_transform(X, self.idf)
        if self.l2_normalize:
            X = l2_normalize_rows(X)
        if X.nnz and not np.isfinite(X.data).all():
            _, row = first_row(~np.isfinite(X.data))
            vals = sp.csr_matrix(raw)[row].data
            big = float(np.max(np.abs(vals))) if len(vals) else float("nan")
            raise DataFormatError(None, None, f"input row {row + 1} (1-based) has feature values "
                                  f"that are not finite after TF-IDF / L2 normalisation "
                                  f"(largest |value| {big:g}, float32 overflows above 3.4e38 "
                                  "and its square above 1.8e19): check or rescale the data")
        return X


def build_encoder(num_features: int, config: TrainConfig, *,
                  sparse_grad: bool | None = None) -> SparseEncoder | EnsembleEncoder:
    """The :class:`SparseEncoder` that ``config`` describes (auto width resolved for ``D``);
    an :class:`EnsembleEncoder` of ``config.ensemble`` of them when that is above 1.

    ``sparse_grad=None`` follows ``--bag-optimizer``; the bag's own init is :func:`init_bag`.
    """
    from .encoder import EnsembleEncoder, SparseEncoder

    if sparse_grad is None:
        sparse_grad = config.resolved_bag_optimizer(num_features) == "sparse-adam"
    # auto (-1) values not resolved for a data set (TrainConfig.resolved_for_data) take the
    # values of the larger data sets
    dropout = config.dropout if config.dropout >= 0 else AUTO_DROPOUT[1]
    input_dropout = config.input_dropout if config.input_dropout >= 0 else AUTO_INPUT_DROPOUT[1]

    def one() -> SparseEncoder:
        return SparseEncoder(
            num_features, dim=config.dim, hidden=config.resolved_hidden(num_features),
            dropout=dropout, norm=config.norm, linear_only=config.linear_only,
            input_dropout=input_dropout, sparse_grad=sparse_grad)

    if config.ensemble > 1:
        return EnsembleEncoder([one() for _ in range(config.ensemble)])
    return one()


def init_bag(encoder: SparseEncoder | EnsembleEncoder, config: TrainConfig) -> None:
    """Re-initialize the input bag rows from N(0, ``bag_init_std``) (no-op when it is 0).

    N(0, 1) bag rows give O(1) hidden pre-activations on L2-normalized inputs; the encoder's own
    1/sqrt(width) default trains markedly worse on Bibtex (55 vs 62 P@1).
    """
    if config.bag_init_std > 0:
        members = getattr(encoder, "members", [encoder])
        with torch.no_grad():
            for m in members:
                nn.init.normal_(m.bag.weight, std=config.bag_init_std)


class XMCNetwork(nn.Module):
    """Sparse encoder + label table.

    Args:
        num_features: ``D``.
        num_labels: ``L``.
        config: the :class:`TrainConfig` (model fields are read).
    """

    def __init__(self, num_features: int, num_labels: int, config: TrainConfig) -> None:
        super().__init__()
        from .output_layer import LabelTable

        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.encoder = build_encoder(num_features, config)
        self.members = int(getattr(self.encoder, "num_members", 1))
        self.labels = LabelTable(num_labels, self.members * config.dim, bias=config.label_bias)
        init_bag(self.encoder, config)  # after the label table: keeps the seeded draws' order

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, n * d]`` of a batch of EmbeddingBag inputs (``n = 1`` members unless
        ``--ensemble``; an ensemble's query is its members' side by side, divided by ``n``)."""
        return self.encoder(indices, offsets, weights)

    def label_parameters(self) -> list[nn.Parameter]:
        return list(self.labels.parameters())

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    @property
    def label_weight(self) -> torch.Tensor:
        """``[L, d]`` label embeddings (the parameter itself)."""
        return self.labels.weight.weight

    @property
    def label_bias(self) -> torch.Tensor | None:
        """``[L]`` label bias parameter or ``None``."""
        b = getattr(self.labels, "bias", None)
        if b is None:
            return None
        return b.weight.view(-1) if isinstance(b, nn.Embedding) else b

# ------------------------------------------------------------------------------------------------
# exact top-k prediction (shared by validation, evaluate.py and model.py)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_topk_network(network: XMCNetwork, X: sp.csr_matrix, k: int, *,
                         batch_size: int = 2048, chunk_size: int = 65536,
                         show_progress: bool = False, approx: bool = False,
                         sampler: Any = None, num_cells: int = 16
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Exact (or MIDX-approximate) top-k labels of preprocessed rows ``X``.

    Args:
        network: the trained network (put in eval mode for the call).
        X: ``[N, D]`` preprocessed features.
        k: labels per row (``<= L``).
        batch_size: rows per block.
        chunk_size: labels per scoring block (exact path).
        show_progress: rich progress bar.
        approx: use ``network.labels.approx_topk`` through ``sampler`` (a MIDX index).
        sampler: the MIDX sampler (updated) for ``approx``.
        num_cells: MIDX cells probed per query (``approx``).

    Returns:
        ``ids`` int64 ``[N, k]`` and ``scores`` float32 ``[N, k]``, best first.
    """
    from .batching import csr_to_bag

    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    ids_out: list[np.ndarray] = []
    sc_out: list[np.ndarray] = []
    starts: Any = range(0, X.shape[0], batch_size)
    try:
        with _progress(show_progress, "predicting", len(starts)) as advance:
            for s in starts:
                idx, off, w = csr_to_bag(X[s: s + batch_size], device=device)
                q = network(idx, off, w).float()  # [b, d]
                if approx:
                    from .output_layer import approx_topk

                    scores, ids = approx_topk(q, network.labels.label_embeddings(),
                                              network.labels.bias_vector(), sampler, k,
                                              num_cells=num_cells)
                else:
                    scores, ids = network.labels.topk(q, k, chunk_size=chunk_size)
                ids_out.append(ids.cpu().numpy().astype(np.int64))
                sc_out.append(scores.float().cpu().numpy())
                advance(1)
    finally:
        network.train(was_training)
    if not ids_out:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids_out), np.concatenate(sc_out)



def _meta_network(num_features: int, num_labels: int, config: TrainConfig) -> XMCNetwork:
    """The network ``config`` describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return XMCNetwork(num_features, num_labels, config)


def network_bytes(num_features: int, num_labels: int, config: TrainConfig) -> int:
    """Bytes of the parameters of the network ``config`` describes (no allocation)."""
    net = _meta_network(num_features, num_labels, config)
    return sum(p.numel() * p.element_size() for p in net.parameters())


def host_memory_bytes() -> int | None:
    """Physical memory of this machine, or ``None`` when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


@torch.no_grad()
def pifa_init_(network: XMCNetwork, X: sp.csr_matrix, Y: sp.csr_matrix, batch_size: int) -> None:
    """Set the label rows of labels with training rows to their PIFA rows (``label_init``)."""
    from .encoder import encode_csr
    from .label_init import pifa_label_rows

    queries = encode_csr(network.encoder, X, batch_size=batch_size)  # [N, n*d] eval mode
    rows, has_rows = pifa_label_rows(queries, Y)
    weight = network.labels.weight.weight  # [L, n*d]
    weight[has_rows] = rows[has_rows].to(weight.dtype)


# ------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------
_INIT_BLOCK = 4096


def init_label_rows(start: int, stop: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Initial label embeddings of rows ``[start, stop)``: ``[stop - start, dim] float32``.

    Rows are drawn in fixed blocks of 4096 with a generator seeded by ``(seed, block)``, so the
    initial table is the same for every number of shards.
    """
    out = torch.empty(max(0, stop - start), dim)
    b0, b1 = start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)
    for b in range(b0, b1):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b + 17)
        block = torch.randn(_INIT_BLOCK, dim, generator=g) * std  # [4096, d]
        lo, hi = max(start, b * _INIT_BLOCK), min(stop, (b + 1) * _INIT_BLOCK)
        out[lo - start : hi - start] = block[lo - b * _INIT_BLOCK : hi - b * _INIT_BLOCK]
    return out


_TABLE_BLOCK = 4096  # rows drawn at once by label_table_rows (a multiple of 16)


@torch.no_grad()
def label_table_rows(num_labels: int, dim: int, start: int, stop: int,
                     std: float = 0.01) -> torch.Tensor:
    """Rows ``[start, stop)`` of the initial table of
    :class:`~xmc_toolkit.output_layer.LabelTable` ``[num_labels, dim]``: ``[stop - start, dim]``.

    The same draws from the global generator as ``LabelTable(num_labels, dim)`` (the N(0, 1)
    fill of ``nn.Embedding``, then N(0, ``std``)), made block by block so that only one block
    of the table exists at a time: CPU ``normal_`` fills whole groups of 16 values, so blocks
    of whole groups give the same numbers and leave the generator in the same state as one
    draw of the table (``tests/test_kernels.py`` checks it).
    """
    out = torch.empty(max(0, stop - start), dim)
    for keep, std_i in ((False, 1.0), (True, std)):
        s = 0
        while s < num_labels:
            e = num_labels if num_labels - s < 2 * _TABLE_BLOCK else s + _TABLE_BLOCK
            block = torch.empty(e - s, dim).normal_(0.0, std_i)  # [e - s, dim]
            a, b = max(s, start), min(e, stop)
            if keep and a < b:
                out[a - start:b - start] = block[a - s:b - s]
            s = e
    return out


class ShardedXMCNetwork(nn.Module):
    """The encoder of :class:`xmc_toolkit.train.XMCNetwork` and one row shard of its label table.

    Args:
        num_features: ``D``.
        num_labels: ``L`` (global).
        config: a ``TrainConfig`` (``dim``, ``hidden``, ``dropout``, ``norm``, ``linear_only``,
            ``label_bias``, ``seed`` are read).
        rank, world_size: which shard this is.

    Attributes:
        label_offset / num_local: the shard is rows ``[label_offset, label_offset + num_local)``.
        members: ``n``, the ensemble's member count (``--ensemble``; 1 otherwise).
        weight: ``nn.Embedding(L_r, n * d)``; bias: ``nn.Embedding(L_r, 1)`` or ``None``.
    """

    def __init__(self, num_features: int, num_labels: int, config: Any, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.rank, self.world_size = rank, world_size
        lo, hi = shard_range(num_labels, rank, world_size)
        self.label_offset, self.num_local = lo, hi - lo
        # the draws of XMCNetwork, in its order, from the global generator (seeded alike on
        # every rank by the caller): the encoder, the whole label table -- drawn block by
        # block, keeping this shard's rows -- and the bag rows. Every number of ranks starts
        # from the network of one process, and the generator ends in the same state.
        # Dense bag gradients: DDP all-reduces them (NCCL has no sparse all-reduce).
        self.encoder = build_encoder(num_features, config, sparse_grad=False)
        self.members = int(getattr(self.encoder, "num_members", 1))  # --ensemble
        dim = self.members * config.dim  # an ensemble's label rows: its members' side by side
        self.weight = nn.Embedding(self.num_local, dim,
                                   _weight=label_table_rows(num_labels, dim, lo, hi))
        self.bias: nn.Embedding | None = None
        if config.label_bias:
            torch.empty(num_labels, 1).normal_()  # the draw of LabelTable's bias (then zeroed)
            self.bias = nn.Embedding(self.num_local, 1, _weight=torch.zeros(self.num_local, 1))
        init_bag(self.encoder, config)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, d]``."""
        return self.encoder(indices, offsets, weights)

    def label_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight] + ([self.bias.weight] if self.bias is not None else [])

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    @property
    def label_weight(self) -> torch.Tensor:
        """``[L_r, n * d]`` this rank's label rows (the parameter itself)."""
        return self.weight.weight

    @property
    def label_bias(self) -> torch.Tensor | None:
        """``[L_r]`` this rank's bias rows or ``None``."""
        return self.local_bias

    @property
    def local_bias(self) -> torch.Tensor | None:
        """``[L_r]`` bias parameter view or ``None``."""
        return None if self.bias is None else self.bias.weight.view(-1)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def sharded_predict_topk(network: ShardedXMCNetwork, X: sp.csr_matrix, k: int, *,
                         batch_size: int = 2048, chunk_size: int = 65536) -> np.ndarray:
    """Exact top-k label ids ``int64 [N, k]`` of preprocessed rows ``X``, on every rank.

    Collective: every rank must call it with the same ``X``. Each rank encodes the same
    blocks of rows (the encoder is replicated), scores them on its shard by chunks, and the
    per-shard top-k lists are all-gathered and merged.
    """
    from .batching import csr_to_bag

    device = network.weight.weight.device
    was = network.training
    network.eval()
    out: list[np.ndarray] = []
    try:
        for s in range(0, X.shape[0], batch_size):
            idx, off, w = csr_to_bag(X[s : s + batch_size], device=device)
            q = network(idx, off, w).float()  # [b, d]
            _, ids = sharded_topk(q, network.weight.weight, network.local_bias, k,
                                  network.label_offset, chunk_size=chunk_size, replicated=True)
            out.append(ids.cpu().numpy())
    finally:
        network.train(was)
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


@torch.no_grad()
def pifa_init_shard_(network: ShardedXMCNetwork, X: sp.csr_matrix, Y: sp.csr_matrix,
                     batch_size: int) -> None:
    """:func:`pifa_init_` of one rank: the rows of the labels it holds (``Y``'s columns
    ``[label_offset, label_offset + num_local)``), from the replicated encoder."""
    from .encoder import encode_csr
    from .label_init import pifa_label_rows

    lo, hi = network.label_offset, network.label_offset + network.num_local
    queries = encode_csr(network.encoder, X, batch_size=batch_size)  # [N, n*d] eval mode
    rows, has_rows = pifa_label_rows(queries, sp.csr_matrix(Y)[:, lo:hi])
    weight = network.weight.weight  # [L_r, n*d]
    weight[has_rows] = rows[has_rows].to(weight.dtype)
