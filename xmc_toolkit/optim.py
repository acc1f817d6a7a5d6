"""Optimizers and learning-rate schedules for XMC training.

The model has two kinds of parameters:

* the **label table** (``[L, d]`` weights and ``[L]`` bias) whose gradients are *sparse* on the
  sampled path (only the rows of sampled/positive labels are touched). They get a row-wise sparse
  optimizer: Adam over the touched rows (:class:`xmc_toolkit.sparse_optim.RowAdam`, the numbers
  of ``torch.optim.SparseAdam`` at about half its cost) or row-wise Adagrad (``torch.optim.Adagrad`` accepts
  sparse gradients and only updates the touched rows' accumulators);
* the encoder's **EmbeddingBag weight** ``[D, h]`` when it is built with sparse gradients
  (``sparse_params``): only the rows of the features present in a batch get a gradient, and
  ``SparseAdam`` (or row-wise Adagrad) updates only those rows. For large ``D`` this replaces a
  dense ``[D, h]`` AdamW update every step by one proportional to the batch's distinct features;
* everything else (the encoder's dense MLP), optimized with ``AdamW``.

When the label table produces *dense* gradients (the full-softmax path), both groups can simply
use AdamW; :func:`build_optimizers` picks accordingly.

The schedule is a linear warm-up followed by a linear or cosine decay (or constant), expressed as
a multiplier on the base learning rate (:func:`lr_multiplier`) and wrapped in
``torch.optim.lr_scheduler.LambdaLR`` for every optimizer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .sparse_optim import RowAdam

__all__ = [
    "clip_grad_norm",
    "ema_update_",
    "averaged_weights",
    "LABEL_OPTIMIZERS",
    "SCHEDULES",
    "OptimizerBundle",
    "lr_multiplier",
    "build_optimizers",
]

LABEL_OPTIMIZERS = ("adamw", "sparse-adam", "adagrad")
SCHEDULES = ("linear", "cosine", "constant")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "linear",
                  min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Linear warm-up from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then a decay to
    ``min_ratio`` at ``total_steps`` (``"linear"`` or ``"cosine"``) or no decay (``"constant"``).

    Args:
        step: the number of optimizer steps already taken.
        warmup_steps: length of the warm-up (0 disables it).
        total_steps: planned number of steps of the whole run.
        schedule: ``"linear" | "cosine" | "constant"``.
        min_ratio: multiplier reached at the end of the decay.

    Returns:
        The multiplier, in ``(0, 1]``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} "
                          "(--schedule)")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(min_ratio, min_ratio + (1.0 - min_ratio) * decay, 1e-8)


@dataclass
class OptimizerBundle:
    """The optimizers and schedulers of one model, stepped together.

    Attributes:
        optimizers: name -> optimizer (``"encoder"``, ``"labels"``).
        schedulers: name -> ``LambdaLR`` for the optimizer of the same name.
    """

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step for every optimizer (through ``scaler`` when given), then the LR."""
        for opt in self.optimizers.values():
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        for sch in self.schedulers.values():
            sch.step()

    def state_dict(self) -> dict[str, dict]:
        return {
            **{f"opt.{k}": v.state_dict() for k, v in self.optimizers.items()},
            **{f"sched.{k}": v.state_dict() for k, v in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for k, v in self.optimizers.items():
            v.load_state_dict(state[f"opt.{k}"])
        for k, v in self.schedulers.items():
            v.load_state_dict(state[f"sched.{k}"])

    @property
    def lr(self) -> float:
        """Current learning rate of the encoder optimizer."""
        first = next(iter(self.optimizers.values()))
        return float(first.param_groups[0]["lr"])


def build_optimizers(
    encoder_params: Iterable[torch.nn.Parameter],
    label_params: Sequence[torch.nn.Parameter],
    *,
    lr: float,
    label_lr: float,
    weight_decay: float,
    label_optimizer: str,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "linear",
    sparse_params: Sequence[torch.nn.Parameter] = (),
    sparse_optimizer: str = "sparse-adam",
    sparse_lr: float | None = None,
) -> OptimizerBundle:
    """AdamW for the encoder, a row-wise optimizer for the label table, one schedule for both.

    Args:
        encoder_params: dense parameters (AdamW with ``weight_decay``).
        label_params: the label table parameters (weights ``[L, d]`` and bias ``[L]``).
        lr: encoder learning rate.
        label_lr: label-table learning rate.
        weight_decay: AdamW decoupled weight decay for the encoder (the label table gets none:
            weight decay would touch every row and defeat sparse updates).
        label_optimizer: ``"adamw"`` (dense gradients, full softmax), ``"sparse-adam"`` or
            ``"adagrad"`` (row-wise, sparse gradients).
        warmup_steps: linear warm-up length in steps.
        total_steps: planned number of steps.
        schedule: ``"linear" | "cosine" | "constant"`` decay after warm-up.
        sparse_params: encoder parameters with sparse gradients (the EmbeddingBag weight built
            with ``sparse=True``); they must not also be in ``encoder_params``. Optimized at
            ``lr`` by ``sparse_optimizer`` (no weight decay) as the optimizer ``"encoder_sparse"``.
        sparse_optimizer: ``"sparse-adam"`` or ``"adagrad"`` for ``sparse_params``.
        sparse_lr: learning rate of ``sparse_params`` (``None``: ``lr``).

    Returns:
        An :class:`OptimizerBundle`.
    """
    if label_optimizer not in LABEL_OPTIMIZERS:
        raise ConfigError(f"unknown label optimizer {label_optimizer!r}; use one of "
                          f"{', '.join(LABEL_OPTIMIZERS)} (--label-optimizer)")
    if sparse_optimizer not in ("sparse-adam", "adagrad"):
        raise ConfigError(f"unknown sparse optimizer {sparse_optimizer!r}; use sparse-adam or "
                          "adagrad")
    sparse = [p for p in sparse_params if p.requires_grad]
    sparse_ids = {id(p) for p in sparse}
    enc = [p for p in encoder_params if p.requires_grad and id(p) not in sparse_ids]
    labels = [p for p in label_params if p.requires_grad]
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if enc:
        optimizers["encoder"] = torch.optim.AdamW(enc, lr=lr, weight_decay=weight_decay,
                                                  foreach=True)
    if sparse:
        slr = lr if sparse_lr is None else sparse_lr
        optimizers["encoder_sparse"] = (RowAdam(sparse, lr=slr)
                                        if sparse_optimizer == "sparse-adam"
                                        else torch.optim.Adagrad(sparse, lr=slr))
    if label_optimizer == "adamw":
        optimizers["labels"] = torch.optim.AdamW(labels, lr=label_lr, weight_decay=0.0,
                                                 foreach=True)
    elif label_optimizer == "sparse-adam":
        optimizers["labels"] = RowAdam(labels, lr=label_lr)
    else:
        optimizers["labels"] = torch.optim.Adagrad(labels, lr=label_lr)

    def fn(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps,
                             schedule=schedule)

    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, fn) for k, o in optimizers.items()}
    return OptimizerBundle(optimizers, schedulers)


@torch.no_grad()
def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float, *,
                   sharded: Sequence[torch.nn.Parameter] = (),
                   all_reduce: Callable[[torch.Tensor], None] | None = None) -> float:
    """Clip the global L2 norm of dense *and sparse* gradients (sparse ones are coalesced).

    The one clipping kernel of the local and the sharded placement. ``params`` are the same on
    every rank (the replicated encoder, or everything in one process); ``sharded`` are this
    rank's part of a table split across ranks (label rows), whose squared norm ``all_reduce``
    sums in place over the ranks. Every rank then scales by the same
    ``min(1, max_norm / (norm + 1e-6))``. In one process (``all_reduce=None``) the norm is
    that of ``params`` and ``sharded`` together, summed in that order.

    Returns:
        The global norm before clipping (a host float: one sync).
    """
    def squares(ps: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
        sq: list[torch.Tensor] = []
        for p in ps:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce()
                p.grad = g
                sq.append(g._values().float().pow(2).sum())
            else:
                sq.append(g.float().pow(2).sum())
        return sq

    mine, part = squares(params), squares(sharded)
    if all_reduce is None:
        if not mine and not part:
            return 0.0
        total = torch.stack(mine + part).sum().sqrt()
    else:  # every rank takes part in the reduction, gradients or not
        dev = next(iter([*params, *sharded])).device
        shard_sq = torch.stack(part).sum() if part else torch.zeros((), device=dev)
        all_reduce(shard_sq)
        total = ((torch.stack(mine).sum() if mine else torch.zeros((), device=dev))
                 + shard_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in [*params, *sharded]:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g._values().mul_(scale.to(g.dtype))
        else:
            g.mul_(scale.to(g.dtype))
    return float(total)


@torch.no_grad()
def ema_update_(ema: dict[str, torch.Tensor], network: torch.nn.Module, step: int,
                ema_max: float) -> None:
    """``ema <- d * ema + (1 - d) * w`` with ``d = min(ema_max, (1 + step) / (10 + step))``.

    The weight average of ``--ema`` (both placements: ``ema`` holds the floating tensors of
    ``network.state_dict()``, on a rank its own shard). The ramp keeps the early average from
    being dominated by the random init; ``d`` depends only on the step, so a resumed run
    averages exactly as an uninterrupted one.
    """
    decay = min(ema_max, (1.0 + step) / (10.0 + step))
    current = network.state_dict()
    keys = list(ema)
    torch._foreach_lerp_([ema[k] for k in keys], [current[k] for k in keys], 1.0 - decay)


@contextlib.contextmanager
def averaged_weights(network: torch.nn.Module,
                     ema: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load the EMA weights into ``network`` (no-op when ``ema`` is ``None``)."""
    if ema is None:
        yield
        return
    backup = {k: v.detach().clone() for k, v in network.state_dict().items() if k in ema}
    network.load_state_dict(ema, strict=False)
    try:
        yield
    finally:
        network.load_state_dict(backup, strict=False)
