"""`xmc train` -> `xmc eval` -> `xmc predict` -> `xmc export` on tiny files, and CLI errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from conftest import make_tiny_problem  # tests/ is on sys.path (rootdir conftest)

from cli.main import xmc
from xmc_toolkit.data import XMCDataset, load, save

FLAGS = ["--epochs", "8", "--batch-size", "16", "--hidden", "32", "--dim", "16", "--lr", "0.02",
         "--warmup-steps", "5", "--dropout", "0", "--ks", "1,3", "--device", "cpu",
         "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    X, Y = make_tiny_problem(120)
    root = tmp_path_factory.mktemp("cli")
    save(XMCDataset(X[:90], Y[:90]), root / "train.txt")
    save(XMCDataset(X[90:], Y[90:]), root / "test.txt")
    # a test file in another feature/label space (one extra feature and label column)
    X2 = sp.hstack([X[90:], sp.csr_matrix(np.ones((30, 1), np.float32))]).tocsr()
    Y2 = sp.hstack([Y[90:], sp.csr_matrix(np.ones((30, 1), np.float32))]).tocsr()
    save(XMCDataset(X2, Y2), root / "test_wide.txt")
    return root


@pytest.fixture(scope="module")
def trained(files):
    out = files / "run"
    r = CliRunner().invoke(xmc, ["train", "--data", str(files / "train.txt"), "--val",
                                 str(files / "test.txt"), "--out", str(out), *FLAGS])
    assert r.exit_code == 0, r.output
    assert "model written to" in r.output and "P@k" in r.output
    return out


def test_train_eval_predict_export(files, trained, tmp_path):
    runner = CliRunner()
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "val/P@1" in json.loads(lines[-1])
    r = runner.invoke(xmc, ["eval", "--model", str(trained), "--data", str(files / "test.txt"),
                            "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output)
    assert metrics["P@1"] > 0.5
    pred = tmp_path / "pred.jsonl"
    r = runner.invoke(xmc, ["predict", "--model", str(trained), "--data",
                            str(files / "test.txt"), "--topk", "3", "--out", str(pred)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(rows) == 30 and len(rows[0]["ids"]) == 3 and len(rows[0]["scores"]) == 3
    r = runner.invoke(xmc, ["predict", "--model", str(trained), "--data",
                            str(files / "test.txt"), "--topk", "2", "--out",
                            str(tmp_path / "p.txt"), "--approx"])
    assert r.exit_code == 0, r.output
    assert "recall vs exact" in r.output
    for what, extra, name in (("labels", [], "l.safetensors"),
                              ("instances", ["--data", str(files / "test.txt")], "q.npy")):
        out = tmp_path / name
        r = runner.invoke(xmc, ["export", "--model", str(trained), "--what", what, *extra,
                                "--out", str(out), "--normalize"])
        assert r.exit_code == 0, r.output
        from xmc_toolkit.export import load_embeddings

        emb = load_embeddings(out).embeddings
        assert emb.shape == ((6, 48) if what == "labels" else (30, 48))  # auto: 3 members x 16
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_print_config_and_config_file_merging(files, tmp_path):
    runner = CliRunner()
    r = runner.invoke(xmc, ["train", "--print-config"])
    assert r.exit_code == 0, r.output
    defaults = json.loads(r.output)
    assert defaults["loss"] == "auto" and defaults["ks"] == [1, 3, 5]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"negatives": 7, "epochs": 3}))
    r = runner.invoke(xmc, ["train", "--config", str(cfg), "--epochs", "5", "--print-config"])
    merged = json.loads(r.output)
    assert merged["negatives"] == 7 and merged["epochs"] == 5  # defaults -> file -> flags


def test_resume_from_cli(files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    args = ["train", "--data", str(files / "train.txt"), "--out", str(out), *FLAGS]
    r = runner.invoke(xmc, [*args, "--max-steps", "7"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(xmc, ["train", "--resume", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["steps"] == 8 * 6


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "{files}", "--data", "{files}/test.txt"], "not a model directory"),
    (["predict", "--model", "{files}/nope", "--data", "{files}/test.txt", "--out", "{files}/p"],
     "not a model directory"),
    (["eval", "--model", "{run}", "--data", "{files}/test_wide.txt"], "--ignore-extra"),
    (["train", "--data", "{files}/train.txt", "--out", "{files}/x", "--sampler", "midz"],
     "sampler='midz' is unknown"),
    (["train", "--data", "{files}/train.txt", "--out", "{files}/x", "--loss", "sampled",
      "--negatives", "6"], "negatives=6 must be smaller than the number of labels (6)"),
    (["train", "--resume", "{files}"], "not a training run directory"),
])
def test_cli_errors_are_one_line_exit_2(files, trained, args, message):
    argv = [a.format(files=files, run=trained) for a in args]
    r = CliRunner().invoke(xmc, argv)
    assert r.exit_code == 2, r.output
    assert message in r.output
    err_lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(err_lines) == 1 and "Traceback" not in r.output


def test_nan_loss_is_a_cli_error(files, tmp_path):
    ds = load(files / "train.txt")
    X = ds.X.copy()
    X.data[:] = 3e38
    save(XMCDataset(X, ds.Y), tmp_path / "bad.txt")
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "bad.txt"), "--out",
                                 str(tmp_path / "o"), *FLAGS, "--tfidf", "off",
                                 "--no-l2-normalize"])
    assert r.exit_code == 2, r.output
    assert re.search(r"error: loss became (nan|inf) at step \d+ \(epoch 1\)", r.output)


def test_ignore_extra_drops_columns(files, trained):
    r = CliRunner().invoke(xmc, ["eval", "--model", str(trained), "--data",
                                 str(files / "test_wide.txt"), "--ignore-extra", "--json"])
    assert r.exit_code == 0, r.output
    assert "dropped 30 stored" in r.output  # the count of dropped feature values is logged
    assert 0 <= json.loads(r.output[r.output.index("{"):])["P@1"] <= 1


def test_python_module_entry_point_has_same_flags(monkeypatch, capsys):
    """`python -m xmc_toolkit.train FLAGS` is `xmc train FLAGS` (its __main__ guard is the one
    place the library reaches cli)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["xmc_toolkit.train", "--print-config", "--epochs", "3"])
    monkeypatch.delitem(sys.modules, "xmc_toolkit.train", raising=False)  # as a fresh script
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("xmc_toolkit.train", run_name="__main__")
    assert exc.value.code == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 3


def test_cli_reference_lists_every_train_flag():
    """docs/cli.md documents every TrainConfig field as a flag (guards against drift)."""
    import dataclasses
    from pathlib import Path

    from xmc_toolkit.train import TrainConfig

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f"`--{f.name.replace('_', '-')}" not in doc]
    assert not missing, f"docs/cli.md lacks {missing}"
