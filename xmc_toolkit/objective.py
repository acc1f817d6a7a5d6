"""The training objective: the loss of one batch for the loss a config names.

:func:`compute_loss` picks the full softmax (+ BCE), the sampled softmax or negative sampling
(kernels in :mod:`xmc_toolkit.losses`) and handles ensembles (:func:`member_score_ids`).
Pure functions of the network's label table and a batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .network import XMCNetwork
from .train_config import TrainConfig

__all__ = ["compute_loss", "member_score_ids", "sampler_from_config"]


def compute_loss(network: XMCNetwork, queries: torch.Tensor, pos_ids: torch.Tensor,
                 pos_mask: torch.Tensor, loss_name: str, *, sampler: Any = None,
                 negatives: int = 64, shared: bool = False,
                 generator: torch.Generator | None = None, correct_target: bool = False,
                 chunk_size: int = 65536, bce_weight: float = 0.0,
                 log_q_correction: bool = False, ids_checked: bool = False) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        network: gives the label table.
        queries: ``[B, n * d] float32`` (``n = network.members``; 1 unless an ensemble, whose
            loss is the mean of its members' losses).
        pos_ids: ``[B, P] int64`` padded positives; pos_mask ``[B, P] bool``.
        loss_name: ``full | sampled | negative-sampling``.
        sampler: a :class:`xmc_toolkit.sampling.Sampler` (sampled losses).
        negatives: ``M`` samples per query (or shared by the batch when ``shared``).
        generator: torch generator of the samples (reproducibility).
        correct_target: TensorFlow-style target correction (sampled softmax).
        chunk_size: label chunk of the full softmax.
        bce_weight: ``full`` only: add ``bce_weight`` times the one-vs-all binary
            cross-entropy of all ``B x L`` scores (summed over labels, mean over rows) (materialises ``[B, L]``; the full softmax is
            only used for moderate ``L``).
        log_q_correction: ``negative-sampling`` only: subtract ``log(M q)`` from the negative
            logits (:func:`xmc_toolkit.losses.negative_sampling_loss`).
        ids_checked: ``pos_ids`` were range-checked on the host (the trainer's batches are, by
            :func:`xmc_toolkit.batching.csr_to_padded`): the sampler skips its own check, which
            reads two values back from the device.

    Returns:
        Scalar loss.
    """
    from . import losses

    n = int(getattr(network, "members", 1))  # ensemble members: each gets its own loss
    if loss_name == "full":
        d = queries.shape[1] // n  # member i: its query n * q[:, i*d:(i+1)*d], its label block
        W, b = network.label_weight, network.label_bias
        parts = [_full_loss(queries[:, i * d:(i + 1) * d] * n if n > 1 else queries,
                            W[:, i * d:(i + 1) * d] if n > 1 else W, b, pos_ids, pos_mask,
                            chunk_size, bce_weight) for i in range(n)]
    else:
        # one draw per step, from the sampler over the (ensemble's mean) scores; every member
        # gets the same exact log q (any full-support proposal keeps the estimator consistent)
        qd = queries.detach()
        smp = sampler.sample(qd, negatives, shared=shared, generator=generator)
        if smp.ids.dim() == 2:
            # per-query draws: positives and negatives in one scoring call, so the label table
            # gets one coalesced sparse gradient instead of two that autograd must merge
            both = member_score_ids(network.labels, queries,
                                    torch.cat([pos_ids, smp.ids], 1), n)  # [B, P + M, n]
            pos_scores, neg_scores = both.split([pos_ids.shape[1], smp.ids.shape[1]], dim=1)
        else:
            pos_scores = member_score_ids(network.labels, queries, pos_ids, n)  # [B, P, n]
            neg_scores = member_score_ids(network.labels, queries, smp.ids, n)  # [M] ids: [B, M, n]
        if loss_name == "sampled":
            # the positives' log q under the law the negatives were drawn from: per query
            # q_b, or in shared mode the batch mixture qbar = (1/B) sum_b q_b (the estimator
            # divides by 1 - qbar(P_b); q_b(P_b) there biases the loss, see docs/losses.md)
            pos_log_q = (sampler.log_prob(qd, pos_ids, shared=shared, check_ids=False)
                         if ids_checked else sampler.log_prob(qd, pos_ids, shared=shared))  # [B, P]
            parts = [losses.sampled_softmax_loss(
                pos_scores[..., i], pos_ids, pos_mask, pos_log_q, neg_scores[..., i], smp.ids,
                smp.log_q, correct_target=correct_target) for i in range(n)]
        else:
            parts = [losses.negative_sampling_loss(
                pos_scores[..., i], pos_ids, pos_mask, neg_scores[..., i], smp.ids,
                smp.log_q if log_q_correction else None, log_q_correction=log_q_correction)
                for i in range(n)]
    return parts[0] if n == 1 else torch.stack(parts).mean()


def _full_loss(queries: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               pos_ids: torch.Tensor, pos_mask: torch.Tensor, chunk_size: int,
               bce_weight: float) -> torch.Tensor:
    """Full softmax loss of queries ``[B, d]`` against ``weight [L, d]`` (+ the BCE term)."""
    from . import losses

    loss = losses.full_softmax_loss(queries, weight, pos_ids, pos_mask, bias,
                                    chunk_size=chunk_size)
    if bce_weight > 0:
        scores = queries @ weight.t()  # [B, L]
        if bias is not None:
            scores = scores + bias
        target = torch.zeros_like(scores)  # [B, L]
        target.scatter_(1, torch.where(pos_mask, pos_ids, 0),
                        pos_mask.to(scores.dtype))  # padding writes 0 into column 0
        target[:, 0] = torch.maximum(
            target[:, 0], ((pos_ids == 0) & pos_mask).any(1).to(scores.dtype))
        loss = loss + bce_weight * nn.functional.binary_cross_entropy_with_logits(
            scores, target, reduction="sum") / scores.shape[0]
    return loss


def member_score_ids(labels: Any, queries: torch.Tensor, ids: torch.Tensor,
                     members: int) -> torch.Tensor:
    """Every ensemble member's scores of given labels.

    Args:
        labels: the :class:`~xmc_toolkit.output_layer.LabelTable` (``[L, n * d]``).
        queries: ``[B, n * d]`` ensemble queries (the members' side by side, divided by ``n``).
        ids: ``[B, M]`` per-query or ``[M]`` shared label ids.
        members: ``n``.

    Returns:
        ``[B, M, n]``: ``q_i . w_i[id] + b[id]`` for member ``i`` (its unscaled query).
    """
    if members == 1:
        return labels.score_ids(queries, ids).unsqueeze(-1)  # [B, M, 1]
    B = queries.shape[0]
    d = queries.shape[1] // members
    qn = queries.view(B, members, d) * members  # [B, n, d] the members' own queries
    w = labels.weight(ids)  # [M, n*d] or [B, M, n*d]
    if ids.dim() == 1:
        s = torch.einsum("bnd,mnd->bmn", qn, w.view(-1, members, d))  # [B, M, n]
    else:
        s = torch.einsum("bmnd,bnd->bmn", w.view(B, -1, members, d), qn)  # [B, M, n]
    if labels.bias is not None:
        bias = labels.bias(ids)  # [M, 1] or [B, M, 1]
        s = s + (bias.view(1, -1, 1) if ids.dim() == 1 else bias)
    return s


def sampler_from_config(config: TrainConfig, num_labels: int, label_counts: Any, *,
                        seed: int | None = None) -> Any:
    """The negative sampler ``config.sampler`` names, over ``num_labels`` labels.

    The one mapping from a config to a sampler, for the whole table (local placement) and for
    one rank's rows (sharded placement: ``num_labels`` is the shard's, ``label_counts`` its
    rows', ``seed`` the rank's). MIDX variants resolve their codeword count for
    ``num_labels`` (``--codewords`` auto) and ``midx-pq`` / ``midx-rq`` their quantizer.

    Args:
        config: the run's config (``sampler``, ``quantizer``, ``within_cell``,
            ``popularity_alpha``, ``codewords``, ``seed``).
        num_labels: labels the sampler draws from.
        label_counts: ``[num_labels]`` training label counts.
        seed: MIDX k-means seed (default ``config.seed``).
    """
    from .sampling import make_sampler

    cfg = config
    L = num_labels
    kwargs: dict[str, Any] = {}
    name = cfg.sampler
    if name.startswith("midx"):
        kwargs = dict(num_codewords=cfg.resolved_codewords(L),
                      quantizer=cfg.quantizer if name == "midx" else name.split("-")[1],
                      within_cell=cfg.within_cell, alpha=cfg.popularity_alpha,
                      seed=cfg.seed if seed is None else seed)
        name = "midx"
    elif name == "popularity":
        kwargs = dict(alpha=cfg.popularity_alpha)
    return make_sampler(name, L, label_counts=np.asarray(label_counts).astype(np.float64),
                        **kwargs)
