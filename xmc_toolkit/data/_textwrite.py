"""Vectorized formatting of sparse rows as text (XC, XC split files, svmlight).

Each output "piece" (a label id with its separator, or an ``id:value`` pair with its separator) is
laid out in a row of a ``uint8`` matrix padded with NUL bytes; removing the NULs of the flattened
matrix gives the text. No Python object is created per non-zero.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["format_rows", "int_bytes", "float_bytes"]


def int_bytes(values: np.ndarray) -> np.ndarray:
    """Decimal digits of non-negative integers, right-aligned, NUL-padded.

    Args:
        values: ``[n]`` non-negative integers.

    Returns:
        ``[n, w] uint8`` where ``w`` is the number of digits of the largest value.
    """
    v = np.asarray(values, dtype=np.int64)
    top = int(v.max()) if len(v) else 0
    w = max(1, len(str(top)))
    out = np.zeros((len(v), w), dtype=np.uint8)
    rest = v.copy()
    for col in range(w - 1, -1, -1):
        digit = rest % 10
        keep = (rest > 0) | (col == w - 1)  # leading zeros stay NUL, "0" keeps its digit
        out[:, col] = np.where(keep, digit + 48, 0)
        rest //= 10
    return out


def float_bytes(values: np.ndarray) -> np.ndarray:
    """Shortest round-trip text of float32 values; integral values are written as integers.

    Args:
        values: ``[n] float32`` finite values.

    Returns:
        ``[n, w] uint8`` NUL-padded text (``float(text) == value`` exactly in float32).
    """
    v = np.asarray(values, dtype=np.float32)
    integral = (v == np.round(v)) & (np.abs(v) < 2**24)
    if integral.all():
        iv = v.astype(np.int64)
        digits = int_bytes(np.abs(iv))
        sign = np.where(iv < 0, np.uint8(45), np.uint8(0))[:, None]  # [n, 1]
        return np.concatenate([sign, digits], axis=1)
    text = v.astype("S32").view(np.uint8).reshape(len(v), 32)  # numpy's shortest repr (Dragon4)
    if integral.any():
        # "1.0"-style reprs: write the integral ones as integers instead (same value, shorter)
        sub = float_bytes(v[integral])
        text[integral] = 0
        text[np.ix_(np.flatnonzero(integral), np.arange(sub.shape[1]))] = sub
    used = np.flatnonzero(text.any(axis=0))
    return text[:, : int(used[-1]) + 1] if len(used) else text[:, :1]


def format_rows(
    X: sp.csr_matrix, Y: sp.csr_matrix | None, label_sep: bytes = b",", one_based: bool = False
) -> bytes:
    """Text of CSR rows: ``l1,l2 f:v f:v\\n`` (or ``f:v f:v\\n`` when ``Y`` is ``None``).

    A row without labels starts with a space; a row without features ends right after the
    labels' trailing space. Ids are 0-based unless ``one_based``.

    Args:
        X: ``[n, D]`` csr float32 with sorted indices.
        Y: ``[n, L]`` csr or ``None`` for split files.
        label_sep: separator between label ids.
        one_based: add 1 to feature ids (svmlight convention of some tools).

    Returns:
        ASCII bytes of the ``n`` lines.
    """
    n = X.shape[0]
    if n == 0:
        return b""
    f_counts = np.diff(X.indptr).astype(np.int64)  # [n]
    f_pieces = np.maximum(f_counts, 1)  # a row without features still needs its newline
    if Y is not None:
        l_counts = np.diff(Y.indptr).astype(np.int64)
        l_pieces = np.maximum(l_counts, 1)  # a row without labels writes a lone space
    else:
        l_counts = np.zeros(n, dtype=np.int64)
        l_pieces = np.zeros(n, dtype=np.int64)
    per_row = l_pieces + f_pieces
    row_start = np.concatenate([[0], np.cumsum(per_row)[:-1]])  # [n] first piece of each row
    total = int(per_row.sum())

    fid = X.indices.astype(np.int64) + (1 if one_based else 0)
    fid_b = int_bytes(fid) if len(fid) else np.zeros((0, 1), np.uint8)
    val_b = float_bytes(X.data) if len(fid) else np.zeros((0, 1), np.uint8)
    lab_b = (
        int_bytes(Y.indices) if Y is not None and Y.nnz else np.zeros((0, 1), np.uint8)
    )
    w_lab = lab_b.shape[1] + 1 if Y is not None else 0
    w_feat = fid_b.shape[1] + 1 + val_b.shape[1] + 1
    width = max(w_lab, w_feat)
    pieces = np.zeros((total, width), dtype=np.uint8)  # [pieces, width] NUL-padded

    if Y is not None:
        # label pieces: "id," and the row's last label gets " "
        rows_l = np.repeat(np.arange(n), l_counts)
        k_in_row = np.arange(Y.nnz) - np.repeat(Y.indptr[:-1].astype(np.int64), l_counts)
        at = row_start[rows_l] + k_in_row  # [nnz(Y)] piece index
        wl = lab_b.shape[1]
        pieces[at, :wl] = lab_b
        last = k_in_row == l_counts[rows_l] - 1
        pieces[at, wl] = np.where(last, np.uint8(32), label_sep[0])
        no_lab = np.flatnonzero(l_counts == 0)
        pieces[row_start[no_lab], 0] = 32
    # feature pieces: "id:value " and the row's last pair gets "\n"
    rows_f = np.repeat(np.arange(n), f_counts)
    k_in_row = np.arange(X.nnz) - np.repeat(X.indptr[:-1].astype(np.int64), f_counts)
    at = row_start[rows_f] + l_pieces[rows_f] + k_in_row
    wf, wv = fid_b.shape[1], val_b.shape[1]
    pieces[at, :wf] = fid_b
    pieces[at, wf] = 58
    pieces[at, wf + 1 : wf + 1 + wv] = val_b
    last = k_in_row == f_counts[rows_f] - 1
    pieces[at, wf + 1 + wv] = np.where(last, np.uint8(10), np.uint8(32))
    no_feat = np.flatnonzero(f_counts == 0)
    pieces[row_start[no_feat] + l_pieces[no_feat], 0] = 10
    flat = pieces.ravel()
    return flat[flat != 0].tobytes()
