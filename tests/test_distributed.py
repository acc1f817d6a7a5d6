"""Tests of xmc_toolkit.distributed: sharded losses, gradients and top-k against dense references.

Multi-process checks run 2 gloo processes on CPU (torch.multiprocessing.spawn, a free port on
127.0.0.1); each spawned job runs several checks at once and writes its results to a file that
the tests compare with single-process references.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from xmc_toolkit import distributed as D

# ------------------------------------------------------------------------------------------
# dense references
# ------------------------------------------------------------------------------------------


def _dense_pos(pos: torch.Tensor, mask: torch.Tensor, num_labels: int) -> torch.Tensor:
    out = torch.zeros(pos.shape[0], num_labels, dtype=torch.bool)
    rows = torch.arange(pos.shape[0])[:, None].expand_as(pos)
    out[rows[mask], pos[mask]] = True
    return out


def ref_full_loss(Q, W, b, pos, mask) -> torch.Tensor:
    """for each target t: -x_t + log(e^{x_t} + sum_{c not in P} e^{x_c}), mean over pairs."""
    S = Q @ W.t() + (b if b is not None else 0.0)  # [N, L]
    neg_lse = torch.logsumexp(S.masked_fill(_dense_pos(pos, mask, W.shape[0]), -math.inf), 1)
    x = S.gather(1, pos.clamp_min(0))  # [N, P]
    per = -x + torch.logaddexp(x, neg_lse[:, None])
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp_min(1)


def ref_sampled_loss(Q, W, b, pos, mask, neg_ids, neg_log_q, remove_hits=True) -> torch.Tensor:
    """Single-process sampled estimator: Zhat = (1/M) sum_j e^{x_j} / q(c_j) over the union."""
    S = Q @ W.t() + (b if b is not None else 0.0)  # [N, L]
    n, m = neg_ids.shape[0] if neg_ids.dim() == 2 else Q.shape[0], neg_ids.shape[-1]
    ids = neg_ids if neg_ids.dim() == 2 else neg_ids[None].expand(n, -1)
    lq = neg_log_q if neg_log_q.dim() == 2 else neg_log_q[None].expand(n, -1)
    logits = S.gather(1, ids) - lq - math.log(m)  # [N, M]
    if remove_hits:
        hit = _dense_pos(pos, mask, W.shape[0]).gather(1, ids)
        logits = logits.masked_fill(hit, -math.inf)
    lse = torch.logsumexp(logits, 1)
    x = S.gather(1, pos.clamp_min(0))
    per = -x + torch.logaddexp(x, lse[:, None])
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp_min(1)


def _problem(seed: int, n: int, d: int, num_labels: int, p: int):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(num_labels, d, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(num_labels, generator=g, dtype=torch.float64) * 0.3
    pos = torch.randint(0, num_labels, (n, p), generator=g)
    mask = torch.rand(n, p, generator=g) < 0.7
    mask[0] = False  # a row with no positives
    mask[1, 0] = True
    if p > 1:  # a duplicated padded id that is masked out
        pos[1, 1] = pos[1, 0]
        mask[1, 1] = False
    return Q, W, b, pos, mask


class _TableSampler:
    """A fixed non-uniform proposal over a shard (local ids), exact normalized log q."""

    def __init__(self, num_labels: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_labels = num_labels
        w = torch.rand(num_labels, generator=g, dtype=torch.float64) + 0.1
        self.log_p = torch.log(w / w.sum())

    def sample(self, queries, num_samples, shared=False, generator=None):
        probs = self.log_p.exp()
        if shared:
            ids = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        else:
            ids = torch.multinomial(
                probs.expand(queries.shape[0], -1), num_samples, replacement=True,
                generator=generator,
            )
        return ids, self.log_p[ids]

    def log_prob(self, queries, ids, shared=False):
        return self.log_p[ids]


# ------------------------------------------------------------------------------------------
# pure helpers (no process group)
# ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 200), st.integers(1, 9))
def test_shard_range_covers_disjoint_balanced(num_labels: int, world: int) -> None:
    ranges = D.shard_ranges(num_labels, world)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_labels
    for (a0, a1), (b0, _b1) in zip(ranges, ranges[1:]):
        assert a1 == b0
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0


def test_shard_range_errors_name_the_fix() -> None:
    with pytest.raises(D.ConfigError, match="rank"):
        D.shard_range(10, 3, 2)
    with pytest.raises(D.ConfigError, match="nproc"):
        D.shard_range(10, 0, 0)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 30), st.integers(1, 3),
       st.integers(1, 7), st.booleans(), st.integers(0, 1000))
def test_full_loss_single_process_matches_dense(n, d, num_labels, p, chunk, bias, seed) -> None:
    Q, W, b, pos, mask = _problem(seed, max(n, 2), d, num_labels, p)
    b = b if bias else None
    args = [t.clone().requires_grad_(True) for t in (Q, W)] + (
        [b.clone().requires_grad_(True)] if bias else [None])
    loss = D.sharded_full_softmax_loss(args[0], args[1], args[2], pos, mask, 0, chunk_size=chunk)
    ref_args = [t.clone().requires_grad_(True) for t in (Q, W)] + (
        [b.clone().requires_grad_(True)] if bias else [None])
    ref = ref_full_loss(ref_args[0], ref_args[1], ref_args[2], pos, mask)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for a, r in zip(args, ref_args):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad)


def test_full_loss_all_labels_positive_is_finite() -> None:
    Q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1], [0, 1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss = D.sharded_full_softmax_loss(Q, W, None, pos, mask, 0, chunk_size=1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(Q.grad).all() and torch.isfinite(W.grad).all()


def test_full_loss_matches_library_full_softmax_when_available() -> None:
    losses = pytest.importorskip("xmc_toolkit.losses")
    Q, W, b, pos, mask = _problem(3, 7, 4, 23, 3)
    lib = losses.full_softmax_loss(Q, W, pos, mask, bias=b)
    ours = D.sharded_full_softmax_loss(Q, W, b, pos, mask, 0, chunk_size=5)
    torch.testing.assert_close(ours, lib.to(ours.dtype))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.integers(1, 8), st.integers(1, 40))
def test_merge_topk_equals_dense_topk(n, num_labels, k, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, 3, generator=g)
    W = torch.randn(num_labels, 3, generator=g)
    b = torch.randn(num_labels, generator=g)
    s, i = D.sharded_topk(Q, W, b, k, 0, chunk_size=4)
    ref_s, ref_i = torch.topk(Q @ W.t() + b, min(k, num_labels), dim=1)
    torch.testing.assert_close(s, ref_s)
    assert torch.equal(i, ref_i)


def test_mixture_log_q_is_normalized() -> None:
    # two shards with different quotas: sum_c q(c) over all labels must be 1
    lq0 = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    lq1 = torch.log_softmax(torch.randn(8, dtype=torch.float64), 0)
    mix = torch.cat([D.mixture_log_q(lq0, 3, 10), D.mixture_log_q(lq1, 7, 10)])
    torch.testing.assert_close(mix.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_accidental_hits_match_dense() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 12, (6, 3), generator=g)
    mask = torch.rand(6, 3, generator=g) < 0.6
    neg = torch.randint(0, 12, (6, 9), generator=g)
    dense = _dense_pos(pos, mask, 12).gather(1, neg)
    assert torch.equal(D._accidental_hits(neg, pos, mask), dense)
    shared = torch.randint(0, 12, (9,), generator=g)
    dense_s = _dense_pos(pos, mask, 12)[:, shared]
    assert torch.equal(D._accidental_hits(shared, pos, mask), dense_s)


# ------------------------------------------------------------------------------------------
# 2-process checks (gloo, CPU)
# ------------------------------------------------------------------------------------------

WORLD = 2
N_PER_RANK = (5, 4)  # uneven local batches on purpose
DIM, NUM_LABELS, P = 6, 13, 3
QUOTAS = (4, 7)  # different per-rank sample quotas


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _math_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        n = sum(N_PER_RANK)
        Q, W, b, pos, mask = _problem(11, n, DIM, NUM_LABELS, P)
        r0 = sum(N_PER_RANK[:rank])
        rows = slice(r0, r0 + N_PER_RANK[rank])
        lo, hi = D.shard_range(NUM_LABELS, rank, world)
        res: dict[str, Any] = {"range": (lo, hi), "rows": (rows.start, rows.stop)}
        if rank == 1:  # ranks pad their positives to different widths P_r
            pos = torch.cat([pos, torch.zeros(n, 2, dtype=pos.dtype)], 1)
            mask = torch.cat([mask, torch.zeros(n, 2, dtype=torch.bool)], 1)

        q = Q[rows].clone().requires_grad_(True)
        w = W[lo:hi].clone().requires_grad_(True)
        bb = b[lo:hi].clone().requires_grad_(True)
        loss = D.sharded_full_softmax_loss(q, w, bb, pos[rows], mask[rows], lo, chunk_size=2)
        loss.backward()
        res["full"] = (loss.detach(), q.grad, w.grad, bb.grad)

        for shared in (False, True):
            q = Q[rows].clone().requires_grad_(True)
            w = W[lo:hi].clone().requires_grad_(True)
            bb = b[lo:hi].clone().requires_grad_(True)
            gen = torch.Generator().manual_seed(100 + rank)
            sampler = _TableSampler(hi - lo, seed=7 + rank)
            loss, smp = D.sharded_sampled_softmax_loss(
                q, w, bb, pos[rows], mask[rows], lo, sampler, QUOTAS[rank],
                shared=shared, generator=gen, return_samples=True,
            )
            loss.backward()
            res[f"sampled_{shared}"] = (loss.detach(), q.grad, w.grad, bb.grad, smp.ids, smp.log_q)

        q = Q[rows].clone().requires_grad_(True)
        w = W[lo:hi].clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(200 + rank)
        loss, smp = D.sharded_sampled_softmax_loss(
            q, w, None, pos[rows], mask[rows], lo, _TableSampler(hi - lo, seed=7 + rank),
            QUOTAS[rank], generator=gen, correction="conditional", return_samples=True,
        )
        loss.backward()
        res["conditional"] = (loss.detach(), q.grad, w.grad, smp.ids, smp.log_q)

        s, i = D.sharded_topk(Q[rows].float(), W[lo:hi].float(), b[lo:hi].float(), 5, lo,
                              chunk_size=3)
        res["topk"] = (s, i)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn: Any, world: int, tmp: Path, *extra: Any) -> list[dict[str, Any]]:
    mp.spawn(fn, args=(world, _free_port(), str(tmp), *extra), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def math_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(_math_worker, WORLD, tmp_path_factory.mktemp("dist_math"))


def test_two_process_full_loss_and_grads_match_single_process(math_results) -> None:
    n = sum(N_PER_RANK)
    Q, W, b, pos, mask = _problem(11, n, DIM, NUM_LABELS, P)
    Q, W, b = (t.clone().requires_grad_(True) for t in (Q, W, b))
    ref = ref_full_loss(Q, W, b, pos, mask)
    ref.backward()
    for res in math_results:
        loss, gq, gw, gb = res["full"]
        lo, hi = res["range"]
        r0, r1 = res["rows"]
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(gq, Q.grad[r0:r1])
        torch.testing.assert_close(gw, W.grad[lo:hi])
        torch.testing.assert_close(gb, b.grad[lo:hi])


@pytest.mark.parametrize("shared", [False, True])
def test_two_process_sampled_loss_equals_single_process_estimator(math_results, shared) -> None:
    n = sum(N_PER_RANK)
    Q, W, b, pos, mask = _problem(11, n, DIM, NUM_LABELS, P)
    Q, W, b = (t.clone().requires_grad_(True) for t in (Q, W, b))
    key = f"sampled_{shared}"
    total = sum(QUOTAS)
    # union of the per-rank stratified draws, with the exact mixture proposal
    ids = torch.cat([r[key][4] for r in math_results], dim=-1)
    log_q = torch.cat(
        [D.mixture_log_q(r[key][5], QUOTAS[k], total) for k, r in enumerate(math_results)], dim=-1
    )
    ref = ref_sampled_loss(Q, W, b, pos, mask, ids, log_q)
    ref.backward()
    for res in math_results:
        loss, gq, gw, gb = res[key][:4]
        lo, hi = res["range"]
        r0, r1 = res["rows"]
        assert res[key][4].shape[-1] == QUOTAS[math_results.index(res)]
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(gq, Q.grad[r0:r1])
        torch.testing.assert_close(gw, W.grad[lo:hi])
        torch.testing.assert_close(gb, b.grad[lo:hi])


def test_two_process_topk_is_exact(math_results) -> None:
    n = sum(N_PER_RANK)
    Q, W, b, _pos, _mask = _problem(11, n, DIM, NUM_LABELS, P)
    ref_s, ref_i = torch.topk(Q.float() @ W.float().t() + b.float(), 5, dim=1)
    for res in math_results:
        r0, r1 = res["rows"]
        s, i = res["topk"]
        torch.testing.assert_close(s, ref_s[r0:r1])
        assert torch.equal(i, ref_i[r0:r1])


def _stratified_conditional_ref(Q, W, pos, mask, per_rank) -> torch.Tensor:
    """Per-stratum conditional estimator, written densely: for each shard r,
    Z_r = (1 - q_r(P in r)) / M'_r * sum_{non-hit draws} e^x / q_r."""
    S = Q @ W.t()  # [N, L]
    dense = _dense_pos(pos, mask, W.shape[0])
    terms = []
    for (lo, hi), sampler, ids, log_q in per_rank:
        hit = dense.gather(1, ids)
        m_eff = (~hit).sum(1).clamp_min(1)
        q_local = sampler.log_p.exp()  # [L_r]
        own = mask & (pos >= lo) & (pos < hi)  # per slot, like losses.sampled_softmax_loss
        q_own = torch.where(own, q_local[(pos - lo).clamp(0, hi - lo - 1)], 0.0).sum(1)
        logits = S.gather(1, ids) - log_q - torch.log(m_eff.double())[:, None]
        logits = logits + torch.log(1 - q_own)[:, None]
        terms.append(torch.logsumexp(logits.masked_fill(hit, -math.inf), 1))
    lse = torch.logsumexp(torch.stack(terms, 1), 1)
    x = S.gather(1, pos)
    per = torch.where(mask, -x + torch.logaddexp(x, lse[:, None]), torch.zeros_like(x))
    return per.sum() / mask.sum()


def test_two_process_conditional_sampled_loss_matches_per_stratum_reference(math_results) -> None:
    n = sum(N_PER_RANK)
    Q, W, _b, pos, mask = _problem(11, n, DIM, NUM_LABELS, P)
    Q, W = (t.clone().requires_grad_(True) for t in (Q, W))
    per_rank = []
    for rank, res in enumerate(math_results):
        lo, hi = res["range"]
        per_rank.append(((lo, hi), _TableSampler(hi - lo, seed=7 + rank), *res["conditional"][3:]))
    ref = _stratified_conditional_ref(Q, W, pos, mask, per_rank)
    ref.backward()
    for res in math_results:
        loss, gq, gw = res["conditional"][:3]
        lo, hi = res["range"]
        r0, r1 = res["rows"]
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(gq, Q.grad[r0:r1])
        torch.testing.assert_close(gw, W.grad[lo:hi])


@pytest.mark.parametrize("shared", [False, True])
def test_conditional_one_rank_equals_library_sampled_softmax(shared) -> None:
    losses = pytest.importorskip("xmc_toolkit.losses")
    Q, W, b, pos, mask = _problem(5, 8, 4, 17, 3)
    sampler = _TableSampler(17, seed=3)
    loss, smp = D.sharded_sampled_softmax_loss(
        Q, W, b, pos, mask, 0, sampler, 9, shared=shared,
        generator=torch.Generator().manual_seed(1), correction="conditional", return_samples=True,
    )
    S = Q @ W.t() + b
    neg_scores = S[:, smp.ids] if shared else S.gather(1, smp.ids)
    lib = losses.sampled_softmax_loss(
        S.gather(1, pos), pos, mask, sampler.log_p[pos], neg_scores, smp.ids, smp.log_q
    )
    torch.testing.assert_close(loss, lib.to(loss.dtype))


@pytest.mark.parametrize("shared", [False, True])
def test_conditional_one_rank_query_dependent_proposal(shared) -> None:
    """With a query-dependent proposal (the exact softmax) the conditional correction scores
    the positives under the law of the draws: per query, or the batch mixture when shared (the
    library loss with ``log_prob(..., shared=shared)``; issue 11)."""
    from xmc_toolkit.losses import sampled_softmax_loss
    from xmc_toolkit.sampling import MIDXSampler

    Q, W, b, pos, mask = _problem(5, 8, 4, 17, 3)
    Q, W, b = 3 * Q.float(), W.float(), b.float()  # confident rows: q_b(P) far from qbar(P)
    sampler = MIDXSampler(17, 3, within_cell="exact", seed=0)
    sampler.update(W, b)
    loss, smp = D.sharded_sampled_softmax_loss(
        Q, W, b, pos, mask, 0, sampler, 9, shared=shared,
        generator=torch.Generator().manual_seed(1), correction="conditional", return_samples=True,
    )
    S = Q @ W.t() + b
    neg_scores = S[:, smp.ids] if shared else S.gather(1, smp.ids)
    lib = sampled_softmax_loss(
        S.gather(1, pos), pos, mask, sampler.log_prob(Q, pos, shared=shared), neg_scores,
        smp.ids, smp.log_q,
    )
    torch.testing.assert_close(loss, lib.to(loss.dtype))


# ------------------------------------------------------------------------------------------
# distributed trainer: 2 processes vs 1, sharded checkpoints
# ------------------------------------------------------------------------------------------


def _toy_data(seed: int, n: int):
    """A learnable problem: 40 features, 12 labels; label j <-> features 3j..3j+2."""
    import numpy as np
    import scipy.sparse as sp

    from xmc_toolkit.data import XMCDataset

    g = np.random.default_rng(seed)
    L, F = 12, 40
    Y = np.zeros((n, L), np.float32)
    X = np.zeros((n, F), np.float32)
    for i in range(n):
        labs = g.choice(L, size=g.integers(1, 3), replace=False)
        Y[i, labs] = 1
        for j in labs:
            X[i, 3 * j : 3 * j + 3] = g.random(3) + 0.5
        X[i, 36 + i % 4] = 0.2
    return XMCDataset(sp.csr_matrix(X), sp.csr_matrix(Y))


def _toy_config(**kw: Any):
    from xmc_toolkit.train import TrainConfig

    # no dropout: masks are drawn per rank, so only dropout-free runs match one process exactly
    base = dict(dim=16, hidden=(32,), dropout=0.0, input_dropout=0.0, epochs=4, batch_size=40,
                lr=0.05, warmup_steps=0, loss="full", ks=(1, 3), seed=3, device="cpu", clip_grad=0.0,
                ensemble=1)
    base.update(kw)
    return TrainConfig(**base)


def _step_losses(into: list) -> Any:
    return lambda ev, p: into.append(p["loss"]) if ev == "step" else None


def _rich_config(**kw: Any) -> Any:
    """An ensemble with EMA, the BCE term, PIFA rows and clipping (full softmax)."""
    base = dict(ensemble=2, ema=0.9, bce_weight=0.1, label_init="pifa", clip_grad=1.0,
                log_every=1, epochs=3)
    base.update(kw)
    return _toy_config(**base)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        from xmc_toolkit.dist_train import (DistContext, DistributedTrainer,
                                            sharded_predict_topk)

        ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
        train, val = _toy_data(0, 200), _toy_data(1, 80)
        res: dict[str, Any] = {}
        steps: list = []
        tr = DistributedTrainer(_toy_config(log_every=1), ctx, Path(out) / "full",
                                callbacks=[_step_losses(steps)])
        res["full"] = tr.fit(train, val)
        res["full_steps"] = steps
        X_val = tr.preprocessor.transform(val.X)
        res["topk"] = sharded_predict_topk(tr.network, X_val, 3)
        steps = []
        rich = DistributedTrainer(_rich_config(), ctx, None, callbacks=[_step_losses(steps)])
        res["rich"] = rich.fit(train, val)
        res["rich_steps"] = steps
        # exact resume: paused with --max-steps, resumed, ends as the uninterrupted run
        pr = _rich_config(checkpoint_every=2)
        whole = DistributedTrainer(pr, ctx, Path(out) / "whole")
        res["whole"] = whole.fit(train, val)
        res["whole_state"] = {k: v.clone() for k, v in whole.network.state_dict().items()}
        paused = DistributedTrainer(dataclasses.replace(pr, max_steps=7), ctx, Path(out) / "re")
        res["paused"] = paused.fit(train, val)
        resumed = DistributedTrainer(pr, ctx, Path(out) / "re")
        res["resumed"] = resumed.fit(train, val, resume=True)
        res["resumed_state"] = {k: v.clone() for k, v in resumed.network.state_dict().items()}
        tr = DistributedTrainer(
            _toy_config(loss="sampled", sampler="uniform", negatives=4, label_optimizer="auto"),
            ctx, None)
        res["sampled"] = tr.fit(train, val)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def train_results(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("dist_train")
    return tmp, _spawn(_train_worker, WORLD, tmp)


def test_distributed_trainer_refuses_what_the_sharded_placement_cannot_do() -> None:
    """Every such field is in the list of config problems, up front; none is ignored."""
    from xmc_toolkit.dist_train import DistContext, DistributedTrainer
    from xmc_toolkit.errors import ConfigError

    cfg = _toy_config(ensemble=2, loss="sampled", sampler="uniform", negatives=4,
                      checkpoint_every=3, bag_optimizer="sparse-adam", amp="fp16",
                      label_optimizer="auto")
    with pytest.raises(ConfigError) as exc:
        DistributedTrainer(cfg, DistContext(), None).fit(_toy_data(0, 200), _toy_data(1, 80))
    text = str(exc.value)
    for what in ("ensemble=2 with loss='sampled'", "sparse-adam", "amp='fp16'"):
        assert what in text, text


def test_sharded_placement_trains_what_one_process_trains() -> None:
    """--ensemble (auto too), --ema, --bce-weight, --label-init pifa and --max-steps mean the
    same in the sharded placement: nothing is dropped, and --max-steps only pauses (the
    schedule keeps the horizon of every epoch)."""
    from xmc_toolkit.dist_train import DistContext, DistributedTrainer

    tr = DistributedTrainer(_toy_config(ensemble=0, ema=0.9, bce_weight=0.1, label_init="pifa",
                                        max_steps=7), DistContext(), None)
    res = tr.fit(_toy_data(0, 200), _toy_data(1, 80))
    assert tr.config.ensemble == 3 and tr.network.members == 3  # auto: 3 on small data
    assert tr.network.weight.weight.shape == (12, 3 * 16)
    assert res["steps"] == 7 and res["paused"]
    assert res["history"][0]["val/P@1"] > 0.3
def test_distributed_trainer_reads_the_loss_every_log_every_steps(monkeypatch) -> None:
    """The per-step loss stays on the device between reads (every log_every steps, epoch end):
    the epoch loss does not depend on log_every, and a NaN loss still raises, naming its step."""
    import xmc_toolkit.dist_train as dt
    from xmc_toolkit.errors import XMCError

    train, val = _toy_data(0, 200), _toy_data(1, 80)  # 5 steps an epoch

    def fit(cfg, callbacks=()):
        return dt.DistributedTrainer(cfg, dt.DistContext(), None, callbacks=callbacks).fit(
            train, val)

    a = fit(_toy_config(epochs=2, log_every=1))["history"]
    b = fit(_toy_config(epochs=2, log_every=1000))["history"]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-12)
    seen: list = []
    fit(_toy_config(epochs=1, log_every=2),
        [lambda ev, p: seen.append(p["loss"]) if ev == "step" else None])
    assert [v is None for v in seen] == [True, False, True, False, True]
    import xmc_toolkit.placement as placement

    # in one process the sharded placement's full softmax is the local kernel
    orig, calls = placement.compute_loss, {"n": 0}

    def nan_at_step_3(*args, **kw):
        calls["n"] += 1
        loss = orig(*args, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(placement, "compute_loss", nan_at_step_3)
    with pytest.raises(XMCError, match=r"loss became nan at step 3 \(epoch 1\)"):
        fit(_toy_config(epochs=2, log_every=1000))
    assert calls["n"] == 5  # found at the epoch end, not before


def test_two_process_training_matches_one_process(train_results) -> None:
    """2 gloo processes = the sharded placement in one process, per step (loss within 1e-5
    relative), for the full softmax alone and with an ensemble, EMA, BCE, PIFA and clipping."""
    from xmc_toolkit.dist_train import DistContext, DistributedTrainer

    _tmp, results = train_results
    for name, cfg in (("full", _toy_config(log_every=1)), ("rich", _rich_config())):
        steps: list = []
        one = DistributedTrainer(cfg, DistContext(), None, callbacks=[_step_losses(steps)]).fit(
            _toy_data(0, 200), _toy_data(1, 80))
        for res in results:  # every rank reports the same global numbers
            assert len(res[f"{name}_steps"]) == len(steps) > 10
            assert res[f"{name}_steps"] == pytest.approx(steps, rel=1e-5)
            h2, h1 = res[name]["history"], one["history"]
            assert len(h2) == len(h1) == cfg.epochs
            for a, b in zip(h2, h1):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                assert a["val/P@1"] == pytest.approx(b["val/P@1"], abs=1e-9)
        assert one["history"][-1]["val/P@1"] > 0.6  # it learned something


def test_two_process_run_paused_and_resumed_ends_as_the_uninterrupted_one(train_results):
    """2 ranks, an ensemble with EMA and --checkpoint-every: paused by --max-steps (mid-epoch),
    resumed with resume=True, the run ends bit for bit as the uninterrupted one, on every rank,
    and the checkpoints are per rank."""
    tmp, results = train_results
    for res in results:
        assert res["paused"]["paused"] and res["paused"]["steps"] == 7
        assert not res["resumed"]["paused"]
        assert res["resumed"]["steps"] == res["whole"]["steps"] == 15
        assert res["resumed"]["history"] == [
            {k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} | {
                "seconds": a["seconds"], "examples_per_s": a["examples_per_s"]}
            for r, a in zip(res["whole"]["history"], res["resumed"]["history"])]
        for k, v in res["whole_state"].items():
            assert torch.equal(v, res["resumed_state"][k]), k
    assert (tmp / "re" / "checkpoint" / "rank-00001-of-00002").is_dir()


def test_two_process_training_close_to_library_trainer(train_results) -> None:
    from xmc_toolkit.train import Trainer

    _tmp, results = train_results
    lib = Trainer(_toy_config()).fit(_toy_data(0, 200), _toy_data(1, 80))
    assert results[0]["full"]["history"][-1]["val/P@1"] == pytest.approx(
        lib.history[-1]["val/P@1"], abs=0.05)  # same loop; the sharded init differs


def test_two_process_sampled_training_learns(train_results) -> None:
    _tmp, results = train_results
    h = results[0]["sampled"]["history"]
    assert h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["val/P@1"] > 0.5
    assert results[1]["sampled"]["history"][-1]["loss"] == pytest.approx(h[-1]["loss"])


def test_checkpoint_saved_on_two_ranks_loads_in_one(train_results, tmp_path: Path) -> None:
    import numpy as np

    from xmc_toolkit.dist_train import consolidate, load_sharded_network, read_label_rows
    from xmc_toolkit.train import load_model_dir, predict_topk_network

    tmp, results = train_results
    sharded = tmp / "full" / "sharded"
    model = load_model_dir(tmp / "full", device="cpu")  # consolidated by rank 0 after training
    model2 = load_model_dir(consolidate(sharded, tmp_path / "m"), device="cpu")
    X_val = model.preprocessor.transform(_toy_data(1, 80).X)
    ids, _ = predict_topk_network(model.network, X_val, 3)
    ids2, _ = predict_topk_network(model2.network, X_val, 3)
    assert np.array_equal(ids, results[0]["topk"]) and np.array_equal(ids2, ids)
    # any number of ranks: 3 shards re-assemble the same table
    W = model.network.label_weight.detach()
    parts = [load_sharded_network(sharded, r, 3) for r in range(3)]
    torch.testing.assert_close(torch.cat([p.weight.weight.detach() for p in parts]), W)
    w, b = read_label_rows(sharded, 5, 9)
    torch.testing.assert_close(w, W[5:9])
    torch.testing.assert_close(b, model.network.label_bias.detach()[5:9])


def test_missing_manifest_is_a_checkpoint_error(tmp_path: Path) -> None:
    from xmc_toolkit.dist_train import read_manifest
    from xmc_toolkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="sharded"):
        read_manifest(tmp_path)


def test_sampled_loss_sparse_grads_with_embedding_bias() -> None:
    """sparse_grad=True with an [L, 1] bias (nn.Embedding weight) gives sparse grads equal to
    the dense ones, so SparseAdam can step the shard."""
    Q, W, b, pos, mask = _problem(2, 6, 4, 15, 2)
    grads = {}
    for sparse in (False, True):
        w = torch.nn.Parameter(W.clone())
        bb = torch.nn.Parameter(b.clone()[:, None])
        loss = D.sharded_sampled_softmax_loss(
            Q, w, bb, pos, mask, 0, _TableSampler(15, 1), 5,
            generator=torch.Generator().manual_seed(0), sparse_grad=sparse)
        loss.backward()
        assert w.grad.is_sparse == sparse and bb.grad.is_sparse == sparse
        grads[sparse] = (w.grad.to_dense(), bb.grad.to_dense())
        if sparse:
            torch.optim.SparseAdam([w, bb], lr=0.1).step()
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])


def test_command_line_entry_in_one_process(tmp_path: Path) -> None:
    """`xmc train --placement sharded` in one process writes the sharded directory too."""
    import json

    from click.testing import CliRunner

    from cli.main import xmc
    from xmc_toolkit.data import save
    from xmc_toolkit.model_dir import load_model_dir

    save(_toy_data(0, 120), tmp_path / "train.txt", "xc")
    save(_toy_data(1, 40), tmp_path / "val.txt", "xc")
    out = tmp_path / "model"
    r = CliRunner().invoke(xmc, [
        "train", "--data", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"),
        "--out", str(out), "--placement", "sharded", "--epochs", "2", "--dim", "8",
        "--hidden", "16", "--ks", "1,3", "--batch-size", "30", "--device", "cpu",
        "--no-label-bias", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["world_size"] == 1 and res["steps"] == 8
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    man = json.loads((out / "sharded" / "manifest.json").read_text())
    assert man["world_size"] == 1 and man["bias"] is False
    assert load_model_dir(out, device="cpu").num_labels == 12


def test_train_entry_point_picks_the_sharded_placement_under_torchrun(monkeypatch):
    """`torchrun -m xmc_toolkit.train` (WORLD_SIZE > 1) is `xmc train` with sharded labels."""
    from cli.train_cmds import resolve_placement

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_placement("auto") == "local"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_placement("auto") == "sharded"
    assert resolve_placement("local") == "local"


def test_sharded_placement_refuses_what_it_cannot_do(tmp_path: Path, monkeypatch) -> None:
    """Flags the sharded placement cannot honour are refused before any work, never ignored."""
    from click.testing import CliRunner

    from cli.main import xmc

    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before the process group is joined
    r = CliRunner().invoke(xmc, ["train", "--init-from", str(tmp_path / "m"), "--data", "x.txt",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--init-from is not available with the sharded" in r.output
    monkeypatch.delenv("WORLD_SIZE")
    r = CliRunner().invoke(xmc, ["train", "--backend", "gloo", "--data", "x.txt", "--out", "o"])
    assert r.exit_code == 2 and "sharded placement only" in r.output


def test_sharded_network_builds_with_default_config():
    """Default TrainConfig (auto hidden width, input dropout) works in the sharded network."""
    from xmc_toolkit.dist_train import ShardedXMCNetwork
    from xmc_toolkit.train import TrainConfig, XMCNetwork

    cfg = TrainConfig()
    net = ShardedXMCNetwork(300, 40, cfg, rank=0, world_size=2)
    ref = XMCNetwork(300, 40, cfg)
    assert [m.shape for m in net.encoder.parameters()] == [m.shape for m in ref.encoder.parameters()]
    assert net.encoder.bag.weight.std() > 0.5  # bag_init_std = 1 applied, as in one process


@pytest.mark.parametrize("kw", [{}, dict(dropout=0.3, input_dropout=0.2, ensemble=2, ema=0.9,
                                         bce_weight=0.1, label_init="pifa", clip_grad=1.0)])
def test_sharded_placement_in_one_process_is_the_local_run_bit_for_bit(kw) -> None:
    """The same Trainer with the sharded placement on 1 process reproduces the local placement
    bit for bit on CPU (same seed: every step's loss, the validation metrics, the weights)."""
    from xmc_toolkit.dist_train import DistContext, DistributedTrainer
    from xmc_toolkit.train import Trainer

    cfg = _toy_config(log_every=1, epochs=3, **kw)
    a_steps: list = []
    b_steps: list = []
    local = Trainer(cfg, callbacks=[_step_losses(a_steps)])
    res_a = local.fit(_toy_data(0, 200), _toy_data(1, 80))
    sharded = DistributedTrainer(cfg, DistContext(), None, callbacks=[_step_losses(b_steps)])
    res_b = sharded.fit(_toy_data(0, 200), _toy_data(1, 80))
    assert a_steps == b_steps and len(a_steps) == 15
    assert [r["val/P@1"] for r in res_a.history] == [r["val/P@1"] for r in res_b["history"]]
    assert torch.equal(local.network.label_weight, sharded.network.label_weight)
    assert torch.equal(local.network.label_bias, sharded.network.label_bias)
    enc_a, enc_b = local.network.encoder.state_dict(), sharded.network.encoder.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
