"""Exact resume on CPU: an interrupted-and-resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from xmc_toolkit.data.dataset import XMCDataset
from xmc_toolkit.errors import CheckpointError
from xmc_toolkit.train import TrainConfig, Trainer, TrainingInterrupted

BASE = dict(batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=3, dropout=0.3,
            ks=(1, 3), device="cpu", seed=3)
VOLATILE = ("seconds", "examples_per_s")


def _history(res):
    return [{k: v for k, v in h.items() if k not in VOLATILE} for h in res.history]


def _assert_same(a: Trainer, b: Trainer) -> None:
    assert _history(a.result) == _history(b.result)
    assert a.result.steps == b.result.steps
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("extra", [
    dict(loss="full", schedule="constant"),
    dict(loss="sampled", sampler="midx", negatives=3, refresh_every=3, schedule="constant"),
    dict(loss="full", schedule="constant", ema=0.9, input_dropout=0.2, bce_weight=0.1,
         bag_optimizer="sparse-adam"),
    dict(loss="sampled", sampler="midx", negatives=3, refresh_every=3, schedule="constant",
         ensemble=2),
], ids=["full", "midx", "ema-sparse-bag", "ensemble-midx"])
def test_two_epochs_equal_one_epoch_plus_resume(tiny_xy, tmp_path, extra):
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    full = Trainer(TrainConfig(**BASE, **extra, epochs=2), out_dir=tmp_path / "a")
    full.fit(ds, ds)
    first = Trainer(TrainConfig(**BASE, **extra, epochs=1), out_dir=tmp_path / "b")
    first.fit(ds, ds)
    resumed = Trainer(TrainConfig(**BASE, **extra, epochs=2), out_dir=tmp_path / "b")
    resumed.fit(ds, ds, resume=True)
    _assert_same(full, resumed)


def test_mid_epoch_checkpoint_and_interrupt_resume(tiny_xy, tmp_path):
    """Stop mid-epoch (a SIGINT-like interrupt at step 6 with --checkpoint-every 4): same end."""
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    cfg = dict(**BASE, loss="sampled", sampler="uniform", negatives=3, epochs=3,
               checkpoint_every=4)
    ref = Trainer(TrainConfig(**cfg), out_dir=tmp_path / "ref")
    ref.fit(ds, ds)

    interrupted = Trainer(TrainConfig(**cfg), out_dir=tmp_path / "run")

    def stop_at_6(event, state):
        if event == "step" and state["step"] == 6:  # 4 batches per epoch: mid-epoch 2
            interrupted._interrupted = True  # what the SIGINT handler does

    interrupted.callbacks.append(stop_at_6)
    with pytest.raises(TrainingInterrupted, match="step 6.*--resume"):
        interrupted.fit(ds, ds)
    resumed = Trainer(TrainConfig(**cfg), out_dir=tmp_path / "run")
    resumed.fit(ds, ds, resume=True)
    _assert_same(ref, resumed)


def test_max_steps_stop_then_resume(tiny_xy, tmp_path):
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    cfg = dict(**BASE, loss="full", epochs=2)
    ref = Trainer(TrainConfig(**cfg), out_dir=tmp_path / "ref")
    ref.fit(ds, ds)
    part = Trainer(TrainConfig(**cfg, max_steps=5), out_dir=tmp_path / "run")
    part.fit(ds, ds)
    assert part.result.steps == 5
    resumed = Trainer(TrainConfig(**cfg), out_dir=tmp_path / "run")
    resumed.fit(ds, ds, resume=True)
    _assert_same(ref, resumed)


def test_resume_errors(tiny_xy, tmp_path):
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        Trainer(TrainConfig(**BASE, epochs=1), out_dir=tmp_path / "empty").fit(ds, resume=True)
    Trainer(TrainConfig(**BASE, epochs=1), out_dir=tmp_path / "r").fit(ds)
    with pytest.raises(CheckpointError, match="another config.*dim"):
        Trainer(TrainConfig(**{**BASE, "dim": 8}, epochs=2), out_dir=tmp_path / "r").fit(
            ds, resume=True)


def test_real_sigint_saves_checkpoint_and_stops(tiny_xy, tmp_path):
    import os
    import signal

    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    trainer = Trainer(TrainConfig(**BASE, epochs=2), out_dir=tmp_path / "s")

    def send(event, state):
        if event == "step" and state["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    trainer.callbacks.append(send)
    with pytest.raises(TrainingInterrupted, match="step 2"):
        trainer.fit(ds)
    assert (tmp_path / "s" / "checkpoint" / "latest").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = Trainer(TrainConfig(**BASE, epochs=2), out_dir=tmp_path / "s")
    assert resumed.fit(ds, resume=True).steps == 8
