"""RowAdam against torch.optim.SparseAdam (its reference) and dense Adam semantics."""

from __future__ import annotations

import pytest
import torch

from xmc_toolkit.errors import ConfigError
from xmc_toolkit.sparse_optim import RowAdam


def _run(opt_cls, steps: int = 6, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = opt_cls(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (7, 5), generator=g)  # repeated ids on purpose
        target = torch.randn(7, 5, 8, generator=g)
        loss = ((emb(ids) - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return emb.weight.detach().clone(), opt.state_dict()


def test_row_adam_equals_sparse_adam():
    w_ref, _ = _run(torch.optim.SparseAdam)
    w_row, _ = _run(RowAdam)
    torch.testing.assert_close(w_row, w_ref, rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_their_moments_stay_put():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowAdam(emb.parameters(), lr=0.1)
    emb(torch.tensor([2, 2, 7])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (2, 7) for i in range(10)]
    state = opt.state[emb.weight]
    assert state["exp_avg"][[0, 1, 3]].abs().sum() == 0


def test_dense_gradient_is_plain_adam():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = RowAdam([p1], lr=0.01), torch.optim.Adam([p2], lr=0.01)
    for _ in range(3):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (p**3).sum().backward()
            o.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    w_a, _ = _run(RowAdam, steps=6)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = RowAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        if i == 3:  # save and restore into a fresh optimizer mid-run
            sd = opt.state_dict()
            opt = RowAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
            opt.load_state_dict(sd)
        ids = torch.randint(0, 50, (7, 5), generator=g)
        target = torch.randn(7, 5, 8, generator=g)
        opt.zero_grad()
        ((emb(ids) - target) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(emb.weight.detach(), w_a)


def test_bad_hyper_parameters_are_all_reported():
    with pytest.raises(ConfigError) as err:
        RowAdam([torch.nn.Parameter(torch.zeros(1))], lr=-1, betas=(1.5, 0.9), eps=-1)
    assert len(err.value.problems) == 3


# ---------------------------------------------------------------------------------------------
# the sync-free sparse path (used on CUDA parameters; forced here on the CPU)
# ---------------------------------------------------------------------------------------------
def _random_sparse_grads(rows: int, dim: int, steps: int, seed: int, row0: str):
    """``steps`` uncoalesced ``[rows, dim]`` COO gradients with repeated rows, entries in random
    order; row 0 is repeated (``row0="repeated"``) or never present (``"absent"``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        n = int(torch.randint(5, 40, (), generator=g))
        ids = torch.randint(1, rows, (n,), generator=g)
        ids = torch.cat([ids, ids[: n // 3]])  # more repeats
        if row0 == "repeated":
            ids = torch.cat([ids, torch.zeros(3, dtype=torch.long)])
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        vals = torch.randn(ids.numel(), dim, generator=g, dtype=torch.float64)
        out.append(torch.sparse_coo_tensor(ids.view(1, -1), vals, (rows, dim),
                                           check_invariants=True))
    assert all(not t.is_coalesced() for t in out)
    return out


def _apply(opt_factory, grads, rows: int, dim: int) -> tuple[torch.Tensor, dict]:
    p = torch.nn.Parameter(torch.randn(rows, dim, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(5)))
    opt = opt_factory([p])
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p.detach().clone(), opt.state[p]


@pytest.mark.parametrize("row0", ["repeated", "absent"])
def test_sync_free_path_equals_coalesce_path_and_sparse_adam(row0):
    rows, dim = 30, 4
    grads = _random_sparse_grads(rows, dim, steps=7, seed=3, row0=row0)
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    w_free, s_free = _apply(lambda ps: RowAdam(ps, sync_free=True, **kw), grads, rows, dim)
    w_coal, s_coal = _apply(lambda ps: RowAdam(ps, sync_free=False, **kw), grads, rows, dim)
    w_ref, s_ref = _apply(lambda ps: torch.optim.SparseAdam(ps, **kw), grads, rows, dim)
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_free, w_coal, **tight)
    torch.testing.assert_close(w_free, w_ref, **tight)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(s_free[key], s_coal[key], **tight)
        torch.testing.assert_close(s_free[key], s_ref[key], **tight)
    assert float(s_free["step"]) == 7 and s_free["step"].device.type == "cpu"
    # rows never in a gradient keep their initial values and zero moments
    touched = torch.zeros(rows, dtype=torch.bool)
    for grad in grads:
        touched[grad._indices()[0]] = True
    assert bool(touched[0]) == (row0 == "repeated")
    w0, _ = _apply(lambda ps: RowAdam(ps, **kw), [], rows, dim)
    assert torch.equal(w_free[~touched], w0[~touched])
    assert not s_free["exp_avg"][~touched].any()


def test_sync_free_path_float32_and_one_entry():
    """float32 (the training dtype) against SparseAdam, and the N = 1 and N = 0 edge cases."""
    torch.manual_seed(0)
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    ps = [torch.nn.Parameter(torch.randn(6, 3)) for _ in range(2)]
    ps[1].data.copy_(ps[0].data)
    opts = [RowAdam([ps[0]], sync_free=True, **kw), torch.optim.SparseAdam([ps[1]], **kw)]
    for ids in ([4], [2, 2, 0, 5, 0], [1]):
        idx = torch.tensor([ids])
        vals = torch.randn(len(ids), 3)
        for p, o in zip(ps, opts):
            p.grad = torch.sparse_coo_tensor(idx, vals, (6, 3), check_invariants=True)
            o.step()
    torch.testing.assert_close(ps[0], ps[1], rtol=1e-6, atol=1e-7)
    before = ps[0].detach().clone()
    ps[0].grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                         torch.zeros(0, 3), (6, 3), check_invariants=True)
    opts[0].step()  # no entries: nothing moves
    assert torch.equal(ps[0].detach(), before)


def test_sync_free_is_the_default_off_the_cpu_only():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    calls = []
    import xmc_toolkit.sparse_optim as so

    orig = so._sparse_row_adam_
    mp = pytest.MonkeyPatch()
    mp.setattr(so, "_sparse_row_adam_", lambda *a, **kw: (calls.append(1), orig(*a, **kw)))
    try:
        opt = RowAdam([p], lr=0.1)
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.ones(2, 2), (4, 2),
                                         check_invariants=True)
        opt.step()
        assert calls == []  # CPU: the coalescing path
        opt.sync_free = True
        opt.step()
        assert calls == [1]
    finally:
        mp.undo()
    assert "sync_free" not in opt.state_dict()["param_groups"][0]  # checkpoints unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_row_adam_step_has_no_host_sync():
    """The default RowAdam step on a CUDA embedding under set_sync_debug_mode("error"), and its
    numbers against the CPU coalescing path."""
    rows, dim = 200, 16
    grads = _random_sparse_grads(rows, dim, steps=5, seed=7, row0="repeated")
    grads = [g.float() for g in grads]
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    w_cpu, _ = _apply(lambda ps: RowAdam(ps, **kw), grads, rows, dim)
    p = torch.nn.Parameter(torch.randn(rows, dim, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(5)).float().cuda())
    opt = RowAdam([p], **kw)
    cuda_grads = [g.cuda() for g in grads]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grad in cuda_grads:
            p.grad = grad
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(p.detach().cpu(), w_cpu.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the CPU path: chunked row update, gradients sorted and distinct by construction not re-sorted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_floats", [1, 8, 12, 1 << 20])  # 1 row, 2 rows, 3 rows, 1 chunk
def test_chunked_row_update_equals_sparse_adam_with_repeated_rows(monkeypatch, chunk_floats):
    """Several steps of uncoalesced float64 gradients (repeated rows, random order, the bias-like
    [R, 1] shape too) in chunks of 1..all rows: the numbers of torch.optim.SparseAdam, and
    bit-identical whatever the chunking."""
    import xmc_toolkit.sparse_optim as so

    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    tight = dict(rtol=1e-12, atol=1e-12)
    for dim in (4, 1):
        grads = _random_sparse_grads(30, dim, steps=6, seed=11, row0="repeated")
        monkeypatch.setattr(so, "_CHUNK_FLOATS", 1 << 20)
        w_one, s_one = _apply(lambda ps: RowAdam(ps, sync_free=False, **kw), grads, 30, dim)
        monkeypatch.setattr(so, "_CHUNK_FLOATS", chunk_floats)
        w_row, s_row = _apply(lambda ps: RowAdam(ps, sync_free=False, **kw), grads, 30, dim)
        w_ref, s_ref = _apply(lambda ps: torch.optim.SparseAdam(ps, **kw), grads, 30, dim)
        torch.testing.assert_close(w_row, w_ref, **tight)
        assert torch.equal(w_row, w_one)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s_row[key], s_ref[key], **tight)
            assert torch.equal(s_row[key], s_one[key])


def test_sorted_distinct_gradient_is_not_coalesced_again(monkeypatch):
    """A gradient with sorted distinct rows but no coalesced flag (what autograd stores as .grad)
    skips coalesce(); an unsorted one, or one with a repeated row, is coalesced; same numbers."""
    calls = []
    orig = torch.Tensor.coalesce
    monkeypatch.setattr(torch.Tensor, "coalesce",
                        lambda self: (calls.append(1), orig(self))[1])
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    vals = torch.randn(3, 2, dtype=torch.float64)
    cases = {"sorted": ([1, 4, 6], 0), "unsorted": ([4, 1, 6], 1), "repeated": ([1, 4, 4], 1)}
    for name, (rows, n_calls) in cases.items():
        calls.clear()
        g = torch.sparse_coo_tensor(torch.tensor([rows]), vals, (8, 2), check_invariants=True)
        assert not g.is_coalesced()
        w, _ = _apply(lambda ps: RowAdam(ps, sync_free=False, **kw), [g], 8, 2)
        assert len(calls) == n_calls, name
        w_ref, _ = _apply(lambda ps: torch.optim.SparseAdam(ps, **kw), [g], 8, 2)
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# opt-in: one second moment per row (row_wise=True), against a slow reference
# ---------------------------------------------------------------------------------------------
def _row_wise_reference(p0: torch.Tensor, grads, lr, betas, eps) -> tuple[torch.Tensor, ...]:
    """Partial row-wise Adam written out: m per element, v per row (mean of g^2 over the row),
    SparseAdam's bias-corrected step; untouched rows keep their values and moments."""
    b1, b2 = betas
    p, m = p0.clone(), torch.zeros_like(p0)
    v = torch.zeros(p0.shape[0], 1, dtype=p0.dtype)
    for t, grad in enumerate(grads, start=1):
        g = (grad if grad.is_sparse else grad.to_sparse(sparse_dim=1)).coalesce()
        rows, gv = g.indices()[0], g.values()
        for i, r in enumerate(rows.tolist()):
            m[r] = b1 * m[r] + (1 - b1) * gv[i]
            v[r] = b2 * v[r] + (1 - b2) * (gv[i] ** 2).mean()
            step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
            p[r] = p[r] - step_size * (m[r] / (v[r].sqrt() + eps))
    return p, m, v


@pytest.mark.parametrize("path", ["chunked-1-row", "chunked-all", "sync-free"])
def test_row_wise_second_moment_equals_reference(monkeypatch, path):
    import xmc_toolkit.sparse_optim as so

    monkeypatch.setattr(so, "_CHUNK_FLOATS", 1 if path == "chunked-1-row" else 1 << 20)
    rows, dim = 30, 4
    grads = _random_sparse_grads(rows, dim, steps=6, seed=13, row0="repeated")
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    w, st = _apply(lambda ps: RowAdam(ps, sync_free=path == "sync-free", row_wise=True, **kw),
                   grads, rows, dim)
    p0 = torch.randn(rows, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w_ref, m_ref, v_ref = _row_wise_reference(p0, grads, **kw)
    tight = dict(rtol=1e-12, atol=1e-12)
    assert st["exp_avg_sq"].shape == (rows, 1)
    torch.testing.assert_close(w, w_ref, **tight)
    torch.testing.assert_close(st["exp_avg"], m_ref, **tight)
    torch.testing.assert_close(st["exp_avg_sq"], v_ref, **tight)
    # it is not Adam: the element-wise RowAdam ends elsewhere
    w_adam, _ = _apply(lambda ps: RowAdam(ps, **kw), grads, rows, dim)
    assert not torch.allclose(w, w_adam)


def test_row_wise_dense_gradient_bias_rows_and_refusals():
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = RowAdam([p], row_wise=True, **kw)
    dense = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    for g in dense:
        p.grad = g
        opt.step()
    w_ref, _, v_ref = _row_wise_reference(p0, dense, **kw)
    torch.testing.assert_close(p.detach(), w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v_ref, rtol=1e-12, atol=1e-12)
    # rows of one number (a bias [R, 1]) and 1-D parameters: exactly the element-wise update
    grads = _random_sparse_grads(12, 1, steps=4, seed=2, row0="absent")
    a, _ = _apply(lambda ps: RowAdam(ps, row_wise=True, **kw), grads, 12, 1)
    b, _ = _apply(lambda ps: RowAdam(ps, **kw), grads, 12, 1)
    assert torch.equal(a, b)
    # a state saved by the other mode is refused, not silently broadcast
    q = torch.nn.Parameter(torch.randn(4, 2))
    plain = RowAdam([q], lr=0.1)
    q.grad = torch.ones(4, 2)
    plain.step()
    rw = RowAdam([q], lr=0.1, row_wise=True)
    rw.load_state_dict(plain.state_dict())
    with pytest.raises(ConfigError, match="row_wise"):
        rw.step()
    with pytest.raises(ConfigError, match="1-D or 2-D"):
        RowAdam([torch.nn.Parameter(torch.zeros(2, 2, 2))], row_wise=True)


# the floor of the second moments before sqrt (sqrt of 0 / subnormals is slow on x86): it must
# leave every number bit for bit as it was
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-8, 1e-6, 1e-3])
def test_sqrt_floor_gives_eps_back_exactly(dtype, eps):
    from xmc_toolkit.sparse_optim import _sqrt_floor

    floor = _sqrt_floor(eps, dtype)
    assert floor >= torch.finfo(dtype).tiny  # a normal number: sqrt of it is fast
    tiny = torch.finfo(dtype).tiny
    below = torch.tensor([0.0, tiny / 4, tiny, floor / 3, floor * 0.999, floor], dtype=dtype)
    torch.testing.assert_close(below.sqrt() + eps, torch.full_like(below, eps), rtol=0, atol=0)
    # and just above the floor the sum moves off eps eventually (the floor is not absurdly high)
    assert (torch.tensor(floor * 1e6, dtype=dtype).sqrt() + eps) != eps
    assert _sqrt_floor(1e-30, torch.float32) == 0.0  # its floor would be subnormal: no clamp


@pytest.mark.parametrize("path", ["chunked", "sync-free", "dense"])
@pytest.mark.parametrize("row_wise", [False, True])
def test_sqrt_floor_changes_no_number(monkeypatch, path, row_wise):
    import xmc_toolkit.sparse_optim as so

    def run() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(3)
        p = torch.nn.Parameter(torch.randn(40, 16, generator=g))
        opt = RowAdam([p], lr=0.01, eps=1e-8, sync_free=path == "sync-free", row_wise=row_wise)
        for _ in range(8):
            vals = torch.randn(12, 16, generator=g) * 10.0 ** torch.randint(-30, 0, (12, 1),
                                                                             generator=g)
            vals[torch.rand(12, 16, generator=g) < 0.5] = 0.0  # columns of ReLU units that were off
            rows = torch.randperm(40, generator=g)[:12]
            grad = torch.sparse_coo_tensor(rows[None], vals, (40, 16))
            p.grad = grad.to_dense() if path == "dense" else grad.coalesce()
            opt.step()
        st = opt.state[p]
        return p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()

    with_floor = run()
    monkeypatch.setattr(so, "_sqrt_floor", lambda eps, dtype: 0.0)
    without = run()
    for a, b in zip(with_floor, without):
        assert torch.equal(a, b)
