"""Tests of xmc_toolkit.data.formats: parsers vs references, round trips, errors, real data."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.data import XMCDataset, append_xc_rows, dataset_stats, infer_format, load, save
from xmc_toolkit.data import write_xc_header
from xmc_toolkit.data import formats as F
from xmc_toolkit.data._textparse import parse_float_tokens, parse_uint_tokens
from xmc_toolkit.data._textwrite import float_bytes, int_bytes
from xmc_toolkit.errors import DataFormatError

FIX = Path(__file__).parent / "fixtures" / "formats"

TINY_X = np.array(
    [
        [1, 0, 0, 0.5, 0, 0],
        [0, 2.5, 0, 0, 0, -1e-3],
        [0, 0, 0, 0, 0, 0],
        [3, 0, 0, 0, 15, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
TINY_Y = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=np.float32)


def _check_csr(ds: XMCDataset) -> None:
    for m in (ds.X, ds.Y):
        assert sp.isspmatrix_csr(m) or isinstance(m, sp.csr_array)
        assert m.dtype == np.float32
        assert m.has_sorted_indices
        m.check_format(full_check=True)
        for r in range(m.shape[0]):  # strictly increasing within rows: sorted, no duplicates
            row = m.indices[m.indptr[r] : m.indptr[r + 1]]
            assert np.all(np.diff(row) > 0)
    assert np.all(ds.Y.data == 1.0)


def _assert_same(a: XMCDataset, b: XMCDataset) -> None:
    assert a.X.shape == b.X.shape and a.Y.shape == b.Y.shape
    assert (a.X != b.X).nnz == 0
    assert (a.Y != b.Y).nnz == 0
    np.testing.assert_array_equal(a.X.indptr, b.X.indptr)
    np.testing.assert_array_equal(a.Y.indptr, b.Y.indptr)


def _tokens(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    buf = b" ".join(strings) + b"\n"
    lens = np.array([len(s) for s in strings], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64)
    return np.frombuffer(buf, np.uint8), starts, starts + lens


# ---------------------------------------------------------------- number parsing vs Python float
FLOAT_OK = [b"1", b"0", b"0.5", b"1e-3", b"-2.5E+01", b".5", b"2.", b"+7", b"-0", b"1E5",
            b"123456789012345678901", b"0.000000000000000000000000001234", b"3.4028235e38",
            b"0.33333334", b"1e-45", b"00012.50"]
FLOAT_BAD = [b"nan", b"inf", b"-inf", b"1e", b"--1", b"1.2.3", b"e5", b"-", b".", b"1e+",
             b"0x10", b"1,5", b"abc", b"1e5.0", b"+-1", b"1ee3"]


def test_parse_float_known_tokens() -> None:
    buf, s, e = _tokens(FLOAT_OK + FLOAT_BAD)
    vals, bad = parse_float_tokens(buf, s, e)
    k = len(FLOAT_OK)
    assert not bad[:k].any() and bad[k:].all()
    ref = np.array([float(t) for t in FLOAT_OK])
    np.testing.assert_array_equal(vals[:k].astype(np.float32), ref.astype(np.float32))
    np.testing.assert_allclose(vals[:k], ref, rtol=1e-15)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=30),
       st.sampled_from(["{:.9g}", "{:e}", "{:.3f}", "{!r}", "{:.17E}", "{:g}"]))
def test_parse_float_matches_python(xs: list[float], fmt: str) -> None:
    toks = [fmt.format(x).encode() for x in xs]
    buf, s, e = _tokens(toks)
    vals, bad = parse_float_tokens(buf, s, e)
    assert not bad.any()
    ref = np.array([float(t) for t in toks])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(vals.astype(np.float32), ref.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10**18 - 1), min_size=1, max_size=40))
def test_parse_uint_matches_python(xs: list[int]) -> None:
    buf, s, e = _tokens([str(x).encode() for x in xs])
    vals, bad = parse_uint_tokens(buf, s, e)
    assert not bad.any()
    np.testing.assert_array_equal(vals, np.array(xs, dtype=np.int64))


def test_parse_uint_rejects() -> None:
    buf, s, e = _tokens([b"-1", b"1.0", b"12a", b"1" * 19, b"7"])
    _, bad = parse_uint_tokens(buf, s, e)
    assert bad.tolist() == [True, True, True, True, False]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=40))
def test_float_bytes_round_trip(xs: list[float]) -> None:
    v = np.array(xs, dtype=np.float32)
    text = float_bytes(v)
    strings = [bytes(r[r != 0]) for r in text]
    np.testing.assert_array_equal(np.array([float(t) for t in strings], dtype=np.float32), v)


def test_int_bytes() -> None:
    b = int_bytes(np.array([0, 7, 10, 12345]))
    assert [bytes(r[r != 0]) for r in b] == [b"0", b"7", b"10", b"12345"]


# ---------------------------------------------------------------- fixtures with known answers
def test_xc_fixture() -> None:
    ds = load(FIX / "tiny.txt")
    _check_csr(ds)
    np.testing.assert_array_equal(ds.X.toarray(), TINY_X)
    np.testing.assert_array_equal(ds.Y.toarray(), TINY_Y)
    assert ds.label_names is None


def test_gzip_text_files_load_like_plain(tmp_path: Path) -> None:
    import gzip

    for src, fmt in ((FIX / "tiny.txt", "xc"), (FIX / "tiny.svm", "svmlight")):
        gz = tmp_path / (src.name + ".gz")
        gz.write_bytes(gzip.compress(src.read_bytes()))
        assert infer_format(gz) == fmt
        plain, packed = load(src), load(gz)
        np.testing.assert_array_equal(packed.X.toarray(), plain.X.toarray())
        np.testing.assert_array_equal(packed.Y.toarray(), plain.Y.toarray())
    # an error in a compressed file names the line of the decompressed text
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"2 5 3\n0 1:1\n0 9:1\n"))
    with pytest.raises(DataFormatError, match=r"bad.txt.gz:3"):
        load(bad)


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_bz2_xz_text_files_load_by_content(tmp_path: Path, suffix: str) -> None:
    import bz2
    import lzma

    pack = bz2.compress if suffix == ".bz2" else lzma.compress
    src = FIX / "tiny.txt"
    named = tmp_path / ("tiny.txt" + suffix)
    named.write_bytes(pack(src.read_bytes()))
    unnamed = tmp_path / "tiny_packed.txt"  # told by the first bytes, not by the name
    unnamed.write_bytes(pack(src.read_bytes()))
    plain = load(src)
    for p in (named, unnamed):
        assert infer_format(p) == "xc"
        np.testing.assert_array_equal(load(p).X.toarray(), plain.X.toarray())
    bad = tmp_path / ("bad.txt" + suffix)
    bad.write_bytes(pack(b"2 5 3\n0 1:1\n0 9:1\n"))
    with pytest.raises(DataFormatError, match=r"bad.txt.*:3"):
        load(bad)
    cut = tmp_path / ("cut.txt" + suffix)
    cut.write_bytes(pack(src.read_bytes() * 20)[:40])
    with pytest.raises(DataFormatError, match="cannot decompress"):
        load(cut)


def test_xc_split_fixture_any_entry_point(tmp_path: Path) -> None:
    for p in (FIX / "tiny_X_Xf.txt", FIX / "tiny_X_Y.txt", FIX / "tiny"):
        ds = load(p)
        _check_csr(ds)
        np.testing.assert_array_equal(ds.X.toarray(), TINY_X)
        np.testing.assert_array_equal(ds.Y.toarray(), TINY_Y)
    d = tmp_path / "dir"
    d.mkdir()
    save(load(FIX / "tiny.txt"), d / "trn", fmt="xc-split")
    np.testing.assert_array_equal(load(d).X.toarray(), TINY_X)


def test_svmlight_fixture_one_based_auto() -> None:
    ds = load(FIX / "tiny.svm", num_labels=4)
    _check_csr(ds)
    np.testing.assert_array_equal(ds.X.toarray(), TINY_X)
    np.testing.assert_array_equal(ds.Y.toarray(), TINY_Y)
    ds0 = load(FIX / "tiny.svm", zero_based=True)  # ids as written: one more column, 3 labels
    assert ds0.X.shape == (5, 7) and ds0.Y.shape == (5, 3)
    np.testing.assert_array_equal(ds0.X.toarray()[:, 1:], TINY_X)


def test_mulan_arff_fixture() -> None:
    ds = load(FIX / "tiny.arff")  # tiny.xml beside it wins over the '-C 2' in @relation
    _check_csr(ds)
    assert ds.label_names == ["lab_c", "lab\\'a", "lab b"]  # XML names verbatim, not unescaped
    assert ds.feature_names == ["f0", "f1", "f\\'2"]
    np.testing.assert_array_equal(ds.X.toarray(), [[1, 0, 0], [0.5, -2, 1], [0, 0, 0], [0, 3.5, 0]])
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]])


def test_mulan_xml_name_matches_unescaped_arff_name(tmp_path: Path) -> None:
    xml = tmp_path / "other.xml"
    xml.write_text('<labels><label name="lab\'a"></label><label name="lab_c"></label></labels>')
    ds = load(FIX / "tiny.arff", label_xml=xml)
    assert ds.label_names == ["lab'a", "lab_c"]
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 1], [0, 0], [0, 0], [0, 0]])
    assert ds.X.shape == (4, 4)  # "lab b" is a feature now


def test_meka_arff_fixtures() -> None:
    ds = load(FIX / "meka.arff")
    np.testing.assert_array_equal(ds.X.toarray(), [[0.25, 0], [0, 4], [0, 2]])
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 0], [0, 1], [1, 1]])
    assert ds.label_names == ["y0", "y1"]
    ds = load(FIX / "meka_neg.arff")
    np.testing.assert_array_equal(ds.X.toarray(), [[0.25, 0], [0, 4]])
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 0], [0, 1]])


def test_infer_format(tmp_path: Path) -> None:
    assert infer_format(FIX / "tiny.txt") == "xc"
    assert infer_format(FIX / "tiny_X_Y.txt") == "xc-split"
    assert infer_format(FIX / "tiny") == "xc-split"
    assert infer_format(FIX / "tiny.svm") == "svmlight"
    assert infer_format(FIX / "tiny.arff") == "arff"
    assert infer_format(tmp_path / "a.npz") == "npz"
    p = tmp_path / "plain.txt"
    p.write_text("1,2 3:1\n")
    assert infer_format(p) == "svmlight"


def test_unsorted_ids_are_sorted_crlf_and_no_final_newline(tmp_path: Path) -> None:
    p = tmp_path / "u.txt"
    p.write_bytes(b"2 5 3\r\n2,0 4:1 1:2\r\n1\t3:0.25 0:1")
    ds = load(p)
    _check_csr(ds)
    np.testing.assert_array_equal(ds.X.toarray(), [[0, 2, 0, 0, 1], [1, 0, 0, 0.25, 0]])
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 0, 1], [0, 1, 0]])


def test_trailing_blank_lines_are_not_rows(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("1 2 2\n0 1:1\n\n \n")
    assert load(p).num_points == 1


@pytest.mark.parametrize("block", [7, 16, 64, 1 << 20])
def test_small_blocks_same_result(block: int) -> None:
    ref = load(FIX / "tiny.txt")
    ds = F._load_xc(FIX / "tiny.txt", block_bytes=block)
    _assert_same(ds, ref)


def test_dataset_stats_hand_computed() -> None:
    s = dataset_stats(load(FIX / "tiny.txt"))
    assert (s["num_points"], s["num_features"], s["num_labels"]) == (5, 6, 4)
    assert s["feature_nnz"] == 6 and s["label_nnz"] == 6
    assert s["avg_labels_per_point"] == pytest.approx(6 / 5)
    assert s["avg_points_per_label"] == pytest.approx(6 / 4)
    assert s["avg_features_per_point"] == pytest.approx(6 / 5)
    # points per label: [2, 1, 3, 0]
    q = s["label_frequency_quantiles"]
    assert q["min"] == 0 and q["max"] == 3 and q["median"] == pytest.approx(1.5)
    assert q["q25"] == pytest.approx(np.quantile([2, 1, 3, 0], 0.25))
    assert s["empty_rows"] == 2 and s["empty_labels"] == 1 and s["rows_without_features"] == 2


# ---------------------------------------------------------------- round trips
@st.composite
def datasets(draw: st.DrawFn) -> XMCDataset:
    n = draw(st.integers(0, 12))
    d = draw(st.integers(1, 9))
    l = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    X = sp.random(n, d, density=draw(st.floats(0, 1)), format="csr", dtype=np.float64, random_state=g)
    kind = draw(st.sampled_from(["uniform", "ints", "wide"]))
    if kind == "ints":
        X.data = np.round(X.data * 10) - 5
    elif kind == "wide":
        X.data = (X.data - 0.5) * 10.0 ** g.integers(-30, 30, size=X.nnz)
    X = sp.csr_matrix(X, dtype=np.float32)  # explicit zeros may remain: they must round-trip too
    Y = sp.random(n, l, density=draw(st.floats(0, 1)), format="csr", random_state=g)
    Y.data[:] = 1
    return XMCDataset(X, sp.csr_matrix(Y, dtype=np.float32))


@settings(max_examples=25, deadline=None)
@given(datasets(), st.sampled_from(["xc", "xc-split", "svmlight", "npz", "npz-pair"]))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, ds: XMCDataset, fmt: str) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    if fmt == "npz-pair":
        path, fmt = tmp / "d_X.npz", "npz"
    else:
        path = tmp / {"xc": "d.txt", "xc-split": "d", "svmlight": "d.svm", "npz": "d.npz"}[fmt]
    if fmt == "svmlight" and ds.num_points == 0:  # no header: an empty file cannot round-trip
        with pytest.raises(DataFormatError, match="no rows"):
            save(ds, path, fmt=fmt)
        return
    save(ds, path, fmt=fmt)
    kwargs = {"zero_based": True, "num_features": ds.num_features, "num_labels": ds.num_labels}
    back = load(path, fmt=fmt, **(kwargs if fmt == "svmlight" else {}))
    _check_csr(back)
    _assert_same(back, ds)
    np.testing.assert_array_equal(back.X.data, ds.X.data)  # explicit zeros kept too


@settings(max_examples=15, deadline=None)
@given(datasets(), st.integers(1, 5))
def test_streaming_writer_equals_save(tmp_path_factory: pytest.TempPathFactory, ds: XMCDataset, parts: int) -> None:
    tmp = tmp_path_factory.mktemp("stream")
    path = tmp / "s.txt"
    with open(path, "w", encoding="ascii") as fh:
        write_xc_header(fh, ds.num_points, ds.num_features, ds.num_labels)
        for rows in np.array_split(np.arange(ds.num_points), parts):
            append_xc_rows(fh, ds.X[rows], ds.Y[rows])
    save(ds, tmp / "ref.txt")
    assert path.read_bytes() == (tmp / "ref.txt").read_bytes()
    _assert_same(load(path), ds)


def test_append_xc_rows_to_string_io() -> None:
    ds = load(FIX / "tiny.txt")
    fh = io.StringIO()
    append_xc_rows(fh, ds.X, ds.Y)
    assert fh.getvalue() == "0,2 0:1 3:0.5\n 1:2.5 5:-0.001\n2 \n0,1,2 0:3 4:15\n \n"


def test_npz_keeps_names(tmp_path: Path) -> None:
    ds = load(FIX / "tiny.arff")
    save(ds, tmp_path / "a.npz")
    back = load(tmp_path / "a.npz")
    assert back.label_names == ds.label_names and back.feature_names == ds.feature_names
    _assert_same(back, ds)


# ---------------------------------------------------------------- errors: file, line, message
ERRORS = [
    (b"", 1, "empty file"),
    (b"3 4\n", 1, "header"),
    (b"a b c\n", 1, "header"),
    (b"3 4 2\n0 1:1\n1 2:1\n", 4, "truncated"),
    (b"1 4 2\n0 1:1\n1 2:1\n", 3, "more rows"),
    (b"2 4 2\n0 1:1\n1 4:1\n", 3, "feature id 4 out of range"),
    (b"2 4 2\n0 1:1\n2 3:1\n", 3, "label id 2 out of range"),
    (b"1 4 2\n0 -1:1\n", 2, "invalid feature id '-1'"),
    (b"1 4 2\n-1 1:1\n", 2, "label"),
    (b"1 4 2\n0 1:abc\n", 2, "non-numeric value 'abc'"),
    (b"1 4 2\n0 1:nan\n", 2, "NaN or infinite"),
    (b"1 4 2\n0 1:-inf\n", 2, "NaN or infinite"),
    (b"1 4 2\n0 1:1e39\n", 2, "NaN or infinite in float32"),
    (b"2 4 2\n0 1:1\n0 1:1 1:2\n", 3, "duplicate feature id 1"),
    (b"2 4 2\n0 1:1\n1,1 1:1\n", 3, "duplicate label id 1"),
    (b"1 4 2\n0 1:\n", 2, "no value"),
    (b"1 4 2\n0 1\n", 2, "neither a label"),
    (b"2 4 2\n0 1:1\n1:1 2:1\n", 3, "must start with a space"),
    (b"1 4 2\n0,,1 1:1\n", 2, "joined by single commas"),
    (b"1 4 2\n0, 1:1\n", 2, "joined by single commas"),
    (b"1 4 2\n0 , 1:1\n", 2, "misplaced ','"),
    (b"1 4 2\n0 1:1:2\n", 2, "id:value"),
    (b"1 4 2\n0 1::2\n", 2, "no value"),
    (b"1 4 2\n0 : 1:2\n", 2, "misplaced ':'"),
    (b"1 4 2\n0 1:2,3\n", 2, "value '2'"),
    (b"1 4 2\n0 1.5:1\n", 2, "invalid feature id '1.5'"),
    (b"3 4 2\n0 1:1\n0 1:1 2:x\n0 1:nan\n", 3, "non-numeric"),  # earliest line wins
]


@pytest.mark.parametrize("content,line,fragment", ERRORS)
def test_xc_errors(tmp_path: Path, content: bytes, line: int, fragment: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataFormatError) as ei:
        load(p, fmt="xc")
    err = ei.value
    assert err.path == str(p)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    assert str(err).startswith(f"{p}:{line}: ")


def test_error_line_in_later_block(tmp_path: Path) -> None:
    rows = [b"0 1:1"] * 500 + [b"0 1:1 1:1"] + [b"0 1:1"] * 10
    p = tmp_path / "big.txt"
    p.write_bytes(b"511 4 2\n" + b"\n".join(rows) + b"\n")
    with pytest.raises(DataFormatError) as ei:
        F._load_xc(p, block_bytes=100)
    assert ei.value.line == 502 and "duplicate" in ei.value.message


def test_split_errors(tmp_path: Path) -> None:
    (tmp_path / "a_X_Xf.txt").write_text("2 3\n0:1\n1:1\n")
    (tmp_path / "a_X_Y.txt").write_text("2 2\n0:1\n1:0.5\n")
    with pytest.raises(DataFormatError, match=r"a_X_Y.txt:3: label value"):
        load(tmp_path / "a")
    (tmp_path / "a_X_Y.txt").write_text("1 2\n0:1\n")
    with pytest.raises(DataFormatError, match="pair must match"):
        load(tmp_path / "a")
    (tmp_path / "b_X_Xf.txt").write_text("1 3\n0 1:1\n")
    with pytest.raises(DataFormatError, match="expected id:value"):
        load(tmp_path / "b_X_Xf.txt")


def test_arff_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.arff"
    p.write_text("@relation r\n@attribute a numeric\n@attribute b {0,1}\n@data\n1,0\n")
    with pytest.raises(DataFormatError, match="cannot tell which attributes are labels"):
        load(p)
    p.write_text("@relation 'r -C -1'\n@attribute a numeric\n@attribute b {0,1}\n@data\n1,0\n?,1\n")
    with pytest.raises(DataFormatError, match=r"x.arff:6: missing value"):
        load(p)
    p.write_text("@relation 'r -C -1'\n@attribute a numeric\n@attribute b numeric\n@data\n1,0.5\n")
    with pytest.raises(DataFormatError, match=r"x.arff:5: label attribute"):
        load(p)
    p.write_text("@relation 'r -C -1'\n@attribute a numeric\n@attribute b {0,1}\n@data\n1,0,1\n")
    with pytest.raises(DataFormatError, match=r"x.arff:5: dense row has 3 values"):
        load(p)
    xml = tmp_path / "x.xml"
    xml.write_text('<labels><label name="nope"></label></labels>')
    with pytest.raises(DataFormatError, match="'nope'"):
        load(p)


def test_label_names_count_mismatch() -> None:
    with pytest.raises(DataFormatError, match="3 label names but the data set has 4 labels"):
        load(FIX / "tiny.txt", label_names_from=FIX / "tiny.xml")


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="unknown format"):
        load(FIX / "tiny.txt", fmt="csv")
    with pytest.raises(DataFormatError, match="no such file"):
        load(tmp_path / "none.txt", fmt="xc")


# ---------------------------------------------------------------- real data (skip when absent)
def test_bibtex(bibtex_train: Path, bibtex_test: Path) -> None:
    ds = load(bibtex_train, label_names_from=bibtex_train.parent / "bibtex_labels.xml")
    _check_csr(ds)
    assert (ds.num_points, ds.num_features, ds.num_labels) == (4880, 1836, 159)
    assert len(ds.label_names) == 159 and ds.label_names[0] == "TAG_2005"
    te = load(bibtex_test)
    assert (te.num_points, te.num_features, te.num_labels) == (2515, 1836, 159)


def test_bibtex_matches_sklearn(bibtex_train: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_svmlight_file

    body = bibtex_train.read_bytes().split(b"\n", 1)[1]
    (tmp_path / "b.svm").write_bytes(body)
    X, y = load_svmlight_file(str(tmp_path / "b.svm"), multilabel=True, zero_based=True, n_features=1836)
    ds = load(bibtex_train)
    assert (X != ds.X).nnz == 0
    rows, cols = ds.Y.nonzero()
    ref = [(i, int(c)) for i, labs in enumerate(y) for c in labs]
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(ref)


@pytest.mark.parametrize(
    "name,labels,features,train_rows,test_rows",
    [("medical", 45, 1449, 333, 645), ("enron", 53, 1001, 1123, 579), ("emotions", 6, 72, 391, 202)],
)
def test_mulan_sets(shared_data: Path, name: str, labels: int, features: int, train_rows: int, test_rows: int) -> None:
    d = shared_data / "arff" / name
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    xml_names = re.findall(r'<label name="([^"]*)"', (d / f"{name}.xml").read_text())
    for split, rows in (("train", train_rows), ("test", test_rows)):
        ds = load(d / f"{name}-{split}.arff")
        _check_csr(ds)
        assert ds.X.shape == (rows, features) and ds.Y.shape == (rows, labels)
        assert ds.label_names == xml_names
        assert ds.Y.nnz > 0 and ds.X.nnz > 0
    if name == "emotions":
        assert ds.X.nnz > 0.9 * rows * features  # dense rows
