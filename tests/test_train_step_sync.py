"""A training step that never waits on the device, and the config refusals of dense work.

On CUDA, ``test_cuda_sampled_step_has_no_host_sync`` runs the default sampled step (MIDX,
per-query and shared negatives) under ``torch.cuda.set_sync_debug_mode("error")``. On the CPU
there is no device to wait for, so ``test_step_reads_no_tensor_value_on_the_host`` checks the
proxy that can be checked: during a step (with ``log_every`` above the number of steps) no code of
``xmc_toolkit`` reads a tensor value on the host (``.item()``, ``float()``, ``int()``,
``bool()``, ``.tolist()``, ``.numpy()``) -- each of those is a device synchronisation on CUDA.

Known, documented exemptions: the optimizer step (:class:`xmc_toolkit.sparse_optim.RowAdam`)
reads its own step counter, a CPU tensor on every device (no sync). On CUDA it applies the
sparse label gradient without coalescing it (static sizes only, so the CUDA check covers the
optimizer step too); on the CPU it coalesces. ``--clip-grad`` reads the global gradient norm
(one sync per step; off by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc_toolkit.data.dataset import XMCDataset
from xmc_toolkit.errors import ConfigError, DataFormatError
from xmc_toolkit.train import EXACT_WITHIN_CELL_MAX_LABELS, TrainConfig, Trainer

PKG = str(Path(__file__).resolve().parents[1] / "xmc_toolkit")
# files allowed to read a tensor value during a step, with the reason
EXEMPT = {"sparse_optim.py": "RowAdam's step counter is a CPU tensor on every device"}


def _dataset(num_labels: int = 1024, n: int = 96, seed: int = 0) -> XMCDataset:
    rng = np.random.default_rng(seed)
    X = sp.random(n, 80, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    rows = np.repeat(np.arange(n), 2)
    cols = rng.integers(0, num_labels, size=2 * n)
    Y = sp.csr_matrix((np.ones(2 * n, np.float32), (rows, cols)), shape=(n, num_labels))
    Y.sum_duplicates()
    Y.data[:] = 1.0
    return XMCDataset(X, Y)


def _config(**kw) -> TrainConfig:
    base = dict(loss="sampled", sampler="midx", epochs=1, batch_size=16, hidden=(32,), dim=16,
                dropout=0.0, ks=(1,), seed=0, ensemble=1, negatives=32, log_every=1000,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


class _HostReadError(AssertionError):
    pass


def _guarded(monkeypatch) -> dict[str, bool]:
    """Patch the tensor-to-host conversions to raise when called from xmc_toolkit code while
    ``flag["on"]``; returns the flag."""
    flag = {"on": False}

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def guarded(self, *a, **kw):
            if flag["on"]:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PKG) and Path(caller).name not in EXEMPT:
                    raise _HostReadError(f"Tensor.{name} called from {caller} during a step")
            return orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        wrap(name)
    return flag


@pytest.mark.parametrize("shared", [False, True], ids=["per-query", "shared"])
def test_step_reads_no_tensor_value_on_the_host(monkeypatch, shared):
    """The default step (per query), and with shared negatives; MIDX and the losses take the
    paths they take off the CPU (on the CPU the shared mixture may branch on an underflow check,
    the sampled softmax lists the shared hits and looks for rows without a sample: no device)."""
    from xmc_toolkit import losses
    from xmc_toolkit.sampling import midx

    monkeypatch.setattr(midx, "_branch_free", lambda device: True)
    monkeypatch.setattr(losses, "_branch_free", lambda device: True)
    ds = _dataset()
    trainer = Trainer(_config(shared_negatives=shared))
    flag = _guarded(monkeypatch)
    steps = {"n": 0}
    orig_step, orig_track = Trainer._step, Trainer._track_loss

    def step(self, *a, **kw):
        flag["on"] = True
        try:
            out = orig_step(self, *a, **kw)
        finally:
            flag["on"] = False
        steps["n"] += 1
        return out

    def track(self, *a, **kw):
        flag["on"] = True
        try:
            return orig_track(self, *a, **kw)
        finally:
            flag["on"] = False

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(Trainer, "_track_loss", track)
    res = trainer.fit(ds)
    assert steps["n"] == res.steps == 6
    assert np.isfinite(res.history[-1]["loss"])  # read once, at the epoch end


@pytest.mark.parametrize("mutation", ["id-range-check", "midx-cpu-branch", "loss-cpu-branch"])
def test_host_read_guard_can_fail(monkeypatch, mutation):
    """The guard above catches a host read in the step path: the sampler's id range check (as
    before issue 11), the CPU-only underflow branch of the MIDX shared mixture, or the CPU-only
    paths of the sampled softmax."""
    from xmc_toolkit.sampling import Sampler, midx

    if mutation == "loss-cpu-branch":
        monkeypatch.setattr(midx, "_branch_free", lambda device: True)
    if mutation == "id-range-check":
        orig = Sampler.log_prob
        monkeypatch.setattr(Sampler, "log_prob", lambda self, q, ids, shared=False, **kw:
                            orig(self, q, ids, shared, check_ids=True))
    ds = _dataset()
    trainer = Trainer(_config(shared_negatives=mutation == "midx-cpu-branch"))
    flag = _guarded(monkeypatch)
    orig_step = Trainer._step

    def step(self, *a, **kw):
        flag["on"] = True
        try:
            return orig_step(self, *a, **kw)
        finally:
            flag["on"] = False

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(_HostReadError):
        trainer.fit(ds)


def test_logged_loss_is_the_mean_of_the_step_losses():
    """Reading every N steps keeps the epoch loss exact: log_every=1 and 1000 agree."""
    ds = _dataset(n=64)
    a = Trainer(_config(log_every=1)).fit(ds).history[-1]["loss"]
    b = Trainer(_config(log_every=1000)).fit(ds).history[-1]["loss"]
    assert a == pytest.approx(b, rel=1e-12)
    seen: list = []
    Trainer(_config(log_every=2), callbacks=[
        lambda ev, st: seen.append(st["loss"]) if ev == "step" else None]).fit(ds)
    assert [v is None for v in seen] == [True, False, True, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shared", [False, True], ids=["per-query", "shared"])
def test_cuda_sampled_step_has_no_host_sync(monkeypatch, shared):
    """The default sampled step on CUDA, the optimizer step included (RowAdam's sync-free
    sparse path), under set_sync_debug_mode("error")."""
    ds = _dataset()
    trainer = Trainer(_config(device="cuda", shared_negatives=shared, amp="off"))
    orig_step, orig_track = Trainer._step, Trainer._track_loss
    count = {"n": 0}

    def in_error_mode(fn):
        def run(*a, **kw):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return run

    def step(self, *a, **kw):
        count["n"] += 1
        return in_error_mode(orig_step)(self, *a, **kw)

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(Trainer, "_track_loss", in_error_mode(orig_track))
    res = trainer.fit(ds)
    assert count["n"] == res.steps == 6 and np.isfinite(res.history[-1]["loss"])


# ---------------------------------------------------------------------------------------------
# ids are checked on the host, once per batch
# ---------------------------------------------------------------------------------------------
def test_csr_to_padded_checks_ids_on_the_host():
    from xmc_toolkit.batching import csr_to_padded

    Y = sp.csr_matrix(np.eye(3, dtype=np.float32))
    Y.indices[1] = 7  # malformed: column 7 of a 3-column matrix
    with pytest.raises(DataFormatError, match=r"label id 7 is outside \[0, 3\)"):
        csr_to_padded(Y)


def test_log_prob_check_ids_flag():
    from xmc_toolkit.errors import SamplerError
    from xmc_toolkit.sampling import UniformSampler

    s = UniformSampler(5)
    q = torch.zeros(2, 3)
    with pytest.raises(SamplerError, match="out of range"):
        s.log_prob(q, torch.tensor([[0, 5]]).expand(2, 2))
    ok = s.log_prob(q, torch.tensor([[0, 4], [1, 2]]), check_ids=False)
    assert ok.shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# dense O(L d) work behind an option: refused where it would run every step
# ---------------------------------------------------------------------------------------------
def test_ema_refused_with_sampled_losses():
    for loss in ("sampled", "negative-sampling"):
        probs = TrainConfig(loss=loss, ema=0.98).data_problems(100, 10, 1000)
        assert any(p.startswith("ema=0.98 averages every weight") and "--ema 0" in p
                   for p in probs), probs
    assert not [p for p in TrainConfig(loss="full", ema=0.98).data_problems(100, 10, 1000)
                if "ema" in p]
    with pytest.raises(ConfigError, match="--ema 0"):
        Trainer(_config(ema=0.9)).fit(_dataset())


def test_exact_within_cell_refused_for_large_label_sets():
    big = EXACT_WITHIN_CELL_MAX_LABELS + 1
    assert EXACT_WITHIN_CELL_MAX_LABELS == 65536
    probs = TrainConfig(loss="sampled", within_cell="exact").data_problems(100, 10, big)
    assert any("within_cell='exact'" in p and "--within-cell uniform" in p for p in probs), probs
    ok = TrainConfig(loss="sampled", within_cell="exact").data_problems(
        100, 10, EXACT_WITHIN_CELL_MAX_LABELS)
    assert not [p for p in ok if "within_cell" in p]
    # other samplers ignore within_cell
    assert not [p for p in TrainConfig(loss="sampled", sampler="uniform", within_cell="exact")
                .data_problems(100, 10, big) if "within_cell" in p]


def test_log_q_correction_is_wired_and_refused_elsewhere():
    from xmc_toolkit.batching import csr_to_bag, csr_to_padded
    from xmc_toolkit.losses import negative_sampling_loss
    from xmc_toolkit.sampling import make_sampler
    from xmc_toolkit.train import XMCNetwork, compute_loss

    probs = TrainConfig(loss="sampled", log_q_correction=True).data_problems(100, 10, 1000)
    assert any(p.startswith("log_q_correction applies to the negative-sampling loss") for p in probs)
    assert not [p for p in TrainConfig(loss="negative-sampling", log_q_correction=True)
                .data_problems(100, 10, 1000) if "log_q_correction" in p]
    ds = _dataset(n=16)
    cfg = _config(loss="negative-sampling")
    net = XMCNetwork(ds.num_features, ds.num_labels, cfg)
    sampler = make_sampler("popularity", ds.num_labels,
                           label_counts=np.arange(ds.num_labels, dtype=np.float64))
    pos, mask = csr_to_padded(ds.Y)
    q = net(*csr_to_bag(ds.X))
    out = {}
    for corr in (False, True):
        out[corr] = compute_loss(net, q, pos, mask, "negative-sampling", sampler=sampler,
                                 negatives=8, generator=torch.Generator().manual_seed(0),
                                 log_q_correction=corr)
    smp = sampler.sample(q, 8, generator=torch.Generator().manual_seed(0))
    ref = negative_sampling_loss(net.labels.score_ids(q, pos), pos, mask,
                                 net.labels.score_ids(q, smp.ids), smp.ids, smp.log_q,
                                 log_q_correction=True)
    torch.testing.assert_close(out[True], ref)
    assert not torch.allclose(out[True], out[False])
    # and the trainer passes the config field through (its local placement calls the loss)
    seen = []
    import xmc_toolkit.placement as train_module

    orig = train_module.compute_loss

    def spy(*a, **kw):
        seen.append(kw.get("log_q_correction"))
        return orig(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "compute_loss", spy)
    try:
        Trainer(_config(loss="negative-sampling", log_q_correction=True, sampler="popularity",
                        batch_size=16)).fit(ds)
    finally:
        mp.undo()
    assert seen and all(seen)
