"""Sparse feature encoder: a weighted EmbeddingBag followed by a small MLP -> ``[B, d]`` queries.

Architecture (``hidden = (h1, ..., hn)``)::

    bag:   EmbeddingBag(D, h1, mode="sum")(indices, offsets, per_sample_weights) + bias   [B, h1]
    block: norm -> activation -> dropout                                               [B, h1]
    then for each next width: Linear -> norm -> activation -> dropout                  [B, h_i]
    head:  Linear(hn, d)                                                                [B, d]

With ``hidden=()`` or ``linear_only=True`` the encoder is one EmbeddingBag(D, d) plus bias: a
linear model of the (e.g. TF-IDF) features. Inputs come from :func:`xmc_toolkit.batching.csr_to_bag`.

Public API::

    EncoderConfig(dim=128, hidden=(512,), dropout=0.0, norm="layernorm", activation="relu",
                  linear_only=False, sparse_grad=False, input_dropout=0.0)  # JSON round trip
    SparseEncoder(num_features, dim, hidden, dropout, norm, activation, linear_only, sparse_grad,
                  input_dropout)
    SparseEncoder.from_config(num_features, cfg)
    encoder(indices, offsets, weights) -> [B, d]
    encode_csr(encoder, X, batch_size=4096, show_progress=False) -> float32 [N, d] (no grad)

``sparse_grad=True`` makes the bag weight's gradient sparse (only touched feature rows): use
``torch.optim.SparseAdam`` (or SGD/Adagrad) for ``encoder.sparse_parameters()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import scipy.sparse as sp
import torch
from torch import nn

from .config import ConfigBase
from .errors import ConfigError

__all__ = ["EncoderConfig", "SparseEncoder", "EnsembleEncoder", "encode_csr", "ACTIVATIONS", "NORMS"]

logger = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}
NORMS = ("layernorm", "batchnorm", "none")


@dataclass
class EncoderConfig(ConfigBase):
    """Hyper-parameters of :class:`SparseEncoder` (the feature count comes from the data)."""

    dim: int = field(default=128, metadata={"help": "output (query / label embedding) dimension d"})
    hidden: tuple[int, ...] = field(
        default=(512,),
        metadata={"help": "widths of the hidden layers; the first is the EmbeddingBag width"},
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout after each hidden layer"})
    norm: str | None = field(
        default="layernorm", metadata={"help": "layernorm | batchnorm | none (after each hidden layer)"}
    )
    activation: str = field(default="relu", metadata={"help": "relu | gelu | tanh | silu | identity"})
    linear_only: bool = field(
        default=False, metadata={"help": "a single EmbeddingBag to d (ignores hidden/norm/dropout)"}
    )
    sparse_grad: bool = field(
        default=False, metadata={"help": "sparse gradient for the EmbeddingBag weight (SparseAdam)"}
    )
    input_dropout: float = field(
        default=0.0,
        metadata={"help": "drop each input feature (non-zero) with this probability in training"},
    )

    def problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.dim, int) or self.dim <= 0:
            out.append(f"dim={self.dim!r} must be a positive integer (--dim)")
        hidden = tuple(self.hidden) if isinstance(self.hidden, (list, tuple)) else None
        if hidden is None or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
            out.append(f"hidden={self.hidden!r} must be a list of positive integers (--hidden)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            out.append(f"dropout={self.dropout!r} must be in [0, 1) (--dropout)")
        if not isinstance(self.input_dropout, (int, float)) or not 0.0 <= float(self.input_dropout) < 1.0:
            out.append(f"input_dropout={self.input_dropout!r} must be in [0, 1) (--input-dropout)")
        norm = "none" if self.norm is None else str(self.norm).lower()
        if norm not in NORMS:
            out.append(f"norm={self.norm!r} is unknown; use one of {', '.join(NORMS)} (--norm)")
        if str(self.activation).lower() not in ACTIVATIONS:
            out.append(
                f"activation={self.activation!r} is unknown; use one of "
                f"{', '.join(ACTIVATIONS)} (--activation)"
            )
        return out


class SparseEncoder(nn.Module):
    """EmbeddingBag + MLP encoder of sparse feature rows.

    Args:
        num_features: number of feature columns ``D``.
        dim: output dimension ``d``.
        hidden: hidden widths; the first is the EmbeddingBag width. ``()`` means linear.
        dropout: dropout probability after each hidden block.
        norm: ``"layernorm"``, ``"batchnorm"`` or ``None``/``"none"``.
        activation: ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"`` or ``"identity"``.
        linear_only: one EmbeddingBag(D, d) (+ bias); ``hidden``, ``norm``, ``dropout`` unused.
        sparse_grad: sparse gradient for the EmbeddingBag weight.
        input_dropout: in training, each non-zero input feature is dropped with this
            probability and the kept ones are scaled by ``1 / (1 - p)`` (dropout on the bag's
            ``per_sample_weights``); a strong regularizer for bag-of-words inputs.

    Raises:
        ConfigError: listing every invalid argument.
    """

    def __init__(
        self,
        num_features: int,
        dim: int = 128,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.0,
        norm: str | None = "layernorm",
        activation: str = "relu",
        linear_only: bool = False,
        sparse_grad: bool = False,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cfg = EncoderConfig(
            dim=dim,
            hidden=tuple(hidden),
            dropout=dropout,
            norm=norm,
            activation=activation,
            linear_only=linear_only,
            sparse_grad=sparse_grad,
            input_dropout=input_dropout,
        )
        probs = cfg.problems()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            probs.insert(0, f"num_features={num_features!r} must be a positive integer")
        if probs:
            raise ConfigError(probs)
        self.config = cfg
        self.num_features = num_features
        self.dim = dim
        self.input_dropout = float(input_dropout)
        widths = [] if linear_only else [int(h) for h in hidden]
        bag_width = widths[0] if widths else dim
        self.bag = nn.EmbeddingBag(num_features, bag_width, mode="sum", sparse=sparse_grad)
        self.bag_bias = nn.Parameter(torch.zeros(bag_width))
        # Inputs are typically L2-normalised rows, so each bag coordinate has std ~ init std;
        # 1/sqrt(width) keeps the first activations O(1/sqrt(width)) per coordinate.
        nn.init.normal_(self.bag.weight, std=1.0 / math.sqrt(bag_width))
        norm_name = "none" if norm is None else str(norm).lower()
        act = ACTIVATIONS[str(activation).lower()]
        layers: list[nn.Module] = []
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.Linear(widths[i - 1], w))
            if norm_name == "layernorm":
                layers.append(nn.LayerNorm(w))
            elif norm_name == "batchnorm":
                layers.append(nn.BatchNorm1d(w))
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        if widths:
            layers.append(nn.Linear(widths[-1], dim))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, num_features: int, config: EncoderConfig) -> "SparseEncoder":
        """Build from an :class:`EncoderConfig` (validated here)."""
        config.validate()
        return cls(
            num_features,
            dim=config.dim,
            hidden=tuple(config.hidden),
            dropout=config.dropout,
            norm=config.norm,
            activation=config.activation,
            linear_only=config.linear_only,
            sparse_grad=config.sparse_grad,
            input_dropout=config.input_dropout,
        )

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode a batch.

        Args:
            indices: int64 ``[nnz]`` feature ids.
            offsets: int64 ``[B]`` row starts in ``indices``.
            weights: float32 ``[nnz]`` feature values (``None``: all ones).

        Returns:
            float32 ``[B, d]`` queries.
        """
        if self.training and self.input_dropout > 0:
            if weights is None:
                weights = torch.ones(indices.shape[0], device=indices.device)
            weights = nn.functional.dropout(weights, self.input_dropout, training=True)  # [nnz]
        h = self.bag(indices, offsets, per_sample_weights=weights) + self.bag_bias  # [B, h1]
        return self.mlp(h)  # [B, d]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (the bag weight when ``sparse_grad``)."""
        return [self.bag.weight] if self.bag.sparse else []

    def dense_parameters(self) -> list[nn.Parameter]:
        """All other parameters (for a dense optimizer such as AdamW)."""
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse_ids]


class EnsembleEncoder(nn.Module):
    """``n`` independently initialised :class:`SparseEncoder` members side by side.

    The output is the members' queries concatenated and divided by ``n``: against a label table
    that holds the members' label embeddings side by side (``[L, n * d]``), one dot product is
    the *mean* of the members' scores, so exact and approximate top-k, export and the MIDX index
    see one ordinary ``n * d``-dimensional model. Training gives each member its own loss
    (:func:`xmc_toolkit.train.compute_loss`), which makes it an ensemble rather than one wide
    network.

    Args:
        members: the member encoders (same ``num_features`` and ``dim``).
    """

    def __init__(self, members: Sequence[SparseEncoder]) -> None:
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
        dims = {m.dim for m in members}
        feats = {m.num_features for m in members}
        if len(dims) != 1 or len(feats) != 1:
            raise ConfigError(f"ensemble members disagree: dims {sorted(dims)}, "
                              f"num_features {sorted(feats)}")
        self.members = nn.ModuleList(members)
        self.num_members = len(members)
        self.member_dim = members[0].dim
        self.num_features = members[0].num_features
        self.dim = self.num_members * self.member_dim

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, n * d]``: the members' ``[B, d]`` queries side by side, divided by ``n``."""
        out = torch.cat([m(indices, offsets, weights) for m in self.members], 1)  # [B, n*d]
        return out / self.num_members

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The members' sparse-gradient parameters."""
        return [p for m in self.members for p in m.sparse_parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """All other parameters."""
        return [p for m in self.members for p in m.dense_parameters()]


@torch.no_grad()
def encode_csr(
    encoder: SparseEncoder | EnsembleEncoder,
    X: sp.spmatrix,
    batch_size: int = 4096,
    show_progress: bool = False,
) -> torch.Tensor:
    """Encode all rows of ``X`` in eval mode (restoring the previous mode afterwards).

    Args:
        encoder: the encoder; its parameters' device is used.
        X: ``[N, D]`` sparse features (with the same preprocessing as in training).
        batch_size: rows per forward pass.
        show_progress: show a rich progress bar.

    Returns:
        float32 ``[N, d]`` on the encoder's device.
    """
    from .batching import csr_to_bag  # local: batching imports nothing from here

    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (--batch-size)")
    X = X.tocsr()
    if X.shape[1] != encoder.num_features:
        raise ConfigError(
            f"X has {X.shape[1]} feature columns but the encoder was built for "
            f"{encoder.num_features}; preprocess the data with the model's feature space"
        )
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out: list[torch.Tensor] = []
    starts = range(0, X.shape[0], batch_size)
    try:
        if show_progress:
            from rich.progress import track

            starts = track(starts, description="encoding", total=len(starts))
        for s in starts:
            idx, off, w = csr_to_bag(X[s : s + batch_size], device=device)
            out.append(encoder(idx, off, w))  # [b, d]
    finally:
        encoder.train(was_training)
    if not out:
        return torch.zeros(0, encoder.dim, device=device)
    return torch.cat(out, 0)  # [N, d]
