"""Multi-process training: the one :class:`~xmc_toolkit.train.Trainer` with the sharded placement.

Launch with ``torchrun --nproc-per-node N -m xmc_toolkit.train --data TRAIN --out DIR [flags]``
(every flag of ``xmc train``, which is the parser; see ``docs/distributed.md``). Every rank loads
the data set and fits the same preprocessing; each *global* batch of ``--batch-size`` rows (the
same batches, in the same order, as a single-process run with that seed) is split across the
ranks. The encoder is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` with a
*summing* gradient hook; rank ``r`` owns label rows ``shard_range(L, r, W)`` and computes the
sharded full or sampled softmax of :mod:`xmc_toolkit.distributed`, so a step equals the
single-process step on the global batch (up to float rounding and the per-shard sampling draws).
What differs from one process lives in :class:`xmc_toolkit.placement.ShardedPlacement`; the loop,
validation, early stopping, EMA, checkpoints (``checkpoint/rank-R-of-W`` per rank) and exact
``--resume`` are the trainer's.

Outputs in ``--out``: ``sharded/`` (one safetensors file per rank with its row range, the
encoder, ``manifest.json``), ``metrics.jsonl``, and, unless ``--no-consolidate``, a normal model
directory (``model.safetensors``, ``config.json``, ``labels.json``) that ``xmc eval`` /
``xmc predict`` load. :func:`read_label_rows` reads any row range of a sharded checkpoint, so it
loads on any number of ranks (:func:`load_sharded_network`) or in one process
(:func:`consolidate`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .distributed import DistContext, init_distributed
from .model_dir import (
    MANIFEST_FILE,
    SHARD_DIR,
    consolidate,
    load_sharded_network,
    read_label_rows,
    read_manifest,
    save_sharded,
)
from .network import ShardedXMCNetwork, init_label_rows, sharded_predict_topk
from .placement import ShardedPlacement
from .train import Callback, Trainer

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


class DistributedTrainer(Trainer):
    """:class:`~xmc_toolkit.train.Trainer` with :class:`~xmc_toolkit.placement.ShardedPlacement`.

    Args:
        config: a ``TrainConfig`` (same fields and meaning as ``xmc train``; ``batch_size``
            is the *global* batch, split across ranks). What the sharded placement cannot do
            is refused up front (:meth:`TrainConfig.sharded_problems`).
        ctx: from :func:`init_distributed`.
        out_dir: output directory (``metrics.jsonl`` and the model by rank 0, shards and
            per-rank checkpoints by every rank) or ``None``.
        callbacks: the trainer's ``callback(event, payload)`` hooks, on every rank.
        consolidate_model: also write a normal model directory into ``out_dir`` at the end.
    """

    def __init__(self, config: Any, ctx: DistContext, out_dir: str | os.PathLike[str] | None = None,
                 callbacks: Sequence[Callback] = (), consolidate_model: bool = True) -> None:
        super().__init__(config, out_dir, callbacks,
                         placement=ShardedPlacement(ctx, consolidate_model))
        self.ctx = ctx

    @property
    def history(self) -> list[dict[str, Any]]:
        return [] if self.result is None else self.result.history

    def fit(  # type: ignore[override]
            self, train: Any, val: Any = None, *, show_progress: bool = False,
            resume: bool = False, force: bool = False, init: Any = None) -> dict[str, Any]:
        """Train (collective: every rank calls it with the same data); returns the
        :class:`~xmc_toolkit.train.TrainResult` as a dict, with ``world_size``."""
        result = super().fit(train, val, show_progress=show_progress and self.ctx.is_main,
                             resume=resume, force=force, init=init)
        return {**result.to_dict(), "world_size": self.ctx.world_size}
