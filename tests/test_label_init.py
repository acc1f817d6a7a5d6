"""PIFA label rows: against a per-label loop, and wired into the trainer (--label-init pifa)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc_toolkit.errors import ConfigError
from xmc_toolkit.label_init import pifa_label_rows
from xmc_toolkit.train import TrainConfig, Trainer


def test_pifa_rows_match_a_loop_over_labels() -> None:
    rng = np.random.default_rng(0)
    N, L, d = 40, 9, 5
    Y = sp.random(N, L, density=0.2, random_state=1, format="csr")
    Y.data[:] = 1.0
    Y = sp.csr_matrix(Y.toarray() * (np.arange(L) != 4))  # label 4 has no rows
    Q = torch.from_numpy(rng.normal(size=(N, d)).astype(np.float32))
    rows, has = pifa_label_rows(Q, Y, scale=2.5)
    dense = Y.toarray()
    for lab in range(L):
        members = np.flatnonzero(dense[:, lab])
        if len(members) == 0:
            assert not has[lab] and torch.all(rows[lab] == 0)
            continue
        mean = Q[members].double().mean(0)
        ref = 2.5 * mean / mean.norm()
        assert has[lab]
        torch.testing.assert_close(rows[lab].double(), ref, rtol=1e-5, atol=1e-6)
    # default scale: 4 / median query norm
    rows_default, _ = pifa_label_rows(Q, Y)
    med = float(Q.norm(dim=1).median())
    torch.testing.assert_close(rows_default[0].norm(), torch.tensor(4.0 / med), rtol=1e-5,
                               atol=1e-6)


def test_pifa_rows_refuse_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="rows"):
        pifa_label_rows(torch.zeros(3, 2), sp.csr_matrix((4, 5)))


def test_trainer_label_init_pifa_sets_rows_before_training(tiny_xy) -> None:
    from xmc_toolkit.data import XMCDataset

    X, Y = tiny_xy
    cfg = TrainConfig(dim=8, hidden=(16,), epochs=1, batch_size=16, max_steps=1, ensemble=1,
                      label_init="pifa", dropout=0.0, input_dropout=0.0, lr=1e-9,
                      warmup_steps=0, label_bias=False)
    tr = Trainer(cfg)
    tr.fit(XMCDataset(X, Y))
    W = tr.network.labels.weight.weight.detach()  # after one step at lr 1e-9: the init
    from xmc_toolkit.encoder import encode_csr

    Q = encode_csr(tr.network.encoder, tr.preprocessor.transform(X))
    ref, has = pifa_label_rows(Q, Y)
    torch.testing.assert_close(W[has], ref[has], rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match="label_init"):
        TrainConfig(label_init="nope").validate()
