"""Loaders under fuzzing: corrupted XC, XC split, svmlight, npz and ARFF files.

Every corruption must end in :class:`DataFormatError` naming the file (and the line, for
line-bound problems) -- never a raw traceback, a hang, or a silently different matrix. A
corruption that still parses must give exactly the matrix that the corrupted text means, which
an independent slow pure-Python reference parser (below) computes. Hypothesis runs with
``derandomize=True`` so the counts written to ``docs/reliability.md`` are reproducible.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability import case, describe_error, reliability  # noqa: F401  (fixture)

from xmc_toolkit.data import XMCDataset, load, save
from xmc_toolkit.errors import DataFormatError

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "formats"
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None)
TIMEOUT_S = 20.0


# ------------------------------------------------------------------------------------------------
# independent reference parsers (slow, line by line; semantics of docs/data-formats.md)
# ------------------------------------------------------------------------------------------------
class RefError(Exception):
    def __init__(self, line: int | None, msg: str) -> None:
        super().__init__(msg)
        self.line = line


_ID = re.compile(rb"[0-9]{1,18}")
_FLOAT = re.compile(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_WS = re.compile(rb"[ \t\r]+")


def _lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def _ref_id(tok: bytes, lineno: int) -> int:
    if not _ID.fullmatch(tok):
        raise RefError(lineno, f"bad id {tok!r}")
    return int(tok)


def _ref_value(tok: bytes, lineno: int) -> np.float32:
    if not _FLOAT.fullmatch(tok):
        raise RefError(lineno, f"bad value {tok!r}")
    with np.errstate(over="ignore"):
        v = np.float32(float(tok))
    if not np.isfinite(v):
        raise RefError(lineno, f"non-finite value {tok!r}")
    return v


def _ref_row(line: bytes, lineno: int, has_labels: bool) -> tuple[list[int], dict[int, np.float32]]:
    labels: list[int] = []
    if has_labels and line[:1] not in (b" ", b"\t", b"\r", b""):
        m = re.match(rb"[^ \t\r]*", line)
        assert m is not None
        lab_tok, rest = m.group(0), line[m.end():]
        if b":" in lab_tok:
            raise RefError(lineno, "pair where labels were expected")
        labels = [_ref_id(t, lineno) for t in lab_tok.split(b",")]
        if len(set(labels)) != len(labels):
            raise RefError(lineno, "duplicate label")
    else:
        rest = line
    feats: dict[int, np.float32] = {}
    for tok in _WS.split(rest.strip(b" \t\r")):
        if not tok:
            continue
        parts = tok.split(b":")
        if len(parts) != 2:
            raise RefError(lineno, f"bad pair {tok!r}")
        fid = _ref_id(parts[0], lineno)
        val = _ref_value(parts[1], lineno)
        if fid in feats:
            raise RefError(lineno, "duplicate feature")
        feats[fid] = val
    return labels, feats


def _dense(rows: list[tuple[list[int], dict[int, np.float32]]], n: int, d: int, l: int
           ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The meaning of parsed rows as sparse matrices (dimensions may be huge)."""
    xr, xc, xv, yr, yc = [], [], [], [], []
    for i, (labs, feats) in enumerate(rows[:n]):
        yr += [i] * len(labs)
        yc += labs
        for j, v in feats.items():
            xr.append(i)
            xc.append(j)
            xv.append(v)
    X = sp.csr_matrix((np.array(xv, dtype=np.float32), (np.array(xr, dtype=np.int64),
                       np.array(xc, dtype=np.int64))), shape=(n, d))
    Y = sp.csr_matrix((np.ones(len(yr), dtype=np.float32), (np.array(yr, dtype=np.int64),
                       np.array(yc, dtype=np.int64))), shape=(n, l))
    return X, Y


def _ref_header(line: bytes | None, count: int) -> tuple[int, ...]:
    if line is None:
        raise RefError(1, "empty file")
    fields = _WS.split(line.strip(b" \t\r"))
    if len(fields) != count or not all(re.fullmatch(rb"[0-9]+", f) for f in fields):
        raise RefError(1, "bad header")
    vals = tuple(int(f) for f in fields)
    if any(v >= 2**62 for v in vals):
        raise RefError(1, "header too large")
    return vals


def _ref_body(lines: list[bytes], n: int, first: int, has_labels: bool, d: int, l: int
              ) -> list[tuple[list[int], dict[int, np.float32]]]:
    rows = []
    for k, line in enumerate(lines):
        lineno = first + k
        labs, feats = _ref_row(line, lineno, has_labels)
        if k >= n and (labs or feats):
            raise RefError(lineno, "more rows than the header")
        if any(j >= l for j in labs) or any(j >= d for j in feats):
            raise RefError(lineno, "id out of range")
        rows.append((labs, feats))
    if len(lines) < n:
        raise RefError(first + len(lines), "truncated")
    return rows


def ref_xc(data: bytes) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    lines = _lines(data)
    n, d, l = _ref_header(lines[0] if lines else None, 3)
    return _dense(_ref_body(lines[1:], n, 2, True, d, l), n, d, l)


def ref_split(data: bytes, binary: bool = False) -> sp.csr_matrix:
    lines = _lines(data)
    n, d = _ref_header(lines[0] if lines else None, 2)
    rows = _ref_body(lines[1:], n, 2, False, d, 1)
    if binary:
        for k, (_, feats) in enumerate(rows[:n]):
            if any(v != 1 for v in feats.values()):
                raise RefError(k + 2, "label value not 1")
    return _dense(rows, n, d, 1)[0]


_SVM_MARK = b"# xmc-toolkit svmlight"


def ref_svmlight(data: bytes) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    lines = _lines(data)
    marker: dict[bytes, int] = {}
    first = 1
    if lines and lines[0].startswith(_SVM_MARK):  # the header written by save()
        for tok in lines[0][len(_SVM_MARK):].split():
            key, _, value = tok.partition(b"=")
            if (key not in (b"zero_based", b"num_features", b"num_labels")
                    or not re.fullmatch(rb"[0-9]{1,18}", value)
                    or (key == b"zero_based" and value not in (b"0", b"1"))):
                raise RefError(1, f"bad header entry {tok!r}")
            marker[key] = int(value)
        lines, first = lines[1:], 2
    if not lines:
        raise RefError(None, "empty file")
    rows = [_ref_row(line, k + first, True) for k, line in enumerate(lines)]
    fids = [j for _, f in rows for j in f]
    labs = [j for lab, _ in rows for j in lab]
    if b"zero_based" in marker:
        one_based = not marker[b"zero_based"]
        if one_based and fids and min(fids) == 0:
            raise RefError(None, "feature id 0 in a 1-based file")
    else:
        one_based = bool(fids) and min(fids) > 0
    if one_based:
        rows = [(lab, {j - 1: v for j, v in f.items()}) for lab, f in rows]
    d = max((j for _, f in rows for j in f), default=-1) + 1
    l = max(labs, default=-1) + 1
    if b"num_features" in marker:
        if d > marker[b"num_features"]:
            raise RefError(None, "feature id >= num_features")
        d = marker[b"num_features"]
    if b"num_labels" in marker:
        if l > marker[b"num_labels"]:
            raise RefError(None, "label id >= num_labels")
        l = marker[b"num_labels"]
    return _dense(rows, len(rows), d, l)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _with_timeout(fn: Callable[[], object]) -> tuple[object, BaseException | None]:
    """Run ``fn`` in a thread; fail the test if it does not finish within ``TIMEOUT_S``."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if t.is_alive():
        pytest.fail(f"loader did not finish within {TIMEOUT_S} s (hang)")
    return box.get("value"), box.get("error")  # type: ignore[return-value]


class Tally:
    """Counts outcomes of one fuzzed case for the reliability record."""

    def __init__(self) -> None:
        self.errors = 0
        self.line_bound = 0
        self.parsed = 0

    def text(self) -> str:
        total = self.errors + self.parsed
        return (f"{total} corruptions: {self.errors} DataFormatError ({self.line_bound} with a "
                f"line), {self.parsed} parsed equal to the reference meaning; 0 other outcomes")


def _check_error(err: BaseException | None, path: Path, nlines: int, tally: Tally,
                 ref_line: int | None = None) -> None:
    if not isinstance(err, DataFormatError):
        raise AssertionError(f"expected DataFormatError, got {err!r}") from err
    assert err.path is not None and Path(err.path).name == path.name, err
    if err.line is not None:
        assert 1 <= err.line <= nlines + 1, (err.line, nlines, str(err))
        if ref_line is not None:
            assert err.line == ref_line, (str(err), ref_line)
        tally.line_bound += 1
    tally.errors += 1


def _valid_ds(draw: st.DrawFn) -> XMCDataset:
    n = draw(st.integers(1, 5))
    d = draw(st.integers(1, 6))
    l = draw(st.integers(1, 5))
    vals = st.sampled_from([0.5, -1.25, 3.0, 1e-3, 2.0, -7.5e2])
    X = np.zeros((n, d), dtype=np.float32)
    Y = np.zeros((n, l), dtype=np.float32)
    for i in range(n):
        for j in draw(st.sets(st.integers(0, d - 1), max_size=d)):
            X[i, j] = draw(vals)
        for j in draw(st.sets(st.integers(0, l - 1), max_size=l)):
            Y[i, j] = 1
    return XMCDataset(sp.csr_matrix(X), sp.csr_matrix(Y))


_EVIL_TOKENS = [b"-1", b"nan", b"inf", b"-inf", b"1e39", b"1e400", b"2147483648",
                b"99999999999999999", b"99999999999999999999", b"\xff\xfe", b"", b"0", b"7",
                b"1,1", b"1:1", b"0:0:1", b":", b",", b"1e", b"--2", b"0x10", b"1.2.3",
                b"\xc2\xb2", b"\x00", b"\x0c", b"3 3", b"+.5"]
_EVIL_BYTES = b",: \t\r\n-+.e09\xff\x00\x0b\x0c"
KINDS = ("truncate", "token", "byte", "header", "id-range", "duplicate", "empty", "non-utf8")


@st.composite
def corruption(draw: st.DrawFn, data: bytes, kind: str, has_header: bool) -> bytes:
    """One corruption of ``data`` of the given kind."""
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\n"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    toks = [m for m in re.finditer(rb"[^ \t\r\n,:]+", data)]
    if kind == "token" and toks:
        m = draw(st.sampled_from(toks))
        return data[: m.start()] + draw(st.sampled_from(_EVIL_TOKENS)) + data[m.end():]
    if kind == "byte":
        pos = draw(st.integers(0, len(data)))
        b = bytes([draw(st.sampled_from(list(_EVIL_BYTES)))])
        replace = draw(st.booleans())
        return data[:pos] + b + data[pos + (1 if replace else 0):]
    if kind == "non-utf8":
        pos = draw(st.integers(0, len(data)))
        return data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + data[pos:]
    if kind == "header" and has_header:
        first, _, rest = data.partition(b"\n")
        nums = first.split()
        k = draw(st.integers(0, len(nums) - 1))
        new = draw(st.sampled_from([0, 1, 2, 2**31, 10**18, 10**30]))
        nums[k] = str(new).encode() if draw(st.booleans()) else str(max(0, int(nums[k]) - 1)).encode()
        extra = draw(st.sampled_from([b"", b" 5", b" x"]))
        return b" ".join(nums) + extra + b"\n" + rest
    if kind == "id-range":
        ids = [m for m in re.finditer(rb"(?<![:.0-9])[0-9]+(?=[,: \n]|$)", data)]
        if has_header:
            ids = [m for m in ids if m.start() > data.find(b"\n")]
        if ids:
            m = draw(st.sampled_from(ids))
            new = draw(st.sampled_from([b"6", b"9", b"-0", b"-3", b"2147483647", b"4294967296",
                                        b"999999999999999999"]))
            return data[: m.start()] + new + data[m.end():]
    if kind == "duplicate":
        pairs = [m for m in re.finditer(rb"[0-9]+:[^ \n]+|(?<=\n)[0-9]+(?=[, \n])", data)]
        if pairs:
            m = draw(st.sampled_from(pairs))
            sep = b"," if b":" not in m.group(0) else b" "
            return data[: m.end()] + sep + m.group(0) + data[m.end():]
    return data  # nothing to corrupt: the valid file must still load


# ------------------------------------------------------------------------------------------------
# XC, split, svmlight
# ------------------------------------------------------------------------------------------------
TEXT_CASES = {
    (fmt, kind): case(
        "loaders", f"{fmt}: {kind} (Hypothesis)",
        "DataFormatError naming the file (and line when line-bound), or a matrix equal to the "
        "reference meaning of the corrupted text; no other exception, no hang")
    for fmt in ("xc", "xc-split", "svmlight") for kind in KINDS
}


def _same(a: sp.spmatrix, b: sp.spmatrix) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (sp.csr_matrix(a, dtype=np.float64) - sp.csr_matrix(b, dtype=np.float64))
    assert diff.count_nonzero() == 0, "matrix differs from the reference meaning of the text"


def _compare(ds: XMCDataset, X: sp.spmatrix, Y: sp.spmatrix | None) -> None:
    assert ds.X.dtype == np.float32
    _same(ds.X, X)
    if Y is not None:
        _same(ds.Y, Y)


def _fuzz_xc(data: bytes, path: Path, tally: Tally) -> None:
    path.write_bytes(data)
    value, err = _with_timeout(lambda: load(path, "xc"))
    try:
        X, Y = ref_xc(data)
    except RefError as ref:
        _check_error(err, path, data.count(b"\n") + 1, tally, ref.line)
        return
    if err is not None:
        raise AssertionError(f"reference parses but the loader raised {err!r}") from err
    _compare(value, X, Y)  # type: ignore[arg-type]
    tally.parsed += 1


def _fuzz_svmlight(data: bytes, path: Path, tally: Tally) -> None:
    path.write_bytes(data)
    value, err = _with_timeout(lambda: load(path, "svmlight"))
    try:
        X, Y = ref_svmlight(data)
    except RefError as ref:
        _check_error(err, path, data.count(b"\n") + 1, tally, ref.line)
        return
    if err is not None:
        raise AssertionError(f"reference parses but the loader raised {err!r}") from err
    _compare(value, X, Y)  # type: ignore[arg-type]
    tally.parsed += 1


def _fuzz_split(x_data: bytes, y_data: bytes, prefix: Path, tally: Tally) -> None:
    xp, yp = Path(f"{prefix}_X_Xf.txt"), Path(f"{prefix}_X_Y.txt")
    xp.write_bytes(x_data)
    yp.write_bytes(y_data)
    value, err = _with_timeout(lambda: load(prefix, "xc-split"))
    try:
        X = ref_split(x_data)
    except RefError as ref:
        _check_error(err, xp, x_data.count(b"\n") + 1, tally, ref.line)
        return
    try:
        Yv = ref_split(y_data, binary=True)
        if Yv.shape[0] != X.shape[0]:
            raise RefError(1, "row count differs")
    except RefError as ref:
        _check_error(err, yp, y_data.count(b"\n") + 1, tally, ref.line)
        return
    if err is not None:
        raise AssertionError(f"reference parses but the loader raised {err!r}") from err
    _compare(value, X, None)  # type: ignore[arg-type]
    _same(value.Y, Yv)  # type: ignore[union-attr]
    tally.parsed += 1


def _record_kind(fmt: str, kind: str, body: Callable[[Tally], None], reliability) -> None:
    tally = Tally()
    body(tally)
    reliability.record(TEXT_CASES[(fmt, kind)], tally.text())


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_xc(kind: str, tmp_path: Path, reliability) -> None:
    path = tmp_path / "fuzz.txt"

    def body(tally: Tally) -> None:
        @FUZZ
        @given(st.data())
        def run(data: st.DataObject) -> None:
            ds = data.draw(st.composite(_valid_ds)())
            save(ds, path, "xc")
            raw = path.read_bytes()
            _fuzz_xc(data.draw(corruption(raw, kind, True)), path, tally)

        run()

    _record_kind("xc", kind, body, reliability)


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_svmlight(kind: str, tmp_path: Path, reliability) -> None:
    path = tmp_path / "fuzz.svm"

    def body(tally: Tally) -> None:
        @FUZZ
        @given(st.data())
        def run(data: st.DataObject) -> None:
            ds = data.draw(st.composite(_valid_ds)())
            save(ds, path, "svmlight")
            raw = path.read_bytes()
            if data.draw(st.booleans()):  # the rows only, the xmc-toolkit header line intact
                head, _, body = raw.partition(b"\n")
                bad = head + b"\n" + data.draw(corruption(body, kind, False))
            else:  # the whole file, header line included
                bad = data.draw(corruption(raw, kind, False))
            _fuzz_svmlight(bad, path, tally)

        run()

    _record_kind("svmlight", kind, body, reliability)


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_xc_split(kind: str, tmp_path: Path, reliability) -> None:
    prefix = tmp_path / "trn"

    def body(tally: Tally) -> None:
        @FUZZ
        @given(st.data())
        def run(data: st.DataObject) -> None:
            ds = data.draw(st.composite(_valid_ds)())
            save(ds, prefix, "xc-split")
            xb = Path(f"{prefix}_X_Xf.txt").read_bytes()
            yb = Path(f"{prefix}_X_Y.txt").read_bytes()
            if data.draw(st.booleans()):
                xb = data.draw(corruption(xb, kind, True))
            else:
                yb = data.draw(corruption(yb, kind, True))
            _fuzz_split(xb, yb, prefix, tally)

        run()

    _record_kind("xc-split", kind, body, reliability)


# ------------------------------------------------------------------------------------------------
# npz: structured corruptions and Hypothesis byte damage
# ------------------------------------------------------------------------------------------------
def _npz_bytes(**override: object) -> bytes:
    arrays: dict[str, object] = dict(
        X_data=np.array([1.0, 2.0, 3.0], np.float32), X_indices=np.array([0, 1, 2], np.int32),
        X_indptr=np.array([0, 1, 2, 3], np.int32), X_shape=np.array([3, 3]),
        Y_data=np.ones(3, np.float32), Y_indices=np.array([0, 1, 2], np.int32),
        Y_indptr=np.array([0, 1, 2, 3], np.int32), Y_shape=np.array([3, 3]))
    for k, v in override.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    bio = io.BytesIO()
    np.savez(bio, **arrays)  # type: ignore[arg-type]
    return bio.getvalue()


NPZ_CASES = {
    "truncated archive": lambda: _npz_bytes()[: len(_npz_bytes()) // 2],
    "empty file": lambda: b"",
    "not a zip (text)": lambda: b"3 3 3\n0 0:1\n",
    "negative column index": lambda: _npz_bytes(X_indices=np.array([0, -1, 2], np.int32)),
    "column index out of range": lambda: _npz_bytes(X_indices=np.array([0, 5, 2], np.int32)),
    "column index beyond int32 (2**31)": lambda: _npz_bytes(
        X_indices=np.array([0, 2**31, 2], np.int64)),
    "NaN value": lambda: _npz_bytes(X_data=np.array([1, np.nan, 3], np.float32)),
    "infinite value": lambda: _npz_bytes(X_data=np.array([1, np.inf, 3], np.float32)),
    "negative shape": lambda: _npz_bytes(X_shape=np.array([3, -3])),
    "shape with 3 entries": lambda: _npz_bytes(X_shape=np.array([3, 3, 1])),
    "2-D shape array": lambda: _npz_bytes(X_shape=np.array([[3, 3]])),
    "float index array": lambda: _npz_bytes(X_indices=np.array([0.0, 1.5, 2.0])),
    "decreasing indptr": lambda: _npz_bytes(X_indptr=np.array([0, 2, 1, 3], np.int32)),
    "indptr too short": lambda: _npz_bytes(X_indptr=np.array([0, 1, 3], np.int32)),
    "duplicated column id in a row": lambda: _npz_bytes(
        X_indices=np.array([0, 0, 2], np.int32), X_indptr=np.array([0, 2, 2, 3], np.int32)),
    "non-binary label value": lambda: _npz_bytes(Y_data=np.array([1, 2, 1], np.float32)),
    "X and Y row counts differ": lambda: _npz_bytes(
        Y_shape=np.array([2, 3]), Y_indptr=np.array([0, 1, 2], np.int32),
        Y_indices=np.array([0, 1], np.int32), Y_data=np.ones(2, np.float32)),
    "missing array": lambda: _npz_bytes(Y_indptr=None),
    "string data array": lambda: _npz_bytes(X_data=np.array(["a", "b", "c"])),
    "object (pickled) array": lambda: _npz_pickled(),
    "label_names count differs from L": lambda: _npz_bytes(label_names=np.array(["a", "b"])),
}
NPZ_DECL = {name: case("loaders", f"npz: {name}", "DataFormatError naming the file")
            for name in NPZ_CASES}
NPZ_OK = {
    "unsorted column ids (valid)": (
        lambda: _npz_bytes(X_indices=np.array([2, 0, 1], np.int32),
                           X_indptr=np.array([0, 2, 2, 3], np.int32)),
        np.array([[2, 0, 1], [0, 0, 0], [0, 3, 0]], np.float32)),
}
NPZ_OK_DECL = {name: case("loaders", f"npz: {name}", "loads; equals the stored matrix")
               for name in NPZ_OK}


def _npz_pickled() -> bytes:
    bio = io.BytesIO()
    np.savez(bio, X_data=np.array([{"a": 1}], dtype=object))
    return bio.getvalue()


@pytest.mark.parametrize("name", list(NPZ_CASES))
def test_npz_corruptions(name: str, tmp_path: Path, reliability) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(NPZ_CASES[name]())
    _, err = _with_timeout(lambda: load(path))
    assert isinstance(err, DataFormatError), repr(err)
    assert err.path is not None and Path(err.path).name == "bad.npz"
    reliability.record(NPZ_DECL[name], describe_error(err))


@pytest.mark.parametrize("name", list(NPZ_OK))
def test_npz_valid_variants(name: str, tmp_path: Path, reliability) -> None:
    make, X = NPZ_OK[name]
    path = tmp_path / "ok.npz"
    path.write_bytes(make())
    ds = load(path)
    np.testing.assert_array_equal(ds.X.toarray(), X)
    assert ds.X.has_sorted_indices
    reliability.record(NPZ_OK_DECL[name], f"loads, X equals the stored matrix {ds.X.shape}")


NPZ_FUZZ = case("loaders", "npz: truncation / byte damage (Hypothesis)",
                "DataFormatError naming the file, or the undamaged matrix (damage in unused "
                "zip metadata)")


def test_npz_fuzz_bytes(tmp_path: Path, reliability) -> None:
    ds = XMCDataset(sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]], np.float32)),
                    sp.csr_matrix(np.array([[1, 0], [1, 1]], np.float32)))
    good = tmp_path / "good.npz"
    save(ds, good)
    raw = good.read_bytes()
    path = tmp_path / "fuzz.npz"
    tally = Tally()

    @FUZZ
    @given(st.integers(0, len(raw) - 1), st.integers(0, 255), st.booleans())
    def run(pos: int, byte: int, truncate: bool) -> None:
        data = raw[:pos] if truncate else raw[:pos] + bytes([byte]) + raw[pos + 1:]
        path.write_bytes(data)
        value, err = _with_timeout(lambda: load(path))
        if err is not None:
            _check_error(err, path, 0, tally)
            return
        _compare(value, ds.X, ds.Y)  # type: ignore[arg-type]
        tally.parsed += 1

    run()
    reliability.record(NPZ_FUZZ, tally.text().replace("reference meaning", "original matrix"))


# ------------------------------------------------------------------------------------------------
# ARFF (MEKA header: 2 label attributes y0 y1 {0,1}, 2 numeric features x0 x1)
# ------------------------------------------------------------------------------------------------
MEKA = (FIX / "meka.arff").read_bytes()


def ref_meka(data: bytes) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Reference meaning of the data section of a file whose header equals meka.arff's."""
    head_end = MEKA.index(b"@data") + len(b"@data\n")
    if not data.startswith(MEKA[:head_end]):
        raise RefError(None, "header damaged")
    text = data[head_end:].decode("utf-8", errors="replace")
    rows: list[tuple[list[int], dict[int, np.float32]]] = []
    for k, line in enumerate(text.split("\n")):
        lineno = MEKA[:head_end].count(b"\n") + 1 + k
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        if s.startswith("{"):
            if not s.endswith("}"):
                raise RefError(lineno, "no }")
            body = s[1:-1].strip()
            vals: dict[int, str] = {}
            for item in body.split(",") if body else []:
                parts = item.split()
                if len(parts) != 2:
                    raise RefError(lineno, "bad item")
                try:
                    j = int(parts[0])
                except ValueError:
                    raise RefError(lineno, "bad index") from None
                if j in vals or not 0 <= j < 4:
                    raise RefError(lineno, "bad index")
                vals[j] = parts[1]
        else:
            items = [v.strip() for v in s.split(",")]
            if len(items) != 4:
                raise RefError(lineno, "wrong count")
            vals = dict(enumerate(items))
        labs: list[int] = []
        feats: dict[int, np.float32] = {}
        for j, v in vals.items():
            v = v.strip("'\"")
            if j < 2:
                if v not in ("0", "1"):
                    raise RefError(lineno, "bad label")
                if v == "1":
                    labs.append(j)
            else:
                try:
                    with np.errstate(over="ignore"):
                        f = np.float32(float(v))
                except ValueError:
                    raise RefError(lineno, "bad value") from None
                if not np.isfinite(f):
                    raise RefError(lineno, "non-finite")
                if f != 0:
                    feats[j - 2] = f
        rows.append((labs, feats))
    return _dense(rows, len(rows), 2, 2)


ARFF_CASES = {kind: case("loaders", f"arff: {kind} (Hypothesis)",
                         "DataFormatError naming the file (and line when line-bound), or the "
                         "reference meaning of the corrupted rows")
              for kind in ("truncate", "token", "byte", "non-utf8", "empty")}


@pytest.mark.parametrize("kind", list(ARFF_CASES))
def test_fuzz_arff(kind: str, tmp_path: Path, reliability) -> None:
    path = tmp_path / "fuzz.arff"
    tally = Tally()

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        raw = data.draw(corruption(MEKA, kind, False))
        path.write_bytes(raw)
        value, err = _with_timeout(lambda: load(path))
        try:
            X, Y = ref_meka(raw)
        except RefError as ref:
            if ref.line is None and err is None:  # header damaged but still a valid header
                tally.parsed += 1
                return
            _check_error(err, path, raw.count(b"\n") + 1, tally, None)
            return
        if err is not None:
            raise AssertionError(f"reference parses but the loader raised {err!r}") from err
        X_ = sp.csr_matrix(value.X)  # type: ignore[union-attr]
        X_.eliminate_zeros()
        _compare(XMCDataset(X_, value.Y), X, Y)  # type: ignore[union-attr]
        tally.parsed += 1

    run()
    reliability.record(ARFF_CASES[kind], tally.text())
