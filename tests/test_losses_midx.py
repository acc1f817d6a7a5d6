"""The sampled softmax with the exact softmax as proposal equals the full softmax for every draw.

With ``q_b = softmax(x_b)`` over all labels, every non-hit sample ``c`` of row ``b`` has corrected
logit ``x_c - log(M'_b q_c / (1 - q(P_b))) = log(Z_b (1 - q(P_b)) / M'_b) = log(N_b / M'_b)``,
so the ``M'_b`` terms sum to ``N_b`` exactly, whatever was drawn. This is checked with a tiny local
exact-softmax sampler and with ``MIDXSampler(within_cell="exact")`` from ``xmc_toolkit.sampling``.
"""

from __future__ import annotations


import pytest
import torch

from xmc_toolkit.losses import (
    full_softmax_loss,
    full_softmax_loss_from_scores,
    sampled_softmax_loss,
)

F64 = torch.float64


def _problem(seed: int, b: int = 6, num_labels: int = 80, d: int = 8, p: int = 3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, d, generator=g, dtype=dtype)
    weight = torch.randn(num_labels, d, generator=g, dtype=dtype) * 0.7
    pos_ids = torch.stack([torch.randperm(num_labels, generator=g)[:p] for _ in range(b)])  # [B, P]
    pos_mask = torch.rand(b, p, generator=g) < 0.8
    pos_mask[:, 0] = True
    pos_ids = torch.where(pos_mask, pos_ids, torch.full_like(pos_ids, -1))
    return queries, weight, pos_ids, pos_mask


def _exact_softmax_samples(scores: torch.Tensor, m: int, g: torch.Generator):
    """Local exact proposal: draw M ids per row from softmax(scores) with replacement."""
    log_q = torch.log_softmax(scores, dim=1)  # [B, L]
    ids = torch.multinomial(log_q.exp(), m, replacement=True, generator=g)  # [B, M]
    return ids, log_q.gather(1, ids), log_q


def _no_row_all_hits(neg_ids: torch.Tensor, pos_ids: torch.Tensor, pos_mask: torch.Tensor) -> bool:
    hits = ((neg_ids[:, :, None] == pos_ids[:, None, :]) & pos_mask[:, None, :]).any(-1)  # [B, M]
    return bool((~hits).any(1).all())


@pytest.mark.parametrize("m", [1, 3, 16, 200])
def test_exact_softmax_proposal_gives_full_loss_every_draw(m: int):
    queries, weight, pos_ids, pos_mask = _problem(0)
    scores = queries @ weight.t()  # [B, L]
    full = full_softmax_loss_from_scores(scores, pos_ids, pos_mask)
    g = torch.Generator().manual_seed(m)
    safe = pos_ids.clamp(min=0)
    checked = 0
    for _ in range(25):
        neg_ids, neg_log_q, log_q = _exact_softmax_samples(scores, m, g)
        if not _no_row_all_hits(neg_ids, pos_ids, pos_mask):
            continue  # estimate of N_b is 0 for that row: the one draw where exactness cannot hold
        loss = sampled_softmax_loss(
            scores.gather(1, safe), pos_ids, pos_mask, log_q.gather(1, safe),
            scores.gather(1, neg_ids), neg_ids, neg_log_q,
        )
        torch.testing.assert_close(loss, full, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 15


def test_exact_softmax_proposal_float32():
    queries, weight, pos_ids, pos_mask = _problem(1, dtype=torch.float32)
    scores = queries @ weight.t()
    full = full_softmax_loss(queries, weight, pos_ids, pos_mask, chunk_size=32)
    g = torch.Generator().manual_seed(0)
    safe = pos_ids.clamp(min=0)
    for _ in range(10):
        neg_ids, neg_log_q, log_q = _exact_softmax_samples(scores, 32, g)
        loss = sampled_softmax_loss(
            scores.gather(1, safe), pos_ids, pos_mask, log_q.gather(1, safe),
            scores.gather(1, neg_ids), neg_ids, neg_log_q,
        )
        torch.testing.assert_close(loss, full, rtol=1e-4, atol=1e-4)


def test_exact_softmax_proposal_gradient_is_unbiased():
    """With q = softmax (held constant), E[grad] = full gradient even at M = 4."""
    queries, weight, pos_ids, pos_mask = _problem(2, b=3, num_labels=40)
    base = queries @ weight.t()  # [B, L]
    full = base.clone().requires_grad_()
    (g_full,) = torch.autograd.grad(full_softmax_loss_from_scores(full, pos_ids, pos_mask), full)
    draws, m, b = 2000, 4, base.shape[0]
    s = base.clone().requires_grad_()
    rep = s.repeat(draws, 1)  # [R*B, L]
    pi, pm = pos_ids.repeat(draws, 1), pos_mask.repeat(draws, 1)
    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(base, 1).repeat(draws, 1)  # constant proposal, [R*B, L]
    neg_ids = torch.multinomial(log_q.exp(), m, replacement=True, generator=g)
    # Draws where a row is all hits make the estimate biased (N_hat = 0); drop those rows.
    hits = ((neg_ids[:, :, None] == pi[:, None, :]) & pm[:, None, :]).any(-1)
    pm = pm & (~hits).any(1, keepdim=True)
    safe = pi.clamp(min=0)
    loss = sampled_softmax_loss(
        rep.gather(1, safe), pi, pm, log_q.gather(1, safe),
        rep.gather(1, neg_ids), neg_ids, log_q.gather(1, neg_ids),
    )
    (g_mean,) = torch.autograd.grad(loss, s)
    # loss normalises by the kept pairs; rescale to per-draw mean of the full normalisation
    g_mean = g_mean * pm.sum() / (pos_mask.sum() * draws)
    rel = float((g_mean - g_full).norm() / g_full.norm())
    assert rel < 0.05, rel  # measured 0.016 (a uniform proposal gives 0.24)


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
@pytest.mark.parametrize("m", [2, 64])
def test_midx_exact_within_cell_gives_full_loss_every_draw(quantizer: str, m: int):
    from xmc_toolkit.sampling import MIDXSampler as midx_cls  # an API break fails here

    queries, weight, pos_ids, pos_mask = _problem(3, dtype=torch.float32)
    num_labels = weight.shape[0]
    sampler = midx_cls(
        num_labels, num_codewords=4, quantizer=quantizer, within_cell="exact", seed=0
    )
    sampler.update(weight)
    scores = queries @ weight.t()
    full = full_softmax_loss(queries, weight, pos_ids, pos_mask, chunk_size=32)
    safe = pos_ids.clamp(min=0)
    log_q_pos = sampler.log_prob(queries, safe)  # [B, P]
    checked = 0
    for i in range(10):
        smp = sampler.sample(queries, m, generator=torch.Generator().manual_seed(i))
        if not _no_row_all_hits(smp.ids, pos_ids, pos_mask):
            continue
        loss = sampled_softmax_loss(
            scores.gather(1, safe), pos_ids, pos_mask, log_q_pos,
            scores.gather(1, smp.ids), smp.ids, smp.log_q,
        )
        torch.testing.assert_close(loss, full, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 5
