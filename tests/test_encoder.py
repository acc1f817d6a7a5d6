"""Tests of xmc_toolkit.encoder: dense reference, config round trip, validation, sparse grads."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc_toolkit.batching import csr_to_bag
from xmc_toolkit.encoder import EncoderConfig, SparseEncoder, encode_csr
from xmc_toolkit.errors import ConfigError


def test_linear_only_equals_dense_matmul(tiny_xy) -> None:
    X, _ = tiny_xy
    torch.manual_seed(0)
    enc = SparseEncoder(X.shape[1], dim=5, linear_only=True)
    with torch.no_grad():
        enc.bag_bias.normal_()
    q = enc(*csr_to_bag(X))  # [N, 5]
    dense = torch.from_numpy(X.toarray()) @ enc.bag.weight + enc.bag_bias  # reference
    torch.testing.assert_close(q, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm", None])
def test_mlp_equals_reference(tiny_xy, norm) -> None:
    X, _ = tiny_xy
    torch.manual_seed(1)
    enc = SparseEncoder(X.shape[1], dim=4, hidden=(8, 6), norm=norm, activation="gelu").eval()
    q = enc(*csr_to_bag(X))
    h = torch.from_numpy(X.toarray()) @ enc.bag.weight + enc.bag_bias  # [N, 8]
    lin = [m for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    norms = [m for m in enc.mlp if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d))]
    assert len(lin) == 2 and len(norms) == (0 if norm is None else 2)
    for i in range(2):
        if i > 0:
            h = lin[0](h)
        if norms:
            h = norms[i](h)
        h = torch.nn.functional.gelu(h)
    h = lin[-1](h)
    torch.testing.assert_close(q, h, rtol=1e-5, atol=1e-5)
    assert q.shape == (X.shape[0], 4)


def test_empty_row_and_no_weights() -> None:
    enc = SparseEncoder(6, dim=3, hidden=(4,))
    X = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32))
    idx, off, w = csr_to_bag(X)
    q1 = enc(idx, off, w)
    q2 = enc(idx, off)  # weights None = all ones, same here
    torch.testing.assert_close(q1, q2)
    assert torch.isfinite(q1).all()


def test_config_round_trip_and_build() -> None:
    cfg = EncoderConfig(dim=16, hidden=(32, 8), dropout=0.1, norm="batchnorm", activation="tanh")
    back = EncoderConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.hidden, tuple)
    enc = SparseEncoder.from_config(10, back)
    assert enc.config == cfg and enc.dim == 16
    assert isinstance(enc.mlp[-1], torch.nn.Linear) and enc.mlp[-1].out_features == 16


def test_config_lists_every_problem() -> None:
    cfg = EncoderConfig(dim=0, hidden=(4, -1), dropout=1.5, norm="group", activation="swish")
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    assert len(ei.value.problems) == 5
    msg = str(ei.value)
    for flag in ("--dim", "--hidden", "--dropout", "--norm", "--activation"):
        assert flag in msg
    with pytest.raises(ConfigError, match="num_features"):
        SparseEncoder(0, dim=4)


def test_sparse_grad_only_touches_used_rows(tiny_xy) -> None:
    X, _ = tiny_xy
    enc = SparseEncoder(X.shape[1], dim=4, hidden=(8,), sparse_grad=True)
    rows = X[:3]
    enc(*csr_to_bag(rows)).sum().backward()
    g = enc.bag.weight.grad
    assert g.is_sparse
    touched = set(np.unique(rows.indices).tolist())
    assert set(g.coalesce().indices()[0].tolist()) == touched
    assert enc.sparse_parameters() == [enc.bag.weight]
    assert all(p is not enc.bag.weight for p in enc.dense_parameters())
    opt = torch.optim.SparseAdam(enc.sparse_parameters(), lr=0.1)
    opt.step()


def test_encode_csr_matches_forward_and_restores_mode(tiny_xy) -> None:
    X, _ = tiny_xy
    enc = SparseEncoder(X.shape[1], dim=4, hidden=(8,), dropout=0.5)
    enc.train()
    out = encode_csr(enc, X, batch_size=7)
    assert enc.training
    enc.eval()
    with torch.no_grad():
        ref = enc(*csr_to_bag(X))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ConfigError, match="feature columns"):
        encode_csr(enc, X[:, :5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_encoder_cuda(tiny_xy) -> None:
    X, _ = tiny_xy
    enc = SparseEncoder(X.shape[1], dim=4, hidden=(8,)).cuda()
    out = encode_csr(enc, X, batch_size=16)
    assert out.is_cuda
    ref = encode_csr(enc.cpu(), X)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
