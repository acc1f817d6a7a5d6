"""Prediction files: the top-k label ids (and scores) of each point, best first (numpy only).

Three formats, chosen by the file suffix:

* **text** (any suffix but ``.jsonl`` / ``.npz``): one line per point, ``id:score id:score ...`` or just
  ``id id ...``, best first. An empty line is a point without predictions. Every line of a file
  uses the same style (all with scores or all without).
* **JSONL** (``.jsonl``): one JSON object per line,
  ``{"ids": [3, 7], "scores": [0.9, 0.2], "labels": ["cs.LG", "stat.ML"]}``; ``scores`` and
  ``labels`` are optional (``labels`` is informative and ignored by the reader).
* **CSR** (``.npz``): ``scipy.sparse.save_npz`` of the ``[N, L]`` matrix holding each point's
  scores at its predicted label ids, the layout PECOS ``smat_util.load_matrix`` and pyxclib read;
  on reading, each row is ranked by decreasing value.

In memory, ``ids`` is int64 ``[N, kmax]`` padded with ``-1`` and ``scores`` float32
``[N, kmax]`` padded with ``-inf`` (or ``None`` when the file has no scores).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any
from os import PathLike
from pathlib import Path

import numpy as np

from xmc_toolkit._fileio import atomic_write, atomic_write_text
from xmc_toolkit.errors import DataFormatError

__all__ = ["write_predictions", "read_predictions", "is_jsonl", "is_npz", "jsonl_lines",
           "check_predictions_path"]

#: suffixes of binary formats that a prediction file never has (it is text, JSONL or .npz)
_BINARY_SUFFIXES = (".npy", ".safetensors", ".pt", ".pkl", ".gz", ".zip")


def check_predictions_path(path: PathType) -> None:
    """Refuse an output name whose suffix promises a binary format other than ``.npz``.

    Raises:
        DataFormatError: e.g. ``preds.npy`` (the file would hold text).
    """
    p = Path(path)
    if p.suffix.lower() in _BINARY_SUFFIXES:
        raise DataFormatError(p, None, f"predictions are written as text (id:score per line), "
                              f"JSONL (.jsonl) or a CSR score matrix (.npz), not {p.suffix}: "
                              f"use --out {p.with_suffix('.txt').name}, "
                              f"{p.with_suffix('.jsonl').name} or {p.with_suffix('.npz').name}")

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]


def is_jsonl(path: PathType) -> bool:
    """Whether ``path`` names a JSONL prediction file (suffix ``.jsonl``)."""
    return Path(path).suffix.lower() == ".jsonl"


def is_npz(path: PathType) -> bool:
    """Whether ``path`` names a CSR score-matrix prediction file (suffix ``.npz``)."""
    return Path(path).suffix.lower() == ".npz"


def _write_npz(path: Path, ids: np.ndarray, scores: np.ndarray | None,
               num_labels: int | None) -> None:
    """``scipy.sparse.save_npz`` of the ``[N, L]`` CSR matrix holding each row's scores at
    its predicted ids (1.0 without scores), written atomically."""
    import scipy.sparse as sp

    valid = ids >= 0  # [N, k]
    L = int(num_labels) if num_labels is not None else (int(ids.max()) + 1 if valid.any() else 0)
    if valid.any() and int(ids.max()) >= L:
        raise DataFormatError(path, None, f"cannot write predictions: label id {int(ids.max())}"
                              f" >= num_labels={L}")
    indptr = np.concatenate(([0], np.cumsum(valid.sum(axis=1)))).astype(np.int64)
    data = (np.ones(int(valid.sum()), np.float32) if scores is None
            else scores[valid].astype(np.float32))
    M = sp.csr_matrix((data, ids[valid].astype(np.int32), indptr), shape=(ids.shape[0], L))
    atomic_write(path, lambda p: sp.save_npz(p, M, compressed=True), make_parents=True)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ids int64 ``[N, kmax]`` (-1 padded) and scores float32 (-inf padded) of a CSR score
    matrix, each row sorted by decreasing score (ties by increasing id)."""
    import scipy.sparse as sp

    try:
        M = sp.csr_matrix(sp.load_npz(path), dtype=np.float32)
    except Exception as exc:  # zip / format errors of many kinds
        raise DataFormatError(path, None, f"not a scipy sparse .npz prediction matrix ({exc})"
                              ) from None
    M.sum_duplicates()
    counts = np.diff(M.indptr)  # [N]
    n, kmax = M.shape[0], int(counts.max()) if M.shape[0] else 0
    rows = np.repeat(np.arange(n), counts)  # [nnz]
    order = np.lexsort((M.indices, -M.data, rows))  # by row, then score desc, then id
    cols = np.arange(M.nnz) - np.repeat(M.indptr[:-1], counts)  # rank inside the row
    ids = np.full((n, kmax), -1, dtype=np.int64)
    scores = np.full((n, kmax), -np.inf, dtype=np.float32)
    ids[rows, cols] = M.indices[order]
    scores[rows, cols] = M.data[order]
    if not np.all(np.isfinite(M.data)):
        raise DataFormatError(path, None, "the prediction matrix holds NaN or infinite scores")
    return ids, scores


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------


def _check_arrays(
    path: Path, ids: np.ndarray, scores: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    def bad(msg: str) -> DataFormatError:
        return DataFormatError(path, None, f"cannot write predictions: {msg}")

    ids_a = np.asarray(ids)
    if ids_a.ndim != 2:
        raise bad(f"ids must be a 2-D integer array [N, k], got shape {ids_a.shape}")
    if ids_a.size and not np.issubdtype(ids_a.dtype, np.integer):
        raise bad(f"ids must hold integer label ids, got dtype {ids_a.dtype}")
    ids_a = ids_a.astype(np.int64, copy=False)
    if ids_a.size and ids_a.min() < -1:
        raise bad(f"ids must be >= 0 (or -1 for padding), found {ids_a.min()}")
    if scores is None:
        return ids_a, None
    sc = np.asarray(scores, dtype=np.float32)
    if sc.shape != ids_a.shape:
        raise bad(f"scores has shape {sc.shape} but ids has shape {ids_a.shape}")
    if np.isnan(sc[ids_a >= 0]).any():
        raise bad("scores contain NaN; the model diverged or the scores are corrupt")
    return ids_a, sc


def jsonl_lines(ids: np.ndarray, scores: np.ndarray | None = None,
                label_names: Sequence[str] | None = None, *, path: PathType | None = None,
                extra: Sequence[dict[str, object]] | None = None) -> list[str]:
    """The JSONL prediction lines (each ending in ``\\n``) of ``N`` points, best first.

    Args:
        ids: int ``[N, k]`` label ids, ``-1`` = padding (left out).
        scores: float ``[N, k]`` or ``None``.
        label_names: the ``L`` names, written as ``"labels"``.
        path: the file name for error messages.
        extra: ``N`` dicts of more fields per line (e.g. ``{"probabilities": [...]}``), each
            list as long as the row's predictions is cut like ``ids``.

    Raises:
        DataFormatError: inconsistent shapes, NaN scores, ids without a name.
    """
    p = Path(path) if path is not None else Path("<predictions>")
    ids_a, sc = _check_arrays(p, ids, scores)
    valid = ids_a >= 0  # [N, k]
    names = None
    if label_names is not None:
        names = list(label_names)
        if valid.any() and int(ids_a.max()) >= len(names):
            raise DataFormatError(
                path, None,
                f"label id {int(ids_a.max())} has no name: label_names has {len(names)} entries",
            )
    lines: list[str] = []
    for i in range(ids_a.shape[0]):
        keep = valid[i]
        row = ids_a[i][keep].tolist()
        obj: dict[str, object] = {"ids": row}
        if sc is not None:
            # str(np.float32) is the shortest text that reads back to the same float32.
            obj["scores"] = [float(str(v)) for v in sc[i][keep]]
        if names is not None:
            obj["labels"] = [names[j] for j in row]
        if extra is not None:
            for key, value in extra[i].items():
                if isinstance(value, (list, np.ndarray)):
                    obj[key] = [_plain(value[j]) for j in np.flatnonzero(keep)]
                else:
                    obj[key] = _plain(value)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return lines


def _plain(v: object) -> object:
    """numpy scalars as Python numbers (float32 by its shortest round-trip text)."""
    if isinstance(v, np.floating):
        return float(str(np.float32(v)))
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_predictions(
    path: PathType,
    ids: np.ndarray,
    scores: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    extra: Sequence[dict[str, object]] | None = None,
    num_labels: int | None = None,
) -> None:
    """Write the top-k predictions of ``N`` points, one line per point, best first.

    The format follows the suffix (``.jsonl`` -> JSONL, ``.npz`` -> a scipy CSR score matrix
    ``[N, L]`` as PECOS ``smat_util`` / pyxclib read it, otherwise text). Entries with id
    ``-1`` (padding) are left out. The file is written atomically (temporary file + rename).

    Args:
        path: output file.
        ids: int ``[N, k]`` label ids, best first, ``-1`` = padding.
        scores: float ``[N, k]`` scores of ``ids`` or ``None`` to write ids only.
        label_names: the ``L`` label names; written as ``"labels"`` in JSONL files (text
            files carry ids only and ignore them).
        extra: JSONL only: ``N`` dicts of more fields per line (see :func:`jsonl_lines`).
        num_labels: ``.npz`` only: the column count ``L`` (default: ``len(label_names)``, else
            the largest id + 1).

    Raises:
        DataFormatError: (line ``None``) on inconsistent shapes, non-integer ids, NaN scores
            or ids outside ``label_names``.
    """
    path = Path(path)
    check_predictions_path(path)
    ids_a, sc = _check_arrays(path, ids, scores)
    if is_npz(path):
        _write_npz(path, ids_a, sc, num_labels if num_labels is not None else (
            len(label_names) if label_names is not None else None))
        return
    n, k = ids_a.shape
    valid = ids_a >= 0  # [N, k]
    counts = valid.sum(axis=1)  # [N]
    # Flat valid entries in row-major order: [nnz]; row i owns flat[bounds[i]:bounds[i + 1]].
    flat_ids = ids_a[valid].tolist()
    # str(np.float32) is the shortest text that reads back to the same float32.
    flat_sc = None if sc is None else [str(v) for v in sc[valid]]
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    lines: list[str] = []
    if is_jsonl(path):
        lines = jsonl_lines(ids_a, sc, label_names, path=path, extra=extra)
    else:
        if label_names is not None:
            logger.debug("text prediction files carry ids only; label_names not written")
        if flat_sc is None:
            tokens = [str(v) for v in flat_ids]
        else:
            tokens = [f"{i}:{v}" for i, v in zip(flat_ids, flat_sc)]
        lines = [" ".join(tokens[bounds[i] : bounds[i + 1]]) + "\n" for i in range(n)]
    atomic_write_text(path, "".join(lines), make_parents=True)
    logger.info("wrote predictions of %d points (k=%d) to %s", n, k, path)


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


def _text_lines(path: Path, f: Any) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a binary file handle; a byte-order mark is skipped and a
    line that is not UTF-8 text (or holds NUL bytes: a binary file) is a DataFormatError."""
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            if b"\x00" in raw:
                raise ValueError("NUL byte")
            line = raw.decode("utf-8")
        except ValueError:
            raise DataFormatError(
                path, lineno, "not a UTF-8 text line: a prediction file is text (id:score ...) "
                "or JSONL, as `xmc predict` writes; is this a binary file (e.g. an .npz)?"
            ) from None
        yield lineno, line


def _parse_text(path: Path) -> tuple[list[list[int]], list[list[float]] | None]:
    ids_rows: list[list[int]] = []
    score_rows: list[list[float]] = []
    has_scores: bool | None = None
    first_line = 0
    with open(path, "rb") as f:
        for lineno, line in _text_lines(path, f):
            tokens = line.split()
            if not tokens:
                ids_rows.append([])
                score_rows.append([])
                continue
            with_score = ":" in tokens[0]
            if has_scores is None:
                has_scores, first_line = with_score, lineno
            try:
                if has_scores:
                    pairs = [t.split(":") for t in tokens]
                    if any(len(p) != 2 for p in pairs):
                        raise ValueError("every entry must be id:score")
                    row_ids = [int(p[0]) for p in pairs]
                    row_sc = [float(p[1]) for p in pairs]
                    if any(math.isnan(s) for s in row_sc):
                        raise ValueError("a score is NaN")
                else:
                    if any(":" in t for t in tokens):
                        raise ValueError("entries with scores (id:score) mixed with bare ids")
                    row_ids = [int(t) for t in tokens]
                    row_sc = []
            except ValueError as exc:
                style = "id:score" if has_scores else "bare ids"
                raise DataFormatError(
                    path,
                    lineno,
                    f"cannot parse prediction line ({exc}); expected {style} like line "
                    f"{first_line}, got {line.strip()[:80]!r}",
                ) from None
            ids_rows.append(row_ids)
            score_rows.append(row_sc)
    return ids_rows, (score_rows if has_scores else None)


_INT_TYPES = {int}  # json.loads gives bool for true/false: rejected
_NUM_TYPES = {int, float}


def _parse_jsonl(path: Path) -> tuple[list[list[int]], list[list[float]] | None]:
    ids_rows: list[list[int]] = []
    score_rows: list[list[float]] = []
    has_scores: bool | None = None
    with open(path, "rb") as f:
        for lineno, line in _text_lines(path, f):
            if not line.strip():
                raise DataFormatError(
                    path, lineno, 'empty line; write {"ids": []} for a point without predictions'
                )
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, lineno, f"invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict) or "ids" not in obj:
                raise DataFormatError(path, lineno, 'expected an object with an "ids" list')
            row_ids = obj["ids"]
            if not isinstance(row_ids, list) or not set(map(type, row_ids)) <= _INT_TYPES:
                raise DataFormatError(path, lineno, '"ids" must be a list of integers')
            this_has = "scores" in obj and obj["scores"] is not None
            if has_scores is None:
                has_scores = this_has
            elif this_has != has_scores:
                raise DataFormatError(
                    path, lineno, '"scores" present on some lines and absent on others'
                )
            row_sc: list[float] = []
            if this_has:
                row_sc = obj["scores"]
                if (
                    not isinstance(row_sc, list)
                    or len(row_sc) != len(row_ids)
                    or not set(map(type, row_sc)) <= _NUM_TYPES
                ):
                    raise DataFormatError(
                        path,
                        lineno,
                        f'"scores" must be a list of {len(row_ids)} numbers, one per id',
                    )
                if any(map(math.isnan, row_sc)):
                    raise DataFormatError(path, lineno, "a score is NaN")
            labels = obj.get("labels")
            if labels is not None and (not isinstance(labels, list) or len(labels) != len(row_ids)):
                raise DataFormatError(
                    path, lineno, f'"labels" must be a list of {len(row_ids)} names, one per id'
                )
            ids_rows.append(row_ids)
            score_rows.append(row_sc)
    return ids_rows, (score_rows if has_scores else None)


def _line_of_row(row: int) -> int:
    return row + 1  # one line per point, no header


def read_predictions(
    path: PathType, *, sort_by_score: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a prediction file written by :func:`write_predictions` (or by hand).

    Args:
        path: a text, ``.jsonl`` or ``.npz`` (CSR score matrix ``[N, L]``, e.g. from PECOS;
            rows are ranked by decreasing value) prediction file.
        sort_by_score: reorder each line by decreasing score instead of rejecting lines whose
            scores are not sorted best first.

    Returns:
        ``(ids, scores)``: ids int64 ``[N, kmax]`` padded with ``-1``; scores float32
        ``[N, kmax]`` padded with ``-inf``, or ``None`` when the file has no scores.

    Raises:
        DataFormatError: with the line number, on unparsable lines, negative ids, a label id
            listed twice on one line, or scores not sorted best first.
            Also when ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "prediction file not found (check --predictions)")
    if is_npz(path):
        return _read_npz(path)
    ids_rows, score_rows = _parse_jsonl(path) if is_jsonl(path) else _parse_text(path)
    n = len(ids_rows)
    counts = np.fromiter((len(r) for r in ids_rows), dtype=np.int64, count=n)  # [N]
    kmax = int(counts.max()) if n else 0
    flat_ids = np.fromiter(
        (v for r in ids_rows for v in r), dtype=np.int64, count=int(counts.sum())
    )  # [nnz]
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)  # [nnz]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if n else np.zeros(0, np.int64)
    cols = np.arange(flat_ids.shape[0], dtype=np.int64) - starts[rows]  # [nnz]
    ids = np.full((n, kmax), -1, dtype=np.int64)
    ids[rows, cols] = flat_ids
    if flat_ids.size and flat_ids.min() < 0:
        bad = int(np.argmax(flat_ids < 0))
        raise DataFormatError(
            path,
            _line_of_row(int(rows[bad])),
            f"label id {int(flat_ids[bad])} is negative; ids are 0-based label indices "
            "(leave padding out of the file)",
        )
    scores: np.ndarray | None = None
    if score_rows is not None:
        flat_sc = np.fromiter(
            (v for r in score_rows for v in r), dtype=np.float64, count=flat_ids.shape[0]
        ).astype(np.float32)
        scores = np.full((n, kmax), -np.inf, dtype=np.float32)
        scores[rows, cols] = flat_sc
        if kmax > 1:
            rising = scores[:, 1:] > scores[:, :-1]  # [N, kmax-1]; padding is -inf
            if rising.any():
                if sort_by_score:
                    order = np.argsort(-scores, axis=1, kind="stable")  # [N, kmax]
                    scores = np.take_along_axis(scores, order, axis=1)
                    ids = np.take_along_axis(ids, order, axis=1)
                else:
                    r, c = np.argwhere(rising)[0]
                    raise DataFormatError(
                        path,
                        _line_of_row(int(r)),
                        f"scores are not sorted best first ({scores[r, c]:g} then "
                        f"{scores[r, c + 1]:g}); sort each line by decreasing score "
                        "(read_predictions(..., sort_by_score=True))",
                    )
    if kmax > 1:
        s = np.sort(ids, axis=1)  # [N, kmax]
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            r, c = np.argwhere(dup)[0]
            raise DataFormatError(
                path,
                _line_of_row(int(r)),
                f"label id {int(s[r, c])} is listed more than once; each label may be "
                "predicted at most once per point",
            )
    logger.info("read predictions of %d points (kmax=%d) from %s", n, kmax, path)
    return ids, scores
