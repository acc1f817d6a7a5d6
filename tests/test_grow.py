"""Growing a trained model's label set: the init math against a slow reference, label matching,
grown optimizer / MIDX state, ``xmc labels add`` / ``xmc train --init-from``, the Python API,
and bad input (one-line error, exit 2, parent model byte-identical)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner
from conftest import make_tiny_problem

from cli.main import xmc
from xmc_toolkit import grow
from xmc_toolkit.data import XMCDataset, load, save
from xmc_toolkit.errors import ConfigError, LabelSetError, XMCError
from xmc_toolkit.model import XMCModel
from xmc_toolkit.train import TrainConfig, Trainer, load_model_dir

TINY = dict(epochs=6, batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=5, dropout=0.0,
            ks=(1, 3), device="cpu", ensemble=1)
FLAGS = ["--batch-size", "16", "--lr", "0.02", "--warmup-steps", "2", "--ks", "1,3",
         "--device", "cpu", "--no-progress"]
NAMES = [f"tag{j}" for j in range(6)]


# ------------------------------------------------------------------------------------------------
# the init math
# ------------------------------------------------------------------------------------------------


def _line(x, y):
    b, a = np.polyfit(x, y, 1)
    return a, b


def reference_rows(Q, Yn, W, b, Yo, direction, calibration, shrink=0.1, ratio=10.0):
    """Label by label, from explicit projections (no covariance shortcut for the spreads)."""
    Q, W, b = (np.asarray(a, np.float64) for a in (Q, W, b))
    Yn, Yo = np.asarray(Yn.todense()) > 0, np.asarray(Yo.todense()) > 0
    N, d = Q.shape
    qbar = Q.mean(0)
    C = (Q - qbar).T @ (Q - qbar) / N
    med = np.median(np.linalg.norm(W, axis=1))
    lc, t_all, t_pos, lsd = [], [], [], []
    for l in range(W.shape[0]):
        pos = Yo[:, l]
        if not pos.any():
            continue
        s = Q @ W[l] + b[l]
        lc.append(np.log(pos.sum()))
        t_all.append(s.mean())
        t_pos.append(s[pos].mean())
        lsd.append(np.log((Q @ W[l]).std()))
    a2, b2 = _line(lc, t_all)
    rows, biases = [], []
    for j in range(Yn.shape[1]):
        pos = Yn[:, j]
        n = pos.sum()
        mu = Q[pos].mean(0)
        v = {"mean": mu, "centered": mu - qbar,
             "lda": np.linalg.solve(C + shrink * np.trace(C) / d * np.eye(d), mu - qbar)
             }[direction]
        u = v / np.linalg.norm(v)
        proj = Q @ u
        if calibration == "spread":
            a1, b1 = _line(lc, lsd)
            gap, denom = np.exp(a1 + b1 * np.log(n)), proj.std()
        else:
            a1, b1 = _line(lc, t_pos)
            gap = (a1 + b1 * np.log(n)) - (a2 + b2 * np.log(n))
            denom = proj[pos].mean() - proj.mean()
        s = gap / denom if gap > 0 and denom > 0 else med  # no positive fit: the median norm
        s = float(np.clip(s, med / ratio, med * ratio))
        rows.append(s * u)
        biases.append(a2 + b2 * np.log(n) - s * proj.mean())
    return np.array(rows), np.array(biases)


@pytest.mark.parametrize("direction,calibration", [("lda", "spread"), ("mean", "moments"),
                                                   ("centered", "spread")])
def test_new_label_rows_match_slow_reference(direction, calibration):
    g = np.random.default_rng(3)
    N, d, L, n = 300, 8, 7, 4  # odd L: torch's median is the lower one, numpy's the mean
    Q = g.normal(size=(N, d)) + 0.3
    Yo = sp.csr_matrix((g.random((N, L)) < np.linspace(0.05, 0.4, L)).astype(np.float32))
    Yn = sp.csr_matrix((g.random((N, n)) < np.linspace(0.05, 0.3, n)).astype(np.float32))
    W = g.normal(size=(L, d)) * 0.5
    b = g.normal(size=L)
    got = grow.new_label_rows(torch.tensor(Q, dtype=torch.float32), Yn,
                              torch.tensor(W, dtype=torch.float32),
                              torch.tensor(b, dtype=torch.float32), Yo,
                              direction=direction, calibration=calibration)
    ref_w, ref_b = reference_rows(Q.astype(np.float32), Yn, W.astype(np.float32),
                                  b.astype(np.float32), Yo, direction, calibration)
    np.testing.assert_allclose(got.weight.numpy(), ref_w, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got.bias.numpy(), ref_b, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(got.counts, np.asarray(Yn.sum(0)).ravel())
    assert got.stats["calibration"] == calibration and got.stats["old_labels_used"] == L


def test_new_label_rows_members_calibrates_each_member_on_its_own():
    """Block i of a per-member row is new_label_rows on member i's queries (n x its slice of
    the ensemble query) and old blocks; the bias is the members' mean, so the ensemble score
    (mean of the member scores) is the mean of calibrated member scores."""
    g = np.random.default_rng(5)
    N, d, n_mem, L, n = 400, 6, 3, 9, 4
    Qm = [g.normal(size=(N, d)) + 0.2 * i for i in range(n_mem)]  # member queries
    Q = torch.tensor(np.concatenate(Qm, 1) / n_mem, dtype=torch.float32)  # [N, n * d]
    Yo = sp.csr_matrix((g.random((N, L)) < np.linspace(0.05, 0.4, L)).astype(np.float32))
    Yn = sp.csr_matrix((g.random((N, n)) < np.linspace(0.05, 0.3, n)).astype(np.float32))
    W = torch.tensor(g.normal(size=(L, n_mem * d)) * 0.5, dtype=torch.float32)
    b = torch.tensor(g.normal(size=L), dtype=torch.float32)
    got = grow.new_label_rows_members(Q, Yn, W, b, Yo, members=n_mem)
    assert got.weight.shape == (n, n_mem * d) and got.stats["members"] == n_mem
    biases = []
    for i in range(n_mem):
        one = grow.new_label_rows(torch.tensor(Qm[i], dtype=torch.float32), Yn,
                                  W[:, i * d:(i + 1) * d], b, Yo)
        np.testing.assert_allclose(got.weight[:, i * d:(i + 1) * d].numpy(), one.weight.numpy(),
                                   rtol=1e-4, atol=1e-5)
        biases.append(one.bias.numpy())
    np.testing.assert_allclose(got.bias.numpy(), np.mean(biases, 0), rtol=1e-4, atol=1e-5)
    # each member's new scores spread like its old ones (the calibration), unlike the rows
    # calibrated on the ensemble query, whose member blocks are not calibrated at all
    whole = grow.new_label_rows(Q, Yn, W, b, Yo)
    assert not torch.allclose(whole.weight, got.weight, atol=1e-3)
    one = grow.new_label_rows_members(Q, Yn, W, b, Yo, members=1)
    np.testing.assert_array_equal(one.weight.numpy(), whole.weight.numpy())
    with pytest.raises(ConfigError, match="multiple"):
        grow.new_label_rows_members(Q[:, :-1], Yn, W[:, :-1], b, Yo, members=n_mem)


def test_ensemble_parent_fine_tune_starts_from_per_member_rows(tmp_path):
    """A 2-member parent: --init-from (train_from) starts from the per-member rows (recorded in
    the lineage); labels add keeps the rows fitted on the ensemble query (the served score)."""
    from xmc_toolkit.encoder import encode_csr

    X, Y = make_tiny_problem(200, seed=4)
    keep = np.flatnonzero(np.asarray(Y[:, :4].sum(1)).ravel() > 0)
    Trainer(TrainConfig(**{**TINY, "ensemble": 2, "epochs": 2}), out_dir=tmp_path / "p").fit(
        XMCDataset(X[keep], Y[keep][:, :4]))
    parent = load_model_dir(tmp_path / "p", device="cpu")
    assert parent.network.members == 2
    g = grow.add_labels_dir(tmp_path / "p", XMCDataset(X, Y), tmp_path / "a")
    assert "members" not in grow.read_lineage(tmp_path / "a")[0]["init"]
    seen = []
    _, g_ft, _ = grow.train_from(tmp_path / "p", XMCDataset(X, Y), tmp_path / "f",
                                 {"epochs": 1},
                                 on_trainer=lambda tr: seen.append(tr))
    assert grow.read_lineage(tmp_path / "f")[0]["init"]["members"] == 2 and seen
    q = encode_csr(parent.network.encoder, parent.preprocessor.transform(X), batch_size=512)
    Yc = sp.csc_matrix(Y)
    want = grow.new_label_rows_members(q, Yc[:, 4:], parent.network.label_weight,
                                       parent.network.label_bias, Yc[:, :4], members=2,
                                       old_counts=np.asarray(parent.label_counts))
    np.testing.assert_allclose(g_ft.rows.weight.numpy(), want.weight.numpy(), rtol=1e-4,
                               atol=1e-6)
    flat = grow.prepare_growth(parent, XMCDataset(X, Y))
    W = load_model_dir(tmp_path / "a", device="cpu").network.label_weight.detach()
    np.testing.assert_allclose(W[4:].numpy(), flat.rows.weight.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.rows.weight.numpy(), flat.rows.weight.numpy(), rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(flat.rows.weight.numpy(), want.weight.numpy(), atol=1e-3)


def test_new_label_rows_fallbacks_and_errors():
    g = np.random.default_rng(0)
    Q = torch.tensor(g.normal(size=(50, 4)), dtype=torch.float32)
    Yn = sp.csr_matrix(np.c_[np.r_[np.ones(5), np.zeros(45)], np.zeros(50)].astype(np.float32))
    W = torch.tensor(g.normal(size=(3, 4)), dtype=torch.float32)
    b = torch.tensor([0.5, -1.0, 2.0])
    r = grow.new_label_rows(Q, Yn, W, b)  # no old positives: the median norm and bias
    assert r.stats["calibration"] == "norm"
    med = float(W.norm(dim=1).median())
    assert float(r.weight[0].norm()) == pytest.approx(med, rel=1e-5)
    assert float(r.bias[0]) == pytest.approx(0.5)
    assert float(r.weight[1].abs().sum()) == 0 and float(r.bias[1]) == pytest.approx(-1.0)
    assert r.stats["without_positives"] == 1
    r = grow.new_label_rows(Q, Yn, W, None, old_counts=np.array([1, 2, 3]))
    assert r.bias is None
    with pytest.raises(ConfigError, match="direction"):
        grow.new_label_rows(Q, Yn, W, b, direction="up")
    with pytest.raises(ConfigError, match="rows"):
        grow.new_label_rows(Q[:10], Yn, W, b)


# ------------------------------------------------------------------------------------------------
# label matching, optimizer and MIDX state
# ------------------------------------------------------------------------------------------------


def test_match_labels_by_name_and_id():
    m = grow.match_labels(["a", "b", "c"], 3, ["c", "x", "a", "y"], 4)
    assert m.by == "name" and m.num_new == 2 and m.names == ["a", "b", "c", "x", "y"]
    np.testing.assert_array_equal(m.column_ids, [2, 3, 0, 4])
    m = grow.match_labels(None, 3, None, 5)
    assert m.by == "id" and m.num_new == 2 and m.names is None
    m = grow.match_labels(None, 3, list("pqrst"), 5)
    assert m.by == "id" and m.names == list("pqrst")
    with pytest.raises(LabelSetError, match="collide.*'x'"):
        grow.match_labels(["a"], 1, ["x", "a", "x"], 3)
    with pytest.raises(LabelSetError, match="--label-names"):
        grow.match_labels(["a", "b"], 2, None, 3)
    Y = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32))
    R = grow.remap_labels(Y, np.array([2, 3, 0, 4]), 5)
    np.testing.assert_array_equal(R.toarray(), [[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]])


def test_grow_optimizer_state_pads_label_moments_only():
    st = {"opt.labels": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3, 2),
                                       "exp_avg_sq": torch.ones(3, 2)},
                                   1: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3, 1),
                                       "exp_avg_sq": torch.ones(3, 1)}},
                         "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
          "opt.encoder": {"state": {0: {"exp_avg": torch.ones(3, 3)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
          "sched.labels": {"last_epoch": 5}}
    out = grow.grow_optimizer_state(st, 3, 2)
    assert set(out) == {"opt.labels", "opt.encoder"}  # the schedule starts over
    ea = out["opt.labels"]["state"][0]["exp_avg"]
    assert ea.shape == (5, 2) and float(ea[:3].sum()) == 6 and float(ea[3:].abs().sum()) == 0
    sq = out["opt.labels"]["state"][1]["exp_avg_sq"]
    assert sq.shape == (5, 1) and float(sq[3:].sum()) == 2  # new rows: the old rows' mean
    assert out["opt.encoder"]["state"][0]["exp_avg"].shape == (3, 3)  # D == L_old: untouched
    assert st["opt.labels"]["state"][0]["exp_avg"].shape == (3, 2)  # input not modified


def test_grow_sampler_state_keeps_old_codes_and_assigns_new_rows():
    from xmc_toolkit.codebook import assign_nearest
    from xmc_toolkit.sampling import MIDXSampler

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 8, generator=g)
    s = MIDXSampler(64, num_codewords=4, seed=0)
    s.update(W)
    state = s.state_dict()
    W2 = torch.cat([W, torch.randn(6, 8, generator=g)])
    cfg = TrainConfig(loss="sampled", sampler="midx", codewords=4)
    grown = grow.grow_sampler_state(state, cfg, W2, None, np.ones(70), refresh=False)
    assert grown["codes"].shape == (70, 2) and int(grown["num_labels"]) == 70
    torch.testing.assert_close(grown["codes"][:64], state["codes"])
    k1, _ = assign_nearest(W2[64:, :4].contiguous(), state["codebook1"])
    torch.testing.assert_close(grown["codes"][64:, 0], k1)
    s2 = MIDXSampler(70, num_codewords=4, seed=0)
    s2.load_state_dict(grown)
    smp = s2.sample(torch.randn(3, 8), 5)
    assert smp.ids.shape == (3, 5) and int(smp.ids.max()) < 70
    refreshed = grow.grow_sampler_state(state, cfg, W2, None, np.ones(70), refresh=True)
    assert refreshed["codes"].shape == (70, 2)


# ------------------------------------------------------------------------------------------------
# model directories and the CLI
# ------------------------------------------------------------------------------------------------


def _tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A parent trained (CLI) on labels 0-3 of the tiny problem; files with all 6 labels."""
    root = tmp_path_factory.mktemp("grow")
    X, Y = make_tiny_problem(200, seed=4)
    old = Y[:, :4]
    keep = np.flatnonzero(np.asarray(old.sum(1)).ravel() > 0)
    save(XMCDataset(X[keep], old[keep]), root / "parent_train.txt")
    (root / "parent_names.txt").write_text("\n".join(NAMES[:4]) + "\n")
    save(XMCDataset(X[:160], Y[:160]), root / "train.txt")
    save(XMCDataset(X[160:], Y[160:]), root / "test.txt")
    # the data's labels in another order: names decide, not ids
    order = [5, 0, 4, 1, 2, 3]
    save(XMCDataset(X[:160], Y[:160][:, order]), root / "train_shuffled.txt")
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    (root / "names_shuffled.txt").write_text("\n".join(NAMES[i] for i in order) + "\n")
    (root / "names_dup.txt").write_text("\n".join(["tag0", "tag1", "tag9", "tag9", "tag2",
                                                   "tag3"]) + "\n")
    Xw = sp.hstack([X[:160], sp.csr_matrix(np.ones((160, 2), np.float32))]).tocsr()
    save(XMCDataset(Xw, Y[:160]), root / "train_wide.txt")
    r = CliRunner().invoke(xmc, ["train", "--data", str(root / "parent_train.txt"),
                                 "--label-names", str(root / "parent_names.txt"),
                                 "--out", str(root / "parent"), "--epochs", "8", "--hidden",
                                 "32", "--dim", "16", "--dropout", "0", "--ensemble", "1",
                                 *FLAGS])
    assert r.exit_code == 0, r.output
    return root


def _p_at_1_new(model_dir: Path, root: Path) -> float:
    """P@1 among the new labels tag4/tag5 on the test rows that have one."""
    m = XMCModel.load(model_dir, device="cpu")
    test = load(root / "test.txt", label_names_from=root / "names.txt")
    ids = [m.label_names.index(n) for n in ("tag4", "tag5")]
    rows = np.flatnonzero(np.asarray(test.Y[:, 4:].sum(1)).ravel() > 0)
    q = m.encode(test.X[rows])
    s = q @ m.label_embeddings()[ids].T + m.label_bias()[ids]
    truth = test.Y[rows][:, 4:].toarray()
    return float(truth[np.arange(len(rows)), s.argmax(1)].mean())


def test_labels_add_cli(world, tmp_path):
    before = _tree_hashes(world / "parent")
    out = tmp_path / "added"
    r = CliRunner().invoke(xmc, ["labels", "add", "--model", str(world / "parent"), "--data",
                                 str(world / "train_shuffled.txt"), "--label-names",
                                 str(world / "names_shuffled.txt"), "--out", str(out),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "added 2 labels (matched by name; 'tag5'" not in r.output  # names are plain
    assert "added 2 labels (matched by name; tag5, tag4)" in r.output
    assert _tree_hashes(world / "parent") == before
    m = load_model_dir(out, device="cpu")
    parent = load_model_dir(world / "parent", device="cpu")
    assert m.num_labels == 6 and m.label_names == NAMES[:4] + ["tag5", "tag4"]
    torch.testing.assert_close(m.network.label_weight[:4], parent.network.label_weight)
    sd, psd = m.network.encoder.state_dict(), parent.network.encoder.state_dict()
    assert all(torch.equal(sd[k], psd[k]) for k in psd)
    np.testing.assert_array_equal(m.preprocessor.idf, parent.preprocessor.idf)
    lin = grow.read_lineage(out)
    assert len(lin) == 1 and lin[0]["mode"] == "labels add" and lin[0]["labels_added"] == 2
    assert lin[0]["added"] == ["tag5", "tag4"] and lin[0]["matched_by"] == "name"
    assert lin[0]["parent"] == str((world / "parent").resolve())
    assert lin[0]["parent_model_sha256"] == before["model.safetensors"]
    assert _p_at_1_new(out, world) > 0.8  # servable at once: the new rows point the right way
    # eval in the grown label space, by ids of the grown model
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data",
                                 str(world / "test.txt"), "--k", "1", "--json"])
    assert r.exit_code == 0, r.output


def test_train_init_from_cli(world, tmp_path):
    before = _tree_hashes(world / "parent")
    out = tmp_path / "ft"
    r = CliRunner().invoke(xmc, ["train", "--init-from", str(world / "parent"), "--data",
                                 str(world / "train.txt"), "--label-names",
                                 str(world / "names.txt"), "--val", str(world / "test.txt"),
                                 "--out", str(out), "--epochs", "2", *FLAGS])
    assert r.exit_code == 0, r.output
    assert "4 labels + 2 new (matched by name) = 6" in r.output
    assert _tree_hashes(world / "parent") == before
    m = load_model_dir(out, device="cpu")
    assert m.num_labels == 6 and m.label_names == NAMES
    assert m.config.dim == 16 and m.config.hidden == (32,) and m.config.epochs == 2
    lin = grow.read_lineage(out)[-1]
    assert lin["mode"] == "train --init-from" and lin["fine_tune_epochs"] == 2
    assert "kept for: encoder, labels" in lin["optimizer_state"], lin["optimizer_state"]
    assert len(json.loads((out / "summary.json").read_text())["history"]) == 2
    assert _p_at_1_new(out, world) > 0.8
    # a grandchild: the lineage chains; by id (no names on either side is not possible here:
    # the parent has names), so grow again with one more named label
    r = CliRunner().invoke(xmc, ["train", "--init-from", str(out), "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output)["epochs"] == grow.FINE_TUNE_EPOCHS


def test_train_init_from_honours_the_id_base_flag(world, tmp_path, monkeypatch):
    """--zero-based/--one-based reaches the loader on the --init-from path too."""
    import xmc_toolkit.data as data_mod

    seen = []
    real = data_mod.load

    def spy(*a, **k):
        seen.append(k.get("zero_based"))
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "load", spy)
    r = CliRunner().invoke(xmc, ["train", "--init-from", str(world / "parent"), "--data",
                                 str(world / "train.txt"), "--label-names",
                                 str(world / "names.txt"), "--out", str(tmp_path / "z"),
                                 "--epochs", "1", "--zero-based", *FLAGS])
    assert r.exit_code == 0, r.output
    assert seen and all(v is True for v in seen), seen


def test_labels_add_honours_the_id_base_flag(world, tmp_path, monkeypatch):
    """``xmc labels add`` takes --zero-based/--one-based (the shared option) to the loader."""
    import xmc_toolkit.data as data_mod

    seen = []
    real = data_mod.load

    def spy(*a, **k):
        seen.append(k.get("zero_based"))
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "load", spy)
    base = ["labels", "add", "--model", str(world / "parent"), "--data",
            str(world / "train.txt"), "--label-names", str(world / "names.txt")]
    for flag, want in (("--zero-based", True), ("--one-based", False), (None, "auto")):
        seen.clear()
        out = tmp_path / f"a{want}"
        r = CliRunner().invoke(xmc, base + ["--out", str(out)] + ([flag] if flag else []))
        assert r.exit_code == 0, r.output  # XC text: its header fixes the base either way
        assert seen and all(v == want for v in seen), (flag, seen)


def test_train_init_from_with_config_file(world, tmp_path):
    """--config with --init-from: the file's fields over the parent's config, flags over the
    file, fine-tune defaults for the rest; network fields that differ: one line, exit 2."""
    runner = CliRunner()
    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"epochs": 1, "lr": 0.005, "weight_decay": 0.0}))
    base = ["train", "--init-from", str(world / "parent"), "--data", str(world / "train.txt"),
            "--label-names", str(world / "names.txt"), "--config", str(cfg)]
    r = runner.invoke(xmc, base + ["--print-config", "--lr", "0.007"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output)
    assert (printed["epochs"], printed["lr"], printed["weight_decay"]) == (1, 0.007, 0.0)
    assert printed["dim"] == 16  # the parent's
    r = runner.invoke(xmc, base + ["--out", str(tmp_path / "c"), "--no-progress",
                                   "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = load_model_dir(tmp_path / "c", device="cpu")
    assert (m.config.epochs, m.config.lr, m.config.weight_decay) == (1, 0.005, 0.0)
    assert m.num_labels == 6
    # a file printed by --init-from --print-config round-trips (its network fields are the
    # parent's)
    full = tmp_path / "full.json"
    full.write_text(runner.invoke(xmc, ["train", "--init-from", str(world / "parent"),
                                        "--print-config"]).output)
    r = runner.invoke(xmc, ["train", "--init-from", str(world / "parent"), "--config",
                            str(full), "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output) == json.loads(full.read_text()), r.output
    for bad, expect in (({"dim": 32}, "dim=32 (the parent has 16)"),
                        ({"epoch": 1}, "unknown key 'epoch'"),
                        ({"featurizer": {"ngram_range": [1, 2]}},
                         "keeps its parent's featurizer")):
        cfg.write_text(json.dumps(bad))
        r = runner.invoke(xmc, base + ["--out", str(tmp_path / "bad")])
        lines = [x for x in r.output.strip().splitlines() if x]
        assert r.exit_code == 2 and len(lines) == 1 and expect in lines[0], r.output
        assert not (tmp_path / "bad").exists()


def test_init_from_by_id_and_resume(tmp_path):
    X, Y = make_tiny_problem(120, seed=2)
    save(XMCDataset(X, Y[:, :4]), tmp_path / "p.txt")
    save(XMCDataset(X, Y), tmp_path / "all.txt")
    runner = CliRunner()
    r = runner.invoke(xmc, ["train", "--data", str(tmp_path / "p.txt"), "--out",
                            str(tmp_path / "p"), "--epochs", "3", "--hidden", "32", "--dim",
                            "8", "--ensemble", "1", *FLAGS])
    assert r.exit_code == 0, r.output
    r = runner.invoke(xmc, ["train", "--init-from", str(tmp_path / "p"), "--data",
                            str(tmp_path / "all.txt"), "--out", str(tmp_path / "c"),
                            "--epochs", "2", "--max-steps", "9", *FLAGS])
    assert r.exit_code == 0, r.output
    r = runner.invoke(xmc, ["train", "--resume", str(tmp_path / "c"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "4 labels + 2 new (matched by id) = 6" in r.output
    m = load_model_dir(tmp_path / "c", device="cpu")
    assert m.num_labels == 6 and m.label_names is None
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["steps"] == 16


@pytest.mark.parametrize("case", ["not_a_model", "features", "collide", "out_is_parent",
                                  "frozen", "nothing_new"])
def test_bad_input_one_line_exit_2_parent_untouched(world, tmp_path, case):
    parent = world / "parent"
    before = _tree_hashes(parent)
    out = tmp_path / "out"
    data, names = world / "train.txt", world / "names.txt"
    model = parent
    extra: list[str] = []
    if case == "not_a_model":
        model = world  # a folder, but no model
    elif case == "features":
        data = world / "train_wide.txt"
    elif case == "collide":
        names = world / "names_dup.txt"
    elif case == "out_is_parent":
        out = parent
    elif case == "nothing_new":
        data, names = world / "parent_train.txt", world / "parent_names.txt"
    runner = CliRunner()
    commands = [["labels", "add", "--model", str(model), "--data", str(data),
                 "--label-names", str(names), "--out", str(out)],
                ["train", "--init-from", str(model), "--data", str(data), "--label-names",
                 str(names), "--out", str(out), "--epochs", "1", *FLAGS]]
    if case == "frozen":
        commands = [commands[1] + ["--dim", "32"]]
    if case == "nothing_new":
        commands = commands[:1]  # fine-tuning on the old labels only is allowed
    expect = {"not_a_model": "is not a model directory", "features": "has 22 features",
              "collide": "label names collide", "out_is_parent": "parent is never modified",
              "frozen": "keeps its parent's network", "nothing_new": "nothing to add"}[case]
    for cmd in commands:
        r = runner.invoke(xmc, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        lines = [x for x in r.output.strip().splitlines() if x]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], \
            r.output
        assert not (out / "model.safetensors").exists() or out == parent
        assert _tree_hashes(parent) == before
    if case == "features":  # the documented way out
        r = runner.invoke(xmc, commands[0] + ["--ignore-extra"])
        assert r.exit_code == 0, r.output


def test_sampled_midx_parent_grows_its_index(tmp_path):
    X, Y = make_tiny_problem(160, seed=5)
    cfg = TrainConfig(**{**TINY, "loss": "sampled", "sampler": "midx", "negatives": 3,
                         "codewords": 2})
    Trainer(cfg, out_dir=tmp_path / "p").fit(XMCDataset(X, Y[:, :4]))
    parent = load_model_dir(tmp_path / "p", device="cpu")
    assert parent.sampler_state is not None
    g = grow.add_labels_dir(tmp_path / "p", XMCDataset(X, Y), tmp_path / "a")
    child = load_model_dir(tmp_path / "a", device="cpu")
    assert child.sampler_state["codes"].shape == (6, 2)
    assert grow.read_lineage(tmp_path / "a")[0]["midx_index"].startswith("parent codebooks")
    res, g2, trainer = grow.train_from(tmp_path / "p", XMCDataset(X, Y), tmp_path / "b",
                                       {"epochs": 1})
    assert trainer.sampler.num_labels == 6 and res.steps > 0
    assert trainer.config.codewords == 2
    assert g.match.num_new == 2 and g2.match.num_new == 2


# ------------------------------------------------------------------------------------------------
# the Python API
# ------------------------------------------------------------------------------------------------


def test_xmcmodel_add_labels(tmp_path):
    X, Y = make_tiny_problem(200, seed=4)
    keep = np.flatnonzero(np.asarray(Y[:, :4].sum(1)).ravel() > 0)
    model = XMCModel(**TINY).fit(X[keep], Y[keep][:, :4], label_names=NAMES[:4])
    W0 = model.label_embeddings().copy()
    model.add_labels(X, Y, names=["tag4", "tag5"])
    assert model.label_names == NAMES and model.label_embeddings().shape[0] == 6
    np.testing.assert_array_equal(model.label_embeddings()[:4], W0)
    ids, _ = model.predict_topk(X[:5], k=2)
    assert ids.max() < 6
    model.save(tmp_path / "m")
    assert grow.read_lineage(tmp_path / "m")[-1]["labels_added"] == 2
    with pytest.raises(LabelSetError, match="collide|already"):
        XMCModel.load(tmp_path / "m").add_labels(X, sp.hstack([Y, Y[:, :1]]).tocsr(),
                                                 names=["tag1"])
    with pytest.raises(LabelSetError, match="names"):
        XMCModel.load(tmp_path / "m").add_labels(X, sp.hstack([Y, Y[:, :1]]).tocsr())
    with pytest.raises(LabelSetError, match="no new"):
        XMCModel.load(tmp_path / "m").add_labels(X, Y[:, :6])
    m2 = XMCModel.load(tmp_path / "m").add_labels(X, sp.hstack([Y, Y[:, :1]]).tocsr(),
                                                  names=["tag0-copy"], fine_tune_epochs=1)
    assert m2.label_embeddings().shape[0] == 7 and m2.result is not None
    with pytest.raises(XMCError, match="feature columns"):
        XMCModel.load(tmp_path / "m").add_labels(X[:, :5], Y)


def test_bibtex_labels_add_by_name(shared_data, tmp_path):
    """Real data: a small parent on half of Bibtex's labels, the rest added by name."""
    d = shared_data / "xc"
    if not (d / "bibtex_labels.xml").exists():
        pytest.skip("bibtex files absent")
    tr = load(d / "bibtex_train.txt", label_names_from=d / "bibtex_labels.xml")
    half = np.arange(0, tr.num_labels, 2)
    keep = np.flatnonzero(np.asarray(tr.Y[:, half].sum(1)).ravel() > 0)
    parent = XMCDataset(tr.X[keep], tr.Y[keep][:, half], [tr.label_names[i] for i in half])
    Trainer(TrainConfig(**{**TINY, "epochs": 2, "batch_size": 128, "lr": 1e-3}),
            out_dir=tmp_path / "p").fit(parent)
    g = grow.add_labels_dir(tmp_path / "p", tr, tmp_path / "a")
    assert g.match.by == "name" and g.match.num_new == tr.num_labels - len(half)
    assert g.rows.stats["old_labels_used"] == len(half)


def test_child_config_fine_tune_defaults():
    parent = TrainConfig(lr=2e-3, warmup_steps=100, batch_size=100, epochs=20, ensemble=3,
                         label_lr=1e-2)
    c = grow.child_config(parent, {"device": None}, num_points=1000)
    assert c.epochs == grow.FINE_TUNE_EPOCHS and c.ensemble == 3
    assert c.lr == pytest.approx(2e-3 * grow.FINE_TUNE_LR_SCALE)
    assert c.label_lr == pytest.approx(1e-2 * grow.FINE_TUNE_LR_SCALE) and c.bag_lr == 0
    assert c.warmup_steps == 2  # 10 % of 2 epochs x 10 steps
    c = grow.child_config(parent, {"lr": 5e-4, "epochs": 3, "warmup_steps": 7, "ensemble": 3})
    assert (c.lr, c.epochs, c.warmup_steps, c.label_lr) == (5e-4, 3, 7, 1e-2)
    with pytest.raises(ConfigError, match="ensemble=1.*--ensemble"):
        grow.child_config(parent, {"ensemble": 1})
    with pytest.raises(ConfigError, match="dropout 0 and > 0"):
        grow.child_config(TrainConfig(dropout=0.75), {"dropout": 0.0})
    assert grow.child_config(TrainConfig(dropout=0.75), {"dropout": 0.01}).dropout == 0.01
    state = {"num_codewords": torch.tensor(8)}
    assert grow.child_config(parent, {}, sampler_state=state).codewords == 8


def test_remap_validation_follows_the_training_columns():
    m = grow.match_labels(["a", "b"], 2, ["x", "b", "a"], 3)  # x new -> id 2
    Y = sp.csr_matrix(np.array([[1, 0, 1]], np.float32))
    X = sp.csr_matrix(np.ones((1, 4), np.float32))
    named = grow.remap_validation(XMCDataset(X, Y[:, [2, 0, 1]], ["a", "x", "b"]), m, 4)
    unnamed = grow.remap_validation(XMCDataset(X, Y), m, 4)  # columns as in the training data
    np.testing.assert_array_equal(named.Y.toarray(), [[1, 0, 1]])
    np.testing.assert_array_equal(unnamed.Y.toarray(), [[1, 0, 1]])
    with pytest.raises(LabelSetError, match="neither"):
        grow.remap_validation(XMCDataset(X, Y, ["a", "b", "zz"]), m, 4)
