"""ONE contract suite run against every sampler (implicit-style).

Every sampler must: normalize (exp(log_prob) over all ids sums to 1, per query and shared),
return ids/log_q of the documented shapes, dtypes and device, return log_q equal to log_prob of
its own ids, draw with empirical frequencies matching exp(log_q), be deterministic given a
generator, round-trip through state_dict, never modify its inputs, and reject bad input with
SamplerError.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.errors import SamplerError
from xmc_toolkit.sampling import Sampler, make_sampler

L, D, B, K = 48, 6, 3, 4


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, D, generator=g)
    w = centers[torch.arange(L) % 6] + 0.3 * torch.randn(L, D, generator=g)  # [L, D]
    bias = 0.5 * torch.randn(L, generator=g)
    queries = torch.randn(B, D, generator=g)
    counts = torch.randint(0, 50, (L,), generator=g).float()
    return w, bias, queries, counts


FACTORIES: dict[str, Callable[[torch.Tensor], Sampler]] = {
    "uniform": lambda c: make_sampler("uniform", L),
    "popularity": lambda c: make_sampler("popularity", L, c, alpha=0.75),
    "log-uniform": lambda c: make_sampler("log-uniform", L),
    "midx-pq": lambda c: make_sampler("midx-pq", L, num_codewords=K, seed=0),
    "midx-rq": lambda c: make_sampler("midx-rq", L, num_codewords=K, seed=0),
    "midx-pq-pop": lambda c: make_sampler("midx", L, c, num_codewords=K, within_cell="popularity", seed=0),
    "midx-rq-exact": lambda c: make_sampler("midx-rq", L, num_codewords=K, within_cell="exact", seed=0),
    "midx-pq-bias": lambda c: make_sampler("midx-pq", L, num_codewords=K, seed=0),
    "midx-rq-pop-bias": lambda c: make_sampler(
        "midx-rq", L, c, num_codewords=K, within_cell="popularity", seed=0
    ),
}


@pytest.fixture(params=sorted(FACTORIES))
def built(request: pytest.FixtureRequest) -> tuple[str, Sampler, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    name = request.param
    w, bias, queries, counts = _problem()
    sampler = FACTORIES[name](counts)
    use_bias = bias if "bias" in name else None
    with torch.no_grad():
        sampler.update(w, use_bias)
    return name, sampler, w, use_bias, queries


def _all_ids() -> torch.Tensor:
    return torch.arange(L).expand(B, -1)


def test_log_prob_normalized(built):
    _, s, _, _, q = built
    lp = s.log_prob(q, _all_ids())
    assert lp.shape == (B, L) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double().exp().sum(1), torch.ones(B, dtype=torch.float64), atol=1e-5, rtol=0)
    mix = s.log_prob(q, torch.arange(L), shared=True)
    assert mix.shape == (L,)
    assert abs(float(mix.double().exp().sum()) - 1.0) < 1e-5
    # shared ids given as [B, M] keep their shape
    assert s.log_prob(q, _all_ids(), shared=True).shape == (B, L)
    # 1-D ids in per-query mode are scored under every query
    torch.testing.assert_close(s.log_prob(q, torch.arange(L)), lp)


def test_shared_is_batch_mixture(built):
    _, s, _, _, q = built
    lp = s.log_prob(q, _all_ids()).double()
    mix = s.log_prob(q, torch.arange(L), shared=True).double()
    torch.testing.assert_close(mix, torch.logsumexp(lp, 0) - torch.log(torch.tensor(float(B))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_sample_shapes_and_log_q(built, shared):
    _, s, _, _, q = built
    out = s.sample(q, 37, shared=shared, generator=torch.Generator().manual_seed(3))
    shape = (37,) if shared else (B, 37)
    assert out.ids.shape == shape and out.log_q.shape == shape
    assert out.ids.dtype == torch.int64 and out.log_q.dtype == torch.float32
    assert out.ids.device == q.device and out.log_q.device == q.device
    assert int(out.ids.min()) >= 0 and int(out.ids.max()) < L
    assert torch.isfinite(out.log_q).all()
    torch.testing.assert_close(out.log_q, s.log_prob(q, out.ids, shared=shared), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_empirical_frequencies(built, shared):
    """10^5 draws per distribution: total variation to exp(log_prob) within sampling noise."""
    _, s, _, _, q = built
    n = 100_000
    out = s.sample(q, n, shared=shared, generator=torch.Generator().manual_seed(11))
    if shared:
        emp = torch.bincount(out.ids, minlength=L).double() / n
        exp = s.log_prob(q, torch.arange(L), shared=True).double().exp()
        tv = 0.5 * (emp - exp).abs().sum()
        assert tv < 0.015, tv
    else:
        exp = s.log_prob(q, _all_ids()).double().exp()
        for b in range(B):
            emp = torch.bincount(out.ids[b], minlength=L).double() / n
            tv = 0.5 * (emp - exp[b]).abs().sum()
            # E[TV] ~ 0.4 sqrt(L / n) ~ 0.009 for L = 48; 0.015 is > 5 standard deviations
            assert tv < 0.015, (b, tv)


def test_deterministic_with_generator(built):
    _, s, _, _, q = built
    a = s.sample(q, 50, generator=torch.Generator().manual_seed(5))
    b = s.sample(q, 50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q)


def test_never_modifies_inputs(built):
    name, s, w, bias, q = built
    w0, q0 = w.clone(), q.clone()
    b0 = None if bias is None else bias.clone()
    ids = torch.randint(0, L, (B, 9))
    ids0 = ids.clone()
    s.update(w, bias)
    s.sample(q, 20)
    s.sample(q, 20, shared=True)
    s.log_prob(q, ids)
    s.log_prob(q, ids, shared=True)
    assert torch.equal(w, w0) and torch.equal(q, q0) and torch.equal(ids, ids0)
    if bias is not None:
        assert torch.equal(bias, b0)


def test_state_dict_round_trip(built):
    name, s, w, bias, q = built
    state = s.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    _, _, _, counts = _problem()
    fresh = FACTORIES[name](counts)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    torch.testing.assert_close(fresh.log_prob(q, _all_ids()), s.log_prob(q, _all_ids()))
    torch.testing.assert_close(
        fresh.log_prob(q, torch.arange(L), shared=True), s.log_prob(q, torch.arange(L), shared=True)
    )
    a = s.sample(q, 64, generator=torch.Generator().manual_seed(1))
    b = fresh.sample(q, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.ids, b.ids)


def test_requires_grad_inputs_give_no_graph(built):
    _, s, _, _, q = built
    qg = q.clone().requires_grad_(True)
    out = s.sample(qg, 5)
    assert not out.log_q.requires_grad
    assert not s.log_prob(qg, out.ids).requires_grad


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_samples(built, bad):
    _, s, _, _, q = built
    with pytest.raises(SamplerError, match="num_samples"):
        s.sample(q, bad)


def test_bad_ids(built):
    _, s, _, _, q = built
    with pytest.raises(SamplerError, match="out of range"):
        s.log_prob(q, torch.tensor([[0, L]] * B))
    with pytest.raises(SamplerError, match="out of range"):
        s.log_prob(q, torch.tensor([-1, 2]), shared=True)
    with pytest.raises(SamplerError, match="rows"):
        s.log_prob(q, torch.zeros(B + 1, 2, dtype=torch.long))
    with pytest.raises(SamplerError, match="integer"):
        s.log_prob(q, torch.zeros(B, 2))


def test_bad_queries(built):
    _, s, w, _, q = built
    with pytest.raises(SamplerError, match="2-D"):
        s.sample(q[0], 3)
    with pytest.raises(SamplerError, match="generator"):
        _raise_gen_mismatch(s, q)


def _raise_gen_mismatch(s: Sampler, q: torch.Tensor) -> None:
    """A generator on another device type must be rejected with the fix."""
    if torch.cuda.is_available():
        s.sample(q, 3, generator=torch.Generator(device="cuda"))
    else:  # no second device on this machine: check the check directly
        from xmc_toolkit.sampling.base import _check_generator

        _check_generator(torch.Generator(), torch.device("cuda"))


def test_bad_embeddings(built):
    name, s, w, _, _ = built
    with pytest.raises(SamplerError, match="rows"):
        s.update(w[:-1])
    bad = w.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(SamplerError, match="NaN"):
        s.update(bad)
    with pytest.raises(SamplerError, match="bias"):
        s.update(w, torch.zeros(L + 1))


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(FACTORIES)),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.01, 20.0),
)
def test_normalized_for_random_problems(name, seed, scale):
    w, bias, q, counts = _problem(seed)
    s = FACTORIES[name](counts)
    s.update(w * scale, bias * scale if "bias" in name else None)
    lp = s.log_prob(q * scale, _all_ids()).double()
    assert torch.isfinite(lp).all()
    assert torch.allclose(lp.exp().sum(1), torch.ones(B, dtype=torch.float64), atol=1e-5)
    mix = s.log_prob(q * scale, torch.arange(L), shared=True).double()
    assert abs(float(mix.exp().sum()) - 1) < 1e-5
