"""Raw-text data sets: JSONL, TSV and CSV records of a text and its string labels.

``read_text(path)`` returns a :class:`TextData` (texts, label lists, record ids, the 1-based
line of each record); :func:`label_vocabulary` builds the label names of a training set and
:func:`label_matrix` turns label lists into the binary ``Y`` of those names. Turning texts into
feature vectors is the featurizer's job (``xmc_toolkit.featurizer``); :func:`text_dataset`
joins both into the :class:`~xmc_toolkit.data.dataset.XMCDataset` every other module takes.

Formats (by the name, a compression suffix ``.gz`` / ``.bz2`` / ``.xz`` stripped first):

* ``jsonl`` (``.jsonl``, ``.ndjson``): one JSON object per line,
  ``{"id": "...", "text": "...", "labels": ["tag a", "tag b"]}``.
* ``tsv`` (``.tsv``) / ``csv`` (``.csv``): a header row naming the columns, then one record per
  row; the label column holds the labels joined by ``label_sep`` (default ``|``). CSV follows
  RFC 4180 quoting; TSV has no quoting (a text cannot hold a tab or a line break).

Every problem raises :class:`~xmc_toolkit.errors.DataFormatError` naming the file and line:
a line that is not JSON, a record without the text or label field, a label that is not a
string, an empty text or label, a duplicate label in one record, a byte that is not UTF-8.
numpy/scipy only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from ..errors import DataFormatError
from .dataset import XMCDataset

__all__ = [
    "TEXT_FORMATS",
    "TextData",
    "TextFeaturizer",
    "text_format",
    "read_text",
    "iter_text_lines",
    "label_vocabulary",
    "label_matrix",
    "text_dataset",
]

logger = logging.getLogger(__name__)

TEXT_FORMATS = ("jsonl", "tsv", "csv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".csv": "csv"}
_COMPRESSED = (".gz", ".bz2", ".xz")
PathLike = str | os.PathLike


class TextFeaturizer(Protocol):
    """Anything that turns texts into feature rows (``xmc_toolkit.featurizer.Featurizer``)."""

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:  # pragma: no cover - protocol
        """``[len(texts), D]`` float32 CSR."""
        ...


@dataclass
class TextData:
    """Records of a text data file.

    Attributes:
        texts: ``N`` texts (never empty).
        labels: ``N`` label lists (strings, no duplicates within a list), or ``None`` when the
            file has no label field and labels were not required.
        ids: ``N`` record ids (the JSONL ``id`` field / an ``id`` column) or ``None``.
        path: the file read, for messages.
        lines: int64 ``[N]`` 1-based line of each record in the (decompressed) file.
    """

    texts: list[str]
    labels: list[list[str]] | None
    ids: list[str] | None = None
    path: str | None = None
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.texts)


def text_format(path: PathLike) -> str | None:
    """``"jsonl"``, ``"tsv"`` or ``"csv"`` when the name says so (``.gz``/``.bz2``/``.xz``
    stripped first), else ``None``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _COMPRESSED:
        suffix = Path(p.stem).suffix.lower()
    return _SUFFIXES.get(suffix)


def iter_text_lines(fh: Any, path: PathLike | None) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, decoded line without its line end)`` of a binary handle.

    Raises:
        DataFormatError: a line is not valid UTF-8 (names the byte and its column).
    """
    from .formats import DECOMPRESSION_ERRORS, damaged_file_error

    it = iter(fh)
    number = 0
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except DECOMPRESSION_ERRORS as exc:
            raise damaged_file_error(path, exc) from None
        number += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFormatError(
                path, number, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not "
                "valid UTF-8; save the file as UTF-8"
            ) from None
        if number == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark
            line = line[1:]
        yield number, line.rstrip("\r\n")


def _check_text(value: Any, path: PathLike, line: int, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"field {text_field!r} is {type(value).__name__} "
                              f"{_short(value)}; it must be a string (the document's text)")
    if not value.strip():
        raise DataFormatError(path, line, f"empty text in field {text_field!r}; remove the "
                              "record or give it a text")
    return value


def _check_labels(labels: list[Any], path: PathLike, line: int, label_field: str) -> list[str]:
    seen: set[str] = set()
    for lab in labels:
        if not isinstance(lab, str):
            raise DataFormatError(path, line, f"label {_short(lab)} in field {label_field!r} is "
                                  f"{type(lab).__name__}; labels must be strings (write "
                                  f"\"{lab}\" instead of {_short(lab)})")
        if not lab.strip():
            raise DataFormatError(path, line, f"empty label in field {label_field!r}; remove it")
        if lab in seen:
            raise DataFormatError(path, line, f"label {lab!r} appears twice in this record; "
                                  "list each label once")
        seen.add(lab)
    return list(labels)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_jsonl(path: Path, text_field: str, label_field: str, labels_required: bool
                ) -> TextData:
    from .formats import open_text_bytes

    texts: list[str] = []
    labels: list[list[str]] = []
    ids: list[str] = []
    lines: list[int] = []
    have_labels: bool | None = None
    have_ids = True
    with open_text_bytes(path) as fh:
        for number, line in iter_text_lines(fh, path):
            if not line.strip():
                raise DataFormatError(path, number, "blank line: every line must hold one JSON "
                                      "object; remove the line")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, number, f"not valid JSON ({exc.msg} at column "
                                      f"{exc.colno}); each line must be one JSON object such as "
                                      '{"text": "...", "labels": ["a", "b"]}') from None
            if not isinstance(rec, dict):
                raise DataFormatError(path, number, f"a JSON {type(rec).__name__}, not an "
                                      'object; each line must be {"text": "...", "labels": [...]}')
            if text_field not in rec:
                raise DataFormatError(path, number, f"record has no text field {text_field!r} "
                                      f"(fields: {', '.join(map(repr, rec)) or 'none'}); pass "
                                      "--text-field NAME")
            texts.append(_check_text(rec[text_field], path, number, text_field))
            has = label_field in rec
            if labels_required and not has:
                raise DataFormatError(path, number, f"record has no label field {label_field!r} "
                                      f"(fields: {', '.join(map(repr, rec))}); pass "
                                      "--label-field NAME")
            if have_labels is None:
                have_labels = has
            elif has != have_labels:
                raise DataFormatError(path, number, f"this record {'has' if has else 'lacks'} "
                                      f"the label field {label_field!r} but the first record "
                                      f"{'lacks' if has else 'has'} it; every record must agree")
            if has:
                value = rec[label_field]
                if not isinstance(value, list):
                    raise DataFormatError(path, number, f"field {label_field!r} is "
                                          f"{type(value).__name__} {_short(value)}; it must be a "
                                          'list of strings such as ["a", "b"] ([] for none)')
                labels.append(_check_labels(value, path, number, label_field))
            rid = rec.get("id")
            if rid is None:
                have_ids = False
            else:
                ids.append(str(rid))
            lines.append(number)
    if not texts:
        raise DataFormatError(path, None, "empty file: no records (expected one JSON object a "
                              "line)")
    return TextData(texts, labels if have_labels else None, ids if have_ids else None,
                    str(path), np.asarray(lines, dtype=np.int64))


def _read_table(path: Path, fmt: str, text_field: str, label_field: str, label_sep: str,
                labels_required: bool) -> TextData:
    from .formats import open_text_bytes

    if not label_sep:
        raise DataFormatError(path, None, "label_sep is empty; pass --label-sep (e.g. '|')")
    with open_text_bytes(path) as fh:
        numbered = iter_text_lines(fh, path)
        current = [0]

        def feed() -> Iterator[str]:
            for number, line in numbered:
                current[0] = number
                yield line

        if fmt == "csv":
            reader = csv.reader(feed(), strict=True)
        else:
            reader = csv.reader(feed(), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DataFormatError(path, None, f"empty file: expected a header row naming "
                                      f"the columns ({text_field}, {label_field})")
            if text_field not in header:
                raise DataFormatError(path, 1, f"no column {text_field!r} in the header "
                                      f"({', '.join(map(repr, header))}); pass --text-field NAME")
            has_labels = label_field in header
            if labels_required and not has_labels:
                raise DataFormatError(path, 1, f"no column {label_field!r} in the header "
                                      f"({', '.join(map(repr, header))}); pass --label-field NAME")
            ti = header.index(text_field)
            li = header.index(label_field) if has_labels else -1
            ii = header.index("id") if "id" in header else -1
            texts: list[str] = []
            labels: list[list[str]] = []
            ids: list[str] = []
            lines: list[int] = []
            for row in reader:
                number = current[0]
                if len(row) != len(header):
                    raise DataFormatError(path, number, f"{len(row)} columns but the header has "
                                          f"{len(header)}" + ("" if fmt == "csv" else
                                                              " (a tab inside a text?)"))
                texts.append(_check_text(row[ti], path, number, text_field))
                if has_labels:
                    cell = row[li].strip()
                    labs = [s.strip() for s in cell.split(label_sep)] if cell else []
                    labels.append(_check_labels(labs, path, number, label_field))
                if ii >= 0:
                    ids.append(row[ii])
                lines.append(number)
        except csv.Error as exc:
            raise DataFormatError(path, current[0], f"malformed {fmt.upper()} ({exc}); quote "
                                  "fields that hold the delimiter or quotes") from None
    if not texts:
        raise DataFormatError(path, None, "no records after the header row")
    return TextData(texts, labels if has_labels else None, ids if ii >= 0 else None, str(path),
                    np.asarray(lines, dtype=np.int64))


def read_text(path: PathLike, fmt: str | None = None, *, text_field: str = "text",
              label_field: str = "labels", label_sep: str = "|",
              labels_required: bool = True) -> TextData:
    """Read a JSONL / TSV / CSV text data file (compressed ones too, by content).

    Args:
        path: the file.
        fmt: ``"jsonl"``, ``"tsv"`` or ``"csv"``; from the name when ``None``.
        text_field: the JSON field / column holding the text.
        label_field: the JSON field (a list of strings) / column (labels joined by
            ``label_sep``) holding the labels.
        label_sep: TSV/CSV only: separator of the labels inside their column.
        labels_required: a record without the label field is an error (training,
            evaluation); with ``False`` (prediction) the labels may be absent everywhere.

    Returns:
        :class:`TextData` with one entry per record.

    Raises:
        DataFormatError: the file does not follow the format (file and line in the message).
    """
    p = Path(path)
    fmt = fmt or text_format(p)
    if fmt not in TEXT_FORMATS:
        raise DataFormatError(p, None, f"not a text data file: name it .jsonl, .tsv or .csv "
                              f"(optionally .gz/.bz2/.xz), or pass one of {', '.join(TEXT_FORMATS)}")
    if not p.is_file():
        raise DataFormatError(p, None, "no such file")
    if fmt == "jsonl":
        return _read_jsonl(p, text_field, label_field, labels_required)
    return _read_table(p, fmt, text_field, label_field, label_sep, labels_required)


def label_vocabulary(labels: Sequence[Sequence[str]]) -> list[str]:
    """The sorted distinct labels of a training set: label id ``j`` is name ``j``."""
    return sorted({lab for labs in labels for lab in labs})


def label_matrix(labels: Sequence[Sequence[str]], names: Sequence[str], *,
                 ignore_extra: bool = False, path: PathLike | None = None,
                 lines: np.ndarray | None = None) -> tuple[sp.csr_matrix, int]:
    """Binary ``Y`` float32 CSR ``[N, L]`` of label lists over the label names ``names``.

    Args:
        labels: ``N`` label lists.
        names: the ``L`` label names (a model's vocabulary).
        ignore_extra: drop labels outside ``names`` (counted) instead of failing.
        path, lines: file and 1-based line of each record, for the error message.

    Returns:
        ``(Y, dropped)``: ``dropped`` is the number of label assignments outside ``names``.

    Raises:
        DataFormatError: a label is not in ``names`` and ``ignore_extra`` is false.
    """
    index = {name: j for j, name in enumerate(names)}
    indptr = np.zeros(len(labels) + 1, dtype=np.int64)
    cols: list[int] = []
    dropped = 0
    for i, labs in enumerate(labels):
        for lab in dict.fromkeys(labs):  # a label listed twice counts once
            j = index.get(lab)
            if j is None:
                if not ignore_extra:
                    line = None if lines is None else int(lines[i])
                    raise DataFormatError(path, line, f"label {lab!r} is not one of the model's "
                                          f"{len(names)} labels; use --ignore-extra to drop "
                                          "labels unknown to the model (they are counted)")
                dropped += 1
                continue
            cols.append(j)
        indptr[i + 1] = len(cols)
    ind = np.asarray(cols, dtype=np.int32 if len(names) < 2**31 else np.int64)
    Y = sp.csr_matrix((np.ones(len(ind), dtype=np.float32), ind, indptr),
                      shape=(len(labels), len(names)))
    Y.sort_indices()
    return Y, dropped


def text_dataset(data: TextData, featurizer: TextFeaturizer, label_names: Sequence[str] | None,
                 *, ignore_extra: bool = False) -> XMCDataset:
    """Featurize ``data`` and encode its labels over ``label_names``.

    Rows without labels get an empty ``Y`` row; without ``label_names`` (or labels) ``Y`` has
    no columns. Dropped unknown labels (``ignore_extra``) are logged with their count.

    Returns:
        ``XMCDataset`` with ``X`` ``[N, D]`` from the featurizer and ``Y`` ``[N, L]``.
    """
    X = sp.csr_matrix(featurizer.transform(data.texts), dtype=np.float32)
    names = list(label_names) if label_names is not None else []
    if data.labels is None:
        Y = sp.csr_matrix((len(data.texts), len(names)), dtype=np.float32)
    else:
        Y, dropped = label_matrix(data.labels, names, ignore_extra=ignore_extra, path=data.path,
                                  lines=data.lines)
        if dropped:
            logger.warning("%s: dropped %d label assignments unknown to the model "
                           "(--ignore-extra)", data.path, dropped)
    return XMCDataset(X, Y, names if label_names is not None else None, None)
