"""Tests of xmc_toolkit.metrics: hand-computed cases, a brute-force reference, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.errors import XMCError
from xmc_toolkit.metrics import (
    METRIC_NAMES,
    MetricsAccumulator,
    MetricsInputError,
    evaluate,
    inverse_propensity,
    metric_keys,
    ndcg_at_k,
    precision_at_k,
    psndcg_at_k,
    psp_at_k,
    recall_at_k,
)

LOG2_3 = math.log2(3)
LOG2_4 = 2.0


# --------------------------------------------------------------------------------------------
# brute-force per-row reference (plain Python, straight from the definitions)
# --------------------------------------------------------------------------------------------


def reference(Y: np.ndarray, ids: np.ndarray, k: int, w: np.ndarray) -> dict[str, list[float]]:
    """Every metric at 1..k; rows without labels skipped; PSP/PSnDCG data-set normalized."""
    out: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    rows = [i for i in range(Y.shape[0]) if Y[i].sum() > 0]
    for j in range(1, k + 1):
        p = r = nd = 0.0
        psp_num = psp_den = psn_num = psn_den = 0.0
        for i in rows:
            y = {int(c) for c in np.flatnonzero(Y[i])}
            top = [int(v) for v in ids[i, :j]]
            hit = [1.0 if (v >= 0 and v in y) else 0.0 for v in top]
            dcg = sum(h / math.log2(pos + 2) for pos, h in enumerate(hit))
            idcg = sum(1.0 / math.log2(pos + 2) for pos in range(min(j, len(y))))
            p += sum(hit) / j
            r += sum(hit) / len(y)
            nd += dcg / idcg
            gains = [w[v] * h if v >= 0 else 0.0 for v, h in zip(top, hit)]
            best = sorted((w[c] for c in y), reverse=True)[:j]
            psp_num += sum(gains) / j
            psp_den += sum(best) / j
            psn_num += sum(g / math.log2(pos + 2) for pos, g in enumerate(gains)) / idcg
            psn_den += sum(b / math.log2(pos + 2) for pos, b in enumerate(best)) / idcg
        n = len(rows)
        out["P"].append(p / n)
        out["R"].append(r / n)
        out["nDCG"].append(nd / n)
        out["PSP"].append(psp_num / psp_den)
        out["PSnDCG"].append(psn_num / psn_den)
    return out


def random_problem(
    seed: int, n: int, L: int, k: int, extra_cols: int = 1, density: float = 0.3
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Random labels (some rows empty), top-k ids with -1 padding anywhere, and weights."""
    g = np.random.default_rng(seed)
    Y = (g.random((n, L)) < density).astype(np.float32)
    Y[0, g.integers(L)] = 1.0  # at least one evaluable row
    width = k + extra_cols
    ids = np.full((n, width), -1, dtype=np.int64)
    for i in range(n):
        m = int(g.integers(0, min(L, width) + 1))
        pos = g.choice(width, size=m, replace=False)
        ids[i, pos] = g.choice(L, size=m, replace=False)
    w = 1.0 + 3.0 * g.random(L)
    return sp.csr_matrix(Y), ids, w


# --------------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hand_case() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    # row 0: y = {0, 2}; row 1: no labels (skipped); row 2: y = {1}
    Y = sp.csr_matrix(
        np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    )
    ids = np.array([[2, 1, 0], [3, -1, -1], [3, 1, -1]])
    w = np.array([2.0, 1.0, 4.0, 3.0])
    return Y, ids, w


def test_hand_computed_plain_metrics(hand_case) -> None:
    Y, ids, w = hand_case
    # hits: row 0 -> [1, 0, 1], row 2 -> [0, 1, 0]
    np.testing.assert_allclose(precision_at_k(Y, ids, 3), [0.5, 0.5, 0.5])
    # R@1 = (1/2 + 0)/2, R@2 = (1/2 + 1)/2, R@3 = (2/2 + 1)/2
    np.testing.assert_allclose(recall_at_k(Y, ids, 3), [0.25, 0.75, 1.0])
    idcg_2 = 1 + 1 / LOG2_3  # |y| = 2
    nd1 = (1 + 0) / 2
    nd2 = (1 / idcg_2 + (1 / LOG2_3) / 1) / 2
    nd3 = ((1 + 1 / LOG2_4) / idcg_2 + (1 / LOG2_3) / 1) / 2
    np.testing.assert_allclose(ndcg_at_k(Y, ids, 3), [nd1, nd2, nd3])


def test_hand_computed_propensity_metrics(hand_case) -> None:
    Y, ids, w = hand_case
    # gains: row 0 -> [4, 0, 2], row 2 -> [0, 1, 0]; best: row 0 -> [4, 2], row 2 -> [1]
    psp1 = (4 + 0) / (4 + 1)
    psp2 = (4 / 2 + 1 / 2) / ((4 + 2) / 2 + 1 / 2)
    psp3 = ((4 + 2) / 3 + 1 / 3) / ((4 + 2) / 3 + 1 / 3)
    np.testing.assert_allclose(psp_at_k(Y, ids, 3, w), [psp1, psp2, psp3])
    idcg_2 = 1 + 1 / LOG2_3
    n1 = (4 / 1 + 0) / (4 / 1 + 1 / 1)
    n2 = (4 / idcg_2 + (1 / LOG2_3) / 1) / ((4 + 2 / LOG2_3) / idcg_2 + 1 / 1)
    n3 = ((4 + 2 / LOG2_4) / idcg_2 + (1 / LOG2_3) / 1) / ((4 + 2 / LOG2_3) / idcg_2 + 1)
    np.testing.assert_allclose(psndcg_at_k(Y, ids, 3, w), [n1, n2, n3])


def test_evaluate_keys_counts_and_ranges(hand_case) -> None:
    Y, ids, w = hand_case
    m = evaluate(Y, ids, ks=(1, 3), inv_prop=w)
    assert list(m) == metric_keys(3) + ["num_rows_evaluated", "num_rows_without_labels"]
    assert m["num_rows_evaluated"] == 2 and m["num_rows_without_labels"] == 1
    assert m["P@1"] == pytest.approx(0.5) and m["PSP@1"] == pytest.approx(0.8)
    for key in metric_keys(3):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0 + 1e-12


def test_perfect_predictions_score_one() -> None:
    Y = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32))
    w = np.array([1.0, 5.0, 2.0, 3.0])
    # ranked by decreasing propensity: perfect for every metric at every k
    ids = np.array([[1, 0, -1], [3, -1, -1]])
    m = evaluate(Y, ids, ks=(3,), inv_prop=w)
    for j in (1, 2, 3):
        assert m[f"nDCG@{j}"] == pytest.approx(1.0)
        assert m[f"PSP@{j}"] == pytest.approx(1.0)
        assert m[f"PSnDCG@{j}"] == pytest.approx(1.0)
    assert m["R@2"] == pytest.approx(1.0)
    # P@3 can't reach 1 with fewer than 3 labels: (2/3 + 1/3) / 2
    assert m["P@3"] == pytest.approx(0.5)


def test_inverse_propensity_formula() -> None:
    # N = 10 rows, label counts [5, 0, 1]
    Y = np.zeros((10, 3), dtype=np.float32)
    Y[:5, 0] = 1
    Y[7, 2] = 1
    A, B = 0.55, 1.5
    C = (math.log(10) - 1) * (B + 1) ** A
    expected = [1 + C * (5 + B) ** -A, 1 + C * (0 + B) ** -A, 1 + C * (1 + B) ** -A]
    np.testing.assert_allclose(inverse_propensity(sp.csr_matrix(Y), A, B), expected)
    # Amazon parameters
    A, B = 0.6, 2.6
    C = (math.log(10) - 1) * (B + 1) ** A
    np.testing.assert_allclose(
        inverse_propensity(sp.csr_matrix(Y), A=A, B=B)[0], 1 + C * (5 + B) ** -A
    )
    # rarer labels weigh more
    w = inverse_propensity(sp.csr_matrix(Y))
    assert w[1] > w[2] > w[0] > 1.0


# --------------------------------------------------------------------------------------------
# brute-force agreement (Hypothesis) and chunking
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    L=st.integers(1, 8),
    k=st.integers(1, 6),
    density=st.sampled_from([0.1, 0.3, 0.7]),
)
def test_matches_bruteforce_reference(seed: int, n: int, L: int, k: int, density: float) -> None:
    Y, ids, w = random_problem(seed, n, L, k, density=density)
    ref = reference(Y.toarray(), ids, k, w)
    got = MetricsAccumulator(L, k, w)
    got.update(Y, ids)
    arrays = got.arrays()
    for name in METRIC_NAMES:
        np.testing.assert_allclose(arrays[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert got.num_rows_evaluated + got.num_rows_without_labels == n


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), chunk=st.integers(1, 7))
def test_chunked_equals_unchunked(seed: int, chunk: int) -> None:
    Y, ids, w = random_problem(seed, 23, 9, 5)
    whole = evaluate(Y, ids, ks=(1, 5), inv_prop=w)
    parts = evaluate(Y, ids, ks=(1, 5), inv_prop=w, chunk_size=chunk)
    assert whole.keys() == parts.keys()
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_padding_never_relevant_and_trailing_columns_ignored(seed: int) -> None:
    Y, ids, w = random_problem(seed, 12, 6, 3, extra_cols=0)
    base = evaluate(Y, ids, ks=(3,), inv_prop=w)
    # extra columns beyond k (even garbage-free duplicates of earlier ids) change nothing
    wider = np.concatenate([ids, ids[:, :1]], axis=1)
    assert evaluate(Y, wider, ks=(3,), inv_prop=w) == base


def test_metrics_monotone_recall_and_bounded() -> None:
    Y, ids, w = random_problem(3, 50, 20, 8)
    m = evaluate(Y, ids, ks=(8,), inv_prop=w)
    recalls = [m[f"R@{j}"] for j in range(1, 9)]
    assert recalls == sorted(recalls)
    assert all(0.0 <= m[key] <= 1.0 + 1e-12 for key in metric_keys(8))


# --------------------------------------------------------------------------------------------
# edge cases and errors
# --------------------------------------------------------------------------------------------


def test_k_larger_than_number_of_labels() -> None:
    Y = sp.csr_matrix(np.array([[1, 0], [1, 1]], dtype=np.float32))
    ids = np.array([[0, 1, -1, -1, -1], [1, 0, -1, -1, -1]])
    m = evaluate(Y, ids, ks=(5,), inv_prop=np.ones(2))
    assert m["P@5"] == pytest.approx((1 / 5 + 2 / 5) / 2)
    assert m["nDCG@5"] == pytest.approx(1.0)  # IDCG over min(k, |y|) labels
    assert m["R@5"] == pytest.approx(1.0)


def test_all_padding_scores_zero() -> None:
    Y = sp.csr_matrix(np.array([[1, 0, 1]], dtype=np.float32))
    m = evaluate(Y, np.full((1, 3), -1), ks=(3,), inv_prop=np.ones(3))
    assert all(m[key] == 0.0 for key in metric_keys(3))


def test_duplicate_ids_rejected() -> None:
    Y = sp.csr_matrix(np.eye(3, dtype=np.float32))
    ids = np.array([[0, 1, 2], [1, 2, 1], [2, 0, 1]])
    with pytest.raises(MetricsInputError, match="row 1 .*label 1 more than once"):
        precision_at_k(Y, ids, 3)
    # a duplicate beyond k is outside the evaluated prefix: fine
    precision_at_k(Y, ids, 2)
    # repeated padding is fine
    precision_at_k(Y, np.array([[0, -1, -1], [1, -1, -1], [2, -1, -1]]), 3)


@pytest.mark.parametrize(
    "ids, k, match",
    [
        (np.array([[0, 1], [1, 0]]), 3, "2 columns but k=3"),
        (np.array([[0, 5], [1, 0]]), 2, "out of range for 3 labels"),
        (np.array([[0, -2], [1, 0]]), 2, "only -1 may mark padding"),
        (np.array([[0.0, 1.0], [1.0, 0.0]]), 2, "integer label ids"),
        (np.array([0, 1]), 1, "2-D"),
        (np.array([[0, 1]]), 1, "1 rows but Y_true has 2"),
        (np.array([[0, 1], [1, 0]]), 0, "positive integer"),
    ],
)
def test_bad_topk_inputs(ids: np.ndarray, k: int, match: str) -> None:
    Y = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    with pytest.raises(MetricsInputError, match=match):
        precision_at_k(Y, ids, k)


def test_errors_are_xmc_errors() -> None:
    assert issubclass(MetricsInputError, XMCError)
    with pytest.raises(XMCError):
        evaluate(np.eye(2), np.array([[0], [1]]), ks=(1,))
    Y = sp.csr_matrix(np.eye(2, dtype=np.float32))
    with pytest.raises(MetricsInputError, match="one weight per label"):
        psp_at_k(Y, np.array([[0], [1]]), 1, np.ones(3))
    with pytest.raises(MetricsInputError, match="ks is empty"):
        evaluate(Y, np.array([[0], [1]]), ks=())
    with pytest.raises(MetricsInputError, match="A must be > 0"):
        inverse_propensity(Y, A=0.0)


def test_no_labelled_rows_is_an_error() -> None:
    Y = sp.csr_matrix((3, 4), dtype=np.float32)
    with pytest.raises(MetricsInputError, match="none of the 3 evaluated rows"):
        evaluate(Y, np.tile([0, 1], (3, 1)), ks=(2,))


def test_inputs_not_modified_and_non_canonical_csr() -> None:
    # unsorted indices, a duplicate entry and an explicit zero
    data = np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    indices = np.array([2, 0, 2, 1])
    indptr = np.array([0, 4])
    Y = sp.csr_matrix((data, indices, indptr), shape=(1, 3))
    Y.has_sorted_indices = False
    before = (Y.data.copy(), Y.indices.copy(), Y.indptr.copy())
    ids = np.array([[1, 2, 0]])
    ids_before = ids.copy()
    m = evaluate(Y, ids, ks=(3,), inv_prop=np.ones(3))
    # relevant = {0, 2} (the explicit zero for label 1 is not a label)
    assert m["P@1"] == 0.0 and m["P@2"] == pytest.approx(0.5) and m["R@3"] == pytest.approx(1.0)
    np.testing.assert_array_equal(Y.data, before[0])
    np.testing.assert_array_equal(Y.indices, before[1])
    np.testing.assert_array_equal(Y.indptr, before[2])
    np.testing.assert_array_equal(ids, ids_before)


def test_default_propensities_come_from_evaluated_labels(caplog) -> None:
    Y, ids, _ = random_problem(5, 30, 7, 3)
    with caplog.at_level("INFO", logger="xmc_toolkit.metrics"):
        m = evaluate(Y, ids, ks=(3,))
    assert "from the evaluated labels" in caplog.text
    assert m == evaluate(Y, ids, ks=(3,), inv_prop=inverse_propensity(Y))


def test_tiny_sets_without_propensities_leave_ps_metrics_out(caplog) -> None:
    Y = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32))
    with pytest.raises(MetricsInputError, match="at least 3 label rows"):
        inverse_propensity(Y)
    with caplog.at_level("WARNING", logger="xmc_toolkit.metrics"):
        m = evaluate(Y, np.array([[0, 1], [1, 2]]), ks=(2,))
    assert "PSP@1" not in m and "PSnDCG@2" not in m and m["P@1"] == 1.0
    assert "left out" in caplog.text


def test_csr_array_and_int32_ids_accepted() -> None:
    Y, ids, w = random_problem(7, 10, 5, 2)
    a = evaluate(sp.csr_array(Y), ids.astype(np.int32), ks=(2,), inv_prop=w)
    assert a == evaluate(Y, ids, ks=(2,), inv_prop=w)


# --------------------------------------------------------------------------------------------
# real data (skips without ../shared/data)
# --------------------------------------------------------------------------------------------


def test_bibtex_popularity_baseline_matches_reference(bibtex_train, bibtex_test) -> None:
    formats = pytest.importorskip("xmc_toolkit.data.formats")
    train, test = formats.load(bibtex_train), formats.load(bibtex_test)
    w = inverse_propensity(train.Y)
    assert w.shape == (159,) and np.all(w >= 1.0)
    popular = np.argsort(-np.asarray(train.Y.sum(axis=0)).ravel(), kind="stable")[:5]
    ids = np.tile(popular, (test.Y.shape[0], 1))  # [N, 5]
    m = evaluate(test.Y, ids, ks=(1, 3, 5), inv_prop=w)
    rows = slice(0, 300)  # brute force on a slice, the fast path on all rows
    ref = reference(test.Y[rows].toarray(), ids[rows], 5, w)
    sub = evaluate(test.Y[rows], ids[rows], ks=(5,), inv_prop=w)
    for name in METRIC_NAMES:
        np.testing.assert_allclose(
            [sub[f"{name}@{j}"] for j in range(1, 6)], ref[name], rtol=1e-10
        )
    assert m["num_rows_evaluated"] + m["num_rows_without_labels"] == 2515
    assert 0.0 < m["P@1"] < 0.3  # a popularity baseline is far below Parabel's 64.53


def xc_repository_style(Y: np.ndarray, ids: np.ndarray, k: int, w: np.ndarray) -> dict:
    """A dense re-statement of the XC repository's conventions: averages over ALL rows."""
    N, L = Y.shape
    safe = np.where(ids[:, :k] >= 0, ids[:, :k], 0)
    flags = np.take_along_axis(Y, safe, axis=1) * (ids[:, :k] >= 0)  # [N, k]
    ranks = np.arange(1, k + 1)
    disc = 1 / np.log2(ranks + 1)
    nrel = Y.sum(axis=1).astype(int)  # [N]
    idcg = np.cumsum(disc)[np.clip(np.minimum(ranks[None, :], nrel[:, None]), 1, None) - 1]
    gains = flags * w[safe]
    best = -np.sort(-(Y * w[None, :]), axis=1)[:, :k]  # [N, k]
    if best.shape[1] < k:
        best = np.pad(best, ((0, 0), (0, k - best.shape[1])))
    return {
        "P": (np.cumsum(flags, 1) / ranks).mean(0),
        "nDCG": (np.cumsum(flags * disc, 1) / idcg).mean(0),
        "PSP": (np.cumsum(gains, 1) / ranks).mean(0) / (np.cumsum(best, 1) / ranks).mean(0),
        "PSnDCG": (np.cumsum(gains * disc, 1) / idcg).mean(0)
        / (np.cumsum(best * disc, 1) / idcg).mean(0),
    }


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6))
def test_relation_to_xc_repository_conventions(seed: int, k: int) -> None:
    """Empty rows: P/nDCG differ by the factor n/N; PSP/PSnDCG are identical (docs/metrics.md)."""
    Y, ids, w = random_problem(seed, 15, 5, k, density=0.2)
    dense = Y.toarray().astype(np.float64)
    xc = xc_repository_style(dense, ids, k, w)
    acc = MetricsAccumulator(5, k, w)
    acc.update(Y, ids)
    ours = acc.arrays()
    scale = acc.num_rows_evaluated / Y.shape[0]
    np.testing.assert_allclose(ours["P"] * scale, xc["P"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours["nDCG"] * scale, xc["nDCG"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours["PSP"], xc["PSP"], rtol=1e-10)
    np.testing.assert_allclose(ours["PSnDCG"], xc["PSnDCG"], rtol=1e-10)
