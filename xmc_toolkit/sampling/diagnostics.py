"""How close a proposal is to the true softmax: KL divergence and effective sample size.

For a query ``q_b`` with true softmax ``p_b(i) = softmax(q_b . W^T + b)_i`` and proposal
``q_b(i)`` (a sampler's :meth:`~xmc_toolkit.sampling.Sampler.log_prob`):

* ``kl_b = KL(p_b || q_b) = sum_i p_b(i) (log p_b(i) - log q_b(i))`` (nats; 0 iff equal).
* ``ess_b = 1 / sum_i p_b(i)^2 / q_b(i)`` -- the normalized effective sample size of the
  importance weights ``w = p / q`` under ``q``: ``(E_q w)^2 / E_q w^2``. With ``M`` draws from
  ``q`` the (Kish) effective sample size is about ``M * ess_b``; ``ess_b`` is in ``(0, 1]`` and
  equals 1 iff ``q_b = p_b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SamplerError
from .base import Sampler, _check_embeddings, _check_queries

__all__ = ["proposal_divergence"]


def proposal_divergence(
    sampler: Sampler,
    queries: Tensor,
    label_embeddings: Tensor,
    bias: Tensor | None = None,
    max_elements: int = 1 << 24,
) -> tuple[Tensor, Tensor]:
    """Per-query KL(softmax || proposal) and normalized effective sample size.

    Enumerates every label, so the cost is ``O(B L d)``; queries are processed in chunks so that
    at most ``max_elements`` ``[chunk, L]`` entries are held at once.

    Args:
        sampler: a built sampler (call ``update`` first for MIDX).
        queries: ``[B, d]`` float.
        label_embeddings: ``[L, d]`` float, the table that defines the true softmax.
        bias: optional ``[L]`` label bias of the true scores.
        max_elements: memory bound of one chunk.

    Returns:
        ``(kl [B], ess [B])`` float32 on the queries' device.
    """
    _check_queries(queries, label_embeddings.shape[1] if label_embeddings.dim() == 2 else None)
    _check_embeddings(label_embeddings, bias, sampler.num_labels)
    if label_embeddings.device != queries.device:
        raise SamplerError(
            f"queries are on {queries.device} but label_embeddings on {label_embeddings.device}; "
            "move them to the same device"
        )
    num_labels = label_embeddings.shape[0]
    rows = max(1, max_elements // num_labels)
    all_ids = torch.arange(num_labels, device=queries.device)
    kls, esss = [], []
    with torch.no_grad():
        w = label_embeddings.detach().float()
        for start in range(0, queries.shape[0], rows):
            q = queries[start : start + rows].detach().float()  # [b, d]
            logits = q @ w.t()  # [b, L]
            if bias is not None:
                logits = logits + bias.detach().float()
            log_p = torch.log_softmax(logits.double(), dim=1)  # [b, L]
            log_q = sampler.log_prob(q, all_ids.expand(q.shape[0], -1)).double()  # [b, L]
            p = log_p.exp()
            diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
            kls.append((p * diff).sum(1))  # [b]
            esss.append(torch.exp(-torch.logsumexp(2 * log_p - log_q, dim=1)))  # [b]
    return torch.cat(kls).float(), torch.cat(esss).float()
