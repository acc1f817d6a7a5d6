"""One kernel per operation, shared by the local and the sharded placement, each checked
against a plain reference: top-k (ties by id), gradient clipping, the propensity formula,
the accidental-hit check and the sampler a config names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc_toolkit import distributed as D
from xmc_toolkit.losses import _accidental_hits
from xmc_toolkit.metrics import inverse_propensity, inverse_propensity_from_counts
from xmc_toolkit.optim import clip_grad_norm
from xmc_toolkit.output_layer import chunked_topk


def ref_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: sort every row by (-score, id) in Python."""
    ids, vals = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
        ids.append(order)
        vals.append([row[c] for c in order])
    return torch.tensor(vals, dtype=scores.dtype), torch.tensor(ids, dtype=torch.int64)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_sharded_topk_equals_local_topk_with_ties(world: int, k: int) -> None:
    g = torch.Generator().manual_seed(world * 10 + k)
    L, d = 13, 3
    Q = torch.randint(-2, 3, (6, d), generator=g).float()  # small integers: many exact ties
    W = torch.randint(-2, 3, (L, d), generator=g).float()
    b = torch.zeros(L)
    ref_s, ref_i = ref_topk(Q @ W.t(), k)
    s, i = chunked_topk(Q, W, b, k, chunk_size=4)
    torch.testing.assert_close(s, ref_s)
    assert torch.equal(i, ref_i)
    parts_s, parts_i = [], []
    for lo, hi in D.shard_ranges(L, world):  # what every rank computes, then merged
        ls, li = D._local_topk(Q, W[lo:hi], b[lo:hi], k, chunk_size=3)
        parts_s.append(ls)
        parts_i.append(torch.where(li >= 0, li + lo, li))
    ms, mi = D.merge_topk(parts_s, parts_i, k)
    torch.testing.assert_close(ms, ref_s)
    assert torch.equal(mi, ref_i)


def test_merge_topk_breaks_ties_by_id_whatever_the_list_order() -> None:
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    i = [torch.tensor([[9, 2]]), torch.tensor([[4, 1]])]
    ms, mi = D.merge_topk(s, i, 3)
    assert mi.tolist() == [[1, 4, 9]] and ms.tolist() == [[1.0, 1.0, 1.0]]


def test_clip_grad_norm_matches_torch_and_the_sharded_form() -> None:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    grads = [torch.randn(4, 3, generator=g) * 5 for _ in ps]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    for p, r, gr in zip(ps, ref, grads):
        p.grad, r.grad = gr.clone(), gr.clone()
    total = clip_grad_norm(ps, 1.0)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert math.isclose(total, float(ref_total), rel_tol=1e-6)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad)
    # sharded form: the last tensor "split across ranks"; the all-reduce of one rank is a no-op
    qs = [torch.nn.Parameter(torch.zeros(4, 3)) for _ in range(3)]
    for q, gr in zip(qs, grads):
        q.grad = gr.clone()
    seen = []
    total2 = clip_grad_norm(qs[:2], 1.0, sharded=qs[2:], all_reduce=seen.append)
    assert len(seen) == 1 and math.isclose(total2, total, rel_tol=1e-6)
    for q, p in zip(qs, ps):
        torch.testing.assert_close(q.grad, p.grad)


def test_one_propensity_formula() -> None:
    rng = np.random.default_rng(0)
    Y = sp.csr_matrix((rng.random((50, 7)) < 0.3).astype(np.float32))
    counts = np.asarray((Y != 0).sum(0)).ravel()
    A, B = 0.55, 1.5
    C = (math.log(50) - 1) * (B + 1) ** A
    ref = np.array([1 + C * (c + B) ** -A for c in counts])
    np.testing.assert_allclose(inverse_propensity(Y, A, B), ref, rtol=1e-12)
    np.testing.assert_array_equal(inverse_propensity(Y, A, B),
                                  inverse_propensity_from_counts(counts, 50, A, B))


def test_one_accidental_hit_check() -> None:
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 10, (5, 3), generator=g)
    mask = torch.rand(5, 3, generator=g) < 0.6
    neg = torch.randint(0, 10, (5, 8), generator=g)
    ref = torch.tensor([[bool(((pos[r] == neg[r, j]) & mask[r]).any()) for j in range(8)]
                        for r in range(5)])
    assert torch.equal(_accidental_hits(pos, mask, neg), ref)
    assert torch.equal(D._accidental_hits(neg, pos, mask), ref)


@pytest.mark.parametrize("name", ["uniform", "popularity", "log-uniform", "midx-pq", "midx-rq"])
def test_sampler_from_config(name: str) -> None:
    from xmc_toolkit.objective import sampler_from_config
    from xmc_toolkit.train_config import TrainConfig

    cfg = TrainConfig(sampler=name, loss="sampled", codewords=4)
    s = sampler_from_config(cfg, 40, np.arange(40))
    assert s.num_labels == 40
    if name.startswith("midx"):
        assert s.quantizer == name.split("-")[1]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_one_masked_logsumexp_matches_dense_with_grads(chunk: int) -> None:
    """losses.MaskedLogSumExp (the full softmax's and each shard's normalizer) against a dense
    masked logsumexp; ids outside [0, L) (another shard's) mask nothing; a row of only
    positives gives -inf and no NaN gradient."""
    from xmc_toolkit.losses import MaskedLogSumExp

    g = torch.Generator().manual_seed(chunk)
    B, L, d = 5, 7, 3
    Q = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(L, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(L, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(-3, L + 3, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.5
    pos[0], mask[0] = torch.arange(L), True  # row 0: every label a positive
    out = MaskedLogSumExp.apply(Q, W, b, pos, mask, chunk)
    S = Q @ W.t() + b
    dense = torch.zeros(B, L, dtype=torch.bool)
    for r in range(B):
        for j in range(L):
            if mask[r, j] and 0 <= pos[r, j] < L:
                dense[r, pos[r, j]] = True
    ref = torch.logsumexp(S.masked_fill(dense, -math.inf), 1)
    assert out[0] == -math.inf and torch.allclose(out[1:], ref[1:])
    out[1:].sum().backward()
    gq, gw, gb = Q.grad.clone(), W.grad.clone(), b.grad.clone()
    for t in (Q, W, b):
        t.grad = None
    ref[1:].sum().backward()
    torch.testing.assert_close(gq, Q.grad)
    torch.testing.assert_close(gw, W.grad)
    torch.testing.assert_close(gb, b.grad)


@pytest.mark.parametrize("L,dim,world", [(5, 3, 1), (37, 8, 3), (9000, 16, 2), (8193, 5, 4)])
def test_label_table_rows_are_the_local_table_for_any_shard(L: int, dim: int, world: int) -> None:
    """Each rank's block-drawn rows are its rows of LabelTable's init (same generator state
    after), so every number of ranks starts from the one-process table."""
    from xmc_toolkit.network import label_table_rows
    from xmc_toolkit.output_layer import LabelTable

    torch.manual_seed(11)
    ref = LabelTable(L, dim, bias=False).weight.weight.detach()
    after = torch.rand(4)
    for lo, hi in D.shard_ranges(L, world):
        torch.manual_seed(11)
        rows = label_table_rows(L, dim, lo, hi)
        assert torch.equal(rows, ref[lo:hi])
        assert torch.equal(torch.rand(4), after)
