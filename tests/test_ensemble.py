"""Ensembles (``--ensemble n``): one ``[L, n*d]`` table whose dot product is the members' mean
score, trained with each member's own loss -- checked against per-member references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_problem

from xmc_toolkit import XMCModel
from xmc_toolkit.encoder import EnsembleEncoder, SparseEncoder
from xmc_toolkit.errors import ConfigError
from xmc_toolkit.losses import full_softmax_loss_from_scores, sampled_softmax_loss
from xmc_toolkit.sampling import make_sampler
from xmc_toolkit.train import TrainConfig, XMCNetwork, compute_loss, member_score_ids

N_MEM, D, L, F = 3, 4, 7, 11


def _network(**kw) -> XMCNetwork:
    torch.manual_seed(0)
    cfg = TrainConfig(dim=D, hidden=(8,), ensemble=N_MEM, dropout=0.0, input_dropout=0.0, **kw)
    net = XMCNetwork(F, L, cfg)
    with torch.no_grad():  # non-zero bias so the shared-bias bookkeeping is exercised
        net.labels.bias.weight.normal_()
    return net


def _batch(B: int = 5):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, F, (B * 3,), generator=g)
    off = torch.arange(0, B * 3, 3)
    w = torch.rand(B * 3, generator=g) + 0.1
    pos_ids = torch.randint(0, L, (B, 2), generator=g)
    pos_mask = torch.ones(B, 2, dtype=torch.bool)
    pos_mask[0, 1] = False
    pos_ids[:, 1] = torch.where(pos_ids[:, 1] == pos_ids[:, 0], (pos_ids[:, 1] + 1) % L,
                                pos_ids[:, 1])
    return idx, off, w, pos_ids, pos_mask


def _member_queries(net: XMCNetwork, idx, off, w) -> list[torch.Tensor]:
    return [m(idx, off, w) for m in net.encoder.members]  # each [B, d]


def test_encoder_output_is_members_side_by_side_over_n():
    net = _network()
    idx, off, w, *_ = _batch()
    q = net(idx, off, w)  # [B, n*d]
    ref = torch.cat(_member_queries(net, idx, off, w), 1) / N_MEM
    torch.testing.assert_close(q, ref)
    assert q.shape == (5, N_MEM * D) and net.labels.dim == N_MEM * D and net.members == N_MEM
    # one dot product = the mean of the members' scores
    W, b = net.label_weight, net.label_bias
    mean = sum(qi @ W[:, i * D:(i + 1) * D].T for i, qi in
               enumerate(_member_queries(net, idx, off, w))) / N_MEM + b
    torch.testing.assert_close(q @ W.T + b, mean)


def test_encoder_parameter_split_and_errors():
    members = [SparseEncoder(F, dim=D, hidden=(8,), sparse_grad=True) for _ in range(2)]
    enc = EnsembleEncoder(members)
    assert [p.data_ptr() for p in enc.sparse_parameters()] == [m.bag.weight.data_ptr()
                                                               for m in members]
    n_all = sum(1 for _ in enc.parameters())
    assert len(enc.sparse_parameters()) + len(enc.dense_parameters()) == n_all
    with pytest.raises(ConfigError, match="at least 2"):
        EnsembleEncoder(members[:1])
    with pytest.raises(ConfigError, match="disagree"):
        EnsembleEncoder([members[0], SparseEncoder(F, dim=D + 1, hidden=(8,))])
    with pytest.raises(ConfigError, match="ensemble"):
        TrainConfig(ensemble=-1).validate()


@pytest.mark.parametrize("shared", [False, True])
def test_member_score_ids_matches_dense(shared):
    net = _network()
    idx, off, w, *_ = _batch()
    q = net(idx, off, w)
    ids = torch.tensor([0, 3, 6, 2]) if shared else torch.randint(0, L, (5, 4))
    s = member_score_ids(net.labels, q, ids, N_MEM)  # [B, M, n]
    W, b = net.label_weight, net.label_bias
    for i, qi in enumerate(_member_queries(net, idx, off, w)):
        dense = qi @ W[:, i * D:(i + 1) * D].T + b  # [B, L]
        ref = dense[:, ids] if shared else torch.gather(dense, 1, ids)
        torch.testing.assert_close(s[..., i], ref)


def test_full_loss_is_mean_of_member_losses_and_gradients_match():
    net = _network()
    idx, off, w, pos_ids, pos_mask = _batch()
    loss = compute_loss(net, net(idx, off, w), pos_ids, pos_mask, "full", chunk_size=3)
    loss.backward()
    got = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    W, b = net.label_weight, net.label_bias
    ref = torch.stack([
        full_softmax_loss_from_scores(qi @ W[:, i * D:(i + 1) * D].T + b, pos_ids, pos_mask)
        for i, qi in enumerate(_member_queries(net, idx, off, w))]).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for k, p in net.named_parameters():
        torch.testing.assert_close(got[k], p.grad, msg=k)


def test_sampled_loss_is_mean_of_member_losses_with_one_draw():
    net = _network()
    idx, off, w, pos_ids, pos_mask = _batch()
    q = net(idx, off, w)
    sampler = make_sampler("uniform", L)
    loss = compute_loss(net, q, pos_ids, pos_mask, "sampled", sampler=sampler, negatives=4,
                        generator=torch.Generator().manual_seed(5))
    smp = sampler.sample(q.detach(), 4, generator=torch.Generator().manual_seed(5))
    W, b = net.label_weight, net.label_bias
    parts = []
    for i, qi in enumerate(_member_queries(net, idx, off, w)):
        dense = qi @ W[:, i * D:(i + 1) * D].T + b  # [B, L]
        parts.append(sampled_softmax_loss(
            torch.gather(dense, 1, pos_ids), pos_ids, pos_mask, sampler.log_prob(q, pos_ids),
            torch.gather(dense, 1, smp.ids), smp.ids, smp.log_q))
    torch.testing.assert_close(loss, torch.stack(parts).mean())


FAST = dict(epochs=15, batch_size=16, hidden=(32,), dim=8, lr=0.02, warmup_steps=5,
            dropout=0.0, input_dropout=0.0, ks=(1, 3), device="cpu")


def test_ensemble_model_fits_saves_loads_and_scores_as_member_mean(tmp_path):
    X, Y = make_tiny_problem(60)
    model = XMCModel(**FAST, ensemble=2).fit(X, Y)
    q, W, b = model.encode(X), model.label_embeddings(), model.label_bias()
    assert q.shape == (60, 16) and W.shape == (6, 16)
    ids, scores = model.predict_topk(X, k=3)
    dense = q @ W.T + b
    np.testing.assert_array_equal(ids, np.argsort(-dense, 1, kind="stable")[:, :3])
    assert model.evaluate(X, Y)["P@1"] > 0.8
    model.save(tmp_path / "m")
    loaded = XMCModel.load(tmp_path / "m", device="cpu")
    b_ids, b_scores = loaded.predict_topk(X, k=3)
    np.testing.assert_array_equal(ids, b_ids)
    np.testing.assert_array_equal(scores, b_scores)
    ids_a, _ = loaded.predict_topk(X, k=3, approx=True, num_cells=10 ** 6)
    np.testing.assert_array_equal(ids_a, ids)  # the MIDX index over [L, n*d] with every cell


def test_ensemble_midx_training_runs():
    X, Y = make_tiny_problem(60)
    model = XMCModel(**FAST, ensemble=3, loss="sampled", sampler="midx", negatives=3,
                     refresh_every=5).fit(X, Y)
    assert model.evaluate(X, Y)["P@1"] > 0.6


def test_auto_resolves_by_training_rows_and_is_saved(tmp_path):
    cfg = TrainConfig()
    assert cfg.ensemble == 0 and cfg.resolved_ensemble(4880) == 3
    assert cfg.resolved_ensemble(24_879) == 3  # kjv-strongs (docs/training.md)
    assert cfg.resolved_ensemble(100_000) == 3 and cfg.resolved_ensemble(100_001) == 1
    assert TrainConfig(ensemble=2).resolved_ensemble(10 ** 7) == 2  # explicit wins
    assert TrainConfig(ensemble_max_points=0).resolved_ensemble(10) == 1
    X, Y = make_tiny_problem(60)
    model = XMCModel(**{**FAST, "epochs": 2}).fit(X, Y)  # ensemble auto on 60 rows: 3
    assert model.label_embeddings().shape == (6, 24)
    assert model.fitted.config.ensemble == 3 and model.config.ensemble == 0
    model.save(tmp_path / "m")
    loaded = XMCModel.load(tmp_path / "m", device="cpu")
    assert loaded.fitted.config.ensemble == 3
    np.testing.assert_array_equal(loaded.encode(X), model.encode(X))
