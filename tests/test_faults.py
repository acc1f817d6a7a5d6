"""Faults: CLI errors, config validation, killed / interrupted runs, corrupted checkpoints,
numerical safety, data mismatches and memory bounds of streamed prediction.

Each test records its case through the ``reliability`` fixture (see ``tests/reliability.py``);
``docs/reliability.md`` is generated from these records.
"""

from __future__ import annotations

import json
import logging
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner
from reliability import case, describe_error, outcome_of, reliability  # noqa: F401  (fixture)

from cli.main import xmc
from xmc_toolkit.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from xmc_toolkit.data import XMCDataset, save
from xmc_toolkit.errors import CheckpointError, ConfigError, XMCError
from xmc_toolkit.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=3, dropout=0.0,
             ks=(1, 3), device="cpu", seed=3, loss="full")


def _problem(n: int, d: int, l: int, seed: int = 0) -> XMCDataset:
    """Learnable random data: label j <-> a few dedicated features (plus noise)."""
    g = np.random.default_rng(seed)
    labs = [g.choice(l, size=g.integers(1, 3), replace=False) for _ in range(n)]
    rows, cols, vals, yr, yc = [], [], [], [], []
    per = max(1, d // l)
    for i, ls in enumerate(labs):
        feats = {int(j * per + g.integers(per)) % d for j in ls} | {int(g.integers(d))}
        rows += [i] * len(feats)
        cols += sorted(feats)
        vals += list(g.random(len(feats)) + 0.5)
        yr += [i] * len(ls)
        yc += sorted(int(j) for j in ls)
    X = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, d))
    Y = sp.csr_matrix((np.ones(len(yr), np.float32), (yr, yc)), shape=(n, l))
    return XMCDataset(X, Y)


def _xmc(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------------
# CLI: one line, exit 2; --debug shows the traceback
# ------------------------------------------------------------------------------------------------
CLI_BAD = case("cli", "xmc data info on a corrupted file",
               "one line 'error: file:line: ...', exit status 2, no traceback")
CLI_DEBUG = case("cli", "xmc --debug data info on a corrupted file",
                 "the traceback of the DataFormatError")
CLI_MISSING = case("cli", "xmc eval --model on a directory that is not a model",
                   "one line 'error: ...', exit status 2")


def test_cli_one_line_error_and_debug_traceback(tmp_path: Path, reliability) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("2 4 3\n0 1:1\n1,2 3:nan\n")
    r = CliRunner().invoke(xmc, ["data", "info", str(bad)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.txt:3" in lines[0], lines
    assert "Traceback" not in r.output
    reliability.record(CLI_BAD, f"exit {r.exit_code}: " + lines[0].replace(str(tmp_path) + "/", ""))
    r = CliRunner().invoke(xmc, ["--debug", "data", "info", str(bad)])
    assert r.exit_code != 0 and r.exception is not None
    assert type(r.exception).__name__ == "DataFormatError"
    reliability.record(CLI_DEBUG, f"raises {describe_error(r.exception)}")
    (tmp_path / "notamodel").mkdir()
    r = CliRunner().invoke(xmc, ["eval", "--model", str(tmp_path / "notamodel"), "--data",
                                 str(bad)])
    assert r.exit_code == 2 and r.output.startswith("error: "), r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    reliability.record(CLI_MISSING, f"exit 2: {r.output.strip().replace(str(tmp_path) + '/', '')}")


def test_cli_subprocess_exit_status(tmp_path: Path) -> None:
    """The installed entry point (a real process) prints one line and exits 2."""
    bad = tmp_path / "bad.svm"
    bad.write_bytes(b"0 1:1\n1 2:\xff\n")
    p = _xmc("data", "info", str(bad))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, (out, err)
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "bad.svm:2" in err


# ------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------
CFG_ALL = case("config", "negatives >= labels, codewords^2 >> labels, batch > rows, unknown "
               "sampler and norm, in one run",
               "one ConfigError listing every problem (the codewords check needs a MIDX sampler), "
               "raised before any work (no output dir)")
CFG_CLI = case("config", "xmc train with several impossible flags",
               "one 'error: invalid configuration (N problems): ...' line, exit 2, nothing written")
CFG_UNKNOWN_KEY = case("config", "unknown key in a --config JSON file",
                       "ConfigError naming the key")


def test_config_problems_reported_at_once(tmp_path: Path, reliability) -> None:
    ds = _problem(40, 30, 10)
    cfg = TrainConfig.from_dict(dict(SMALL, loss="sampled", sampler="bogus", negatives=50,
                                     codewords=64, batch_size=500, norm="weird"), validate=False)
    with pytest.raises(ConfigError) as ei:
        cfg.validate_for_data(ds.num_points, ds.num_features, ds.num_labels)
    probs = ei.value.problems
    text = " | ".join(probs)
    for needle in ("sampler='bogus'", "norm='weird'", "negatives=50", "batch_size=500"):
        assert needle in text, text
    # the MIDX codewords check needs a MIDX sampler: check it with a valid sampler name
    cfg2 = TrainConfig.from_dict(dict(SMALL, loss="sampled", sampler="midx", negatives=50,
                                      codewords=64, batch_size=500), validate=False)
    probs2 = cfg2.problems() + cfg2.data_problems(ds.num_points, ds.num_features, ds.num_labels)
    assert len(probs2) == 3 and "codewords=64" in " ".join(probs2), probs2
    out = tmp_path / "never"
    with pytest.raises(ConfigError):
        Trainer(cfg2, out_dir=out).fit(ds)
    assert not out.exists()
    reliability.record(CFG_ALL, f"ConfigError with {len(probs)} problems (unknown sampler) / "
                       f"{len(probs2)} (midx: negatives, codewords, batch); nothing written")


def test_cli_config_problems_at_once(tmp_path: Path, reliability) -> None:
    data = tmp_path / "trn.txt"
    save(_problem(40, 30, 10), data, "xc")
    out = tmp_path / "run"
    r = CliRunner().invoke(xmc, ["train", "--data", str(data), "--out", str(out), "--loss",
                                 "sampled", "--sampler", "midx", "--negatives", "50",
                                 "--codewords", "64", "--batch-size", "500", "--dropout", "2"])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("error: invalid configuration (4 problems)"), line
    for needle in ("negatives=50", "codewords=64", "batch_size=500", "dropout=2"):
        assert needle in line
    assert not (out / "checkpoint").exists() and not (out / "model.safetensors").exists()
    reliability.record(CFG_CLI, f"exit 2, {line[:60]}...; no checkpoint or model written")
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"dim": 8, "negatvies": 3}))
    r = CliRunner().invoke(xmc, ["train", "--data", str(data), "--out", str(out), "--config",
                                 str(bad)])
    assert r.exit_code == 2 and "negatvies" in r.output, r.output
    reliability.record(CFG_UNKNOWN_KEY, f"exit 2: {r.output.strip()[:150]}")


# ------------------------------------------------------------------------------------------------
# interrupted runs: SIGKILL + --resume, SIGINT
# ------------------------------------------------------------------------------------------------
KILL = case("interrupted runs", "SIGKILL of `xmc train` mid-run, then `xmc train --resume`",
            "resumes from the last checkpoint; final metrics and weights equal an "
            "uninterrupted run (CPU, fixed seed)")
SIGINT = case("interrupted runs", "SIGINT (Ctrl-C) during `xmc train`",
              "checkpoint saved at the current step, one 'interrupted at step N' line, "
              "exit status 130, no traceback; --resume finishes the run")

TRAIN_FLAGS = ["--loss", "full", "--dim", "16", "--hidden", "32", "--epochs", "3",
               "--batch-size", "8", "--checkpoint-every", "20", "--seed", "5", "--device", "cpu",
               "--dropout", "0.1", "--lr", "0.01", "--no-progress", "--json"]


def _latest_step(run: Path) -> int:
    latest = run / "checkpoint" / "latest"
    try:
        return int(latest.read_text().strip().split("-")[-1])
    except (OSError, ValueError):
        return -1


def _wait_for_step(p: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    t0 = time.time()
    while _latest_step(run) < step:
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"training ended (rc {p.returncode}) before step {step}: {err[-500:]}")
        if time.time() - t0 > timeout:
            p.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def train_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("faultdata")
    ds = _problem(1600, 60, 12, seed=1)
    save(ds.subset(np.arange(1200)), d / "trn.txt", "xc")
    save(ds.subset(np.arange(1200, 1600)), d / "tst.txt", "xc")
    return d / "trn.txt", d / "tst.txt"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(train_files, tmp_path: Path,
                                                   reliability) -> None:
    trn, tst = train_files
    ref_run, run = tmp_path / "ref", tmp_path / "killed"
    p_ref = _xmc("train", "--data", str(trn), "--val", str(tst), "--out", str(ref_run),
                 *TRAIN_FLAGS)
    out_ref, err_ref = p_ref.communicate(timeout=300)
    assert p_ref.returncode == 0, err_ref
    ref = json.loads(out_ref.strip().splitlines()[-1])
    total = ref["steps"]

    p = _xmc("train", "--data", str(trn), "--val", str(tst), "--out", str(run), *TRAIN_FLAGS)
    _wait_for_step(p, run, 60)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    killed_at = _latest_step(run)
    assert p.returncode == -signal.SIGKILL
    assert 60 <= killed_at < total, (killed_at, total)

    p2 = _xmc("train", "--resume", str(run), "--no-progress", "--json")
    out2, err2 = p2.communicate(timeout=300)
    assert p2.returncode == 0, err2
    res = json.loads(out2.strip().splitlines()[-1])
    assert res["steps"] == total
    assert res["val"] == pytest.approx(ref["val"], abs=1e-7)
    assert res["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    wa, wb = _weights(ref_run), _weights(run)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
    reliability.record(KILL, f"killed mid-run after a checkpoint (of {total} steps); the resumed "
                       "run ends with the same val metrics and weights as the uninterrupted run")


def test_sigint_saves_checkpoint_and_exits_cleanly(train_files, tmp_path: Path,
                                                   reliability) -> None:
    trn, _ = train_files
    run = tmp_path / "int"
    p = _xmc("train", "--data", str(trn), "--out", str(run), *TRAIN_FLAGS)
    _wait_for_step(p, run, 20)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.fail("training finished before SIGINT arrived; make the run longer")
    assert p.returncode == 130, err  # the conventional status of a Ctrl-C exit
    lines = [ln for ln in err.splitlines() if "interrupted at step" in ln]
    assert "Traceback" not in err and len(lines) == 1, err
    step = int(lines[-1].split("interrupted at step ")[1].split(";")[0])
    assert _latest_step(run) == step  # the checkpoint is the interrupted step itself
    verify_checkpoint(list_checkpoints(run / "checkpoint")[-1])
    p2 = _xmc("train", "--resume", str(run), "--no-progress", "--json")
    out2, err2 = p2.communicate(timeout=300)
    assert p2.returncode == 0, err2
    reliability.record(SIGINT, f"exit 130, one line 'interrupted at step N; checkpoint saved ...', "
                       "checkpoint at that step verifies; --resume finishes "
                       f"({json.loads(out2.strip().splitlines()[-1])['steps']} steps)")


# ------------------------------------------------------------------------------------------------
# corrupted checkpoints
# ------------------------------------------------------------------------------------------------
CK_TRUNC = case("checkpoints", "latest checkpoint's model.safetensors truncated",
                "CheckpointError naming the file and the checksum / size mismatch and the "
                "previous checkpoint; the previous checkpoint is kept")
CK_FLIP = case("checkpoints", "one byte flipped in the latest checkpoint",
               "CheckpointError: sha256 mismatch")
CK_RESUME = case("checkpoints", "resume when the latest checkpoint is corrupt",
                 "warning, falls back to the previous good checkpoint and finishes")
CK_MANIFEST = case("checkpoints", "manifest.json truncated (torn write)",
                   "CheckpointError: manifest is not valid JSON")


def _two_checkpoints(tmp_path: Path) -> tuple[Path, XMCDataset, list[Path]]:
    ds = _problem(64, 30, 6)
    run = tmp_path / "ck"
    cfg = TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=1, max_steps=6))
    Trainer(cfg, out_dir=run).fit(ds)
    cks = list_checkpoints(run / "checkpoint")
    assert len(cks) >= 2
    return run, ds, cks


def test_corrupted_checkpoint_detected_previous_kept(tmp_path: Path, reliability,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    run, ds, cks = _two_checkpoints(tmp_path)
    last, prev = cks[-1], cks[-2]
    f = last / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(run / "checkpoint", verify=True)
    msg = str(ei.value)
    assert "model.safetensors" in msg and prev.name in msg, msg
    verify_checkpoint(prev)  # the previous good checkpoint is intact
    reliability.record(CK_TRUNC, describe_error(ei.value))

    with caplog.at_level(logging.WARNING):
        cfg = TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=1, max_steps=0))
        res = Trainer(cfg, out_dir=run).fit(ds, resume=True)
    assert res.steps == 2 * math.ceil(64 / 16)
    assert any(prev.name in r.getMessage() or "corrupt" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    reliability.record(CK_RESUME, f"warning logged, resumed from {prev.name}, finished at step "
                       f"{res.steps}")


def test_checkpoint_byte_flip_and_torn_manifest(tmp_path: Path, reliability) -> None:
    run, _, cks = _two_checkpoints(tmp_path)
    f = cks[-1] / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    err = outcome_of(lambda: verify_checkpoint(cks[-1]))
    assert err.startswith("CheckpointError") and "sha256" in err, err
    reliability.record(CK_FLIP, re.sub(r"[0-9a-f]{12}\.\.\.", "<sha256>...", err))
    m = cks[-2] / "manifest.json"
    m.write_text(m.read_text()[:20])
    err = outcome_of(lambda: load_checkpoint(cks[-2]))
    assert err.startswith("CheckpointError") and "manifest" in err, err
    reliability.record(CK_MANIFEST, err)


# ------------------------------------------------------------------------------------------------
# numerical safety
# ------------------------------------------------------------------------------------------------
NAN_LOSS = case("numerical safety", "weights become NaN mid-run (loss NaN)",
                "XMCError naming the step; the last good checkpoint is kept and verifies")
INF_GRAD = case("numerical safety", "infinite gradient with a finite loss",
                "XMCError naming the step before the optimizer step; weights stay finite")
LSE = case("numerical safety", "full softmax with scores of magnitude 1e4",
           "finite loss and gradients equal to a float64 log-sum-exp reference")
SAMPLED_BIG = case("numerical safety", "sampled softmax with scores of magnitude 1e4",
                   "finite loss equal to the float64 loss of the scores shifted by -1e4")
ALL_HITS = case("numerical safety", "sampled softmax when every sample is an accidental hit",
                "finite loss and finite gradients (hits removed from the negatives)")
AMP = case("numerical safety", "fp16 overflow under mixed precision (CUDA)",
           "GradScaler skips the step and lowers the scale; training continues with finite "
           "weights (runs only where CUDA is available)")


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path: Path, reliability) -> None:
    ds = _problem(64, 30, 6)
    run = tmp_path / "nan"

    def poison(event: str, state: dict) -> None:
        if event == "step" and state["step"] == 5:
            with torch.no_grad():
                trainer.network.labels.weight.weight.fill_(float("nan"))

    trainer = Trainer(TrainConfig(**dict(SMALL, epochs=3, checkpoint_every=2)), out_dir=run,
                      callbacks=[poison])
    with pytest.raises(XMCError) as ei:
        trainer.fit(ds)
    msg = str(ei.value)
    assert "at step 6" in msg and "nan" in msg.lower(), msg
    cks = list_checkpoints(run / "checkpoint")
    assert cks and int(cks[-1].name.split("-")[-1]) == 4
    verify_checkpoint(cks[-1])
    groups, _ = load_checkpoint(run / "checkpoint")
    assert all(torch.isfinite(t).all() for t in groups["model"].values())
    reliability.record(NAN_LOSS, describe_error(ei.value) + f" -- kept {cks[-1].name}")


def test_infinite_gradient_stops_training(tmp_path: Path, reliability) -> None:
    ds = _problem(64, 30, 6)
    trainer = Trainer(TrainConfig(**dict(SMALL, epochs=2, clip_grad=1.0)))
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

    orig = Trainer._make_sampler  # noqa: F841 - keep the class untouched

    def begin(event: str, state: dict) -> None:
        if event == "train_begin":
            for p in trainer.network.encoder_parameters():
                if p.requires_grad and not p.is_sparse:
                    p.register_hook(hook)
                    break

    trainer.callbacks.append(begin)
    with pytest.raises(XMCError) as ei:
        trainer.fit(ds)
    assert "gradient norm became inf at step 3" in str(ei.value), str(ei.value)
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    reliability.record(INF_GRAD, describe_error(ei.value))


def test_logsumexp_stable_for_huge_scores(reliability) -> None:
    from xmc_toolkit import losses

    g = torch.Generator().manual_seed(0)
    B, L, d = 4, 50, 8
    q = (torch.randn(B, d, generator=g, dtype=torch.float64) * 100).float().requires_grad_()
    w = (torch.randn(L, d, generator=g, dtype=torch.float64) * 30).float().requires_grad_()
    pos = torch.tensor([[0, 1], [2, 0], [3, 4], [5, 6]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [False, False]])
    loss = losses.full_softmax_loss(q, w, pos, mask, None, chunk_size=16)
    scores = q.double() @ w.double().T
    assert scores.abs().max() > 1e4
    ref = losses.full_softmax_loss_from_scores(scores, pos, mask)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-2)
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(w.grad).all()
    reliability.record(LSE, f"loss {float(loss):.1f} vs float64 reference {float(ref):.1f}; "
                       "gradients finite")

    # softmax losses are shift-invariant: scores + 1e4 must give the small-score loss
    g2 = torch.Generator().manual_seed(1)
    pos_s = torch.randn(3, 2, generator=g2, dtype=torch.float64)
    neg_s = torch.randn(3, 5, generator=g2, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    pmask = torch.tensor([[True, True], [True, False], [True, True]])
    nids = torch.tensor([[5, 6, 7, 8, 9]] * 3)
    lq = torch.full((3, 2), -3.0, dtype=torch.float64)
    nlq = torch.full((3, 5), -3.0, dtype=torch.float64)
    small = losses.sampled_softmax_loss(pos_s, ids, pmask, lq, neg_s, nids, nlq)
    sl = losses.sampled_softmax_loss((pos_s + 1e4).float(), ids, pmask, lq.float(),
                                     (neg_s + 1e4).float(), nids, nlq.float())
    assert torch.isfinite(sl)
    torch.testing.assert_close(sl.double(), small, rtol=0, atol=1e-2)
    reliability.record(SAMPLED_BIG, f"loss {float(sl):.3f} at scores ~1e4 equals the float64 "
                       f"loss {float(small):.3f} of the unshifted scores")


def test_sampled_loss_finite_when_all_samples_are_hits(reliability) -> None:
    from xmc_toolkit import losses

    pos_ids = torch.tensor([[3, 7], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    pos_s = torch.randn(2, 2, requires_grad=True)
    neg_ids = torch.tensor([[3, 7, 3, 7], [1, 1, 1, 1]])  # every negative is a positive
    neg_s = torch.randn(2, 4, requires_grad=True)
    lq = torch.full((2, 2), -2.0)
    nlq = torch.full((2, 4), -2.0)
    out = []
    for shared in (False, True):
        nid = neg_ids if not shared else torch.tensor([3, 7, 1, 3])
        ns = neg_s if not shared else neg_s
        nl = nlq if not shared else nlq[0]
        if shared:
            pos_ids2 = torch.tensor([[3, 7], [1, 3]])
            mask2 = torch.tensor([[True, True], [True, True]])
        else:
            pos_ids2, mask2 = pos_ids, mask
        for name, fn in (("sampled softmax", lambda: losses.sampled_softmax_loss(
                pos_s, pos_ids2, mask2, lq, ns, nid, nl)),
                ("negative sampling", lambda: losses.negative_sampling_loss(
                    pos_s, pos_ids2, mask2, ns, nid))):
            if shared and name == "negative sampling":
                continue
            loss = fn()
            assert torch.isfinite(loss), (name, shared, loss)
            gp, gn = torch.autograd.grad(loss, (pos_s, neg_s), allow_unused=True)
            for g_ in (gp, gn):
                assert g_ is None or torch.isfinite(g_).all()
            out.append(f"{name}{' (shared)' if shared else ''}")
    reliability.record(ALL_HITS, "finite: " + ", ".join(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_fp16_overflow_skips_step(reliability) -> None:
    ds = _problem(256, 40, 8)
    trainer = Trainer(TrainConfig(**dict(SMALL, device="cuda", amp="fp16", epochs=2,
                                         clip_grad=0.0)))
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 4 else grad

    def begin(event: str, state: dict) -> None:
        if event == "train_begin":
            for p in trainer.network.encoder_parameters():
                if p.requires_grad:
                    p.register_hook(hook)
                    break

    trainer.callbacks.append(begin)
    res = trainer.fit(ds)
    assert res.steps == 2 * math.ceil(256 / 16)
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    reliability.record(AMP, f"overflow at step 4 skipped by GradScaler; {res.steps} steps, "
                       "weights finite")


# ------------------------------------------------------------------------------------------------
# data mismatches
# ------------------------------------------------------------------------------------------------
MISMATCH = case("data mismatches", "test data with unseen labels / features beyond the "
                "training dimension", "DataFormatError naming both sizes and --ignore-extra")
IGNORE_EXTRA = case("data mismatches", "the same with --ignore-extra",
                    "extra columns dropped, the dropped count logged; metrics computed")
EMPTY_ROWS = case("data mismatches", "test rows without labels",
                  "skipped in the metrics and counted (num_rows_without_labels)")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("model") / "m"
    ds = _problem(80, 30, 6, seed=2)
    Trainer(TrainConfig(**dict(SMALL, epochs=2)), out_dir=run).fit(ds)
    return run


def test_data_mismatch_error_and_ignore_extra(small_model: Path, tmp_path: Path, reliability,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from xmc_toolkit.evaluate import evaluate_model_dir

    ds = _problem(20, 34, 8, seed=4)  # 4 features and 2 labels more than the model's
    test = tmp_path / "tst.txt"
    save(ds, test, "xc")
    err = outcome_of(lambda: evaluate_model_dir(small_model, test, device="cpu"))
    assert err.startswith("DataFormatError") and "--ignore-extra" in err, err
    assert "34 features (model: 30)" in err and "8 labels (model: 6)" in err
    reliability.record(MISMATCH, err)
    with caplog.at_level(logging.WARNING, logger="xmc_toolkit.evaluate"):
        res = evaluate_model_dir(small_model, test, device="cpu", ignore_extra=True)
    dropped_f = int((ds.X.indices >= 30).sum())
    dropped_l = int((ds.Y.indices >= 6).sum())
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert f"dropped {dropped_f} stored feature values" in msgs, msgs
    assert f"dropped {dropped_l} label assignments" in msgs, msgs
    assert 0.0 <= res["P@1"] <= 1.0
    r = CliRunner().invoke(xmc, ["eval", "--model", str(small_model), "--data", str(test),
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "--ignore-extra" in r.output
    r = CliRunner().invoke(xmc, ["eval", "--model", str(small_model), "--data", str(test),
                                 "--device", "cpu", "--ignore-extra", "--json"])
    assert r.exit_code == 0, r.output
    reliability.record(IGNORE_EXTRA, f"logged: dropped {dropped_f} feature values and "
                       f"{dropped_l} label assignments; metrics computed; CLI exit 0")


def test_rows_without_labels_skipped_and_counted(small_model: Path, tmp_path: Path,
                                                 reliability) -> None:
    from xmc_toolkit.evaluate import evaluate_model_dir

    ds = _problem(20, 30, 6, seed=5)
    Y = ds.Y.tolil()
    for i in (0, 3, 7):
        Y[i, :] = 0
    Y = sp.csr_matrix(Y)
    Y.eliminate_zeros()
    test = tmp_path / "tst.txt"
    save(XMCDataset(ds.X, Y), test, "xc")
    res = evaluate_model_dir(small_model, test, device="cpu")
    assert res["num_rows_without_labels"] == 3 and res["num_rows_evaluated"] == 17
    sub = tmp_path / "sub.txt"
    keep = np.setdiff1d(np.arange(20), [0, 3, 7])
    save(XMCDataset(ds.X[keep], Y[keep]), sub, "xc")
    res2 = evaluate_model_dir(small_model, sub, device="cpu")
    for k in ("P@1", "nDCG@3", "R@5"):
        assert res[k] == pytest.approx(res2[k])
    reliability.record(EMPTY_ROWS, f"num_rows_without_labels=3, num_rows_evaluated=17; metrics "
                       "equal those of the 17 labelled rows alone")
