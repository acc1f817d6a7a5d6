"""Label placements: where the label table lives while the one :class:`~xmc_toolkit.train.Trainer`
loop trains.

* :class:`LocalPlacement` (the default): the whole ``[L, d]`` table in this process.
* :class:`ShardedPlacement`: rows split across the ranks of a ``torch.distributed`` process group
  (``torchrun``), the encoder replicated and wrapped in ``DistributedDataParallel`` with a
  summing gradient hook; every *global* batch (the batches of one process with that seed) is
  split across the ranks, and the sharded losses of :mod:`xmc_toolkit.distributed` make a step
  equal to the one-process step on the global batch, up to float rounding.

A placement owns only what differs between the two: the network a rank builds (its label rows),
the batches it sees, the loss and its collectives, gradient clipping, top-k, the sampler over its
rows, where its checkpoint goes and how the model directory is written. The loop (validation,
early stopping, EMA, AMP, ensembles, callbacks, SIGINT, checkpoints, exact resume) is the
trainer's, the same for both. A new placement implements the methods of :class:`LocalPlacement`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .batching import BatchIterator
from .device import amp_setup as _amp_setup
from .device import resolve_device
from .distributed import (
    DistContext,
    all_gather_no_grad,
    all_gather_with_grad,
    replicated_all_reduce_sum,
    sharded_full_softmax_loss,
    sharded_sampled_softmax_loss,
    sum_allreduce_hook,
)
from .model_dir import (CKPT_DIR, SHARD_DIR, consolidate, prepare_output_dir, save_model_dir,
                        save_sharded)
from .network import (ShardedXMCNetwork, XMCNetwork, pifa_init_, pifa_init_shard_,
                      predict_topk_network, sharded_predict_topk)
from .objective import compute_loss, sampler_from_config
from .optim import clip_grad_norm
from .train_config import TrainConfig

__all__ = ["LocalPlacement", "ShardedPlacement", "RankBatches"]


class LocalPlacement:
    """The whole label table in this process (``xmc train`` without torchrun)."""

    name = "local"
    rank = 0
    world_size = 1
    is_main = True

    # -- set-up ----------------------------------------------------------------------------
    def problems(self, config: TrainConfig, train: Any, *, init: Any = None,
                 featurizer: Any = None) -> list[str]:
        """What this placement cannot do with ``config`` (none here)."""
        return []

    def device(self, config: TrainConfig) -> torch.device:
        return resolve_device(config.device)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))

    def generator_seed(self, config: TrainConfig) -> int:
        """Seed of the negative-sample generator."""
        return config.seed + 1

    def build_network(self, D: int, L: int, config: TrainConfig, device: torch.device) -> Any:
        return XMCNetwork(D, L, config).to(device)

    def pifa_init(self, network: Any, X: sp.csr_matrix, Y: sp.csr_matrix,
                  batch_size: int) -> None:
        pifa_init_(network, X, Y, batch_size)

    def batches(self, X: sp.csr_matrix, Y: sp.csr_matrix, config: TrainConfig,
                device: torch.device) -> BatchIterator:
        return BatchIterator(X, Y, config.batch_size, shuffle=True, seed=config.seed,
                             device=device)

    def make_sampler(self, config: TrainConfig, network: Any, label_counts: np.ndarray,
                     device: torch.device) -> Any:
        return sampler_from_config(config, network.num_labels, label_counts)

    # -- a step ------------------------------------------------------------------------------
    def forward(self, network: Any, batch: Any) -> torch.Tensor:
        """Queries ``[B, n * d]`` of a batch."""
        return network(batch.indices, batch.offsets, batch.weights)

    def loss(self, network: Any, q: torch.Tensor, batch: Any, loss_name: str, sampler: Any,
             generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
        cfg = config
        return compute_loss(network, q, batch.pos_ids, batch.pos_mask, loss_name,
                            sampler=sampler, negatives=cfg.negatives,
                            shared=cfg.shared_negatives, generator=generator,
                            correct_target=cfg.correct_target, chunk_size=cfg.eval_chunk_size,
                            bce_weight=cfg.bce_weight, log_q_correction=cfg.log_q_correction,
                            ids_checked=True)  # csr_to_padded checked them on the host

    def clip(self, network: Any, max_norm: float) -> float:
        return clip_grad_norm(list(network.parameters()), max_norm)

    def any_rank(self, flag: bool) -> bool:
        """``flag`` of any rank (an interrupt seen by one stops every rank at the same step)."""
        return flag

    # -- evaluation --------------------------------------------------------------------------
    def predict_topk(self, network: Any, X: sp.csr_matrix, k: int,
                     config: TrainConfig) -> np.ndarray:
        ids, _ = predict_topk_network(network, X, k, batch_size=config.eval_batch_size,
                                      chunk_size=config.eval_chunk_size)
        return ids

    # -- files -------------------------------------------------------------------------------
    def lock(self, out_dir: Path) -> Any:
        from ._fileio import OutputLock

        return OutputLock(out_dir, what="`xmc train` / training run")

    def prepare_output(self, out_dir: Path, force: bool) -> None:
        prepare_output_dir(out_dir, force=force)

    def barrier(self) -> None:
        pass

    def checkpoint_dir(self, out_dir: Path) -> Path:
        return out_dir / CKPT_DIR

    def save_model(self, trainer: Any, summary: dict[str, Any] | None) -> None:
        sampler_state = None
        if trainer.sampler is not None and trainer.sampler.needs_update:
            with contextlib.suppress(Exception):
                sampler_state = trainer.sampler.state_dict()
        save_model_dir(trainer.out_dir, trainer.network, trainer.preprocessor, trainer.config,
                       label_names=trainer.label_names, label_counts=trainer.label_counts,
                       num_train=trainer.num_train, sampler_state=sampler_state,
                       summary=summary, featurizer=trainer.featurizer)


class RankBatches(BatchIterator):
    """The batches of one process with the same seed, each split across the ranks: rank ``r``
    gets part ``r`` of ``np.array_split(rows, world_size)``. A last batch with fewer rows than
    ranks is dropped (every rank needs one). State and resume are :class:`BatchIterator`'s."""

    def __init__(self, *args: Any, rank: int, world_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = int(rank), int(world_size)
        tail = self.num_rows % self.batch_size
        if 0 < tail < self.world_size:
            self.drop_last = True

    def make_batch(self, rows: np.ndarray) -> Any:
        return super().make_batch(np.array_split(np.asarray(rows), self.world_size)[self.rank])


class ShardedPlacement(LocalPlacement):
    """Label rows ``shard_range(L, rank, world_size)`` on each rank of ``ctx``'s process group.

    Args:
        ctx: from :func:`xmc_toolkit.distributed.init_distributed` (a 1-process context runs
            the sharded code path alone).
        consolidate_model: also write one normal model directory into ``out_dir`` (rank 0)
            beside the per-rank shards in ``out_dir/sharded``.
    """

    name = "sharded"

    def __init__(self, ctx: DistContext, consolidate_model: bool = True) -> None:
        self.ctx = ctx
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.is_main = ctx.is_main
        self.consolidate_model = consolidate_model
        self.encoder: nn.Module | None = None  # the DDP-wrapped encoder
        self.quota = 0

    def problems(self, config: TrainConfig, train: Any, *, init: Any = None,
                 featurizer: Any = None) -> list[str]:
        p = config.sharded_problems(self.world_size, train.num_points, train.num_features,
                                    train.num_labels)
        if _amp_setup(config.amp, self.ctx.device)[1] is not None:
            p.append("amp='auto' picks fp16 with a GradScaler on this GPU (no bf16), which the "
                     "sharded placement cannot use; pass --amp off")
        if init is not None:
            p.append("--init-from is not available with the sharded placement yet; grow the "
                     "model in one process")
        if featurizer is not None:
            p.append("raw-text training data is not available with the sharded placement yet; "
                     "featurize it first or train in one process")
        return p

    def device(self, config: TrainConfig) -> torch.device:
        return self.ctx.device

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # the same network on every rank (build_network)
        np.random.seed(seed % (2**32))

    def generator_seed(self, config: TrainConfig) -> int:
        return config.seed + 1 + 7919 * self.rank

    def build_network(self, D: int, L: int, config: TrainConfig, device: torch.device) -> Any:
        net = ShardedXMCNetwork(D, L, config, self.rank, self.world_size).to(device)
        if self.rank:  # dropout masks differ per rank; rank 0 draws on as one process does
            torch.manual_seed(config.seed + self.rank)
        self.encoder = net.encoder
        if self.ctx.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                net.encoder, device_ids=[device.index] if device.type == "cuda" else None)
            ddp.register_comm_hook(None, sum_allreduce_hook)
            self.encoder = ddp
        # proportional allocation: the quotas M_r sum to about --negatives, as in one process
        self.quota = max(1, round(config.negatives * net.num_local / L))
        return net

    def pifa_init(self, network: Any, X: sp.csr_matrix, Y: sp.csr_matrix,
                  batch_size: int) -> None:
        pifa_init_shard_(network, X, Y, batch_size)

    def batches(self, X: sp.csr_matrix, Y: sp.csr_matrix, config: TrainConfig,
                device: torch.device) -> BatchIterator:
        return RankBatches(X, Y, config.batch_size, shuffle=True, seed=config.seed,
                           device=device, rank=self.rank, world_size=self.world_size)

    def make_sampler(self, config: TrainConfig, network: Any, label_counts: np.ndarray,
                     device: torch.device) -> Any:
        lo, hi = network.label_offset, network.label_offset + network.num_local
        sampler = sampler_from_config(config, network.num_local, label_counts[lo:hi],
                                      seed=config.seed + 7919 * self.rank)
        if hasattr(sampler, "to"):
            sampler = sampler.to(device) or sampler
        return sampler

    def forward(self, network: Any, batch: Any) -> torch.Tensor:
        assert self.encoder is not None
        return self.encoder(batch.indices, batch.offsets, batch.weights)

    def loss(self, network: Any, q: torch.Tensor, batch: Any, loss_name: str, sampler: Any,
             generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
        lo = network.label_offset
        if loss_name == "full" and not self.ctx.distributed:
            # one process: the collectives are identities and the sharded softmax is the
            # local kernel (to float rounding: tests/test_distributed.py), so use that one
            return super().loss(network, q, batch, loss_name, sampler, generator, config)
        if loss_name == "sampled":  # one member (sharded_problems refuses sampled ensembles)
            return sharded_sampled_softmax_loss(
                q, network.weight.weight, None if network.bias is None else network.bias.weight,
                batch.pos_ids, batch.pos_mask, lo, sampler, self.quota,
                shared=config.shared_negatives, generator=generator, correction="conditional",
                sparse_grad=True)
        return sharded_full_loss(network, q, batch.pos_ids, batch.pos_mask, lo,
                                 config.eval_chunk_size, config.bce_weight)

    def clip(self, network: Any, max_norm: float) -> float:
        import torch.distributed as dist

        return clip_grad_norm(list(network.encoder.parameters()), max_norm,
                              sharded=network.label_parameters(),
                              all_reduce=dist.all_reduce if self.ctx.distributed else None)

    def any_rank(self, flag: bool) -> bool:
        if not self.ctx.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def predict_topk(self, network: Any, X: sp.csr_matrix, k: int,
                     config: TrainConfig) -> np.ndarray:
        return sharded_predict_topk(network, X, k, batch_size=config.eval_batch_size,
                                    chunk_size=config.eval_chunk_size)

    def lock(self, out_dir: Path) -> Any:
        # one lock for the run, held by rank 0 (the ranks are one training run)
        return super().lock(out_dir) if self.is_main else contextlib.nullcontext()

    def prepare_output(self, out_dir: Path, force: bool) -> None:
        if not force or self.is_main:  # read-only without --force: every rank refuses alike
            prepare_output_dir(out_dir, force=force)
        self.barrier()

    def barrier(self) -> None:
        self.ctx.barrier()

    def checkpoint_dir(self, out_dir: Path) -> Path:
        return out_dir / CKPT_DIR / f"rank-{self.rank:05d}-of-{self.world_size:05d}"

    def save_model(self, trainer: Any, summary: dict[str, Any] | None) -> None:
        """Collective: every rank writes its shard; rank 0 the manifest and (unless
        ``consolidate_model`` is off) one normal model directory."""
        out = trainer.out_dir
        shard_dir = out / SHARD_DIR
        save_sharded(shard_dir, trainer.network, self.ctx, config=trainer.config,
                     preprocessor=trainer.preprocessor, label_names=trainer.label_names,
                     label_counts=trainer.label_counts, num_train=trainer.num_train,
                     summary=summary)
        if self.consolidate_model and self.is_main:
            consolidate(shard_dir, out)
        self.barrier()


def sharded_full_loss(net: ShardedXMCNetwork, q: torch.Tensor, pos_ids: torch.Tensor,
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
            loss = loss + bce_weight * sharded_bce(qi, Wi, b, pos_ids, pos_mask, lo)
        parts.append(loss)
    return parts[0] if n == 1 else torch.stack(parts).mean()


def sharded_bce(q: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
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
