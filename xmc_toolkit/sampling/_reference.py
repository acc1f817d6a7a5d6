"""Slow brute-force references of the samplers' proposals, for the tests.

Everything here enumerates labels with plain Python loops in float64 and follows the formulas of
``docs/samplers.md`` literally; nothing is shared with the fast code paths except the inputs
(codebooks and codes produced by k-means). Use only on tiny problems.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "reference_uniform_log_prob",
    "reference_popularity_log_prob",
    "reference_log_uniform_log_prob",
    "reference_item_log_weight",
    "reference_midx_log_prob",
    "reference_exact_log_prob",
    "reference_mixture_log_prob",
    "reference_nearest_codes",
]


def _log_normalize(logits: list[float]) -> list[float]:
    m = max(logits)
    if m == -math.inf:
        return logits
    z = sum(math.exp(v - m) for v in logits)
    return [v - m - math.log(z) for v in logits]


def reference_uniform_log_prob(num_labels: int) -> Tensor:
    """``[L]`` float64: ``log(1 / L)``."""
    return torch.tensor([-math.log(num_labels)] * num_labels, dtype=torch.float64)


def reference_popularity_log_prob(counts: list[float], alpha: float, smoothing: float) -> Tensor:
    """``[L]`` float64: ``log((c_i + s)^alpha / sum_j (c_j + s)^alpha)``."""
    w = [(float(c) + smoothing) ** alpha for c in counts]
    total = sum(w)
    return torch.tensor([math.log(v / total) if v > 0 else -math.inf for v in w], dtype=torch.float64)


def reference_log_uniform_log_prob(num_labels: int) -> Tensor:
    """``[L]`` float64: ``log(log((k + 2) / (k + 1)) / log(L + 1))``."""
    return torch.tensor(
        [math.log(math.log((k + 2) / (k + 1)) / math.log(num_labels + 1)) for k in range(num_labels)],
        dtype=torch.float64,
    )


def reference_item_log_weight(
    num_labels: int,
    within_cell: str,
    label_counts: list[float] | None = None,
    alpha: float = 0.75,
    smoothing: float = 1.0,
    bias: list[float] | None = None,
) -> list[float]:
    """``log w_i``: ``alpha * log(count_i + smoothing)`` (popularity) ``+ b_i`` (bias)."""
    out = []
    for i in range(num_labels):
        v = 0.0
        if within_cell == "popularity" and label_counts is not None:
            v += alpha * math.log(float(label_counts[i]) + smoothing)
        if bias is not None:
            v += float(bias[i])
        out.append(v)
    return out


def reference_midx_log_prob(
    queries: Tensor,
    codebooks: tuple[Tensor, Tensor],
    codes: Tensor,
    quantizer: str,
    item_log_weight: list[float],
) -> Tensor:
    """``[B, L]`` float64: ``log q(i | q_b) = q_b . w^_i + log w_i - log sum_j (...)``.

    ``w^_i`` is the quantized label vector: ``[C1[k1]; C2[k2]]`` (pq) or ``C1[k1] + C2[k2]`` (rq).
    Since ``q . w^_i = a1[k1] + a2[k2]``, this equals the cell formula
    ``exp(a1[k1] + a2[k2]) w_i / sum_cells N exp(a1 + a2)``.
    """
    c1, c2 = (c.double().tolist() for c in codebooks)
    q = queries.double().tolist()
    cd = codes.tolist()
    rows = []
    for qb in q:
        logits = []
        for i, (k1, k2) in enumerate(cd):
            if quantizer == "pq":
                w_hat = list(c1[k1]) + list(c2[k2])
            else:
                w_hat = [u + v for u, v in zip(c1[k1], c2[k2])]
            logits.append(sum(a * b for a, b in zip(qb, w_hat)) + item_log_weight[i])
        rows.append(_log_normalize(logits))
    return torch.tensor(rows, dtype=torch.float64)


def reference_exact_log_prob(queries: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``[B, L]`` float64 log-softmax of the true scores ``q . w_i (+ b_i)``, by loops."""
    w = weight.double().tolist()
    bb = [0.0] * len(w) if bias is None else bias.double().tolist()
    rows = []
    for qb in queries.double().tolist():
        rows.append(_log_normalize([sum(a * c for a, c in zip(qb, wi)) + b for wi, b in zip(w, bb)]))
    return torch.tensor(rows, dtype=torch.float64)


def reference_mixture_log_prob(log_probs: Tensor) -> Tensor:
    """``[L]`` float64: ``log((1 / B) sum_b exp(log_probs[b]))`` by loops."""
    lp = log_probs.double().tolist()
    b = len(lp)
    out = []
    for i in range(len(lp[0])):
        s = sum(math.exp(row[i]) for row in lp) / b
        out.append(math.log(s) if s > 0 else -math.inf)
    return torch.tensor(out, dtype=torch.float64)


def reference_nearest_codes(x: Tensor, codebooks: tuple[Tensor, Tensor], quantizer: str) -> Tensor:
    """``[N, 2]`` int64: nearest codeword per half (pq) or of the vector then the residual (rq).

    Returns the squared-distance minimisers; ties (equal distances) are broken by the lowest
    index. Callers compare distances, not indices, where ties are possible.
    """
    c1, c2 = (c.double() for c in codebooks)
    x = x.double()
    if quantizer == "pq":
        d1 = c1.shape[1]
        k1 = torch.cdist(x[:, :d1], c1).argmin(1)
        k2 = torch.cdist(x[:, d1:], c2).argmin(1)
    else:
        k1 = torch.cdist(x, c1).argmin(1)
        k2 = torch.cdist(x - c1[k1], c2).argmin(1)
    return torch.stack([k1, k2], 1)
