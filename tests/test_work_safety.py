"""Never lose a user's work, never read wrong data silently (issue 13).

Regression tests for the defects found under faults and bad input: work lost or overwritten
(Ctrl-C at an epoch's last batch, ``--out`` over an earlier model, a refused resume that still
wrote, two runs into one directory, a resume on changed data), data read wrongly without a
word (model files without checksums, npz pairs without CSR validation, the svmlight id base,
byte-order marks), allocations driven by the input, checkpoint manifests naming files outside
their directory, and the errors that printed a traceback instead of one line. Each test
records its case for ``docs/reliability.md``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from reliability import case, describe_error, outcome_of, reliability  # noqa: F401  (fixture)

from cli.main import xmc
from xmc_toolkit.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from xmc_toolkit.data import XMCDataset, load, save
from xmc_toolkit.errors import CheckpointError, DataFormatError, OutputError
from xmc_toolkit.train import TrainConfig, Trainer, TrainingInterrupted, load_model_dir

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=3, dropout=0.0,
             ks=(1, 3), device="cpu", seed=3, loss="full", ensemble=1)
# --tfidf on: the IDF scaling is where a huge input value overflows (the 3e38 case below);
# --feature-power 1: the square root (auto on these weighted multi-label rows) keeps 3e38 finite
FLAGS = ["--loss", "full", "--dim", "8", "--hidden", "16", "--epochs", "2", "--batch-size",
         "16", "--device", "cpu", "--ensemble", "1", "--seed", "1", "--no-progress",
         "--tfidf", "on", "--feature-power", "1"]


def _problem(n: int, d: int, l: int, seed: int = 0) -> XMCDataset:
    g = np.random.default_rng(seed)
    X = sp.random(n, d, density=0.2, format="csr", dtype=np.float32, random_state=seed)
    X.data[:] = g.random(X.nnz).astype(np.float32) + 0.5
    rows = np.repeat(np.arange(n), 2)
    cols = np.concatenate([g.choice(l, size=2, replace=False) for _ in range(n)])
    Y = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, l))
    return XMCDataset(X, Y)


def _cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(xmc, [str(a) for a in args])
    return r.exit_code, r.output


def _one_line(out: str) -> str:
    """The one error line of a failed command (log lines aside); no traceback."""
    lines = [ln for ln in out.splitlines() if ln.startswith(("error: ", "interrupted"))]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file()}


def _short(text: str, tmp: Path) -> str:
    return text.replace(str(tmp) + "/", "").replace(str(tmp), "<tmp>")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety")
    save(_problem(96, 40, 8, seed=2), d / "trn.txt", "xc")
    return d / "trn.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    code, output = _cli("train", "--data", data_file, "--out", out, *FLAGS)
    assert code == 0, output
    return out


# ------------------------------------------------------------------------------------------------
# 1. Ctrl-C during the last batch of an epoch
# ------------------------------------------------------------------------------------------------
INT_LAST = case("interrupted runs", "SIGINT during the last batch of an epoch "
                "(--checkpoint-every 0)",
                "the epoch ends and its checkpoint (of the interrupted step) is written before "
                "TrainingInterrupted; --resume finishes the run")


def test_sigint_at_last_batch_of_epoch_checkpoints_that_step(tmp_path: Path,
                                                              reliability) -> None:
    ds = _problem(64, 30, 6)
    per_epoch = 64 // 16

    def at_step(event: str, payload: dict) -> None:
        if event == "step" and payload["step"] == per_epoch:  # the last batch of epoch 1
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler sets its flag

    cfg = TrainConfig(**dict(SMALL, epochs=3, checkpoint_every=0))
    with pytest.raises(TrainingInterrupted) as ei:
        Trainer(cfg, out_dir=tmp_path / "r", callbacks=[at_step]).fit(ds)
    assert f"interrupted at step {per_epoch}" in str(ei.value)
    cks = list_checkpoints(tmp_path / "r" / "checkpoint")
    assert [c.name for c in cks] == [f"ckpt-{per_epoch:08d}"], cks
    res = Trainer(cfg, out_dir=tmp_path / "r").fit(ds, resume=True)
    assert res.steps == 3 * per_epoch and len(res.history) == 3
    reliability.record(INT_LAST, f"TrainingInterrupted at step {per_epoch} (end of epoch 1); "
                       f"checkpoint {cks[-1].name} exists; --resume finishes ({res.steps} steps)")


# ------------------------------------------------------------------------------------------------
# 2. --out over earlier work; 3. a refused resume changes nothing; 4. one run per directory
# ------------------------------------------------------------------------------------------------
OUT_MODEL = case("output directories", "xmc train --out DIR where DIR holds a trained model",
                 "refused (one line naming --resume / --force, exit 2), DIR unchanged")
OUT_OTHER = case("output directories", "xmc train --out DIR where DIR holds other files "
                 "(config.json, metrics.jsonl)", "refused (exit 2), the files unchanged")
OUT_FORCE = case("output directories", "the same with --force",
                 "the earlier run's files and checkpoints are removed, then a new model is "
                 "written (no old checkpoint left beside the new ones)")
RESUME_REFUSED = case("output directories", "refused xmc train --resume DIR --lr 0.1",
                      "exit 2 naming the changed value; nothing on disk changes (run.json "
                      "included), so a plain --resume DIR still works")
LOCK = case("output directories", "two xmc train runs into the same --out at once",
            "the second fails at once (exit 2) naming the first one's pid")


def test_out_over_existing_model_refused_unless_force(trained: Path, data_file: Path,
                                                      tmp_path: Path, reliability) -> None:
    before = _snapshot(trained)
    code, out = _cli("train", "--data", data_file, "--out", trained, *FLAGS, "--max-steps", "1")
    assert code == 2, out
    line = _one_line(out)
    assert "--resume" in line and "--force" in line and "holds a trained model" in line, line
    assert _snapshot(trained) == before
    reliability.record(OUT_MODEL, f"exit 2: {_short(line, trained.parent)[:150]}")

    other = tmp_path / "mine"
    other.mkdir()
    (other / "config.json").write_text('{"mine": 1}')
    (other / "metrics.jsonl").write_text("my log\n")
    code, out = _cli("train", "--data", data_file, "--out", other, *FLAGS)
    assert code == 2 and "not empty" in out and "--force" in out, out
    assert (other / "config.json").read_text() == '{"mine": 1}'
    assert (other / "metrics.jsonl").read_text() == "my log\n"
    reliability.record(OUT_OTHER, f"exit 2: {_short(_one_line(out), tmp_path)[:150]}")

    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(trained, copy)
    old = {c.name for c in list_checkpoints(copy / "checkpoint")}
    code, out = _cli("train", "--data", data_file, "--out", copy, *FLAGS, "--max-steps", "1",
                     "--force")
    assert code == 0, out
    new = [c.name for c in list_checkpoints(copy / "checkpoint")]
    assert new == ["ckpt-00000001"] and not (old & set(new)), (old, new)
    assert json.loads((copy / "summary.json").read_text())["steps"] == 1
    reliability.record(OUT_FORCE, f"exit 0; checkpoints before {sorted(old)}, after {new}")


def test_refused_resume_changes_nothing(data_file: Path, tmp_path: Path, reliability) -> None:
    run = tmp_path / "run"
    code, out = _cli("train", "--data", data_file, "--out", run, *FLAGS, "--max-steps", "3")
    assert code == 0, out
    before = _snapshot(run)
    code, out = _cli("train", "--resume", run, "--lr", "0.1", "--no-progress")
    assert code == 2 and "lr" in out, out
    refused = _one_line(out)
    assert _snapshot(run) == before, "a refused resume changed files"
    code, out = _cli("train", "--resume", run, "--epochs", "1", "--no-progress")
    assert code == 0, out
    reliability.record(RESUME_REFUSED, f"exit 2: {refused[:110]}...; every file "
                       "byte-identical; a plain --resume then exits 0")


_HOLD = r"""
import sys, time
from xmc_toolkit._fileio import OutputLock
with OutputLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_into_same_out_fails_naming_pid(data_file: Path, tmp_path: Path,
                                                    reliability) -> None:
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        code, output = _cli("train", "--data", data_file, "--out", out, *FLAGS)
        assert code == 2, output
        line = _one_line(output)
        assert f"pid {holder.pid}" in line, line
        assert time.time() - t0 < 30
        assert not (out / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    code, output = _cli("train", "--data", data_file, "--out", out, *FLAGS, "--max-steps", "1")
    assert code == 0, output  # the kernel released the dead holder's lock
    import socket

    shown = _short(line, tmp_path).replace(str(holder.pid), "<pid>")
    shown = shown.replace(f" on {socket.gethostname()}", " on <host>")
    reliability.record(LOCK, "exit 2: " + shown[:150])


# ------------------------------------------------------------------------------------------------
# 5. resume on changed data
# ------------------------------------------------------------------------------------------------
FINGERPRINT = case("data mismatches", "xmc train --resume after the data file changed in "
                   "place (same N, D, L)",
                   "refused (exit 2): the training data differ from the checkpoint's "
                   "(fingerprint); --force continues anyway")


def test_resume_refuses_changed_data(tmp_path: Path, reliability) -> None:
    ds = _problem(64, 30, 6)
    f = tmp_path / "trn.txt"
    save(ds, f, "xc")
    run = tmp_path / "run"
    code, out = _cli("train", "--data", f, "--out", run, *FLAGS, "--max-steps", "2")
    assert code == 0, out
    ds.X.data[0] += 1.0  # one value edited in place: same shape, same nnz
    save(ds, f, "xc")
    before = _snapshot(run)
    code, out = _cli("train", "--resume", run, "--no-progress")
    assert code == 2 and "differ" in out and "--force" in out, out
    assert _snapshot(run) == before
    line = _one_line(out)
    code, out2 = _cli("train", "--resume", run, "--no-progress", "--force")
    assert code == 0, out2
    reliability.record(FINGERPRINT, "exit 2: " + _short(line, tmp_path)[:140] + "...; with "
                       "--force: exit 0")


# ------------------------------------------------------------------------------------------------
# 6. model directory checksums
# ------------------------------------------------------------------------------------------------
MODEL_FLIP = case("checkpoints", "one byte flipped in a model directory's model.safetensors",
                  "xmc eval fails (exit 2) naming the file and the sha256 mismatch; "
                  "--no-verify skips the check")


def test_model_dir_checksums_verified(trained: Path, data_file: Path, tmp_path: Path,
                                      reliability) -> None:
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained, model)
    f = model / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x40  # a weight's bits, not the header
    f.write_bytes(bytes(raw))
    code, out = _cli("eval", "--model", model, "--data", data_file, "--json")
    assert code == 2, out
    line = _one_line(out)
    assert "model.safetensors" in line and "sha256" in line and "--no-verify" in line, line
    code, out = _cli("eval", "--model", model, "--data", data_file, "--json", "--no-verify")
    assert code == 0, out
    with pytest.raises(CheckpointError):
        load_model_dir(model, device="cpu")
    load_model_dir(model, device="cpu", verify=False)
    import re

    reliability.record(MODEL_FLIP, re.sub(r"[0-9a-f]{12}\.\.\.", "<sha256>...",
                                          _short(line, tmp_path))[:160])


# ------------------------------------------------------------------------------------------------
# 7. npz pairs, 8. svmlight base, 10. byte-order marks
# ------------------------------------------------------------------------------------------------
NPZ_PAIR = case("loaders", "scipy npz pair (_X.npz/_Y.npz): id >= D, negative id, "
                "indptr[-1] < nnz, complex values",
                "each a DataFormatError naming the file, as for every other format")


def _scipy_npz(path: Path, data, indices, indptr, shape) -> None:
    np.savez(path, format=np.array("csr"), shape=np.array(shape), data=np.asarray(data),
             indices=np.asarray(indices), indptr=np.asarray(indptr))


def test_npz_pair_validated(tmp_path: Path, reliability) -> None:
    y = tmp_path / "d_Y.npz"
    _scipy_npz(y, [1.0, 1.0], [0, 1], [0, 1, 2], (2, 2))
    x = tmp_path / "d_X.npz"
    outcomes = []
    for name, args in (("id >= D", ([1.0, 2.0], [0, 3], [0, 1, 2], (2, 3))),
                       ("negative id", ([1.0, 2.0], [0, -1], [0, 1, 2], (2, 3))),
                       ("indptr[-1] < nnz", ([1.0, 2.0, 3.0], [0, 1, 2], [0, 1, 2], (2, 3))),
                       ("complex", (np.array([1 + 2j, 2.0]), [0, 1], [0, 1, 2], (2, 3)))):
        _scipy_npz(x, *args)
        with pytest.raises(DataFormatError) as ei:
            load(x)
        assert "d_X.npz" in str(ei.value), ei.value
        outcomes.append(f"{name}: {describe_error(ei.value).split(': ', 2)[-1][:70]}")
    _scipy_npz(x, [1.0, 2.0], [0, 2], [0, 1, 2], (2, 3))  # valid
    assert load(x).X.toarray().tolist() == [[1.0, 0, 0], [0, 0, 2.0]]
    reliability.record(NPZ_PAIR, "; ".join(outcomes))


SVM_ROUND = case("loaders", "svmlight round trip where feature 0 and the last feature are "
                 "never used", "save then load gives the same matrices and dimensions (the "
                 "file's first line states the base and D, L)")
SVM_BASE = case("loaders", "svmlight without a header and without feature id 0",
                "read as 1-based with a warning saying so; --zero-based reads it as 0-based")


def test_svmlight_round_trip_exact(tmp_path: Path, reliability) -> None:
    X = sp.csr_matrix(np.array([[0, 1.5, 0, 0], [0, 0, 2.0, 0]], np.float32))
    Y = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 0]], np.float32))
    p = tmp_path / "x.svm"
    save(XMCDataset(X, Y), p)
    back = load(p)
    assert back.X.shape == (2, 4) and back.Y.shape == (2, 3)
    assert (back.X != X).nnz == 0 and (back.Y != Y).nnz == 0
    code, out = _cli("data", "convert", p, tmp_path / "y.txt")
    assert code == 0, out
    assert (load(tmp_path / "y.txt").X != X).nnz == 0
    reliability.record(SVM_ROUND, f"equal after the round trip, shape {back.X.shape} / "
                       f"{back.Y.shape}; first line {p.read_text().splitlines()[0]!r}")


def test_svmlight_auto_base_stated_and_forced(tmp_path: Path, reliability,
                                              caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "plain.svm"
    p.write_text("0 1:1 2:1\n1 2:3\n")
    with caplog.at_level(logging.WARNING):
        ds = load(p)
    assert ds.num_features == 2
    msgs = [r.getMessage() for r in caplog.records if "1-based" in r.getMessage()]
    assert msgs and "--zero-based" in msgs[0], [r.getMessage() for r in caplog.records]
    assert load(p, zero_based=True).num_features == 3
    code, out = _cli("data", "info", p, "--json", "--zero-based")
    assert code == 0 and json.loads(out[out.index("{"):])["num_features"] == 3, out
    code, out = _cli("data", "info", p, "--json", "--one-based")
    assert code == 0 and json.loads(out[out.index("{"):])["num_features"] == 2, out
    reliability.record(SVM_BASE, "warning: " + _short(msgs[0], tmp_path)[:110] + "; "
                       "--zero-based gives D=3, --one-based D=2")


BOM = case("loaders", "UTF-8 byte-order mark at the start of an XC, XC split, svmlight or "
           "ARFF file", "skipped: each loads equal to the file without it (XC still detected "
           "as XC)")


def test_byte_order_mark_skipped(tmp_path: Path, reliability) -> None:
    ds = _problem(5, 6, 3)
    got = []
    for fmt, name in (("xc", "a.txt"), ("xc-split", "b_X_Xf.txt"), ("svmlight", "c.svm")):
        p = tmp_path / name
        save(ds, p, fmt)
        for f in ([p, tmp_path / "b_X_Y.txt"] if fmt == "xc-split" else [p]):
            f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
        back = load(p)  # format inferred: XC must not be taken for svmlight
        assert (back.X != ds.X).nnz == 0 and (back.Y != ds.Y).nnz == 0, fmt
        got.append(fmt)
    arff = tmp_path / "d.arff"
    arff.write_bytes(b"\xef\xbb\xbf@relation 'd: -C 2'\n@attribute y0 {0,1}\n"
                     b"@attribute y1 {0,1}\n@attribute f0 numeric\n@data\n1,0,0.5\n0,1,2\n")
    a = load(arff)
    assert a.Y.toarray().tolist() == [[1, 0], [0, 1]] and a.X.toarray().ravel().tolist() == [
        0.5, 2.0]
    got.append("arff")
    reliability.record(BOM, f"{', '.join(got)}: equal to the file without the mark")


# ------------------------------------------------------------------------------------------------
# 11. allocations driven by the input
# ------------------------------------------------------------------------------------------------
BIG_ID = case("memory bounds", "svmlight feature id 134217728 in training data",
              "xmc train refuses at once (exit 2) naming num_features and the memory it "
              "would need, before building anything")
BIG_CONFIG = case("memory bounds", "model directory whose config.json says num_features "
                  "1e12", "CheckpointError naming the mismatch with the stored shapes, before "
                  "any network is built")


def test_huge_feature_id_refused_before_allocation(tmp_path: Path, reliability) -> None:
    p = tmp_path / "big.svm"
    rows = [f"{i % 8} {1 + i % 5}:1 {10 + i % 7}:0.5" for i in range(40)]
    rows[7] = "1 134217728:1"
    p.write_text("\n".join(rows) + "\n")
    t0 = time.time()
    code, out = _cli("train", "--data", p, "--out", tmp_path / "r", "--no-progress",
                     "--device", "cpu", "--batch-size", "8")
    line = _one_line(out)
    assert code == 2 and "num_features=134217728" in line and "GiB" in line, out
    assert time.time() - t0 < 60
    assert not (tmp_path / "r").exists()
    reliability.record(BIG_ID, f"exit 2 in < 1 min: {line[:150]}")


def test_crafted_model_config_checked_before_building(trained: Path, tmp_path: Path,
                                                      reliability) -> None:
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_features"] = 10**12
    (model / "config.json").write_text(json.dumps(cfg))
    t0 = time.time()
    with pytest.raises(CheckpointError) as ei:
        load_model_dir(model, device="cpu", verify=False)
    assert "num_features=1000000000000" in str(ei.value) and time.time() - t0 < 30
    reliability.record(BIG_CONFIG, describe_error(ei.value)[:160])


# ------------------------------------------------------------------------------------------------
# 12. manifest names outside the checkpoint directory; damaged manifests and pointers
# ------------------------------------------------------------------------------------------------
TRAVERSAL = case("checkpoints", "manifest naming '../../x.safetensors' or an absolute path",
                 "CheckpointError: the name leaves the checkpoint directory; nothing outside "
                 "is read")
BAD_MANIFEST = case("checkpoints", "manifest {\"files\": {}}, manifest version \"x\", a "
                    "binary 'latest'", "CheckpointError (one line each); a binary 'latest' "
                    "falls back to the newest complete checkpoint")


def _one_checkpoint(root: Path) -> Path:
    import torch

    return save_checkpoint(root, {"model": {"w": torch.ones(3)}}, meta={"step": 1}, step=1)


def test_manifest_names_confined(tmp_path: Path, reliability) -> None:
    import torch
    from safetensors.torch import save_file

    outside = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(3)}, str(outside))
    got = []
    for name in ("../../x.safetensors", str(outside)):
        ck = _one_checkpoint(tmp_path / f"ck{len(got)}")
        man = json.loads((ck / "manifest.json").read_text())
        info = man["files"].pop("model.safetensors")
        man["files"][name] = info
        (ck / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(ck, verify=False)
        assert "not a plain file name" in str(ei.value)
        got.append(describe_error(ei.value))
    reliability.record(TRAVERSAL, "'../../x.safetensors' and an absolute path: both "
                       "CheckpointError ('... is not a plain file name inside that directory; "
                       "the directory is corrupt or was crafted')")


def test_damaged_manifest_and_latest(tmp_path: Path, reliability) -> None:
    outs = []
    for i, edit in enumerate(({"files": {}}, {"version": "x"})):
        ck = _one_checkpoint(tmp_path / f"c{i}")
        man = json.loads((ck / "manifest.json").read_text())
        man.update(edit)
        (ck / "manifest.json").write_text(json.dumps(man))
        err = outcome_of(lambda: load_checkpoint(ck))
        assert err.startswith("CheckpointError"), err
        outs.append(err)
    root = tmp_path / "c2"
    _one_checkpoint(root)
    (root / "latest").write_bytes(b"\xff\xfe\x00garbage")
    tensors, meta = load_checkpoint(root)
    assert meta["step"] == 1
    reliability.record(BAD_MANIFEST, " | ".join(_short(o, tmp_path)[:70] for o in outs)
                       + " | binary latest: loads ckpt-00000001")


# ------------------------------------------------------------------------------------------------
# tracebacks instead of one line
# ------------------------------------------------------------------------------------------------
ENOSPC = case("cli", "disk full (ENOSPC) while writing a checkpoint",
              "OutputError naming the disk and the previous checkpoint, which is kept; the CLI "
              "prints one line")
BAD_OUT = case("cli", "--out that is a file, /dev/null or /proc/x (train, predict, export, "
               "data convert into a missing folder)", "one line 'error: ...', exit 2")
MISC_ONE_LINE = case("cli", "--device mps, config \"ks\": [1, \"3\"], \"lr\": null, truncated "
                     "run.json, eval --predictions on a binary file, string label_counts, "
                     "a binary --config or label-names file",
                     "one line 'error: ...' each, exit 2")
SIGINT_EARLY = case("cli", "SIGINT before training starts (while loading data)",
                    "one line 'interrupted (Ctrl-C) ...', exit 130 (not 'Aborted!')")


def test_disk_full_during_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     reliability) -> None:
    import safetensors.torch
    import torch

    root = tmp_path / "ck"
    first = _one_checkpoint(root)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError) as ei:
        save_checkpoint(root, {"model": {"w": torch.ones(3)}}, meta={"step": 2}, step=2)
    msg = str(ei.value)
    assert "disk is full" in msg and first.name in msg, msg
    assert [c.name for c in list_checkpoints(root)] == [first.name]
    assert not list(root.glob(".ckpt-*"))
    reliability.record(ENOSPC, _short(describe_error(ei.value), tmp_path)[:160])


def test_bad_outputs_one_line(trained: Path, data_file: Path, tmp_path: Path,
                              reliability) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        ("train", "--data", data_file, "--out", a_file, *FLAGS),
        ("train", "--data", data_file, "--out", "/dev/null", *FLAGS),
        ("train", "--data", data_file, "--out", "/proc/x", *FLAGS),
        ("predict", "--model", trained, "--data", data_file, "--out", "/proc/x"),
        ("predict", "--model", trained, "--data", data_file, "--out", tmp_path / "p.npy"),
        ("export", "--model", trained, "--what", "labels", "--out", "/proc/x.npy"),
        ("data", "convert", data_file, tmp_path / "missing" / "x.svm"),
    ]
    lines = []
    for args in cases:
        code, out = _cli(*args)
        assert code == 2, (args, out)
        lines.append(_one_line(out))
    assert a_file.read_text() == "x"
    reliability.record(BAD_OUT, f"{len(cases)} cases, each exit 2 and one line, e.g. "
                       + _short(lines[0], tmp_path)[:70] + " | " + lines[3][:80])


def test_misc_errors_one_line(trained: Path, data_file: Path, tmp_path: Path,
                              reliability) -> None:
    c1, c2 = tmp_path / "c1.json", tmp_path / "c2.json"
    c1.write_text('{"ks": [1, "3"]}')
    c2.write_text('{"lr": null}')
    run = tmp_path / "run"
    code, out = _cli("train", "--data", data_file, "--out", run, *FLAGS, "--max-steps", "1")
    assert code == 0, out
    (run / "run.json").write_text((run / "run.json").read_text()[:30])
    binary = tmp_path / "pred.txt"
    binary.write_bytes(b"PK\x03\x04\x00\xff\xfe")
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained, model)
    labels = json.loads((model / "labels.json").read_text())
    labels["label_counts"] = ["a"] * len(labels["label_counts"])
    (model / "labels.json").write_text(json.dumps(labels))
    cases = [
        ("train", "--data", data_file, "--out", tmp_path / "r1", *FLAGS, "--device", "mps"),
        ("train", "--data", data_file, "--out", tmp_path / "r2", "--config", c1),
        ("train", "--data", data_file, "--out", tmp_path / "r3", "--config", c2),
        ("train", "--resume", run),
        ("eval", "--predictions", binary, "--labels", data_file),
        ("eval", "--model", model, "--data", data_file, "--no-verify"),
        ("train", "--data", data_file, "--out", tmp_path / "r4", "--config", binary),
        ("data", "convert", data_file, tmp_path / "o.npz", "--label-xml", binary),
    ]
    lines = []
    for args in cases:
        code, out = _cli(*args)
        assert code == 2, (args, out)
        lines.append(_one_line(out))
    assert "mps" in lines[0] and "'3'" in lines[1] and "lr=null" in lines[2], lines
    assert "run.json" in lines[3] and "pred.txt:1" in lines[4] and "label_counts" in lines[5]
    reliability.record(MISC_ONE_LINE, f"{len(cases)} cases, each exit 2 and one line, e.g. "
                       + lines[1][:80] + " | " + lines[2][:60])


def test_sigint_before_training_one_line(data_file: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, reliability) -> None:
    import xmc_toolkit.data

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(xmc_toolkit.data, "load", interrupted)
    r = CliRunner().invoke(xmc, ["train", "--data", str(data_file), "--out",
                                 str(tmp_path / "r"), *FLAGS])
    assert r.exit_code == 130, r.output
    line = _one_line(r.output)
    assert line.startswith("interrupted (Ctrl-C)") and "Aborted" not in r.output
    reliability.record(SIGINT_EARLY, f"exit 130: {line}")


# ------------------------------------------------------------------------------------------------
# 9. Mulan ARFF without its XML; flags that did nothing, messages that misled
# ------------------------------------------------------------------------------------------------
ARFF_NO_XML = case("loaders", "ARFF with MEKA '-C 2' in @relation, no label XML, binary "
                   "attributes at both ends (a Mulan file without its XML looks so)",
                   "loads MEKA-style (labels first) with a warning naming --label-xml")
FLAGS_DO = case("cli", "data convert --label-xml with a names file of the wrong length; "
                "export --fold-bias for instances; train --data on a split prefix",
                "wrong count: one line, exit 2; instances get a last column of ones; the "
                "split prefix trains (as data info reads it)")
MESSAGES = case("cli", "messages: predict --approx without a saved index, a paused run, "
                "too large --topk, NaN gradient before any checkpoint, 3e38 in test data, "
                "file modes", "each names the real cause and flag; every written file is "
                "0644 (under umask 022)")


def test_arff_without_xml_warns(tmp_path: Path, reliability,
                                caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "m.arff"
    p.write_text("@relation 'm: -C 2'\n@attribute a {0,1}\n@attribute b {0,1}\n"
                 "@attribute c {0,1}\n@attribute d {0,1}\n@data\n1,0,1,1\n0,1,0,1\n")
    with caplog.at_level(logging.WARNING):
        ds = load(p)
    assert ds.num_labels == 2 and ds.num_features == 2
    msg = next(r.getMessage() for r in caplog.records if "--label-xml" in r.getMessage())
    assert "FIRST 2" in msg and "m.xml" in msg, msg
    reliability.record(ARFF_NO_XML, "warning: " + _short(msg, tmp_path)[:150])


def test_flags_that_did_nothing(trained: Path, data_file: Path, tmp_path: Path,
                                reliability) -> None:
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")  # the data has 8 labels
    code, out = _cli("data", "convert", data_file, tmp_path / "o.npz", "--label-xml", names)
    assert code == 2 and "2 label names" in _one_line(out), out
    assert not (tmp_path / "o.npz").exists()
    emb = tmp_path / "q.npy"
    code, out = _cli("export", "--model", trained, "--what", "instances", "--data", data_file,
                     "--out", emb, "--fold-bias")
    assert code == 0, out
    q = np.load(emb)
    assert np.all(q[:, -1] == 1.0)
    ds = load(data_file)
    save(ds, tmp_path / "trn_X_Xf.txt", "xc-split")
    code, out = _cli("train", "--data", tmp_path / "trn", "--out", tmp_path / "split", *FLAGS,
                     "--max-steps", "1")
    assert code == 0, out
    reliability.record(FLAGS_DO, "names: " + _short(_one_line(_cli(
        "data", "convert", data_file, tmp_path / "o.npz", "--label-xml", names)[1]),
        tmp_path)[:80] + f"; instances {q.shape} last column 1; split prefix: exit 0")


def test_messages_name_the_cause(trained: Path, data_file: Path, tmp_path: Path,
                                 reliability) -> None:
    code, out = _cli("predict", "--model", trained, "--data", data_file, "--out",
                     tmp_path / "p.txt", "--approx", "--approx-backend", "midx")
    assert code == 0 and "no MIDX index" in out and "exhaustive" in out, out
    code, out = _cli("predict", "--model", trained, "--data", data_file, "--out",
                     tmp_path / "p.txt", "--topk", "99")
    assert code == 2 and "--topk" in _one_line(out), out
    run = tmp_path / "paused"
    code, out = _cli("train", "--data", data_file, "--out", run, *FLAGS, "--max-steps", "2")
    assert code == 0 and "paused at step 2" in out and f"--resume {run}" in out, out
    old = os.umask(0o022)
    try:
        modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777)
                 for p in run.rglob("*") if p.is_file()}
    finally:
        os.umask(old)
    assert set(modes.values()) == {"0o644"}, modes
    bad = tmp_path / "bad.txt"
    ds = load(data_file)
    ds.X.data[0] = 3e38
    save(ds, bad, "xc")
    code, out = _cli("eval", "--model", trained, "--data", bad)
    line = _one_line(out)
    assert code == 2 and "bad.txt" in line and "row 1" in line and "lr" not in line, out
    from xmc_toolkit.errors import XMCError

    ds = _problem(64, 30, 6)
    cfg = TrainConfig(**dict(SMALL, epochs=1, clip_grad=1.0))
    tr = Trainer(cfg, out_dir=tmp_path / "nan")

    def inf_grad(grad):  # a finite loss with an infinite gradient (the clip-grad check)
        return grad.clone().fill_(float("inf"))

    def poison(event: str, payload: dict) -> None:
        if event == "train_begin":
            for p in tr.network.encoder_parameters():  # type: ignore[union-attr]
                if p.requires_grad:
                    p.register_hook(inf_grad)
                    break

    tr.callbacks.append(poison)
    with pytest.raises(XMCError) as ei:
        tr.fit(ds)
    assert "gradient norm" in str(ei.value), ei.value
    assert "no checkpoint had been written yet" in str(ei.value), ei.value
    reliability.record(MESSAGES, "approx: 'no MIDX index ... exhaustive'; paused: "
                       "'paused at step 2 ... --resume'; 3e38: " + _short(line, tmp_path)[:70]
                       + f"; modes {sorted(set(modes.values()))}")


def test_library_trainer_refuses_earlier_work_unless_force(tmp_path: Path) -> None:
    """The rule lives in the library: Trainer / XMCModel.fit(out_dir=...) apply it too."""
    ds = _problem(64, 30, 6)
    cfg = TrainConfig(**dict(SMALL, epochs=1))
    run = tmp_path / "r"
    Trainer(cfg, out_dir=run).fit(ds)
    before = _snapshot(run)
    with pytest.raises(OutputError, match="--force"):
        Trainer(cfg, out_dir=run).fit(ds)
    assert _snapshot(run) == before
    Trainer(cfg, out_dir=run).fit(ds, force=True)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "run.json").write_text("{}")
    with pytest.raises(OutputError, match="earlier run"):
        Trainer(cfg, out_dir=tmp_path / "killed").fit(ds)


SIGTERM = case("interrupted runs", "SIGTERM (kill, a job scheduler) during `xmc train`",
               "like SIGINT: checkpoint of the current step, one 'SIGTERM: interrupted at step "
               "N' line, exit status 143; --resume finishes the run")


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, reliability) -> None:
    ds = _problem(1200, 60, 12, seed=1)
    trn = tmp_path / "trn.txt"
    save(ds, trn, "xc")
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--data", str(trn),
                          "--out", str(run), "--loss", "full", "--dim", "16", "--hidden", "32",
                          "--epochs", "5", "--batch-size", "8", "--checkpoint-every", "20",
                          "--device", "cpu", "--no-progress", "--ensemble", "1"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    latest = run / "checkpoint" / "latest"
    t0 = time.time()
    while not latest.exists():
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 120, "no checkpoint in time"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.fail("training finished before SIGTERM arrived; make the run longer")
    assert p.returncode == 143, err
    lines = [ln for ln in err.splitlines() if "interrupted at step" in ln]
    assert len(lines) == 1 and lines[0].startswith("SIGTERM: ") and "Traceback" not in err, err
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert latest.read_text().strip() == f"ckpt-{step:08d}"
    code, output = _cli("train", "--resume", run, "--no-progress", "--json")
    assert code == 0, output
    reliability.record(SIGTERM, "exit 143, one line 'SIGTERM: interrupted at step N; checkpoint "
                       "saved ...', latest checkpoint is step N; --resume exits 0")


def test_export_leaves_no_stale_names_sidecar(tmp_path: Path) -> None:
    """Exporting rows without names over an earlier export with names removes its sidecar."""
    from xmc_toolkit.export import export_embeddings, load_embeddings, names_path

    out = tmp_path / "e.safetensors"
    export_embeddings(np.ones((3, 2), np.float32), out, names=["a", "b", "c"])
    assert load_embeddings(out).names == ["a", "b", "c"]
    export_embeddings(np.zeros((3, 2), np.float32), out)
    assert not names_path(out).exists() and load_embeddings(out).names is None


def test_eval_predictions_with_a_huge_label_id(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A label id of 2^31+5 in a headerless file: the metrics follow the data, not L
    (no 16 GiB per-label array), and equal those of the compactly numbered labels."""
    import xmc_toolkit.metrics as metrics

    real = metrics.inverse_propensity

    def bounded(Y, *a, **k):  # the per-label arrays are [L]: L must follow the data
        assert Y.shape[1] < 1000, f"per-label arrays of L={Y.shape[1]}"
        return real(Y, *a, **k)

    monkeypatch.setattr(metrics, "inverse_propensity", bounded)
    ids = [[0, 1], [1, 2], [2, 0], [0, 2]]
    labels = [[0], [1, 2147483653], [2], [0, 2147483653]]
    compact = [[0], [1, 3], [2], [0, 3]]
    pred = tmp_path / "p.txt"
    pred.write_text("".join(" ".join(f"{i}:{1 - 0.1 * j}" for j, i in enumerate(r)) + "\n"
                            for r in ids))
    results = []
    for name, labs in (("big.svm", labels), ("small.svm", compact)):
        f = tmp_path / name
        f.write_text("".join(",".join(map(str, r)) + " 0:1\n" for r in labs))
        code, out = _cli("eval", "--predictions", pred, "--labels", f, "--k", "2", "--json")
        assert code == 0, out
        results.append(json.loads(out[out.index("{"):]))
    assert results[0] == pytest.approx(results[1])
