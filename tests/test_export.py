"""Tests of xmc_toolkit.export: round trips in both formats, names sidecar, bias folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmc_toolkit.errors import DataFormatError, XMCError
from xmc_toolkit.export import (
    EXPORT_FORMAT,
    augment_queries,
    export_embeddings,
    fold_bias,
    load_embeddings,
    names_path,
)
from xmc_toolkit.output_layer import chunked_topk


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_round_trip(tmp_path, suffix):
    E = torch.randn(13, 5, dtype=torch.float64)[:, ::1]
    p = export_embeddings(E, tmp_path / f"labels{suffix}", names=[f"l{i}" for i in range(13)],
                          metadata={"model": "run1"})
    out = load_embeddings(p)
    assert out.embeddings.dtype == np.float32 and out.embeddings.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out.embeddings, E.float().numpy())
    assert out.names == [f"l{i}" for i in range(13)]
    assert names_path(p).name == "labels.names.json"
    if suffix == ".safetensors":
        md = out.metadata
        assert md["format"] == EXPORT_FORMAT and md["count"] == "13" and md["dim"] == "5"
        assert md["normalized"] == "false" and md["model"] == "run1"
        from safetensors.numpy import load_file  # readable by plain safetensors

        assert load_file(str(p))["embeddings"].shape == (13, 5)
    else:
        assert np.load(p).shape == (13, 5)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp leftovers


def test_normalize_and_noncontiguous_input(tmp_path):
    E = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32).T.copy().T  # F-order
    E[2] = 0
    p = export_embeddings(E, tmp_path / "x.npy", normalize=True)
    out = load_embeddings(p).embeddings
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4, 5]], 1.0, rtol=1e-6)
    assert norms[2] == 0 and load_embeddings(p).names is None
    np.testing.assert_allclose(out[0], E[0] / np.linalg.norm(E[0]), rtol=1e-6)


def test_errors(tmp_path):
    with pytest.raises(XMCError, match="suffix"):
        export_embeddings(np.zeros((2, 2)), tmp_path / "x.txt")
    with pytest.raises(XMCError, match="2-D"):
        export_embeddings(np.zeros(3), tmp_path / "x.npy")
    with pytest.raises(XMCError, match="NaN"):
        export_embeddings(np.array([[np.nan, 1.0]]), tmp_path / "x.npy")
    with pytest.raises(XMCError, match="names"):
        export_embeddings(np.zeros((2, 2)), tmp_path / "x.npy", names=["a"])
    with pytest.raises(DataFormatError, match="does not exist"):
        load_embeddings(tmp_path / "missing.npy")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DataFormatError, match="cannot read"):
        load_embeddings(bad)


def test_fold_bias_inner_product_equals_model_scores():
    g = torch.Generator().manual_seed(0)
    W, b, q = torch.randn(40, 6, generator=g), torch.randn(40, generator=g), torch.randn(3, 6, generator=g)
    Wb, qa = fold_bias(W, b), augment_queries(q)
    assert Wb.shape == (40, 7) and qa.shape == (3, 7)
    np.testing.assert_allclose(qa @ Wb.T, (q @ W.T + b).numpy(), rtol=1e-5, atol=1e-5)
    # brute-force inner-product search on the exported vectors == the model's top-k
    _, ids = chunked_topk(q, W, b, 5)
    np.testing.assert_array_equal(np.argsort(-(qa @ Wb.T), axis=1, kind="stable")[:, :5], ids.numpy())
    assert (fold_bias(W, None)[:, -1] == 0).all()
    with pytest.raises(XMCError, match="bias"):
        fold_bias(W, b[:3])
