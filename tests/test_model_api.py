"""XMCModel: fit / predict_topk / encode / label_embeddings / evaluate / save / load parity,
and the exact chunked top-k against a dense brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import make_tiny_problem  # tests/ is on sys.path (rootdir conftest)

from xmc_toolkit import XMCModel
from xmc_toolkit.errors import CheckpointError, ConfigError, XMCError
from xmc_toolkit.metrics import evaluate as evaluate_metrics

FAST = dict(epochs=20, batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=5,
            dropout=0.0, ks=(1, 3), device="cpu", ensemble=1)


@pytest.fixture(scope="module")
def fitted():
    """The tiny_xy problem of conftest (module-scoped copy) and a model fitted on it."""
    X, Y = make_tiny_problem(60)
    model = XMCModel(**FAST).fit(X, Y, X_val=X, Y_val=Y)
    return model, X, Y


def test_fit_predict_encode_shapes(fitted):
    model, X, Y = fitted
    ids, scores = model.predict_topk(X, k=3)
    assert ids.shape == (60, 3) and ids.dtype == np.int64
    assert scores.shape == (60, 3) and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    q = model.encode(X)
    W = model.label_embeddings()
    b = model.label_bias()
    assert q.shape == (60, 16) and W.shape == (6, 16) and b.shape == (6,)
    # exact top-k equals the dense brute-force scores q W^T + b
    dense = q @ W.T + b  # [N, L]
    ref = np.argsort(-dense, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(dense, ref, 1), rtol=1e-5, atol=1e-5)


def test_evaluate_matches_metrics_and_beats_popularity(fitted):
    model, X, Y = fitted
    res = model.evaluate(X, Y, ks=(1, 3))
    ids, _ = model.predict_topk(X, k=3)
    ref = evaluate_metrics(Y, ids, (1, 3), model.fitted.inv_prop())
    for key in ("P@1", "P@3", "nDCG@3", "PSP@1", "R@3"):
        assert res[key] == pytest.approx(ref[key])
    pop = np.asarray(Y.sum(0)).ravel().max() / Y.shape[0]
    assert res["P@1"] > pop + 0.2


def test_save_load_parity(fitted, tmp_path):
    model, X, _ = fitted
    model.save(tmp_path / "m")
    loaded = XMCModel.load(tmp_path / "m", device="cpu")
    a_ids, a_sc = model.predict_topk(X, k=3)
    b_ids, b_sc = loaded.predict_topk(X, k=3)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_sc, b_sc)
    np.testing.assert_array_equal(model.encode(X), loaded.encode(X))


def test_chunked_scoring_equals_single_chunk(fitted):
    model, X, _ = fitted
    a = model.predict_topk(X, k=3, chunk_size=2)
    b = model.predict_topk(X, k=3, chunk_size=65536)
    np.testing.assert_array_equal(a[0], b[0])


def test_approx_topk_with_all_cells_is_exact(tiny_xy):
    X, Y = tiny_xy
    model = XMCModel(**{**FAST, "loss": "sampled", "sampler": "midx", "negatives": 3,
                        "epochs": 5}).fit(X, Y)
    from xmc_toolkit.evaluate import build_index, predict_topk

    K = build_index(model.fitted).num_codewords
    exact, _ = model.predict_topk(X, k=3)
    approx, _ = predict_topk(model.fitted, X, 3, approx=True, num_cells=K * K)
    np.testing.assert_array_equal(approx, exact)


def test_errors(fitted, tmp_path):
    model, X, Y = fitted
    with pytest.raises(XMCError, match="feature columns"):
        model.predict_topk(X[:, :10], k=3)
    with pytest.raises(XMCError, match="not fitted"):
        XMCModel().predict_topk(X, k=1)
    with pytest.raises(ConfigError, match="sampler"):
        XMCModel(sampler="nope")
    with pytest.raises(CheckpointError, match="not a model directory"):
        XMCModel.load(tmp_path / "nothing")
    with pytest.raises(XMCError, match="scipy.sparse"):
        model.predict_topk([[1, 2]], k=1)


def test_fit_accepts_torch_free_inputs_and_no_validation(tiny_xy):
    X, Y = tiny_xy
    model = XMCModel(**{**FAST, "epochs": 2}).fit(X.toarray(), Y)
    assert model.result is not None and model.result.best == {}
    assert torch.is_tensor(model.fitted.network.label_weight)
