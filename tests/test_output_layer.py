"""Tests of xmc_toolkit.output_layer: parity with dense torch ops, ties, sparse gradients, MIDX top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.errors import ConfigError, XMCError
from xmc_toolkit.output_layer import (
    LabelTable,
    approx_topk,
    chunked_topk,
    recall_at_k_vs_exact,
)


def dense_topk(q, W, b, k):
    """Reference: full scores, stable descending sort (ties -> smaller id first)."""
    s = q @ W.T
    if b is not None:
        s = s + b
    vals, ids = torch.sort(s, dim=1, descending=True, stable=True)
    return vals[:, :k], ids[:, :k]


# -- chunked exact top-k ------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 5),
    L=st.integers(1, 40),
    d=st.integers(1, 4),
    k_frac=st.floats(0.0, 1.0),
    chunk=st.integers(1, 50),
    levels=st.integers(1, 4),
    use_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunked_topk_equals_dense_with_ties(B, L, d, k_frac, chunk, levels, use_bias, seed):
    # Small integer values: float32 arithmetic is exact, so ties are real ties in both paths.
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-levels, levels + 1, (B, d), generator=g).float()
    W = torch.randint(-levels, levels + 1, (L, d), generator=g).float()
    b = torch.randint(-1, 2, (L,), generator=g).float() if use_bias else None
    k = max(1, round(k_frac * L))
    s, i = chunked_topk(q, W, b, k, chunk_size=chunk)
    rs, ri = dense_topk(q, W, b, k)
    assert torch.equal(i, ri)
    assert torch.equal(s, rs)


@pytest.mark.parametrize(
    "L,k,chunk",
    [(1000, 10, 64), (1000, 100, 64), (1000, 1000, 300), (997, 5, 100), (50, 50, 7), (3, 1, 65536)],
)
def test_chunked_topk_random_floats(L, k, chunk):
    # k > chunk, chunk not dividing L, k == L
    g = torch.Generator().manual_seed(L + k)
    q, W, b = torch.randn(7, 16, generator=g), torch.randn(L, 16, generator=g), torch.randn(L, generator=g)
    s, i = chunked_topk(q, W, b, k, chunk_size=chunk)
    rs, ri = dense_topk(q, W, b, k)
    torch.testing.assert_close(s, rs)
    # scores come from different matmul blockings: compare ids where scores are well separated
    full = q @ W.T + b
    torch.testing.assert_close(full.gather(1, i), rs)
    assert (i.sort(1).values == ri.sort(1).values).float().mean() > 0.99
    assert i.dtype == torch.int64 and (s[:, :-1] >= s[:, 1:]).all()


def test_chunked_topk_all_equal_scores():
    q = torch.zeros(2, 3)
    W = torch.randn(20, 3)
    s, i = chunked_topk(q, W, None, 6, chunk_size=4)
    assert torch.equal(i, torch.arange(6).expand(2, 6))


def test_chunked_topk_errors():
    q, W = torch.randn(2, 3), torch.randn(5, 3)
    with pytest.raises(ConfigError, match="exceeds the number of labels"):
        chunked_topk(q, W, None, 6)
    with pytest.raises(ConfigError, match="--k"):
        chunked_topk(q, W, None, 0)
    with pytest.raises(ConfigError, match="chunk"):
        chunked_topk(q, W, None, 2, chunk_size=0)
    with pytest.raises(XMCError, match="same d"):
        chunked_topk(q, torch.randn(5, 4), None, 2)
    with pytest.raises(XMCError, match="NaN"):
        chunked_topk(torch.full((2, 3), float("nan")), W, None, 2)


def test_chunked_topk_memory_bound(monkeypatch):
    """No intermediate larger than [B, chunk] + [B, 2k] (checked through the selector's input)."""
    import xmc_toolkit.output_layer as ol

    seen = []
    fast, stable = ol._topk_fast, ol._select_topk_stable

    def spy_fast(scores, k):
        seen.append(scores.shape)
        return fast(scores, k)

    def spy_stable(scores, k):
        seen.append(scores.shape)
        return stable(scores, k)

    monkeypatch.setattr(ol, "_topk_fast", spy_fast)
    monkeypatch.setattr(ol, "_select_topk_stable", spy_stable)
    chunked_topk(torch.randn(4, 8), torch.randn(1000, 8), None, 5, chunk_size=128)
    assert max(s[1] for s in seen) == 128 and len(seen) == 8  # one pass, no tie re-scan
    seen.clear()
    W = torch.zeros(1000, 8)  # every score ties: the exact re-scan runs, still chunked
    _, ids = chunked_topk(torch.randn(4, 8), W, None, 5, chunk_size=128)
    assert max(s[1] for s in seen) == 128
    assert torch.equal(ids, torch.arange(5).expand(4, 5))


# -- LabelTable ------------------------------------------------------------------------------------
def test_score_ids_per_query_and_shared_match_dense():
    torch.manual_seed(0)
    t = LabelTable(30, 6)
    with torch.no_grad():
        t.bias.weight.normal_()
    q = torch.randn(4, 6)
    full = q @ t.weight.weight.T + t.bias.weight.view(-1)  # [B, L]
    ids = torch.randint(0, 30, (4, 9))
    torch.testing.assert_close(t.score_ids(q, ids), full.gather(1, ids))
    shared = torch.randint(0, 30, (9,))
    torch.testing.assert_close(t.score_ids(q, shared), full[:, shared])
    torch.testing.assert_close(t.full_scores(q), full)
    torch.testing.assert_close(t.full_scores(q, shared), full[:, shared])
    s, i = t.topk(q, 5, chunk_size=7)
    rs, ri = dense_topk(q, t.label_embeddings(), t.bias_vector(), 5)
    torch.testing.assert_close(s, rs)
    with pytest.raises(XMCError, match="ids"):
        t.score_ids(q, torch.zeros(3, 2, dtype=torch.long))


def test_sparse_gradients_touch_only_used_rows():
    t = LabelTable(50, 4)
    q = torch.randn(3, 4, requires_grad=True)
    ids = torch.tensor([[1, 2], [2, 7], [9, 1]])
    t.score_ids(q, ids).sum().backward()
    gw, gb = t.weight.weight.grad, t.bias.weight.grad
    assert gw.is_sparse and gb.is_sparse
    assert set(gw.coalesce().indices()[0].tolist()) == {1, 2, 7, 9}
    # gradient value equals the dense reference
    W = t.weight.weight.detach().clone().requires_grad_(True)
    (q.detach() @ W.T).gather(1, ids).sum().backward()
    torch.testing.assert_close(gw.to_dense(), W.grad)
    torch.optim.SparseAdam(list(t.parameters()), lr=0.01).step()


def test_dense_option_and_no_bias():
    t = LabelTable(10, 3, bias=False, sparse=False)
    q = torch.randn(2, 3)
    t.full_scores(q).sum().backward()
    assert not t.weight.weight.grad.is_sparse and t.bias_vector() is None
    with pytest.raises(ConfigError) as ei:
        LabelTable(0, -1)
    assert len(ei.value.problems) == 2



# -- per-query scores on the CPU: coalesced row gradients by construction -------------------------
def _embedding_reference(t: LabelTable, q: torch.Tensor, id_sets, weights):
    """The same scores through plain nn.Embedding(sparse=False) lookups + bmm (dense grads)."""
    W = torch.nn.Embedding.from_pretrained(t.weight.weight.detach().clone(), freeze=False)
    b = torch.nn.Embedding.from_pretrained(t.bias.weight.detach().clone(), freeze=False)
    q = q.detach().clone().requires_grad_(True)
    outs = [torch.bmm(W(ids), q.unsqueeze(-1)).squeeze(-1) + b(ids).squeeze(-1) for ids in id_sets]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs, W.weight.grad, b.weight.grad, q.grad


@pytest.mark.parametrize("block", [1, 16, 1 << 17])  # one row, a few queries, all at once
def test_per_query_scores_and_gradients_equal_nn_embedding(monkeypatch, block):
    """Scores, weight / bias / query gradients of score_ids (per-query ids, repeated within and
    across queries, scored twice as positives and negatives) equal nn.Embedding's dense ones; the
    row gradients come out sorted and distinct (flagged coalesced before autograd stores them)."""
    import xmc_toolkit.output_layer as ol

    monkeypatch.setattr(ol, "_SCORE_BLOCK_FLOATS", block)
    g = torch.Generator().manual_seed(3)
    t = LabelTable(40, 5).double()
    with torch.no_grad():
        t.bias.weight.normal_(generator=g)
    q = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    neg = torch.randint(0, 40, (6, 11), generator=g)
    neg[1, :3] = neg[0, 0]  # a row repeated inside a query and across queries
    pos = torch.randint(0, 40, (6, 2), generator=g)
    pos[2, 0] = neg[0, 0]
    wn = torch.randn(6, 11, dtype=torch.float64, generator=g)
    wp = torch.randn(6, 2, dtype=torch.float64, generator=g)
    seen = []
    orig = ol._sparse_rows
    monkeypatch.setattr(ol, "_sparse_rows", lambda *a: seen.append(orig(*a)) or seen[-1])
    sn, sp = t.score_ids(q, neg), t.score_ids(q, pos)
    assert type(sn.grad_fn).__name__ == "_PerQueryScoresBackward"
    ((sn * wn).sum() + (sp * wp).sum()).backward()
    (rn, rp), gw, gb, gq = _embedding_reference(t, q, (neg, pos), (wn, wp))
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sn, rn, **tight)
    torch.testing.assert_close(sp, rp, **tight)
    assert t.weight.weight.grad.is_sparse and t.bias.weight.grad.is_sparse
    torch.testing.assert_close(t.weight.weight.grad.to_dense(), gw, **tight)
    torch.testing.assert_close(t.bias.weight.grad.to_dense(), gb, **tight)
    torch.testing.assert_close(q.grad, gq, **tight)
    assert len(seen) == 4  # weight and bias, negatives and positives
    for grad in seen:
        rows = grad._indices()[0]
        assert grad.is_coalesced() and bool((rows[1:] > rows[:-1]).all())
        assert torch.equal(grad.to_dense(), grad.coalesce().to_dense())
    rows = t.weight.weight.grad._indices()[0]  # the sum of both: still sorted and distinct
    assert bool((rows[1:] > rows[:-1]).all())
    assert set(rows.tolist()) == set(neg.flatten().tolist()) | set(pos.flatten().tolist())


def test_per_query_scores_edge_cases_and_fallbacks():
    """No ids, frozen parameters, no bias, float32 with RowAdam against the nn.Embedding path
    (SparseAdam over several steps), and the old path under CPU autocast."""
    from xmc_toolkit.sparse_optim import RowAdam

    t = LabelTable(10, 3)
    q = torch.randn(2, 3, requires_grad=True)
    s = t.score_ids(q, torch.zeros(2, 0, dtype=torch.long))
    assert s.shape == (2, 0)
    s.sum().backward()
    assert t.weight.weight.grad._nnz() == 0 and torch.equal(q.grad, torch.zeros(2, 3))
    t.weight.weight.requires_grad_(False)
    t.bias.weight.requires_grad_(False)
    t.score_ids(q, torch.tensor([[1, 2], [2, 2]])).sum().backward()  # only the queries' grad
    nb = LabelTable(10, 3, bias=False)
    ids = torch.tensor([[1, 2, 2], [9, 1, 0]])
    nb.score_ids(q.detach(), ids).sum().backward()
    dense = torch.zeros(10, 3).index_add_(0, ids.flatten(), q.detach().repeat_interleave(3, 0))
    torch.testing.assert_close(nb.weight.weight.grad.to_dense(), dense)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = t.score_ids(q, ids)
    assert type(s.grad_fn).__name__ != "_PerQueryScoresBackward"
    # several training steps, float32: RowAdam on the fast path == SparseAdam on nn.Embedding's
    torch.manual_seed(0)
    a = LabelTable(50, 8)
    with torch.no_grad():
        a.bias.weight.normal_()
    ref = {k: torch.nn.Embedding.from_pretrained(v.detach().clone(), freeze=False, sparse=True)
           for k, v in (("w", a.weight.weight), ("b", a.bias.weight))}
    opt_a = RowAdam(list(a.parameters()), lr=0.05)
    opt_r = torch.optim.SparseAdam([ref["w"].weight, ref["b"].weight], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        qq = torch.randn(7, 8, generator=g)
        neg, pos = torch.randint(0, 50, (7, 30), generator=g), torch.randint(0, 50, (7, 2), generator=g)
        for opt in (opt_a, opt_r):
            opt.zero_grad()
        (a.score_ids(qq, neg).logsumexp(1) - a.score_ids(qq, pos).sum(1)).sum().backward()
        sc = [torch.bmm(ref["w"](i), qq.unsqueeze(-1)).squeeze(-1) + ref["b"](i).squeeze(-1)
              for i in (neg, pos)]
        (sc[0].logsumexp(1) - sc[1].sum(1)).sum().backward()
        opt_a.step()
        opt_r.step()
    torch.testing.assert_close(a.weight.weight.detach(), ref["w"].weight.detach(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bias.weight.detach(), ref["b"].weight.detach(),
                               rtol=1e-5, atol=1e-6)

# -- approximate top-k through a cell index --------------------------------------------------------
class FakeIndex:
    """A tiny stand-in for MIDXSampler: K x K cells from two 'codebooks' on halves of the vector."""

    def __init__(self, W: torch.Tensor, K: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        L, d = W.shape
        h = d // 2
        self.K = K
        self.c1 = W[torch.randperm(L, generator=g)[:K], :h].clone()
        self.c2 = W[torch.randperm(L, generator=g)[:K], h:].clone()
        for _ in range(10):  # a few Lloyd steps per half
            for c, part in ((self.c1, W[:, :h]), (self.c2, W[:, h:])):
                a = torch.cdist(part, c).argmin(1)
                for j in range(K):
                    if (a == j).any():
                        c[j] = part[a == j].mean(0)
        a1 = torch.cdist(W[:, :h], self.c1).argmin(1)
        a2 = torch.cdist(W[:, h:], self.c2).argmin(1)
        cell = a1 * K + a2  # [L]
        self.cell_items = torch.sort(cell, stable=True).indices
        counts = torch.bincount(cell, minlength=K * K)
        self.cell_indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.h = h

    def cell_logits(self, queries: torch.Tensor) -> torch.Tensor:
        s1 = queries[:, : self.h] @ self.c1.T  # [B, K]
        s2 = queries[:, self.h :] @ self.c2.T  # [B, K]
        logits = (s1[:, :, None] + s2[:, None, :]).reshape(queries.shape[0], -1)  # [B, K*K]
        empty = (self.cell_indptr[1:] - self.cell_indptr[:-1]) == 0
        return logits.masked_fill(empty, float("-inf"))


def _clustered(L=2000, d=8, n_clusters=20, B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, d, generator=g) * 3
    W = centers[torch.randint(0, n_clusters, (L,), generator=g)] + 0.3 * torch.randn(L, d, generator=g)
    q = centers[torch.randint(0, n_clusters, (B,), generator=g)] + 0.3 * torch.randn(B, d, generator=g)
    b = 0.1 * torch.randn(L, generator=g)
    return q, W, b


def test_approx_topk_all_cells_is_exact():
    q, W, b = _clustered()
    idx = FakeIndex(W, K=6)
    s, i = approx_topk(q, W, b, idx, k=10, num_cells=36)
    rs, ri = dense_topk(q, W, b, 10)
    assert torch.equal(i, ri)
    torch.testing.assert_close(s, rs)
    assert recall_at_k_vs_exact(i, ri) == 1.0


def test_approx_topk_high_recall_on_clusters():
    q, W, b = _clustered()
    idx = FakeIndex(W, K=6)
    s, i = approx_topk(q, W, b, idx, k=10, num_cells=4, row_block=5)
    _, ri = dense_topk(q, W, b, 10)
    assert recall_at_k_vs_exact(i, ri) >= 0.9
    # returned scores are the true scores of the returned ids
    full = q @ W.T + b
    torch.testing.assert_close(full.gather(1, i), s)


def test_approx_topk_candidate_cap_and_padding():
    q, W, b = _clustered(L=300)
    idx = FakeIndex(W, K=4)
    s, i = approx_topk(q, W, b, idx, k=10, num_cells=16, max_candidates=12)
    assert ((i >= 0).sum(1) == 10).all()  # cap >= k: every slot filled
    # one probed cell with few members: slots without candidates are -inf / -1
    counts = idx.cell_indptr[1:] - idx.cell_indptr[:-1]
    small = int(counts[counts > 0].min())
    s, i = approx_topk(q, W, b, idx, k=min(small + 3, 300), num_cells=1)
    assert ((i == -1) == torch.isinf(s)).all()
    with pytest.raises(ConfigError, match="max_candidates"):
        approx_topk(q, W, b, idx, k=10, max_candidates=3)
    with pytest.raises(XMCError, match="midx"):
        approx_topk(q, W, b, object(), k=3)


def _approx_reference(q, W, b, idx, k, num_cells, max_candidates=None):
    """One query at a time: gather the probed cells' labels in cell-rank order, cut, score."""
    out_s, out_i = [], []
    logits = idx.cell_logits(q)
    for r in range(q.shape[0]):
        cells = torch.topk(logits[r], min(num_cells, logits.shape[1])).indices
        cand = torch.cat([idx.cell_items[idx.cell_indptr[c]: idx.cell_indptr[c + 1]]
                          for c in cells.tolist()])
        if max_candidates is not None:
            cand = cand[:max_candidates]
        sc = q[r] @ W[cand].T + b[cand]
        key = sorted(zip((-sc).tolist(), cand.tolist()))[:k]  # best score, then smallest id
        out_s.append([-v for v, _ in key] + [float("-inf")] * (k - len(key)))
        out_i.append([i for _, i in key] + [-1] * (k - len(key)))
    return torch.tensor(out_s), torch.tensor(out_i)


@pytest.mark.parametrize("row_block", [None, 1, 3, 64])
@pytest.mark.parametrize("num_cells,max_candidates", [(1, None), (3, None), (5, 40)])
def test_approx_topk_matches_per_query_reference(row_block, num_cells, max_candidates):
    """Rows are re-ranked in blocks sorted by candidate count; every block size gives the
    per-query reference's ids and scores, in the caller's row order."""
    q, W, b = _clustered(L=400, B=23, seed=3)
    idx = FakeIndex(W, K=5)
    s, i = approx_topk(q, W, b, idx, k=7, num_cells=num_cells, max_candidates=max_candidates,
                       row_block=row_block)
    rs, ri = _approx_reference(q, W, b, idx, 7, num_cells, max_candidates)
    assert torch.equal(i, ri)
    torch.testing.assert_close(s, rs)


def test_recall_at_k_vs_exact_reference():
    a = torch.tensor([[1, 2, 3], [4, 5, -1]])
    e = torch.tensor([[3, 2, 9], [6, 7, 4]])
    assert recall_at_k_vs_exact(a, e) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_approx_topk_with_real_midx_sampler():
    """Against the real MIDXSampler (an API break fails here: no skip)."""
    from xmc_toolkit.sampling import MIDXSampler

    q, W, b = _clustered()
    sampler = MIDXSampler(W.shape[0], num_codewords=6, seed=0)
    sampler.update(W, b)
    missing = [a for a in ("cell_indptr", "cell_items", "cell_logits") if not hasattr(sampler, a)]
    assert not missing, f"MIDXSampler lacks the cell index attributes {missing} approx_topk needs"
    K2 = sampler.cell_indptr.numel() - 1
    _, ri = dense_topk(q, W, b, 10)
    _, i = approx_topk(q, W, b, sampler, k=10, num_cells=K2)
    assert recall_at_k_vs_exact(i, ri) == 1.0
    _, i = approx_topk(q, W, b, sampler, k=10, num_cells=max(1, K2 // 8))
    assert recall_at_k_vs_exact(i, ri) >= 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_topk_cuda_matches_cpu():
    q, W, b = _clustered()
    s, i = chunked_topk(q.cuda(), W.cuda(), b.cuda(), 10, chunk_size=300)
    rs, ri = dense_topk(q, W, b, 10)
    assert s.is_cuda
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-4, atol=1e-4)
    idx = FakeIndex(W, K=6)
    idx.cell_indptr, idx.cell_items = idx.cell_indptr.cuda(), idx.cell_items.cuda()
    idx.c1, idx.c2 = idx.c1.cuda(), idx.c2.cuda()
    _, ai = approx_topk(q.cuda(), W.cuda(), b.cuda(), idx, k=10, num_cells=36)
    assert recall_at_k_vs_exact(ai.cpu(), ri) == 1.0


def test_approx_topk_bias_bound_matches_reference():
    """bias_bound ranks cells by codeword score + the cell's largest bias: the per-query
    reference with those cell scores gives the same ids; the bound's max-bias is brute-forced."""
    from xmc_toolkit.sampling import MIDXSampler

    q, W, b = _clustered(L=400, B=23, seed=5)
    b = 3.0 * b  # a bias that matters
    s = MIDXSampler(W.shape[0], num_codewords=5, seed=0)
    s.update(W, b)
    cell = s.codes[:, 0] * 5 + s.codes[:, 1]
    for c in range(25):
        members = b[cell == c]
        want = members.max() if members.numel() else torch.tensor(float("-inf"))
        assert float(s.cell_bias_max[c]) == float(want)

    class Shifted:  # the reference's view of the same index with bias-bounded cell scores
        cell_indptr, cell_items = s.cell_indptr, s.cell_items

        def cell_logits(self, x):
            return s.cell_logits(x) + s.cell_bias_max

    for nc, cap in ((3, None), (25, 60)):
        got_s, got_i = approx_topk(q, W, b, s, k=5, num_cells=nc, max_candidates=cap,
                                   bias_bound=True)
        ref_s, ref_i = _approx_reference(q, W, b, Shifted(), 5, nc, cap)
        assert torch.equal(got_i, ref_i)
        torch.testing.assert_close(got_s, ref_s)
    with pytest.raises(XMCError, match="cell_bias_max"):
        approx_topk(q, W, b, FakeIndex(W, K=5), k=3, bias_bound=True)
