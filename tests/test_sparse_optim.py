"""RowAdam against torch.optim.SparseAdam (its reference) and dense Adam semantics."""

from __future__ import annotations

import pytest
import torch

from xmc_toolkit.errors import ConfigError
from xmc_toolkit.sparse_optim import RowAdam


def _run(opt_cls, steps: int = 6, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = opt_cls(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (7, 5), generator=g)  # repeated ids on purpose
        target = torch.randn(7, 5, 8, generator=g)
        loss = ((emb(ids) - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return emb.weight.detach().clone(), opt.state_dict()


def test_row_adam_equals_sparse_adam():
    w_ref, _ = _run(torch.optim.SparseAdam)
    w_row, _ = _run(RowAdam)
    torch.testing.assert_close(w_row, w_ref, rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_their_moments_stay_put():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowAdam(emb.parameters(), lr=0.1)
    emb(torch.tensor([2, 2, 7])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (2, 7) for i in range(10)]
    state = opt.state[emb.weight]
    assert state["exp_avg"][[0, 1, 3]].abs().sum() == 0


def test_dense_gradient_is_plain_adam():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = RowAdam([p1], lr=0.01), torch.optim.Adam([p2], lr=0.01)
    for _ in range(3):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (p**3).sum().backward()
            o.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    w_a, _ = _run(RowAdam, steps=6)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = RowAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        if i == 3:  # save and restore into a fresh optimizer mid-run
            sd = opt.state_dict()
            opt = RowAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
            opt.load_state_dict(sd)
        ids = torch.randint(0, 50, (7, 5), generator=g)
        target = torch.randn(7, 5, 8, generator=g)
        opt.zero_grad()
        ((emb(ids) - target) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(emb.weight.detach(), w_a)


def test_bad_hyper_parameters_are_all_reported():
    with pytest.raises(ConfigError) as err:
        RowAdam([torch.nn.Parameter(torch.zeros(1))], lr=-1, betas=(1.5, 0.9), eps=-1)
    assert len(err.value.problems) == 3
