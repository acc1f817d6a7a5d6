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


def test_convergence_quick(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    _load("bench_convergence").main([*QUICK, "--out", str(out)])
    data = _check_payload(out)
    assert data["curves"]
    for curve in data["curves"]:
        assert curve["points"], curve["method"]
        assert all(0 <= p["P@1"] <= 1 for p in curve["points"])
    assert (tmp_path / "conv.png").exists()


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
