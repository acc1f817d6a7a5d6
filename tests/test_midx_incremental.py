"""Incremental MIDX refreshes: only changed rows are reassigned, the CSR index is merged, the
codewords take one Lloyd step -- and the proposal stays exact (brute-force enumeration)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.codebook import codewords_from_cells, reconstruct
from xmc_toolkit.errors import CheckpointError, ConfigError, SamplerError
from xmc_toolkit.sampling import MIDXSampler
from xmc_toolkit.sampling._reference import (
    reference_exact_log_prob,
    reference_item_log_weight,
    reference_midx_log_prob,
    reference_mixture_log_prob,
    reference_nearest_codes,
)
from xmc_toolkit.sampling.midx import cell_sums, merge_cells


def _clustered(num_labels: int, dim: int, clusters: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(clusters, dim, generator=g)
    w = centers[torch.randint(clusters, (num_labels,), generator=g)]
    return w + 0.3 * torch.randn(num_labels, dim, generator=g), g


def _train_like(w: torch.Tensor, g: torch.Generator, frac: float, scale: float = 0.5):
    """A copy of ``w`` where a random ``frac`` of the rows moved (what a sparse step does)."""
    w = w.clone()
    rows = torch.randperm(w.shape[0], generator=g)[: max(1, int(frac * w.shape[0]))]
    w[rows] += scale * torch.randn(rows.numel(), w.shape[1], generator=g)
    return w, rows


# ---------------------------------------------------------------------------------------------
# pure kernels against slow references
# ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), cells=st.integers(1, 30), frac=st.floats(0, 1), seed=st.integers(0, 9999))
def test_merge_cells_equals_stable_argsort(n, cells, frac, seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randint(cells, (n,), generator=g)
    items = torch.argsort(old, stable=True)
    moved = torch.randperm(n, generator=g)[: int(frac * n)]
    new = old.clone()
    new[moved] = torch.randint(cells, (moved.numel(),), generator=g)
    moved = moved[new[moved] != old[moved]]  # the contract: only rows whose cell changed
    ref_counts = torch.bincount(new, minlength=cells)
    from unittest import mock

    import xmc_toolkit.sampling.midx as midx_module

    for eager in (False, True):  # the native merge (when it builds) and the eager one
        with mock.patch.object(midx_module, "kernels_for",
                               (lambda *a, **kw: None) if eager else midx_module.kernels_for):
            indptr, got = merge_cells(items, new, moved, cells)
        torch.testing.assert_close(got, torch.argsort(new, stable=True), rtol=0, atol=0)
        torch.testing.assert_close(indptr[1:] - indptr[:-1], ref_counts, rtol=0, atol=0)


def test_cell_sums_and_codewords_match_loops():
    g = torch.Generator().manual_seed(0)
    k, n, d = 3, 50, 6
    x = torch.randn(n, d, generator=g)
    codes = torch.randint(k, (n, 2), generator=g)
    codes[:, 0] = codes[:, 0].clamp_max(1)  # codeword 2 of the first codebook stays empty
    cell = codes[:, 0] * k + codes[:, 1]
    counts = torch.bincount(cell, minlength=k * k)
    indptr = torch.zeros(k * k + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    sums = cell_sums(indptr, torch.argsort(cell, stable=True), x)
    for c in range(k * k):
        torch.testing.assert_close(sums[c], x[cell == c].sum(0), atol=1e-5, rtol=1e-5)
    for quant, books in (("pq", (torch.randn(k, 3), torch.randn(k, 3))),
                         ("rq", (torch.randn(k, d), torch.randn(k, d)))):
        c1, c2 = codewords_from_cells(sums, counts, books, quant)
        for j in range(k):
            sel1, sel2 = codes[:, 0] == j, codes[:, 1] == j
            if quant == "pq":
                want1 = x[sel1, :3].mean(0) if sel1.any() else books[0][j]
                want2 = x[sel2, 3:].mean(0) if sel2.any() else books[1][j]
            else:
                want1 = x[sel1].mean(0) if sel1.any() else books[0][j]
                if sel2.any():  # mean residual under the new first codebook (loop over rows)
                    want2 = torch.stack([x[i] - c1[codes[i, 0]] for i in range(n) if sel2[i]]).mean(0)
                else:
                    want2 = books[1][j]
            torch.testing.assert_close(c1[j], want1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c2[j], want2, atol=1e-5, rtol=1e-5)
        assert torch.equal(c1[2], books[0][2])  # empty codeword kept


# ---------------------------------------------------------------------------------------------
# the sampler after incremental updates: exact against brute force
# ---------------------------------------------------------------------------------------------
CASES = [(q, wc, b) for q in ("pq", "rq") for wc in ("uniform", "popularity", "exact")
         for b in (False, True)]


@pytest.mark.parametrize("quantizer,within_cell,use_bias", CASES)
def test_incremental_updates_stay_exact(quantizer, within_cell, use_bias):
    L, d, k = 60, 6, 4
    w, g = _clustered(L, d, 5, seed=11)
    counts = torch.randint(0, 20, (L,), generator=g).float()
    s = MIDXSampler(L, k, quantizer=quantizer, within_cell=within_cell, label_counts=counts,
                    alpha=0.6, seed=1, max_incremental_fraction=0.3)
    bias = torch.randn(L, generator=g) if use_bias else None
    s.update(w, bias)
    assert s.last_refresh["kind"] == "full"
    moved_total = 0
    for _ in range(4):
        books_before = tuple(c.clone() for c in s.codebooks)
        codes_before = s.codes.clone()
        w, rows = _train_like(w, g, 0.2, scale=1.5)
        if use_bias:
            bias = bias + 0.3 * torch.randn(L, generator=g)
        s.update(w, bias)
        assert s.last_refresh["kind"] == "incremental"
        assert s.last_refresh["changed"] == rows.numel()
        moved_total += s.last_refresh["moved"]
        # changed rows: nearest codes under the codebooks before the update; others unchanged
        changed = torch.zeros(L, dtype=torch.bool)
        changed[rows] = True
        ref = reference_nearest_codes(w[rows], books_before, quantizer)
        if quantizer == "pq":  # compare distances (ties), first and second half
            for h, (cb, sl) in enumerate(((books_before[0], slice(0, 3)), (books_before[1], slice(3, 6)))):
                dg = (w[rows, sl] - cb[s.codes[rows, h]]).pow(2).sum(1)
                dr = (w[rows, sl] - cb[ref[:, h]]).pow(2).sum(1)
                torch.testing.assert_close(dg, dr, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(s.codes[rows, 0], ref[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(s.codes[~changed], codes_before[~changed], rtol=0, atol=0)
        # the index is the one a full rebuild from these codes would make
        cell = s.codes[:, 0] * k + s.codes[:, 1]
        torch.testing.assert_close(s.cell_items, torch.argsort(cell, stable=True), rtol=0, atol=0)
        # log q against brute-force enumeration of the quantized softmax
        q = torch.randn(3, d, generator=g)
        ids = torch.arange(L)
        got = s.log_prob(q, ids).double()
        if within_cell == "exact":
            refq = reference_exact_log_prob(q, w, bias)
        else:
            lw = reference_item_log_weight(L, within_cell, counts.tolist(), 0.6, 1.0,
                                           None if bias is None else bias.tolist())
            refq = reference_midx_log_prob(q, s.codebooks, s.codes, quantizer, lw)
        torch.testing.assert_close(got, refq, atol=1e-4, rtol=1e-5)
        mix = s.log_prob(q, ids, shared=True).double()
        torch.testing.assert_close(mix, reference_mixture_log_prob(refq), atol=1e-4, rtol=1e-5)
        smp = s.sample(q, 7)
        torch.testing.assert_close(smp.log_q.double(), got.gather(1, smp.ids), atol=1e-4, rtol=1e-5)
    assert moved_total > 0  # rows really changed cell: the merge was exercised


def test_draws_follow_log_q_after_incremental_update():
    """The draws come from the index that log q describes (empirical frequencies)."""
    L, d = 30, 4
    w, g = _clustered(L, d, 3, seed=5)
    bias = torch.randn(L, generator=g)
    s = MIDXSampler(L, 3, within_cell="popularity", label_counts=list(range(L)), seed=0)
    s.update(w, bias)
    w2, _ = _train_like(w, g, 0.2, scale=3.0)
    s.update(w2, bias + 0.5)
    assert s.last_refresh["kind"] == "incremental" and s.last_refresh["moved"] > 0
    q = torch.randn(2, d, generator=g)
    exp = s.log_prob(q, torch.arange(L)).double().exp()
    out = s.sample(q, 200_000, generator=torch.Generator().manual_seed(3))
    for b in range(2):
        emp = torch.bincount(out.ids[b], minlength=L).double() / 200_000
        assert 0.5 * (emp - exp[b]).abs().sum() < 0.008
    shared = s.sample(q, 200_000, shared=True, generator=torch.Generator().manual_seed(4))
    mix = s.log_prob(q, torch.arange(L), shared=True).double().exp()
    emp = torch.bincount(shared.ids, minlength=L).double() / 200_000
    assert 0.5 * (emp - mix).abs().sum() < 0.008


@pytest.fixture(params=["native", "eager"])
def table_pass(request, monkeypatch):
    """Both table passes of a refresh: the native fused one (when it builds) and the eager
    matrix-vector plus CSR products (``XMC_NATIVE=0``)."""
    from xmc_toolkit import native

    saved = dict(native._state)
    native._reset_for_tests()
    if request.param == "eager":
        monkeypatch.setenv(native.NATIVE_ENV, "0")
    elif native.kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.native_status()['reason']}")
    yield request.param
    native._state.clear()
    native._state.update(saved)


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_incremental_moves_codewords_toward_the_means(quantizer, table_pass):
    """After incremental refreshes the codewords are exactly the Lloyd M-step of the current
    codes over the current rows (the per-cell sums are taken under the old cells and corrected
    for the rows that moved: native and eager passes alike)."""
    L, d, k = 200, 8, 5
    w, g = _clustered(L, d, 5, seed=2)
    s = MIDXSampler(L, k, quantizer=quantizer, seed=0)
    s.update(w)
    w2 = w
    moved = 0
    for _ in range(3):
        w2, _ = _train_like(w2, g, 0.1, scale=1.0)
        s.update(w2)
        assert s.last_refresh["kind"] == "incremental"
        moved += s.last_refresh["moved"]
    assert moved > 0  # the correction of the sums was exercised
    # the codewords are the Lloyd M-step for the current codes: recompute by loops
    d1 = d // 2 if quantizer == "pq" else d
    part = w2[:, :d1] if quantizer == "pq" else w2
    c1 = torch.stack([part[s.codes[:, 0] == j].mean(0) for j in range(k)])
    torch.testing.assert_close(s.codebooks[0], c1, atol=1e-4, rtol=1e-4)
    if quantizer == "pq":
        c2 = torch.stack([w2[s.codes[:, 1] == j, d1:].mean(0) for j in range(k)])
    else:
        res = w2 - s.codebooks[0][s.codes[:, 0]]
        c2 = torch.stack([res[s.codes[:, 1] == j].mean(0) for j in range(k)])
    torch.testing.assert_close(s.codebooks[1], c2, atol=1e-4, rtol=1e-4)
    assert torch.equal(s._cell, s.codes[:, 0] * k + s.codes[:, 1])
    err = (w2 - reconstruct(s.codebooks, s.codes, quantizer)).pow(2).sum()
    assert torch.isfinite(err)


# ---------------------------------------------------------------------------------------------
# schedule, explicit rows, checkpoints
# ---------------------------------------------------------------------------------------------
def test_schedule_fraction_and_full_flag():
    L, d = 100, 4
    w, g = _clustered(L, d, 4, seed=0)
    s = MIDXSampler(L, 4, seed=0, recluster_every=3, max_incremental_fraction=0.5)
    kinds = []
    for _ in range(6):
        s.update(w)
        kinds.append(s.last_refresh["kind"])
        w, _ = _train_like(w, g, 0.1)
    assert kinds == ["full", "incremental", "incremental", "full", "incremental", "incremental"]
    s.update(w + 1.0)  # every row changed: more than the fraction -> full
    assert s.last_refresh["kind"] == "full"
    s.update(w + 1.0, full=True)
    assert s.last_refresh["kind"] == "full"
    s.update(w + 1.0)  # nothing changed: an incremental no-op
    assert s.last_refresh == {"kind": "incremental", "changed": 0, "moved": 0}
    always = MIDXSampler(L, 4, seed=0, recluster_every=1)
    always.update(w)
    always.update(w)
    assert always.last_refresh["kind"] == "full"
    with pytest.raises(ConfigError, match="recluster_every"):
        MIDXSampler(L, 4, recluster_every=0)
    with pytest.raises(ConfigError, match="max_incremental_fraction"):
        MIDXSampler(L, 4, max_incremental_fraction=1.5)


def test_explicit_rows_and_their_errors():
    L, d = 80, 4
    w, g = _clustered(L, d, 4, seed=1)
    s = MIDXSampler(L, 4, seed=0)
    s.update(w)
    w2, rows = _train_like(w, g, 0.1, scale=2.0)
    t = MIDXSampler(L, 4, seed=0)
    t.load_state_dict(s.state_dict())
    s.update(w2)  # detected
    t.update(w2, rows=rows)  # told
    assert t.last_refresh["changed"] == rows.numel() == s.last_refresh["changed"]
    torch.testing.assert_close(s.codes, t.codes, rtol=0, atol=0)
    torch.testing.assert_close(s.codebooks[0], t.codebooks[0])
    with pytest.raises(SamplerError, match="rows must lie"):
        t.update(w2, rows=torch.tensor([L]))


def test_state_dict_round_trip_resumes_incrementally():
    L, d = 90, 4
    w, g = _clustered(L, d, 4, seed=3)
    s = MIDXSampler(L, 4, seed=0, recluster_every=4)
    s.update(w)
    w, _ = _train_like(w, g, 0.1)
    s.update(w)
    t = MIDXSampler(L, 4, seed=0, recluster_every=4)
    t.load_state_dict(s.state_dict())
    for _ in range(3):  # incremental, incremental, then the scheduled full re-cluster
        w, _ = _train_like(w, g, 0.1)
        s.update(w)
        t.update(w)
        assert s.last_refresh == t.last_refresh
        torch.testing.assert_close(s.codes, t.codes, rtol=0, atol=0)
        for a, b in zip(s.codebooks, t.codebooks):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s.last_refresh["kind"] == "full"
    # a state from before incremental refreshes (no fingerprint) loads; its next update is full
    old = {k: v for k, v in s.state_dict().items() if k not in ("fingerprint", "updates_since_full")}
    u = MIDXSampler(L, 4, seed=0)
    u.load_state_dict(old)
    u.update(w)
    assert u.last_refresh["kind"] == "full"
    bad = {**s.state_dict(), "fingerprint": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="fingerprint"):
        MIDXSampler(L, 4).load_state_dict(bad)


def test_non_finite_rows_are_refused_on_every_path():
    L, d = 40, 4
    w, _ = _clustered(L, d, 3, seed=9)
    s = MIDXSampler(L, 3, seed=0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        wb = w.clone()
        wb[7, 2] = bad
        with pytest.raises(SamplerError, match="NaN or inf in 1 rows"):
            s.update(wb)  # not built yet: full path
    s.update(w)
    wb = w.clone()
    wb[3, 0] = float("inf")
    with pytest.raises(SamplerError, match="NaN or inf"):
        s.update(wb)  # built: incremental path
    with pytest.raises(SamplerError, match="NaN or inf"):
        s.update(wb, rows=torch.tensor([3]))
    big = torch.full((L, d), 3e38)  # finite entries whose sum overflows: accepted
    s.update(big, full=True)
    assert s.last_refresh["kind"] == "full"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_incremental_on_cuda_matches_cpu(quantizer):
    L, d = 500, 8
    w, g = _clustered(L, d, 6, seed=4)
    bias = torch.randn(L, generator=g)
    cpu = MIDXSampler(L, 6, quantizer=quantizer, seed=0)
    cpu.update(w, bias)
    gpu = MIDXSampler(L, 6, quantizer=quantizer, seed=0)
    gpu.load_state_dict({k: v.cuda() if k != "generator_state" else v
                         for k, v in cpu.state_dict().items()})
    w2, rows = _train_like(w, g, 0.1, scale=1.0)
    cpu.update(w2, bias)
    gpu.update(w2.cuda(), bias.cuda(), rows=rows.cuda())
    assert cpu.last_refresh["kind"] == gpu.last_refresh["kind"] == "incremental"
    assert gpu.cell_items.is_cuda
    cell = gpu.codes[:, 0] * 6 + gpu.codes[:, 1]
    assert torch.equal(gpu.cell_items, torch.argsort(cell, stable=True))
    q = torch.randn(4, d, generator=g)
    ids = torch.arange(L)
    lp = gpu.log_prob(q.cuda(), ids.cuda()).double().cpu()
    ref = reference_midx_log_prob(q, tuple(c.cpu() for c in gpu.codebooks), gpu.codes.cpu(),
                                  quantizer, bias.tolist())
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-5)
    same = (cpu.codes == gpu.codes.cpu()).all(1).float().mean()
    assert same > 0.99  # float differences may flip a near-tie


@pytest.mark.parametrize("quantizer,within_cell,use_bias", [
    ("pq", "uniform", False), ("rq", "popularity", True), ("pq", "exact", True)])
def test_native_and_eager_refresh_build_the_same_index(quantizer, within_cell, use_bias,
                                                       monkeypatch):
    """One incremental refresh through the native table pass / merge / argmin and through the
    eager path (``XMC_NATIVE=0``), from the same full build: the same changed rows, codes and
    CSR bit for bit, codewords and log q to float rounding."""
    from xmc_toolkit import native

    if native.kernels() is None:
        pytest.skip("native kernels unavailable")
    L, d, k = 3000, 8, 6
    w, g = _clustered(L, d, 7, seed=11)
    counts = torch.randint(0, 50, (L,), generator=g).double()
    bias = 0.3 * torch.randn(L, generator=g) if use_bias else None
    w2, _ = _train_like(w, g, 0.2, scale=0.8)
    built = []
    saved = dict(native._state)
    try:
        for env in (None, "0"):
            native._reset_for_tests()
            if env is None:
                monkeypatch.delenv(native.NATIVE_ENV, raising=False)
            else:
                monkeypatch.setenv(native.NATIVE_ENV, env)
            s = MIDXSampler(L, k, quantizer=quantizer, within_cell=within_cell,
                            label_counts=counts if within_cell == "popularity" else None, seed=3)
            s.update(w, bias)
            s.update(w2, bias)
            assert s.last_refresh["kind"] == "incremental"
            built.append(s)
    finally:
        native._state.clear()
        native._state.update(saved)
    a, b = built
    assert a.last_refresh == b.last_refresh
    assert torch.equal(a.codes, b.codes) and torch.equal(a.cell_items, b.cell_items)
    assert torch.equal(a.cell_indptr, b.cell_indptr)
    for ca, cb in zip(a.codebooks, b.codebooks):
        torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-5)
    q = torch.randn(4, d, generator=g)
    torch.testing.assert_close(a.log_prob(q, torch.arange(L)), b.log_prob(q, torch.arange(L)),
                               rtol=1e-4, atol=1e-4)
