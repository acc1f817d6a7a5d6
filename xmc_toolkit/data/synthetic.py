"""Synthetic extreme multi-label data with the structure of real XMC data sets.

The generator draws points from a fixed latent model (a function of the seed and the model
parameters only, never of the number of points), so a training and a test file generated with the
same seed share their label structure and a model trained on one generalises to the other.

Latent model (``C`` clusters, ``L`` labels, ``D`` features; see ``docs/datasets.md``):

* label popularity is Zipf-like: ``p_j ∝ (rank_j + 1) ** -label_zipf`` with ranks a random
  permutation of the label ids (heavy head, long tail, frequent labels spread over the id range);
* every label belongs to one latent cluster ``c(j)`` (uniformly at random); a cluster's weight is
  the summed popularity of its labels;
* every cluster owns ``words_per_cluster`` characteristic feature ids and every label
  ``words_per_label`` more; within such a vocabulary the word at position ``r`` is used with
  probability ``∝ (r + 1) ** -vocab_zipf``;
* a background (noise) distribution over all ``D`` features is Zipf with exponent
  ``feature_zipf`` over a random permutation of the feature ids; ``idf_f = log(1 + 1 /
  (noise_tokens * q_f))`` approximates the inverse document frequency it induces.

A point draws a primary cluster ``c1 ~ weight``, with probability ``second_cluster_prob`` a second
cluster ``c2``, ``k = 1 + Poisson(avg_labels - 1)`` label draws (each from ``c2`` with probability
``second_cluster_share`` when it has one, else from ``c1``, proportional to ``p_j`` inside the
cluster; duplicates merge), ``1 + Poisson(tokens_per_label - 1)`` tokens from each of its labels'
vocabularies, ``Poisson(cluster_tokens)`` tokens from its clusters' vocabularies and
``Poisson(noise_tokens)`` background tokens. Feature values are ``(1 + log tf) * idf`` and rows
are L2-normalised.

Randomness is drawn per fixed block of ``BLOCK_SIZE`` points from
``SeedSequence(seed, spawn_key=(split, block))``: the output is deterministic per seed and does
not depend on the chunk size used to write it. Everything inside a block is vectorised.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import ConfigBase
from .._fileio import atomic_write
from ..errors import ConfigError
from .dataset import XMCDataset

__all__ = [
    "BLOCK_SIZE",
    "SyntheticConfig",
    "SyntheticModel",
    "build_model",
    "generate_rows",
    "make_synthetic",
    "write_synthetic",
]

logger = logging.getLogger(__name__)

#: Points per random block. Part of the determinism contract: changing it changes the data.
BLOCK_SIZE = 4096

_SPLITS = {"train": 0, "test": 1}
_MODEL_STREAM = 2
_OVERSAMPLE = 3


@dataclass
class SyntheticConfig(ConfigBase):
    """Parameters of the latent model (not the number of points: train and test share a model)."""

    num_labels: int = field(default=1000, metadata={"help": "L, number of labels (--labels)"})
    num_features: int = field(
        default=10000, metadata={"help": "D, number of features (--features)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the latent model and of the points"})
    num_clusters: int | None = field(
        default=None, metadata={"help": "latent label clusters C; default round(sqrt(L))"}
    )
    avg_labels: float = field(
        default=5.0, metadata={"help": "mean labels per point (>= 1; fewer when clusters are tiny)"}
    )
    max_labels: int = field(default=64, metadata={"help": "cap on label draws per point"})
    label_zipf: float = field(default=1.1, metadata={"help": "Zipf exponent of label popularity"})
    second_cluster_prob: float = field(
        default=0.3, metadata={"help": "probability that a point has a second cluster"}
    )
    second_cluster_share: float = field(
        default=0.3, metadata={"help": "share of a two-cluster point's draws from the second"}
    )
    words_per_label: int = field(default=8, metadata={"help": "characteristic features per label"})
    words_per_cluster: int = field(
        default=24, metadata={"help": "characteristic features per cluster"}
    )
    shared_word_frac: float = field(
        default=0.5,
        metadata={"help": "share of a label's words borrowed from its cluster's vocabulary"},
    )
    vocab_zipf: float = field(
        default=1.0, metadata={"help": "Zipf exponent of word use inside a label/cluster vocab"}
    )
    tokens_per_label: float = field(
        default=6.0, metadata={"help": "mean tokens drawn from each relevant label's vocab (>= 1)"}
    )
    cluster_tokens: float = field(
        default=10.0, metadata={"help": "mean tokens drawn from the point's cluster vocab"}
    )
    noise_tokens: float = field(
        default=20.0, metadata={"help": "mean background (noise) tokens per point"}
    )
    feature_zipf: float = field(
        default=1.0, metadata={"help": "Zipf exponent of the background word distribution"}
    )

    @property
    def clusters(self) -> int:
        """The effective number of clusters."""
        if self.num_clusters is not None:
            return int(self.num_clusters)
        return max(1, int(round(math.sqrt(self.num_labels))))

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.num_labels < 1:
            p.append(f"num_labels must be >= 1, got {self.num_labels} (--labels)")
        if self.num_features < 1:
            p.append(f"num_features must be >= 1, got {self.num_features} (--features)")
        if self.seed < 0:
            p.append(f"seed must be >= 0, got {self.seed} (--seed)")
        if self.num_clusters is not None and not 1 <= self.num_clusters <= max(1, self.num_labels):
            p.append(
                f"num_clusters must be in [1, num_labels={self.num_labels}], "
                f"got {self.num_clusters} (--clusters)"
            )
        if not self.avg_labels >= 1.0:
            p.append(f"avg_labels must be >= 1, got {self.avg_labels} (--avg-labels)")
        if self.max_labels < 1:
            p.append(f"max_labels must be >= 1, got {self.max_labels}")
        for name in ("second_cluster_prob", "second_cluster_share", "shared_word_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                p.append(f"{name} must be in [0, 1], got {v}")
        for name in ("words_per_label", "words_per_cluster"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("label_zipf", "vocab_zipf", "feature_zipf", "cluster_tokens", "noise_tokens"):
            v = getattr(self, name)
            if not (v >= 0.0 and math.isfinite(v)):
                p.append(f"{name} must be a finite number >= 0, got {v}")
        if not self.tokens_per_label >= 1.0:
            p.append(f"tokens_per_label must be >= 1, got {self.tokens_per_label}")
        return p


@dataclass
class SyntheticModel:
    """The latent model: everything the point generator needs (arrays, no file handles).

    Attributes:
        config: the parameters it was built from.
        label_cluster: ``[L] int32`` latent cluster of each label.
        label_prob: ``[L] float64`` Zipf popularity of each label (sums to 1).
        label_words: ``[L, words_per_label] int32`` characteristic feature ids of each label.
        cluster_words: ``[C, words_per_cluster] int32`` characteristic feature ids of each cluster.
        idf: ``[D] float32`` idf-like weight of each feature.
    """

    config: SyntheticConfig
    label_cluster: np.ndarray
    label_prob: np.ndarray
    label_words: np.ndarray
    cluster_words: np.ndarray
    idf: np.ndarray
    # sampling tables (private)
    _order: np.ndarray  # [L] label ids sorted by cluster
    _cum: np.ndarray  # [L + 1] cumulative popularity in that order, _cum[0] = 0
    _cluster_start: np.ndarray  # [C + 1] offsets of each cluster in _order
    _cluster_cdf: np.ndarray  # [C] cumulative cluster weights (last = 1)
    _vocab_cdf_label: np.ndarray  # [words_per_label]
    _vocab_cdf_cluster: np.ndarray  # [words_per_cluster]
    _bg_cdf: np.ndarray  # [D] cumulative background probability by rank
    _bg_perm: np.ndarray  # [D] rank -> feature id

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_words.shape[0])


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    """Cumulative distribution ``[n] float64`` of ``p_r ∝ (r + 1) ** -a`` (last entry 1)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** (-a)
    c = np.cumsum(w)
    c /= c[-1]
    c[-1] = 1.0
    return c


def _draw_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: index ``i`` with ``cdf[i-1] <= u < cdf[i]``; ``u`` in [0, 1)."""
    idx = np.searchsorted(cdf, u, side="right")
    return np.minimum(idx, cdf.shape[0] - 1)


def build_model(config: SyntheticConfig) -> SyntheticModel:
    """Build the latent model of ``config`` (deterministic per seed; O(L * words + D) memory)."""
    config.validate()
    L, D, C = config.num_labels, config.num_features, config.clusters
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(config.seed, spawn_key=(_MODEL_STREAM,)))
    )
    rank = rng.permutation(L)  # [L] popularity rank of each label id
    label_prob = (rank + 1.0) ** (-config.label_zipf)
    label_prob /= label_prob.sum()
    label_cluster = rng.integers(0, C, size=L).astype(np.int32)
    cluster_words = rng.integers(0, D, size=(C, config.words_per_cluster)).astype(np.int32)
    W = config.words_per_label
    own = rng.integers(0, D, size=(L, W)).astype(np.int32)  # [L, W] label-specific words
    shared = cluster_words[  # [L, W] words borrowed from the label's cluster vocabulary
        label_cluster[:, None], rng.integers(0, config.words_per_cluster, size=(L, W))
    ]
    borrow = rng.random((L, W)) < config.shared_word_frac  # [L, W]
    label_words = np.where(borrow, shared, own).astype(np.int32)
    bg_perm = rng.permutation(D).astype(np.int32)  # rank -> feature id

    order = np.argsort(label_cluster, kind="stable")  # [L]
    cum = np.concatenate([[0.0], np.cumsum(label_prob[order])])  # [L + 1]
    sizes = np.bincount(label_cluster, minlength=C)
    cluster_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [C + 1]
    cluster_w = np.bincount(label_cluster, weights=label_prob, minlength=C)
    cluster_cdf = np.cumsum(cluster_w)
    cluster_cdf /= cluster_cdf[-1]
    cluster_cdf[-1] = 1.0

    bg_cdf = _zipf_cdf(D, config.feature_zipf)
    q_rank = np.diff(np.concatenate([[0.0], bg_cdf]))  # [D] background probability by rank
    q = np.empty(D, dtype=np.float64)
    q[bg_perm] = q_rank
    idf = np.log1p(1.0 / (max(config.noise_tokens, 1.0) * q)).astype(np.float32)

    return SyntheticModel(
        config=config,
        label_cluster=label_cluster,
        label_prob=label_prob,
        label_words=label_words,
        cluster_words=cluster_words,
        idf=idf,
        _order=order.astype(np.int64),
        _cum=cum,
        _cluster_start=cluster_start,
        _cluster_cdf=cluster_cdf,
        _vocab_cdf_label=_zipf_cdf(config.words_per_label, config.vocab_zipf),
        _vocab_cdf_cluster=_zipf_cdf(config.words_per_cluster, config.vocab_zipf),
        _bg_cdf=bg_cdf,
        _bg_perm=bg_perm,
    )


def _draw_labels(model: SyntheticModel, clusters: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw one label per entry of ``clusters [T]`` proportional to popularity inside it."""
    lo = model._cluster_start[clusters]  # [T] first position of the cluster in _order
    hi = model._cluster_start[clusters + 1]  # [T] one past the last
    base = model._cum[lo]
    span = model._cum[hi] - base
    pos = np.searchsorted(model._cum, base + u * span, side="right") - 1  # [T]
    pos = np.clip(pos, lo, hi - 1)  # guard float rounding at the cluster edges
    return model._order[pos]


def _generate_block(
    model: SyntheticModel, split: int, block: int, n: int
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The first ``n`` points of random block ``block`` of ``split`` -> (X [n, D], Y [n, L])."""
    cfg = model.config
    L, D = cfg.num_labels, cfg.num_features
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=(split, block)))
    )
    # Always generate the full block and cut it afterwards: the first n rows never depend on n.
    n_keep, n = n, BLOCK_SIZE
    c1 = _draw_cdf(model._cluster_cdf, rng.random(n))  # [n] primary cluster
    has2 = rng.random(n) < cfg.second_cluster_prob  # [n]
    c2 = np.where(has2, _draw_cdf(model._cluster_cdf, rng.random(n)), c1)  # [n] second cluster
    k = np.minimum(1 + rng.poisson(cfg.avg_labels - 1.0, size=n), cfg.max_labels)  # [n] draws
    t_cluster = rng.poisson(cfg.cluster_tokens, size=n)  # [n]
    t_noise = rng.poisson(cfg.noise_tokens, size=n)  # [n]

    # ---- labels --------------------------------------------------------------------------
    # Draw 3k labels with replacement and keep the first k distinct ones of each row, so that a
    # row gets about k distinct labels even when its cluster's head label dominates.
    rows = np.arange(n, dtype=np.int64)
    draw_row = np.repeat(rows, _OVERSAMPLE * k)  # [T] row of each draw, grouped by row
    T = draw_row.shape[0]
    u_lab = rng.random((T, 2))  # [T, 2]: cluster choice, label inside cluster
    from2 = (u_lab[:, 0] < cfg.second_cluster_share) & has2[draw_row]
    draw_cluster = np.where(from2, c2[draw_row], c1[draw_row])  # [T]
    labels = _draw_labels(model, draw_cluster, u_lab[:, 1])  # [T]
    key, first = np.unique(draw_row * L + labels, return_index=True)  # distinct (row, label)
    by_first = np.argsort(first, kind="stable")  # distinct pairs in order of first draw
    key_f = key[by_first]  # grouped by row (draws are grouped by row)
    row_f = key_f // L
    row_start = np.searchsorted(row_f, rows)  # [n] first distinct pair of each row
    rank = np.arange(key_f.shape[0]) - row_start[row_f]  # rank of the pair inside its row
    ykey = np.sort(key_f[rank < k[row_f]])  # [P] sorted by (row, label)
    y_row = ykey // L
    y_lab = ykey - y_row * L
    y_indptr = np.concatenate([[0], np.cumsum(np.bincount(y_row, minlength=n))])
    Y = sp.csr_matrix(
        (np.ones(ykey.shape[0], dtype=np.float32), y_lab.astype(np.int32), y_indptr),
        shape=(n, L),
    )

    # ---- feature tokens ------------------------------------------------------------------
    P = ykey.shape[0]
    t_label = 1 + rng.poisson(cfg.tokens_per_label - 1.0, size=P)  # [P] tokens per (row, label)
    tok_pair = np.repeat(np.arange(P), t_label)  # [T1] index of the (row, label) pair
    r1 = _draw_cdf(model._vocab_cdf_label, rng.random(tok_pair.shape[0]))
    f1 = model.label_words[y_lab[tok_pair], r1]  # [T1]
    row1 = y_row[tok_pair]

    row2 = np.repeat(rows, t_cluster)  # [T2]
    u2 = rng.random((row2.shape[0], 2))
    cl2 = np.where((u2[:, 0] < cfg.second_cluster_share) & has2[row2], c2[row2], c1[row2])
    f2 = model.cluster_words[cl2, _draw_cdf(model._vocab_cdf_cluster, u2[:, 1])]  # [T2]

    row3 = np.repeat(rows, t_noise)  # [T3]
    f3 = model._bg_perm[_draw_cdf(model._bg_cdf, rng.random(row3.shape[0]))]  # [T3]

    tok_row = np.concatenate([row1, row2, row3])
    tok_feat = np.concatenate([f1, f2, f3]).astype(np.int64)
    xkey, tf = np.unique(tok_row * D + tok_feat, return_counts=True)  # sorted by (row, feature)
    x_row = xkey // D
    x_feat = xkey - x_row * D
    val = (1.0 + np.log(tf)) * model.idf[x_feat]  # [nnz] tf-idf
    norm = np.sqrt(np.bincount(x_row, weights=val * val, minlength=n))  # [n]
    val = val / np.maximum(norm[x_row], 1e-12)
    x_indptr = np.concatenate([[0], np.cumsum(np.bincount(x_row, minlength=n))])
    X = sp.csr_matrix(
        (val.astype(np.float32), x_feat.astype(np.int32), x_indptr), shape=(n, D)
    )
    if n_keep < n:
        X, Y = X[:n_keep], Y[:n_keep]
    return X, Y


def _check_split(split: str) -> int:
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def _vstack_csr(parts: list[sp.csr_matrix], ncols: int) -> sp.csr_matrix:
    """Concatenate CSR blocks row-wise without re-sorting (indices stay sorted)."""
    if not parts:
        return sp.csr_matrix((0, ncols), dtype=np.float32)
    if len(parts) == 1:
        return parts[0]
    data = np.concatenate([p.data for p in parts])
    indices = np.concatenate([p.indices for p in parts])
    offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = np.concatenate(
        [[0]] + [p.indptr[1:].astype(np.int64) + off for p, off in zip(parts, offsets)]
    )
    rows = sum(p.shape[0] for p in parts)
    return sp.csr_matrix((data, indices, indptr), shape=(rows, ncols))


def generate_rows(
    model: SyntheticModel, start: int, stop: int, split: str = "train"
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Points ``start .. stop-1`` of ``split``: ``(X [n, D] float32 csr, Y [n, L] float32 csr)``.

    The same point index always gives the same point, whatever range it is generated in.
    """
    s = _check_split(split)
    if not 0 <= start <= stop:
        raise ConfigError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    cfg = model.config
    xs: list[sp.csr_matrix] = []
    ys: list[sp.csr_matrix] = []
    b0, b1 = start // BLOCK_SIZE, (stop + BLOCK_SIZE - 1) // BLOCK_SIZE
    for b in range(b0, b1):  # loop over blocks of 4096 points, vectorised inside
        lo = max(start, b * BLOCK_SIZE) - b * BLOCK_SIZE
        hi = min(stop, (b + 1) * BLOCK_SIZE) - b * BLOCK_SIZE
        X, Y = _generate_block(model, s, b, hi)
        if lo:
            X, Y = X[lo:], Y[lo:]
        xs.append(X)
        ys.append(Y)
    return _vstack_csr(xs, cfg.num_features), _vstack_csr(ys, cfg.num_labels)


def _config_from(
    num_labels: int, num_features: int, seed: int, model_kwargs: dict[str, Any]
) -> SyntheticConfig:
    data = {"num_labels": num_labels, "num_features": num_features, "seed": seed, **model_kwargs}
    return SyntheticConfig.from_dict(data)


def make_synthetic(
    num_labels: int,
    num_points: int,
    num_features: int,
    *,
    seed: int = 0,
    split: str = "train",
    num_clusters: int | None = None,
    avg_labels: float = 5.0,
    label_zipf: float = 1.1,
    **model_kwargs: Any,
) -> XMCDataset:
    """Generate a synthetic data set in memory.

    Args:
        num_labels: ``L``.
        num_points: ``N``.
        num_features: ``D``.
        seed: seed of the latent model and of the points.
        split: ``"train"`` or ``"test"``: two independent samples of the same latent model.
        num_clusters: latent label clusters (default ``round(sqrt(L))``).
        avg_labels: mean label draws per point (duplicates merge, so slightly fewer remain).
        label_zipf: Zipf exponent of the label popularity.
        **model_kwargs: any other :class:`SyntheticConfig` field (e.g. ``noise_tokens``).

    Returns:
        An :class:`XMCDataset` with ``X [N, D]`` and ``Y [N, L]`` float32 CSR.

    Raises:
        ConfigError: a parameter is out of range or unknown (all problems listed).
    """
    if num_points < 0:
        raise ConfigError(f"num_points must be >= 0, got {num_points} (--points)")
    cfg = _config_from(
        num_labels,
        num_features,
        seed,
        {
            "num_clusters": num_clusters,
            "avg_labels": avg_labels,
            "label_zipf": label_zipf,
            **model_kwargs,
        },
    )
    model = build_model(cfg)
    X, Y = generate_rows(model, 0, num_points, split)
    return XMCDataset(X, Y)


def write_synthetic(
    path: str | os.PathLike[str],
    num_labels: int,
    num_points: int,
    num_features: int,
    seed: int = 0,
    test_path: str | os.PathLike[str] | None = None,
    num_test_points: int = 0,
    chunk_size: int = 65536,
    show_progress: bool = False,
    callback: Callable[[str, int, int], None] | None = None,
    **model_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Stream a synthetic data set to XC text file(s) in chunks, with bounded memory.

    The file is written to a temporary name beside it and renamed when complete. The output is
    identical to ``make_synthetic(...)`` with the same arguments, whatever ``chunk_size`` is.

    Args:
        path: training file (Extreme Classification Repository text format).
        num_labels: ``L``.
        num_points: ``N`` training points.
        num_features: ``D``.
        seed: seed of the latent model and of the points.
        test_path: optional test file from the same latent model.
        num_test_points: points in the test file (needs ``test_path``).
        chunk_size: points generated and written per step (rounded up to a multiple of
            ``BLOCK_SIZE``); memory grows linearly with it.
        show_progress: show a rich progress bar.
        callback: called as ``callback(split, points_done, points_total)`` after every chunk.
        **model_kwargs: other :class:`SyntheticConfig` fields (``num_clusters``, ``avg_labels``...).

    Returns:
        ``{"train": {...}, "test": {...}}`` with ``path``, ``num_points``, ``feature_nnz``,
        ``label_nnz`` and ``seconds`` per written file.

    Raises:
        ConfigError: invalid parameters (every problem listed).
    """
    problems = []
    if num_points < 0:
        problems.append(f"num_points must be >= 0, got {num_points} (--points)")
    if num_test_points < 0:
        problems.append(f"num_test_points must be >= 0, got {num_test_points} (--test-points)")
    if num_test_points > 0 and test_path is None:
        problems.append("num_test_points > 0 needs a test path (--test-out)")
    if chunk_size < 1:
        problems.append(f"chunk_size must be >= 1, got {chunk_size}")
    if problems:
        raise ConfigError(problems)
    cfg = _config_from(num_labels, num_features, seed, dict(model_kwargs))
    model = build_model(cfg)
    from .formats import append_xc_rows, write_xc_header  # the data-formats module

    chunk = -(-chunk_size // BLOCK_SIZE) * BLOCK_SIZE

    jobs: list[tuple[str, Path, int]] = [("train", Path(path), num_points)]
    if test_path is not None:
        jobs.append(("test", Path(test_path), num_test_points))

    progress = None
    if show_progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        progress.start()
    out: dict[str, dict[str, Any]] = {}
    try:
        for split, target, n in jobs:
            t0 = time.perf_counter()
            task = progress.add_task(f"synth {split}", total=n) if progress is not None else None
            nnz = [0, 0]

            def write(tmp: Path) -> None:
                with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                    write_xc_header(fh, n, cfg.num_features, cfg.num_labels)
                    for start in range(0, n, chunk):
                        stop = min(n, start + chunk)
                        X, Y = generate_rows(model, start, stop, split)
                        append_xc_rows(fh, X, Y)
                        nnz[0] += X.nnz
                        nnz[1] += Y.nnz
                        if progress is not None and task is not None:
                            progress.update(task, completed=stop)
                        if callback is not None:
                            callback(split, stop, n)

            atomic_write(target, write, make_parents=True)  # complete file or none
            x_nnz, y_nnz = nnz
            secs = time.perf_counter() - t0
            logger.info("wrote %s: %d points, %d feature and %d label non-zeros in %.1f s",
                        target, n, x_nnz, y_nnz, secs)
            out[split] = {
                "path": str(target),
                "num_points": n,
                "feature_nnz": x_nnz,
                "label_nnz": y_nnz,
                "seconds": secs,
            }
    finally:
        if progress is not None:
            progress.stop()
    return out
