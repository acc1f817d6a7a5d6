"""Records every bad input / fault that the reliability tests try, and what happened.

Test modules declare their cases at import time with :func:`case` (category, name, expected
outcome) and report the observed outcome through the ``reliability`` fixture::

    from reliability import case, reliability  # noqa: F401  (the fixture)

    TRUNCATED = case("loaders", "XC: truncated file", "DataFormatError naming file and line")

    def test_truncated(reliability, tmp_path):
        ...
        reliability.record(TRUNCATED, outcome_of(lambda: load(path)))

``record`` stores the observed text in this process and, when ``$XMC_RELIABILITY_LOG`` names a
file, appends one JSON line to it. ``scripts/gen_reliability_doc.py`` runs the reliability test
files with that variable set and renders ``docs/reliability.md`` from the log;
``tests/test_reliability.py`` renders the same document from the in-process records and fails
when the committed file differs (so the document cannot drift from the tests).

Observed texts must be deterministic: temporary paths are reduced to file names
(:func:`describe_error`) and Hypothesis-driven cases run with ``derandomize=True`` and report
counts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["Case", "case", "declared_cases", "recorded", "describe_error", "outcome_of",
           "reliability", "Recorder", "CATEGORIES"]

#: Categories in the order the document lists them.
CATEGORIES = (
    "loaders",
    "cli",
    "config",
    "interrupted runs",
    "output directories",
    "checkpoints",
    "numerical safety",
    "data mismatches",
    "memory bounds",
)


@dataclass(frozen=True)
class Case:
    """One bad input or fault: ``category``, short ``name``, ``expected`` outcome."""

    category: str
    name: str
    expected: str

    @property
    def key(self) -> str:
        return f"{self.category} / {self.name}"


_DECLARED: dict[str, Case] = {}
_RECORDS: dict[str, str] = {}


def case(category: str, name: str, expected: str) -> Case:
    """Declare a case (at import time of a test module); returns it for ``record``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown reliability category {category!r}; add it to CATEGORIES")
    c = Case(category, name, expected)
    old = _DECLARED.get(c.key)
    if old is not None and old != c:
        raise ValueError(f"reliability case {c.key!r} declared twice with different outcomes")
    _DECLARED[c.key] = c
    return c


def declared_cases() -> list[Case]:
    """Every declared case, by category order then declaration order."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    items = list(_DECLARED.values())
    return sorted(items, key=lambda c: order[c.category])  # stable: declaration order kept


def recorded() -> dict[str, str]:
    """``{case.key: observed}`` recorded in this process."""
    return dict(_RECORDS)


def _strip_paths(text: str) -> str:
    """Reduce absolute paths to their last component (temporary directories vary per run)."""
    return re.sub(r"(?:/[^\s:'\"/]+)+/([^\s:'\"/]+)", r"\1", text)


def describe_error(exc: BaseException) -> str:
    """``ExceptionName: message`` with paths reduced to file names (one line, <= 160 chars)."""
    msg = _strip_paths(str(exc)).replace("\n", " ")
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(exc).__name__}: {msg}"


def outcome_of(fn: Callable[[], Any]) -> str:
    """Run ``fn`` and describe the outcome: ``ok`` or the error it raised."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to describe any outcome
        return describe_error(exc)
    return "ok"


class Recorder:
    """What the ``reliability`` fixture returns."""

    def record(self, c: Case, observed: str) -> None:
        """Store the observed outcome of case ``c`` (one line, deterministic text)."""
        if c.key not in _DECLARED:
            raise ValueError(f"case {c.key!r} was not declared with case()")
        observed = " ".join(str(observed).split())
        _RECORDS[c.key] = observed
        log = os.environ.get("XMC_RELIABILITY_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"category": c.category, "case": c.name,
                                     "expected": c.expected, "observed": observed}) + "\n")


@pytest.fixture
def reliability() -> Recorder:
    """Records (category, case, expected, observed) for ``docs/reliability.md``."""
    return Recorder()
