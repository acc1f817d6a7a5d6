"""Tests of ``xmc eval`` and of the shared metrics renderers in cli/_format.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner, Result
from rich.console import Console

from cli._format import metrics_json, metrics_lines, metrics_table, rows_summary
from cli.main import xmc
from xmc_toolkit.data.predictions import write_predictions
from xmc_toolkit.metrics import evaluate, inverse_propensity, metric_keys

# XC text format: header "N D L", then "l1,l2 f:v ..."; a point without labels starts with a space.
LABELS = "4 3 4\n0,2 0:1\n 1:1\n1 2:1\n3 0:1\n"
TRAIN = "5 3 4\n0 0:1\n0,1 1:1\n1 2:1\n2,3 0:1\n0 1:1\n"
Y_TEST = sp.csr_matrix(
    np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
)
Y_TRAIN = sp.csr_matrix(
    np.array(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32
    )
)
IDS = np.array([[0, 1, 2], [3, -1, -1], [2, 1, -1], [3, 0, -1]])
SCORES = np.array([[3, 2, 1], [1, 0, 0], [5, 4, 0], [2, 1, 0]], dtype=np.float32)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "test.txt").write_text(LABELS)
    (tmp_path / "train.txt").write_text(TRAIN)
    write_predictions(tmp_path / "pred.txt", IDS, SCORES)
    write_predictions(tmp_path / "pred.jsonl", IDS, SCORES)
    return {
        "labels": tmp_path / "test.txt",
        "train": tmp_path / "train.txt",
        "pred": tmp_path / "pred.txt",
        "jsonl": tmp_path / "pred.jsonl",
        "dir": tmp_path,
    }


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(xmc, [str(a) for a in args])


def last_json(output: str) -> dict:
    """The JSON object printed by --json (the last line; log lines may precede it)."""
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# --predictions mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred_key", ["pred", "jsonl"])
def test_json_matches_library_with_train_propensities(files, pred_key: str) -> None:
    r = run("eval", "--predictions", files[pred_key], "--labels", files["labels"],
            "--train-labels", files["train"], "--k", "3", "--json")
    assert r.exit_code == 0, r.output
    got = last_json(r.output)
    expected = evaluate(Y_TEST, IDS, ks=(3,), inv_prop=inverse_propensity(Y_TRAIN))
    assert list(got) == metric_keys(3) + ["num_rows_evaluated", "num_rows_without_labels"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    assert got["num_rows_evaluated"] == 3 and got["num_rows_without_labels"] == 1
    # hand check: P@1 = (1 + 0 + 1) / 3 over the 3 labelled rows
    assert got["P@1"] == pytest.approx(2 / 3)


def test_propensity_parameters_and_fallback(files) -> None:
    r = run("eval", "--predictions", files["pred"], "--labels", files["labels"],
            "-A", "0.6", "-B", "2.6", "--k", "2", "--json")
    assert r.exit_code == 0, r.output
    got = last_json(r.output)
    expected = evaluate(Y_TEST, IDS, ks=(2,), inv_prop=inverse_propensity(Y_TEST, 0.6, 2.6))
    assert got["PSP@2"] == pytest.approx(expected["PSP@2"])
    assert got["PSnDCG@1"] == pytest.approx(expected["PSnDCG@1"])
    assert "propensities computed from the evaluated labels" in " ".join(r.output.split())


def test_human_table_one_line_per_k_in_percent(files) -> None:
    r = run("eval", "--predictions", files["pred"], "--labels", files["labels"],
            "--train-labels", files["train"], "--k", "3")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("k "))
    assert lines[header].split() == ["k", "P@k", "nDCG@k", "PSP@k", "PSnDCG@k", "R@k"]
    rows = [line.split() for line in lines[header + 1: header + 4]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert rows[0][1] == "66.67"  # P@1 in percent
    assert rows[2][5] == "100.00"  # R@3
    assert lines[header + 4] == "rows evaluated: 3 (1 without labels, skipped)"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--k", "4"], "at most 3 predicted labels per point but --k is 4"),
        (["--device", "cpu"], "--device apply only with --model"),
        (["--data", "x"], "--data apply only with --model"),
    ],
)
def test_predictions_mode_errors(files, extra: list[str], match: str) -> None:
    r = run("eval", "--predictions", files["pred"], "--labels", files["labels"], *extra)
    assert r.exit_code == 2
    assert match in r.output


def test_row_count_mismatch(files) -> None:
    short = files["dir"] / "short.txt"
    write_predictions(short, IDS[:3], None)
    r = run("eval", "--predictions", short, "--labels", files["labels"], "--k", "2")
    assert r.exit_code == 2
    assert "has 3 prediction lines but" in r.output and "has 4 points" in r.output
    assert r.output.count("\n") <= 2  # one-line error, no traceback


def test_label_out_of_range_and_bad_file(files) -> None:
    wide = files["dir"] / "wide.txt"
    write_predictions(wide, np.array([[9], [0], [1], [2]]), None)
    r = run("eval", "--predictions", wide, "--labels", files["labels"], "--k", "1")
    assert r.exit_code == 2 and "out of range for 4 labels" in r.output
    bad = files["dir"] / "bad.txt"
    bad.write_text("1 2\nx\n")
    r = run("eval", "--predictions", bad, "--labels", files["labels"], "--k", "1")
    assert r.exit_code == 2 and "bad.txt:2:" in r.output


def test_train_labels_with_other_label_count(files) -> None:
    other = files["dir"] / "other.txt"
    other.write_text("3 3 6\n5 0:1\n0 1:1\n1 2:1\n")
    r = run("eval", "--predictions", files["pred"], "--labels", files["labels"],
            "--train-labels", other, "--k", "1")
    assert r.exit_code == 2 and "has 6 labels but" in r.output


def test_unsorted_file_needs_sort_flag(files) -> None:
    unsorted = files["dir"] / "unsorted.txt"
    unsorted.write_text("1:0.1 0:0.9\n3:1\n1:1\n3:1\n")
    r = run("eval", "--predictions", unsorted, "--labels", files["labels"], "--k", "1")
    assert r.exit_code == 2 and "not sorted best first" in r.output
    r = run("eval", "--predictions", unsorted, "--labels", files["labels"], "--k", "1",
            "--sort-by-score", "--train-labels", files["train"], "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r.output)["P@1"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "exactly one of --predictions"),
        (["--model", "."], "--model needs --data"),
    ],
)
def test_mode_usage_errors(args: list[str], match: str) -> None:
    r = run("eval", *args)
    assert r.exit_code == 2 and match in r.output


def test_predictions_without_labels(files) -> None:
    r = run("eval", "--predictions", files["pred"])
    assert r.exit_code == 2 and "--predictions needs --labels" in r.output


# --------------------------------------------------------------------------------------------
# --model mode (evaluate_model_dir is replaced by a stub that records its arguments)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_evaluate(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def evaluate_model_dir(model_dir, data_path, *, ks, device, chunk_size=None,
                           ignore_extra=False, show_progress=False, verify=True,
                           zero_based="auto"):
        calls.append(dict(model_dir=model_dir, data_path=data_path, ks=ks, device=device,
                          chunk_size=chunk_size, ignore_extra=ignore_extra,
                          show_progress=show_progress, verify=verify, zero_based=zero_based))
        out = {key: 0.5 for key in metric_keys(max(ks))}
        out.update(num_rows_evaluated=10, num_rows_without_labels=0)
        return out

    module = types.ModuleType("xmc_toolkit.evaluate")
    module.evaluate_model_dir = evaluate_model_dir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xmc_toolkit.evaluate", module)
    return calls


def test_model_mode_passes_options(files, fake_evaluate: list) -> None:
    model = files["dir"] / "model"
    model.mkdir()
    r = run("eval", "--model", model, "--data", files["labels"], "--k", "2", "--json",
            "--device", "cpu", "--chunk-size", "128", "--ignore-extra")
    assert r.exit_code == 0, r.output
    assert fake_evaluate == [dict(model_dir=model, data_path=files["labels"], ks=(1, 2),
                                  device="cpu", chunk_size=128, ignore_extra=True,
                                  show_progress=False, verify=True, zero_based="auto")]
    got = json.loads(r.output)
    assert got["P@2"] == 0.5 and got["num_rows_evaluated"] == 10
    r = run("eval", "--model", model, "--data", files["labels"], "--k", "2")
    assert r.exit_code == 0, r.output
    assert fake_evaluate[-1]["device"] == "auto"
    assert "50.00" in r.output


def test_model_mode_rejects_prediction_options(files, fake_evaluate: list) -> None:
    r = run("eval", "--model", files["dir"], "--data", files["labels"], "-A", "0.5")
    assert r.exit_code == 2 and "-A apply only with --predictions" in r.output
    assert fake_evaluate == []


# --------------------------------------------------------------------------------------------
# renderers
# --------------------------------------------------------------------------------------------


def test_metrics_lines_and_missing_values() -> None:
    metrics = {"P@1": 0.6453, "nDCG@1": 0.6453, "R@1": 0.25, "P@3": 0.3856}
    text = metrics_lines(metrics, [3, 1])
    lines = text.splitlines()
    assert lines[0].split() == ["k", "P@k", "nDCG@k", "PSP@k", "PSnDCG@k", "R@k"]
    assert lines[1].split() == ["1", "64.53", "64.53", "-", "-", "25.00"]
    assert lines[2].split() == ["3", "38.56", "-", "-", "-", "-"]
    assert len(lines) == 3  # no row counts in the dict -> no summary line
    assert rows_summary({"num_rows_evaluated": 7}) == "rows evaluated: 7"


def test_metrics_table_renders() -> None:
    metrics = {key: 0.125 for key in metric_keys(2)}
    metrics.update(num_rows_evaluated=8, num_rows_without_labels=2)
    table = metrics_table(metrics, range(1, 3), title="Bibtex")
    assert table.row_count == 2
    assert [c.header for c in table.columns] == ["k", "P@k", "nDCG@k", "PSP@k", "PSnDCG@k", "R@k"]
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert "12.50" in text and "rows evaluated: 8 (2 without labels, skipped)" in text


def test_metrics_json_is_one_line_with_fractions() -> None:
    metrics = {"P@1": np.float64(0.5), "R@1": float("nan"), "num_rows_evaluated": np.int64(3),
               "num_rows_without_labels": 2.0}
    text = metrics_json(metrics)
    assert "\n" not in text
    assert json.loads(text) == {"P@1": 0.5, "R@1": None, "num_rows_evaluated": 3,
                                "num_rows_without_labels": 2}
    assert '"num_rows_without_labels": 2}' in text


# --------------------------------------------------------------------------------------------
# real data (skips without ../shared/data)
# --------------------------------------------------------------------------------------------


def test_bibtex_popularity_predictions_end_to_end(bibtex_train, bibtex_test, tmp_path) -> None:
    formats = pytest.importorskip("xmc_toolkit.data.formats")
    train, test = formats.load(bibtex_train), formats.load(bibtex_test)
    counts = np.asarray(train.Y.sum(axis=0)).ravel()
    popular = np.argsort(-counts, kind="stable")[:5]
    ids = np.tile(popular, (test.Y.shape[0], 1))
    scores = np.tile(counts[popular].astype(np.float32), (test.Y.shape[0], 1))
    pred = tmp_path / "bibtex_pred.txt"
    write_predictions(pred, ids, scores)
    r = run("eval", "--predictions", pred, "--labels", bibtex_test,
            "--train-labels", bibtex_train, "--json")
    assert r.exit_code == 0, r.output
    got = last_json(r.output)
    expected = evaluate(test.Y, ids, ks=(5,), inv_prop=inverse_propensity(train.Y))
    assert got == pytest.approx(expected)
