"""The training configuration: :class:`TrainConfig` and the names its choice fields take.

One job: what a training run is asked to do, validated (``problems``, ``data_problems``,
``memory_problems``) and with its auto values resolved for a data set (``resolved_*``). It
builds nothing; :mod:`xmc_toolkit.network` builds the network a config describes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigBase
from .errors import ConfigError

__all__ = [
    "LOSSES",
    "SAMPLERS",
    "QUANTIZERS",
    "WITHIN_CELL",
    "AMP_MODES",
    "NORMS",
    "LABEL_INITS",
    "TFIDF_MODES",
    "METRIC_NAMES",
    "EXACT_WITHIN_CELL_MAX_LABELS",
    "SMALL_DATA_POINTS",
    "AUTO_DROPOUT",
    "AUTO_INPUT_DROPOUT",
    "AUTO_EPOCH_ROWS",
    "BAG_LR_SCALE",
    "TrainConfig",
]

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
# mean labels per row from which feature_power=auto takes square roots of weighted inputs
MULTI_LABEL_ROWS = 2.0
# data-size rules of the auto defaults (TrainConfig.resolved_for_data; docs/training.md has the
# validation runs that chose them)
SMALL_DATA_POINTS = 10_000  # up to this many training rows: strong regularization, 20 epochs
AUTO_DROPOUT = (0.75, 0.2)  # (small, larger) data sets
AUTO_INPUT_DROPOUT = (0.3, 0.0)
AUTO_EPOCH_ROWS = 100_000  # larger data sets: about this many rows seen in all, 1..20 epochs
# bag_lr=auto: a sparse EmbeddingBag's rows step at this many times lr (a row moves only on the
# steps whose batch holds its feature)
BAG_LR_SCALE = 100.0


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
    and 20 epochs, above that dropout 0.2, 3 members up to 100,000 rows and 1 beyond, PIFA label
    rows and about 100,000 rows of training; full softmax up to
    ``full_max_labels`` labels and MIDX sampled softmax above; AdamW with warm-up and linear
    decay (sparse row-wise Adam for a sparse bag, its rows at 100 x lr, and sampled label
    tables).
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
    feature_power: float = field(default=-1.0, metadata=_h(
        "raise every stored feature value to this power before the IDF and the L2 norm (a"
        " sublinear weighting: 0.5 is the square root, 1 leaves the values); -1 (auto): 0.5 when"
        " the values are weighted (not all whole numbers, e.g. a TF-IDF file), none is negative"
        " and the rows have 2 or more labels on average, else 1 (counts, binary and signed"
        " features, and single-label data such as next-word rows, are left as they are)"
        " (--feature-power)"))
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
        " rows, else 1 (--ensemble)"))
    ensemble_max_points: int = field(default=100_000, metadata=_h(
        "largest training set (rows) for which ensemble=0 (auto) trains 3 members; above, 1"
        " (--ensemble-max-points)"))
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
        " rows, else about 100,000 rows in all (round(100000 / N), clipped to 1..20) (--epochs)"))
    batch_size: int = field(default=128, metadata=_h("training rows per step (--batch-size)"))
    lr: float = field(default=1e-3, metadata=_h("AdamW learning rate of the encoder (--lr)"))
    label_lr: float = field(default=0.0, metadata=_h(
        "learning rate of the label table; 0: same as lr (--label-lr)"))
    bag_lr: float = field(default=0.0, metadata=_h(
        "learning rate of the EmbeddingBag rows when they are sparse (bag_optimizer"
        " sparse-adam); 0 (auto): 100 x lr, since each row only moves on the steps whose batch"
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
        fp = self.feature_power
        if isinstance(fp, bool) or not isinstance(fp, (int, float)) or not (
                fp == -1.0 or 0.0 < fp <= 1.0):
            p.append(f"feature_power={self.feature_power!r} must be in (0, 1], or -1 for auto"
                     " (--feature-power)")
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
        # the one upward import of this module: the size of the network a config describes
        # is the network module's (it builds one on the meta device, allocating nothing)
        from .network import host_memory_bytes, network_bytes

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

    def sharded_problems(self, world_size: int, num_points: int, num_features: int,
                         num_labels: int) -> list[str]:
        """What this config asks that the sharded placement (labels split across
        ``world_size`` torchrun processes) cannot do: listed up front with the config's other
        problems, never ignored. Auto values are resolved for the data first (an auto
        ensemble is its resolved member count)."""
        cfg = self.resolved_for_data(num_points)
        p: list[str] = []
        loss = cfg.resolved_loss(num_labels)
        if loss == "negative-sampling":
            p.append("loss='negative-sampling' is not available with the sharded placement; use "
                     "--loss full or --loss sampled")
        if cfg.correct_target:
            p.append("correct_target is not available with the sharded placement; drop "
                     "--correct-target")
        if cfg.bag_optimizer == "sparse-adam" or cfg.bag_lr > 0:
            p.append("bag_optimizer='sparse-adam' / --bag-lr are not available with the sharded "
                     "placement (DDP all-reduces dense EmbeddingBag gradients; NCCL has no "
                     "sparse all-reduce); use --bag-optimizer auto or adamw")
        if cfg.amp == "fp16":
            p.append("amp='fp16' is not available with the sharded placement (a GradScaler "
                     "skips steps per rank and the label shards would drift); use --amp bf16, "
                     "auto or off")
        if cfg.ensemble > 1 and loss != "full":
            p.append(f"ensemble={cfg.ensemble} with loss={loss!r} is not available with the "
                     "sharded placement (members share one draw per step in one process "
                     "only); use --loss full, --ensemble 1, or train in one process")
        if cfg.batch_size < world_size:
            p.append(f"batch_size={cfg.batch_size} is smaller than the {world_size} processes; "
                     "raise --batch-size")
        return p

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

    def resolved_for_data(self, num_points: int, *, weighted_input: bool = False,
                          signed_input: bool = False, labels_per_row: float = 1.0
                          ) -> "TrainConfig":
        """A copy with every data-dependent auto value resolved for ``num_points`` rows.

        The trainer builds and saves this copy, so a model directory records what was trained.
        Rules (chosen on validation splits of the training data, ``docs/training.md``): on
        training sets of up to ``SMALL_DATA_POINTS`` (10,000) rows dropout 0.75, input dropout
        0.3 and 20 epochs (tiny data: regularize hard, pass often); above, dropout 0.2, no input
        dropout, PIFA label rows and about ``AUTO_EPOCH_ROWS`` rows in all (``round(100000 / N)`` epochs,
        clipped to 1..20); the ensemble as :meth:`resolved_ensemble`; ``tfidf`` auto is off when
        ``weighted_input`` (the stored feature values are not all whole numbers, see
        :func:`xmc_toolkit.batching.is_weighted`: the file is already TF-IDF or otherwise weighted,
        and a second IDF would square it), else on; ``feature_power`` auto is 0.5 (square roots
        of the stored values) on weighted multi-label inputs without negative values
        (``weighted_input``, not ``signed_input``, ``labels_per_row >= MULTI_LABEL_ROWS``), else 1:
        measured on the two real sets' validation splits (``docs/training.md``), the square root
        of kjv-strongs' TF-IDF rows (9.95 labels a row) is worth about +0.8 P@1 / +0.9 P@5, of
        nextword-tdavid's distance-weighted context rows (one label a row) -1.5 P@1.
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
        if self.feature_power == -1.0:
            changes["feature_power"] = 0.5 if (weighted_input and not signed_input and
                                               labels_per_row >= MULTI_LABEL_ROWS) else 1.0
        return dataclasses.replace(self, **changes) if changes else self

    def resolved_for_rows(self, X: Any, Y: Any, *, featurized: bool = False) -> "TrainConfig":
        """:meth:`resolved_for_data` for the training rows ``X [N, D]`` / ``Y [N, L]`` (sparse):
        whether the values are weighted (:func:`xmc_toolkit.batching.is_weighted`; never for rows
        of the text featurizer, ``featurized``) or signed, and the mean labels per row."""
        from .batching import is_weighted

        n = int(X.shape[0])
        return self.resolved_for_data(
            n, weighted_input=not featurized and is_weighted(X),
            signed_input=X.nnz > 0 and float(X.data.min()) < 0,
            labels_per_row=float(Y.nnz) / max(1, n))

    def resolved_ensemble(self, num_points: int) -> int:
        """Members after resolving ``ensemble=0`` (auto) for ``num_points`` training rows.

        Auto: 3 members up to ``ensemble_max_points`` (100,000) rows, else 1. Small data sets
        (Bibtex): one network's variance dominates and three cost minutes; kjv-strongs (24,879
        rows): at equal training time (12 member-epochs) 3 members x 5 epochs beat 2 x 7 on its
        validation split (P@5 76.93 vs 76.51, docs/training.md); above, one member's epoch is
        the cost that matters (nextword-tdavid, 941,684 rows).
        """
        if self.ensemble > 0:
            return int(self.ensemble)
        return 3 if num_points <= self.ensemble_max_points else 1

    def resolved_bag_lr(self) -> float:
        """Learning rate of a sparse EmbeddingBag (``bag_lr``, auto: ``100 * lr``).

        Measured on validation splits (docs/training.md): kjv-strongs P@5 75.41 / 75.85 / 76.51
        / 76.51 at 10 / 30 / 100 / 300 x lr, nextword-tdavid (first 150,000 rows) P@1 13.35 /
        13.80 / 14.15 / 14.14: both flatten out between 100 x and 300 x.
        """
        return float(self.bag_lr) if self.bag_lr > 0 else BAG_LR_SCALE * float(self.lr)

    def resolved_bag_optimizer(self, num_features: int) -> str:
        """``adamw`` or ``sparse-adam`` for the EmbeddingBag weight after resolving ``auto``."""
        if self.bag_optimizer != "auto":
            return self.bag_optimizer
        return "sparse-adam" if num_features >= self.sparse_features_min else "adamw"
