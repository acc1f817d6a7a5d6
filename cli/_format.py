"""Rendering of metrics dicts, shared by every command that reports metrics.

A metrics dict uses the toolkit's keys ``P@k``, ``nDCG@k``, ``PSP@k``, ``PSnDCG@k``, ``R@k``
(fractions in ``[0, 1]``) and may hold ``num_rows_evaluated`` / ``num_rows_without_labels``.
Human output shows percentages with two decimals, one line per ``k``; a missing metric shows
as ``-``. JSON output keeps fractions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table

__all__ = [
    "COLUMNS",
    "metrics_table",
    "metrics_lines",
    "metrics_json",
    "rows_summary",
]

#: Metric columns of the human table, in order.
COLUMNS: tuple[str, ...] = ("P", "nDCG", "PSP", "PSnDCG", "R")


def _pct(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(v):
        return "nan"
    return f"{100.0 * v:.2f}"


def _ks(ks: Iterable[int]) -> list[int]:
    return sorted({int(k) for k in ks})


def rows_summary(metrics: Mapping[str, Any]) -> str | None:
    """``"rows evaluated: N (M without labels, skipped)"``, or ``None`` without row counts."""
    n = metrics.get("num_rows_evaluated")
    if n is None:
        return None
    empty = metrics.get("num_rows_without_labels")
    if empty is None:
        return f"rows evaluated: {int(n)}"
    return f"rows evaluated: {int(n)} ({int(empty)} without labels, skipped)"


def metrics_table(metrics: Mapping[str, Any], ks: Iterable[int], title: str | None = None) -> Table:
    """A rich table: one row per ``k``, columns ``P@k nDCG@k PSP@k PSnDCG@k R@k`` in percent.

    Args:
        metrics: a metrics dict (fractions).
        ks: the cut-offs to show, e.g. ``range(1, 6)``.
        title: optional table title.
    """
    table = Table(title=title, caption=rows_summary(metrics))
    table.add_column("k", justify="right")
    for name in COLUMNS:
        table.add_column(f"{name}@k", justify="right")
    for k in _ks(ks):
        table.add_row(str(k), *(_pct(metrics, f"{name}@{k}") for name in COLUMNS))
    return table


def metrics_lines(metrics: Mapping[str, Any], ks: Iterable[int]) -> str:
    """PECOS-like plain text: a header, one line per ``k`` in percent, then the row counts.

    Example::

        k     P@k  nDCG@k   PSP@k  PSnDCG@k     R@k
        1   64.53   64.53   48.10     48.10   38.21
        rows evaluated: 2515 (0 without labels, skipped)
    """
    widths = [max(7, len(name) + 2) for name in COLUMNS]
    header = "k  " + " ".join(f"{name + '@k':>{w}}" for name, w in zip(COLUMNS, widths))
    out = [header]
    for k in _ks(ks):
        cells = " ".join(f"{_pct(metrics, f'{name}@{k}'):>{w}}" for name, w in zip(COLUMNS, widths))
        out.append(f"{k:<3}{cells}")
    summary = rows_summary(metrics)
    if summary:
        out.append(summary)
    return "\n".join(out)


def _plain(value: Any) -> Any:
    """JSON-safe scalar: numpy numbers -> Python, NaN/inf -> ``None``."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_json(metrics: Mapping[str, Any]) -> str:
    """One JSON object (a single line) with the metrics as fractions and the row counts.

    NaN/inf become ``null``; integral row counts (``num_*``) are written as integers.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        v = _plain(value)
        if str(key).startswith("num_") and isinstance(v, float) and v.is_integer():
            v = int(v)
        out[str(key)] = v
    return json.dumps(out, allow_nan=False)
