"""Smoke tests: every benchmark script runs end to end with ``--quick`` (tiny sizes).

No timing assertions here -- the scripts measure speed; these tests only keep them from rotting:
each writes its JSON (configuration, machine, results) to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
QUICK = ["--quick", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch):
    """The scripts' ``--threads 1`` sets torch threads and OMP/MKL variables: undo both."""
    import torch

    n = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
        if var not in os.environ:
            monkeypatch.delenv(var)
    yield
    torch.set_num_threads(n)


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_payload(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"config", "machine"} <= set(data)
    for key in ("cpu", "cores", "torch", "date", "device"):
        assert key in data["machine"]
    return data


def test_output_layer_quick(tmp_path: Path) -> None:
    out = tmp_path / "ol.json"
    _load("bench_output_layer").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    methods = {r["method"] for r in data["results"]}
    assert {"full", "uniform", "midx-pq", "midx-rq-shared"} <= methods
    assert all(r["step_s"] > 0 for r in data["results"])
    mem = [r["memory"] for r in data["results"] if "memory" in r]
    assert mem and all("error" not in m for m in mem)
    assert (tmp_path / "ol.png").exists()


def test_sampler_quality_quick(tmp_path: Path) -> None:
    out = tmp_path / "sq.json"
    _load("bench_sampler_quality").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    kl = {r["sampler"]: r["kl_mean"] for r in data["divergence"]}
    assert set(kl) == {"uniform", "popularity", "log-uniform", "midx-pq", "midx-rq"}
    assert all(v >= -1e-5 for v in kl.values())
    assert all(0 < r["ess_mean"] <= 1 + 1e-5 for r in data["divergence"])
    assert all(r["rel_err_of_mean"] >= 0 for r in data["gradient"])


def test_peers_quick(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    _load("bench_peers").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    if "skipped" in data["datasets"].get("emotions", {}):
        pytest.skip("the quick run's data set (emotions, ../shared/data) is absent")
    methods = {rec["method"] for rec in data["results"]}
    assert {"xmc-default", "xmc-midx"} <= methods
    for rec in data["results"]:  # a peer may be missing (recorded error), xmc must work
        if rec["method"].startswith("xmc"):
            assert "error" not in rec, rec
            assert 0 <= rec["metrics"]["P@1"] <= 1
            assert 0 <= rec["metrics"]["nDCG@5"] <= 1
            assert rec["train_s"] > 0 and rec["model_bytes"] > 0
            assert rec["peak_rss_mib"] > 0
            assert len(rec["load_average"]) == 2
    md = _load("bench_peers").markdown_table(data)  # the docs table: a header, a rule, the rows
    assert md.count("\n") == len(data["results"]) + 1 and "| emotions | xmc-default |" in md
    # --resume keeps every finished row and runs nothing again
    again = _load("bench_peers").main([*QUICK, "--out", str(out), "--resume"])
    kept = {(r["dataset"], r["method"]): r for r in data["results"] if "error" not in r}
    for rec in again["results"]:
        if (rec["dataset"], rec["method"]) in kept:
            assert rec.get("resumed") and rec["metrics"] == kept[rec["dataset"],
                                                                 rec["method"]]["metrics"]
    # a resumed call over a subset of the methods keeps the other finished rows in the file
    _load("bench_peers").main([*QUICK, "--out", str(out), "--resume", "--methods", "xmc-default"])
    stored = json.loads(out.read_text())
    assert {(r["dataset"], r["method"]) for r in stored["results"]} >= set(kept)
    with pytest.raises(SystemExit, match="other settings"):
        _load("bench_peers").main([*QUICK, "--out", str(out), "--resume",
                                   "--peer-features", "raw"])


def test_convergence_quick(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    _load("bench_convergence").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    assert data["curves"]
    for curve in data["curves"]:
        assert curve["points"], curve["method"]
        assert all(p["nll"] > 0 and p["perplexity"] > 1 for p in curve["points"])
        assert all(0 <= p["P@1"] <= 1 for p in curve["points"])
    assert (tmp_path / "conv.png").exists()


def test_convergence_test_nll_matches_dense_softmax() -> None:
    """``test_nll`` (the perplexity of the sampler study) against a dense log_softmax."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    from xmc_toolkit.batching import csr_to_bag
    from xmc_toolkit.train import TrainConfig, XMCNetwork

    torch.manual_seed(0)
    net = XMCNetwork(30, 50, TrainConfig(dim=8, hidden=(16,), ensemble=1))
    rng = np.random.default_rng(0)
    X = sp.random(7, 30, density=0.3, format="csr", random_state=1, dtype=np.float32)
    Y = sp.csr_matrix((np.ones(9, np.float32), (rng.integers(0, 7, 9), rng.integers(0, 50, 9))),
                      shape=(7, 50))
    Y.sum_duplicates()
    Y.data[:] = 1.0
    got = _load("bench_convergence").test_nll(net, X, Y, batch_size=3)
    net.eval()
    with torch.no_grad():
        ids, offs, w = csr_to_bag(X, torch.device("cpu"))
        logp = torch.log_softmax(net.labels.full_scores(net(ids, offs, w)), dim=1)
    coo = Y.tocoo()
    want = float(-logp[coo.row, coo.col].mean())
    assert got == pytest.approx(want, rel=1e-5)


def test_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    _load("bench_scale").main([*QUICK, "--out", str(out),
                               "--work", str(tmp_path / "work")])
    data = _check_payload(out)
    r = data["results"]
    assert r["epoch_s"] > 0 and 0 <= r["approx_recall@5"] <= 1


def test_tune_split_quick(tmp_path: Path) -> None:
    from conftest import make_tiny_problem

    from xmc_toolkit.data import XMCDataset, save

    X, Y = make_tiny_problem(200)
    data = tmp_path / "tiny_train.txt"
    save(XMCDataset(X, Y), data, fmt="xc")
    out = tmp_path / "ts.json"
    _load("tune_split").main([*QUICK, "--data", str(data), "--out", str(out),
                              "--set", '{"lr": 0.01}'])
    payload = _check_payload(out)
    assert payload["overrides"]["lr"] == 0.01 and payload["config"]["lr"] == 0.01
    assert len(payload["history"]) == 1 and "val/P@1" in payload["history"][0]
    assert 0.0 <= payload["best"]["P@1"] <= 1.0


def test_rerank_study_on_a_tune_split_model(tmp_path: Path) -> None:
    from conftest import make_tiny_problem

    from xmc_toolkit.data import XMCDataset, save

    X, Y = make_tiny_problem(300)
    data = tmp_path / "tiny_train.txt"
    save(XMCDataset(X, Y), data, fmt="xc")
    model = tmp_path / "m85"
    _load("tune_split").main([*QUICK, "--data", str(data), "--out", str(tmp_path / "ts.json"),
                              "--model-out", str(model)])
    assert (model / "model.safetensors").exists()
    out = tmp_path / "rr.json"
    _load("rerank_study").main(["--data", str(data), "--model", str(model), "--top", "10",
                                "--threads", "1", "--out", str(out)])
    r = _check_payload(out)["results"]
    # every setting is a P@k in percent; tau 0 and beta 0 are not in the grids, the model is
    assert {"model", "logit_adjustment", "knn", "centroid", "centroid_alone"} <= set(r)
    for block in ("logit_adjustment", "knn", "centroid"):
        assert all(0 <= v["P@1"] <= 100 for v in r[block].values())


@pytest.mark.parametrize("name", ["bench_output_layer", "bench_sampler_quality", "bench_peers",
                                  "bench_convergence", "bench_scale", "tune_split"])
def test_help_and_device_flag(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load(name)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--device" in text and "--quick" in text


def test_sparse_step_quick(tmp_path: Path) -> None:
    out = tmp_path / "ss.json"
    _load("bench_sparse_step").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    assert set(data["results"]) == {"SparseAdam (before)", "RowAdam (now)",
                                    "RowAdam + unique lookups"}


def test_grow_labels_quick(tmp_path: Path) -> None:
    out = tmp_path / "grow.json"
    _load("bench_grow_labels").main([*QUICK, "--out", str(out), "--init-variants"])
    data = _check_payload(out)
    methods = [r["method"] for r in data["results"]]
    assert methods[1:] == ["(a) labels add", "(b) add + 1 epoch(s)", "(c) from scratch"]
    assert all(0 <= r["all/P@1"] <= 1 for r in data["results"])
    assert len(data["init_variants"]) == 9


def test_grow_labels_quick_on_a_validation_split(tmp_path: Path) -> None:
    """--val-split evaluates on a slice of TRAIN; the longest fine-tune records every epoch."""
    out = tmp_path / "grow_val.json"
    _load("bench_grow_labels").main([*QUICK, "--out", str(out), "--val-split", "0.2",
                                     "--no-scratch"])
    data = _check_payload(out)
    assert data["config"]["evaluated_on"].startswith("validation: 0.2 of TRAIN")
    assert data["config"]["test_rows"] == 80  # 20 % of the 400 synthetic training rows
    ft = [r for r in data["results"] if r["method"].startswith("(b)")]
    assert len(ft) == 1 and [p["epoch"] for p in ft[0]["per_epoch"]] == [1]
    assert ft[0]["per_epoch"][0]["all/P@1"] == ft[0]["all/P@1"]


def test_refresh_quick(tmp_path: Path) -> None:
    out = tmp_path / "refresh.json"
    _load("bench_refresh").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    assert all(r["refresh_kind"] == "incremental" for r in data["rounds"])
    assert [p["refresh_kind"] for p in data["curve"]] == ["incremental"] * 3
    assert data["summary"]["amortised_step_s"] > data["summary"]["midx_shared_step_s"]


def test_ann_quick(tmp_path: Path) -> None:
    out = tmp_path / "ann.json"
    _load("bench_ann").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    backends = {r["backend"] for r in data["results"]}
    assert {"midx", "midx-adaptive"} <= backends  # the libraries are optional
    assert all(0.0 <= r["recall"] <= 1.0 for r in data["results"])


def test_step_profile_quick(tmp_path: Path) -> None:
    out = tmp_path / "sp.json"
    _load("bench_step_profile").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    parts = {"sample", "gather+score", "loss", "backward", "optimizer", "step"}
    assert parts <= set(data["results"])
    assert all(data["results"][p]["bound_s"] > 0 for p in parts)


def test_error_bands_compare_hand_case() -> None:
    import numpy as np
    import scipy.sparse as sp

    eb = _load("error_bands")
    # 2 rows, 4 labels: row 0 has {0, 1}, row 1 has {2}; lists of 10 padded with -1
    Y = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    pad = [-1] * 8
    model = np.array([[0, 3] + pad, [2, 0] + pad])  # hits: row0 rank1, row1 rank1
    peer = np.array([[1, 0] + pad, [3, 2] + pad])  # hits: row0 ranks 1-2, row1 rank2
    freq = np.array([1, 40, 3, 2000])
    r = eb.compare(model, peer, Y, freq, names=["a", "b", "c", "d"])
    assert r["hit_rate_by_rank"]["model"][:3] == [100.0, 0.0, 0.0]
    assert r["hit_rate_by_rank"]["peer"][:3] == [50.0, 100.0, 0.0]
    assert r["top5_hits_total"] == {"model": 2, "peer": 3}
    band = r["top5_correct_by_train_frequency"]
    assert band["[1,2)"] == {"model_predicted": 2, "model_correct": 1,
                             "peer_predicted": 1, "peer_correct": 1}
    assert band["[30,1000)"]["peer_correct"] == 1 and band["[30,1000)"]["model_correct"] == 0
    assert band["[1000,1000000000000)"]["model_predicted"] == 1
    # label 1 ("b") is the only one the peer hits more often; it is in the model's top 10? no
    assert [x["name"] for x in r["labels_peer_ahead"]] == ["b"]
    assert r["peer_top5_hits_not_in_model_top10"] == 1
    assert r["P@5_by_row_size"]["1-2"]["model"] == 20.0  # 2 hits / (2 rows x 5)
