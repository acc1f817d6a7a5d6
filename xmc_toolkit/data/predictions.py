"""Prediction files: the top-k label ids (and scores) of each point, best first (numpy only).

Two formats, chosen by the file suffix:

* **text** (any suffix but ``.jsonl``): one line per point, ``id:score id:score ...`` or just
  ``id id ...``, best first. An empty line is a point without predictions. Every line of a file
  uses the same style (all with scores or all without).
* **JSONL** (``.jsonl``): one JSON object per line,
  ``{"ids": [3, 7], "scores": [0.9, 0.2], "labels": ["cs.LG", "stat.ML"]}``; ``scores`` and
  ``labels`` are optional (``labels`` is informative and ignored by the reader).

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

from xmc_toolkit._fileio import atomic_write_text
from xmc_toolkit.errors import DataFormatError

__all__ = ["write_predictions", "read_predictions", "is_jsonl", "check_predictions_path"]

#: suffixes of binary formats that a prediction file never has (it is text or JSONL)
_BINARY_SUFFIXES = (".npz", ".npy", ".safetensors", ".pt", ".pkl", ".gz", ".zip")


def check_predictions_path(path: PathType) -> None:
    """Refuse an output name whose suffix promises a binary format.

    Raises:
        DataFormatError: e.g. ``preds.npz`` (the file would hold text).
    """
    p = Path(path)
    if p.suffix.lower() in _BINARY_SUFFIXES:
        raise DataFormatError(p, None, f"predictions are written as text (id:score per line) "
                              f"or JSONL (.jsonl), not {p.suffix}: use --out "
                              f"{p.with_suffix('.txt').name} or {p.with_suffix('.jsonl').name}")

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]


def is_jsonl(path: PathType) -> bool:
    """Whether ``path`` names a JSONL prediction file (suffix ``.jsonl``)."""
    return Path(path).suffix.lower() == ".jsonl"


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


def write_predictions(
    path: PathType,
    ids: np.ndarray,
    scores: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
) -> None:
    """Write the top-k predictions of ``N`` points, one line per point, best first.

    The format follows the suffix (``.jsonl`` -> JSONL, otherwise text). Entries with id
    ``-1`` (padding) are left out. The file is written atomically (temporary file + rename).

    Args:
        path: output file.
        ids: int ``[N, k]`` label ids, best first, ``-1`` = padding.
        scores: float ``[N, k]`` scores of ``ids`` or ``None`` to write ids only.
        label_names: the ``L`` label names; written as ``"labels"`` in JSONL files (text
            files carry ids only and ignore them).

    Raises:
        DataFormatError: (line ``None``) on inconsistent shapes, non-integer ids, NaN scores
            or ids outside ``label_names``.
    """
    path = Path(path)
    check_predictions_path(path)
    ids_a, sc = _check_arrays(path, ids, scores)
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
        names = None
        if label_names is not None:
            names = list(label_names)
            if valid.any() and int(ids_a.max()) >= len(names):
                raise DataFormatError(
                    path,
                    None,
                    f"label id {int(ids_a.max())} has no name: label_names has {len(names)} "
                    "entries",
                )
        for i in range(n):
            a, b = bounds[i], bounds[i + 1]
            obj: dict[str, object] = {"ids": flat_ids[a:b]}
            if flat_sc is not None:
                obj["scores"] = [float(v) for v in flat_sc[a:b]]
            if names is not None:
                obj["labels"] = [names[j] for j in flat_ids[a:b]]
            lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
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
        path: a text or ``.jsonl`` prediction file.
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
