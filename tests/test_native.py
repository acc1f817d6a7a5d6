"""The optional native row-Adam kernel: same numbers as the eager update, clean fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from xmc_toolkit import native
from xmc_toolkit.errors import ConfigError
from xmc_toolkit.sparse_optim import RowAdam, _row_adam_chunked_, _sqrt_floor


@pytest.fixture()
def kernel():
    mod = native.kernels()
    if mod is None:
        pytest.skip(f"native kernel unavailable: {native.native_status()['reason']}")
    return mod


@pytest.fixture()
def fresh_native(monkeypatch):
    """A process state where the kernel was never tried; restored afterwards."""
    saved = dict(native._state)
    native._reset_for_tests()
    yield
    native._state.clear()
    native._state.update(saved)


def _train(opt_kwargs: dict, steps: int = 12, rows: int = 3000, d: int = 48):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(rows, d, sparse=True)
    opt = RowAdam(emb.parameters(), lr=3e-2, **opt_kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, rows, (700,), generator=gen)  # duplicates: coalesced first
        tgt = torch.randn(700, d, generator=gen)
        opt.zero_grad(set_to_none=True)
        ((emb(ids) - tgt) ** 2).sum().backward()
        opt.step()
    return emb.weight.detach(), opt.state[emb.weight]


def test_native_update_matches_eager(kernel):
    """The kernel against the eager chunked update on one step of distinct rows: moments bit
    for bit, the parameter to the last ulp of sqrt (torch's vectorised sqrt is not correctly
    rounded; the kernel's is)."""
    torch.manual_seed(0)
    R, d = 4000, 40
    p, m, v = torch.randn(R, d), torch.randn(R, d) * 0.1, torch.rand(R, d) * 1e-2
    v[::7] = 0.0  # exact zeros: the sqrt floor
    rows = torch.randperm(R)[:900].sort().values
    g = torch.randn(900, d)
    a = [t.clone() for t in (p, m, v)]
    b = [t.clone() for t in (p, m, v)]
    _row_adam_chunked_(*a, rows, g, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=3.0)
    ss = 1e-2 * (1 - 0.999**3) ** 0.5 / (1 - 0.9**3)
    kernel.row_adam_(*b, rows, g, ss, 0.9, 0.999, 1e-8, _sqrt_floor(1e-8, torch.float32))
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(b[0][untouched], p[untouched])
    assert torch.equal(b[1][untouched], m[untouched])


def test_native_rowadam_training_matches_eager(kernel, monkeypatch):
    """Twelve RowAdam steps through the kernel (the eager update made to fail, so the kernel
    is what ran) against the same steps with native=False."""
    w_eager, s_eager = _train({"native": False})

    def boom(*args, **kwargs):
        raise AssertionError("the eager update ran although the native kernel applies")

    monkeypatch.setattr("xmc_toolkit.sparse_optim._row_adam_chunked_", boom)
    w_nat, s_nat = _train({})
    torch.testing.assert_close(w_nat, w_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_nat["exp_avg"], s_eager["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_nat["exp_avg_sq"], s_eager["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert float(s_nat["step"]) == 12.0


def test_native_refuses_out_of_range_rows(kernel):
    p, m, v = torch.zeros(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.row_adam_(p, m, v, torch.tensor([3, 10]), torch.ones(2, 4), 1e-3, 0.9, 0.999,
                         1e-8, 0.0)
    assert not p.any() and not m.any()  # checked before anything is written


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.kernels() is None
    status = native.native_status()
    assert status["available"] is False and native.NATIVE_ENV in status["reason"]
    with pytest.raises(ConfigError, match="native=True"):
        RowAdam([torch.nn.Parameter(torch.zeros(3, 2))], native=True)
    w, _ = _train({}, steps=2)  # the default falls back to the eager update
    assert torch.isfinite(w).all()


def test_build_failure_falls_back_with_one_warning(fresh_native, monkeypatch, caplog):
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_build", failing_build)
    with caplog.at_level(logging.WARNING, logger="xmc_toolkit.native"):
        assert native.kernels() is None
        assert native.kernels() is None  # remembered: not rebuilt, not re-warned
    assert len(calls) == 1
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    assert native.native_status() == {"available": False,
                                      "reason": "RuntimeError: no compiler here"}


def _eager_cdf(weights, u):
    cum = weights.cumsum(1, dtype=torch.float64)
    total = cum[:, -1:]
    t = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, t, right=True)


def _edge_case_draws(cols, draws):
    """Weights with leading / trailing / alternate zeros and a tiny row, uniforms at 0 and just
    below 1."""
    gen = torch.Generator().manual_seed(cols)
    w = torch.rand(6, cols, generator=gen) ** 3
    if cols > 2:
        w[0, :cols // 2] = 0.0  # leading zeros
        w[1, cols // 2:] = 0.0  # trailing zeros
        w[2, ::2] = 0.0  # alternate
    w[3] = 0.0
    w[3, -1] = 1e-30  # one tiny positive entry
    u = torch.rand(6, draws, generator=gen, dtype=torch.float64)
    u[:, 0] = 0.0
    u[:, -1] = torch.nextafter(torch.tensor(1.0, dtype=torch.float64),
                               torch.tensor(0.0, dtype=torch.float64))
    return w, u


@pytest.mark.parametrize("cols,draws", [(1, 5), (7, 3), (4096, 1024), (300, 13)])
def test_cdf_draw_equals_eager_searchsorted(kernel, cols, draws):
    """The native inverse-CDF draws equal cumsum + searchsorted on the same uniforms."""
    w, u = _edge_case_draws(cols, draws)
    got = kernel.cdf_draw(w, u)
    assert torch.equal(got, _eager_cdf(w, u))
    assert bool((w.gather(1, got) > 0).all())  # never a zero-weight entry


@pytest.mark.parametrize("cols,draws", [(1, 5), (7, 3), (300, 13)])
def test_eager_cdf_draw_never_draws_a_zero_weight(fresh_native, monkeypatch, cols, draws):
    from xmc_toolkit.sampling.midx import _inverse_cdf_draw

    monkeypatch.setenv(native.NATIVE_ENV, "0")
    w, u = _edge_case_draws(cols, draws)
    got = _inverse_cdf_draw(w, u)
    assert torch.equal(got, _eager_cdf(w, u))
    assert bool((w.gather(1, got) > 0).all())


def test_midx_cells_follow_the_weights_with_and_without_native(fresh_native, monkeypatch):
    """``_inverse_cdf_rows``: the same draws through the kernel and the eager path (same
    generator), and their frequencies match the weights (a chi-square-sized tolerance)."""
    from xmc_toolkit.sampling.midx import _inverse_cdf_rows

    w = torch.rand(4, 50, generator=torch.Generator().manual_seed(3)) ** 2
    w[:, ::7] = 0.0
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    eager = _inverse_cdf_rows(w, 40_000, torch.Generator().manual_seed(9))
    native._reset_for_tests()
    monkeypatch.delenv(native.NATIVE_ENV)
    if native.kernels() is not None:
        fast = _inverse_cdf_rows(w, 40_000, torch.Generator().manual_seed(9))
        assert torch.equal(fast, eager)
    freq = torch.zeros_like(w).scatter_add_(1, eager, torch.ones_like(eager, dtype=w.dtype))
    p = w / w.sum(1, keepdim=True)
    sd = (p * (1 - p) / 40_000).sqrt()
    assert bool(((freq / 40_000 - p).abs() <= 5 * sd + 1e-12).all())
    assert bool((freq[:, ::7] == 0).all())


def test_bag_rows_equals_embedding_bag(kernel):
    torch.manual_seed(0)
    B, M, d = 9, 11, 24
    ids = torch.randint(0, 30, (B * M,))
    srt, perm = torch.sort(ids)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[1:] = srt[1:] != srt[:-1]
    starts = new.nonzero().squeeze(1)
    q, gs = torch.randn(B, d), torch.randn(B * M)
    out = torch.full((starts.numel(), d), float("nan"))
    kernel.bag_rows_(out, q, perm, gs, starts, M)
    ref = torch.nn.functional.embedding_bag(torch.div(perm, M, rounding_mode="floor"), q, starts,
                                            mode="sum", per_sample_weights=gs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.bag_rows_(out, q, perm + B * M, gs, starts, M)


def test_score_gradient_accumulates_across_backward_passes(kernel):
    """The reused gradient workspace is never handed out while a gradient still holds it: two
    backward passes without zero_grad sum their gradients, and a step after zero_grad(set_to_none)
    gives the gradient of that step alone."""
    from xmc_toolkit.output_layer import LabelTable

    torch.manual_seed(0)
    table = LabelTable(200, 16)
    q = torch.randn(8, 16, requires_grad=True)
    ids = [torch.randint(0, 200, (8, 30)) for _ in range(3)]
    w = torch.randn(8, 30)

    def grad_of(*batches):
        table.zero_grad(set_to_none=True)
        for i in batches:
            (table.score_ids(q, ids[i]) * w).sum().backward()
        return table.weight.weight.grad.to_dense().clone()

    g0, g1, g2 = grad_of(0), grad_of(1), grad_of(2)
    torch.testing.assert_close(grad_of(0, 1), g0 + g1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(2, 0, 1), g2 + g0 + g1, rtol=1e-5, atol=1e-6)
    dense = table.weight.weight.detach().clone().requires_grad_(True)
    ref = ((dense[ids[1]] * q.detach()[:, None, :]).sum(-1) * w).sum()  # [8, 30] scores
    ref.backward()
    torch.testing.assert_close(grad_of(1), dense.grad, rtol=1e-5, atol=1e-6)


def test_native_step_bumps_the_version_counter(kernel):
    """A tensor saved for a backward before the step is stale after it: autograd must say so,
    as it does after the eager in-place update."""
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = RowAdam(emb.parameters(), lr=0.1)
    ids = torch.tensor([1, 2, 3])
    (emb(ids) ** 2).sum().backward()
    stale = (emb.weight * emb.weight).sum()  # saves weight for its backward
    before = emb.weight._version
    opt.step()
    assert emb.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_first_build_is_announced_at_warning_level(fresh_native, monkeypatch, caplog, tmp_path):
    """A user at the default log level learns why the first step pauses (the compile), and a
    cached build is only an INFO line."""
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    monkeypatch.setattr(native, "_is_built", lambda ext, name: False)
    monkeypatch.setattr(native.shutil, "which", lambda exe: f"/usr/bin/{exe}")  # any machine

    def fake_load(**kwargs):
        return object()

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    with caplog.at_level(logging.INFO, logger="xmc_toolkit.native"):
        assert native.kernels() is not None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "compiling" in warned[0].getMessage()
    native._reset_for_tests()
    caplog.clear()
    monkeypatch.setattr(native, "_is_built", lambda ext, name: True)
    with caplog.at_level(logging.INFO, logger="xmc_toolkit.native"):
        assert native.kernels() is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("rows,d,cells", [(1, 1, 1), (37, 13, 5), (70_000, 128, 64), (5, 8, 0)])
def test_project_rows_equals_eager(kernel, rows, d, cells):
    """project_rows: fingerprints x . r to float rounding of a float64 product, and the same
    bits for a row whatever the batch of rows it comes in (the change detection compares
    them); per-cell sums against index_add in float64; two threads give the same
    fingerprints."""
    g = torch.Generator().manual_seed(rows + d)
    x = torch.randn(rows, d, generator=g)
    r = torch.randn(d, generator=g)
    cell = torch.randint(0, max(cells, 1), (rows,), generator=g)
    fp, sums, _ = kernel.project_rows(x, r, cell, cells, torch.empty(0))
    ref = (x.double() @ r.double()).float()
    torch.testing.assert_close(fp, ref, rtol=1e-5, atol=1e-5 * d)
    assert sums.shape == (cells, d)
    if cells:
        want = torch.zeros(cells, d, dtype=torch.float64).index_add_(0, cell, x.double())
        torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-4)
    sub = torch.arange(0, rows, 3)
    fp_sub = kernel.project_rows(x[sub].contiguous(), r, cell[sub], 0, torch.empty(0))[0]
    assert torch.equal(fp_sub, fp[sub])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fp2, sums2, _ = kernel.project_rows(x, r, cell, cells, torch.empty(0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fp2, fp)
    if cells:
        torch.testing.assert_close(sums2, sums, rtol=1e-5, atol=1e-4)


def test_project_rows_refuses_bad_cells(kernel):
    x, r = torch.randn(4, 3), torch.randn(3)
    with pytest.raises(RuntimeError, match="outside"):
        kernel.project_rows(x, r, torch.tensor([0, 1, 5, 0]), 4, torch.empty(0))
    with pytest.raises(RuntimeError, match="int64"):
        kernel.project_rows(x, r, torch.zeros(3, dtype=torch.int64), 4, torch.empty(0))
    with pytest.raises(RuntimeError, match="since"):
        kernel.project_rows(x, r, torch.zeros(4, dtype=torch.int64), 4, torch.zeros(3))


@pytest.mark.parametrize("k", [1, 3, 8, 9, 16, 64, 65])
def test_row_argmin_equals_torch_min(kernel, k):
    """row_argmin = torch.min(dim=1).indices: ties to the first index, the first NaN wins,
    infinities, widths below, at and off the vector width."""
    g = torch.Generator().manual_seed(k)
    d = torch.randn(400, k, generator=g)
    d[1] = d[1, 0]  # all tied
    d[2, k // 2] = float("nan")
    d[3, -1] = float("nan")
    d[4] = float("inf")
    d[5, -1] = float("-inf")
    d[6, ::2] = float("nan")
    d[7] = d[7].round()  # many ties
    d[8, 0] = float("inf")
    assert torch.equal(kernel.row_argmin(d), d.min(1).indices)


def test_assign_nearest_same_with_and_without_native(fresh_native, monkeypatch):
    from xmc_toolkit.codebook import assign_nearest

    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(3000, 7, generator=g), torch.randn(33, 7, generator=g)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    a_eager, d_eager = assign_nearest(x, c, chunk_size=1000)
    native._reset_for_tests()
    monkeypatch.delenv(native.NATIVE_ENV)
    if native.kernels() is None:
        pytest.skip("native kernels unavailable")
    a, dist = assign_nearest(x, c, chunk_size=1000)
    assert torch.equal(a, a_eager) and torch.equal(dist, d_eager)
    a2, none = assign_nearest(x, c, 1000, False)
    assert torch.equal(a2, a) and none is None


@pytest.mark.parametrize("threads", [1, 2])
def test_project_rows_lists_the_changed_rows(kernel, threads):
    """With the previous fingerprints: the ascending ids of the rows whose fingerprint differs
    (a NaN row included), across thread blocks."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(140_000, 12, generator=g)
    r = torch.randn(12, generator=g)
    none = torch.empty(0, dtype=torch.int64)
    fp0 = kernel.project_rows(x, r, none, 0, torch.empty(0))[0]
    rows = torch.randperm(x.shape[0], generator=g)[:5000].sort().values
    x2 = x.clone()
    x2[rows] += torch.randn(5000, 12, generator=g)
    x2[rows[0], 3] = float("nan")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fp, _, changed = kernel.project_rows(x2, r, none, 0, fp0)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(changed, (fp != fp0).nonzero().flatten())
    assert torch.equal(changed, rows)
