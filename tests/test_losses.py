"""Tests of xmc_toolkit.losses against references: dense torch ops and literal Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.errors import XMCError
from xmc_toolkit.losses import (
    FullSoftmaxLoss,
    LossInputError,
    NegativeSamplingLoss,
    SampledSoftmaxLoss,
    full_softmax_loss,
    full_softmax_loss_from_scores,
    negative_sampling_loss,
    sampled_softmax_loss,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# helpers and literal references
# ------------------------------------------------------------------------------------------


def make_positives(
    g: torch.Generator, b: int, p: int, num_labels: int, density: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded positives with distinct valid ids per row; padding id is -1."""
    ids = torch.stack([torch.randperm(num_labels, generator=g)[:p] for _ in range(b)])  # [B, P]
    mask = torch.rand(b, p, generator=g) < density
    ids = torch.where(mask, ids, torch.full_like(ids, -1))
    return ids, mask


def loop_full_softmax(scores: torch.Tensor, pos_ids: torch.Tensor, pos_mask: torch.Tensor):
    """The multi-label full softmax formula written literally, one term at a time."""
    terms = []
    b, num_labels = scores.shape
    for i in range(b):
        pos = {int(pos_ids[i, j]) for j in range(pos_ids.shape[1]) if pos_mask[i, j]}
        negs = [c for c in range(num_labels) if c not in pos]
        for j in range(pos_ids.shape[1]):
            if not pos_mask[i, j]:
                continue
            xt = scores[i, int(pos_ids[i, j])]
            zero = torch.zeros((), dtype=scores.dtype)
            z = torch.exp(xt) + sum((torch.exp(scores[i, c]) for c in negs), zero)
            terms.append(-xt + torch.log(z))
    if not terms:
        return scores.sum() * 0
    return torch.stack(terms).mean()


def loop_sampled_softmax(
    pos_scores, pos_ids, pos_mask, pos_log_q, neg_scores, neg_ids, neg_log_q, correct_target
):
    """sampled_softmax_loss written literally per row / per target (no logsumexp tricks)."""
    b, m = neg_scores.shape
    if neg_ids.dim() == 1:
        neg_ids = neg_ids.unsqueeze(0).expand(b, m)
        neg_log_q = neg_log_q.unsqueeze(0).expand(b, m)
    terms = []
    for i in range(b):
        valid_p = [j for j in range(pos_ids.shape[1]) if pos_mask[i, j]]
        pos = {int(pos_ids[i, j]) for j in valid_p}
        keep = [k for k in range(m) if int(neg_ids[i, k]) not in pos]
        m_eff = len(keep)
        q_p = sum(math.exp(float(pos_log_q[i, j])) for j in valid_p)
        for j in valid_p:
            xt = pos_scores[i, j]
            if correct_target:
                xt = xt - math.log(m) - pos_log_q[i, j]
                negs = [torch.exp(neg_scores[i, k] - math.log(m) - neg_log_q[i, k]) for k in keep]
            else:
                negs = [
                    torch.exp(neg_scores[i, k]) * (1.0 - q_p) / (m_eff * torch.exp(neg_log_q[i, k]))
                    for k in keep
                ]
            z = torch.exp(xt) + sum(negs, torch.zeros((), dtype=pos_scores.dtype))
            terms.append(-xt + torch.log(z))
    if not terms:
        return pos_scores.sum() * 0
    return torch.stack(terms).mean()


def loop_negative_sampling(pos_scores, pos_ids, pos_mask, neg_scores, neg_ids, neg_log_q, corr):
    b, m = neg_scores.shape
    if neg_ids.dim() == 1:
        neg_ids = neg_ids.unsqueeze(0).expand(b, m)
        if neg_log_q is not None:
            neg_log_q = neg_log_q.unsqueeze(0).expand(b, m)
    terms = []
    for i in range(b):
        valid_p = [j for j in range(pos_ids.shape[1]) if pos_mask[i, j]]
        pos = {int(pos_ids[i, j]) for j in valid_p}
        for j in valid_p:
            t = -torch.log(torch.sigmoid(pos_scores[i, j]))
            for k in range(m):
                if int(neg_ids[i, k]) in pos:
                    continue
                x = neg_scores[i, k]
                if corr:
                    x = x - math.log(m) - neg_log_q[i, k]
                t = t - torch.log(torch.sigmoid(-x))
            terms.append(t)
    if not terms:
        return pos_scores.sum() * 0
    return torch.stack(terms).mean()


def sampled_problem(
    seed: int,
    b: int = 4,
    p: int = 3,
    num_labels: int = 12,
    m: int = 9,
    shared: bool = False,
    scale: float = 1.5,
):
    """Scores over all labels, positives, a proposal q and samples that include hits."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(b, num_labels, generator=g, dtype=F64) * scale).requires_grad_()
    pos_ids, pos_mask = make_positives(g, b, p, num_labels)
    logits_q = torch.randn(num_labels, generator=g, dtype=F64)
    log_q = torch.log_softmax(logits_q, 0)  # [L]
    if shared:
        neg_ids = torch.multinomial(log_q.exp(), m, replacement=True, generator=g)  # [M]
        neg_scores = scores[:, neg_ids]  # [B, M]
    else:
        neg_ids = torch.multinomial(log_q.exp().expand(b, -1), m, replacement=True, generator=g)
        neg_scores = scores.gather(1, neg_ids)
    neg_log_q = log_q[neg_ids]
    safe = pos_ids.clamp(min=0)
    pos_scores = scores.gather(1, safe)
    pos_log_q = log_q[safe]
    return scores, pos_scores, pos_ids, pos_mask, pos_log_q, neg_scores, neg_ids, neg_log_q


# ------------------------------------------------------------------------------------------
# full softmax
# ------------------------------------------------------------------------------------------


def test_dense_reference_matches_literal_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g, dtype=F64, requires_grad=True)
    pos_ids, pos_mask = make_positives(g, 4, 3, 9)
    pos_mask[1] = False
    a = full_softmax_loss_from_scores(scores, pos_ids, pos_mask)
    (ga,) = torch.autograd.grad(a, scores)
    b = loop_full_softmax(scores, pos_ids, pos_mask)
    (gb,) = torch.autograd.grad(b, scores)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_dense_reference_single_label_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 11, generator=g, dtype=F64)
    y = torch.randint(0, 11, (5,), generator=g)
    got = full_softmax_loss_from_scores(scores, y[:, None], torch.ones(5, 1, dtype=torch.bool))
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(scores, y))


def _full_problem(seed: int, b: int, p: int, num_labels: int, d: int, bias: bool, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(num_labels, d, generator=g, dtype=dtype).requires_grad_()
    bb = torch.randn(num_labels, generator=g, dtype=dtype).requires_grad_() if bias else None
    pos_ids, pos_mask = make_positives(g, b, p, num_labels)
    return q, w, bb, pos_ids, pos_mask


def _grads(loss, tensors):
    ts = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("chunk", [1, 7, 10, 37, 64, 65536])
@pytest.mark.parametrize("bias", [False, True])
def test_full_chunked_matches_dense(chunk: int, bias: bool):
    q, w, bb, pos_ids, pos_mask = _full_problem(0, 6, 4, 37, 5, bias)
    pos_mask[2] = False  # a row without positives
    got = full_softmax_loss(q, w, pos_ids, pos_mask, bias=bb, chunk_size=chunk)
    dense = q @ w.t() + (bb if bb is not None else 0)  # [B, L]
    ref = full_softmax_loss_from_scores(dense, pos_ids, pos_mask)
    torch.testing.assert_close(got, ref)
    for a, r in zip(_grads(got, [q, w, bb]), _grads(ref, [q, w, bb])):
        torch.testing.assert_close(a, r)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    p=st.integers(1, 4),
    num_labels=st.integers(4, 30),
    chunk=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_full_chunked_matches_dense_property(b, p, num_labels, chunk, density, bias, seed):
    p = min(p, num_labels)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(num_labels, 3, generator=g, dtype=F64).requires_grad_()
    bb = torch.randn(num_labels, generator=g, dtype=F64).requires_grad_() if bias else None
    pos_ids, pos_mask = make_positives(g, b, p, num_labels, density)
    got = full_softmax_loss(q, w, pos_ids, pos_mask, bias=bb, chunk_size=chunk)
    dense = q @ w.t() + (bb if bb is not None else 0)  # [B, L]
    ref = full_softmax_loss_from_scores(dense, pos_ids, pos_mask)
    torch.testing.assert_close(got, ref)
    assert got.item() >= 0.0
    for a, r in zip(_grads(got, [q, w, bb]), _grads(ref, [q, w, bb])):
        torch.testing.assert_close(a, r)


def test_full_duplicate_positive_ids_match_dense():
    q, w, bb, _, _ = _full_problem(3, 2, 3, 10, 4, True)
    pos_ids = torch.tensor([[3, 3, 7], [9, 0, 0]])
    pos_mask = torch.tensor([[True, True, True], [True, True, False]])
    got = full_softmax_loss(q, w, pos_ids, pos_mask, bias=bb, chunk_size=4)
    ref = full_softmax_loss_from_scores(q @ w.t() + bb, pos_ids, pos_mask)
    torch.testing.assert_close(got, ref)
    for a, r in zip(_grads(got, [q, w, bb]), _grads(ref, [q, w, bb])):
        torch.testing.assert_close(a, r)


def test_full_float32_gradcheck_like_parity():
    q, w, bb, pos_ids, pos_mask = _full_problem(4, 8, 5, 300, 16, True, dtype=torch.float32)
    got = full_softmax_loss(q, w, pos_ids, pos_mask, bias=bb, chunk_size=128)
    ref = full_softmax_loss_from_scores(q @ w.t() + bb, pos_ids, pos_mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(_grads(got, [q, w, bb]), _grads(ref, [q, w, bb])):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_full_autograd_gradcheck():
    q, w, bb, pos_ids, pos_mask = _full_problem(5, 3, 2, 9, 3, True)
    def fn(q_, w_, b_):
        return full_softmax_loss(q_, w_, pos_ids, pos_mask, bias=b_, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (q, w, bb))


def test_full_with_embedding_weight_and_large_scores():
    """Scores of magnitude ~1e4 in float32: finite and equal to a float64 dense reference."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    with torch.no_grad():
        emb.weight.mul_(100.0)
    q = (torch.randn(4, 8) * 30.0).requires_grad_()
    bias = torch.nn.Parameter(torch.randn(50) * 1e3)
    pos_ids = torch.tensor([[1, 2], [3, -1], [4, 5], [49, 0]])
    pos_mask = pos_ids >= 0
    scores = q @ emb.weight.t() + bias
    assert scores.abs().max() > 5e3
    got = full_softmax_loss(q, emb.weight, pos_ids, pos_mask, bias=bias, chunk_size=16)
    got.backward()
    q64, w64, b64 = (t.detach().double().requires_grad_() for t in (q, emb.weight, bias))
    ref = full_softmax_loss_from_scores(q64 @ w64.t() + b64, pos_ids, pos_mask)
    ref.backward()
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-2)
    for t, r in ((q, q64), (emb.weight, w64), (bias, b64)):
        assert torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-3, atol=1e-3)


def test_full_sparse_embedding_weight_gets_dense_grad():
    emb = torch.nn.Embedding(20, 4, sparse=True)
    q = torch.randn(3, 4)
    ones = torch.ones(3, 1, dtype=torch.bool)
    loss = full_softmax_loss(q, emb.weight, torch.tensor([[1], [2], [3]]), ones)
    loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.shape == (20, 4)


def test_full_no_positives_returns_zero_with_grad_path():
    q, w, bb, pos_ids, _ = _full_problem(6, 3, 2, 10, 4, True)
    mask = torch.zeros_like(pos_ids, dtype=torch.bool)
    for loss in (
        full_softmax_loss(q, w, pos_ids, mask, bias=bb, chunk_size=3),
        full_softmax_loss_from_scores(q @ w.t() + bb, pos_ids, mask),
    ):
        assert loss.item() == 0.0
        assert loss.requires_grad
        for gr in _grads(loss, [q, w, bb]):
            assert torch.all(gr == 0)


def test_full_row_with_every_label_positive():
    """N_b = 0: the loss of those targets is 0 and nothing is NaN."""
    q, w, bb, _, _ = _full_problem(7, 2, 4, 4, 3, True)
    pos_ids = torch.tensor([[0, 1, 2, 3], [1, -1, -1, -1]])
    pos_mask = pos_ids >= 0
    got = full_softmax_loss(q, w, pos_ids, pos_mask, bias=bb, chunk_size=3)
    ref = full_softmax_loss_from_scores(q @ w.t() + bb, pos_ids, pos_mask)
    torch.testing.assert_close(got, ref)
    gg, rr = _grads(got, [q, w, bb]), _grads(ref, [q, w, bb])
    for a, r in zip(gg, rr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r)


def test_full_module_wrapper():
    q, w, bb, pos_ids, pos_mask = _full_problem(8, 3, 2, 10, 4, True)
    mod = FullSoftmaxLoss(chunk_size=3)
    assert list(mod.parameters()) == [] and "chunk_size=3" in repr(mod)
    want = full_softmax_loss(q, w, pos_ids, pos_mask, bb)
    torch.testing.assert_close(mod(q, w, pos_ids, pos_mask, bb), want)


def test_full_validation_errors():
    q, w, bb, pos_ids, pos_mask = _full_problem(9, 3, 2, 10, 4, True)
    with pytest.raises(LossInputError, match=r"\[3, 4\].*\[10, 5\]"):
        full_softmax_loss(q, torch.randn(10, 5, dtype=F64), pos_ids, pos_mask)
    with pytest.raises(LossInputError, match="outside"):
        full_softmax_loss(q, w, torch.full_like(pos_ids, 10), torch.ones_like(pos_mask))
    with pytest.raises(LossInputError, match="bool"):
        full_softmax_loss(q, w, pos_ids, pos_mask.long())
    with pytest.raises(LossInputError, match="integer"):
        full_softmax_loss(q, w, pos_ids.double(), pos_mask)
    with pytest.raises(LossInputError, match="chunk_size"):
        full_softmax_loss(q, w, pos_ids, pos_mask, chunk_size=0)
    with pytest.raises(LossInputError, match="bias"):
        full_softmax_loss(q, w, pos_ids, pos_mask, bias=torch.zeros(9, dtype=F64))
    with pytest.raises(XMCError, match="batch size"):
        full_softmax_loss(q[:2], w, pos_ids, pos_mask)
    with pytest.raises(ValueError, match="floating"):
        full_softmax_loss_from_scores(torch.zeros(3, 10, dtype=torch.long), pos_ids, pos_mask)


def test_full_does_not_modify_inputs():
    q, w, bb, pos_ids, pos_mask = _full_problem(10, 3, 2, 10, 4, True)
    before = [t.detach().clone() for t in (q, w, bb, pos_ids, pos_mask)]
    full_softmax_loss(q, w, pos_ids, pos_mask, bb, chunk_size=4).backward()
    for t, b in zip((q, w, bb, pos_ids, pos_mask), before):
        assert torch.equal(t.detach(), b)


# ------------------------------------------------------------------------------------------
# sampled softmax
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("correct_target", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_softmax_matches_literal_loop(shared: bool, correct_target: bool, seed: int):
    scores, *args = sampled_problem(seed, shared=shared)
    args[1][0] = False  # row 0 has no positives
    got = sampled_softmax_loss(*args, correct_target=correct_target)
    ref = loop_sampled_softmax(*args, correct_target=correct_target)
    torch.testing.assert_close(got, ref)
    (ga,) = torch.autograd.grad(got, scores, retain_graph=True)
    (gr,) = torch.autograd.grad(ref, scores)
    torch.testing.assert_close(ga, gr)


def test_sampled_problem_contains_accidental_hits():
    """Guard: the fixtures above really exercise hit removal."""
    _, _, pos_ids, pos_mask, _, _, neg_ids, _ = sampled_problem(0)
    hits = (neg_ids[:, :, None] == pos_ids[:, None, :]) & pos_mask[:, None, :]
    assert hits.any()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 4),
    p=st.integers(1, 4),
    m=st.integers(1, 12),
    shared=st.booleans(),
    correct_target=st.booleans(),
)
def test_sampled_softmax_property(seed, b, p, m, shared, correct_target):
    scores, *args = sampled_problem(seed, b=b, p=p, num_labels=8, m=m, shared=shared)
    got = sampled_softmax_loss(*args, correct_target=correct_target)
    ref = loop_sampled_softmax(*args, correct_target=correct_target)
    torch.testing.assert_close(got, ref)
    if not correct_target:
        assert got.item() >= 0.0  # -x_t + log(e^x_t + N) >= 0
    # permuting the samples does not change the loss
    pos_scores, pos_ids, pos_mask, pos_log_q, neg_scores, neg_ids, neg_log_q = args
    perm = torch.randperm(neg_scores.shape[1], generator=torch.Generator().manual_seed(seed))
    ids_p = neg_ids[perm] if neg_ids.dim() == 1 else neg_ids[:, perm]
    lq_p = neg_log_q[perm] if neg_log_q.dim() == 1 else neg_log_q[:, perm]
    again = sampled_softmax_loss(
        pos_scores, pos_ids, pos_mask, pos_log_q, neg_scores[:, perm], ids_p, lq_p, correct_target
    )
    torch.testing.assert_close(got, again)


@pytest.mark.parametrize("correct_target", [False, True])
def test_sampled_shared_equals_expanded(correct_target: bool):
    scores, ps, pi, pm, plq, ns, ni, nlq = sampled_problem(3, shared=True)
    b, m = ns.shape
    a = sampled_softmax_loss(ps, pi, pm, plq, ns, ni, nlq, correct_target)
    e = sampled_softmax_loss(ps, pi, pm, plq, ns, ni.expand(b, m), nlq.expand(b, m), correct_target)
    torch.testing.assert_close(a, e)
    (ga,) = torch.autograd.grad(a, scores, retain_graph=True)
    torch.testing.assert_close(ga, torch.autograd.grad(e, scores)[0])


def test_sampled_all_hits_gives_zero_and_finite_grads():
    scores = torch.randn(2, 6, dtype=F64, requires_grad=True)
    pos_ids = torch.tensor([[1, 4], [2, -1]])
    pos_mask = pos_ids >= 0
    safe = pos_ids.clamp(min=0)
    neg_ids = torch.tensor([[1, 4, 4, 1], [2, 2, 2, 2]])
    log_q = torch.full((6,), -math.log(6), dtype=F64)
    for ct in (False, True):
        loss = sampled_softmax_loss(
            scores.gather(1, safe), pos_ids, pos_mask, log_q[safe],
            scores.gather(1, neg_ids), neg_ids, log_q[neg_ids], correct_target=ct,
        )
        assert loss.item() == 0.0
        (gr,) = torch.autograd.grad(loss, scores)
        assert torch.isfinite(gr).all() and torch.all(gr == 0)


def test_sampled_one_minus_q_underflow_is_clamped():
    """The positives carry all the proposal mass (q(P) = 1 or rounding above 1)."""
    scores = torch.randn(2, 5, requires_grad=True)
    pos_ids = torch.tensor([[0, 1], [2, 3]])
    pos_mask = torch.ones(2, 2, dtype=torch.bool)
    pos_log_q = torch.tensor([[math.log(0.5), math.log(0.5)], [0.0, 1e-7]])  # sums >= 1
    neg_ids = torch.tensor([[4, 2], [4, 0]])
    neg_log_q = torch.full((2, 2), -30.0)
    loss = sampled_softmax_loss(
        scores.gather(1, pos_ids), pos_ids, pos_mask, pos_log_q,
        scores.gather(1, neg_ids), neg_ids, neg_log_q,
    )
    assert torch.isfinite(loss)
    (gr,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(gr).all()
    # 1 - q(P) clamps to the smallest normal float: the negatives are (almost) switched off,
    # so the loss is ~0 (only e^{x_t} is left in the normaliser).
    assert loss.item() < 1e-6


def test_sampled_large_magnitude_scores():
    scores64, ps, pi, pm, plq, ns, ni, nlq = sampled_problem(4, scale=1e4)
    s32 = scores64.detach().float().requires_grad_()
    safe = pi.clamp(min=0)
    got = sampled_softmax_loss(
        s32.gather(1, safe), pi, pm, plq.float(), s32.gather(1, ni), ni, nlq.float()
    )
    ref = sampled_softmax_loss(ps, pi, pm, plq, ns, ni, nlq)  # float64 path
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-2)
    (gr,) = torch.autograd.grad(got, s32)
    assert torch.isfinite(gr).all()
    # and against the stable dense formula: scores >> so log-sum-exp dominated by the max
    assert ref.item() >= 0.0


def test_sampled_exact_with_a_single_positive_full_coverage():
    """Hand case: q uniform over L, samples = every non-positive once => estimate of N is exact."""
    num_labels = 6
    scores = torch.randn(1, num_labels, dtype=F64, requires_grad=True)
    pos_ids = torch.tensor([[2]])
    pos_mask = torch.ones(1, 1, dtype=torch.bool)
    neg_ids = torch.tensor([[0, 1, 3, 4, 5]])
    lq = torch.full((num_labels,), -math.log(num_labels), dtype=F64)
    got = sampled_softmax_loss(
        scores[:, [2]], pos_ids, pos_mask, lq[[2]][None],
        scores.gather(1, neg_ids), neg_ids, lq[neg_ids],
    )
    # M' = 5, q_c = 1/6, 1 - q(P) = 5/6 => each weight is 1: exactly the full softmax.
    torch.testing.assert_close(got, full_softmax_loss_from_scores(scores, pos_ids, pos_mask))


def test_sampled_module_wrapper_and_errors():
    scores, *args = sampled_problem(5)
    mod = SampledSoftmaxLoss(correct_target=True)
    assert list(mod.parameters()) == [] and "correct_target=True" in repr(mod)
    torch.testing.assert_close(mod(*args), sampled_softmax_loss(*args, correct_target=True))
    ps, pi, pm, plq, ns, ni, nlq = args
    with pytest.raises(LossInputError, match=r"neg_ids.*\[4, 8\].*neg_scores.*\[4, 9\]"):
        sampled_softmax_loss(ps, pi, pm, plq, ns, ni[:, :8], nlq)
    with pytest.raises(LossInputError, match="shared neg_ids"):
        sampled_softmax_loss(ps, pi, pm, plq, ns, ni[0, :5], nlq[0, :5])
    with pytest.raises(LossInputError, match="neg_log_q"):
        sampled_softmax_loss(ps, pi, pm, plq, ns, ni, nlq[:, :3])
    with pytest.raises(LossInputError, match="pos_log_q"):
        sampled_softmax_loss(ps, pi, pm, plq[:, :1], ns, ni, nlq)
    with pytest.raises(LossInputError, match="batch"):
        sampled_softmax_loss(ps, pi, pm, plq, ns[:2], ni[:2], nlq[:2])
    with pytest.raises(LossInputError, match="integer"):
        sampled_softmax_loss(ps, pi, pm, plq, ns, ni.float(), nlq)
    with pytest.raises(LossInputError, match="floating"):
        sampled_softmax_loss(ps, pi, pm, plq, ns.long(), ni, nlq)


def test_sampled_no_positives_returns_zero():
    scores, ps, pi, pm, plq, ns, ni, nlq = sampled_problem(6)
    pm = torch.zeros_like(pm)
    for ct in (False, True):
        loss = sampled_softmax_loss(ps, pi, pm, plq, ns, ni, nlq, ct)
        assert loss.item() == 0.0 and loss.requires_grad
        assert torch.all(torch.autograd.grad(loss, scores, retain_graph=True)[0] == 0)


def _grad_error(proposal: torch.Tensor, m: int, draws: int, seed: int) -> float:
    """Relative L2 error of the mean (over draws) sampled-softmax gradient w.r.t. the scores."""
    g = torch.Generator().manual_seed(seed)
    b, num_labels = 3, 60
    base = torch.randn(b, num_labels, generator=g, dtype=F64) * 1.5
    pos_ids, pos_mask = make_positives(g, b, 2, num_labels, density=1.0)
    full = base.clone().requires_grad_()
    (g_full,) = torch.autograd.grad(full_softmax_loss_from_scores(full, pos_ids, pos_mask), full)
    # R draws at once: R copies of the batch; the loss is then the mean of the R per-draw losses.
    s = base.clone().requires_grad_()
    rep = s.repeat(draws, 1)  # [R*B, L]
    pi, pm = pos_ids.repeat(draws, 1), pos_mask.repeat(draws, 1)
    log_q = proposal.log()
    neg_ids = torch.multinomial(proposal.expand(draws * b, -1), m, replacement=True, generator=g)
    loss = sampled_softmax_loss(
        rep.gather(1, pi), pi, pm, log_q[pi], rep.gather(1, neg_ids), neg_ids, log_q[neg_ids]
    )
    (g_mean,) = torch.autograd.grad(loss, s)
    return float((g_mean - g_full).norm() / g_full.norm())


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_sampled_gradient_approaches_full_gradient_as_m_grows(kind: str):
    num_labels = 60
    if kind == "uniform":
        proposal = torch.full((num_labels,), 1.0 / num_labels, dtype=F64)
    else:
        counts = 1.0 / torch.arange(1, num_labels + 1, dtype=F64)  # Zipf
        proposal = counts**0.75 / (counts**0.75).sum()
    errs = [_grad_error(proposal, m, draws=300, seed=0) for m in (4, 32, 512)]
    assert errs[0] > 1.5 * errs[1] > 0, errs
    assert errs[1] > 1.5 * errs[2], errs
    assert errs[2] < 0.05, errs


# ------------------------------------------------------------------------------------------
# negative sampling
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("corr", [False, True])
def test_negative_sampling_matches_literal_loop(shared: bool, corr: bool):
    scores, ps, pi, pm, plq, ns, ni, nlq = sampled_problem(7, shared=shared)
    pm[1] = False
    got = negative_sampling_loss(ps, pi, pm, ns, ni, nlq if corr else None, log_q_correction=corr)
    ref = loop_negative_sampling(ps, pi, pm, ns, ni, nlq, corr)
    torch.testing.assert_close(got, ref)
    (ga,) = torch.autograd.grad(got, scores, retain_graph=True)
    torch.testing.assert_close(ga, torch.autograd.grad(ref, scores)[0])


def test_negative_sampling_hand_case():
    # one row, positive x=0, negatives x=[0, 0] with the second an accidental hit of the positive
    ps = torch.tensor([[0.0]])
    loss = negative_sampling_loss(ps, torch.tensor([[5]]), torch.tensor([[True]]),
                                  torch.tensor([[0.0, 3.0]]), torch.tensor([[1, 5]]))
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2.0)))


def test_negative_sampling_large_scores_and_errors():
    ps = torch.tensor([[1e4, -1e4]], requires_grad=True)
    ns = torch.tensor([[1e4, -1e4, 3.0]], requires_grad=True)
    loss = negative_sampling_loss(ps, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool),
                                  ns, torch.tensor([2, 3, 4]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(ps.grad).all() and torch.isfinite(ns.grad).all()
    with pytest.raises(LossInputError, match="neg_log_q"):
        negative_sampling_loss(ps, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool),
                               ns, torch.tensor([2, 3, 4]), log_q_correction=True)
    mod = NegativeSamplingLoss(log_q_correction=False)
    assert list(mod.parameters()) == [] and "log_q_correction=False" in repr(mod)


def test_negative_sampling_no_positives():
    scores, ps, pi, pm, plq, ns, ni, nlq = sampled_problem(8)
    loss = negative_sampling_loss(ps, pi, torch.zeros_like(pm), ns, ni)
    assert loss.item() == 0.0 and loss.requires_grad


def test_shared_accidental_hits_match_brute_force():
    """The shared-ids fast path equals the [B, M, P] comparison (duplicates, padding, misses)."""
    from xmc_toolkit.losses import _accidental_hits

    g = torch.Generator().manual_seed(0)
    for b, p, m, n in [(5, 3, 40, 12), (1, 1, 1, 2), (8, 6, 200, 30), (3, 4, 10, 1000)]:
        pos = torch.randint(n, (b, p), generator=g)
        mask = torch.rand(b, p, generator=g) > 0.3
        ids = torch.randint(n, (m,), generator=g)
        want = ((ids.view(1, m, 1) == pos.view(b, 1, p)) & mask.view(b, 1, p)).any(-1)
        got = _accidental_hits(pos, mask, ids)
        assert torch.equal(got, want)
        assert torch.equal(got, _accidental_hits(pos, mask, ids.unsqueeze(0).expand(b, -1)))


@pytest.mark.parametrize("branch_free", [False, True])
def test_dropped_hits_and_counts_match_brute_force(branch_free, monkeypatch):
    """The hits set to -inf in the scores and their per-row count (what M'_b is built from)
    equal the [B, M, P] comparison, also with a positive listed twice in a row and ids drawn
    many times: the CPU's list of hits, the static-shape mask (GPU) and per-query ids."""
    import xmc_toolkit.losses as L

    monkeypatch.setattr(L, "_branch_free", lambda device: branch_free)
    g = torch.Generator().manual_seed(1)
    for b, p, m, n in [(5, 3, 40, 12), (1, 1, 1, 2), (8, 6, 200, 30), (3, 4, 10, 1000),
                       (4, 1, 9, 3), (2, 2, 5, 1)]:
        pos = torch.randint(n, (b, p), generator=g)
        if p > 1:
            pos[:, 1] = pos[:, 0]  # the same positive twice: its draws count once
        mask = torch.rand(b, p, generator=g) > 0.2
        ids = torch.randint(n, (m,), generator=g)
        want = ((ids.view(1, m, 1) == pos.view(b, 1, p)) & mask.view(b, 1, p)).any(-1)
        for neg in (ids, ids.unsqueeze(0).expand(b, -1)):  # shared and per-query paths
            x = torch.randn(b, m, generator=g, dtype=torch.float64)
            z = x.clone()
            hits = L._drop_hits_(z, pos, mask, neg)
            assert torch.equal(z, x.masked_fill(want, -math.inf))
            assert torch.equal(hits, want.sum(1))


@pytest.mark.parametrize("branch_free", [False, True])
def test_row_logsumexp_matches_torch_with_masks_and_empty_rows(branch_free, monkeypatch):
    """_RowLogSumExp (the sampled softmax's normaliser): value and gradient against
    torch.logsumexp / softmax; -inf entries are left out; a row of only -inf gives -inf and a
    zero gradient; NaN stays NaN; M = 0 gives -inf; gradcheck in float64 (the CPU's path, which
    looks for empty rows first, and the static one)."""
    import xmc_toolkit.losses as L
    from xmc_toolkit.losses import _RowLogSumExp

    monkeypatch.setattr(L, "_branch_free", lambda device: branch_free)

    g = torch.Generator().manual_seed(2)
    z = 30 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    z[torch.rand(6, 9, generator=g) < 0.3] = -math.inf
    z[2] = -math.inf  # empty row
    z[4, 0] = 0.0  # one finite entry only elsewhere
    z[4, 1:] = -math.inf
    z.requires_grad_(True)
    out = _RowLogSumExp.apply(z)
    ref = torch.logsumexp(z.detach(), 1)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12) and out[2] == -math.inf
    gw = torch.randn(6, generator=g, dtype=torch.float64)
    (out * gw).sum().backward()
    want = torch.softmax(z.detach(), 1).nan_to_num(0.0) * gw.view(-1, 1)
    assert torch.isfinite(z.grad).all() and torch.allclose(z.grad, want, rtol=1e-12, atol=1e-15)
    assert (z.grad[2] == 0).all() and z.grad[4, 0] == gw[4]
    zf = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_RowLogSumExp.apply, (zf,))
    nan = torch.tensor([[0.0, math.nan, 1.0]])
    assert torch.isnan(_RowLogSumExp.apply(nan)).all()
    empty = torch.zeros(4, 0, requires_grad=True)
    e = _RowLogSumExp.apply(empty)
    assert e.shape == (4,) and (e == -math.inf).all()
    e.sum().backward()
    assert empty.grad.shape == (4, 0)
