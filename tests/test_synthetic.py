"""Tests of the synthetic data generator (xmc_toolkit.data.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.data.synthetic import (
    BLOCK_SIZE,
    SyntheticConfig,
    build_model,
    generate_rows,
    make_synthetic,
    write_synthetic,
)
from xmc_toolkit.errors import ConfigError

L, N, D = 300, 3000, 4000


@pytest.fixture(scope="module")
def train():
    return make_synthetic(L, N, D, seed=3)


@pytest.fixture(scope="module")
def test_split():
    return make_synthetic(L, 1500, D, seed=3, split="test")


def _assert_same(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


def test_shapes_and_invariants(train):
    X, Y = train.X, train.Y
    assert X.shape == (N, D) and Y.shape == (N, L)
    assert X.dtype == np.float32 and Y.dtype == np.float32
    assert X.has_sorted_indices and Y.has_sorted_indices
    for M in (X, Y):
        M2 = M.copy()
        M2.sum_duplicates()
        assert M2.nnz == M.nnz  # no duplicates
    assert np.all(Y.data == 1.0)
    assert np.all(np.diff(Y.indptr) >= 1)  # every point has a label
    assert np.all(X.data > 0)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # rows L2-normalised
    avg = Y.nnz / N
    assert 3.0 < avg <= 5.5  # about avg_labels=5 distinct labels
    assert 10 < X.nnz / N < 100  # sparse


def test_deterministic_per_seed(train):
    again = make_synthetic(L, N, D, seed=3)
    _assert_same(train.X, again.X)
    _assert_same(train.Y, again.Y)
    other = make_synthetic(L, N, D, seed=4)
    assert (other.Y != train.Y).nnz > 0


def test_prefix_independent_of_num_points(train):
    small = make_synthetic(L, 100, D, seed=3)
    _assert_same(small.X, train.X[:100])
    _assert_same(small.Y, train.Y[:100])


@settings(max_examples=8, deadline=None)
@given(
    start=st.integers(0, 2 * BLOCK_SIZE + 50),
    length=st.integers(0, BLOCK_SIZE + 100),
)
def test_any_range_equals_slice_of_whole(start, length):
    model = build_model(SyntheticConfig(num_labels=50, num_features=200, seed=9))
    stop = start + length
    X, Y = generate_rows(model, start, stop)
    Xall, Yall = generate_rows(model, 0, stop)
    _assert_same(X, Xall[start:stop])
    _assert_same(Y, Yall[start:stop])


def test_train_and_test_differ_but_share_model(train, test_split):
    assert (test_split.Y[:100] != train.Y[:100]).nnz > 0
    # same latent model: the label popularity profiles agree
    f_tr = np.asarray(train.Y.sum(0)).ravel() / N
    f_te = np.asarray(test_split.Y.sum(0)).ravel() / test_split.num_points
    assert np.corrcoef(f_tr, f_te)[0, 1] > 0.9


def test_zipf_head_share():
    ds = make_synthetic(5000, 8000, 2000, seed=0)
    counts = np.sort(np.asarray(ds.Y.sum(0)).ravel())[::-1]
    head = counts[: len(counts) // 100].sum() / counts.sum()  # top 1% of labels
    assert head > 0.15  # uniform would give 0.01
    assert (counts <= 2).mean() > 0.3  # long tail of rare labels
    # the frequency-rank curve is roughly a power law: log-log slope clearly negative
    r = np.arange(1, 501)
    slope = np.polyfit(np.log(r), np.log(counts[:500] + 1), 1)[0]
    assert slope < -0.5


def test_labels_cooccur_inside_clusters(train):
    model = build_model(SyntheticConfig(num_labels=L, num_features=D, seed=3))
    cl = model.label_cluster
    Y = train.Y
    # pairs of labels on the same point: how many are in the same cluster?
    C = sp.triu(Y.T @ Y, k=1).tocoo()  # [L, L] co-occurrence counts
    same = (cl[C.row] == cl[C.col]) * C.data
    frac_same = same.sum() / C.data.sum()
    chance = np.sum(np.bincount(cl, minlength=model.num_clusters) ** 2) / L**2
    assert frac_same > 0.5 and frac_same > 5 * chance
    # points' labels come from at most two clusters
    coo = Y.tocoo()
    n_cl = [len(set(cl[coo.col[coo.row == i]])) for i in range(200)]
    assert max(n_cl) <= 2


def test_label_feature_profiles_cluster(train):
    """Labels' mean feature vectors are closer inside a cluster than across clusters."""
    model = build_model(SyntheticConfig(num_labels=L, num_features=D, seed=3))
    prof = (train.Y.T @ train.X).toarray()  # [L, D]
    nrm = np.linalg.norm(prof, axis=1, keepdims=True)
    ok = nrm[:, 0] > 0
    prof = prof[ok] / nrm[ok]
    cl = model.label_cluster[ok]
    sim = prof @ prof.T
    same = cl[:, None] == cl[None, :]
    np.fill_diagonal(same, False)
    diff = cl[:, None] != cl[None, :]
    assert sim[same].mean() > 2 * sim[diff].mean()


def _precision_at_1(scores: np.ndarray, Y: sp.csr_matrix) -> float:
    pred = scores.argmax(1)
    return float(np.asarray(Y[np.arange(Y.shape[0]), pred]).mean())


def test_learnable_nearest_centroid_beats_popularity(train, test_split):
    """A label-centroid classifier built on train reaches a high P@1 on test; popularity doesn't."""
    prof = (train.Y.T @ train.X).toarray()  # [L, D] label feature profiles
    prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    scores = test_split.X @ prof.T  # [N_test, L]
    p1_model = _precision_at_1(np.asarray(scores), test_split.Y)
    pop = np.asarray(train.Y.sum(0)).ravel()
    p1_pop = _precision_at_1(np.tile(pop, (test_split.num_points, 1)), test_split.Y)
    # brute-force check of the popularity P@1 (slow reference)
    top = int(pop.argmax())
    assert p1_pop == pytest.approx(test_split.Y[:, top].toarray().mean())
    assert p1_pop < 0.45
    assert p1_model > 0.7
    assert p1_model > p1_pop + 0.3


def test_reference_label_draws_match_popularity():
    """The vectorised within-cluster draw matches the model's popularity (brute-force check)."""
    from xmc_toolkit.data.synthetic import _draw_labels

    model = build_model(SyntheticConfig(num_labels=40, num_features=50, seed=1, num_clusters=4))
    rng = np.random.default_rng(0)
    c = 2
    draws = _draw_labels(model, np.full(200_000, c), rng.random(200_000))
    members = np.flatnonzero(model.label_cluster == c)
    assert set(np.unique(draws)) <= set(members)
    expected = model.label_prob[members] / model.label_prob[members].sum()
    observed = np.bincount(draws, minlength=40)[members] / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.005)


def test_bad_parameters_list_every_problem():
    with pytest.raises(ConfigError) as info:
        make_synthetic(0, 10, 0, avg_labels=0.5)
    msg = str(info.value)
    assert "num_labels" in msg and "num_features" in msg and "avg_labels" in msg
    with pytest.raises(ConfigError, match="did you mean"):
        make_synthetic(10, 10, 10, noise_token=3)
    with pytest.raises(ConfigError, match="split"):
        make_synthetic(10, 10, 10, split="valid")


def test_small_problems_edge_cases():
    ds = make_synthetic(1, 5, 1, seed=0)
    assert ds.Y.nnz == 5 and ds.X.shape == (5, 1)
    ds = make_synthetic(10, 0, 10)
    assert ds.X.shape == (0, 10) and ds.Y.shape == (0, 10)


def _load_or_skip():
    formats = pytest.importorskip("xmc_toolkit.data.formats")
    if not all(hasattr(formats, n) for n in ("load", "write_xc_header", "append_xc_rows")):
        pytest.skip("xmc_toolkit.data.formats is not complete yet")
    return formats


def test_write_synthetic_matches_make_and_is_chunk_invariant(tmp_path: Path):
    formats = _load_or_skip()
    kw = dict(num_labels=60, num_points=BLOCK_SIZE + 300, num_features=500, seed=5)
    out_a = write_synthetic(
        tmp_path / "a.txt", **kw, test_path=tmp_path / "a_test.txt", num_test_points=700,
        chunk_size=1,
    )
    write_synthetic(tmp_path / "b.txt", **kw, chunk_size=10**6)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    ds = formats.load(tmp_path / "a.txt")
    ref = make_synthetic(60, BLOCK_SIZE + 300, 500, seed=5)
    _assert_same(ds.Y.tocsr(), ref.Y)
    np.testing.assert_array_equal(ds.X.indptr, ref.X.indptr)
    np.testing.assert_array_equal(ds.X.indices, ref.X.indices)
    np.testing.assert_allclose(ds.X.data, ref.X.data, rtol=1e-6)
    te = formats.load(tmp_path / "a_test.txt")
    ref_te = make_synthetic(60, 700, 500, seed=5, split="test")
    _assert_same(te.Y.tocsr(), ref_te.Y)
    assert out_a["train"]["label_nnz"] == ref.Y.nnz
    assert out_a["test"]["num_points"] == 700


def test_write_synthetic_validates(tmp_path: Path):
    with pytest.raises(ConfigError, match="--test-out"):
        write_synthetic(tmp_path / "x.txt", 10, 10, 10, num_test_points=5)


def test_cli_synth(tmp_path: Path):
    _load_or_skip()
    from click.testing import CliRunner

    from cli.main import xmc

    runner = CliRunner()
    args = ["data", "synth", "--labels", "40", "--points", "300", "--features", "200",
            "--seed", "2", "--out", str(tmp_path / "tr.txt"), "--test-out",
            str(tmp_path / "te.txt"), "--test-points", "50", "--clusters", "4",
            "--avg-labels", "3", "--no-progress"]
    res = runner.invoke(xmc, args)
    assert res.exit_code == 0, res.output
    assert "train:" in res.output and "test:" in res.output
    assert (tmp_path / "tr.txt").read_text().split("\n", 1)[0] == "300 200 40"
    assert (tmp_path / "te.txt").read_text().split("\n", 1)[0] == "50 200 40"
    res = runner.invoke(xmc, ["data", "synth", "--labels", "0", "--points", "3", "--features",
                              "5", "--out", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "num_labels must be >= 1" in res.output
    res = runner.invoke(xmc, ["data", "synth", "--labels", "5", "--points", "3", "--features",
                              "5", "--out", str(tmp_path / "x.txt"), "--test-points", "4"])
    assert res.exit_code == 2 and "--test-out" in res.output
