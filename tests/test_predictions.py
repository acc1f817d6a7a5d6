"""Tests of xmc_toolkit.data.predictions: round trips, hand-written files, format errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.data.predictions import is_jsonl, read_predictions, write_predictions
from xmc_toolkit.errors import DataFormatError

SUFFIXES = ["txt", "jsonl"]


def random_predictions(seed: int, n: int, k: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids per row, best-first float32 scores, -1 padding at the end of some rows."""
    g = np.random.default_rng(seed)
    ids = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        ids[i] = g.choice(L, size=k, replace=False)
    scores = -np.sort(-g.standard_normal((n, k)).astype(np.float32) * 10, axis=1)
    keep = g.integers(0, k + 1, size=n)  # [n] valid entries per row
    pad = np.arange(k)[None, :] >= keep[:, None]  # [n, k]
    ids[pad] = -1
    scores[pad] = -np.inf
    return ids, scores


def expected_after_roundtrip(ids: np.ndarray, scores: np.ndarray | None):
    """Trailing all-padding columns disappear (the reader pads to the longest line)."""
    kmax = int((ids >= 0).sum(axis=1).max()) if ids.size else 0
    return ids[:, :kmax], None if scores is None else scores[:, :kmax]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_roundtrip_with_and_without_scores(tmp_path: Path, suffix: str) -> None:
    ids, scores = random_predictions(0, 30, 6, 50)
    ids[0] = [7, 3, 9, 1, 2, 4]  # one full row keeps kmax = 6
    scores[0] = [5, 4, 3, 2, 1, 0]
    path = tmp_path / f"p.{suffix}"
    write_predictions(path, ids, scores)
    got_ids, got_scores = read_predictions(path)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)  # exact float32 round trip
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    write_predictions(path, ids)
    got_ids, got_scores = read_predictions(path)
    np.testing.assert_array_equal(got_ids, ids)
    assert got_scores is None


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 12),
    k=st.integers(1, 5),
    suffix=st.sampled_from(SUFFIXES),
    with_scores=st.booleans(),
)
def test_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    n: int,
    k: int,
    suffix: str,
    with_scores: bool,
) -> None:
    ids, scores = random_predictions(seed, n, k, 20)
    path = tmp_path_factory.mktemp("rt") / f"p.{suffix}"
    write_predictions(path, ids, scores if with_scores else None)
    got_ids, got_scores = read_predictions(path)
    exp_ids, exp_scores = expected_after_roundtrip(ids, scores if with_scores else None)
    assert got_ids.shape == (n, exp_ids.shape[1])
    np.testing.assert_array_equal(got_ids, exp_ids)
    if with_scores:
        np.testing.assert_array_equal(got_scores, exp_scores)
    else:
        assert got_scores is None


def test_padding_in_the_middle_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    write_predictions(path, np.array([[4, -1, 2]]), np.array([[0.5, 9.0, 0.25]], np.float32))
    assert path.read_text() == "4:0.5 2:0.25\n"


def test_hand_written_text_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("3:0.9 1:0.5\n\n0:2 2:1e-3 5:-4\n")
    ids, scores = read_predictions(path)
    np.testing.assert_array_equal(ids, [[3, 1, -1], [-1, -1, -1], [0, 2, 5]])
    np.testing.assert_array_equal(
        scores,
        np.array([[0.9, 0.5, -np.inf], [-np.inf] * 3, [2, 1e-3, -4]], dtype=np.float32),
    )
    bare = tmp_path / "bare.txt"
    bare.write_text("3 1\n0 2 5")  # no final newline
    ids, scores = read_predictions(bare)
    np.testing.assert_array_equal(ids, [[3, 1, -1], [0, 2, 5]])
    assert scores is None


def test_hand_written_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"ids": [3, 1], "scores": [1, 0.9], "labels": ["x", "y"]}\n'
        '{"ids": [], "scores": []}\n'
    )
    ids, scores = read_predictions(path)
    np.testing.assert_array_equal(ids, [[3, 1], [-1, -1]])
    np.testing.assert_array_equal(scores, np.array([[1, 0.9], [-np.inf] * 2], np.float32))


def test_jsonl_label_names(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    names = ["cs.LG", "stat.ML", "math.\u00e9"]
    write_predictions(path, np.array([[2, 0], [1, -1]]), None, label_names=names)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"ids": [2, 0], "labels": ["math.\u00e9", "cs.LG"]},
                    {"ids": [1], "labels": ["stat.ML"]}]
    with pytest.raises(DataFormatError, match="label id 2 has no name"):
        write_predictions(path, np.array([[2, 0]]), None, label_names=names[:2])
    # text files carry ids only
    txt = tmp_path / "p.txt"
    write_predictions(txt, np.array([[2, 0]]), None, label_names=names)
    assert txt.read_text() == "2 0\n"


def test_is_jsonl() -> None:
    assert is_jsonl("a/b.jsonl") and is_jsonl("B.JSONL")
    assert not is_jsonl("a.txt") and not is_jsonl("a.json")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "p.txt"
    write_predictions(path, np.array([[1, 2]]), None)
    write_predictions(path, np.array([[3]]), None)
    assert path.read_text() == "3\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.txt"]


@pytest.mark.parametrize(
    "ids, scores, match",
    [
        (np.array([1, 2]), None, "2-D"),
        (np.array([[1.0, 2.0]]), None, "integer"),
        (np.array([[1, -3]]), None, ">= 0"),
        (np.array([[1, 2]]), np.array([[1.0]]), "shape"),
        (np.array([[1, 2]]), np.array([[1.0, np.nan]]), "NaN"),
    ],
)
def test_writer_rejects_bad_arrays(tmp_path: Path, ids, scores, match: str) -> None:
    with pytest.raises(DataFormatError, match=match):
        write_predictions(tmp_path / "p.txt", ids, scores)


@pytest.mark.parametrize(
    "content, line, match",
    [
        ("1:0.5 2:0.1\n3:x\n", 2, "cannot parse"),
        ("1:0.5 2:0.1\n3 4\n", 2, "expected id:score"),
        ("1 2\n3:0.5\n", 2, "mixed with bare ids"),
        ("1 2\n\n3 a\n", 3, "cannot parse"),
        ("1:0.5:2\n", 1, "id:score"),
        ("1:nan\n", 1, "NaN"),
        ("1 2\n4 -2\n", 2, "negative"),
        ("1 2\n4 7 4\n", 2, "label id 4 is listed more than once"),
        ("1:0.5 2:0.1\n4:0.1 7:0.9\n", 2, "not sorted best first"),
    ],
)
def test_text_format_errors_name_the_line(tmp_path: Path, content: str, line: int, match: str):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=match) as info:
        read_predictions(path)
    assert info.value.line == line
    assert f"bad.txt:{line}:" in str(info.value)


@pytest.mark.parametrize(
    "content, line, match",
    [
        ('{"ids": [1]}\n{"ids": [2]\n', 2, "invalid JSON"),
        ('{"ids": [1]}\n[1, 2]\n', 2, '"ids" list'),
        ('{"ids": [1, "2"]}\n', 1, "list of integers"),
        ('{"ids": [true]}\n', 1, "list of integers"),
        ('{"ids": [1], "scores": [1]}\n{"ids": [2]}\n', 2, "absent on others"),
        ('{"ids": [1, 2], "scores": [1]}\n', 1, "list of 2 numbers"),
        ('{"ids": [1], "labels": ["a", "b"]}\n', 1, "list of 1 names"),
        ('{"ids": [1]}\n\n', 2, "empty line"),
        ('{"ids": [1, 1]}\n', 1, "more than once"),
        ('{"ids": [1, 2], "scores": [1, 2]}\n', 1, "not sorted"),
    ],
)
def test_jsonl_format_errors_name_the_line(tmp_path: Path, content: str, line: int, match: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=match) as info:
        read_predictions(path)
    assert info.value.line == line


def test_sort_by_score_reorders_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("1:0.5 2:0.1\n4:0.1 7:0.9 8:0.3\n")
    ids, scores = read_predictions(path, sort_by_score=True)
    np.testing.assert_array_equal(ids, [[1, 2, -1], [7, 8, 4]])
    np.testing.assert_array_equal(scores[1], np.array([0.9, 0.3, 0.1], np.float32))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="not found"):
        read_predictions(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ids, scores = read_predictions(empty)
    assert ids.shape == (0, 0) and scores is None


def test_evaluate_from_file(tmp_path: Path) -> None:
    """The writer's output feeds the metrics unchanged."""
    import scipy.sparse as sp

    from xmc_toolkit.metrics import evaluate

    Y = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32))
    ids = np.array([[2, 1, 0], [1, -1, -1], [0, 3, -1]])
    path = tmp_path / "p.txt"
    write_predictions(path, ids, None)
    got, _ = read_predictions(path)
    assert evaluate(Y, got, ks=(3,)) == evaluate(Y, ids, ks=(3,))


def test_npz_prediction_matrix_round_trip(tmp_path):
    import scipy.sparse as sp

    ids = np.array([[3, 0, -1], [1, 4, 2], [-1, -1, -1]], dtype=np.int64)
    scores = np.array([[2.5, 1.0, -np.inf], [0.5, 0.25, -1.0], [-np.inf] * 3], np.float32)
    p = tmp_path / "pred.npz"
    write_predictions(p, ids, scores, num_labels=6)
    M = sp.load_npz(p)  # what PECOS smat_util / pyxclib read
    assert M.shape == (3, 6) and M.nnz == 5 and M[0, 3] == 2.5 and M[1, 2] == -1.0
    back_ids, back_scores = read_predictions(p)
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_scores, scores)
    # a matrix from elsewhere: rows are ranked by decreasing value
    sp.save_npz(tmp_path / "other.npz", sp.csr_matrix(np.array([[0.1, 0.9, 0.0, 0.5]])))
    r_ids, r_sc = read_predictions(tmp_path / "other.npz")
    assert r_ids.tolist() == [[1, 3, 0]] and r_sc[0, 0] == pytest.approx(0.9)
    with pytest.raises(DataFormatError, match="label id 4 >= num_labels=2"):
        write_predictions(tmp_path / "x.npz", ids, scores, num_labels=2)
