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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .config import ConfigBase
from .data.dataset import XMCDataset
from .batching import is_weighted
from .device import resolve_device
from .errors import CheckpointError, ConfigError, XMCError

if TYPE_CHECKING:
    from .encoder import EnsembleEncoder, SparseEncoder
    from .grow import WarmStart

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
    "predict_topk_network",
    "save_model_dir",
    "load_model_dir",
    "verify_model_dir",
    "prepare_output_dir",
    "network_bytes",
    "LoadedModel",
    "main",
]

logger = logging.getLogger(__name__)

LOSSES = ("auto", "full", "sampled", "negative-sampling")
SAMPLERS = ("uniform", "popularity", "log-uniform", "midx", "midx-pq", "midx-rq")
QUANTIZERS = ("pq", "rq")
WITHIN_CELL = ("uniform", "popularity", "exact")
AMP_MODES = ("auto", "bf16", "fp16", "off")
NORMS = ("none", "layernorm", "batchnorm")
LABEL_INITS = ("auto", "random", "pifa")
TFIDF_MODES = ("auto", "on", "off")
METRIC_NAMES = ("P", "nDCG", "PSP", "PSnDCG", "R")
# largest label count for which training accepts MIDX within_cell="exact" ([B, L] per step)
EXACT_WITHIN_CELL_MAX_LABELS = 65536
# data-size rules of the auto defaults (TrainConfig.resolved_for_data; docs/training.md has the
# validation runs that chose them)
SMALL_DATA_POINTS = 10_000  # up to this many training rows: strong regularization, 20 epochs
AUTO_DROPOUT = (0.75, 0.2)  # (small, larger) data sets
AUTO_INPUT_DROPOUT = (0.3, 0.0)
AUTO_EPOCH_ROWS = 150_000  # larger data sets: about this many rows seen in all, 1..20 epochs

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
SUMMARY_FILE = "summary.json"
CHECKSUMS_FILE = "checksums.json"  # sha256 + size of every file above, written last
CHECKSUMS_FORMAT = "xmc-toolkit-model-checksums"
LOG_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoint"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


def _legacy_tfidf(value: Any) -> Any:
    """``tfidf`` was a bool before it had an auto mode: True -> "on", False -> "off"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


@dataclass
class TrainConfig(ConfigBase):
    """Every hyper-parameter of a training run (JSON round trip; ``xmc train --print-config``).

    Defaults are chosen to work on unseen data sets and scale with them
    (:meth:`resolved_for_data`): L2 inputs, TF-IDF unless the file is already weighted; one
    hidden layer whose width adapts to the feature count D (8192 down to 256 within a D x width
    budget); on up to 10,000 training rows dropout 0.75, input dropout 0.3, 3 ensemble members
    and 20 epochs, above that dropout 0.2, 2 members up to 100,000 rows and 1 beyond, PIFA label
    rows and about 150,000 rows of training; full softmax up to
    ``full_max_labels`` labels and MIDX sampled softmax above; AdamW with warm-up and linear
    decay (sparse row-wise Adam for a sparse bag and sampled label tables).
    """

    # -- model --------------------------------------------------------------------------------
    dim: int = field(default=256, metadata=_h("label / query embedding dimension d (--dim)"))
    hidden: tuple[int, ...] = field(
        default=(0,),
        metadata=_h("hidden layer widths of the encoder MLP; the first is the EmbeddingBag width;"
                    " a first width of 0 means auto: the largest power of two in [256, 8192] with"
                    " D x width <= hidden_budget (--hidden 0, --hidden 1024, --hidden 1024,512)"))
    hidden_budget: int = field(default=2 ** 26, metadata=_h(
        "parameter budget D x width of the EmbeddingBag for the auto hidden width"
        " (--hidden-budget)"))
    dropout: float = field(default=-1.0, metadata=_h(
        "dropout after each hidden layer; -1 (auto): 0.75 on training sets of up to 10,000 rows,"
        " else 0.2 (--dropout)"))
    input_dropout: float = field(default=-1.0, metadata=_h(
        "drop each non-zero input feature with this probability in training; -1 (auto): 0.3 on"
        " training sets of up to 10,000 rows, else 0 (--input-dropout)"))
    norm: str = field(default="none", metadata=_h("normalization after each hidden layer: none |"
                                                 " layernorm | batchnorm (--norm)"))
    bag_init_std: float = field(default=1.0, metadata=_h(
        "std of the normal init of the EmbeddingBag rows; 0 keeps the encoder's default"
        " 1/sqrt(width) (--bag-init-std)"))
    linear_only: bool = field(default=False, metadata=_h(
        "linear model: one EmbeddingBag to d, no MLP (--linear-only)"))
    tfidf: str = field(default="auto", metadata=_h(
        "scale features by the training set's smooth IDF: auto | on | off; auto is on when every"
        " stored feature value is a whole number (counts, binary) and off when the values are"
        " already weighted (e.g. the TF-IDF of XC repository files) (--tfidf)"))
    l2_normalize: bool = field(default=True, metadata=_h(
        "L2-normalize every input row after TF-IDF (--l2-normalize/--no-l2-normalize)"))
    label_bias: bool = field(default=True, metadata=_h("learn a per-label bias (--label-bias)"))
    label_init: str = field(default="auto", metadata=_h(
        "initial label rows: auto | random (N(0, 0.01)) | pifa (each row along the normalised"
        " mean query of its training rows under the initial encoder, PECOS's PIFA in query"
        " space); auto: random on training sets of up to 10,000 rows, else pifa"
        " (--label-init)"))
    ensemble: int = field(default=0, metadata=_h(
        "members: independently initialised encoders, each with its own block of the label table"
        " and its own loss, trained side by side on the same batches; scores are the members'"
        " mean (one [L, n*d] table, so top-k, export and the MIDX index work unchanged); costs"
        " n times one model; 0: auto = 3 when the training set has at most ensemble_max_points"
        " rows, 2 up to 10 x ensemble_max_points rows, else 1 (--ensemble)"))
    ensemble_max_points: int = field(default=10_000, metadata=_h(
        "largest training set (rows) for which ensemble=0 (auto) trains 3 members; up to 10 x"
        " this many rows it trains 2 (--ensemble-max-points)"))
    # -- loss and sampling --------------------------------------------------------------------
    loss: str = field(default="auto", metadata=_h(
        "auto | full | sampled | negative-sampling; auto: full softmax when the number of labels"
        " is at most full_max_labels, else sampled (--loss)"))
    bce_weight: float = field(default=0.0, metadata=_h(
        "full softmax only: add this weight times the one-vs-all binary cross-entropy over all"
        " labels (summed over labels, mean over the batch) to the loss; 0: off (--bce-weight)"))
    full_max_labels: int = field(default=32768, metadata=_h(
        "largest label count for which loss=auto uses the full softmax (--full-max-labels)"))
    sampler: str = field(default="midx", metadata=_h(
        "negative sampler: uniform | popularity | log-uniform | midx (--sampler)"))
    quantizer: str = field(default="pq", metadata=_h("MIDX quantizer: pq | rq (--quantizer)"))
    within_cell: str = field(default="uniform", metadata=_h(
        "MIDX draw inside a cell: uniform | popularity | exact; exact is the true softmax"
        " ([B, L] scores per step), refused for training above 65536 labels (--within-cell)"))
    codewords: int = field(default=0, metadata=_h(
        "MIDX codewords per codebook K (K^2 cells); 0: auto = clip(sqrt(L/4), 4, 64)"
        " (--codewords)"))
    negatives: int = field(default=64, metadata=_h("negatives drawn per query (--negatives)"))
    shared_negatives: bool = field(default=False, metadata=_h(
        "one set of negatives shared by the whole batch (--shared-negatives)"))
    refresh_every: int = field(default=100, metadata=_h(
        "rebuild the MIDX codebooks every N steps (warm-started) and at each epoch start;"
        " 0: epoch start only (--refresh-every)"))
    popularity_alpha: float = field(default=0.75, metadata=_h(
        "exponent of label counts for popularity proposals (--popularity-alpha)"))
    correct_target: bool = field(default=False, metadata=_h(
        "sampled softmax: also subtract log(Mq) from the target logit, TensorFlow style"
        " (--correct-target)"))
    log_q_correction: bool = field(default=False, metadata=_h(
        "negative-sampling loss: subtract log(Mq) from the sampled negatives' logits"
        " (--log-q-correction)"))
    # -- optimization -------------------------------------------------------------------------
    epochs: int = field(default=0, metadata=_h(
        "number of passes over the training data; 0 (auto): 20 on training sets of up to 10,000"
        " rows, else about 150,000 rows in all (round(150000 / N), clipped to 1..20) (--epochs)"))
    batch_size: int = field(default=128, metadata=_h("training rows per step (--batch-size)"))
    lr: float = field(default=1e-3, metadata=_h("AdamW learning rate of the encoder (--lr)"))
    label_lr: float = field(default=0.0, metadata=_h(
        "learning rate of the label table; 0: same as lr (--label-lr)"))
    bag_lr: float = field(default=0.0, metadata=_h(
        "learning rate of the EmbeddingBag rows when they are sparse (bag_optimizer"
        " sparse-adam); 0 (auto): 10 x lr, since each row only moves on the steps whose batch"
        " holds its feature (--bag-lr)"))
    weight_decay: float = field(default=0.01, metadata=_h(
        "AdamW decoupled weight decay of the encoder (--weight-decay)"))
    label_optimizer: str = field(default="auto", metadata=_h(
        "label table optimizer: auto | adamw | sparse-adam | adagrad; auto: adamw for the full"
        " softmax, sparse-adam (row-wise, sparse) for sampled losses (--label-optimizer)"))
    bag_optimizer: str = field(default="auto", metadata=_h(
        "optimizer of the encoder's EmbeddingBag weight [D, h]: auto | adamw | sparse-adam;"
        " sparse-adam gives the bag sparse gradients and updates only the rows of the features"
        " in a batch; auto: sparse-adam when D >= sparse_features_min (--bag-optimizer)"))
    sparse_features_min: int = field(default=4096, metadata=_h(
        "smallest feature count D for which bag_optimizer=auto uses sparse-adam"
        " (--sparse-features-min)"))
    ema: float = field(default=0.0, metadata=_h(
        "decay of an exponential moving average of the weights (e.g. 0.98); validation,"
        " best-epoch selection and the saved model use the averaged weights; 0: off; full softmax"
        " only (with a sampled loss it would average the whole [L, d] table every step)"
        " (--ema)"))
    warmup_steps: int = field(default=100, metadata=_h("linear warm-up steps (--warmup-steps)"))
    schedule: str = field(default="linear", metadata=_h(
        "decay after warm-up: linear | cosine | constant (--schedule)"))
    clip_grad: float = field(default=0.0, metadata=_h(
        "clip the global gradient norm to this value; 0 disables (--clip-grad)"))
    amp: str = field(default="auto", metadata=_h(
        "mixed precision on CUDA: auto (bf16 if supported, else fp16 + GradScaler) | bf16 | fp16"
        " | off; always off on CPU (--amp)"))
    device: str = field(default="auto", metadata=_h("auto | cpu | cuda | cuda:N (--device)"))
    seed: int = field(default=0, metadata=_h("random seed; CPU runs are deterministic (--seed)"))
    # -- validation, early stopping, logging ---------------------------------------------------
    val_fraction: float = field(default=0.0, metadata=_h(
        "hold out this fraction of the training rows for validation when no validation set is"
        " given; 0: none (--val-fraction)"))
    val_metric: str = field(default="P@1", metadata=_h(
        "validation metric for early stopping and best-model selection (--val-metric)"))
    patience: int = field(default=0, metadata=_h(
        "stop after this many epochs without improvement of val_metric; 0: never stop early"
        " (--patience)"))
    keep_best: bool = field(default=True, metadata=_h(
        "with validation, the saved model is the best epoch's, not the last (--keep-best)"))
    ks: tuple[int, ...] = field(default=(1, 3, 5), metadata=_h("metric cut-offs (--ks 1,3,5)"))
    eval_chunk_size: int = field(default=65536, metadata=_h(
        "labels scored per block in exact top-k (--eval-chunk-size)"))
    eval_batch_size: int = field(default=2048, metadata=_h(
        "rows encoded per block in validation/prediction (--eval-batch-size)"))
    psp_a: float = field(default=0.55, metadata=_h("propensity parameter A for PSP@k (--psp-a)"))
    psp_b: float = field(default=1.5, metadata=_h("propensity parameter B for PSP@k (--psp-b)"))
    checkpoint_every: int = field(default=0, metadata=_h(
        "also checkpoint every N steps (resumable mid-epoch); 0: at epoch ends only"
        " (--checkpoint-every)"))
    max_steps: int = field(default=0, metadata=_h(
        "pause after this many steps in total (checkpointed; --resume continues; the LR"
        " schedule still spans all epochs); 0: no limit (--max-steps)"))
    log_every: int = field(default=50, metadata=_h(
        "read the training loss on the host every N steps (progress bar, step callbacks, the"
        " NaN/inf check, which also runs before every refresh, checkpoint and epoch end);"
        " between reads a step never waits for the device (--log-every)"))

    # -- validation ----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.tfidf = _legacy_tfidf(self.tfidf)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, validate: bool = True) -> "TrainConfig":
        """As :meth:`ConfigBase.from_dict`; also reads configs written when ``tfidf`` was a bool."""
        if isinstance(data.get("tfidf"), bool):
            data = {**data, "tfidf": _legacy_tfidf(data["tfidf"])}
        return super().from_dict(data, validate=validate)

    def problems(self) -> list[str]:
        """Every problem of the config that does not depend on the data (all at once)."""
        p: list[str] = []

        def choice(name: str, value: Any, options: Sequence[str]) -> None:
            if value not in options:
                flag = "--" + name.replace("_", "-")
                p.append(f"{name}={value!r} is unknown; use one of {', '.join(options)} ({flag})")

        def positive(name: str, value: Any, zero_ok: bool = False) -> None:
            flag = "--" + name.replace("_", "-")
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= 0 if zero_ok else value > 0)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                p.append(f"{name}={value!r} must be {'>= 0' if zero_ok else '> 0'} ({flag})")

        choice("loss", self.loss, LOSSES)
        choice("sampler", self.sampler, SAMPLERS)
        choice("quantizer", self.quantizer, QUANTIZERS)
        choice("within_cell", self.within_cell, WITHIN_CELL)
        choice("amp", self.amp, AMP_MODES)
        choice("norm", self.norm, NORMS)
        choice("label_init", self.label_init, LABEL_INITS)
        choice("tfidf", self.tfidf, TFIDF_MODES)
        choice("schedule", self.schedule, ("linear", "cosine", "constant"))
        choice("bag_optimizer", self.bag_optimizer, ("auto", "adamw", "sparse-adam"))
        choice("label_optimizer", self.label_optimizer, ("auto", "adamw", "sparse-adam",
                                                         "adagrad"))
        for name in ("dim", "batch_size", "negatives", "eval_chunk_size",
                     "eval_batch_size", "full_max_labels", "lr", "log_every"):
            positive(name, getattr(self, name))
        for name in ("bag_lr", "epochs", "ensemble", "ensemble_max_points", "codewords", "refresh_every", "label_lr", "weight_decay", "warmup_steps",
                     "clip_grad", "bag_init_std", "patience", "checkpoint_every", "max_steps",
                     "psp_b", "sparse_features_min", "bce_weight", "hidden_budget"):
            positive(name, getattr(self, name), zero_ok=True)
        positive("psp_a", self.psp_a)
        positive("popularity_alpha", self.popularity_alpha, zero_ok=True)
        if not isinstance(self.hidden, (tuple, list)) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in self.hidden) or \
                any(h == 0 for h in self.hidden[1:]):
            p.append(f"hidden={self.hidden!r} must be a list of positive integers, or 0 (auto) as"
                     " the first width (--hidden)")
        if not isinstance(self.dropout, (int, float)) or not (
                0.0 <= self.dropout < 1.0 or self.dropout == -1):
            p.append(f"dropout={self.dropout!r} must be in [0, 1), or -1 for auto (--dropout)")
        if not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            p.append(f"ema={self.ema!r} must be in [0, 1) (--ema)")
        if not isinstance(self.input_dropout, (int, float)) or not (
                0.0 <= self.input_dropout < 1.0 or self.input_dropout == -1):
            p.append(f"input_dropout={self.input_dropout!r} must be in [0, 1), or -1 for auto"
                     " (--input-dropout)")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            p.append(f"val_fraction={self.val_fraction!r} must be in [0, 1) (--val-fraction)")
        if 0 < self.codewords < 2:
            p.append(f"codewords={self.codewords!r} must be >= 2 or 0 for auto (--codewords)")
        if not isinstance(self.ks, (tuple, list)) or not self.ks or any(
                isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            p.append(f"ks={self.ks!r} must be a non-empty list of integers >= 1 (--ks)")
        name, _, k = str(self.val_metric).partition("@")
        if name not in METRIC_NAMES or not k.isdigit() or int(k) < 1:
            p.append(f"val_metric={self.val_metric!r} must look like P@1, nDCG@3, PSP@5, "
                     "PSnDCG@k or R@k (--val-metric)")
        return p

    def data_problems(self, num_points: int, num_features: int, num_labels: int) -> list[str]:
        """Problems that depend on the training data's size (all at once)."""
        p: list[str] = []
        if num_points < 1:
            p.append("the training data has no rows")
        if num_labels < 2:
            p.append(f"the training data has {num_labels} label(s); at least 2 are needed")
        if num_features < 1:
            p.append("the training data has no feature columns")
        if isinstance(self.batch_size, int) and self.batch_size > num_points >= 1:
            p.append(f"batch_size={self.batch_size} is larger than the {num_points} training rows"
                     f"; use --batch-size {max(1, min(num_points, 128))} or less")
        loss = self.resolved_loss(num_labels)
        if loss in ("sampled", "negative-sampling"):
            if isinstance(self.negatives, int) and self.negatives >= num_labels:
                p.append(f"negatives={self.negatives} must be smaller than the number of labels "
                         f"({num_labels}); use --negatives {max(1, num_labels // 2)} or "
                         "--loss full")
            if self.sampler.startswith("midx") and self.codewords:
                cells = self.codewords ** 2
                if cells > 4 * num_labels:
                    p.append(f"codewords={self.codewords} gives {cells} MIDX cells, far above the"
                             f" {num_labels} labels; use --codewords "
                             f"{self.auto_codewords(num_labels)} (or 0 for auto)")
            if (self.sampler.startswith("midx") and self.within_cell == "exact"
                    and num_labels > EXACT_WITHIN_CELL_MAX_LABELS):
                p.append(f"within_cell='exact' scores all {num_labels} labels for every query"
                         " (a [B, L] block per step, the cost sampling exists to avoid); it is"
                         " for diagnostics and training up to"
                         f" {EXACT_WITHIN_CELL_MAX_LABELS} labels only; use --within-cell"
                         " uniform or popularity")
            if isinstance(self.ema, (int, float)) and self.ema > 0:
                p.append(f"ema={self.ema} averages every weight, the whole [{num_labels}, d]"
                         " label table included, at every step: dense O(L d) work that the"
                         f" {loss} loss exists to avoid; use --ema 0 with sampled losses (or"
                         " --loss full)")
        if self.bag_lr > 0 and self.resolved_bag_optimizer(num_features) != "sparse-adam":
            p.append(f"bag_lr={self.bag_lr} applies to a sparse EmbeddingBag only, but D ="
                     f" {num_features} gives bag_optimizer"
                     f" {self.resolved_bag_optimizer(num_features)!r}; drop --bag-lr or use"
                     " --bag-optimizer sparse-adam")
        if self.log_q_correction and loss != "negative-sampling":
            p.append(f"log_q_correction applies to the negative-sampling loss only, not to"
                     f" loss={loss}; drop --log-q-correction or use --loss negative-sampling"
                     " (the sampled softmax always corrects by log q)")
        if self.val_metric and "@" in str(self.val_metric):
            k = str(self.val_metric).partition("@")[2]
            if k.isdigit() and isinstance(self.ks, (tuple, list)) and self.ks and \
                    int(k) > max(self.ks):
                p.append(f"val_metric={self.val_metric} needs k={k} but ks={list(self.ks)}; "
                         "add it to --ks")
            if k.isdigit() and int(k) > num_labels:
                p.append(f"val_metric={self.val_metric} asks for more labels than the "
                         f"{num_labels} there are")
        if isinstance(self.ks, (tuple, list)) and self.ks and max(self.ks) > num_labels >= 1:
            p.append(f"ks={list(self.ks)} asks for top-{max(self.ks)} of only {num_labels} labels"
                     "; lower --ks")
        if not p and num_points >= 1 and not self.problems():
            p += self.memory_problems(num_points, num_features, num_labels)
        return p

    def memory_problems(self, num_points: int, num_features: int, num_labels: int) -> list[str]:
        """The network for this data must fit in memory: its weights and two optimizer moments
        (``3 * network_bytes``) are compared with the machine's physical memory before anything
        is built, so a stray id (svmlight feature ``134217728`` makes ``D`` 1.3e8) fails at once
        with the value named instead of allocating for minutes and being killed."""
        need = 3 * network_bytes(num_features, num_labels, self.resolved_for_data(num_points))
        have = host_memory_bytes()
        if have is None or need <= have:
            return []
        return [f"the model for num_features={num_features}, num_labels={num_labels} needs about"
                f" {need / 2**30:.1f} GiB (weights and optimizer state) but this machine has"
                f" {have / 2**30:.1f} GiB; check the data (one feature or label id far above the"
                " others sets D or L) or lower --dim / --hidden"]

    def validate_for_data(self, num_points: int, num_features: int, num_labels: int) -> None:
        """Raise :class:`ConfigError` listing every config and data-size problem at once."""
        probs = self.problems() + self.data_problems(num_points, num_features, num_labels)
        if probs:
            raise ConfigError(probs)

    # -- derived values -------------------------------------------------------------------------
    def resolved_loss(self, num_labels: int) -> str:
        """``full`` / ``sampled`` / ``negative-sampling`` after resolving ``auto``."""
        if self.loss == "auto":
            return "full" if num_labels <= self.full_max_labels else "sampled"
        return self.loss

    @staticmethod
    def auto_codewords(num_labels: int) -> int:
        """Codewords per codebook for ``num_labels`` labels: about 4 labels per cell, 4..64."""
        return int(min(64, max(4, round(math.sqrt(num_labels / 4)))))

    def resolved_codewords(self, num_labels: int) -> int:
        return self.codewords or self.auto_codewords(num_labels)

    def resolved_label_optimizer(self, num_labels: int) -> str:
        if self.label_optimizer != "auto":
            return self.label_optimizer
        return "adamw" if self.resolved_loss(num_labels) == "full" else "sparse-adam"

    def resolved_hidden(self, num_features: int) -> tuple[int, ...]:
        """Hidden widths with an auto (0) first width resolved for ``num_features`` inputs.

        Auto: the largest power of two ``w`` in ``[256, 8192]`` with ``D * w <=
        hidden_budget`` (256 when even that exceeds the budget): wide layers help on small
        feature spaces (Bibtex, ``D = 1836``: 8192) while the ``[D, w]`` bag stays bounded.
        """
        hidden = tuple(self.hidden)
        if not hidden or hidden[0] != 0:
            return hidden
        width = 8192
        while width > 256 and num_features * width > self.hidden_budget:
            width //= 2
        return (width,) + hidden[1:]

    def resolved_for_data(self, num_points: int, *, weighted_input: bool = False
                          ) -> "TrainConfig":
        """A copy with every data-dependent auto value resolved for ``num_points`` rows.

        The trainer builds and saves this copy, so a model directory records what was trained.
        Rules (chosen on validation splits of the training data, ``docs/training.md``): on
        training sets of up to ``SMALL_DATA_POINTS`` (10,000) rows dropout 0.75, input dropout
        0.3 and 20 epochs (tiny data: regularize hard, pass often); above, dropout 0.2, no input
        dropout, PIFA label rows and about ``AUTO_EPOCH_ROWS`` rows in all (``round(150000 / N)`` epochs,
        clipped to 1..20); the ensemble as :meth:`resolved_ensemble`; ``tfidf`` auto is off when
        ``weighted_input`` (the stored feature values are not all whole numbers, see
        :func:`xmc_toolkit.batching.is_weighted`: the file is already TF-IDF or otherwise weighted,
        and a second IDF would square it), else on.
        """
        small = num_points <= SMALL_DATA_POINTS
        changes: dict[str, Any] = {}
        if self.dropout < 0:
            changes["dropout"] = AUTO_DROPOUT[0 if small else 1]
        if self.input_dropout < 0:
            changes["input_dropout"] = AUTO_INPUT_DROPOUT[0 if small else 1]
        if self.epochs == 0:
            changes["epochs"] = 20 if small else int(
                min(20, max(1, round(AUTO_EPOCH_ROWS / max(1, num_points)))))
        if self.ensemble == 0:
            changes["ensemble"] = self.resolved_ensemble(num_points)
        if self.label_init == "auto":
            changes["label_init"] = "random" if small else "pifa"
        if self.tfidf == "auto":
            changes["tfidf"] = "off" if weighted_input else "on"
        return dataclasses.replace(self, **changes) if changes else self

    def resolved_ensemble(self, num_points: int) -> int:
        """Members after resolving ``ensemble=0`` (auto) for ``num_points`` training rows.

        Auto: 3 members up to ``ensemble_max_points`` rows (small data sets, where one network's
        variance dominates and three cost minutes), 2 up to ``10 * ensemble_max_points`` rows
        (kjv-strongs, 24,879 rows: +3 P@5 on its validation split for twice the time), else 1
        (above, one member's epoch is the cost that matters: nextword-tdavid, 941,684 rows).
        """
        if self.ensemble > 0:
            return int(self.ensemble)
        if num_points <= self.ensemble_max_points:
            return 3
        return 2 if num_points <= 10 * self.ensemble_max_points else 1

    def resolved_bag_lr(self) -> float:
        """Learning rate of a sparse EmbeddingBag (``bag_lr``, auto: ``10 * lr``)."""
        return float(self.bag_lr) if self.bag_lr > 0 else 10.0 * float(self.lr)

    def resolved_bag_optimizer(self, num_features: int) -> str:
        """``adamw`` or ``sparse-adam`` for the EmbeddingBag weight after resolving ``auto``."""
        if self.bag_optimizer != "auto":
            return self.bag_optimizer
        return "sparse-adam" if num_features >= self.sparse_features_min else "adamw"


# ------------------------------------------------------------------------------------------------
# preprocessing and network
# ------------------------------------------------------------------------------------------------


@dataclass
class Preprocessor:
    """TF-IDF scaling (with the training set's IDF) and row L2 normalization of inputs.

    Attributes:
        idf: float32 ``[D]`` or ``None`` (no TF-IDF).
        l2_normalize: normalize rows to unit L2 norm.
    """

    idf: np.ndarray | None
    l2_normalize: bool

    @classmethod
    def fit(cls, X: sp.csr_matrix, tfidf: bool, l2_normalize: bool) -> "Preprocessor":
        from .batching import fit_idf

        return cls(fit_idf(X) if tfidf else None, l2_normalize)

    def transform(self, X: sp.spmatrix) -> sp.csr_matrix:
        """Return the transformed ``[N, D]`` float32 CSR (the input is not modified).

        Raises:
            DataFormatError: a row's values are not finite after the transform (a value such
                as 3e38 overflows float32 under TF-IDF or the L2 norm): the input is at fault,
                not the model, and the message names the row and its largest value.
        """
        from .batching import l2_normalize_rows, tfidf_transform

        raw = X
        X = sp.csr_matrix(X, dtype=np.float32)
        if self.idf is not None:
            X = tfidf_transform(X, self.idf)
        if self.l2_normalize:
            X = l2_normalize_rows(X)
        if X.nnz and not np.isfinite(X.data).all():
            from .errors import DataFormatError

            bad = int(np.flatnonzero(~np.isfinite(X.data))[0])
            row = int(np.searchsorted(X.indptr, bad, side="right")) - 1
            vals = sp.csr_matrix(raw)[row].data
            big = float(np.max(np.abs(vals))) if len(vals) else float("nan")
            raise DataFormatError(None, None, f"input row {row + 1} (1-based) has feature values "
                                  f"that are not finite after TF-IDF / L2 normalisation "
                                  f"(largest |value| {big:g}, float32 overflows above 3.4e38 "
                                  "and its square above 1.8e19): check or rescale the data")
        return X


def build_encoder(num_features: int, config: TrainConfig, *,
                  sparse_grad: bool | None = None) -> SparseEncoder | EnsembleEncoder:
    """The :class:`SparseEncoder` that ``config`` describes (auto width resolved for ``D``);
    an :class:`EnsembleEncoder` of ``config.ensemble`` of them when that is above 1.

    ``sparse_grad=None`` follows ``--bag-optimizer``; the bag's own init is :func:`init_bag`.
    """
    from .encoder import EnsembleEncoder, SparseEncoder

    if sparse_grad is None:
        sparse_grad = config.resolved_bag_optimizer(num_features) == "sparse-adam"
    # auto (-1) values not resolved for a data set (TrainConfig.resolved_for_data) take the
    # values of the larger data sets
    dropout = config.dropout if config.dropout >= 0 else AUTO_DROPOUT[1]
    input_dropout = config.input_dropout if config.input_dropout >= 0 else AUTO_INPUT_DROPOUT[1]

    def one() -> SparseEncoder:
        return SparseEncoder(
            num_features, dim=config.dim, hidden=config.resolved_hidden(num_features),
            dropout=dropout, norm=config.norm, linear_only=config.linear_only,
            input_dropout=input_dropout, sparse_grad=sparse_grad)

    if config.ensemble > 1:
        return EnsembleEncoder([one() for _ in range(config.ensemble)])
    return one()


def init_bag(encoder: SparseEncoder | EnsembleEncoder, config: TrainConfig) -> None:
    """Re-initialize the input bag rows from N(0, ``bag_init_std``) (no-op when it is 0).

    N(0, 1) bag rows give O(1) hidden pre-activations on L2-normalized inputs; the encoder's own
    1/sqrt(width) default trains markedly worse on Bibtex (55 vs 62 P@1).
    """
    if config.bag_init_std > 0:
        members = getattr(encoder, "members", [encoder])
        with torch.no_grad():
            for m in members:
                nn.init.normal_(m.bag.weight, std=config.bag_init_std)


class XMCNetwork(nn.Module):
    """Sparse encoder + label table.

    Args:
        num_features: ``D``.
        num_labels: ``L``.
        config: the :class:`TrainConfig` (model fields are read).
    """

    def __init__(self, num_features: int, num_labels: int, config: TrainConfig) -> None:
        super().__init__()
        from .output_layer import LabelTable

        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.encoder = build_encoder(num_features, config)
        self.members = int(getattr(self.encoder, "num_members", 1))
        self.labels = LabelTable(num_labels, self.members * config.dim, bias=config.label_bias)
        init_bag(self.encoder, config)  # after the label table: keeps the seeded draws' order

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, n * d]`` of a batch of EmbeddingBag inputs (``n = 1`` members unless
        ``--ensemble``; an ensemble's query is its members' side by side, divided by ``n``)."""
        return self.encoder(indices, offsets, weights)

    def label_parameters(self) -> list[nn.Parameter]:
        return list(self.labels.parameters())

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    @property
    def label_weight(self) -> torch.Tensor:
        """``[L, d]`` label embeddings (the parameter itself)."""
        return self.labels.weight.weight

    @property
    def label_bias(self) -> torch.Tensor | None:
        """``[L]`` label bias parameter or ``None``."""
        b = getattr(self.labels, "bias", None)
        if b is None:
            return None
        return b.weight.view(-1) if isinstance(b, nn.Embedding) else b


def inverse_propensity_from_counts(counts: np.ndarray, num_points: int, A: float = 0.55,
                                   B: float = 1.5) -> np.ndarray:
    """Inverse propensities ``1 + C (N_l + B)^-A``, ``C = (ln N - 1)(B + 1)^A`` from label counts.

    Same formula as :func:`xmc_toolkit.metrics.inverse_propensity` (Jain et al. 2016), but from
    stored training label counts ``[L]`` and the number of training points, so a saved model can
    compute PSP@k without its training data.
    """
    counts = np.asarray(counts, dtype=np.float64)
    C = (math.log(max(num_points, 1)) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * np.power(counts + B, -A)


# ------------------------------------------------------------------------------------------------
# exact top-k prediction (shared by validation, evaluate.py and model.py)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_topk_network(network: XMCNetwork, X: sp.csr_matrix, k: int, *,
                         batch_size: int = 2048, chunk_size: int = 65536,
                         show_progress: bool = False, approx: bool = False,
                         sampler: Any = None, num_cells: int = 16
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Exact (or MIDX-approximate) top-k labels of preprocessed rows ``X``.

    Args:
        network: the trained network (put in eval mode for the call).
        X: ``[N, D]`` preprocessed features.
        k: labels per row (``<= L``).
        batch_size: rows per block.
        chunk_size: labels per scoring block (exact path).
        show_progress: rich progress bar.
        approx: use ``network.labels.approx_topk`` through ``sampler`` (a MIDX index).
        sampler: the MIDX sampler (updated) for ``approx``.
        num_cells: MIDX cells probed per query (``approx``).

    Returns:
        ``ids`` int64 ``[N, k]`` and ``scores`` float32 ``[N, k]``, best first.
    """
    from .batching import csr_to_bag

    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    ids_out: list[np.ndarray] = []
    sc_out: list[np.ndarray] = []
    starts: Any = range(0, X.shape[0], batch_size)
    try:
        with _progress(show_progress, "predicting", len(starts)) as advance:
            for s in starts:
                idx, off, w = csr_to_bag(X[s: s + batch_size], device=device)
                q = network(idx, off, w).float()  # [b, d]
                if approx:
                    from .output_layer import approx_topk

                    scores, ids = approx_topk(q, network.labels.label_embeddings(),
                                              network.labels.bias_vector(), sampler, k,
                                              num_cells=num_cells)
                else:
                    scores, ids = network.labels.topk(q, k, chunk_size=chunk_size)
                ids_out.append(ids.cpu().numpy().astype(np.int64))
                sc_out.append(scores.float().cpu().numpy())
                advance(1)
    finally:
        network.train(was_training)
    if not ids_out:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids_out), np.concatenate(sc_out)


@contextlib.contextmanager
def _progress(show: bool, description: str, total: int | None,
              fields: dict[str, Any] | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar (or a no-op) as ``advance(n, **fields)``."""
    if not show:
        yield lambda n=1, **kw: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **kw: Any) -> None:
            info = " ".join(f"{k}={v}" for k, v in kw.items())
            prog.update(task, advance=n, info=info)

        yield advance


# ------------------------------------------------------------------------------------------------
# model directories
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """Everything in a model directory.

    Attributes:
        network: the network on ``device`` in eval mode.
        preprocessor: input transform of the training run.
        config: the training config.
        label_names: ``L`` names or ``None``.
        label_counts: int64 ``[L]`` training label counts.
        num_train: number of training points (for propensities).
        sampler_state: MIDX sampler tensors when saved (for ``--approx``), else ``None``.
        summary: the summary JSON (metrics, steps) or ``{}``.
        featurizer: the text featurizer (:class:`~xmc_toolkit.featurizer.Featurizer`) of a
            model trained on raw text, else ``None``.
    """

    network: XMCNetwork
    preprocessor: Preprocessor
    config: TrainConfig
    label_names: list[str] | None
    label_counts: np.ndarray
    num_train: int
    sampler_state: dict[str, torch.Tensor] | None
    summary: dict[str, Any]
    featurizer: Any = None

    @property
    def num_features(self) -> int:
        return self.network.num_features

    @property
    def num_labels(self) -> int:
        return self.network.num_labels

    def inv_prop(self) -> np.ndarray:
        return inverse_propensity_from_counts(self.label_counts, self.num_train,
                                              self.config.psp_a, self.config.psp_b)


def _model_tensors(network: XMCNetwork, pre: Preprocessor) -> dict[str, torch.Tensor]:
    tensors = {f"network.{k}": v.detach().cpu().contiguous()
               for k, v in network.state_dict().items()}
    if pre.idf is not None:
        tensors["preprocess.idf"] = torch.from_numpy(np.ascontiguousarray(pre.idf))
    return tensors


def save_model_dir(out_dir: str | os.PathLike[str], network: XMCNetwork, pre: Preprocessor,
                   config: TrainConfig, *, label_names: list[str] | None,
                   label_counts: np.ndarray, num_train: int,
                   sampler_state: dict[str, torch.Tensor] | None = None,
                   summary: dict[str, Any] | None = None, featurizer: Any = None) -> Path:
    """Write a model directory (weights, config, label vocabulary and counts) atomically.

    ``featurizer`` (a :class:`~xmc_toolkit.featurizer.Featurizer`, models trained on raw text)
    is written beside the weights as ``featurizer.json`` / ``featurizer.safetensors``.
    """
    from .featurizer import FEATURIZER_FILE, FEATURIZER_TENSORS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [MODEL_FILE, CONFIG_FILE, LABELS_FILE]
    if featurizer is not None:
        written += featurizer.save(out)  # covered by checksums.json too
    else:  # never leave the featurizer of an earlier text model in a reused directory
        for name in (FEATURIZER_FILE, FEATURIZER_TENSORS):
            (out / name).unlink(missing_ok=True)
    tensors = _model_tensors(network, pre)
    if sampler_state:
        tensors.update({f"sampler.{k}": v.detach().cpu().contiguous()
                        for k, v in sampler_state.items()})
    _save_tensors(out / MODEL_FILE, tensors)
    meta = {"format": "xmc-toolkit-model", "version": 1, "num_features": network.num_features,
            "num_labels": network.num_labels, "l2_normalize": pre.l2_normalize,
            "tfidf": pre.idf is not None, "train_config": config.to_dict()}
    _write_json(out / CONFIG_FILE, meta)
    _write_json(out / LABELS_FILE, {"label_names": label_names,
                                    "label_counts": [int(c) for c in label_counts],
                                    "num_train": int(num_train)})
    if summary is not None:
        _write_json(out / SUMMARY_FILE, summary)
        written.append(SUMMARY_FILE)
    elif (out / SUMMARY_FILE).is_file():  # a summary of other weights would mislead
        (out / SUMMARY_FILE).unlink()
    from ._fileio import sha256_file

    files = {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)}
             for f in written}
    _write_json(out / CHECKSUMS_FILE, {"format": CHECKSUMS_FORMAT, "version": 1,
                                       "files": files})
    return out


#: everything a training run writes into its output directory (``run.json``: ``xmc train``)
OUTPUT_FILES = (MODEL_FILE, CONFIG_FILE, LABELS_FILE, SUMMARY_FILE, CHECKSUMS_FILE, LOG_FILE,
                "run.json", CKPT_DIR, "featurizer.json", "featurizer.safetensors", "lineage.json")


def prepare_output_dir(out_dir: str | os.PathLike[str], *, force: bool = False) -> list[str]:
    """Make ``out_dir`` ready for a new training run without losing earlier work silently.

    A missing or empty directory is fine. A directory holding a model or checkpoints, or any
    other files, is refused unless ``force``; with ``force`` the files of an earlier run
    (:data:`OUTPUT_FILES`) are removed first, so no old checkpoint or log is mixed with the
    new ones (other files are left alone).

    Returns:
        The names removed (with ``force``).

    Raises:
        OutputError: ``out_dir`` is a file, or is not empty and ``force`` is not set (the
            message says whether it holds a model, and the flags that proceed).
    """
    import shutil

    from ._fileio import LOCK_FILE
    from .errors import OutputError

    d = Path(out_dir)
    if not d.exists():
        return []
    if not d.is_dir():
        raise OutputError(f"--out {str(d)!r} is a file, not a directory; pass a directory")
    entries = sorted(p.name for p in d.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return []
    if not force:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)"
                                          if len(entries) > 5 else "")
        if (d / MODEL_FILE).exists() or (d / CKPT_DIR).exists():
            raise OutputError(
                f"--out {str(d)!r} already holds a trained model ({shown}); continue it with "
                f"--resume {d}, replace it with --force, or choose another --out")
        if (d / "run.json").exists():
            raise OutputError(
                f"--out {str(d)!r} holds an earlier run that saved no model or checkpoint "
                f"({shown}); start it over with --force, or choose another --out")
        raise OutputError(
            f"--out {str(d)!r} is not empty and holds no model ({shown}); training would "
            "overwrite files there: choose a new or empty --out, or pass --force")
    removed = []
    for name in OUTPUT_FILES:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning("--force: removed %s of the earlier run in %s", ", ".join(removed), d)
    return removed


def verify_model_dir(model_dir: str | os.PathLike[str]) -> bool:
    """Check the size and sha256 of every file that ``checksums.json`` lists.

    Returns:
        ``True`` when verified, ``False`` when the directory has no ``checksums.json`` (written
        by an older xmc-toolkit; a warning is logged).

    Raises:
        CheckpointError: a file is missing, has another size or another sha256 (naming it),
            or ``checksums.json`` itself is unreadable.
    """
    from .checkpoint import verify_files

    d = Path(model_dir)
    fix = ("retrain, restore the directory from a backup, or load it unchecked with "
           "--no-verify (verify=False)")
    if not (d / CHECKSUMS_FILE).is_file():
        logger.warning("%s has no %s (written by an older xmc-toolkit): its files cannot be "
                       "verified", d, CHECKSUMS_FILE)
        return False
    try:
        doc = json.loads((d / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict) or not all(
                isinstance(v, dict) for v in files.values()):
            raise ValueError("not an xmc-toolkit checksum list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(d / CHECKSUMS_FILE)!r} is corrupt ({exc}); {fix}") from exc
    verify_files(d, files, corrupt=lambda what: CheckpointError(
        f"model directory {str(d)!r} is corrupt: {what}; {fix}"))
    return True


def load_model_dir(model_dir: str | os.PathLike[str], device: str | torch.device = "auto",
                   *, verify: bool = True) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir` / ``xmc train``.

    Args:
        model_dir: the directory.
        device: where to put the network (``auto``: CUDA when available).
        verify: check every file against ``checksums.json`` first (:func:`verify_model_dir`;
            one sha256 pass over the directory). ``False`` (``--no-verify``) skips it.

    Raises:
        CheckpointError: the directory is not a model directory, its files are corrupt, or its
            config does not match its weights (checked before anything is built).
    """
    d = Path(model_dir)
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, LABELS_FILE) if not (d / f).is_file()]
    if not d.is_dir() or missing:
        what = "does not exist" if not d.exists() else (
            "is not a directory" if not d.is_dir() else f"lacks {', '.join(missing)}")
        raise CheckpointError(f"{str(d)!r} is not a model directory ({what}); pass the --out "
                              "directory of `xmc train` as --model")
    if verify:
        verify_model_dir(d)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
        labels = json.loads((d / LABELS_FILE).read_text())
        config = TrainConfig.from_dict(meta["train_config"])
        D, L = meta["num_features"], meta["num_labels"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (D, L)):
            raise ValueError(f"num_features={D!r}, num_labels={L!r} must be positive integers")
        if not isinstance(labels, dict):
            raise ValueError(f"{LABELS_FILE} holds a {type(labels).__name__}, not an object")
        counts = np.asarray(labels.get("label_counts", [0] * L))
        if counts.shape != (L,) or counts.dtype.kind not in "iu":
            raise ValueError(f"label_counts must be {L} integers, found "
                             f"{str(labels.get('label_counts'))[:40]}")
        num_train = labels.get("num_train", 1)
        if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
            raise ValueError(f"num_train={num_train!r} must be a positive integer")
        names = labels.get("label_names")
        if names is not None and (not isinstance(names, list) or len(names) != L):
            raise ValueError(f"label_names must be a list of {L} names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, XMCError) as exc:
        raise CheckpointError(f"{str(d)!r}: {CONFIG_FILE} or {LABELS_FILE} is corrupt ({exc}); "
                              "retrain or restore the directory") from exc
    _check_model_shapes(d / MODEL_FILE, D, L, config)  # before anything of size D or L exists
    tensors = _load_tensors(d / MODEL_FILE)
    dev = resolve_device(device)
    network = XMCNetwork(D, L, config)
    state = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d / MODEL_FILE)!r} does not match its config: {exc}") from exc
    network.to(dev).eval()
    idf = tensors.get("preprocess.idf")
    pre = Preprocessor(None if idf is None else idf.numpy(), bool(meta.get("l2_normalize", True)))
    sampler_state = {k[len("sampler."):]: v for k, v in tensors.items()
                     if k.startswith("sampler.")} or None
    summary: dict[str, Any] = {}
    if (d / SUMMARY_FILE).is_file():
        with contextlib.suppress(ValueError):
            summary = json.loads((d / SUMMARY_FILE).read_text())
    from .featurizer import Featurizer

    featurizer = Featurizer.load(d) if Featurizer.exists(d) else None
    if featurizer is not None and featurizer.num_features != D:
        raise CheckpointError(f"{str(d)!r}: the featurizer makes {featurizer.num_features} "
                              f"features but the model takes {D}; retrain the model")
    return LoadedModel(network, pre, config, names, counts.astype(np.int64), num_train,
                       sampler_state, summary, featurizer)


def _meta_network(num_features: int, num_labels: int, config: TrainConfig) -> XMCNetwork:
    """The network ``config`` describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return XMCNetwork(num_features, num_labels, config)


def _check_model_shapes(path: Path, num_features: int, num_labels: int,
                        config: TrainConfig) -> None:
    """Compare the tensor shapes stored in ``path`` with those ``config`` gives, reading only
    the safetensors header, so that a crafted ``config.json`` (``num_features`` 1e12) fails
    before anything of that size is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = {k[len("network."):]: tuple(fh.get_slice(k).get_shape())
                      for k in fh.keys() if k.startswith("network.")}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); "
                              "retrain or restore the file") from exc
    try:
        expected = {k: tuple(v.shape) for k, v in
                    _meta_network(num_features, num_labels, config).state_dict().items()}
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{str(path.parent)!r}: {CONFIG_FILE} describes no valid network "
                              f"({exc}); retrain or restore the directory") from exc
    bad = [f"{k}: config gives {expected.get(k)}, file holds {stored.get(k)}"
           for k in sorted(set(expected) | set(stored)) if expected.get(k) != stored.get(k)]
    if bad:
        raise CheckpointError(
            f"{str(path)!r} does not match {CONFIG_FILE} (num_features={num_features}, "
            f"num_labels={num_labels}): {'; '.join(bad[:3])}"
            + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            + "; the directory is corrupt: retrain or restore it")


def network_bytes(num_features: int, num_labels: int, config: TrainConfig) -> int:
    """Bytes of the parameters of the network ``config`` describes (no allocation)."""
    net = _meta_network(num_features, num_labels, config)
    return sum(p.numel() * p.element_size() for p in net.parameters())


def host_memory_bytes() -> int | None:
    """Physical memory of this machine, or ``None`` when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _write_json(path: Path, obj: Any) -> None:
    from ._fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic safetensors save (:func:`xmc_toolkit._fileio.atomic_write`)."""
    from safetensors.torch import save_file

    from ._fileio import atomic_write

    atomic_write(path, lambda p: save_file(tensors, str(p)))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); "
                              "retrain or restore the file") from exc


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
        callbacks: ``callback(event, state)`` hooks; events ``"train_begin"``, ``"epoch_begin"``,
            ``"step"`` (every step: ``step``, ``epoch``, ``lr``, ``loss`` -- the mean loss
            since the last read as a float on every ``log_every``-th step, else ``None`` --
            and ``loss_tensor``, this step's detached 0-d loss on the device: reading it syncs),
            ``"epoch_end"`` (with the epoch's record), ``"checkpoint"``, ``"train_end"``.
    """

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike[str] | None = None,
                 callbacks: Sequence[Callback] = (), featurizer: Any = None) -> None:
        self.config = config.validate()
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
        if self.out_dir is None:
            return self._fit(train, val, show_progress, resume, force, init)
        from ._fileio import OutputLock

        with OutputLock(self.out_dir, what="`xmc train` / training run"):
            if not resume:
                prepare_output_dir(self.out_dir, force=force)
            return self._fit(train, val, show_progress, resume, force, init)

    def _fit(self, train: XMCDataset, val: XMCDataset | None, show_progress: bool,
             resume: bool, force: bool, init: WarmStart | None) -> TrainResult:
        cfg = self.config
        device = resolve_device(cfg.device)
        self._seed_everything(cfg.seed)
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
        weighted = self.featurizer is None and is_weighted(X_raw)
        cfg = self.config = cfg.resolved_for_data(train.num_points, weighted_input=weighted)
        self.preprocessor = (init.preprocessor if init is not None else
                             Preprocessor.fit(X_raw, cfg.tfidf == "on", cfg.l2_normalize))
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
        self.network = network = XMCNetwork(D, L, cfg).to(device)
        logger.info("encoder hidden widths %s (D=%d), bag optimizer %s, loss %s",
                    list(cfg.resolved_hidden(D)), D, cfg.resolved_bag_optimizer(D), loss_name)
        if init is not None:
            init.apply_network(network)  # the parent's encoder and (grown) label rows
        elif cfg.label_init == "pifa" and not resume:
            _pifa_init_(network, X, Y, cfg.eval_batch_size)
        network.train()
        if cfg.ema > 0:
            self._ema = {k: v.detach().clone() for k, v in network.state_dict().items()
                         if v.is_floating_point()}
        sampled = loss_name != "full"
        self.sampler = self._make_sampler(L, device) if sampled else None

        from .batching import BatchIterator

        batches = BatchIterator(X, Y, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device)
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
        sample_gen.manual_seed(cfg.seed + 1)

        state: dict[str, Any] = {"step": 0, "epoch": 0, "history": [], "best": {},
                                 "best_epoch": 0, "best_value": None, "bad_epochs": 0,
                                 "stopped_early": False, "epoch_loss_sum": 0.0,
                                 "epoch_loss_count": 0, "epoch_examples": 0}
        if resume:
            self._load_checkpoint(network, bundle, batches, sample_gen, scaler, state)
            logger.info("resumed from step %d (epoch %d, batch %d)", state["step"],
                        batches.epoch, batches.batch_index)
        elif self.out_dir is not None:
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
            ck = self.out_dir / CKPT_DIR
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
        if self.out_dir is not None:
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
        decay = min(self.config.ema, (1.0 + step) / (10.0 + step))
        current = network.state_dict()
        keys = list(self._ema)
        torch._foreach_lerp_([self._ema[k] for k in keys], [current[k] for k in keys],
                             1.0 - decay)

    @contextlib.contextmanager
    def _averaged_weights(self, network: XMCNetwork) -> Iterator[None]:
        """Temporarily load the EMA weights into ``network`` (no-op without ``--ema``)."""
        if self._ema is None:
            yield
            return
        backup = {k: v.detach().clone() for k, v in network.state_dict().items()
                  if k in self._ema}
        network.load_state_dict(self._ema, strict=False)
        try:
            yield
        finally:
            network.load_state_dict(backup, strict=False)

    def _validate(self, network: XMCNetwork, X_val: sp.csr_matrix, Y_val: sp.csr_matrix,
                  inv_prop: np.ndarray) -> dict[str, float]:
        from .metrics import evaluate as evaluate_metrics

        cfg = self.config
        k = max(cfg.ks)
        ids, _ = predict_topk_network(network, X_val, k, batch_size=cfg.eval_batch_size,
                                      chunk_size=cfg.eval_chunk_size)
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
            q = network(batch.indices, batch.offsets, batch.weights)  # [B, d]
        q = q.float()
        loss = compute_loss(network, q, batch.pos_ids, batch.pos_mask, loss_name,
                            sampler=self.sampler, negatives=cfg.negatives,
                            shared=cfg.shared_negatives, generator=gen,
                            correct_target=cfg.correct_target, chunk_size=cfg.eval_chunk_size,
                            bce_weight=cfg.bce_weight, log_q_correction=cfg.log_q_correction,
                            ids_checked=True)  # csr_to_padded checked them on the host
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
            gnorm = _clip_grad_norm(list(network.parameters()), cfg.clip_grad)
            if scaler is None and not math.isfinite(gnorm):  # a GradScaler skips the step
                self._track_loss(loss, state["step"] + 1, state["epoch"] + 1)
                self._read_loss(state)  # a non-finite loss is the cause: report that
                ck = None if self.out_dir is None else self.out_dir / CKPT_DIR
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
        from .sampling import make_sampler

        cfg = self.config
        kwargs: dict[str, Any] = {}
        name = cfg.sampler
        if name.startswith("midx"):
            kwargs = dict(num_codewords=cfg.resolved_codewords(L),
                          quantizer=cfg.quantizer if name == "midx" else name.split("-")[1],
                          within_cell=cfg.within_cell, alpha=cfg.popularity_alpha, seed=cfg.seed)
            name = "midx"
        elif name == "popularity":
            kwargs = dict(alpha=cfg.popularity_alpha)
        return make_sampler(name, L, label_counts=self.label_counts.astype(np.float64), **kwargs)

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
        network = self.network
        sampler_state = None
        if self.sampler is not None and self.sampler.needs_update:
            with contextlib.suppress(Exception):
                sampler_state = self.sampler.state_dict()
        save_model_dir(self.out_dir, network, self.preprocessor, self.config,  # type: ignore
                       label_names=self.label_names, label_counts=self.label_counts,
                       num_train=self.num_train, sampler_state=sampler_state, summary=summary,
                       featurizer=self.featurizer)

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
        path = save_checkpoint(self.out_dir / CKPT_DIR, groups, meta=meta, step=state["step"])
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

        ck = self.out_dir / CKPT_DIR  # type: ignore[operator]
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


# ------------------------------------------------------------------------------------------------
# loss computation (pure function of the network and a batch)
# ------------------------------------------------------------------------------------------------


def compute_loss(network: XMCNetwork, queries: torch.Tensor, pos_ids: torch.Tensor,
                 pos_mask: torch.Tensor, loss_name: str, *, sampler: Any = None,
                 negatives: int = 64, shared: bool = False,
                 generator: torch.Generator | None = None, correct_target: bool = False,
                 chunk_size: int = 65536, bce_weight: float = 0.0,
                 log_q_correction: bool = False, ids_checked: bool = False) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        network: gives the label table.
        queries: ``[B, n * d] float32`` (``n = network.members``; 1 unless an ensemble, whose
            loss is the mean of its members' losses).
        pos_ids: ``[B, P] int64`` padded positives; pos_mask ``[B, P] bool``.
        loss_name: ``full | sampled | negative-sampling``.
        sampler: a :class:`xmc_toolkit.sampling.Sampler` (sampled losses).
        negatives: ``M`` samples per query (or shared by the batch when ``shared``).
        generator: torch generator of the samples (reproducibility).
        correct_target: TensorFlow-style target correction (sampled softmax).
        chunk_size: label chunk of the full softmax.
        bce_weight: ``full`` only: add ``bce_weight`` times the one-vs-all binary
            cross-entropy of all ``B x L`` scores (summed over labels, mean over rows) (materialises ``[B, L]``; the full softmax is
            only used for moderate ``L``).
        log_q_correction: ``negative-sampling`` only: subtract ``log(M q)`` from the negative
            logits (:func:`xmc_toolkit.losses.negative_sampling_loss`).
        ids_checked: ``pos_ids`` were range-checked on the host (the trainer's batches are, by
            :func:`xmc_toolkit.batching.csr_to_padded`): the sampler skips its own check, which
            reads two values back from the device.

    Returns:
        Scalar loss.
    """
    from . import losses

    n = int(getattr(network, "members", 1))  # ensemble members: each gets its own loss
    if loss_name == "full":
        d = queries.shape[1] // n  # member i: its query n * q[:, i*d:(i+1)*d], its label block
        W, b = network.label_weight, network.label_bias
        parts = [_full_loss(queries[:, i * d:(i + 1) * d] * n if n > 1 else queries,
                            W[:, i * d:(i + 1) * d] if n > 1 else W, b, pos_ids, pos_mask,
                            chunk_size, bce_weight) for i in range(n)]
    else:
        # one draw per step, from the sampler over the (ensemble's mean) scores; every member
        # gets the same exact log q (any full-support proposal keeps the estimator consistent)
        qd = queries.detach()
        smp = sampler.sample(qd, negatives, shared=shared, generator=generator)
        pos_scores = member_score_ids(network.labels, queries, pos_ids, n)  # [B, P, n]
        neg_scores = member_score_ids(network.labels, queries, smp.ids, n)  # [B, M, n]
        if loss_name == "sampled":
            # the positives' log q under the law the negatives were drawn from: per query
            # q_b, or in shared mode the batch mixture qbar = (1/B) sum_b q_b (the estimator
            # divides by 1 - qbar(P_b); q_b(P_b) there biases the loss, see docs/losses.md)
            pos_log_q = (sampler.log_prob(qd, pos_ids, shared=shared, check_ids=False)
                         if ids_checked else sampler.log_prob(qd, pos_ids, shared=shared))  # [B, P]
            parts = [losses.sampled_softmax_loss(
                pos_scores[..., i], pos_ids, pos_mask, pos_log_q, neg_scores[..., i], smp.ids,
                smp.log_q, correct_target=correct_target) for i in range(n)]
        else:
            parts = [losses.negative_sampling_loss(
                pos_scores[..., i], pos_ids, pos_mask, neg_scores[..., i], smp.ids,
                smp.log_q if log_q_correction else None, log_q_correction=log_q_correction)
                for i in range(n)]
    return parts[0] if n == 1 else torch.stack(parts).mean()


def _full_loss(queries: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               pos_ids: torch.Tensor, pos_mask: torch.Tensor, chunk_size: int,
               bce_weight: float) -> torch.Tensor:
    """Full softmax loss of queries ``[B, d]`` against ``weight [L, d]`` (+ the BCE term)."""
    from . import losses

    loss = losses.full_softmax_loss(queries, weight, pos_ids, pos_mask, bias,
                                    chunk_size=chunk_size)
    if bce_weight > 0:
        scores = queries @ weight.t()  # [B, L]
        if bias is not None:
            scores = scores + bias
        target = torch.zeros_like(scores)  # [B, L]
        target.scatter_(1, torch.where(pos_mask, pos_ids, 0),
                        pos_mask.to(scores.dtype))  # padding writes 0 into column 0
        target[:, 0] = torch.maximum(
            target[:, 0], ((pos_ids == 0) & pos_mask).any(1).to(scores.dtype))
        loss = loss + bce_weight * nn.functional.binary_cross_entropy_with_logits(
            scores, target, reduction="sum") / scores.shape[0]
    return loss


def member_score_ids(labels: Any, queries: torch.Tensor, ids: torch.Tensor,
                     members: int) -> torch.Tensor:
    """Every ensemble member's scores of given labels.

    Args:
        labels: the :class:`~xmc_toolkit.output_layer.LabelTable` (``[L, n * d]``).
        queries: ``[B, n * d]`` ensemble queries (the members' side by side, divided by ``n``).
        ids: ``[B, M]`` per-query or ``[M]`` shared label ids.
        members: ``n``.

    Returns:
        ``[B, M, n]``: ``q_i . w_i[id] + b[id]`` for member ``i`` (its unscaled query).
    """
    if members == 1:
        return labels.score_ids(queries, ids).unsqueeze(-1)  # [B, M, 1]
    B = queries.shape[0]
    d = queries.shape[1] // members
    qn = queries.view(B, members, d) * members  # [B, n, d] the members' own queries
    w = labels.weight(ids)  # [M, n*d] or [B, M, n*d]
    if ids.dim() == 1:
        s = torch.einsum("bnd,mnd->bmn", qn, w.view(-1, members, d))  # [B, M, n]
    else:
        s = torch.einsum("bmnd,bnd->bmn", w.view(B, -1, members, d), qn)  # [B, M, n]
    if labels.bias is not None:
        bias = labels.bias(ids)  # [M, 1] or [B, M, 1]
        s = s + (bias.view(1, -1, 1) if ids.dim() == 1 else bias)
    return s


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _pifa_init_(network: XMCNetwork, X: sp.csr_matrix, Y: sp.csr_matrix, batch_size: int) -> None:
    """Set the label rows of labels with training rows to their PIFA rows (``label_init``)."""
    from .encoder import encode_csr
    from .label_init import pifa_label_rows

    queries = encode_csr(network.encoder, X, batch_size=batch_size)  # [N, n*d] eval mode
    rows, has_rows = pifa_label_rows(queries, Y)
    weight = network.labels.weight.weight  # [L, n*d]
    weight[has_rows] = rows[has_rows].to(weight.dtype)


def _split(ds: XMCDataset, fraction: float, seed: int) -> tuple[XMCDataset, XMCDataset]:
    n = ds.num_points
    n_val = max(1, int(round(n * fraction)))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val_rows, tr_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return ds.subset(tr_rows), ds.subset(val_rows)


def _amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    if device.type != "cuda" or mode == "off":
        return None, None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


@torch.no_grad()
def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global L2 norm of dense *and sparse* gradients (sparse ones are coalesced)."""
    sq: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            p.grad = g
            sq.append(g._values().float().pow(2).sum())
        else:
            sq.append(g.float().pow(2).sum())
    if not sq:
        return 0.0
    total = torch.stack(sq).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g._values().mul_(scale.to(g.dtype))
        else:
            g.mul_(scale.to(g.dtype))
    return float(total)


# ------------------------------------------------------------------------------------------------
# python -m xmc_toolkit.train
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m xmc_toolkit.train``: the ``xmc train`` command without the ``xmc`` group.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it runs the data-parallel, label-sharded trainer of
    :mod:`xmc_toolkit.distributed` with the same flags.
    """
    import os
    import sys

    args = list(argv) if argv is not None else sys.argv[1:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import main as distributed_main

        distributed_main(args)
        return
    from cli.main import xmc

    xmc.main(args=["train", *args], prog_name="xmc")


if __name__ == "__main__":  # pragma: no cover
    main()
