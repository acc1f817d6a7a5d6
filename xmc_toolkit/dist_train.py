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
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn

from .batching import is_weighted
from .device import resolve_device
from .distributed import (
    shard_range,
    shard_ranges,
    sharded_full_softmax_loss,
    sharded_sampled_softmax_loss,
    sharded_topk,
    sum_allreduce_hook,
)
from .errors import CheckpointError, ConfigError
from .loss_log import LossLog

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
    "build_parser",
    "main",
    "MANIFEST_FILE",
    "SHARD_DIR",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SHARD_DIR = "sharded"
ENCODER_FILE = "encoder.safetensors"


# ------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or run alone when ``WORLD_SIZE`` <= 1.

    The device is chosen per ``LOCAL_RANK`` (``cuda:LOCAL_RANK`` when ``device`` resolves to
    CUDA); the backend is NCCL on CUDA and gloo on CPU unless ``backend`` names one.
    An already initialized default group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                "lower --nproc-per-node or use --device cpu"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                           str(dist.get_backend()))
    if world <= 1:
        return DistContext(0, 1, 0, dev, "none")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"backend={backend!r} is unknown; use auto, nccl or gloo (--backend)")
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


# ------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------
_INIT_BLOCK = 4096


def init_label_rows(start: int, stop: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Initial label embeddings of rows ``[start, stop)``: ``[stop - start, dim] float32``.

    Rows are drawn in fixed blocks of 4096 with a generator seeded by ``(seed, block)``, so the
    initial table is the same for every number of shards.
    """
    out = torch.empty(max(0, stop - start), dim)
    b0, b1 = start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)
    for b in range(b0, b1):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b + 17)
        block = torch.randn(_INIT_BLOCK, dim, generator=g) * std  # [4096, d]
        lo, hi = max(start, b * _INIT_BLOCK), min(stop, (b + 1) * _INIT_BLOCK)
        out[lo - start : hi - start] = block[lo - b * _INIT_BLOCK : hi - b * _INIT_BLOCK]
    return out


class ShardedXMCNetwork(nn.Module):
    """The encoder of :class:`xmc_toolkit.train.XMCNetwork` and one row shard of its label table.

    Args:
        num_features: ``D``.
        num_labels: ``L`` (global).
        config: a ``TrainConfig`` (``dim``, ``hidden``, ``dropout``, ``norm``, ``linear_only``,
            ``label_bias``, ``seed`` are read).
        rank, world_size: which shard this is.

    Attributes:
        label_offset / num_local: the shard is rows ``[label_offset, label_offset + num_local)``.
        weight: ``nn.Embedding(L_r, d)``; bias: ``nn.Embedding(L_r, 1)`` or ``None``.
    """

    def __init__(self, num_features: int, num_labels: int, config: Any, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        from .train import build_encoder, init_bag

        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.rank, self.world_size = rank, world_size
        lo, hi = shard_range(num_labels, rank, world_size)
        self.label_offset, self.num_local = lo, hi - lo
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # identical encoder on every rank
            # dense bag gradients: DDP all-reduces them (NCCL has no sparse all-reduce)
            self.encoder = build_encoder(num_features, config, sparse_grad=False)
            init_bag(self.encoder, config)
        self.weight = nn.Embedding(self.num_local, config.dim)
        with torch.no_grad():
            self.weight.weight.copy_(init_label_rows(lo, hi, config.dim, config.seed))
        self.bias: nn.Embedding | None = None
        if config.label_bias:
            self.bias = nn.Embedding(self.num_local, 1)
            nn.init.zeros_(self.bias.weight)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, d]``."""
        return self.encoder(indices, offsets, weights)

    def label_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight] + ([self.bias.weight] if self.bias is not None else [])

    @property
    def local_bias(self) -> torch.Tensor | None:
        """``[L_r]`` bias parameter view or ``None``."""
        return None if self.bias is None else self.bias.weight.view(-1)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def sharded_predict_topk(network: ShardedXMCNetwork, X: sp.csr_matrix, k: int, *,
                         batch_size: int = 2048, chunk_size: int = 65536) -> np.ndarray:
    """Exact top-k label ids ``int64 [N, k]`` of preprocessed rows ``X``, on every rank.

    Collective: every rank must call it with the same ``X``. Each rank encodes the same
    blocks of rows (the encoder is replicated), scores them on its shard by chunks, and the
    per-shard top-k lists are all-gathered and merged.
    """
    from .batching import csr_to_bag

    device = network.weight.weight.device
    was = network.training
    network.eval()
    out: list[np.ndarray] = []
    try:
        for s in range(0, X.shape[0], batch_size):
            idx, off, w = csr_to_bag(X[s : s + batch_size], device=device)
            q = network(idx, off, w).float()  # [b, d]
            _, ids = sharded_topk(q, network.weight.weight, network.local_bias, k,
                                  network.label_offset, chunk_size=chunk_size, replicated=True)
            out.append(ids.cpu().numpy())
    finally:
        network.train(was)
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


# ------------------------------------------------------------------------------------------
# sharded checkpoints
# ------------------------------------------------------------------------------------------
def _shard_file(rank: int, world: int) -> str:
    return f"labels-{rank:05d}-of-{world:05d}.safetensors"


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from ._fileio import atomic_write

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(cpu, str(p)))


def save_sharded(out_dir: str | os.PathLike[str], network: ShardedXMCNetwork, ctx: DistContext,
                 *, config: Any, preprocessor: Any, label_names: list[str] | None,
                 label_counts: np.ndarray, num_train: int,
                 summary: dict[str, Any] | None = None) -> Path:
    """Write a sharded checkpoint (collective: every rank calls it).

    Layout of ``out_dir``: ``labels-RRRRR-of-WWWWW.safetensors`` per rank (``weight [L_r, d]``,
    ``bias [L_r]``), ``encoder.safetensors`` (encoder state, ``preprocess.idf``) and
    ``manifest.json`` (rank 0; row ranges, shapes, config, label vocabulary), written last so a
    complete manifest means a complete checkpoint.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": network.weight.weight}
    if network.bias is not None:
        tensors["bias"] = network.bias.weight.view(-1)
    _atomic_save(out / _shard_file(ctx.rank, ctx.world_size), tensors)
    if ctx.is_main:
        enc = {f"encoder.{k}": v for k, v in network.encoder.state_dict().items()}
        if preprocessor.idf is not None:
            enc["preprocess.idf"] = torch.from_numpy(np.ascontiguousarray(preprocessor.idf))
        _atomic_save(out / ENCODER_FILE, enc)
    ctx.barrier()
    if ctx.is_main:
        manifest = {
            "format": "xmc-toolkit-sharded", "version": 1,
            "num_labels": network.num_labels, "num_features": network.num_features,
            "dim": int(network.weight.weight.shape[1]), "bias": network.bias is not None,
            "world_size": ctx.world_size,
            "shards": [{"rank": r, "file": _shard_file(r, ctx.world_size), "start": a, "stop": b}
                       for r, (a, b) in enumerate(shard_ranges(network.num_labels,
                                                               ctx.world_size))],
            "encoder_file": ENCODER_FILE,
            "l2_normalize": bool(preprocessor.l2_normalize),
            "train_config": config.to_dict(),
            "label_names": label_names,
            "label_counts": [int(c) for c in label_counts],
            "num_train": int(num_train),
            "summary": summary,
        }
        from ._fileio import atomic_write_text

        atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2))
    ctx.barrier()
    return out


def read_manifest(sharded_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a sharded checkpoint; :class:`CheckpointError` when absent or corrupt."""
    path = Path(sharded_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; pass the 'sharded' directory "
                              "written by distributed training")
    try:
        man = json.loads(path.read_text())
        if man.get("format") != "xmc-toolkit-sharded":
            raise ValueError(f"format is {man.get('format')!r}")
        ranges = [(int(s["start"]), int(s["stop"])) for s in man["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid sharded manifest ({exc})") from exc
    L = int(man["num_labels"])
    flat = sorted(ranges)
    if not flat or flat[0][0] != 0 or flat[-1][1] != L or any(
            a[1] != b[0] for a, b in zip(flat, flat[1:])):
        raise CheckpointError(f"{str(path)!r}: shard ranges {ranges} do not tile [0, {L})")
    return man


def read_label_rows(sharded_dir: str | os.PathLike[str], start: int, stop: int,
                    manifest: dict[str, Any] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[start, stop)`` of the label table of a sharded checkpoint, from whichever shard
    files hold them (any number of saving ranks): ``(weight [n, d], bias [n] or None)``."""
    from safetensors import safe_open

    d = Path(sharded_dir)
    man = manifest or read_manifest(d)
    dim = int(man["dim"])
    weight = torch.empty(max(0, stop - start), dim)
    bias = torch.empty(max(0, stop - start)) if man["bias"] else None
    for s in man["shards"]:
        a, b = max(start, int(s["start"])), min(stop, int(s["stop"]))
        if a >= b:
            continue
        path = d / s["file"]
        try:
            with safe_open(str(path), framework="pt") as fh:
                lo = a - int(s["start"])
                weight[a - start : b - start] = fh.get_slice("weight")[lo : lo + b - a]
                if bias is not None:
                    bias[a - start : b - start] = fh.get_slice("bias")[lo : lo + b - a]
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{str(path)!r} is missing or unreadable ({exc}); the sharded "
                                  "checkpoint is incomplete") from exc
    return weight, bias


def _read_encoder(sharded_dir: Path, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = sharded_dir / man["encoder_file"]
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} is missing or unreadable ({exc})") from exc


def load_sharded_network(sharded_dir: str | os.PathLike[str], rank: int = 0,
                         world_size: int = 1) -> ShardedXMCNetwork:
    """Rebuild the network of shard ``rank`` of ``world_size`` (any count, not only the saving
    one) from a sharded checkpoint, on CPU."""
    from .train import TrainConfig

    d = Path(sharded_dir)
    man = read_manifest(d)
    cfg = TrainConfig.from_dict(man["train_config"])
    net = ShardedXMCNetwork(int(man["num_features"]), int(man["num_labels"]), cfg, rank,
                            world_size)
    enc = _read_encoder(d, man)
    state = {k[len("encoder."):]: v for k, v in enc.items() if k.startswith("encoder.")}
    try:
        net.encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d)!r}: encoder does not match its config ({exc})") from exc
    w, b = read_label_rows(d, net.label_offset, net.label_offset + net.num_local, man)
    with torch.no_grad():
        net.weight.weight.copy_(w)
        if net.bias is not None and b is not None:
            net.bias.weight.copy_(b[:, None])
    return net


def consolidate(sharded_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Merge a sharded checkpoint into one normal model directory (``xmc eval`` / ``predict``).

    Runs in one process and holds the whole ``[L, d]`` table in memory once.
    """
    from .train import Preprocessor, TrainConfig, XMCNetwork, save_model_dir

    d = Path(sharded_dir)
    man = read_manifest(d)
    cfg = TrainConfig.from_dict(man["train_config"])
    D, L = int(man["num_features"]), int(man["num_labels"])
    net = XMCNetwork(D, L, cfg)
    enc = _read_encoder(d, man)
    state = {k: v for k, v in enc.items() if k.startswith("encoder.")}
    w, b = read_label_rows(d, 0, L, man)
    state["labels.weight.weight"] = w
    if b is not None:
        state["labels.bias.weight"] = b[:, None]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d)!r} does not match its config ({exc})") from exc
    idf = enc.get("preprocess.idf")
    pre = Preprocessor(None if idf is None else idf.numpy(), bool(man["l2_normalize"]))
    counts = np.asarray(man.get("label_counts") or [0] * L, dtype=np.int64)
    return save_model_dir(out_dir, net, pre, cfg, label_names=man.get("label_names"),
                          label_counts=counts, num_train=int(man.get("num_train", 1)),
                          summary=man.get("summary"))


# ------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------
Callback = Callable[[str, dict[str, Any]], None]


def _clip_sharded(encoder_params: Sequence[nn.Parameter], label_params: Sequence[nn.Parameter],
                  max_norm: float, ctx: DistContext) -> float:
    """Clip by the global L2 norm of the (replicated) encoder grads and all label shards."""
    def sq(params: Sequence[nn.Parameter]) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.coalesce() if p.grad.is_sparse else p.grad
            if p.grad.is_sparse:
                p.grad = g
            vals = g._values() if g.is_sparse else g
            out = out + vals.double().pow(2).sum()
        return out

    label_sq = sq(label_params)
    if ctx.distributed:
        dist.all_reduce(label_sq)
    total = (sq(encoder_params) + label_sq).sqrt()
    scale = float(min(1.0, max_norm / (float(total) + 1e-6)))
    if scale < 1.0:
        for p in [*encoder_params, *label_params]:
            if p.grad is not None:
                (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale)
    return float(total)


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
        from .sampling import make_sampler

        cfg, net = self.config, self.network
        assert net is not None
        name, kwargs = cfg.sampler, {}
        if name.startswith("midx"):
            kwargs = dict(num_codewords=cfg.resolved_codewords(net.num_local),
                          quantizer=cfg.quantizer if name == "midx" else name.split("-")[1],
                          within_cell=cfg.within_cell, alpha=cfg.popularity_alpha,
                          seed=cfg.seed + 7919 * self.ctx.rank)
            name = "midx"
        elif name == "popularity":
            kwargs = dict(alpha=cfg.popularity_alpha)
        sampler = make_sampler(name, net.num_local, label_counts=torch.from_numpy(counts),
                               **kwargs)
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
        from .train import Preprocessor, _split, inverse_propensity_from_counts

        cfg, ctx = self.config, self.ctx
        cfg.validate_for_data(train.num_points, train.num_features, train.num_labels)
        problems = []
        if cfg.loss == "negative-sampling":
            problems.append("loss='negative-sampling' is not available with several processes;"
                            " use --loss full or --loss sampled")
        if cfg.ensemble > 1:
            problems.append(f"ensemble={cfg.ensemble} is not available with several processes; "
                            "use --ensemble 1 (or train the ensemble in one process)")
        if cfg.correct_target:
            problems.append("correct_target is not available with several processes; drop "
                            "--correct-target")
        if cfg.bag_lr > 0:
            problems.append(f"bag_lr={cfg.bag_lr} is not available with several processes (the"
                            " EmbeddingBag is dense there); drop --bag-lr")
        if cfg.label_init == "pifa":
            problems.append("label_init='pifa' is not available with several processes yet;"
                            " use --label-init random (or auto)")
        if cfg.batch_size < ctx.world_size:
            problems.append(f"batch_size={cfg.batch_size} is smaller than the {ctx.world_size} "
                            "processes; raise --batch-size")
        if problems:
            raise ConfigError(problems)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ per rank
        np.random.seed(cfg.seed % (2**32))
        if val is None and cfg.val_fraction > 0:
            train, val = _split(train, cfg.val_fraction, cfg.seed)
        # auto values resolved as in one process (dropout, epochs); an auto ensemble is one
        # member here (several members need one process)
        X_raw = sp.csr_matrix(train.X, dtype=np.float32)
        cfg = self.config = dataclasses.replace(
            cfg.resolved_for_data(train.num_points, weighted_input=is_weighted(X_raw)),
            ensemble=max(1, cfg.ensemble), label_init="random")
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
        net.to(ctx.device).train()
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
        total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        bundle = build_optimizers(
            net.encoder.parameters(), net.label_parameters(), lr=cfg.lr,
            label_lr=cfg.label_lr or cfg.lr, weight_decay=cfg.weight_decay,
            label_optimizer=cfg.resolved_label_optimizer(L), warmup_steps=cfg.warmup_steps,
            total_steps=total_steps, schedule=cfg.schedule)
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(cfg.seed + 1 + 7919 * ctx.rank)

        step, best, best_epoch, best_value, bad = 0, {}, 0, None, 0
        best_state: dict[str, torch.Tensor] | None = None
        t_start = time.perf_counter()
        progress = _progress(show_progress and ctx.is_main, total_steps)
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
                    q = encoder(batch.indices, batch.offsets, batch.weights).float()  # [B_r, d]
                    if sampled:
                        loss = sharded_sampled_softmax_loss(
                            q, net.weight.weight, None if net.bias is None else net.bias.weight,
                            batch.pos_ids, batch.pos_mask, lo, self.sampler, self.quota,
                            shared=cfg.shared_negatives, generator=gen,
                            correction="conditional", sparse_grad=True)
                    else:
                        loss = sharded_full_softmax_loss(
                            q, net.weight.weight, net.local_bias, batch.pos_ids, batch.pos_mask,
                            lo, chunk_size=cfg.eval_chunk_size)
                    loss.backward()
                    if cfg.clip_grad > 0:
                        _clip_sharded(list(net.encoder.parameters()), net.label_parameters(),
                                      cfg.clip_grad, ctx)
                    bundle.step()
                    step += 1
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
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        result = {"history": self.history, "best": best,
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


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Any:
    if not show:
        yield lambda n=1: None
        return
    from rich.progress import Progress

    with Progress() as prog:
        task = prog.add_task("training", total=total)
        yield lambda n=1: prog.advance(task, n)


# ------------------------------------------------------------------------------------------
# command line: the flags of `xmc train`
# ------------------------------------------------------------------------------------------
def build_parser() -> Any:
    """An ``argparse`` parser with one ``--flag`` per ``TrainConfig`` field, plus the data and
    output arguments of ``xmc train`` (``TRAIN``, ``--val``, ``--out``, ``--config``)."""
    import argparse
    import typing

    from .train import TrainConfig

    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m xmc_toolkit.distributed",
        description="Distributed training (DDP encoder, label table sharded across processes).")
    p.add_argument("train", nargs="?", default=None,
                   help="training data file (any format `xmc data` reads); or --data")
    p.add_argument("--data", dest="data", default=None,
                   help="training data file, as in `xmc train --data`")
    p.add_argument("--val", default=None, help="validation data file")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig values")
    p.add_argument("--no-consolidate", action="store_true",
                   help="keep only the sharded checkpoint (no single model directory)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on rank 0")
    p.add_argument("--backend", default="auto", help="auto | nccl | gloo")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ, help_ = hints[f.name], f.metadata.get("help", "")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
        elif typing.get_origin(typ) is tuple:
            p.add_argument(flag, dest=f.name, default=None, help=help_ + " (comma separated)",
                           type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()))
        else:
            base = typ if typ in (int, float) else str
            p.add_argument(flag, dest=f.name, default=None, type=base, help=help_)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``torchrun -m xmc_toolkit.distributed`` (and of ``xmc_toolkit.train``'s
    ``__main__`` when ``WORLD_SIZE > 1``). Returns the training result."""
    from .data import load
    from .train import TrainConfig

    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if (args.train is None) == (args.data is None):
        parser.error("give the training data once: --data TRAIN (as in `xmc train`) or TRAIN")
    train_path = args.data if args.data is not None else args.train
    base = TrainConfig.from_json(args.config, validate=False) if args.config else TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = base.merged({k: v for k, v in vars(args).items() if k in names})
    ctx = init_distributed(cfg.device, args.backend)
    try:
        train = load(train_path)
        val = load(args.val) if args.val else None
        trainer = DistributedTrainer(cfg, ctx, args.out,
                                     consolidate_model=not args.no_consolidate)
        return trainer.fit(train, val, show_progress=args.progress)
    finally:
        if ctx.distributed:
            dist.destroy_process_group()
