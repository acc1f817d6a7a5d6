"""Mulan ARFF (+ label XML) and MEKA ARFF (``-C n`` in ``@relation``) multi-label files.

ARFF files of multi-label benchmarks are small (thousands of rows), so rows are parsed line by
line in Python; the result is assembled into CSR with numpy.

Label attributes:

* Mulan: the label XML names them; they may sit anywhere among the attributes. Label ids follow
  the XML's order and ``label_names`` are the XML names verbatim. A name is matched against the
  attribute name as written inside its ARFF quotes (escapes such as ``\\'`` kept) and, failing
  that, against the ARFF-unescaped name; it is never unescaped itself.
* MEKA: ``-C n`` in the relation name: the first ``n`` attributes are labels (``n > 0``) or the
  last ``|n|`` (``n < 0``). Used only when no XML is given or found (the XML wins otherwise).
"""

from __future__ import annotations

import csv
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import DataFormatError

__all__ = ["read_arff", "read_label_names", "read_label_xml"]

logger = logging.getLogger(__name__)

_F32_MAX = float(np.finfo(np.float32).max)  # larger values overflow to inf in X
_MEKA_C = re.compile(r"(?:^|[\s'\"])-C\s+(-?\d+)")
_SPLIT_SUFFIX = re.compile(r"([-_.](train|test|trn|tst|tr|te|val|valid))$", re.IGNORECASE)


@dataclass
class _Attr:
    raw: str  # name as written (inside its quotes, escapes kept)
    name: str  # ARFF-unescaped name
    kind: str  # "numeric" or "nominal"
    values: tuple[str, ...] = ()


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _take_name(text: str) -> tuple[str, str, str]:
    """Split ``text`` into (raw name, unescaped name, rest) following ARFF quoting."""
    text = text.lstrip()
    if text[:1] in ("'", '"'):
        q = text[0]
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == q:
                raw = text[1:i]
                return raw, _unescape(raw), text[i + 1 :]
            i += 1
        raise ValueError("unterminated quote in attribute name")
    m = re.match(r"(\S+)(.*)", text, re.DOTALL)
    if not m:
        raise ValueError("missing attribute name")
    return m.group(1), m.group(1), m.group(2)


def _strip_quotes(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in ("'", '"'):
        return _unescape(v[1:-1])
    return v


def _split_values(body: str) -> list[str]:
    if "'" not in body and '"' not in body:
        return [v.strip() for v in body.split(",")]
    row = next(csv.reader([body], quotechar="'", escapechar="\\", skipinitialspace=True))
    return [v.strip() for v in row]


def read_label_xml(path: Path) -> list[str]:
    """Label names of a Mulan label XML, in document order (names kept verbatim)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataFormatError(path, None, f"cannot read the label XML: {exc}") from None
    names = [el.attrib["name"] for el in root.iter() if el.tag.split("}")[-1] == "label"]
    if not names or any(not n for n in names):
        raise DataFormatError(path, None, "no <label name=...> elements in the label XML")
    return names


def read_label_names(path: Path) -> list[str]:
    """Label names from a Mulan XML (``*.xml``) or a text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "label names file not found")
    if path.suffix.lower() == ".xml":
        return read_label_xml(path)
    names = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:  # a byte-order mark is skipped
                names.append(raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                             .rstrip("\r\n"))
            except UnicodeDecodeError:
                raise DataFormatError(path, lineno, "label names must be UTF-8 text, one name "
                                      "per line (or a Mulan label XML)") from None
    while names and names[-1] == "":
        names.pop()
    return names


def _find_xml(path: Path) -> Path | None:
    stem = path.stem
    candidates = [path.with_suffix(".xml")]
    base = _SPLIT_SUFFIX.sub("", stem)
    if base != stem:
        candidates.append(path.with_name(base + ".xml"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _parse_header(path: Path, lines: list[str]) -> tuple[str, list[_Attr], int]:
    relation = ""
    attrs: list[_Attr] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        low = s.lower()
        if low.startswith("@relation"):
            relation = s[len("@relation") :].strip()
        elif low.startswith("@attribute"):
            try:
                raw, name, rest = _take_name(s[len("@attribute") :])
            except ValueError as exc:
                raise DataFormatError(path, i + 1, f"{exc}: {s[:80]!r}") from None
            rest = rest.strip()
            if rest.startswith("{"):
                if not rest.endswith("}"):
                    raise DataFormatError(path, i + 1, f"unterminated nominal value list: {s[:80]!r}")
                values = tuple(_strip_quotes(v) for v in _split_values(rest[1:-1]))
                attrs.append(_Attr(raw, name, "nominal", values))
            elif rest.lower() in ("numeric", "real", "integer"):
                attrs.append(_Attr(raw, name, "numeric"))
            else:
                raise DataFormatError(
                    path,
                    i + 1,
                    f"attribute {name!r} has type {rest!r}: only numeric/real/integer and nominal "
                    "attributes are supported; remove or encode it",
                )
        elif low.startswith("@data"):
            return relation, attrs, i + 1
        else:
            raise DataFormatError(path, i + 1, f"unexpected header line {s[:80]!r}: expected @relation, @attribute or @data")
    raise DataFormatError(path, max(1, len(lines)), "no @data line: truncated or not an ARFF file")


def _label_columns(
    path: Path, relation: str, attrs: list[_Attr], label_xml: Path | None
) -> tuple[list[int], list[str]]:
    xml = Path(label_xml) if label_xml is not None else _find_xml(path)
    if label_xml is not None and not xml.is_file():  # type: ignore[union-attr]
        raise DataFormatError(xml, None, "label XML not found (--label-xml)")
    if xml is not None:
        names = read_label_xml(xml)
        by_raw: dict[str, int] = {}
        by_name: dict[str, int] = {}
        for j, a in enumerate(attrs):
            by_raw.setdefault(a.raw, j)
            by_name.setdefault(a.name, j)
        cols: list[int] = []
        missing: list[str] = []
        for nm in names:
            j = by_raw.get(nm, by_name.get(nm))
            if j is None:
                missing.append(nm)
            else:
                cols.append(j)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise DataFormatError(
                path,
                None,
                f"{len(missing)} label(s) of {xml.name} are not attributes of the ARFF file "
                f"({shown}); pass the XML that belongs to this file (--label-xml)",
            )
        if len(set(cols)) != len(cols):
            raise DataFormatError(xml, None, "the label XML names the same attribute twice")
        logger.info("ARFF labels from %s (%d labels)", xml, len(cols))
        return cols, names
    m = _MEKA_C.search(relation)
    if m is None:
        raise DataFormatError(
            path,
            None,
            "cannot tell which attributes are labels: no Mulan label XML beside the file and no "
            "MEKA '-C n' in @relation; pass the XML (label_xml=..., --label-xml)",
        )
    c = int(m.group(1))
    if c == 0 or abs(c) > len(attrs):
        raise DataFormatError(path, 1, f"MEKA -C {c} does not fit {len(attrs)} attributes")
    cols = list(range(c)) if c > 0 else list(range(len(attrs) + c, len(attrs)))
    tail = attrs[len(attrs) - abs(c):] if c > 0 else []
    if tail and all(a.kind == "nominal" and set(a.values) == {"0", "1"} for a in tail):
        # labels first (MEKA) or last (Mulan)? the file cannot tell: say which was chosen
        logger.warning(
            "%s: no Mulan label XML found; using MEKA '-C %d' from @relation, so the FIRST %d "
            "attributes (%s, ...) are read as labels. A Mulan file puts its labels LAST: pass "
            "its XML with --label-xml FILE.xml (label_xml=...) or put it beside the ARFF file "
            "as %s", path, c, c, attrs[0].name, path.with_suffix(".xml").name)
    return cols, [attrs[j].raw for j in cols]


def read_arff(
    path: Path, label_xml: Path | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix, list[str], list[str]]:
    """Read a Mulan or MEKA ARFF file.

    Args:
        path: the ``.arff`` file (sparse ``{i v, ...}`` and dense rows may be mixed).
        label_xml: Mulan label XML; default: ``<stem>.xml`` or ``<stem without -train/-test>.xml``
            beside the file, else MEKA ``-C n``.

    Returns:
        ``(X [N, D] csr float32, Y [N, L] csr float32, label_names, feature_names)``.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        lines = fh.read().split("\n")  # only \n ends a line (keeps line numbers exact)
    relation, attrs, data_start = _parse_header(path, lines)
    label_cols, label_names = _label_columns(path, relation, attrs, label_xml)
    n_attr = len(attrs)
    # attribute -> (is_label, column)
    target = np.full(n_attr, -1, dtype=np.int64)
    is_label = np.zeros(n_attr, dtype=bool)
    for k, j in enumerate(label_cols):
        target[j] = k
        is_label[j] = True
    feat_cols = [j for j in range(n_attr) if not is_label[j]]
    for k, j in enumerate(feat_cols):
        target[j] = k
    nominal_num: list[dict[str, float] | None] = []
    for j, a in enumerate(attrs):
        if a.kind == "nominal":
            table: dict[str, float] = {}
            for v in a.values:
                try:
                    table[v] = float(v)
                except ValueError:
                    table[v] = math.nan
            nominal_num.append(table)
        else:
            nominal_num.append(None)

    x_rows: list[int] = []
    x_cols: list[int] = []
    x_vals: list[float] = []
    y_rows: list[int] = []
    y_cols: list[int] = []
    n = 0
    for i in range(data_start, len(lines)):
        s = lines[i].strip()
        if not s or s.startswith("%"):
            continue
        lineno = i + 1
        if s.startswith("{"):
            if not s.endswith("}"):
                raise DataFormatError(path, lineno, "sparse row must end with '}'")
            body = s[1:-1].strip()
            pairs: list[tuple[int, str]] = []
            if body:
                for item in _split_values(body) if ("'" in body or '"' in body) else body.split(","):
                    parts = item.strip().split(None, 1)
                    if len(parts) != 2 or not parts[0].isdigit():
                        raise DataFormatError(path, lineno, f"expected 'index value' in sparse row, found {item.strip()[:40]!r}")
                    pairs.append((int(parts[0]), parts[1]))
            seen = [j for j, _ in pairs]
            if len(set(seen)) != len(seen):
                raise DataFormatError(path, lineno, "duplicate attribute index in a sparse row")
        else:
            values = _split_values(s)
            if len(values) != n_attr:
                raise DataFormatError(
                    path, lineno, f"dense row has {len(values)} values, expected {n_attr} (one per attribute)"
                )
            pairs = list(enumerate(values))
        for j, v in pairs:
            if j >= n_attr:
                raise DataFormatError(path, lineno, f"attribute index {j} out of range (the header declares {n_attr})")
            v = _strip_quotes(v)
            if v == "?":
                raise DataFormatError(
                    path, lineno, f"missing value '?' for attribute {attrs[j].raw!r}: fill or impute it first"
                )
            table = nominal_num[j]
            if table is not None:
                if v not in table:
                    raise DataFormatError(path, lineno, f"value {v!r} is not declared for nominal attribute {attrs[j].raw!r}")
                x = table[v]
                if math.isnan(x):
                    raise DataFormatError(path, lineno, f"non-numeric nominal value {v!r} of attribute {attrs[j].raw!r} is not supported")
            else:
                try:
                    x = float(v)
                except ValueError:
                    raise DataFormatError(path, lineno, f"non-numeric value {v!r} for attribute {attrs[j].raw!r}") from None
                if not math.isfinite(x) or abs(x) > _F32_MAX:
                    raise DataFormatError(path, lineno, f"value {v!r} of attribute {attrs[j].raw!r} is NaN or infinite (in float32)")
            if is_label[j]:
                if x not in (0.0, 1.0):
                    raise DataFormatError(path, lineno, f"label attribute {attrs[j].raw!r} has value {v!r}: expected 0 or 1")
                if x == 1.0:
                    y_rows.append(n)
                    y_cols.append(int(target[j]))
            elif x != 0.0:
                x_rows.append(n)
                x_cols.append(int(target[j]))
                x_vals.append(x)
        n += 1
    X = sp.csr_matrix(
        (np.asarray(x_vals, dtype=np.float32), (np.asarray(x_rows, dtype=np.int64), np.asarray(x_cols, dtype=np.int64))),
        shape=(n, len(feat_cols)),
    )
    Y = sp.csr_matrix(
        (np.ones(len(y_rows), dtype=np.float32), (np.asarray(y_rows, dtype=np.int64), np.asarray(y_cols, dtype=np.int64))),
        shape=(n, len(label_cols)),
    )
    X.sort_indices()
    Y.sort_indices()
    return X, Y, label_names, [attrs[j].raw for j in feat_cols]
