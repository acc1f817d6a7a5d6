"""Trainer contract tests: every loss x sampler learns the tiny problem; config validation;
sparse label gradients on the sampled path; NaN handling; schedule and clipping references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit.data.dataset import XMCDataset
from xmc_toolkit.errors import ConfigError, XMCError
from xmc_toolkit.metrics import inverse_propensity
from xmc_toolkit.optim import build_optimizers, lr_multiplier
from xmc_toolkit.train import (TrainConfig, Trainer, XMCNetwork, _clip_grad_norm, compute_loss,
                               inverse_propensity_from_counts)

TINY = dict(epochs=12, batch_size=16, hidden=(32,), dim=16, lr=0.03, warmup_steps=5,
            dropout=0.0, ks=(1, 3), device="cpu", seed=0, ensemble=1)

COMBOS = [
    dict(loss="full"),
    dict(loss="sampled", sampler="uniform", negatives=3),
    dict(loss="sampled", sampler="popularity", negatives=3),
    dict(loss="sampled", sampler="log-uniform", negatives=3),
    dict(loss="sampled", sampler="midx", negatives=3, refresh_every=10),
    dict(loss="sampled", sampler="midx", quantizer="rq", within_cell="popularity", negatives=3,
         shared_negatives=True, refresh_every=10),
    dict(loss="negative-sampling", sampler="uniform", negatives=3),
    dict(loss="negative-sampling", sampler="midx", negatives=3, label_optimizer="adagrad"),
]


def _popularity_p1(Y: sp.csr_matrix) -> float:
    """P@1 of always predicting the most frequent label (the popularity baseline)."""
    top = int(np.argmax(np.asarray(Y.sum(0)).ravel()))
    return float(np.asarray(Y[:, top].todense()).mean())


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_contract_every_loss_and_sampler_learns(tiny_xy, combo):
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    events: list[str] = []
    trainer = Trainer(TrainConfig(**{**TINY, **combo}),
                      callbacks=[lambda ev, st_: events.append(ev)])
    res = trainer.fit(ds, ds)
    losses = [h["loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0]  # loss decreases
    assert res.best["P@1"] > _popularity_p1(Y) + 0.15  # well above the popularity baseline
    assert events[0] == "train_begin" and events[-1] == "train_end"
    assert events.count("epoch_end") == TINY["epochs"]
    assert res.loss == combo["loss"]


def test_auto_loss_resolution():
    cfg = TrainConfig(full_max_labels=100)
    assert cfg.resolved_loss(100) == "full" and cfg.resolved_loss(101) == "sampled"
    assert cfg.resolved_label_optimizer(100) == "adamw"
    assert cfg.resolved_label_optimizer(1000) == "sparse-adam"
    assert 4 <= TrainConfig.auto_codewords(6) <= TrainConfig.auto_codewords(10**6) == 64


def test_auto_bag_lr_is_a_multiple_of_lr():
    from xmc_toolkit.train_config import BAG_LR_SCALE

    assert TrainConfig(lr=2e-3).resolved_bag_lr() == pytest.approx(BAG_LR_SCALE * 2e-3)
    assert BAG_LR_SCALE == 100.0  # the validated value (docs/training.md)
    assert TrainConfig(lr=2e-3, bag_lr=0.05).resolved_bag_lr() == 0.05


def test_config_round_trip_and_every_field_documented(tmp_path):
    cfg = TrainConfig(loss="sampled", hidden=(64, 32), ks=(1, 5), negatives=7)
    p = tmp_path / "c.json"
    p.write_text(cfg.to_json())
    assert TrainConfig.from_json(p) == cfg
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    docs = TrainConfig.field_docs()
    assert all(docs[name] for name in docs), [n for n, d in docs.items() if not d]


def test_config_lists_every_problem_at_once():
    bad = dict(loss="softmaxx", sampler="midz", negatives=0, dropout=1.5, batch_size=-1,
               val_metric="F1@1", ks=(0,))
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**bad).validate()
    probs = exc.value.problems
    for key in ("loss=", "sampler=", "negatives=", "dropout=", "batch_size=", "val_metric=",
                "ks="):
        assert any(p.startswith(key) for p in probs), (key, probs)
    assert "--sampler" in str(exc.value)
    with pytest.raises(ConfigError) as exc2:
        TrainConfig.from_dict({"negatives": 3, "negativs": 4, "epochs": "ten"})
    assert any("did you mean 'negatives'" in p for p in exc2.value.problems)
    assert any(p.startswith("epochs=") for p in exc2.value.problems)


def test_data_dependent_problems_listed_together(tiny_xy):
    X, Y = tiny_xy  # 60 rows, 6 labels
    cfg = TrainConfig(loss="sampled", sampler="midx", negatives=6, codewords=16, batch_size=100,
                      ks=(1, 10))
    with pytest.raises(ConfigError) as exc:
        Trainer(cfg).fit(XMCDataset(X, Y))
    text = " | ".join(exc.value.problems)
    assert "negatives=6 must be smaller than the number of labels (6)" in text
    assert "codewords=16" in text and "far above" in text
    assert "batch_size=100 is larger than the 60 training rows" in text
    assert "ks=[1, 10]" in text


def test_sampled_path_label_gradient_is_sparse(tiny_xy):
    """A sampled step touches only the rows of the batch's positives and of the drawn
    negatives: every other label row (weight and bias) keeps its exact value, while touched rows
    do change (500 labels, so that most rows are untouched)."""
    from xmc_toolkit.batching import csr_to_bag, csr_to_padded
    from xmc_toolkit.sampling import make_sampler

    L = 500
    rng = np.random.default_rng(0)
    X = sp.random(8, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    Y = sp.csr_matrix((np.ones(16, np.float32), (np.repeat(np.arange(8), 2),
                                                 rng.choice(L, 16, replace=False))), shape=(8, L))
    cfg = TrainConfig(**{**TINY, "loss": "sampled"})
    net = XMCNetwork(X.shape[1], L, cfg)
    idx, off, w = csr_to_bag(X)
    pos, mask = csr_to_padded(Y)
    sampler = make_sampler("uniform", L)
    drawn: list[torch.Tensor] = []
    sample = sampler.sample

    def spy(*a, **kw):
        out = sample(*a, **kw)
        drawn.append(out.ids)
        return out

    sampler.sample = spy
    q = net(idx, off, w)
    loss = compute_loss(net, q, pos, mask, "sampled", sampler=sampler, negatives=4,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad = net.label_weight.grad
    assert grad is not None and grad.is_sparse and net.labels.bias.weight.grad.is_sparse
    touched = set(pos[mask].tolist()) | set(drawn[0].flatten().tolist())
    untouched = sorted(set(range(L)) - touched)
    assert len(untouched) > L // 2  # the check below has rows to look at
    assert set(torch.unique(grad.coalesce().indices()[0]).tolist()) <= touched
    bundle = build_optimizers(net.encoder_parameters(), net.label_parameters(), lr=0.1,
                              label_lr=0.1, weight_decay=0.0, label_optimizer="sparse-adam",
                              warmup_steps=0, total_steps=10)
    w_before = net.label_weight.detach().clone()
    b_before = net.label_bias.detach().clone()
    bundle.step()
    rest = torch.tensor(untouched)
    assert torch.equal(net.label_weight.detach()[rest], w_before[rest])  # exact, not close
    assert torch.equal(net.label_bias.detach()[rest], b_before[rest])
    hit = torch.tensor(sorted(touched))
    assert (net.label_weight.detach()[hit] != w_before[hit]).any(1).all()


def test_nan_loss_stops_with_step_number(tiny_xy, tmp_path):
    X, Y = tiny_xy
    Xbad = X.copy()
    Xbad.data[:] = 3e38  # bag sums overflow float32 -> non-finite queries and loss
    cfg = TrainConfig(**{**TINY, "tfidf": False, "l2_normalize": False, "clip_grad": 0.0})
    with pytest.raises(XMCError, match=r"loss became (nan|inf).* at step 1 \(epoch 1\)"):
        Trainer(cfg, out_dir=tmp_path / "run").fit(XMCDataset(Xbad, Y))


def test_validation_mismatch_and_early_stopping(tiny_xy):
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    with pytest.raises(ConfigError, match="same feature and label space"):
        Trainer(TrainConfig(**TINY)).fit(ds, XMCDataset(X[:, :10], Y))
    # lr = tiny: no improvement after the first epochs -> early stop with patience 2
    cfg = TrainConfig(**{**TINY, "epochs": 30, "patience": 2, "lr": 1e-9, "warmup_steps": 0,
                         "val_fraction": 0.0})
    res = Trainer(cfg).fit(ds, ds)
    assert res.stopped_early and len(res.history) < 30


def test_val_fraction_holds_out_rows(tiny_xy):
    X, Y = tiny_xy
    res = Trainer(TrainConfig(**{**TINY, "epochs": 2, "val_fraction": 0.25})).fit(
        XMCDataset(X, Y))
    assert "val/P@1" in res.history[0]


def test_inverse_propensity_from_counts_matches_metrics(tiny_xy):
    _, Y = tiny_xy
    counts = np.bincount(Y.indices, minlength=Y.shape[1])
    np.testing.assert_allclose(inverse_propensity_from_counts(counts, Y.shape[0], 0.55, 1.5),
                               inverse_propensity(Y, 0.55, 1.5), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(warm=st.integers(0, 20), total=st.integers(1, 200), step=st.integers(0, 250),
       schedule=st.sampled_from(["linear", "cosine", "constant"]))
def test_lr_multiplier_properties(warm, total, step, schedule):
    m = lr_multiplier(step, warmup_steps=warm, total_steps=total, schedule=schedule)
    assert 0.0 < m <= 1.0
    if warm and step < warm:
        assert m == pytest.approx((step + 1) / warm)
    if schedule == "constant" and step >= warm:
        assert m == 1.0
    if schedule != "constant" and step >= max(total, warm + 1) + 1:
        assert m <= 1e-6


def test_clip_grad_norm_matches_torch_with_sparse_grads():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(7, 3))
    emb = torch.nn.Embedding(7, 3, sparse=True)
    emb.weight = b
    (a.sum() * 3 + emb(torch.tensor([1, 1, 4])).pow(2).sum()).backward()
    dense_ref = [a.grad.clone(), b.grad.to_dense().clone()]
    total = _clip_grad_norm([a, b], 1.0)
    ref_total = torch.sqrt(sum(g.pow(2).sum() for g in dense_ref))
    assert total == pytest.approx(float(ref_total), rel=1e-5)
    scale = 1.0 / float(ref_total)
    torch.testing.assert_close(a.grad, dense_ref[0] * scale)
    torch.testing.assert_close(b.grad.to_dense(), dense_ref[1] * scale)


def test_bce_term_matches_dense_reference():
    """full + bce_weight == full softmax + bce_weight * dense BCE (sum over labels, mean rows)."""
    from xmc_toolkit import losses

    torch.manual_seed(0)
    cfg = TrainConfig(hidden=(8,), dim=4, device="cpu")
    net = XMCNetwork(10, 6, cfg)
    with torch.no_grad():
        net.label_bias.normal_()
    q = torch.randn(3, 4)
    pos = torch.tensor([[0, 2], [5, 0], [0, 0]])
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    got = compute_loss(net, q, pos, mask, "full", bce_weight=0.3)
    scores = q @ net.label_weight.t() + net.label_bias  # [3, 6]
    target = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]],
                          dtype=torch.float32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(scores, target, reduction="none")
    ref = losses.full_softmax_loss_from_scores(scores, pos, mask) + 0.3 * bce.sum(1).mean()
    torch.testing.assert_close(got, ref)


def test_sparse_bag_with_input_dropout_learns(tiny_xy):
    """The sparse-gradient bag (SparseAdam) with input dropout learns the tiny problem."""
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    trainer = Trainer(TrainConfig(**{**TINY, "bag_optimizer": "sparse-adam",
                                     "input_dropout": 0.1}))
    res = trainer.fit(ds, ds)
    assert trainer.network.encoder.bag.sparse
    assert set(trainer.network.encoder.sparse_parameters()) == {trainer.network.encoder.bag.weight}
    assert res.best["P@1"] > _popularity_p1(Y) + 0.15


def test_ema_final_weights_equal_hand_computed_average(tiny_xy):
    """Without validation the kept model is the running average, recomputed here by hand:
    ``a <- d a + (1 - d) w`` after every step, ``d = min(ema, (1 + step) / (10 + step))``."""
    X, Y = tiny_xy
    ds = XMCDataset(X, Y)
    trainer = Trainer(TrainConfig(**{**TINY, "epochs": 3, "ema": 0.9}))
    manual: dict[str, torch.Tensor] = {}

    def cb(ev, st_):
        sd = trainer.network.state_dict()
        if ev == "train_begin":
            manual.update({k: v.detach().clone() for k, v in sd.items()})
        elif ev == "step":
            d = min(0.9, (1 + st_["step"]) / (10 + st_["step"]))
            for k in manual:
                manual[k] = d * manual[k] + (1 - d) * sd[k]

    trainer.callbacks.append(cb)
    trainer.fit(ds)
    assert manual
    for k, v in trainer.network.state_dict().items():
        torch.testing.assert_close(v, manual[k], rtol=1e-5, atol=1e-6, msg=k)


def test_auto_hidden_width_follows_the_parameter_budget():
    """hidden=(0,) resolves to the largest power of two in [256, 8192] with D*w <= budget."""
    cfg = TrainConfig()
    assert cfg.hidden == (0,) and cfg.hidden_budget == 2 ** 26
    assert cfg.resolved_hidden(1836) == (8192,)  # Bibtex: 1836 * 8192 = 15.0M <= 67.1M
    assert cfg.resolved_hidden(7913) == (8192,)  # kjv-strongs: 64.8M <= 67.1M
    assert cfg.resolved_hidden(8192) == (8192,)  # exactly the budget
    assert cfg.resolved_hidden(8193) == (4096,)
    assert cfg.resolved_hidden(16975) == (2048,)  # nextword-tdavid: 4096 * 16975 = 69.5M
    assert cfg.resolved_hidden(10 ** 7) == (256,)  # the floor
    assert TrainConfig(hidden=(0, 64)).resolved_hidden(1836) == (8192, 64)
    assert TrainConfig(hidden=(300,)).resolved_hidden(10 ** 7) == (300,)  # explicit wins
    net = XMCNetwork(1836, 5, TrainConfig(dim=8))
    assert net.encoder.bag.weight.shape == (1836, 8192)
    assert not net.encoder.bag.sparse  # bag_optimizer=auto: dense below 4096 features
    assert XMCNetwork(4096, 5, TrainConfig(dim=8, hidden=(16,))).encoder.bag.sparse
    probs = TrainConfig(hidden=(64, 0), input_dropout=1.0, ema=1.5).problems()
    assert any("hidden=(64, 0)" in p for p in probs)
    assert any("input_dropout=1.0" in p for p in probs)
    assert any("ema=1.5" in p for p in probs)


def test_is_weighted_tells_counts_from_weighted_values():
    from xmc_toolkit.batching import is_weighted

    assert not is_weighted(sp.csr_matrix(np.array([[1.0, 0, 3.0], [0, 2.0, 0]])))  # counts
    assert not is_weighted(sp.csr_matrix((2, 3)))  # empty
    assert is_weighted(sp.csr_matrix(np.array([[1.0, 0, 0.25], [0, 2.0, 0]])))  # one weight


@pytest.mark.parametrize("scale, expect_idf", [(1.0, True), (0.37, False)])
def test_tfidf_auto_weights_counts_once_and_weighted_files_never_twice(tiny_xy, scale, expect_idf):
    """auto: IDF on whole-number inputs (counts / binary), none on already weighted inputs."""
    X, Y = tiny_xy
    X = sp.csr_matrix(X, dtype=np.float32)
    X.data = np.ceil(X.data * 3.0) * scale  # whole numbers, or every value a non-integer weight
    trainer = Trainer(TrainConfig(**{**TINY, "epochs": 1}))
    trainer.fit(XMCDataset(X, Y))
    assert trainer.config.tfidf == ("on" if expect_idf else "off")  # saved resolved
    assert (trainer.preprocessor.idf is not None) is expect_idf
    explicit = Trainer(TrainConfig(**{**TINY, "epochs": 1, "tfidf": "on"}))
    explicit.fit(XMCDataset(X, Y))
    assert explicit.preprocessor.idf is not None  # an explicit choice wins


@pytest.mark.parametrize("scale, signed, multi, expect", [
    (1.0, False, True, 1.0), (0.37, False, True, 0.5), (0.37, True, True, 1.0),
    (0.37, False, False, 1.0)])
def test_feature_power_auto_takes_square_roots_of_weighted_nonnegative_multilabel_inputs(
        tiny_xy, tmp_path, scale, signed, multi, expect):
    """auto: 0.5 on weighted values without negatives when rows have >= 2 labels on average;
    counts, signed features and single-label rows unchanged; the saved model applies the same
    transform (equal predictions after a reload)."""
    from xmc_toolkit.model import XMCModel

    X, Y = tiny_xy
    X = sp.csr_matrix(X, dtype=np.float32)
    X.data = np.ceil(X.data * 3.0) * scale
    if signed:
        X.data[::7] *= -1.0
    Y = sp.csr_matrix(Y, dtype=np.float32)
    n, L = Y.shape
    if multi:  # every row also gets label (row + 1) mod L: >= 2 labels a row on average
        Y = (Y + sp.csr_matrix((np.ones(n), (np.arange(n), (np.arange(n) + 1) % L)),
                               shape=(n, L))).sign().tocsr()
    else:  # one label a row
        Y = sp.csr_matrix((np.ones(n), (np.arange(n), np.arange(n) % L)), shape=(n, L))
    model = XMCModel(**{**TINY, "epochs": 1}).fit(X, Y)
    assert model.fitted.preprocessor.power == expect
    assert model.fitted.config.feature_power == expect  # saved resolved
    ids, scores = model.predict_topk(X, k=3)
    model.save(tmp_path / "m")
    again = XMCModel.load(tmp_path / "m")
    assert again.fitted.preprocessor.power == expect
    ids2, scores2 = again.predict_topk(X, k=3)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(scores, scores2, rtol=1e-5)


def test_preprocessor_power_before_idf_and_norm_and_refuses_negative_values():
    from xmc_toolkit.batching import fit_idf, l2_normalize_rows, tfidf_transform
    from xmc_toolkit.errors import DataFormatError
    from xmc_toolkit.network import Preprocessor

    X = sp.csr_matrix(np.array([[0.25, 0, 4.0], [0, 0.09, 0], [1.0, 0.5, 0]], np.float32))
    before = X.copy()
    pre = Preprocessor.fit(X, True, True, power=0.5)
    ref = X.copy()
    ref.data = np.sqrt(ref.data)
    ref = l2_normalize_rows(tfidf_transform(ref, fit_idf(X)))
    np.testing.assert_allclose(pre.transform(X).toarray(), ref.toarray(), rtol=1e-6)
    np.testing.assert_array_equal(X.toarray(), before.toarray())  # the input is not modified
    np.testing.assert_allclose(Preprocessor(None, False).transform(X).toarray(), X.toarray())
    bad = sp.csr_matrix(np.array([[0.5, 0], [0, -2.0]], np.float32))
    with pytest.raises(DataFormatError, match=r"row 2 .*-2\.0.*--feature-power 1"):
        Preprocessor(None, True, 0.5).transform(bad)


def test_auto_epochs_and_members_by_training_rows():
    # the validated data-size rules (docs/training.md): 20 epochs x 3 members on small sets;
    # about 100,000 rows in all and 3 members up to 100,000 rows; one epoch, one member above
    def resolved(n: int) -> tuple[int, int]:
        c = TrainConfig().resolved_for_data(n)
        return c.epochs, c.ensemble

    assert resolved(4_880) == (20, 3)  # Bibtex
    assert resolved(21_147) == (5, 3)  # kjv-strongs' 85 % (the validation runs)
    assert resolved(24_879) == (4, 3)  # kjv-strongs
    assert resolved(941_684) == (1, 1)  # nextword-tdavid
    assert TrainConfig(epochs=7, ensemble=2).resolved_for_data(24_879).epochs == 7  # explicit


def test_feature_power_is_validated():
    probs = TrainConfig(feature_power=0.0).problems() + TrainConfig(feature_power=1.5).problems()
    assert sum("feature_power=" in p and "--feature-power" in p for p in probs) == 2
    assert not TrainConfig(feature_power=0.5).problems()
    assert TrainConfig(feature_power=0.5).resolved_for_data(10, weighted_input=False
                                                            ).feature_power == 0.5  # explicit


def test_tfidf_bool_configs_of_older_models_still_load():
    assert TrainConfig(tfidf=False).tfidf == "off"
    assert TrainConfig.from_dict({"tfidf": True}).tfidf == "on"
    with pytest.raises(ConfigError, match=r"tfidf='sometimes' is unknown.*\(--tfidf\)"):
        TrainConfig(tfidf="sometimes").validate()
