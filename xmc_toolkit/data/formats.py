"""Reading and writing multi-label data sets: XC, XC split files, svmlight, npz, Mulan/MEKA ARFF.

``load(path, fmt=None)`` returns an :class:`~xmc_toolkit.data.dataset.XMCDataset` whose ``X`` is a
``csr_matrix`` float32 ``[N, D]`` with sorted indices and whose ``Y`` is a binary ``csr_matrix``
float32 ``[N, L]``. ``save(ds, path, fmt=None)`` writes one. Text formats are parsed in blocks
of bytes with numpy (no Python object per non-zero, see ``_textparse``); every problem raises
:class:`~xmc_toolkit.errors.DataFormatError` with the file and the 1-based line number.

Formats (names accepted by ``fmt``): ``"xc"``, ``"xc-split"``, ``"svmlight"``, ``"npz"``,
``"arff"``. See ``docs/data-formats.md`` for examples.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from .._fileio import atomic_write
from ..errors import DataFormatError
from ._arff import read_arff, read_label_names
from ._textparse import BlockError, ParsedBlock, parse_block
from ._textwrite import format_rows
from .dataset import XMCDataset

__all__ = [
    "FORMATS",
    "load",
    "save",
    "infer_format",
    "open_text_bytes",
    "is_single_matrix_npz",
    "DECOMPRESSION_ERRORS",
    "damaged_file_error",
    "read_label_names",
    "write_xc_header",
    "append_xc_rows",
    "dataset_stats",
]

logger = logging.getLogger(__name__)

FORMATS = ("xc", "xc-split", "svmlight", "npz", "arff")
_BLOCK_BYTES = 8 * 1024 * 1024
_WRITE_ROWS = 65536
_SPLIT_X = "_X_Xf.txt"
_SPLIT_Y = "_X_Y.txt"
_SVM_SUFFIXES = (".svm", ".svmlight", ".libsvm")
_MAX_DIM = 2**62  # header counts must fit int64 index arithmetic
PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------
# format inference
# ------------------------------------------------------------------------------------------------
def _split_prefix(path: Path) -> Path | None:
    """The prefix ``dir/trn`` of a split pair given either file, the prefix, or a directory."""
    name = path.name
    for suffix in (_SPLIT_X, _SPLIT_Y):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    if path.is_dir():
        found = sorted(p.name[: -len(_SPLIT_X)] for p in path.glob("*" + _SPLIT_X))
        if len(found) == 1:
            return path / found[0]
        if len(found) > 1:
            raise DataFormatError(
                path,
                None,
                f"directory holds several split pairs ({', '.join(found)}); pass a prefix such as "
                f"{path / found[0]} or one of its files",
            )
        return None
    if Path(str(path) + _SPLIT_X).exists() or Path(str(path) + _SPLIT_Y).exists():
        return path
    return None


def infer_format(path: PathLike) -> str:
    """Guess the format of ``path`` from its name, then from its first line.

    Rules: ``*_X_Xf.txt`` / ``*_X_Y.txt`` / a split prefix or a directory holding one pair ->
    ``xc-split``; ``*.npz`` -> ``npz``; ``*.arff`` -> ``arff``; ``*.svm|.svmlight|.libsvm`` ->
    ``svmlight``; otherwise a first line of three integers -> ``xc``, anything else ->
    ``svmlight``.

    Raises:
        DataFormatError: the path does not exist or its format cannot be told.
    """
    p = Path(path)
    if _split_prefix(p) is not None:
        return "xc-split"
    suffix = p.suffix.lower()
    if suffix in _COMPRESSED_SUFFIXES:  # compressed text: the format of the name without it
        suffix = Path(p.stem).suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".arff":
        return "arff"
    if suffix in _SVM_SUFFIXES:
        return "svmlight"
    if not p.exists():
        raise DataFormatError(p, None, "no such file or directory")
    if p.is_dir():
        raise DataFormatError(
            p, None, f"directory holds no *{_SPLIT_X} / *{_SPLIT_Y} pair; pass a file instead"
        )
    with open_text_bytes(p) as fh:
        try:
            first = fh.readline(4096)
        except DECOMPRESSION_ERRORS as exc:
            raise damaged_file_error(p, exc) from None
    if re.fullmatch(rb"\s*\d+\s+\d+\s+\d+\s*", first):
        return "xc"
    return "svmlight"


# ------------------------------------------------------------------------------------------------
# block-wise text reading
# ------------------------------------------------------------------------------------------------
_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark (written by some Windows editors)


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    return (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)


DECOMPRESSION_ERRORS = _decompression_errors()


def damaged_file_error(path: PathLike, exc: BaseException) -> DataFormatError:
    """The error for a compressed file that cannot be decompressed to its end."""
    return DataFormatError(path, None, f"cannot decompress the file ({type(exc).__name__}: "
                           f"{exc}); it is damaged or truncated: download or compress it again")


def open_text_bytes(path: PathLike) -> IO[bytes]:
    """Open a text data file for binary reading, decompressing gzip, bzip2 and xz transparently.

    The compression is told by the file's first bytes (gzip ``1f 8b``, bzip2 ``BZh``, xz
    ``fd 37 7a 58 5a 00``), whatever its name, so ``train.txt.gz`` / ``.bz2`` / ``.xz`` load
    like ``train.txt``, streamed; line numbers in errors are lines of the decompressed text.
    A leading UTF-8 byte-order mark (of the decompressed text) is skipped.
    """
    fh: IO[bytes] = open(path, "rb")
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        fh.close()
        fh = gzip.open(path, "rb")  # type: ignore[assignment]
    elif magic.startswith(_BZ2_MAGIC) and len(magic) >= 4 and magic[3:4].isdigit():
        import bz2

        fh.close()
        fh = bz2.open(path, "rb")  # type: ignore[assignment]
    elif magic == _XZ_MAGIC:
        import lzma

        fh.close()
        fh = lzma.open(path, "rb")  # type: ignore[assignment]
    try:
        bom = fh.read(3) == _BOM
    except DECOMPRESSION_ERRORS as exc:
        fh.close()
        raise damaged_file_error(path, exc) from None
    if not bom:
        fh.seek(0)
    return fh


def _read_header(fh: IO[bytes], path: Path, names: tuple[str, ...]) -> tuple[int, ...]:
    raw = fh.readline()
    text = raw.decode("utf-8", errors="replace").strip(" \t\r\n")
    fields = re.split(r"[ \t\r]+", text) if text else []  # the blanks of the row grammar only
    expected = " ".join(names)
    if not raw:
        raise DataFormatError(path, 1, f"empty file: expected a header line '{expected}'")
    if len(fields) != len(names) or not all(re.fullmatch(r"[0-9]+", f) for f in fields):
        raise DataFormatError(
            path,
            1,
            f"expected a header '{expected}' ({len(names)} non-negative integers), found "
            f"{text[:80]!r}",
        )
    values = tuple(int(f) for f in fields)
    for name, v in zip(names, values):
        if v >= _MAX_DIM:
            raise DataFormatError(
                path, 1, f"header {name}={v} is too large (limit {_MAX_DIM - 1}); fix the header"
            )
    return values


def _iter_blocks(fh: IO[bytes], block_bytes: int) -> Any:
    """Yield blocks of whole lines (each ends with ``\\n``)."""
    carry = b""
    while True:
        chunk = fh.read(block_bytes)
        if not chunk:
            if carry:
                yield carry + b"\n"
            return
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1 :]
        yield data[: cut + 1] if cut + 1 < len(data) else data
        del data


class _Rows:
    """Accumulates parsed blocks and assembles the CSR matrices."""

    def __init__(self) -> None:
        self.blocks: list[ParsedBlock] = []
        self.num_lines = 0

    def add(self, block: ParsedBlock) -> None:
        self.blocks.append(block)
        self.num_lines += block.num_lines

    def line_tokens(self) -> np.ndarray:
        """``[num_lines]`` number of labels + pairs on each line."""
        if not self.blocks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([b.label_counts + b.feature_counts for b in self.blocks])

    def matrices(
        self, num_rows: int, num_features: int, num_labels: int
    ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Assemble CSR matrices, releasing each block as soon as it is copied.

        The outputs are allocated with ``np.empty`` (pages are only touched while blocks are
        copied in and freed), so the peak stays near one copy of the data.
        """
        f_counts = np.concatenate([b.feature_counts for b in self.blocks] or [np.zeros(0, np.int64)])
        l_counts = np.concatenate([b.label_counts for b in self.blocks] or [np.zeros(0, np.int64)])
        f_counts, l_counts = f_counts[:num_rows], l_counts[:num_rows]
        x_ptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(f_counts, out=x_ptr[1:])
        y_ptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(l_counts, out=y_ptr[1:])
        nnz_x, nnz_y = int(x_ptr[-1]), int(y_ptr[-1])
        idx_x = np.int32 if max(num_features, nnz_x) < 2**31 else np.int64
        idx_y = np.int32 if max(num_labels, nnz_y) < 2**31 else np.int64
        x_ind = np.empty(nnz_x, dtype=idx_x)
        x_val = np.empty(nnz_x, dtype=np.float32)
        y_ind = np.empty(nnz_y, dtype=idx_y)
        fx = fy = 0
        while self.blocks:
            b = self.blocks.pop(0)
            k = min(len(b.feature_ids), nnz_x - fx)  # rows past num_rows hold no ids (checked)
            x_ind[fx : fx + k] = b.feature_ids[:k]
            x_val[fx : fx + k] = b.values[:k]
            fx += k
            k = min(len(b.label_ids), nnz_y - fy)
            y_ind[fy : fy + k] = b.label_ids[:k]
            fy += k
            del b
        X = sp.csr_matrix(
            (x_val, x_ind, x_ptr.astype(idx_x)), shape=(num_rows, num_features), copy=False
        )
        Y = sp.csr_matrix(
            (np.ones(nnz_y, dtype=np.float32), y_ind, y_ptr.astype(idx_y)),
            shape=(num_rows, num_labels),
            copy=False,
        )
        X.has_sorted_indices = True
        Y.has_sorted_indices = True
        return X, Y


#: first line of an svmlight file written by :func:`save`: ids are 0-based, and the exact
#: dimensions (columns never used would otherwise be lost); other readers skip it as a comment
SVM_MARKER = b"# xmc-toolkit svmlight"
_SVM_KEYS = ("zero_based", "num_features", "num_labels")


def _svm_marker(path: Path, line: bytes) -> dict[str, int]:
    """Parse ``# xmc-toolkit svmlight zero_based=1 num_features=D num_labels=L`` (entries
    separated by ASCII blanks; ``zero_based`` 0 or 1, dimensions of up to 18 digits)."""
    out: dict[str, int] = {}
    for tok in line[len(SVM_MARKER):].split():
        key, _, value = tok.decode("ascii", "replace").partition("=")
        ok = key in _SVM_KEYS and re.fullmatch(r"[0-9]{1,18}", value) is not None
        if ok and key == "zero_based" and value not in ("0", "1"):
            ok = False
        if not ok:
            raise DataFormatError(path, 1, f"bad xmc-toolkit svmlight header entry "
                                  f"{tok[:40]!r}: expected zero_based=0|1, num_features=N, "
                                  "num_labels=N")
        out[key] = int(value)
    return out


def _parse_file(
    path: Path,
    header: tuple[str, ...] | None,
    has_labels: bool,
    dims_from_header: Callable[[tuple[int, ...]], tuple[int | None, int | None]],
    block_bytes: int,
    marker: dict[str, int] | None = None,
) -> tuple[tuple[int, ...], _Rows]:
    """Parse a text file; ``marker`` (svmlight): filled from an xmc-toolkit header line."""
    rows = _Rows()
    with open_text_bytes(path) as fh:
        try:
            head = _read_header(fh, path, header) if header else ()
            num_features, num_labels = dims_from_header(head)
            line0 = 2 if header else 1  # 1-based file line of the first data line
            if marker is not None:
                pos = fh.tell()
                first = fh.readline(4096)
                if first.startswith(SVM_MARKER):
                    marker.update(_svm_marker(path, first))
                    line0 = 2
                else:
                    fh.seek(pos)
            for data in _iter_blocks(fh, block_bytes):
                try:
                    block = parse_block(data, has_labels, num_features, num_labels)
                except BlockError as exc:
                    raise DataFormatError(path, line0 + rows.num_lines + exc.line,
                                          exc.message) from None
                rows.add(block)
        except DECOMPRESSION_ERRORS as exc:
            raise damaged_file_error(path, exc) from None
    return head, rows


def _check_row_count(path: Path, rows: _Rows, expected: int, first_line: int) -> None:
    """Fewer lines than ``expected`` -> truncated; extra lines must be blank."""
    if rows.num_lines < expected:
        raise DataFormatError(
            path,
            first_line + rows.num_lines,
            f"file ends after {rows.num_lines} rows but the header declares {expected} "
            "(truncated file?)",
        )
    if rows.num_lines > expected:
        extra = np.flatnonzero(rows.line_tokens()[expected:])
        if len(extra):
            raise DataFormatError(
                path,
                first_line + expected + int(extra[0]),
                f"more rows than the header's {expected}: fix the header or remove the extra rows",
            )


def _load_xc(path: Path, block_bytes: int = _BLOCK_BYTES) -> XMCDataset:
    head, rows = _parse_file(
        path, ("num_points", "num_features", "num_labels"), True, lambda h: (h[1], h[2]), block_bytes
    )
    n, d, l = head
    _check_row_count(path, rows, n, 2)
    X, Y = rows.matrices(n, d, l)
    return XMCDataset(X, Y)


def _load_split_file(path: Path, block_bytes: int) -> sp.csr_matrix:
    if not path.exists():
        raise DataFormatError(path, None, "missing file of the XC split pair")
    head, rows = _parse_file(path, ("num_rows", "num_cols"), False, lambda h: (h[1], None), block_bytes)
    n, cols = head
    _check_row_count(path, rows, n, 2)
    X, _ = rows.matrices(n, cols, 0)
    return X


def _load_xc_split(path: Path, block_bytes: int = _BLOCK_BYTES) -> XMCDataset:
    prefix = _split_prefix(path)
    if prefix is None:
        raise DataFormatError(
            path, None, f"not an XC split pair: expected <prefix>{_SPLIT_X} and <prefix>{_SPLIT_Y}"
        )
    x_path = Path(str(prefix) + _SPLIT_X)
    y_path = Path(str(prefix) + _SPLIT_Y)
    X = _load_split_file(x_path, block_bytes)
    Yv = _load_split_file(y_path, block_bytes)
    if Yv.shape[0] != X.shape[0]:
        raise DataFormatError(
            y_path, 1, f"{Yv.shape[0]} rows but {x_path.name} has {X.shape[0]}: the pair must match"
        )
    bad = np.flatnonzero(Yv.data != 1.0)
    if len(bad):
        row = int(np.searchsorted(Yv.indptr, bad[0], side="right")) - 1
        raise DataFormatError(
            y_path, row + 2, f"label value {Yv.data[bad[0]]!r}: label values must be 1"
        )
    return XMCDataset(X, Yv)


def _load_svmlight(
    path: Path,
    zero_based: bool | str = "auto",
    num_features: int | None = None,
    num_labels: int | None = None,
    block_bytes: int = _BLOCK_BYTES,
) -> XMCDataset:
    if zero_based not in (True, False, "auto"):
        raise DataFormatError(path, None, f"zero_based={zero_based!r}: use True, False or 'auto'")
    marker: dict[str, int] = {}
    _, rows = _parse_file(path, None, True, lambda h: (None, None), block_bytes, marker)
    n = rows.num_lines  # every line is a row (a row with no labels starts with a space)
    if n == 0:
        raise DataFormatError(path, None, "empty file: no rows (expected 'labels id:value ...' lines)")
    max_f = max((int(b.feature_ids.max()) for b in rows.blocks if len(b.feature_ids)), default=-1)
    min_f = min((int(b.feature_ids.min()) for b in rows.blocks if len(b.feature_ids)), default=0)
    max_l = max((int(b.label_ids.max()) for b in rows.blocks if len(b.label_ids)), default=-1)
    if zero_based == "auto" and "zero_based" in marker:
        zero_based = bool(marker["zero_based"])
        logger.info("%s: xmc-toolkit header: %s-based feature ids", path,
                    "0" if zero_based else "1")
    elif zero_based == "auto" and max_f >= 0:
        if min_f == 0:
            logger.info("%s: feature id 0 occurs: read as 0-based", path)
        else:
            logger.warning("%s: no feature id 0 and no xmc-toolkit header: read as 1-based "
                           "(every id minus 1); pass --zero-based (zero_based=True) if the ids "
                           "are 0-based", path)
    if num_features is None and "num_features" in marker:
        num_features = marker["num_features"]
    if num_labels is None and "num_labels" in marker:
        num_labels = marker["num_labels"]
    one_based = zero_based is False or (zero_based == "auto" and min_f > 0)
    if one_based:
        if min_f == 0 and max_f >= 0:
            raise DataFormatError(
                path, None, "feature id 0 found with 1-based ids (zero_based=False, "
                "--one-based); read the file as 0-based (--zero-based)"
            )
        for b in rows.blocks:
            b.feature_ids -= 1
        max_f -= 1
    d = max_f + 1 if num_features is None else num_features
    l = max_l + 1 if num_labels is None else num_labels
    if max_f >= d:
        raise DataFormatError(path, None, f"feature id {max_f} >= num_features={d}; raise num_features")
    if max_l >= l:
        raise DataFormatError(path, None, f"label id {max_l} >= num_labels={l}; raise num_labels")
    X, Y = rows.matrices(n, d, l)
    return XMCDataset(X, Y)


# ------------------------------------------------------------------------------------------------
# npz
# ------------------------------------------------------------------------------------------------
def _npz_pair(path: Path) -> tuple[Path, Path] | None:
    name = path.name
    for a, b in (("_X.npz", "_Y.npz"), ("_Y.npz", "_X.npz")):
        if name.endswith(a):
            other = path.with_name(name[: -len(a)] + b)
            return (path, other) if a == "_X.npz" else (other, path)
    return None


def _csr_from_arrays(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                     shape_arr: np.ndarray, path: Path, key: str, prefix: str = "") -> sp.csr_matrix:
    """The one validator of stored CSR (or, transposed, CSC) arrays, whatever the file.

    Checks before anything is built (scipy would silently drop entries past ``indptr[-1]``):
    integer ids and shape, real (not complex) values, ``indptr`` of ``rows + 1`` entries from 0
    to ``nnz`` non-decreasing, as many ids as values, every id in ``[0, columns)``.
    """
    def bad(msg: str) -> DataFormatError:
        return DataFormatError(path, None, f"array {key!r} is not a valid CSR matrix: {msg}")

    if shape_arr.shape != (2,) or shape_arr.dtype.kind not in "iu":
        raise DataFormatError(
            path, None, f"array {prefix}shape must hold 2 integers, found {shape_arr.tolist()!r}"
        )
    for part, arr in (("indices", indices), ("indptr", indptr)):
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise DataFormatError(
                path, None, f"array {prefix}{part} has dtype {arr.dtype} (ndim {arr.ndim}); it "
                "must be a 1-D array of integers"
            )
    if data.dtype.kind == "c":
        raise DataFormatError(path, None, f"{key} holds complex values ({data.dtype}); the "
                              "imaginary part would be lost: store real values")
    if data.dtype.kind not in "biuf" or data.ndim != 1:
        raise DataFormatError(path, None, f"{key} values have dtype {data.dtype} (ndim "
                              f"{data.ndim}); store a 1-D array of real numbers")
    rows, cols = (int(s) for s in shape_arr)
    if rows < 0 or cols < 0:
        raise bad(f"'shape' elements cannot be negative, found {[rows, cols]}")
    if len(indptr) != rows + 1:
        raise bad(f"index pointer size {len(indptr)} should be {rows + 1}")
    if len(indices) != len(data):
        raise bad(f"{len(indices)} ids but {len(data)} values")
    if len(indptr) and (int(indptr[0]) != 0 or int(indptr[-1]) != len(indices)):
        raise bad(f"indptr runs from {int(indptr[0])} to {int(indptr[-1])} but must run from 0 "
                  f"to the {len(indices)} stored entries")
    if len(indptr) > 1 and np.any(np.diff(indptr) < 0):
        raise bad("indptr must be a non-decreasing sequence")
    if len(indices):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0:
            raise bad(f"indices must be >= 0, found {lo}")
        if hi >= cols:
            raise bad(f"indices must be < {cols}, found {hi}")
    try:
        m = sp.csr_matrix((data, indices, indptr), shape=(rows, cols))
        m.check_format(full_check=True)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return m


def _csr_from_npz(z: Any, key: str, path: Path) -> sp.csr_matrix:
    names = [f"{key}_data", f"{key}_indices", f"{key}_indptr", f"{key}_shape"]
    missing = [k for k in names if k not in z]
    if missing:
        raise DataFormatError(path, None, f"npz lacks arrays {missing}; write it with xmc save")
    return _csr_from_arrays(z[f"{key}_data"], z[f"{key}_indices"], z[f"{key}_indptr"],
                            z[f"{key}_shape"], path, key, prefix=f"{key}_")


def load_scipy_npz(path: Path, key: str) -> sp.csr_matrix:
    """A ``scipy.sparse.save_npz`` file (csr, csc or coo), through :func:`_csr_from_arrays`."""
    with np.load(path, allow_pickle=False) as z:
        fmt = z["format"].item() if "format" in z else None
        fmt = fmt.decode("ascii", "replace") if isinstance(fmt, bytes) else str(fmt)
        if "shape" not in z:
            raise DataFormatError(path, None, "not a scipy.sparse npz file (no 'shape' array); "
                                  "write it with scipy.sparse.save_npz or xmc data convert")
        shape = z["shape"]
        if fmt in ("csr", "csc"):
            missing = [k for k in ("data", "indices", "indptr") if k not in z]
            if missing:
                raise DataFormatError(path, None, f"scipy npz lacks arrays {missing}")
            if fmt == "csr":
                return _csr_from_arrays(z["data"], z["indices"], z["indptr"], shape, path, key)
            t = _csr_from_arrays(z["data"], z["indices"], z["indptr"], shape[::-1], path, key)
            return sp.csr_matrix(t.T)
        if fmt == "coo":
            row, col, data = z["row"], z["col"], z["data"]
            if row.dtype.kind not in "iu" or col.dtype.kind not in "iu":
                raise DataFormatError(path, None, f"{key}: coo row/col ids must be integers")
            if shape.shape != (2,) or shape.dtype.kind not in "iu":
                raise DataFormatError(path, None, f"{key}: shape must hold 2 integers")
            r, c = (int(s) for s in shape)
            if not (len(row) == len(col) == len(data)):
                raise DataFormatError(path, None, f"{key}: coo arrays differ in length")
            for what, ids, n in (("row", row, r), ("col", col, c)):
                if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n):
                    raise DataFormatError(path, None, f"{key}: coo {what} ids must lie in "
                                          f"[0, {n}), found {int(ids.min())}..{int(ids.max())}")
            order = np.lexsort((col, row))
            indptr = np.zeros(r + 1, dtype=np.int64)
            np.cumsum(np.bincount(row, minlength=r)[:r], out=indptr[1:]) if r else None
            return _csr_from_arrays(data[order], col[order], indptr, shape, path, key)
        raise DataFormatError(path, None, f"scipy npz of format {fmt!r}: only csr, csc and coo "
                              "are supported")


def _finish(X: sp.spmatrix, Y: sp.spmatrix, path: Path, what: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    X = sp.csr_matrix(X, dtype=np.float32)
    Y = sp.csr_matrix(Y, dtype=np.float32)
    if X.shape[0] != Y.shape[0]:
        raise DataFormatError(path, None, f"{what}: X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    for name, m in (("X", X), ("Y", Y)):
        mm = m.copy()
        mm.sum_duplicates()
        if mm.nnz != m.nnz:
            raise DataFormatError(path, None, f"{what}: {name} has duplicate entries in a row")
    if not np.all(np.isfinite(X.data)):
        raise DataFormatError(path, None, f"{what}: X holds NaN or infinite values")
    if np.any(Y.data != 1.0):
        raise DataFormatError(path, None, f"{what}: Y must be binary (every stored value 1)")
    X.sort_indices()
    Y.sort_indices()
    return X, Y


def _is_scipy_npz(z: Any) -> bool:
    """Whether an open ``.npz`` holds one matrix written by ``scipy.sparse.save_npz``."""
    return all(k in z for k in ("data", "indices", "indptr", "shape", "format"))


def is_single_matrix_npz(path: PathLike) -> bool:
    """Whether ``path`` is an ``.npz`` holding one ``scipy.sparse.save_npz`` matrix (features
    only, as PECOS writes ``X``)."""
    p = Path(path)
    if p.suffix.lower() != ".npz" or not p.is_file() or _npz_pair(p) is not None:
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return _is_scipy_npz(z)
    except Exception:  # not a readable npz: the loader reports it
        return False


def _check_zip(path: Path) -> None:
    """An npz file is a zip archive: say so plainly when it is not (numpy would talk of
    pickled data for a text file)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] != b"PK":
        kind = "is empty" if not head else f"starts with {head!r}"
        raise DataFormatError(path, None, f"not an npz (zip) file: it {kind}; a text data "
                              "file needs --fmt xc / svmlight (or no --fmt)")


def _load_npz(path: Path, labels_from: Path | None = None) -> XMCDataset:
    pair = _npz_pair(path)
    try:
        if labels_from is not None:  # PECOS / scipy pair under any names: X file + Y file
            for p in (path, labels_from):
                if not p.exists():
                    raise DataFormatError(p, None, "no such file")
                _check_zip(p)
            with np.load(path, allow_pickle=False) as z:
                scipy_x = _is_scipy_npz(z)
                X = None if scipy_x else _csr_from_npz(z, "X", path)
            if X is None:
                X = load_scipy_npz(path, "X")
            X, Y = _finish(X, load_scipy_npz(labels_from, "Y"), path, "npz pair (--labels)")
            return XMCDataset(X, Y)
        if pair is not None:
            xp, yp = pair
            for p in pair:
                if not p.exists():
                    raise DataFormatError(p, None, "missing file of the npz pair <prefix>_X.npz / _Y.npz")
                _check_zip(p)
            X, Y = _finish(load_scipy_npz(xp, "X"), load_scipy_npz(yp, "Y"), path, "npz pair")
            return XMCDataset(X, Y)
        if not path.exists():
            raise DataFormatError(path, None, "no such file")
        _check_zip(path)
        with np.load(path, allow_pickle=False) as z:
            if _is_scipy_npz(z):
                raise DataFormatError(
                    path, None, "holds one scipy sparse matrix (features only); pass its label "
                    "matrix too: load(X, labels_from=Y) / --labels Y.npz, or name the pair "
                    "<prefix>_X.npz / <prefix>_Y.npz")
            X, Y = _finish(_csr_from_npz(z, "X", path), _csr_from_npz(z, "Y", path), path, "npz")
            names = [str(s) for s in z["label_names"]] if "label_names" in z else None
            fnames = [str(s) for s in z["feature_names"]] if "feature_names" in z else None
        for what, got, want in (("label_names", names, Y.shape[1]), ("feature_names", fnames, X.shape[1])):
            if got is not None and len(got) != want:
                raise DataFormatError(path, None, f"npz: {len(got)} {what} for {want} columns")
        return XMCDataset(X, Y, names, fnames)
    except Exception as exc:  # a damaged zip raises zlib.error, BadZipFile, NotImplementedError...
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(path, None, f"cannot read npz: {exc}") from None


def _save_npz(ds: XMCDataset, path: Path) -> None:
    X = sp.csr_matrix(ds.X, dtype=np.float32)
    Y = sp.csr_matrix(ds.Y, dtype=np.float32)
    pair = _npz_pair(path)
    if pair is not None:
        atomic_write(pair[0], lambda p: sp.save_npz(p, X))
        atomic_write(pair[1], lambda p: sp.save_npz(p, Y))
        return
    arrays: dict[str, np.ndarray] = {}
    for key, m in (("X", X), ("Y", Y)):
        arrays[f"{key}_data"] = m.data
        arrays[f"{key}_indices"] = m.indices
        arrays[f"{key}_indptr"] = m.indptr
        arrays[f"{key}_shape"] = np.array(m.shape, dtype=np.int64)
    if ds.label_names is not None:
        arrays["label_names"] = np.array(ds.label_names, dtype=str)
    if ds.feature_names is not None:
        arrays["feature_names"] = np.array(ds.feature_names, dtype=str)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, write)


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def write_xc_header(fh: IO[str], num_points: int, num_features: int, num_labels: int) -> None:
    """Write the XC header line ``N D L`` to an open text file."""
    fh.write(f"{int(num_points)} {int(num_features)} {int(num_labels)}\n")


def append_xc_rows(fh: IO[str], X: sp.csr_matrix, Y: sp.csr_matrix) -> None:
    """Append rows in XC text format to an open text file (vectorized formatting).

    Args:
        fh: text file handle opened for writing.
        X: ``[n, D]`` sparse features (any float dtype; written as float32).
        Y: ``[n, L]`` sparse labels (the stored positions are the labels).
    """
    X = sp.csr_matrix(X, dtype=np.float32)
    Y = sp.csr_matrix(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    X.sort_indices()
    Y.sort_indices()
    for a in range(0, X.shape[0], _WRITE_ROWS):
        b = min(a + _WRITE_ROWS, X.shape[0])
        fh.write(format_rows(X[a:b], Y[a:b]).decode("ascii"))


def _check_savable(ds: XMCDataset, path: Path) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    X = sp.csr_matrix(ds.X, dtype=np.float32)
    Y = sp.csr_matrix(ds.Y, dtype=np.float32)
    if X.nnz and not np.all(np.isfinite(X.data)):
        raise DataFormatError(path, None, "cannot save: X holds NaN or infinite values")
    X.sort_indices()
    Y.sort_indices()
    return X, Y


def _write_text(path: Path, header: str | None, X: sp.csr_matrix, Y: sp.csr_matrix | None, one_based: bool = False) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            if header is not None:
                fh.write(header.encode("ascii"))
            for a in range(0, X.shape[0], _WRITE_ROWS):
                b = min(a + _WRITE_ROWS, X.shape[0])
                fh.write(format_rows(X[a:b], None if Y is None else Y[a:b], one_based=one_based))

    atomic_write(path, write)


def save(ds: XMCDataset, path: PathLike, fmt: str | None = None) -> None:
    """Write ``ds`` to ``path``.

    Args:
        ds: the data set.
        path: output file; for ``xc-split`` a prefix (``out/trn`` writes ``out/trn_X_Xf.txt`` and
            ``out/trn_X_Y.txt``) or either file name of the pair; for ``npz`` one file, or
            ``<prefix>_X.npz`` to write the scipy pair ``_X.npz`` / ``_Y.npz``.
        fmt: one of ``xc``, ``xc-split``, ``svmlight``, ``npz``; inferred from the name when
            ``None`` (``.npz``, ``_X_Xf.txt``/``_X_Y.txt``, ``.svm``...; else ``xc``).
    """
    p = Path(path)
    if fmt is None:
        name = p.name
        if p.suffix.lower() == ".npz":
            fmt = "npz"
        elif name.endswith(_SPLIT_X) or name.endswith(_SPLIT_Y):
            fmt = "xc-split"
        elif p.suffix.lower() in _SVM_SUFFIXES:
            fmt = "svmlight"
        elif p.suffix.lower() == ".arff":
            fmt = "arff"
        else:
            fmt = "xc"
    if fmt == "npz":
        _save_npz(ds, p)
        return
    X, Y = _check_savable(ds, p)
    if fmt == "xc":
        _write_text(p, f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}\n", X, Y)
    elif fmt == "svmlight":
        if X.shape[0] == 0:  # the loader rejects an empty file: never write one
            raise DataFormatError(
                p, None, "svmlight cannot store a data set with no rows (it has no header); "
                "write xc or npz instead (--to)"
            )
        _write_text(p, f"{SVM_MARKER.decode()} zero_based=1 num_features={X.shape[1]} "
                    f"num_labels={Y.shape[1]}\n", X, Y)
    elif fmt == "xc-split":
        prefix = p
        for suffix in (_SPLIT_X, _SPLIT_Y):
            if p.name.endswith(suffix):
                prefix = p.with_name(p.name[: -len(suffix)])
        _write_text(Path(str(prefix) + _SPLIT_X), f"{X.shape[0]} {X.shape[1]}\n", X, None)
        _write_text(Path(str(prefix) + _SPLIT_Y), f"{Y.shape[0]} {Y.shape[1]}\n", Y, None)
    else:
        raise DataFormatError(
            p, None, f"cannot write format {fmt!r}: choose one of xc, xc-split, svmlight, npz (--to)"
        )
    logger.info("wrote %s (%s): %d points", p, fmt, X.shape[0])


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def load(
    path: PathLike,
    fmt: str | None = None,
    *,
    label_names_from: PathLike | None = None,
    label_xml: PathLike | None = None,
    zero_based: bool | str = "auto",
    num_features: int | None = None,
    num_labels: int | None = None,
    labels_from: PathLike | None = None,
) -> XMCDataset:
    """Read a multi-label data set.

    Args:
        path: the file (or split prefix / directory, see ``infer_format``).
        fmt: ``xc``, ``xc-split``, ``svmlight``, ``npz`` or ``arff``; inferred when ``None``.
        label_names_from: a Mulan label XML (``*.xml``) or a text file with one name per line,
            in label-id order, attached as ``label_names`` (the count must equal ``L``).
        label_xml: ARFF only: the Mulan label XML naming the label attributes (default: the
            ``.xml`` beside the ARFF file, e.g. ``medical.xml`` for ``medical-train.arff``;
            MEKA ``-C n`` in ``@relation`` is used when there is none).
        zero_based: svmlight only: feature ids are 0-based (``True``), 1-based (``False``) or
            ``"auto"``: the base the first-line header ``# xmc-toolkit svmlight zero_based=1
            ...`` (written by :func:`save`) states, else 0-based when some feature id is 0 and
            1-based otherwise (as in scikit-learn; logged as a warning, since a 0-based file
            that never uses feature 0 would be shifted).
        num_features, num_labels: svmlight only: dimensions (default: the header's, else the
            largest id + 1).
        labels_from: npz only: the label matrix ``Y`` of ``path`` in its own file (a pair
            written by ``scipy.sparse.save_npz`` / PECOS ``smat_util`` under any names,
            ``--data X.npz --labels Y.npz``); ``path`` holds ``X``.

    Returns:
        ``XMCDataset`` with ``X`` csr float32 ``[N, D]`` (sorted indices) and binary ``Y`` csr
        float32 ``[N, L]``.

    Raises:
        DataFormatError: the file does not follow the format (file, line and fix in the message).
    """
    p = Path(path)
    if fmt is None:
        from .text import text_format

        if text_format(p) is not None:
            raise DataFormatError(p, None, "holds raw text records, not feature vectors: give it "
                                  "to xmc train / eval / predict (they featurize it), or read it "
                                  "with xmc_toolkit.data.text.read_text")
        fmt = infer_format(p)
    elif fmt not in FORMATS:
        raise DataFormatError(p, None, f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)} (--fmt)")
    if fmt not in ("xc-split", "npz") and not p.is_file():
        raise DataFormatError(p, None, "no such file")
    if labels_from is not None and fmt != "npz":
        raise DataFormatError(p, None, f"a separate label file (--labels) applies only to .npz "
                              f"feature matrices; {fmt} files hold their labels")
    logger.info("loading %s as %s", p, fmt)
    if fmt == "xc":
        ds = _load_xc(p)
    elif fmt == "xc-split":
        ds = _load_xc_split(p)
    elif fmt == "svmlight":
        ds = _load_svmlight(p, zero_based, num_features, num_labels)
    elif fmt == "npz":
        ds = _load_npz(p, None if labels_from is None else Path(labels_from))
    else:
        X, Y, names, fnames = read_arff(p, label_xml)
        ds = XMCDataset(X, Y, names, fnames)
    if label_names_from is not None:
        names = read_label_names(Path(label_names_from))
        if len(names) != ds.num_labels:
            raise DataFormatError(
                label_names_from,
                None,
                f"{len(names)} label names but the data set has {ds.num_labels} labels; "
                "pass the names file that belongs to this data set",
            )
        ds.label_names = names
    return ds


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
_QUANTILES = (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q90", 0.9), ("q99", 0.99), ("max", 1.0))


def dataset_stats(ds: XMCDataset) -> dict[str, Any]:
    """Summary statistics of a data set (plain Python numbers, JSON-ready).

    Keys: ``num_points``, ``num_features``, ``num_labels``, ``feature_nnz``, ``label_nnz``,
    ``avg_features_per_point``, ``avg_labels_per_point``, ``avg_points_per_label``,
    ``label_frequency_quantiles`` (``min``, ``q25``, ``median``, ``q75``, ``q90``, ``q99``,
    ``max`` of the number of points per label, over all ``L`` labels), ``empty_rows`` (points
    without labels), ``empty_labels`` (labels without points), ``rows_without_features``.
    """
    n, d, l = ds.num_points, ds.num_features, ds.num_labels
    Y = sp.csr_matrix(ds.Y)
    X = sp.csr_matrix(ds.X)
    # counts of the labels that occur, sorted; the other labels count 0 (never materialised:
    # memory follows the stored entries, not L, which a single large label id can inflate)
    _, used = np.unique(Y.indices, return_counts=True)
    used = np.sort(used)
    zeros = l - len(used)
    per_row = np.diff(Y.indptr)

    def nth(i: np.ndarray) -> np.ndarray:  # i-th smallest of the L label counts
        return np.where(i < zeros, 0, used[np.clip(i - zeros, 0, max(len(used) - 1, 0))]
                        if len(used) else 0)

    if l:
        pos = np.array([q for _, q in _QUANTILES]) * (l - 1)  # numpy's "linear" quantiles
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, l - 1)
        qs = nth(lo) + (pos - lo) * (nth(hi) - nth(lo))
        quant = {k: float(v) for (k, _), v in zip(_QUANTILES, qs)}
    else:
        quant = {k: 0.0 for k, _ in _QUANTILES}
    return {
        "num_points": n,
        "num_features": d,
        "num_labels": l,
        "feature_nnz": int(X.nnz),
        "label_nnz": int(Y.nnz),
        "avg_features_per_point": float(X.nnz / n) if n else 0.0,
        "avg_labels_per_point": float(Y.nnz / n) if n else 0.0,
        "avg_points_per_label": float(Y.nnz / l) if l else 0.0,
        "label_frequency_quantiles": quant,
        "empty_rows": int(np.sum(per_row == 0)),
        "empty_labels": int(zeros),
        "rows_without_features": int(np.sum(np.diff(X.indptr) == 0)),
    }
