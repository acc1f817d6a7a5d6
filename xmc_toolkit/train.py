"""Training: :class:`TrainConfig`, the :class:`XMCNetwork` and the :class:`Trainer` loop.

The network is ``SparseEncoder`` (EmbeddingBag + MLP, on TF-IDF + L2-normalized inputs) giving
queries ``[B, d]``, scored against a ``LabelTable`` ``[L, d]`` (+ bias ``[L]``). Losses:

* ``full``: exact multi-label softmax over all labels (chunked; dense label gradient);
* ``sampled``: sampled softmax with log-q correction; negatives from a sampler (``uniform``,
  ``popularity``, ``log-uniform`` or the adaptive ``midx`` sampler of Chen et al. 2025, "Adaptive
  Sampled Softmax with Inverted Multi-Index"), label gradient sparse (only touched rows);
* ``negative-sampling``: binary logistic loss on positives and sampled negatives.

The loop validates every epoch (exact chunked top-k, :func:`xmc_toolkit.metrics.evaluate`), stops
early on a chosen metric, keeps the best weights, writes a JSONL metrics log, checkpoints
(model, optimizers, sampler, RNG) so that ``resume`` continues exactly, and stops with an
:class:`~xmc_toolkit.errors.XMCError` naming the step when the loss becomes NaN/inf.

Run ``python -m xmc_toolkit.train --help`` (same flags as ``xmc train``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .data.dataset import XMCDataset, split_rows
from .device import amp_setup as _amp_setup
from .device import resolve_device
from .errors import CheckpointError, ConfigError, XMCError
from .metrics import inverse_propensity_from_counts
from .model_dir import (CKPT_DIR, LOG_FILE, LoadedModel, load_model_dir, prepare_output_dir,
                        save_model_dir, verify_model_dir)
from .network import (Preprocessor, XMCNetwork, build_encoder, init_bag, network_bytes,
                      predict_topk_network)
from .network import pifa_init_ as _pifa_init_
from .objective import compute_loss, member_score_ids
from .optim import averaged_weights, ema_update_
from .optim import clip_grad_norm as _clip_grad_norm
from .progress import progress_bar as _progress
from .train_config import LOSSES, SAMPLERS, TrainConfig
# names of the modules split out of this one, still importable from here (older imports)
from .model_dir import (CHECKSUMS_FILE, CONFIG_FILE, LABELS_FILE, MODEL_FILE,  # noqa: F401
                        OUTPUT_FILES, SUMMARY_FILE)
from .network import host_memory_bytes  # noqa: F401
from .train_config import (AMP_MODES, AUTO_DROPOUT, AUTO_EPOCH_ROWS,  # noqa: F401
                           AUTO_INPUT_DROPOUT, EXACT_WITHIN_CELL_MAX_LABELS, LABEL_INITS,
                           METRIC_NAMES, NORMS, QUANTIZERS, SMALL_DATA_POINTS, TFIDF_MODES,
                           WITHIN_CELL)

if TYPE_CHECKING:
    from .grow import WarmStart

# the names this module exported before it was split by job (train_config, network,
# objective, model_dir, progress): kept so that `from xmc_toolkit.train import X` still works
__all__ = [
    "LOSSES",
    "SAMPLERS",
    "TrainConfig",
    "XMCNetwork",
    "Preprocessor",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "inverse_propensity_from_counts",
    "compute_loss",
    "member_score_ids",
    "build_encoder",
    "init_bag",
    "predict_topk_network",
    "save_model_dir",
    "load_model_dir",
    "verify_model_dir",
    "prepare_output_dir",
    "network_bytes",
    "LoadedModel",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------


class TrainingInterrupted(XMCError):
    """Training was interrupted (SIGINT or SIGTERM); a checkpoint of the current step was saved.
    ``resume`` continues it. ``signum`` is the signal (the CLI exits with ``128 + signum``)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`.

    Attributes:
        history: one dict per epoch (``epoch``, ``step``, ``loss``, ``examples_per_s``, val
            metrics ``val/P@1`` ...).
        best: validation metrics of the kept epoch (``{}`` without validation).
        best_epoch: 1-based epoch of ``best`` (or the last epoch).
        steps: optimizer steps taken in total.
        seconds: training wall time of this call.
        stopped_early: early stopping triggered.
        loss: resolved loss name; sampler: sampler name or ``None``.
        paused: ``max_steps`` stopped the run before its last epoch (``resume`` continues).
    """

    history: list[dict[str, Any]]
    best: dict[str, float]
    best_epoch: int
    steps: int
    seconds: float
    stopped_early: bool
    loss: str
    sampler: str | None
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Callback = Callable[[str, dict[str, Any]], None]


class Trainer:
    """Trains an :class:`XMCNetwork` on sparse data.

    Args:
        config: the run's :class:`TrainConfig` (validated against the data in :meth:`fit`).
        out_dir: model directory to write (weights, config, labels, ``metrics.jsonl``,
            ``checkpoint/``); ``None`` keeps everything in memory (no checkpoints).
        featurizer: the fitted text featurizer of raw-text training data, saved in the model
            directory (``None`` for feature-vector data).
        placement: where the label table lives (:mod:`xmc_toolkit.placement`):
            ``LocalPlacement()`` (default, the whole table here) or ``ShardedPlacement(ctx)``
            (rows across the ranks of a process group; every rank runs this same loop).
        callbacks: ``callback(event, state)`` hooks; events ``"train_begin"``, ``"epoch_begin"``,
            ``"step"`` (every step: ``step``, ``epoch``, ``lr``, ``loss`` -- the mean loss
            since the last read as a float on every ``log_every``-th step, else ``None`` --
            and ``loss_tensor``, this step's detached 0-d loss on the device: reading it syncs),
            ``"epoch_end"`` (with the epoch's record), ``"checkpoint"``, ``"train_end"``.
    """

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike[str] | None = None,
                 callbacks: Sequence[Callback] = (), featurizer: Any = None,
                 placement: Any = None) -> None:
        from .placement import LocalPlacement

        self.config = config.validate()
        self.placement = placement if placement is not None else LocalPlacement()
        self.featurizer = featurizer
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.callbacks = list(callbacks)
        self.network: XMCNetwork | None = None
        self.preprocessor: Preprocessor | None = None
        self.sampler: Any = None
        self.label_names: list[str] | None = None
        self.label_counts: np.ndarray | None = None
        self.num_train = 0
        self.result: TrainResult | None = None
        self._interrupted = False
        self._best_state: dict[str, torch.Tensor] | None = None
        self._ema: dict[str, torch.Tensor] | None = None
        self._sampler_loaded = False
        self._signum: int = signal.SIGINT
        self._fingerprint: dict[str, str | None] = {}
        self._force = False
        self._reset_loss_tracking()

    def _reset_loss_tracking(self) -> None:
        """Device-side loss accumulators of :meth:`_track_loss` / :meth:`_read_loss`."""
        from .loss_log import LossLog

        self._loss_log = LossLog()
        self._last_loss = math.nan  # mean loss of the last read (progress bar)

    # -- public -----------------------------------------------------------------------------
    def fit(self, train: XMCDataset, val: XMCDataset | None = None, *,
            show_progress: bool = False, resume: bool = False,
            force: bool = False, init: WarmStart | None = None) -> TrainResult:
        """Train (or continue training from ``out_dir/checkpoint`` when ``resume``).

        Args:
            train: training data (raw features; preprocessing is fitted here).
            val: validation data in the same feature/label space, or ``None`` (then
                ``val_fraction`` of ``train`` is held out when > 0).
            show_progress: rich progress bar with loss, examples/s and ETA.
            resume: continue the run saved in ``out_dir/checkpoint`` (same config and data:
                a fingerprint of the training and validation data is kept in every checkpoint
                and compared).
            force: without ``resume``, replace the earlier run in a non-empty ``out_dir``
                (:func:`prepare_output_dir`: refused otherwise); with ``resume``, continue even
                when the data's fingerprint differs from the checkpoint's.
            init: start from a parent model (:class:`xmc_toolkit.grow.WarmStart`: its
                preprocessing, grown weights, optimizer moments and MIDX state) instead of a
                fresh network (``xmc train --init-from``).

        ``out_dir`` is locked for the whole call (:class:`~xmc_toolkit._fileio.OutputLock`):
        a second trainer writing there fails at once, naming the first one's pid.

        Returns:
            A :class:`TrainResult` (also in ``self.result``).

        Raises:
            ConfigError: every config problem (including data-dependent ones) at once.
            XMCError: the loss became NaN/inf (names the step); checkpoints are kept.
            TrainingInterrupted: SIGINT arrived; a checkpoint was saved first.
            OutputError: another process is writing to ``out_dir``.
            CheckpointError: ``resume`` with another config or other data (nothing is written).
            OutputError: ``out_dir`` is not empty and neither ``resume`` nor ``force`` is set.
        """
        cfg = self.config
        # every check that needs no output directory comes first: a refused run writes nothing
        cfg.validate_for_data(train.num_points, train.num_features, train.num_labels)
        if val is not None and (val.num_features != train.num_features or
                                val.num_labels != train.num_labels):
            raise ConfigError(
                f"validation data has {val.num_features} features / {val.num_labels} labels but "
                f"training data has {train.num_features} / {train.num_labels}; use data with the "
                "same feature and label space (--val)")
        if resume and self.out_dir is None:
            raise ConfigError("resume needs an output directory (--out / --resume DIR)")
        problems = self.placement.problems(cfg, train, init=init, featurizer=self.featurizer)
        if problems:
            raise ConfigError(problems)
        if self.out_dir is None:
            return self._fit(train, val, show_progress, resume, force, init)
        with self.placement.lock(self.out_dir):
            if not resume:
                self.placement.prepare_output(self.out_dir, force)
            return self._fit(train, val, show_progress, resume, force, init)

    def _fit(self, train: XMCDataset, val: XMCDataset | None, show_progress: bool,
             resume: bool, force: bool, init: WarmStart | None) -> TrainResult:
        cfg = self.config
        place = self.placement
        device = place.device(cfg)
        place.seed(cfg.seed)
        self._best_state, self._sampler_loaded, self._interrupted = None, False, False
        self._ema = None
        self._reset_loss_tracking()

        self._fingerprint = {"train": train.fingerprint(),
                             "val": None if val is None else val.fingerprint()}
        self._force = force
        if val is None and cfg.val_fraction > 0:
            train, val = _split(train, cfg.val_fraction, cfg.seed)
        # resolve the auto values now: the saved config records what was built. Rows from the
        # text featurizer keep the model's IDF on top of the featurizer's (the pair chosen on
        # kjv-strongs' validation split, docs/data-formats.md); files already weighted do not.
        X_raw = sp.csr_matrix(train.X, dtype=np.float32)
        cfg = cfg.resolved_for_rows(X_raw, train.Y, featurized=self.featurizer is not None)
        if init is not None:  # a fine-tune keeps its parent's input transform
            cfg = dataclasses.replace(cfg, feature_power=init.preprocessor.power)
        self.config = cfg
        self.preprocessor = (init.preprocessor if init is not None else
                             Preprocessor.fit(X_raw, cfg.tfidf == "on", cfg.l2_normalize,
                                              cfg.feature_power))
        X = self.preprocessor.transform(X_raw)
        Y = sp.csr_matrix(train.Y, dtype=np.float32)
        X_val = None if val is None else self.preprocessor.transform(val.X)
        Y_val = None if val is None else sp.csr_matrix(val.Y)
        D, L = train.num_features, train.num_labels
        self.label_names = train.label_names
        self.label_counts = np.bincount(Y.indices, minlength=L).astype(np.int64)
        self.num_train = train.num_points
        inv_prop = inverse_propensity_from_counts(self.label_counts, self.num_train,
                                                  cfg.psp_a, cfg.psp_b)

        loss_name = cfg.resolved_loss(L)
        self.network = network = place.build_network(D, L, cfg, device)
        logger.info("encoder hidden widths %s (D=%d), bag optimizer %s, loss %s",
                    list(cfg.resolved_hidden(D)), D, cfg.resolved_bag_optimizer(D), loss_name)
        if init is not None:
            init.apply_network(network)  # the parent's encoder and (grown) label rows
        elif cfg.label_init == "pifa" and not resume:
            place.pifa_init(network, X, Y, cfg.eval_batch_size)
        network.train()
        if cfg.ema > 0:
            self._ema = {k: v.detach().clone() for k, v in network.state_dict().items()
                         if v.is_floating_point()}
        sampled = loss_name != "full"
        self.sampler = (place.make_sampler(cfg, network, self.label_counts, device)
                        if sampled else None)

        batches = place.batches(X, Y, cfg, device)
        steps_per_epoch = len(batches)
        total_steps = steps_per_epoch * cfg.epochs  # schedule horizon (max_steps only pauses)
        from .optim import build_optimizers

        label_opt = cfg.resolved_label_optimizer(L)
        bundle = build_optimizers(
            network.encoder_parameters(), network.label_parameters(), lr=cfg.lr,
            label_lr=cfg.label_lr or cfg.lr, weight_decay=cfg.weight_decay,
            label_optimizer=label_opt, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
            schedule=cfg.schedule, sparse_params=network.encoder.sparse_parameters(),
            sparse_lr=cfg.resolved_bag_lr())
        if init is not None and not resume:
            init.apply_optimizers(bundle)  # the parent's moments, this run's schedule
            init.apply_sampler(self.sampler)
        amp_dtype, scaler = _amp_setup(cfg.amp, device)
        sample_gen = torch.Generator(device=device)
        sample_gen.manual_seed(place.generator_seed(cfg))

        state: dict[str, Any] = {"step": 0, "epoch": 0, "history": [], "best": {},
                                 "best_epoch": 0, "best_value": None, "bad_epochs": 0,
                                 "stopped_early": False, "epoch_loss_sum": 0.0,
                                 "epoch_loss_count": 0, "epoch_examples": 0}
        if resume:
            self._load_checkpoint(network, bundle, batches, sample_gen, scaler, state)
            logger.info("resumed from step %d (epoch %d, batch %d)", state["step"],
                        batches.epoch, batches.batch_index)
        elif self.out_dir is not None and place.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / LOG_FILE).write_text("")

        ctx = dict(network=network, bundle=bundle, batches=batches, sample_gen=sample_gen,
                   scaler=scaler, state=state)
        self._emit("train_begin", {"config": cfg.to_dict(), "loss": loss_name,
                                   "steps_per_epoch": steps_per_epoch, "device": str(device)})
        t_start = time.perf_counter()
        old_handler = self._install_sigint()
        try:
            self._loop(ctx, X_val, Y_val, inv_prop, loss_name, amp_dtype, total_steps,
                       show_progress)
            seconds = time.perf_counter() - t_start
            history = state["history"]
            best_epoch = state["best_epoch"] or (history[-1]["epoch"] if history else 0)
            self.result = TrainResult(
                history=history, best=state["best"], best_epoch=best_epoch,
                steps=state["step"], seconds=seconds, stopped_early=state["stopped_early"],
                loss=loss_name, sampler=cfg.sampler if sampled else None,
                paused=batches.epoch < cfg.epochs and not state["stopped_early"])
            if self._best_state is not None and cfg.keep_best:
                network.load_state_dict(self._best_state)
            elif self._ema is not None:
                network.load_state_dict(self._ema, strict=False)
            if self.out_dir is not None:
                # still under the SIGINT handler: a Ctrl-C now cannot leave the model
                # directory half old, half new (the run is complete; the interrupt is moot)
                self._save_model(summary=self.result.to_dict())
        finally:
            self._restore_sigint(old_handler)
        self._emit("train_end", self.result.to_dict())
        return self.result

    # -- loop -------------------------------------------------------------------------------
    def _loop(self, ctx: dict[str, Any], X_val: sp.csr_matrix | None,
              Y_val: sp.csr_matrix | None, inv_prop: np.ndarray, loss_name: str,
              amp_dtype: torch.dtype | None, total_steps: int, show_progress: bool) -> None:
        cfg = self.config
        network: XMCNetwork = ctx["network"]
        bundle = ctx["bundle"]
        batches = ctx["batches"]
        state = ctx["state"]
        steps_per_epoch = len(batches)
        with _progress(show_progress, "training", total_steps) as advance:
            advance(state["step"])
            while batches.epoch < cfg.epochs and not state["stopped_early"]:
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
                epoch = batches.epoch
                state["epoch"] = epoch
                if batches.batch_index == 0:
                    state.update(epoch_loss_sum=0.0, epoch_loss_count=0, epoch_examples=0,
                                 epoch_seconds=0.0)
                    self._emit("epoch_begin", {"epoch": epoch + 1, "step": state["step"]})
                    if self.sampler is not None and self.sampler.needs_update:
                        self._refresh_sampler(network)
                elif self.sampler is not None and self.sampler.needs_update and \
                        not getattr(self, "_sampler_loaded", False):
                    self._refresh_sampler(network)
                t0 = time.perf_counter()
                for batch in batches:
                    loss_t = self._step(network, bundle, batch, loss_name, amp_dtype,
                                        ctx["scaler"], ctx["sample_gen"], state)
                    state["step"] += 1
                    self._track_loss(loss_t, state["step"], epoch + 1)  # on the device
                    if self._ema is not None:
                        self._update_ema(network, state["step"])
                    state["epoch_loss_count"] += 1
                    state["epoch_examples"] += int(batch.offsets.shape[0])
                    # the loss is read on the host (a device sync) only every log_every steps
                    # and before anything that must not see a non-finite run (refresh,
                    # checkpoint, epoch end); a NaN/inf loss raises there, naming its step
                    read = state["step"] % cfg.log_every == 0
                    loss_value = self._read_loss(state) if read else None
                    el = state.get("epoch_seconds", 0.0) + time.perf_counter() - t0
                    shown = "-" if math.isnan(self._last_loss) else f"{self._last_loss:.4f}"
                    advance(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=shown,
                            ex_s=f"{state['epoch_examples'] / max(el, 1e-9):.0f}")
                    self._emit("step", {"step": state["step"], "epoch": epoch + 1,
                                        "loss": loss_value, "loss_tensor": loss_t,
                                        "lr": bundle.lr})
                    refresh = cfg.refresh_every
                    if (self.sampler is not None and self.sampler.needs_update and refresh
                            and state["step"] % refresh == 0):
                        self._read_loss(state)
                        self._refresh_sampler(network)
                    stop_now = bool(cfg.max_steps) and state["step"] >= cfg.max_steps
                    # every rank stops at the step where any of them saw the signal
                    self._interrupted = self.placement.any_rank(self._interrupted)
                    if self._interrupted or stop_now or (
                            cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                        self._read_loss(state)
                        if batches.batch_index < steps_per_epoch:  # mid-epoch
                            state["epoch_seconds"] = el
                            self._save_checkpoint(ctx)
                    if self._interrupted and batches.batch_index < steps_per_epoch:
                        self._raise_interrupted(state)
                    if stop_now and batches.batch_index < steps_per_epoch:
                        return
                    # at the epoch's last batch an interrupt or a pause falls through to the
                    # epoch end, whose checkpoint is the one of this step
                state["epoch_seconds"] = state.get("epoch_seconds", 0.0) + \
                    time.perf_counter() - t0
                self._read_loss(state)
                self._end_epoch(ctx, epoch, X_val, Y_val, inv_prop)
                if self._interrupted:
                    self._raise_interrupted(state)
        self._read_loss(state)
        return

    def _raise_interrupted(self, state: dict[str, Any]) -> None:
        """Raise :class:`TrainingInterrupted` (the checkpoint of this step is written)."""
        by = "" if self._signum == signal.SIGINT else f"{signal.Signals(self._signum).name}: "
        raise TrainingInterrupted(
            f"{by}interrupted at step {state['step']}; checkpoint saved in {self.out_dir}; "
            f"continue with --resume {self.out_dir}", self._signum)

    def _track_loss(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Accumulate the step's loss on its device and remember the first non-finite one.

        Device work only (no host synchronisation): the running sum since the last
        :meth:`_read_loss`, and the step, epoch and value of the first NaN/inf loss.
        """
        self._loss_log.add(loss, step, epoch)

    def _read_loss(self, state: dict[str, Any]) -> float:
        """Bring the accumulated loss to the host (one sync): add it to the epoch's sum and
        return the mean over the steps since the last read (the last value shown if none).

        Raises:
            XMCError: a loss since the last read was NaN/inf (names the first such step).
        """
        def where() -> str:  # only on a NaN/inf loss: no file system look-up per read
            if self.out_dir is None:
                return ""
            ck = self.placement.checkpoint_dir(self.out_dir)
            return (f"; the last good checkpoint in {ck} is kept" if (ck / "latest").exists()
                    else "; no checkpoint had been written yet")

        read = self._loss_log.read(where)  # one host copy; raises on a NaN/inf loss
        if read is None:
            return self._last_loss
        self._last_loss, total = read
        state["epoch_loss_sum"] += total
        return self._last_loss

    def _end_epoch(self, ctx: dict[str, Any], epoch: int, X_val: sp.csr_matrix | None,
                   Y_val: sp.csr_matrix | None, inv_prop: np.ndarray) -> None:
        cfg = self.config
        state = ctx["state"]
        network: XMCNetwork = ctx["network"]
        secs = state.get("epoch_seconds", 0.0)
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": state["step"],
            "loss": state["epoch_loss_sum"] / max(1, state["epoch_loss_count"]),
            "lr": ctx["bundle"].lr, "seconds": secs,
            "examples_per_s": state["epoch_examples"] / max(secs, 1e-9)}
        if X_val is not None and Y_val is not None:
            with self._averaged_weights(network):
                metrics = self._validate(network, X_val, Y_val, inv_prop)
            rec.update({f"val/{k}": v for k, v in metrics.items()})
            value = metrics[cfg.val_metric]
            best = state["best_value"]
            if best is None or value > best:
                state.update(best_value=value, best=metrics, best_epoch=epoch + 1, bad_epochs=0)
                if cfg.keep_best:
                    with self._averaged_weights(network):
                        self._best_state = {k: v.detach().clone()
                                            for k, v in network.state_dict().items()}
                        if self.out_dir is not None:
                            self._save_model(summary=None)
            else:
                state["bad_epochs"] += 1
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    state["stopped_early"] = True
                    logger.info("early stopping after epoch %d: %s did not improve for %d "
                                "epochs (best %.4f at epoch %d)", epoch + 1, cfg.val_metric,
                                cfg.patience, state["best_value"], state["best_epoch"])
        state["history"].append(rec)
        logger.info("epoch %d: %s", epoch + 1,
                    ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float)))
        if self.out_dir is not None and self.placement.is_main:
            with open(self.out_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        self._emit("epoch_end", rec)
        if self.out_dir is not None:
            self._save_checkpoint(ctx)

    @torch.no_grad()
    def _update_ema(self, network: XMCNetwork, step: int) -> None:
        """``ema <- d * ema + (1 - d) * w`` with ``d = min(ema, (1 + step) / (10 + step))``.

        The ramp keeps the early average from being dominated by the random init; ``d`` depends
        only on the step, so a resumed run averages exactly as an uninterrupted one.
        """
        if self._ema is None:
            return
        ema_update_(self._ema, network, step, self.config.ema)

    @contextlib.contextmanager
    def _averaged_weights(self, network: XMCNetwork) -> Iterator[None]:
        """Temporarily load the EMA weights into ``network`` (no-op without ``--ema``)."""
        with averaged_weights(network, self._ema):
            yield

    def _validate(self, network: XMCNetwork, X_val: sp.csr_matrix, Y_val: sp.csr_matrix,
                  inv_prop: np.ndarray) -> dict[str, float]:
        from .metrics import evaluate as evaluate_metrics

        cfg = self.config
        k = max(cfg.ks)
        ids = self.placement.predict_topk(network, X_val, k, cfg)
        res = evaluate_metrics(Y_val, ids, cfg.ks, inv_prop)
        return {key: float(v) for key, v in res.items() if "@" in key}

    def _step(self, network: XMCNetwork, bundle: Any, batch: Any, loss_name: str,
              amp_dtype: torch.dtype | None, scaler: Any, gen: torch.Generator,
              state: dict[str, Any]) -> torch.Tensor:
        """One optimizer step; returns the detached scalar loss, still on the device."""
        cfg = self.config
        bundle.zero_grad()
        device = batch.indices.device
        autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype)
                    if amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            q = self.placement.forward(network, batch)  # [B, d]
        q = q.float()
        loss = self.placement.loss(network, q, batch, loss_name, self.sampler, gen, cfg)
        # no host read of the loss here: the loop accumulates it on the device and reads it
        # every log_every steps (_track_loss / _read_loss), so a CUDA step never waits
        if scaler is not None:
            scaler.scale(loss).backward()
            for opt in bundle.optimizers.values():
                scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.clip_grad > 0:  # off: no pass over the gradients at all
            # clipping needs the global norm on the host anyway (one sync per step)
            gnorm = self.placement.clip(network, cfg.clip_grad)
            if scaler is None and not math.isfinite(gnorm):  # a GradScaler skips the step
                self._track_loss(loss, state["step"] + 1, state["epoch"] + 1)
                self._read_loss(state)  # a non-finite loss is the cause: report that
                ck = None if self.out_dir is None else self.placement.checkpoint_dir(self.out_dir)
                where = ("" if ck is None else f" (the last good checkpoint in {ck} is kept)"
                         if (ck / "latest").exists() else " (no checkpoint had been written yet)")
                raise XMCError(
                    f"gradient norm became {gnorm} at step {state['step'] + 1} (epoch "
                    f"{state['epoch'] + 1}){where}; lower --lr, set --clip-grad, or check the "
                    "data")
        bundle.step(scaler)
        if scaler is not None:
            scaler.update()
        return loss.detach()

    # -- sampler ----------------------------------------------------------------------------
    def _make_sampler(self, L: int, device: torch.device) -> Any:
        from .objective import sampler_from_config

        return sampler_from_config(self.config, L, self.label_counts)

    def _refresh_sampler(self, network: XMCNetwork) -> None:
        bias = network.label_bias
        self.sampler.update(network.label_weight.detach(),
                            None if bias is None else bias.detach())
        self._sampler_loaded = True

    # -- callbacks, signals -----------------------------------------------------------------
    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, payload)

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def _install_sigint(self) -> Any:
        """SIGINT (Ctrl-C) and SIGTERM (``kill``, job schedulers) set a flag; the loop saves a
        checkpoint of the current step and raises :class:`TrainingInterrupted`."""
        if self.out_dir is None:
            return None

        def handler(signum: int, frame: Any) -> None:
            self._interrupted = True
            self._signum = signum

        old = {}
        try:
            for s in self._SIGNALS:
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread
            self._restore_sigint(old)
            return None
        return old

    @staticmethod
    def _restore_sigint(old: Any) -> None:
        for s, h in (old or {}).items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, h)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))

    # -- persistence ------------------------------------------------------------------------
    def _save_model(self, summary: dict[str, Any] | None) -> None:
        if self.network is None or self.preprocessor is None:  # pragma: no cover
            raise XMCError("nothing to save: the trainer has not been fitted")
        self.placement.save_model(self, summary)

    def _save_checkpoint(self, ctx: dict[str, Any]) -> None:
        """Write ``out_dir/checkpoint/ckpt-<step>`` through :mod:`xmc_toolkit.checkpoint`."""
        if self.out_dir is None:
            return
        from .checkpoint import flatten_state, rng_state_to_tensors, save_checkpoint

        network: XMCNetwork = ctx["network"]
        state = ctx["state"]
        groups: dict[str, dict[str, torch.Tensor]] = {
            "model": {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}}
        if self._best_state is not None:
            groups["best"] = {k: v.detach().cpu().contiguous()
                              for k, v in self._best_state.items()}
        opt_tensors, opt_structure = flatten_state(ctx["bundle"].state_dict())
        groups["optimizer"] = {k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()}
        if self.sampler is not None:
            sstate = self.sampler.state_dict()
            if sstate:
                groups["sampler"] = {k: v.detach().cpu().contiguous() for k, v in sstate.items()}
        if self._ema is not None:
            groups["ema"] = {k: v.detach().cpu().contiguous() for k, v in self._ema.items()}
        groups["rng"] = rng_state_to_tensors({"sample": ctx["sample_gen"]})
        meta = dict(state)
        meta.update(batches=ctx["batches"].state_dict(), optimizer_structure=opt_structure,
                    sampler_loaded=bool(getattr(self, "_sampler_loaded", False)),
                    config=self.config.to_dict(), label_names=self.label_names,
                    label_counts=[int(c) for c in self.label_counts],  # type: ignore[union-attr]
                    num_train=self.num_train, data_fingerprint=self._fingerprint)
        if ctx["scaler"] is not None:
            meta["scaler"] = ctx["scaler"].state_dict()
        path = save_checkpoint(self.placement.checkpoint_dir(self.out_dir), groups, meta=meta,
                               step=state["step"])
        self._emit("checkpoint", {"step": state["step"], "path": str(path)})

    def _check_fingerprint(self, saved: Any, ck: Path) -> None:
        """Refuse a resume on data other than the checkpoint's (unless ``force``)."""
        if not isinstance(saved, dict):
            logger.warning("%s records no data fingerprint (written by an older xmc-toolkit): "
                           "cannot check that --resume uses the same data", ck)
            return
        changed = [k for k in ("train", "val") if saved.get(k) != self._fingerprint.get(k)]
        if not changed:
            return
        what = " and ".join({"train": "training", "val": "validation"}[k] for k in changed)
        if self._force:
            logger.warning("resuming on different %s data than the checkpoint in %s (forced)",
                           what, ck)
            return
        raise CheckpointError(
            f"the {what} data differ from those the checkpoint in {str(ck)!r} was trained on "
            f"(fingerprint {str(self._fingerprint.get(changed[0]))[:16]} vs "
            f"{str(saved.get(changed[0]))[:16]}; the file changed since, or another file was "
            "passed); resume with the original data, or pass --force to continue on these")

    def _load_checkpoint(self, network: XMCNetwork, bundle: Any, batches: Any,
                         gen: torch.Generator, scaler: Any, state: dict[str, Any]) -> None:
        from .checkpoint import load_checkpoint, restore_rng_state, unflatten_state

        ck = self.placement.checkpoint_dir(self.out_dir)  # type: ignore[arg-type]
        if not ck.is_dir():
            raise CheckpointError(f"{str(self.out_dir)!r} holds no checkpoint to resume from "
                                  f"({CKPT_DIR}/ is missing); train without --resume first, or "
                                  "pass the --out directory of an earlier run")
        groups, meta = load_checkpoint(ck, verify=True, device="cpu", fallback=True)
        saved = TrainConfig.from_dict(meta["config"], validate=False).to_dict()
        mine = self.config.to_dict()
        free = ("epochs", "patience", "checkpoint_every", "max_steps", "device", "log_every")
        diff = [k for k, v in saved.items() if v != mine.get(k) and k not in free]
        if diff:
            raise CheckpointError(
                "the checkpoint was trained with another config (" + ", ".join(
                    f"{k}: {saved[k]!r} vs {mine[k]!r}" for k in diff)
                + "); resume with the same settings (only --epochs, --patience, "
                "--checkpoint-every, --max-steps, --device, --log-every may change)")
        self._check_fingerprint(meta.get("data_fingerprint"), ck)
        dev = next(network.parameters()).device
        try:
            network.load_state_dict(groups["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint in {str(ck)!r} does not match the data/model: "
                                  f"{exc}") from exc
        best = groups.get("best")
        self._best_state = None if not best else {k: v.to(dev) for k, v in best.items()}
        if self._ema is not None:
            ema = groups.get("ema")
            if not ema:
                raise CheckpointError(f"checkpoint in {str(ck)!r} has no weight average; resume "
                                      "with the run's own --ema setting")
            self._ema = {k: v.to(dev).clone() for k, v in ema.items()}
        opt_state = unflatten_state(groups["optimizer"], meta["optimizer_structure"])
        bundle.load_state_dict(opt_state)
        if self.sampler is not None and groups.get("sampler"):
            self.sampler.load_state_dict({k: v.to(dev) for k, v in groups["sampler"].items()})
        self._sampler_loaded = bool(meta.get("sampler_loaded", False))
        restore_rng_state(groups["rng"], {"sample": gen})
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        batches.load_state_dict(meta["batches"])
        for key in ("step", "epoch", "history", "best", "best_epoch", "best_value", "bad_epochs",
                    "stopped_early", "epoch_loss_sum", "epoch_loss_count", "epoch_examples",
                    "epoch_seconds"):
            if key in meta:
                state[key] = meta[key]
        if self.config.patience == 0:
            state["stopped_early"] = False



def _split(ds: XMCDataset, fraction: float, seed: int) -> tuple[XMCDataset, XMCDataset]:
    tr_rows, val_rows = split_rows(ds.num_points, fraction, seed)
    return ds.subset(tr_rows), ds.subset(val_rows)




if __name__ == "__main__":  # pragma: no cover - `python -m xmc_toolkit.train` / torchrun
    # the one place the library reaches the command line: run as a script, this module is
    # `xmc train` (the only flag parser); imported, it never imports `cli`
    from cli.main import train_module_main

    train_module_main()
