"""Multi-process training: data-parallel encoder (DDP) + label table sharded by rows.

Launch with ``torchrun --nproc-per-node N -m xmc_toolkit.distributed TRAIN --out DIR [flags]``
(the flags of ``xmc train``; see ``docs/distributed.md``). Every rank loads the data set and
fits the same preprocessing; each *global* batch of ``--batch-size`` rows (the same batches, in
the same order, as a single-process run with that seed) is split across the ranks. The encoder
is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` with a *summing* gradient hook;
rank ``r`` owns label rows ``shard_range(L, r, W)`` and computes the sharded full or sampled
softmax of :mod:`xmc_toolkit.distributed`, so a step equals the single-process step on the
global batch (up to float rounding and the per-shard sampling draws).

Outputs in ``--out``: ``sharded/`` (one safetensors file per rank with its row range, the
encoder, ``manifest.json``), ``metrics.jsonl``, and, unless ``--no-consolidate``, a normal model
directory (``model.safetensors``, ``config.json``, ``labels.json``) that ``xmc eval`` /
``xmc predict`` load. :func:`read_label_rows` reads any row range of a sharded checkpoint, so it
loads on any number of ranks (:func:`load_sharded_network`) or in one process
(:func:`consolidate`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn

from .batching import is_weighted
from .distributed import (
    DistContext,
    all_gather_no_grad,
    all_gather_with_grad,
    replicated_all_reduce_sum,
    init_distributed,
    sharded_full_softmax_loss,
    sharded_sampled_softmax_loss,
    sum_allreduce_hook,
)
from .errors import ConfigError
from .loss_log import LossLog
from .model_dir import (
    MANIFEST_FILE,
    SHARD_DIR,
    consolidate,
    load_sharded_network,
    read_label_rows,
    read_manifest,
    save_sharded,
)
from .network import (ShardedXMCNetwork, init_label_rows, pifa_init_shard_,
                      sharded_predict_topk)
from .optim import averaged_weights, ema_update_
from .progress import progress_bar

__all__ = [
    "DistContext",
    "init_distributed",
    "init_label_rows",
    "ShardedXMCNetwork",
    "DistributedTrainer",
    "sharded_predict_topk",
    "save_sharded",
    "read_manifest",
    "read_label_rows",
    "load_sharded_network",
    "consolidate",
    "MANIFEST_FILE",
    "SHARD_DIR",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------
Callback = Callable[[str, dict[str, Any]], None]


def _clip_sharded(encoder_params: Sequence[nn.Parameter], label_params: Sequence[nn.Parameter],
                  max_norm: float, ctx: DistContext) -> float:
    """Clip by the global L2 norm of the (replicated) encoder grads and all label shards
    (:func:`xmc_toolkit.optim.clip_grad_norm`, the kernel of one process too)."""
    from .optim import clip_grad_norm

    return clip_grad_norm(encoder_params, max_norm, sharded=label_params,
                          all_reduce=dist.all_reduce if ctx.distributed else None)


def _sharded_full_loss(net: ShardedXMCNetwork, q: torch.Tensor, pos_ids: torch.Tensor,
                       pos_mask: torch.Tensor, lo: int, chunk_size: int,
                       bce_weight: float) -> torch.Tensor:
    """The full-softmax objective of :func:`xmc_toolkit.objective.compute_loss` on a shard:
    the mean of the ensemble members' losses (``q [B_r, n * d]``), each the sharded softmax
    plus ``bce_weight`` times the one-vs-all BCE summed over all labels, mean over rows."""
    n = net.members
    W, b = net.weight.weight, net.local_bias
    d = W.shape[1] // n
    parts = []
    for i in range(n):
        qi = q[:, i * d:(i + 1) * d] * n if n > 1 else q
        Wi = W[:, i * d:(i + 1) * d] if n > 1 else W
        loss = sharded_full_softmax_loss(qi, Wi, b, pos_ids, pos_mask, lo, chunk_size=chunk_size)
        if bce_weight > 0:
            loss = loss + bce_weight * _sharded_bce(qi, Wi, b, pos_ids, pos_mask, lo)
        parts.append(loss)
    return parts[0] if n == 1 else torch.stack(parts).mean()


def _sharded_bce(q: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                 pos_ids: torch.Tensor, pos_mask: torch.Tensor, lo: int) -> torch.Tensor:
    """``sum_{i, l} BCE(s_il, y_il) / N`` over the global batch (``N`` rows), every label:
    each rank scores its rows ``[N, L_r]`` and the sums are added across ranks."""
    q_all = all_gather_with_grad(q)  # [N, d]
    pos_all = all_gather_no_grad(pos_ids)  # [N, P]
    mask_all = all_gather_no_grad(pos_mask.bool())
    scores = q_all @ W.t()  # [N, L_r]
    if b is not None:
        scores = scores + b
    local = pos_all - lo
    own = mask_all & (local >= 0) & (local < W.shape[0])
    target = torch.zeros_like(scores)
    rows, slot = own.nonzero(as_tuple=True)
    target[rows, local[rows, slot]] = 1.0
    part = nn.functional.binary_cross_entropy_with_logits(scores, target, reduction="sum")
    return replicated_all_reduce_sum(part) / q_all.shape[0]


class DistributedTrainer:
    """Trains a :class:`ShardedXMCNetwork` on every rank of a process group.

    Args:
        config: a ``TrainConfig`` (same fields and meaning as ``xmc train``; ``batch_size``
            is the *global* batch, split across ranks).
        ctx: from :func:`init_distributed`.
        out_dir: output directory (written by rank 0, shards by every rank) or ``None``.
        callbacks: ``callback(event, payload)`` for ``"step"`` and ``"epoch_end"`` (every rank);
            a ``"step"`` payload has ``step``, ``epoch``, ``loss`` (the mean loss since the last
            read as a float on every ``log_every``-th step, else ``None``) and ``loss_tensor``
            (this step's detached 0-d loss on the device: reading it syncs).
        consolidate_model: also write a normal model directory into ``out_dir`` at the end.
    """

    def __init__(self, config: Any, ctx: DistContext, out_dir: str | os.PathLike[str] | None = None,
                 callbacks: Sequence[Callback] = (), consolidate_model: bool = True) -> None:
        self.config = config.validate()
        self.ctx = ctx
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.callbacks = list(callbacks)
        self.consolidate_model = consolidate_model
        self.network: ShardedXMCNetwork | None = None
        self.preprocessor: Any = None
        self.sampler: Any = None
        self.history: list[dict[str, Any]] = []
        self.quota = 0

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, payload)

    def _make_sampler(self, counts: np.ndarray) -> Any:
        from .objective import sampler_from_config

        net = self.network
        assert net is not None
        sampler = sampler_from_config(self.config, net.num_local, counts,
                                      seed=self.config.seed + 7919 * self.ctx.rank)
        if hasattr(sampler, "to"):
            sampler = sampler.to(self.ctx.device) or sampler
        return sampler

    def _refresh(self) -> None:
        net = self.network
        assert net is not None
        if self.sampler is not None and self.sampler.needs_update:
            b = net.local_bias
            self.sampler.update(net.weight.weight.detach(), None if b is None else b.detach())

    def fit(self, train: Any, val: Any = None, *, show_progress: bool = False) -> dict[str, Any]:
        """Train; returns ``{"history", "best", "best_epoch", "steps", "seconds", "loss"}``.

        Collective: every rank calls it with the same data.
        """
        from .batching import BatchIterator
        from .metrics import evaluate as evaluate_metrics
        from .optim import build_optimizers
        from .metrics import inverse_propensity_from_counts
        from .network import Preprocessor
        from .train import _split

        from .train import _amp_setup

        cfg, ctx = self.config, self.ctx
        cfg.validate_for_data(train.num_points, train.num_features, train.num_labels)
        # what the sharded placement cannot do is refused here, before any work, never ignored
        problems = cfg.sharded_problems(ctx.world_size, train.num_points, train.num_features,
                                        train.num_labels)
        amp_dtype, scaler = _amp_setup(cfg.amp, ctx.device)
        if scaler is not None:
            problems.append("amp='auto' picks fp16 with a GradScaler on this GPU (no bf16), "
                            "which the sharded placement cannot use; pass --amp off")
        if problems:
            raise ConfigError(problems)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ per rank
        np.random.seed(cfg.seed % (2**32))
        if val is None and cfg.val_fraction > 0:
            train, val = _split(train, cfg.val_fraction, cfg.seed)
        # auto values resolved as in one process (dropout, epochs, ensemble, label init)
        X_raw = sp.csr_matrix(train.X, dtype=np.float32)
        cfg = self.config = cfg.resolved_for_data(train.num_points,
                                                  weighted_input=is_weighted(X_raw))
        self.preprocessor = pre = Preprocessor.fit(X_raw, cfg.tfidf == "on", cfg.l2_normalize)
        X = pre.transform(X_raw)
        Y = sp.csr_matrix(train.Y, dtype=np.float32)
        X_val = None if val is None else pre.transform(val.X)
        Y_val = None if val is None else sp.csr_matrix(val.Y)
        D, L = train.num_features, train.num_labels
        counts = np.bincount(Y.indices, minlength=L).astype(np.int64)
        inv_prop = inverse_propensity_from_counts(counts, train.num_points, cfg.psp_a, cfg.psp_b)
        loss_name = cfg.resolved_loss(L)
        sampled = loss_name == "sampled"

        self.network = net = ShardedXMCNetwork(D, L, cfg, ctx.rank, ctx.world_size)
        net.to(ctx.device)
        if cfg.label_init == "pifa":  # this rank's rows, from the replicated encoder
            pifa_init_shard_(net, X, Y, cfg.eval_batch_size)
        net.train()
        ema: dict[str, torch.Tensor] | None = None
        if cfg.ema > 0:
            ema = {k: v.detach().clone() for k, v in net.state_dict().items()
                   if v.is_floating_point()}
        encoder: nn.Module = net.encoder
        if ctx.distributed:
            encoder = nn.parallel.DistributedDataParallel(
                net.encoder, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            encoder.register_comm_hook(None, sum_allreduce_hook)
        lo, hi = net.label_offset, net.label_offset + net.num_local
        self.sampler = self._make_sampler(counts[lo:hi]) if sampled else None
        # proportional allocation: the quotas M_r sum to about --negatives, as in one process
        self.quota = max(1, round(cfg.negatives * net.num_local / L))

        batches = BatchIterator(X, Y, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                device=ctx.device)
        steps_per_epoch = len(batches)
        total_steps = steps_per_epoch * cfg.epochs  # schedule horizon (max_steps only pauses)
        bundle = build_optimizers(
            net.encoder.parameters(), net.label_parameters(), lr=cfg.lr,
            label_lr=cfg.label_lr or cfg.lr, weight_decay=cfg.weight_decay,
            label_optimizer=cfg.resolved_label_optimizer(L), warmup_steps=cfg.warmup_steps,
            total_steps=total_steps, schedule=cfg.schedule)
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(cfg.seed + 1 + 7919 * ctx.rank)

        step, best, best_epoch, best_value, bad = 0, {}, 0, None, 0
        stopped_early = False
        best_state: dict[str, torch.Tensor] | None = None
        t_start = time.perf_counter()
        progress = progress_bar(show_progress and ctx.is_main, "training", total_steps)
        losses = LossLog()  # read on the host every cfg.log_every steps and at epoch end
        with progress as advance:
            for epoch in range(cfg.epochs):
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                self._refresh()
                order = batches.epoch_order(epoch)
                t0, n_steps, n_rows = time.perf_counter(), 0, 0
                losses.epoch_sum = 0.0
                for b in range(steps_per_epoch):
                    rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    if len(rows) < ctx.world_size:
                        continue  # too few rows to give every rank one
                    local = np.array_split(rows, ctx.world_size)[ctx.rank]
                    batch = batches.make_batch(local)
                    bundle.zero_grad()
                    autocast = (torch.autocast(device_type=ctx.device.type, dtype=amp_dtype)
                                if amp_dtype is not None else contextlib.nullcontext())
                    with autocast:
                        q = encoder(batch.indices, batch.offsets, batch.weights)
                    q = q.float()  # [B_r, n * d]
                    if sampled:  # one member (sharded_problems refuses sampled ensembles)
                        loss = sharded_sampled_softmax_loss(
                            q, net.weight.weight, None if net.bias is None else net.bias.weight,
                            batch.pos_ids, batch.pos_mask, lo, self.sampler, self.quota,
                            shared=cfg.shared_negatives, generator=gen,
                            correction="conditional", sparse_grad=True)
                    else:
                        loss = _sharded_full_loss(net, q, batch.pos_ids, batch.pos_mask, lo,
                                                  cfg.eval_chunk_size, cfg.bce_weight)
                    loss.backward()
                    if cfg.clip_grad > 0:
                        _clip_sharded(list(net.encoder.parameters()), net.label_parameters(),
                                      cfg.clip_grad, ctx)
                    bundle.step()
                    step += 1
                    if ema is not None:
                        ema_update_(ema, net, step, cfg.ema)
                    losses.add(loss, step, epoch + 1)  # on the device: no sync
                    n_steps, n_rows = n_steps + 1, n_rows + len(rows)
                    advance(1)
                    # the loss reaches the host (a device sync) every log_every steps, before a
                    # refresh and at the epoch end; a NaN/inf loss raises there, naming its step
                    read = losses.read() if step % cfg.log_every == 0 else None
                    value = None if read is None else read[0]  # the mean since the last read
                    self._emit("step", {"step": step, "epoch": epoch + 1, "loss": value,
                                        "loss_tensor": loss.detach()})
                    if sampled and cfg.refresh_every and step % cfg.refresh_every == 0:
                        losses.read()
                        self._refresh()
                    if cfg.max_steps and step >= cfg.max_steps:
                        break
                losses.read()
                secs = time.perf_counter() - t0
                rec: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                       "loss": losses.epoch_sum / max(1, n_steps), "seconds": secs,
                                       "examples_per_s": n_rows / max(secs, 1e-9),
                                       "world_size": ctx.world_size}
                if X_val is not None and Y_val is not None:
                    with averaged_weights(net, ema):
                        ids = sharded_predict_topk(net, X_val, max(cfg.ks),
                                                   batch_size=cfg.eval_batch_size,
                                                   chunk_size=cfg.eval_chunk_size)
                    res = evaluate_metrics(Y_val, ids, cfg.ks, inv_prop)
                    metrics = {k: float(v) for k, v in res.items() if "@" in k}
                    rec.update({f"val/{k}": v for k, v in metrics.items()})
                    value = metrics[cfg.val_metric]
                    if best_value is None or value > best_value:
                        best, best_epoch, best_value, bad = metrics, epoch + 1, value, 0
                        if cfg.keep_best:
                            with averaged_weights(net, ema):
                                best_state = {k: v.detach().clone()
                                              for k, v in net.state_dict().items()}
                    else:
                        bad += 1
                self.history.append(rec)
                logger.info("epoch %d: %s", epoch + 1, ", ".join(
                    f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float)))
                if self.out_dir is not None and ctx.is_main:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    with open(self.out_dir / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                self._emit("epoch_end", rec)
                if cfg.patience and bad >= cfg.patience:
                    stopped_early = True
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        elif ema is not None:
            net.load_state_dict(ema, strict=False)
        result = {"history": self.history, "best": best, "stopped_early": stopped_early,
                  "paused": bool(cfg.max_steps) and step >= cfg.max_steps
                  and step < total_steps and not stopped_early,
                  "best_epoch": best_epoch or (self.history[-1]["epoch"] if self.history else 0),
                  "steps": step, "seconds": time.perf_counter() - t_start, "loss": loss_name,
                  "sampler": cfg.sampler if sampled else None, "world_size": ctx.world_size}
        if self.out_dir is not None:
            shard_dir = self.out_dir / SHARD_DIR
            save_sharded(shard_dir, net, ctx, config=cfg, preprocessor=pre,
                         label_names=train.label_names, label_counts=counts,
                         num_train=train.num_points, summary=result)
            if self.consolidate_model and ctx.is_main:
                consolidate(shard_dir, self.out_dir)
            ctx.barrier()
        return result
