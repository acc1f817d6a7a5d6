"""Shared fixtures: seeded RNG, tiny synthetic problems, and the real data sets when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, settings

settings.register_profile(
    "xmc", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("xmc")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or ``$XMC_SHARED_DATA``), if it exists."""
    env = os.environ.get("XMC_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (real data sets are not part of the repository)")
    return d


@pytest.fixture(scope="session")
def bibtex_train(shared_data: Path) -> Path:
    p = shared_data / "xc" / "bibtex_train.txt"
    if not p.exists():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture(scope="session")
def bibtex_test(shared_data: Path) -> Path:
    p = shared_data / "xc" / "bibtex_test.txt"
    if not p.exists():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_tiny_problem(n: int = 60, seed: int = 1) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """A tiny learnable problem: ``n`` points, 20 features, 6 labels; label j <-> features 3j..3j+2.

    Rows have one or two labels; features 18/19 alternate as a weak label-free signal. The same
    ``(n, seed)`` always gives the same matrices (module-scoped fixtures call this directly).
    """
    g = np.random.default_rng(seed)
    d, l = 20, 6
    Y = np.zeros((n, l), dtype=np.float32)
    X = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        labs = g.choice(l, size=g.integers(1, 3), replace=False)
        Y[i, labs] = 1
        for j in labs:
            X[i, 3 * j : 3 * j + 3] = g.random(3) + 0.5
        X[i, 18 + (i % 2)] = 0.1
    return sp.csr_matrix(X), sp.csr_matrix(Y)


@pytest.fixture
def tiny_xy() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """:func:`make_tiny_problem` with 60 points."""
    return make_tiny_problem(60)
