"""Optional ANN backends (hnswlib, faiss): exact against the chunked scan at full effort, the
bias folded in, exact re-ranking; skipped where the libraries are not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmc_toolkit.ann import ANN_BACKENDS, available_backends, build_ann_index, mips_to_l2
from xmc_toolkit.errors import ConfigError
from xmc_toolkit.output_layer import chunked_topk, recall_at_k_vs_exact


def _table(L=600, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(20, d, generator=g)
    w = centers[torch.randint(20, (L,), generator=g)] + 0.3 * torch.randn(L, d, generator=g)
    w = w * (0.5 + torch.rand(L, 1, generator=g))  # unequal norms: MIPS != cosine
    return w, 2.0 * torch.randn(L, generator=g), torch.randn(40, d, generator=g)


def test_mips_to_l2_orders_like_inner_products():
    w, b, q = _table()
    from xmc_toolkit.export import augment_queries, fold_bias

    v, r = mips_to_l2(fold_bias(w, b))
    assert np.allclose(np.linalg.norm(v, axis=1), r, rtol=1e-5)
    qa = np.concatenate([augment_queries(q), np.zeros((q.shape[0], 1), np.float32)], 1)
    d2 = ((qa[:, None, :] - v[None]) ** 2).sum(-1)  # [B, L]
    s = (q @ w.t() + b).numpy()
    # |q'' - v'|^2 = |q'|^2 + R^2 - 2 s: ordering by distance is ordering by score
    want = (qa ** 2).sum(1, keepdims=True) + r * r - 2 * s
    np.testing.assert_allclose(d2, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ANN_BACKENDS)
def test_backend_exact_at_full_effort_and_rescored(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed (pip install 'xmc-toolkit[ann]')")
    w, b, q = _table()
    params = {"ef": 600} if backend == "hnsw" else {"nlist": 8, "nprobe": 8}
    index = build_ann_index(w, b, backend, **params)
    scores, ids = index.search(q, 5)
    ref_s, ref_i = chunked_topk(q, w, b, 5, chunk_size=97)
    assert recall_at_k_vs_exact(ids, ref_i) == 1.0
    torch.testing.assert_close(scores, ref_s, atol=1e-4, rtol=1e-5)
    # the returned scores are the model's own (re-ranked), bias included
    torch.testing.assert_close(scores, (w[ids] * q.unsqueeze(1)).sum(-1) + b[ids], atol=1e-4, rtol=1e-5)
    # low effort still returns k valid, distinct, sorted results
    lo = 1 if backend == "faiss-ivf" else 5
    s2, i2 = index.search(q, 5, effort=lo)
    assert (i2 >= 0).all() and (s2[:, :-1] >= s2[:, 1:]).all()
    assert all(len(set(r.tolist())) == 5 for r in i2)
    assert backend in index.describe()


def test_errors():
    w, b, q = _table(L=50)
    with pytest.raises(ConfigError, match="unknown ANN backend"):
        build_ann_index(w, b, "annoy")
    if not available_backends():
        with pytest.raises(ConfigError, match="pip install"):
            build_ann_index(w, b, "auto")
        return
    index = build_ann_index(w, None, "auto")
    with pytest.raises(ConfigError, match="k="):
        index.search(q, 51)
    with pytest.raises(ConfigError, match="queries"):
        index.search(q[:, :3], 2)


def test_predict_approx_reports_backend_and_measured_recall(tmp_path):
    """``xmc predict --approx``: the ANN backend when installed, else MIDX; the recall is the
    measured overlap with the exact top-k, and an exhaustive MIDX probe says so."""
    from click.testing import CliRunner

    from cli.main import xmc
    from xmc_toolkit.data import write_synthetic

    data = tmp_path / "d.txt"
    write_synthetic(data, 300, 400, 200, seed=0)
    run = tmp_path / "m"
    runner = CliRunner()
    r = runner.invoke(xmc, ["train", "--data", str(data), "--out", str(run), "--epochs", "1",
                            "--loss", "full", "--dim", "16", "--hidden", "32", "--no-progress"])
    assert r.exit_code == 0, r.output
    base = ["predict", "--model", str(run), "--data", str(data), "--topk", "5", "--out",
            str(tmp_path / "p.txt"), "--approx"]
    r = runner.invoke(xmc, [*base, "--approx-backend", "midx", "--num-cells", "4"])
    assert r.exit_code == 0, r.output
    assert "(midx) recall vs exact" in r.output and "4 of" in r.output
    assert "measured on 400 rows" in r.output and "exhaustive" not in r.output
    r = runner.invoke(xmc, [*base, "--approx-backend", "midx", "--num-cells", "100000"])
    assert "exhaustive, exact search" in r.output and "1.0000" in r.output
    if not available_backends():
        return
    r = runner.invoke(xmc, [*base])  # auto: an ANN library is installed here
    assert r.exit_code == 0, r.output
    assert f"({available_backends()[0]}) recall vs exact" in r.output
    assert "built in" in r.output and "measured on 400 rows" in r.output
    r = runner.invoke(xmc, [*base, "--approx-backend", "hnsw", "--approx-effort", "5"])
    if "hnsw" in available_backends():
        assert r.exit_code == 0 and "effort 5" in r.output, r.output
