"""Samplers against brute-force enumeration (xmc_toolkit.sampling._reference), edge cases,
errors, the index attributes, the factory and proposal diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xmc_toolkit.sampling.midx as midx_module
from xmc_toolkit.errors import CheckpointError, ConfigError, SamplerError
from xmc_toolkit.sampling import (
    LogUniformSampler,
    MIDXSampler,
    PopularitySampler,
    UniformSampler,
    make_sampler,
    proposal_divergence,
)
from xmc_toolkit.sampling._reference import (
    reference_exact_log_prob,
    reference_item_log_weight,
    reference_log_uniform_log_prob,
    reference_midx_log_prob,
    reference_mixture_log_prob,
    reference_popularity_log_prob,
    reference_uniform_log_prob,
)


def _clustered(num_labels: int, dim: int, clusters: int, seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(clusters, dim, generator=g)
    w = centers[torch.randint(clusters, (num_labels,), generator=g)]
    w = w + spread * torch.randn(num_labels, dim, generator=g)  # [L, d]
    return w, g


# ---------------------------------------------------------------------------------------------
# static samplers vs references
# ---------------------------------------------------------------------------------------------
def test_static_match_references():
    q = torch.randn(2, 3)
    ids = torch.arange(30)
    torch.testing.assert_close(
        UniformSampler(30).log_prob(q, ids, shared=True).double(), reference_uniform_log_prob(30)
    )
    torch.testing.assert_close(
        LogUniformSampler(30).log_prob(q, ids)[1].double(),
        reference_log_uniform_log_prob(30),
        atol=1e-6,
        rtol=1e-6,
    )
    counts = [0, 1, 5, 100] * 7 + [0, 3]
    for alpha, smooth in [(0.75, 1.0), (1.0, 0.5), (0.0, 1.0)]:
        s = PopularitySampler(counts, alpha=alpha, smoothing=smooth)
        torch.testing.assert_close(
            s.log_prob(q, ids)[0].double(),
            reference_popularity_log_prob(counts, alpha, smooth),
            atol=1e-6,
            rtol=1e-6,
        )


def test_popularity_zero_counts_without_smoothing_are_never_drawn():
    counts = [0, 4, 0, 9, 0]
    s = PopularitySampler(counts, alpha=1.0, smoothing=0.0)
    out = s.sample(torch.zeros(4, 2), 20_000, generator=torch.Generator().manual_seed(0))
    assert set(out.ids.unique().tolist()) <= {1, 3}
    assert torch.isfinite(out.log_q).all()
    with pytest.raises(ConfigError, match="smoothing"):
        PopularitySampler([0, 0], smoothing=0.0)


def test_log_uniform_inverse_cdf_frequencies():
    s = LogUniformSampler(10)
    out = s.sample(torch.zeros(1, 2), 200_000, shared=True, generator=torch.Generator().manual_seed(0))
    emp = torch.bincount(out.ids, minlength=10).double() / 200_000
    assert 0.5 * (emp - reference_log_uniform_log_prob(10).exp()).abs().sum() < 0.01


# ---------------------------------------------------------------------------------------------
# MIDX vs brute force: every quantizer x within-cell mode x bias
# ---------------------------------------------------------------------------------------------
CASES = [
    (quant, wc, use_bias)
    for quant in ("pq", "rq")
    for wc in ("uniform", "popularity", "exact")
    for use_bias in (False, True)
]


@pytest.mark.parametrize("quantizer,within_cell,use_bias", CASES)
@pytest.mark.parametrize("num_labels,k", [(40, 3), (10, 5)])  # (10, 5): K^2 = 25 > L, empty cells
def test_midx_log_prob_matches_brute_force(quantizer, within_cell, use_bias, num_labels, k):
    w, g = _clustered(num_labels, 5, 4, seed=num_labels + k)
    bias = torch.randn(num_labels, generator=g) if use_bias else None
    counts = torch.randint(0, 20, (num_labels,), generator=g).float()
    q = torch.randn(3, 5, generator=g)
    s = MIDXSampler(
        num_labels, k, quantizer=quantizer, within_cell=within_cell, label_counts=counts,
        alpha=0.6, seed=1,
    )
    s.update(w, bias)
    ids = torch.arange(num_labels)
    got = s.log_prob(q, ids).double()  # [B, L]
    if within_cell == "exact":
        ref = reference_exact_log_prob(q, w, bias)
    else:
        lw = reference_item_log_weight(
            num_labels, within_cell, counts.tolist(), 0.6, 1.0, None if bias is None else bias.tolist()
        )
        ref = reference_midx_log_prob(q, s.codebooks, s.codes, quantizer, lw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert abs(float(got.exp().sum(1).max()) - 1) < 1e-5
    mix = s.log_prob(q, ids, shared=True).double()
    torch.testing.assert_close(mix, reference_mixture_log_prob(ref), atol=1e-4, rtol=1e-5)
    if k * k > num_labels:
        assert (s.cell_counts == 0).any()  # the case really has empty cells



@pytest.mark.parametrize("quantizer,within_cell,use_bias", [c for c in CASES if c[1] != "exact"])
def test_per_query_sample_log_q_from_cells_equals_codes_lookup(quantizer, within_cell, use_bias,
                                                              monkeypatch):
    """The per-query draw takes the items' codes from the drawn cells instead of codes[ids]:
    bit-identical log q, and the brute-force reference at the drawn ids (empty cells too)."""
    w, g = _clustered(10, 5, 4, seed=7)
    bias = torch.randn(10, generator=g) if use_bias else None
    counts = torch.randint(0, 20, (10,), generator=g).float()
    s = MIDXSampler(10, 5, quantizer=quantizer, within_cell=within_cell, label_counts=counts,
                    alpha=0.6, seed=1)
    s.update(w, bias)
    q = torch.randn(4, 5, generator=g)
    calls = []
    orig = MIDXSampler._item_log_q
    monkeypatch.setattr(MIDXSampler, "_item_log_q",
                        staticmethod(lambda *a, **kw: calls.append((a, kw)) or orig(*a, **kw)))
    smp = s.sample(q, 200, generator=torch.Generator().manual_seed(0))
    (args, kw), = calls
    assert kw["cells"] is not None
    assert torch.equal(smp.log_q, orig(*args))  # the codes[ids] lookup: the same numbers
    lw = reference_item_log_weight(10, within_cell, counts.tolist(), 0.6, 1.0,
                                   None if bias is None else bias.tolist())
    ref = reference_midx_log_prob(q, s.codebooks, s.codes, quantizer, lw)  # [B, L]
    torch.testing.assert_close(smp.log_q.double(), ref.gather(1, smp.ids), atol=1e-4, rtol=1e-5)

def test_exact_within_cell_equals_log_softmax_of_true_scores():
    w, g = _clustered(120, 8, 5, seed=3)
    bias = torch.randn(120, generator=g)
    q = 2.0 * torch.randn(4, 8, generator=g)
    for quant in ("pq", "rq"):
        s = MIDXSampler(120, 6, quantizer=quant, within_cell="exact", seed=0)
        s.update(w, bias)
        got = s.log_prob(q, torch.arange(120))
        torch.testing.assert_close(got, torch.log_softmax(q @ w.t() + bias, 1), atol=2e-5, rtol=1e-5)


def test_midx_frequencies_with_empty_cells_and_bias():
    """Empirical check where K^2 > L and weights come from bias and popularity."""
    w, g = _clustered(12, 4, 3, seed=7)
    bias = torch.randn(12, generator=g)
    s = MIDXSampler(12, 4, within_cell="popularity", label_counts=list(range(12)), seed=0)
    s.update(w, bias)
    assert (s.cell_counts == 0).any()
    q = torch.randn(2, 4, generator=g)
    out = s.sample(q, 200_000, generator=torch.Generator().manual_seed(2))
    exp = s.log_prob(q, torch.arange(12)).double().exp()
    for b in range(2):
        emp = torch.bincount(out.ids[b], minlength=12).double() / 200_000
        assert 0.5 * (emp - exp[b]).abs().sum() < 0.006


def test_single_label():
    s = MIDXSampler(1, 1, quantizer="rq", seed=0)
    s.update(torch.randn(1, 3))
    out = s.sample(torch.randn(2, 3), 5)
    assert out.ids.eq(0).all()
    torch.testing.assert_close(out.log_q, torch.zeros(2, 5))
    pq = MIDXSampler(1, 1, seed=0)
    pq.update(torch.randn(1, 3), torch.tensor([2.0]))
    torch.testing.assert_close(pq.sample(torch.randn(1, 3), 4, shared=True).log_q, torch.zeros(4))


@pytest.fixture(params=["dense", "closed-form"])
def normalizer_path(request, monkeypatch):
    """Run a test with the dense log Z and again with the closed form (forced by a tiny limit)."""
    if request.param == "closed-form":
        monkeypatch.setattr(midx_module, "_DENSE_CHUNK", 1)
    return request.param


@pytest.mark.parametrize("quantizer,within_cell,use_bias", [("pq", "uniform", False), ("rq", "popularity", True)])
def test_closed_form_normalizer_matches_brute_force(normalizer_path, quantizer, within_cell, use_bias):
    w, g = _clustered(10, 4, 3, seed=1)  # K^2 = 16 > L = 10: empty cells
    bias = torch.randn(10, generator=g) if use_bias else None
    counts = torch.arange(10.0)
    q = torch.randn(3, 4, generator=g)
    s = MIDXSampler(10, 4, quantizer=quantizer, within_cell=within_cell, label_counts=counts, seed=0)
    s.update(w, bias)
    lw = reference_item_log_weight(10, within_cell, counts.tolist(), 0.75, 1.0, None if bias is None else bias.tolist())
    ref = reference_midx_log_prob(q, s.codebooks, s.codes, quantizer, lw)
    torch.testing.assert_close(s.log_prob(q, torch.arange(10)).double(), ref, atol=1e-4, rtol=1e-5)
    out = s.sample(q, 50)
    torch.testing.assert_close(out.log_q, s.log_prob(q, out.ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 40, 1 << 22])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_branch_free_path_matches_cpu_path(monkeypatch, chunk, scale):
    """The path taken off the CPU (dense, row-chunked, no data-dependent branch) gives the
    CPU path's log q, per query and shared, also where the closed form underflows."""
    w, g = _clustered(30, 4, 3, seed=5)
    s = MIDXSampler(30, 5, seed=0)
    s.update(w * scale, torch.randn(30, generator=g) * (40 if scale > 1 else 1))
    q = torch.randn(7, 4, generator=g) * scale
    ids = torch.arange(30)
    monkeypatch.setattr(midx_module, "_DENSE_CHUNK", 1)  # CPU: the closed form (+ fallback)
    cpu = (s.log_prob(q, ids), s.log_prob(q, ids, shared=True))
    monkeypatch.setattr(midx_module, "_DENSE_CHUNK", chunk)
    monkeypatch.setattr(midx_module, "_branch_free", lambda device: True)
    free = (s.log_prob(q, ids), s.log_prob(q, ids, shared=True))
    for a, b in zip(cpu, free):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert abs(float(free[1].double().exp().sum()) - 1) < 1e-5
    out = s.sample(q, 50, shared=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.log_q, free[1][out.ids])


def test_extreme_scores_no_nan(normalizer_path):
    """Huge query norms and biases: log q stays finite and normalized (max shifting, and the
    dense fallback when the closed form underflows)."""
    w, g = _clustered(30, 4, 3, seed=5)
    s = MIDXSampler(30, 5, seed=0)
    s.update(w * 50, torch.randn(30, generator=g) * 40)
    q = torch.randn(3, 4, generator=g) * 50
    lp = s.log_prob(q, torch.arange(30)).double()
    assert not torch.isnan(lp).any()
    assert abs(float(lp.exp().sum(1).max()) - 1) < 1e-5
    out = s.sample(q, 100)
    assert torch.isfinite(out.log_q).all()
    out = s.sample(q, 100, shared=True)
    assert torch.isfinite(out.log_q).all()


@settings(max_examples=10, deadline=None)
@given(
    num_labels=st.integers(2, 30),
    k=st.integers(1, 6),
    quantizer=st.sampled_from(["pq", "rq"]),
    within_cell=st.sampled_from(["uniform", "popularity"]),
    seed=st.integers(0, 1000),
)
def test_midx_matches_reference_property(num_labels, k, quantizer, within_cell, seed):
    k = min(k, num_labels)
    w, g = _clustered(num_labels, 4, 3, seed=seed)
    counts = torch.randint(0, 9, (num_labels,), generator=g).float()
    s = MIDXSampler(num_labels, k, quantizer=quantizer, within_cell=within_cell, label_counts=counts, seed=seed)
    s.update(w)
    q = torch.randn(2, 4, generator=g)
    lw = reference_item_log_weight(num_labels, within_cell, counts.tolist(), 0.75, 1.0)
    ref = reference_midx_log_prob(q, s.codebooks, s.codes, quantizer, lw)
    torch.testing.assert_close(s.log_prob(q, torch.arange(num_labels)).double(), ref, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# index attributes, warm start, checkpoints
# ---------------------------------------------------------------------------------------------
def test_index_attributes_and_cell_logits():
    w, g = _clustered(50, 6, 4, seed=1)
    s = MIDXSampler(50, 4, seed=0)
    s.update(w)
    c1, c2 = s.codebooks
    assert c1.shape == (4, 3) and c2.shape == (4, 3)
    assert s.codes.shape == (50, 2) and s.codes.dtype == torch.int64
    assert s.cell_indptr.shape == (17,) and s.cell_indptr.dtype == torch.int64
    assert s.cell_items.dtype == torch.int64 and sorted(s.cell_items.tolist()) == list(range(50))
    cell = s.codes[:, 0] * 4 + s.codes[:, 1]
    for c in range(16):  # brute force CSR check
        members = s.cell_items[s.cell_indptr[c] : s.cell_indptr[c + 1]].tolist()
        assert sorted(members) == sorted(torch.nonzero(cell == c).flatten().tolist())
    q = torch.randn(3, 6, generator=g)
    cl = s.cell_logits(q)
    assert cl.shape == (3, 16)
    for b in range(3):
        for k1 in range(4):
            for k2 in range(4):
                c = k1 * 4 + k2
                if int(s.cell_counts[c]) == 0:
                    assert cl[b, c] == -math.inf
                else:
                    ref = float(q[b, :3] @ c1[k1] + q[b, 3:] @ c2[k2])
                    assert abs(float(cl[b, c]) - ref) < 1e-5


def test_odd_dimension_split():
    w, _ = _clustered(30, 7, 3, seed=2)
    s = MIDXSampler(30, 3, seed=0)
    s.update(w)
    assert s.codebooks[0].shape == (3, 3) and s.codebooks[1].shape == (3, 4)
    with pytest.raises(ConfigError, match="rq"):
        MIDXSampler(30, 3).update(torch.randn(30, 1))


def test_warm_start_update():
    w, g = _clustered(200, 8, 6, seed=4)
    s = MIDXSampler(200, 6, seed=0, kmeans_iters=30, warm_start_iters=2)
    s.update(w)
    first = tuple(c.clone() for c in s.codebooks)
    w2 = w + 0.01 * torch.randn(200, 8, generator=g)
    s.update(w2)
    # warm start from the previous codebooks: a small change of W moves the codewords little
    for a, b in zip(first, s.codebooks):
        assert (a - b).norm() < 0.2 * a.norm()
    lp = s.log_prob(torch.randn(2, 8), torch.arange(200)).double()
    assert abs(float(lp.exp().sum(1).max()) - 1) < 1e-5


def test_state_dict_hparam_mismatch():
    w, _ = _clustered(40, 4, 3, seed=0)
    s = MIDXSampler(40, 4, seed=0)
    s.update(w)
    state = s.state_dict()
    with pytest.raises(CheckpointError, match="num_codewords"):
        MIDXSampler(40, 3).load_state_dict(state)
    with pytest.raises(CheckpointError, match="missing"):
        MIDXSampler(40, 4).load_state_dict({k: v for k, v in state.items() if k != "codes"})
    with pytest.raises(CheckpointError, match="unexpected"):
        MIDXSampler(40, 4).load_state_dict({**state, "junk": torch.zeros(1)})
    # an unbuilt sampler round-trips too, and still refuses to sample
    empty = MIDXSampler(40, 4, seed=0)
    other = MIDXSampler(40, 4)
    other.load_state_dict(empty.state_dict())
    with pytest.raises(SamplerError, match="update"):
        other.sample(torch.randn(1, 4), 2)


def test_update_after_load_warm_starts():
    w, _ = _clustered(40, 4, 3, seed=0)
    s = MIDXSampler(40, 4, seed=0)
    s.update(w)
    t = MIDXSampler(40, 4, seed=0)
    t.load_state_dict(s.state_dict())
    s.update(w)
    t.update(w)
    torch.testing.assert_close(s.codebooks[0], t.codebooks[0])


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="num-codewords"):
        MIDXSampler(10, 11)
    with pytest.raises(ConfigError, match="label_counts"):
        MIDXSampler(10, 2, within_cell="popularity")
    with pytest.raises(ConfigError) as exc:
        MIDXSampler(10, 2, quantizer="xq", within_cell="nope", alpha=-1)
    assert len(exc.value.problems) == 3
    with pytest.raises(ConfigError, match="entries"):
        MIDXSampler(10, 2, within_cell="popularity", label_counts=[1, 2])


def test_sample_before_update_and_dim_mismatch():
    s = MIDXSampler(20, 2)
    with pytest.raises(SamplerError, match="update"):
        s.sample(torch.randn(2, 4), 3)
    with pytest.raises(SamplerError, match="update"):
        s.log_prob(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long))
    s.update(torch.randn(20, 4))
    with pytest.raises(SamplerError, match="dimension 5"):
        s.sample(torch.randn(2, 5), 3)
    with pytest.raises(SamplerError, match="2-D"):
        s.update(torch.randn(20))


def test_factory():
    assert isinstance(make_sampler("uniform", 5), UniformSampler)
    assert isinstance(make_sampler("log_uniform", 5), LogUniformSampler)
    assert isinstance(make_sampler("popularity", 3, [1, 2, 3]), PopularitySampler)
    assert make_sampler("midx", 9, num_codewords=3, quantizer="rq").quantizer == "rq"
    assert make_sampler("midx-rq", 9, num_codewords=3).quantizer == "rq"
    assert make_sampler("MIDX-PQ", 9, num_codewords=3).quantizer == "pq"
    with pytest.raises(ConfigError, match="choose one of"):
        make_sampler("fancy", 5)
    with pytest.raises(ConfigError, match="label_counts"):
        make_sampler("popularity", 5)
    with pytest.raises(ConfigError, match="entries"):
        make_sampler("popularity", 5, [1, 2])
    with pytest.raises(ConfigError, match="bad option"):
        make_sampler("uniform", 5, alpha=0.5)
    with pytest.raises(ConfigError, match="quantizer"):
        make_sampler("midx-pq", 9, quantizer="rq")


# ---------------------------------------------------------------------------------------------
# diagnostics: KL and ESS
# ---------------------------------------------------------------------------------------------
def test_proposal_divergence_brute_force():
    w, g = _clustered(60, 6, 4, seed=9)
    bias = torch.randn(60, generator=g)
    q = torch.randn(5, 6, generator=g)
    s = PopularitySampler(torch.arange(60.0))
    kl, ess = proposal_divergence(s, q, w, bias)
    p = reference_exact_log_prob(q, w, bias).exp()
    lq = s.log_prob(q, torch.arange(60)).double()
    ref_kl = (p * (p.log() - lq)).sum(1)
    ref_ess = 1.0 / (p * p / lq.exp()).sum(1)
    torch.testing.assert_close(kl.double(), ref_kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ess.double(), ref_ess, atol=1e-5, rtol=1e-4)
    exact = MIDXSampler(60, 4, within_cell="exact", seed=0)
    exact.update(w, bias)
    kl0, ess0 = proposal_divergence(exact, q, w, bias, max_elements=120)  # 2 queries per chunk
    assert kl0.abs().max() < 1e-4 and (ess0 - 1).abs().max() < 1e-4


def test_midx_closer_to_softmax_than_static_on_clustered_embeddings():
    w, g = _clustered(1000, 16, 30, seed=0, spread=0.3)
    q = w[torch.randint(1000, (32,), generator=g)] + 0.3 * torch.randn(32, 16, generator=g)
    counts = torch.randint(0, 100, (1000,), generator=g)
    kls = {}
    for name, kw in [
        ("uniform", {}),
        ("popularity", {}),
        ("midx-pq", {"num_codewords": 16, "seed": 0}),
        ("midx-rq", {"num_codewords": 16, "seed": 0}),
    ]:
        s = make_sampler(name, 1000, counts, **kw)
        s.update(w)
        kl, ess = proposal_divergence(s, q, w)
        kls[name] = float(kl.mean())
    for m in ("midx-pq", "midx-rq"):
        assert kls[m] < 0.5 * kls["uniform"], kls
        assert kls[m] < 0.5 * kls["popularity"], kls


def _read_xc(path: Path) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Minimal Extreme Classification text reader (labels, then f:v pairs), for this test."""
    with open(path) as fh:
        n, d, l = (int(t) for t in fh.readline().split())
        xr, xc, xv, yr, yc = [], [], [], [], []
        for i, line in enumerate(fh):
            labs, _, feats = line.rstrip("\n").partition(" ")
            for t in filter(None, labs.split(",")):
                yr.append(i)
                yc.append(int(t))
            for t in feats.split():
                f, v = t.split(":")
                xr.append(i)
                xc.append(int(f))
                xv.append(float(v))
    x = sp.csr_matrix((xv, (xr, xc)), shape=(n, d), dtype=np.float32)
    y = sp.csr_matrix((np.ones(len(yr), np.float32), (yr, yc)), shape=(n, l))
    return x, y


@pytest.mark.slow
def test_midx_closer_on_bibtex_centroid_embeddings(bibtex_train):
    """Real-ish label embeddings: label = mean SVD embedding of its training points."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    x, y = _read_xc(bibtex_train)
    z = TruncatedSVD(32, random_state=0).fit_transform(TfidfTransformer().fit_transform(x))
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    counts = np.asarray(y.sum(0)).ravel()
    lab = (y.T @ z) / np.maximum(counts[:, None], 1)  # [L, 32]
    lab = lab / np.maximum(np.linalg.norm(lab, axis=1, keepdims=True), 1e-12)
    w = torch.tensor(8.0 * lab, dtype=torch.float32)
    q = torch.tensor(z[:256], dtype=torch.float32)
    num_labels = w.shape[0]
    kls = {}
    for name, kw in [("uniform", {}), ("popularity", {}), ("midx-pq", {"num_codewords": 8, "seed": 0}),
                     ("midx-rq", {"num_codewords": 8, "seed": 0})]:
        s = make_sampler(name, num_labels, counts, **kw)
        s.update(w)
        kls[name] = float(proposal_divergence(s, q, w)[0].mean())
    for m in ("midx-pq", "midx-rq"):
        assert kls[m] < kls["uniform"] and kls[m] < kls["popularity"], kls


# ---------------------------------------------------------------------------------------------
# CUDA (runs only where a GPU is present)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("within_cell", ["uniform", "popularity", "exact"])
def test_cuda_matches_cpu(within_cell):
    w, g = _clustered(300, 8, 5, seed=0)
    bias = torch.randn(300, generator=g)
    counts = torch.arange(300.0)
    q = torch.randn(4, 8, generator=g)
    cpu = MIDXSampler(300, 6, within_cell=within_cell, label_counts=counts, seed=0)
    cpu.update(w, bias)
    gpu = MIDXSampler(300, 6, within_cell=within_cell, label_counts=counts)
    gpu.load_state_dict(cpu.state_dict())
    gpu.update(w.cuda(), bias.cuda())  # warm start on CUDA from the CPU codebooks
    cpu.update(w, bias)
    qc = q.cuda()
    out = gpu.sample(qc, 1000, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.ids.is_cuda and out.log_q.is_cuda
    torch.testing.assert_close(out.log_q, gpu.log_prob(qc, out.ids), atol=1e-5, rtol=1e-5)
    lp = gpu.log_prob(qc, torch.arange(300, device="cuda")).double()
    assert abs(float(lp.exp().sum(1).max()) - 1) < 1e-5
    sh = gpu.sample(qc, 1000, shared=True)
    assert sh.ids.is_cuda
    # the CPU-built index answers CUDA queries too (moved once and cached), with the CPU's
    # numbers: per query, shared (the GPU takes the dense branch-free path), and sampled log q
    all_ids = torch.arange(300)
    lp2 = cpu.log_prob(qc, all_ids.cuda())
    assert lp2.is_cuda
    torch.testing.assert_close(lp2.cpu(), cpu.log_prob(q, all_ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu.log_prob(qc, all_ids.cuda(), shared=True).cpu(),
                               cpu.log_prob(q, all_ids, shared=True), atol=1e-5, rtol=1e-5)
    drawn = cpu.sample(qc, 1000, generator=torch.Generator(device="cuda").manual_seed(0))
    torch.testing.assert_close(drawn.log_q.cpu(), cpu.log_prob(q, drawn.ids.cpu()),
                               atol=1e-5, rtol=1e-5)
    # the GPU-built index from the same state gives the CPU's numbers too
    moved = MIDXSampler(300, 6, within_cell=within_cell, label_counts=counts)
    moved.load_state_dict({k: v.cuda() if k != "generator_state" else v
                           for k, v in cpu.state_dict().items()})
    torch.testing.assert_close(moved.log_prob(qc, all_ids.cuda()).cpu(),
                               cpu.log_prob(q, all_ids), atol=1e-5, rtol=1e-5)
    # and the GPU draws follow the CPU's proposal (total variation of 2e5 draws for query 0)
    many = moved.sample(qc[:1], 200_000, generator=torch.Generator(device="cuda").manual_seed(1))
    emp = torch.bincount(many.ids[0].cpu(), minlength=300).double() / 200_000
    assert 0.5 * float((emp - cpu.log_prob(q[:1], all_ids)[0].double().exp()).abs().sum()) < 0.01


def test_midx_shared_log_prob_after_a_draw_is_never_stale():
    """The batch mixture of a shared draw is reused by log_prob on the same queries: the same
    numbers as a fresh computation and the brute-force mixture; an in-place change of the
    queries, other queries of the same shape, or a new index are never served from the memo."""
    L, d = 60, 6
    g = torch.Generator().manual_seed(5)
    w = torch.randn(L, d, generator=g)
    s = MIDXSampler(L, 4, quantizer="pq", seed=0)
    s.update(w)
    ids = torch.arange(L)

    def brute(q):
        return reference_mixture_log_prob(
            reference_midx_log_prob(q, s.codebooks, s.codes, "pq", [0.0] * L))

    q = torch.randn(5, d, generator=g)
    fresh = s.log_prob(q, ids, shared=True)
    smp = s.sample(q, 9, shared=True)
    memo = s.log_prob(q, ids, shared=True)  # served by the memo of the draw
    assert s._mixture_memo is not None
    assert torch.equal(memo, fresh)
    torch.testing.assert_close(memo.double(), brute(q), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(smp.log_q, memo[smp.ids])
    q.mul_(-2.0)  # in place: the version counter changes
    torch.testing.assert_close(s.log_prob(q, ids, shared=True).double(), brute(q), atol=1e-4,
                               rtol=1e-5)
    s.sample(q, 9, shared=True)
    q2 = torch.randn(5, d, generator=g)  # another batch of the same shape
    torch.testing.assert_close(s.log_prob(q2, ids, shared=True).double(), brute(q2), atol=1e-4,
                               rtol=1e-5)
    s.sample(q2, 9, shared=True)
    s.update(w + 0.5 * torch.randn(L, d, generator=g), full=True)  # a new index
    torch.testing.assert_close(s.log_prob(q2, ids, shared=True).double(), brute(q2), atol=1e-4,
                               rtol=1e-5)
