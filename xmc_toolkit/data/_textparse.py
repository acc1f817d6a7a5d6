"""Vectorized parsing of sparse text rows (XC, XC split files, svmlight) from byte blocks.

Nothing here creates a Python object per non-zero: a block of bytes (whole lines, ending with
``\\n``) is viewed as ``uint8`` with :func:`numpy.frombuffer`; separators are classified with a
lookup table, tokens are found from the edges of the "token byte" mask, and numbers are parsed by
byte arithmetic column by column (Horner's rule over the ``j``-th byte of every token at once).

Grammar of one line (``has_labels=True``)::

    line    := labels (WS pair)* WS*  |  WS+ pair (WS pair)* WS*  |  WS*
    labels  := id ("," id)*
    pair    := id ":" value

With ``has_labels=False`` (XC split files) a line is ``pair (WS pair)*`` or empty. ``WS`` is a
space, tab or carriage return. Problems are reported as :class:`BlockError` with the 0-based line
index inside the block; the caller turns that into a :class:`~xmc_toolkit.errors.DataFormatError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BlockError",
    "ParsedBlock",
    "parse_block",
    "parse_uint_tokens",
    "parse_float_tokens",
]

# byte classes: 0 token byte, 1 blank (space, tab, CR), 2 newline, 3 comma, 4 colon
_TOK, _WS, _NL, _COMMA, _COLON = 0, 1, 2, 3, 4
_CLASS = np.zeros(256, dtype=np.uint8)
_CLASS[[32, 9, 13]] = _WS
_CLASS[10] = _NL
_CLASS[44] = _COMMA
_CLASS[58] = _COLON

_MAX_ID_DIGITS = 18
_MANT_LIMIT = 10**17  # mantissa digits beyond this only shift the exponent
_POW10 = 10.0 ** np.arange(23)  # exact powers of ten in float64


class BlockError(Exception):
    """A problem at 0-based line ``line`` of a block."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class ParsedBlock:
    """The rows of one block.

    Attributes:
        num_lines: number of lines in the block.
        label_counts: ``[num_lines] int64`` labels per line.
        label_ids: ``[sum(label_counts)]`` int32 (int64 for ids >= 2**31), sorted within each line.
        feature_counts: ``[num_lines] int64`` id:value pairs per line.
        feature_ids: ``[sum(feature_counts)]`` int32 (or int64), sorted within each line.
        values: ``[sum(feature_counts)] float32``.
    """

    num_lines: int
    label_counts: np.ndarray
    label_ids: np.ndarray
    feature_counts: np.ndarray
    feature_ids: np.ndarray
    values: np.ndarray


def _token_text(buf: np.ndarray, start: int, end: int, limit: int = 40) -> str:
    raw = bytes(buf[start : min(end, start + limit)])
    text = raw.decode("utf-8", errors="replace")
    return text + ("..." if end - start > limit else "")


def parse_uint_tokens(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Parse tokens made of decimal digits.

    Args:
        buf: ``[n] uint8`` bytes.
        starts, ends: ``[T] int64`` token bounds (``end`` exclusive, ``end > start``).

    Returns:
        ``(values [T] int64, bad [T] bool)``; ``bad`` marks tokens that hold a non-digit byte or
        more than 18 digits (their value is meaningless).
    """
    lengths = ends - starts
    values = np.zeros(len(starts), dtype=np.int64)
    bad = lengths > _MAX_ID_DIGITS
    if len(starts) == 0:
        return values, bad
    min_len, max_len = int(lengths.min()), min(int(lengths.max()), _MAX_ID_DIGITS)
    for j in range(min(min_len, max_len)):  # every token still has a j-th byte: no indexing
        d = buf[starts + j] - np.uint8(48)  # [T] uint8, wraps below '0'
        bad |= d > 9
        values *= 10
        values += d
    active = np.flatnonzero(lengths > min_len)
    for j in range(min_len, max_len):
        active = active[lengths[active] > j]
        d = buf[starts[active] + j] - np.uint8(48)
        bad[active] |= d > 9
        values[active] = values[active] * 10 + d
    return values, bad


def parse_float_tokens(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Parse decimal floating-point tokens: ``[+-]digits[.digits][(e|E)[+-]digits]``.

    ``1``, ``.5``, ``2.``, ``1e-3``, ``-2.5E+01`` parse; ``nan``, ``inf``, ``1e``, ``--1`` and
    anything else are flagged ``bad``. Up to 17 significant digits are accumulated exactly in an
    int64 mantissa ``M`` with a decimal exponent ``E``; the value is ``M * 10**E`` computed with
    one correctly rounded float64 multiplication or division when ``|E| <= 22`` (Clinger's fast
    path), and with ``10.0**E`` otherwise.

    Args:
        buf: ``[n] uint8`` bytes.
        starts, ends: ``[T] int64`` token bounds (``end`` exclusive).

    Returns:
        ``(values [T] float64, bad [T] bool)``.
    """
    t = len(starts)
    lengths = ends - starts
    mant = np.zeros(t, dtype=np.int64)
    shift = np.zeros(t, dtype=np.int64)  # decimal exponent contributed by the mantissa digits
    expo = np.zeros(t, dtype=np.int64)
    phase = np.zeros(t, dtype=np.int8)  # 0 int part, 1 fraction, 2 after e, 3 after e-sign, 4 exp
    neg = np.zeros(t, dtype=bool)
    eneg = np.zeros(t, dtype=bool)
    has_digit = np.zeros(t, dtype=bool)
    bad = np.zeros(t, dtype=bool)
    if t == 0:
        return np.zeros(0, dtype=np.float64), bad
    active = np.arange(t)
    for j in range(int(lengths.max())):
        if j > 0:
            active = active[lengths[active] > j]
        c = buf[starts[active] + j]  # [A] uint8
        d = c - np.uint8(48)
        is_digit = d < 10
        ph = phase[active]
        is_sign = (c == 43) | (c == 45)
        # sign of the number (first byte) or of the exponent (right after e/E)
        lead_sign = is_sign & (j == 0)
        exp_sign = is_sign & (ph == 2)
        neg[active[lead_sign]] = c[lead_sign] == 45
        eneg[active[exp_sign]] = c[exp_sign] == 45
        # mantissa digits
        md = is_digit & (ph <= 1)
        if md.any():
            a = active[md]
            m = mant[a]
            room = m < _MANT_LIMIT
            dd = d[md].astype(np.int64)
            mant[a] = np.where(room, m * 10 + dd, m)
            # a digit kept after the dot lowers the exponent; a dropped one before the dot raises it
            phm = ph[md]
            shift[a] += np.where(room, -(phm == 1).astype(np.int64), (phm == 0).astype(np.int64))
            has_digit[a] = True
        # exponent digits
        ed = is_digit & (ph >= 2)
        if ed.any():
            a = active[ed]
            expo[a] = np.minimum(expo[a] * 10 + d[ed], 100_000)
        dot = (c == 46) & (ph == 0)
        is_e = ((c == 101) | (c == 69)) & (ph <= 1) & has_digit[active]
        new_ph = ph.copy()
        new_ph[dot] = 1
        new_ph[is_e] = 2
        new_ph[exp_sign] = 3
        new_ph[ed] = 4
        phase[active] = new_ph
        ok = lead_sign | exp_sign | md | ed | dot | is_e
        bad[active[~ok]] = True
    bad |= ~has_digit | (phase == 2) | (phase == 3)
    e10 = shift + np.where(eneg, -expo, expo)  # [T] int64
    values = mant.astype(np.float64)
    small = np.abs(e10) <= 22
    pos = small & (e10 > 0)
    values[pos] *= _POW10[e10[pos]]
    negx = small & (e10 < 0)
    values[negx] /= _POW10[-e10[negx]]
    big = ~small & (mant != 0)
    if big.any():
        with np.errstate(over="ignore", under="ignore"):
            # split the power so that 10**e never overflows on its own before the product
            e = e10[big]
            half = e // 2
            values[big] = values[big] * np.power(10.0, half) * np.power(10.0, e - half)
    values[neg] = -values[neg]
    return values, bad


def _first(mask: np.ndarray) -> int:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else -1


class _Problems:
    """Collects candidate problems of a block and raises the earliest line's."""

    def __init__(self) -> None:
        self.best: tuple[int, str] | None = None

    def add(self, line: int, message: str) -> None:
        if self.best is None or line < self.best[0]:
            self.best = (line, message)

    def raise_if_any(self) -> None:
        if self.best is not None:
            raise BlockError(*self.best)


def _sort_rows(
    line: np.ndarray, ids: np.ndarray, values: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sort ids within lines (stable on already sorted input); raise on duplicates."""
    if len(ids) < 2:
        return ids, values
    same = line[1:] == line[:-1]
    if not np.any(same & (ids[1:] <= ids[:-1])):
        return ids, values
    order = np.lexsort((ids, line))
    ids = ids[order]
    dup = same & (ids[1:] == ids[:-1])
    k = _first(dup)
    if k >= 0:
        raise BlockError(int(line[k]), f"duplicate {what} id {int(ids[k])} in the same row")
    return ids, (None if values is None else values[order])


def parse_block(
    data: bytes | memoryview,
    has_labels: bool,
    num_features: int | None = None,
    num_labels: int | None = None,
) -> ParsedBlock:
    """Parse whole lines of sparse text rows.

    Args:
        data: bytes ending with ``b"\\n"`` (whole lines).
        has_labels: lines start with comma-separated label ids (XC / svmlight) or not (split files).
        num_features: feature ids must be ``< num_features`` (not checked when ``None``).
        num_labels: label ids must be ``< num_labels`` (not checked when ``None``).

    Returns:
        The parsed rows; ids are sorted within each line.

    Raises:
        BlockError: with the 0-based line of the first problem in the block.
    """
    buf = np.frombuffer(data, dtype=np.uint8)  # [n] uint8, read-only view
    n = len(buf)
    if n == 0 or buf[-1] != 10:
        raise ValueError("a block must end with a newline")
    cls = _CLASS[buf]  # [n] uint8
    newlines = np.flatnonzero(cls == _NL)
    num_lines = len(newlines)
    is_tok = (cls == _TOK).view(np.int8)
    edges = np.diff(is_tok, prepend=np.int8(0))  # [n] int8: +1 token start, -1 one past its end
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # the last byte is a newline, so every token ends in buf
    del edges
    t = len(starts)
    line = np.searchsorted(newlines, starts)  # [T] 0-based line of each token
    prev = np.full(t, _NL, dtype=np.uint8)
    if t:
        has_prev = starts > 0
        prev[has_prev] = cls[starts[has_prev] - 1]
    nxt = cls[ends]  # [T] class of the byte after each token
    is_fid = nxt == _COLON
    is_val = prev == _COLON
    is_lab = ~is_fid & ~is_val
    # does token k touch token k+1 through exactly one separator byte?
    glued = np.zeros(t, dtype=bool)
    if t > 1:
        glued[:-1] = starts[1:] == ends[:-1] + 1
    glued_prev = np.zeros(t, dtype=bool)
    glued_prev[1:] = glued[:-1]

    problems = _Problems()

    def flag(mask: np.ndarray, message: str) -> None:
        k = _first(mask)
        if k >= 0:
            tok = _token_text(buf, int(starts[k]), int(ends[k]))
            problems.add(int(line[k]), message.format(tok=tok))

    flag(is_fid & is_val, "malformed pair around {tok!r}: expected id:value")
    fid_prev_ok = (prev == _WS) | ((prev == _NL) if not has_labels else False)
    if has_labels:
        flag(
            is_fid & (prev == _NL),
            "feature pair {tok!r} where labels were expected: a row with no labels must start "
            "with a space",
        )
    flag(is_fid & ~fid_prev_ok & ~is_val & (prev != _NL), "malformed feature id near {tok!r}")
    flag(is_fid & ~is_val & ~glued, "feature id {tok!r} has no value: expected id:value")
    flag(
        is_val & ~is_fid & ~((nxt == _WS) | (nxt == _NL)),
        "value {tok!r} must be followed by a space or the end of the line",
    )
    flag(is_val & ~is_fid & ~glued_prev, "value {tok!r} has no feature id: expected id:value")
    if has_labels:
        lab_prev_ok = (prev == _NL) | ((prev == _COMMA) & glued_prev)
        flag(
            is_lab & (prev == _WS),
            "token {tok!r} is neither a label (labels come first, joined by commas) nor an "
            "id:value pair",
        )
        flag(is_lab & (prev != _WS) & ~lab_prev_ok, "malformed label list near {tok!r}: expected label ids joined by single commas, e.g. 0,3,7")
        flag(is_lab & (nxt == _COMMA) & ~glued, "malformed label list near {tok!r}: expected label ids joined by single commas, e.g. 0,3,7")
    else:
        flag(is_lab, "expected id:value pairs, found {tok!r}")
    for code, name in ((_COMMA, "','"), (_COLON, "':'")):
        pos = np.flatnonzero(cls == code)
        if len(pos):
            before = np.where(pos > 0, cls[np.maximum(pos - 1, 0)], _NL)
            stray = (before != _TOK) | (cls[pos + 1] != _TOK)
            k = _first(stray)
            if k >= 0:
                problems.add(
                    int(np.searchsorted(newlines, pos[k])), f"misplaced {name}: expected a number on both sides"
                )
    problems.raise_if_any()

    # ---- numbers ---------------------------------------------------------------------------
    lab_idx = np.flatnonzero(is_lab) if has_labels else np.zeros(0, dtype=np.int64)
    fid_idx = np.flatnonzero(is_fid)
    val_idx = fid_idx + 1  # structure checks guarantee the value token follows its id
    label_ids, lab_bad = parse_uint_tokens(buf, starts[lab_idx], ends[lab_idx])
    feature_ids, fid_bad = parse_uint_tokens(buf, starts[fid_idx], ends[fid_idx])
    vals64, val_bad = parse_float_tokens(buf, starts[val_idx], ends[val_idx])
    with np.errstate(over="ignore", invalid="ignore"):
        values = vals64.astype(np.float32)  # [F] float32
    del vals64
    val_bad_finite = ~val_bad & ~np.isfinite(values)

    def flag_sub(idx: np.ndarray, mask: np.ndarray, message: str) -> None:
        k = _first(mask)
        if k >= 0:
            tk = int(idx[k])
            tok = _token_text(buf, int(starts[tk]), int(ends[tk]))
            problems.add(int(line[tk]), message.format(tok=tok))

    flag_sub(lab_idx, lab_bad, "invalid label id {tok!r}: expected a non-negative integer")
    flag_sub(fid_idx, fid_bad, "invalid feature id {tok!r}: expected a non-negative integer")
    k = _first(val_bad)
    if k >= 0:
        tk = int(val_idx[k])
        tok = _token_text(buf, int(starts[tk]), int(ends[tk]))
        try:
            special = not math.isfinite(float(tok))
        except ValueError:
            special = False
        msg = (
            f"value {tok!r} is NaN or infinite; only finite values are allowed"
            if special
            else f"non-numeric value {tok!r}: expected a decimal number such as 1, 0.5 or 1e-3"
        )
        problems.add(int(line[tk]), msg)
    flag_sub(
        val_idx, val_bad_finite, "value {tok!r} is NaN or infinite in float32; values must be finite"
    )
    if num_labels is not None:
        flag_sub(
            lab_idx,
            ~lab_bad & (label_ids >= num_labels),
            f"label id {{tok}} out of range: the header declares {num_labels} labels (ids 0..{num_labels - 1})",
        )
    if num_features is not None:
        flag_sub(
            fid_idx,
            ~fid_bad & (feature_ids >= num_features),
            f"feature id {{tok}} out of range: the header declares {num_features} features "
            f"(ids 0..{num_features - 1})",
        )
    problems.raise_if_any()

    lab_line = line[lab_idx]
    fid_line = line[fid_idx]
    label_ids, _ = _sort_rows(lab_line, label_ids, None, "label")
    feature_ids, values_sorted = _sort_rows(fid_line, feature_ids, values, "feature")
    assert values_sorted is not None
    # store ids compactly: the blocks are kept until the whole file is read
    if len(label_ids) and label_ids.max() < 2**31:
        label_ids = label_ids.astype(np.int32)
    if len(feature_ids) and feature_ids.max() < 2**31:
        feature_ids = feature_ids.astype(np.int32)
    return ParsedBlock(
        num_lines=num_lines,
        label_counts=np.bincount(lab_line, minlength=num_lines),
        label_ids=label_ids,
        feature_counts=np.bincount(fid_line, minlength=num_lines),
        feature_ids=feature_ids,
        values=values_sorted,
    )
