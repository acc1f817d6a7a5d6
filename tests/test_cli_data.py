"""Tests of ``xmc data info`` and ``xmc data convert``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import xmc
from xmc_toolkit.data import load

FIX = Path(__file__).parent / "fixtures" / "formats"


def _run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(xmc, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_info_json_keys() -> None:
    code, out, _ = _run("data", "info", str(FIX / "tiny.txt"), "--json")
    assert code == 0
    s = json.loads(out)
    assert s["num_points"] == 5 and s["num_features"] == 6 and s["num_labels"] == 4
    assert s["avg_labels_per_point"] == pytest.approx(1.2)
    assert s["avg_points_per_label"] == pytest.approx(1.5)
    assert s["empty_rows"] == 2 and s["empty_labels"] == 1
    assert set(s["label_frequency_quantiles"]) == {"min", "q25", "median", "q75", "q90", "q99", "max"}


def test_info_human_table() -> None:
    code, out, _ = _run("data", "info", str(FIX / "tiny.arff"))
    assert code == 0
    assert "points (N)" in out and "empty labels (no rows)" in out and "99%" in out


def test_info_error_is_one_line_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.txt"
    p.write_text("2 3 4\n0 1:1\n")
    code, _, err = _run("data", "info", str(p), "--fmt", "xc")
    assert code == 2
    assert err.strip() == f"error: {p}:3: file ends after 1 rows but the header declares 2 (truncated file?)"


@pytest.mark.parametrize("to,name", [("xc", "o.txt"), ("xc-split", "o"), ("npz", "o.npz"), ("svmlight", "o.svm")])
def test_convert_round_trip(tmp_path: Path, to: str, name: str) -> None:
    out = tmp_path / name
    code, msg, _ = _run("data", "convert", str(FIX / "tiny.txt"), str(out), "--to", to)
    assert code == 0 and "5 points" in msg
    kw = {"zero_based": True, "num_labels": 4} if to == "svmlight" else {}
    a, b = load(FIX / "tiny.txt"), load(out, **kw)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.Y.toarray(), b.Y.toarray())


def test_convert_from_arff_infers_output(tmp_path: Path) -> None:
    code, _, _ = _run("data", "convert", str(FIX / "meka.arff"), str(tmp_path / "m_X_Xf.txt"))
    assert code == 0
    assert load(tmp_path / "m").Y.shape == (3, 2)


def test_info_bibtex(bibtex_train: Path) -> None:
    code, out, _ = _run("data", "info", str(bibtex_train), "--json")
    assert code == 0
    s = json.loads(out)
    assert (s["num_points"], s["num_features"], s["num_labels"]) == (4880, 1836, 159)
    code, out, _ = _run("data", "info", str(bibtex_train))
    assert code == 0 and "4,880" in out and "1,836" in out and "159" in out
