"""Tests of xmc_toolkit.batching: parity with dense references, determinism, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.batching import (
    BatchIterator,
    csr_to_bag,
    csr_to_padded,
    fit_idf,
    l2_normalize_rows,
    tfidf_transform,
)
from xmc_toolkit.errors import ConfigError, DataFormatError


def _random_csr(rng: np.random.Generator, n: int, m: int, density: float) -> sp.csr_matrix:
    A = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32)
    A.data += 0.5
    return A


@st.composite
def csr_matrices(draw: st.DrawFn) -> sp.csr_matrix:
    n = draw(st.integers(0, 12))
    m = draw(st.integers(1, 15))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return _random_csr(np.random.default_rng(seed), n, m, density)


@settings(max_examples=40, deadline=None)
@given(csr_matrices())
def test_csr_to_bag_matches_dense(X: sp.csr_matrix) -> None:
    idx, off, w = csr_to_bag(X)
    assert idx.dtype == torch.int64 and off.dtype == torch.int64 and w.dtype == torch.float32
    assert off.shape == (X.shape[0],)
    # EmbeddingBag with an identity table reproduces the dense rows.
    bag = torch.nn.EmbeddingBag(X.shape[1], X.shape[1], mode="sum")
    with torch.no_grad():
        bag.weight.copy_(torch.eye(X.shape[1]))
        out = bag(idx, off, per_sample_weights=w)
    np.testing.assert_allclose(out.numpy(), X.toarray(), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(csr_matrices())
def test_csr_to_padded_matches_rows(Y: sp.csr_matrix) -> None:
    ids, mask = csr_to_padded(Y)
    counts = np.diff(Y.indptr)
    assert ids.shape == mask.shape == (Y.shape[0], max(1, int(counts.max()) if len(counts) else 1))
    for r in range(Y.shape[0]):  # slow reference: one row at a time
        expect = Y.indices[Y.indptr[r] : Y.indptr[r + 1]]
        got = ids[r][mask[r]].numpy()
        np.testing.assert_array_equal(got, expect)
        assert not mask[r, len(expect) :].any()
    assert (ids[~mask] == 0).all()


def test_padded_empty_rows_and_empty_batch() -> None:
    Y = sp.csr_matrix((3, 5), dtype=np.float32)
    ids, mask = csr_to_padded(Y)
    assert ids.shape == (3, 1) and not mask.any()
    ids, mask = csr_to_padded(sp.csr_matrix((0, 5), dtype=np.float32))
    assert ids.shape == (0, 1)


def test_tfidf_and_normalize_match_sklearn() -> None:
    from sklearn.feature_extraction.text import TfidfTransformer

    rng = np.random.default_rng(0)
    X = _random_csr(rng, 30, 12, 0.3)
    X = sp.vstack([X, sp.csr_matrix((2, 12), dtype=np.float32)]).tocsr()  # empty last rows
    X_before = X.copy()
    idf = fit_idf(X)
    Z = l2_normalize_rows(tfidf_transform(X, idf))
    ref = TfidfTransformer(norm="l2", smooth_idf=True, sublinear_tf=False).fit(X)
    np.testing.assert_allclose(idf, ref.idf_, rtol=1e-5)
    np.testing.assert_allclose(Z.toarray(), ref.transform(X).toarray(), rtol=1e-5, atol=1e-6)
    assert Z.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), X_before.toarray())  # input untouched


def test_tfidf_wrong_width() -> None:
    X = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(DataFormatError, match="3 feature columns"):
        tfidf_transform(X, np.ones(4))


def test_l2_rows_unit_norm() -> None:
    X = _random_csr(np.random.default_rng(3), 20, 7, 0.5)
    Z = l2_normalize_rows(X).toarray()
    norms = np.linalg.norm(Z, axis=1)
    nonempty = np.diff(X.indptr) > 0
    np.testing.assert_allclose(norms[nonempty], 1.0, rtol=1e-5)
    assert (norms[~nonempty] == 0).all()


def _collect(it: BatchIterator) -> list[np.ndarray]:
    return [b.rows.numpy().copy() for b in it]


def test_iterator_covers_every_row_once_and_is_deterministic(tiny_xy) -> None:
    X, Y = tiny_xy
    it = BatchIterator(X, Y, batch_size=7, shuffle=True, seed=3)
    assert len(it) == 9
    e0 = _collect(it)
    e1 = _collect(it)
    assert it.epoch == 2
    np.testing.assert_array_equal(np.sort(np.concatenate(e0)), np.arange(60))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))  # reshuffled
    again = BatchIterator(X, Y, batch_size=7, shuffle=True, seed=3)
    np.testing.assert_array_equal(np.concatenate(_collect(again)), np.concatenate(e0))
    other = BatchIterator(X, Y, batch_size=7, shuffle=True, seed=4)
    assert not np.array_equal(np.concatenate(_collect(other)), np.concatenate(e0))


def test_iterator_batch_contents(tiny_xy) -> None:
    X, Y = tiny_xy
    it = BatchIterator(X, Y, batch_size=16, shuffle=True, seed=0)
    for b in it:
        rows = b.rows.numpy()
        idx, off, w = csr_to_bag(X[rows])
        assert torch.equal(b.indices, idx) and torch.equal(b.offsets, off)
        assert torch.equal(b.weights, w)
        ids, mask = csr_to_padded(Y[rows])
        assert torch.equal(b.pos_ids, ids) and torch.equal(b.pos_mask, mask)


def test_iterator_exact_resume(tiny_xy) -> None:
    X, Y = tiny_xy
    full = BatchIterator(X, Y, batch_size=8, seed=11)
    reference = [b.rows.numpy().copy() for _ in range(2) for b in full]
    it = BatchIterator(X, Y, batch_size=8, seed=11)
    seen = []
    for b in it:  # stop in the middle of epoch 1
        seen.append(b.rows.numpy().copy())
    for i, b in enumerate(it):
        seen.append(b.rows.numpy().copy())
        if i == 2:
            state = it.state_dict()
            break
    resumed = BatchIterator(X, Y, batch_size=8, seed=None)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == {"seed": 11, "epoch": 1, "batch_index": 3}
    seen += [b.rows.numpy().copy() for b in resumed]
    assert len(seen) == len(reference)
    for a, r in zip(seen, reference):
        np.testing.assert_array_equal(a, r)


def test_iterator_no_shuffle_drop_last_no_labels(tiny_xy) -> None:
    X, _ = tiny_xy
    it = BatchIterator(X, None, batch_size=25, shuffle=False, drop_last=True)
    batches = list(it)
    assert len(batches) == len(it) == 2
    np.testing.assert_array_equal(batches[0].rows.numpy(), np.arange(25))
    assert batches[0].pos_ids is None and batches[0].pos_mask is None


def test_iterator_seed_from_generator(tiny_xy) -> None:
    X, Y = tiny_xy
    a = BatchIterator(X, Y, 8, seed=None, generator=torch.Generator().manual_seed(5))
    b = BatchIterator(X, Y, 8, seed=None, generator=torch.Generator().manual_seed(5))
    assert a.seed == b.seed


def test_iterator_errors(tiny_xy) -> None:
    X, Y = tiny_xy
    with pytest.raises(ConfigError, match="batch-size"):
        BatchIterator(X, Y, batch_size=0)
    with pytest.raises(DataFormatError, match="same points"):
        BatchIterator(X, Y[:10], batch_size=4)
    it = BatchIterator(X, Y, batch_size=4)
    with pytest.raises(ConfigError, match="out of range"):
        it.load_state_dict({"seed": 0, "epoch": 0, "batch_index": 99})
    with pytest.raises(DataFormatError, match="scipy.sparse"):
        csr_to_bag(np.ones((2, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_iterator_cuda(tiny_xy) -> None:
    X, Y = tiny_xy
    b = next(iter(BatchIterator(X, Y, 8, device="cuda")))
    assert b.indices.is_cuda and b.pos_ids.is_cuda and b.pos_mask.is_cuda
