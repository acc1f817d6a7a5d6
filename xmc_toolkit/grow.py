"""Growing the label set of a trained model: new label rows, kept encoder, kept optimizer state.

A trained model knows its encoder; a new label is a direction in its query space. Each new
label's row is initialised from the encodings of its training rows (the normalised mean query
of its positives, :func:`xmc_toolkit.label_init.pifa_label_rows`), scaled and biased so that its
scores look like those of trained labels of the same frequency (:func:`new_label_rows`). The old
rows, the encoder, the input preprocessing (TF-IDF weights of the parent) and, where the parent
has a checkpoint, the optimizer moments of every kept parameter stay; the MIDX index assigns the
new rows to the parent's codewords and is refreshed from there.

Entry points (used by ``xmc labels add``, ``xmc train --init-from`` and
``XMCModel.add_labels``):

* :func:`match_labels` / :func:`remap_labels` / :func:`align_features`: the data's label columns
  in the grown label space (by name when both sides carry names, else by id) -- pure;
* :func:`new_label_rows`: the initialisation math -- pure tensor function;
* :func:`grow_network`, :func:`grow_optimizer_state`, :func:`grow_sampler_state`: the grown
  network, optimizer state and MIDX state -- pure;
* :func:`prepare_growth`: a parent :class:`~xmc_toolkit.train.LoadedModel` + data -> the grown
  model (no training);
* :func:`add_labels_dir` (``xmc labels add``) and :func:`train_from` (``xmc train --init-from``):
  model directory in, new model directory out, with ``lineage.json``. The parent directory is
  only ever read.

Nothing here prints or exits; errors are :class:`~xmc_toolkit.errors.XMCError` subclasses.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch

from .data.dataset import XMCDataset
from .errors import CheckpointError, ConfigError, DataFormatError, LabelSetError

if TYPE_CHECKING:
    from .train import LoadedModel, Preprocessor, TrainConfig, TrainResult, XMCNetwork

__all__ = [
    "FINE_TUNE_EPOCHS",
    "FINE_TUNE_LR_SCALE",
    "FINE_TUNE_WARMUP",
    "LINEAGE_FILE",
    "FROZEN_FIELDS",
    "LabelMatch",
    "NewRows",
    "WarmStart",
    "Growth",
    "match_labels",
    "remap_labels",
    "align_features",
    "new_label_rows",
    "new_label_rows_members",
    "grow_network",
    "grow_optimizer_state",
    "grow_sampler_state",
    "child_config",
    "config_file_overrides",
    "prepare_growth",
    "read_optimizer_state",
    "add_labels_dir",
    "train_from",
    "read_lineage",
]

logger = logging.getLogger(__name__)

DIRECTIONS = ("mean", "centered", "lda")
CALIBRATIONS = ("moments", "spread", "norm")
FINE_TUNE_EPOCHS = 2  # epochs of `xmc train --init-from` without --epochs (docs/growing-labels.md)
FINE_TUNE_LR_SCALE = 0.3  # without --lr: the parent's learning rates times this
FINE_TUNE_WARMUP = 0.1  # without --warmup-steps: this share of the fine-tune's steps (at most
                        # the parent's warm-up)
FINE_TUNE_PER_MEMBER = True  # a fine-tune's new rows: calibrated per ensemble member
LINEAGE_FILE = "lineage.json"
# fields that shape the network or its inputs: a grown model keeps its parent's
FROZEN_FIELDS = ("dim", "hidden", "hidden_budget", "linear_only", "tfidf", "feature_power",
                 "l2_normalize", "label_bias", "ensemble", "norm")


# ------------------------------------------------------------------------------------------------
# label spaces
# ------------------------------------------------------------------------------------------------


@dataclass
class LabelMatch:
    """How a data set's label columns map into the grown label space.

    Attributes:
        by: ``"name"`` (both sides carry names) or ``"id"``.
        column_ids: int64 ``[L_data]``: the grown label id of each data column.
        num_old: ``L`` of the model; ids ``>= num_old`` are new labels.
        num_labels: ``L`` of the grown model.
        names: the grown model's ``num_labels`` names, or ``None``.
    """

    by: str
    column_ids: np.ndarray
    num_old: int
    num_labels: int
    names: list[str] | None

    @property
    def num_new(self) -> int:
        return self.num_labels - self.num_old

    @property
    def new_names(self) -> list[str] | None:
        return None if self.names is None else self.names[self.num_old:]


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: list[str] = []
    for n in names:
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    return dup


def _show(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def match_labels(model_names: Sequence[str] | None, num_model_labels: int,
                 data_names: Sequence[str] | None, num_data_labels: int) -> LabelMatch:
    """Map the data's label columns to ids of the grown label space.

    By name when both the model and the data carry names: a data label whose name the model
    knows keeps the model's id, the others are new and get ids ``L, L + 1, ...`` in data order.
    Otherwise by id: column ``j`` is label ``j``, and columns ``>= L`` are new.

    Raises:
        LabelSetError: duplicate names in the data (or the model), or new labels without names
            for a model whose labels have names.
    """
    L = int(num_model_labels)
    if model_names is not None and len(model_names) != L:
        raise LabelSetError(f"the model has {L} labels but {len(model_names)} label names; "
                            "its labels.json is inconsistent, restore the model directory")
    if data_names is not None and len(data_names) != num_data_labels:
        raise LabelSetError(f"the data has {num_data_labels} label columns but "
                            f"{len(data_names)} label names; pass the names file of this data set")
    for who, names in (("data", data_names), ("model", model_names)):
        dup = _duplicates(names) if names is not None else []
        if dup:
            raise LabelSetError(f"label names collide: the {who} names {_show(dup)} more than "
                                "once; make every label name unique (--label-names)")
    if model_names is not None and data_names is not None:
        index = {n: i for i, n in enumerate(model_names)}
        names = list(model_names)
        ids = np.empty(num_data_labels, dtype=np.int64)
        for j, n in enumerate(data_names):
            i = index.get(n)
            if i is None:
                i = len(names)
                index[n] = i
                names.append(n)
            ids[j] = i
        return LabelMatch("name", ids, L, len(names), names)
    ids = np.arange(num_data_labels, dtype=np.int64)
    total = max(L, int(num_data_labels))
    names_out: list[str] | None = None
    if model_names is not None:
        names_out = list(model_names)
        if total > L:
            raise LabelSetError(
                f"the model's labels have names but the data's do not, so its {total - L} new "
                "label(s) (ids >= {L}) would have none; attach the data's names with "
                "--label-names FILE (one name a line, in id order)".replace("{L}", str(L)))
    elif data_names is not None and num_data_labels >= L:
        names_out = list(data_names)
    return LabelMatch("id", ids, L, total, names_out)


def remap_labels(Y: sp.spmatrix, column_ids: np.ndarray, num_labels: int) -> sp.csr_matrix:
    """``Y [N, L_data]`` with its columns moved to ``column_ids`` in ``[N, num_labels]``."""
    Y = sp.csr_matrix(Y, dtype=np.float32)
    ids = np.asarray(column_ids, dtype=np.int64)
    if ids.shape[0] != Y.shape[1]:
        raise LabelSetError(f"{ids.shape[0]} column ids for {Y.shape[1]} label columns")
    out = sp.csr_matrix((Y.data.copy(), ids[Y.indices], Y.indptr.copy()),
                        shape=(Y.shape[0], int(num_labels)))
    out.sum_duplicates()
    out.sort_indices()
    return out


def align_features(X: sp.spmatrix, num_features: int, *, ignore_extra: bool = False,
                   path: str | None = None) -> sp.csr_matrix:
    """``X`` in the model's feature space (or, with ``ignore_extra``, cut / padded into it).

    Raises:
        DataFormatError: the feature counts differ and ``ignore_extra`` is false.
    """
    X = sp.csr_matrix(X, dtype=np.float32)
    D = X.shape[1]
    if D == num_features:
        return X
    if not ignore_extra:
        raise DataFormatError(path, None, f"has {D} features but the model was trained on "
                              f"{num_features}; use data in the model's feature space, or "
                              "--ignore-extra to drop (or pad) feature columns")
    X = X[:, :num_features] if D > num_features else sp.hstack(
        [X, sp.csr_matrix((X.shape[0], num_features - D), dtype=np.float32)], format="csr")
    logger.warning("feature space %d != model %d: columns cut/padded (--ignore-extra)", D,
                   num_features)
    return sp.csr_matrix(X)


# ------------------------------------------------------------------------------------------------
# the initialisation of new rows
# ------------------------------------------------------------------------------------------------


@dataclass
class NewRows:
    """Rows of new labels (:func:`new_label_rows`).

    Attributes:
        weight: float32 ``[n, d]``.
        bias: float32 ``[n]`` or ``None`` (model without label bias).
        counts: int64 ``[n]`` positives of each new label in the data.
        stats: how they were calibrated (JSON-able, recorded in the lineage).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    counts: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y ~ a + b x`` (``b = 0`` when ``x`` is constant)."""
    if x.size == 0:
        return 0.0, 0.0
    xm, ym = float(x.mean()), float(y.mean())
    var = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum()) / var if var > 1e-12 else 0.0
    return ym - b * xm, b


@torch.no_grad()
def new_label_rows(queries: torch.Tensor, Y_new: sp.spmatrix, old_weight: torch.Tensor,
                   old_bias: torch.Tensor | None, Y_old: sp.spmatrix | None = None, *,
                   old_counts: np.ndarray | None = None, max_scale_ratio: float = 10.0,
                   direction: str = "lda", calibration: str = "spread",
                   lda_shrinkage: float = 0.1) -> NewRows:
    """Rows for new labels from the queries of their positives, calibrated on the old labels.

    Direction (``direction``) of new label ``j``'s row, from the mean query ``mu_j`` of its
    positives, the mean query ``qbar`` and covariance ``C`` of all data rows:

    * ``"lda"`` (default): ``(C + lambda I)^-1 (mu_j - qbar)``, ``lambda = lda_shrinkage *
      trace(C) / d`` -- the whitened mean encoding (Fisher's discriminant with a shared
      covariance): it points away from what every query has in common;
    * ``"centered"``: ``mu_j - qbar``;
    * ``"mean"``: ``mu_j`` (PIFA in query space, :func:`xmc_toolkit.label_init.pifa_label_rows`).

    Each direction is normalised to ``u_j``. Norm ``s_j`` and bias ``b_j`` (``calibration``)
    make the new label's scores look like those of trained labels of the same frequency, from
    lines fitted in ``log n_l`` over the old labels ``l`` with positives in the data (``n_l``
    their count): the mean score over every row ``t_all(l) = qbar . w_l + b_l`` and

    * ``"spread"`` (default): ``log sd(l)``, ``sd(l)^2 = w_l^T C w_l`` the variance of the
      label's scores over every row: ``s_j = sd(n_j) / sqrt(u_j^T C u_j)``;
    * ``"moments"``: the mean score on the label's positives ``t_pos(l)``:
      ``s_j = (t_pos(n_j) - t_all(n_j)) / (u_j . mu_j - u_j . qbar)``;

    then ``b_j = t_all(n_j) - s_j u_j . qbar`` (the frequency bias: a new label's mean score is
    that of a trained label as frequent). ``s_j`` is clipped to ``[med / max_scale_ratio,
    med * max_scale_ratio]`` (``med``: the median old row norm) and is ``med`` where the fit
    gives no positive value. ``"norm"``, or fewer than two old labels with positives in the data,
    gives ``s_j = med`` and ``b_j`` from a line of the old biases in the log of ``old_counts``
    (their median without counts). A new label without positives gets a zero row and the
    smallest old bias. Docs/growing-labels.md has the measured comparison.

    Args:
        queries: ``[N, d]`` encodings of the data rows (eval mode, the model's preprocessing).
        Y_new: ``[N, n]`` positives of the ``n`` new labels.
        old_weight: ``[L, d]`` trained label rows.
        old_bias: ``[L]`` trained biases, or ``None``.
        Y_old: ``[N, L]`` positives of the old labels in the same rows (optional).
        old_counts: ``[L]`` training counts of the old labels (``"norm"`` calibration).
        max_scale_ratio: clip of the row norm around the old median.
        direction: ``lda | centered | mean``.
        calibration: ``spread | moments | norm``.
        lda_shrinkage: ridge of ``"lda"`` relative to the mean query variance.

    Returns:
        :class:`NewRows` on ``queries``' device.

    Raises:
        ConfigError: shapes disagree or an option is unknown.
    """
    from .label_init import pifa_label_rows

    if queries.dim() != 2 or queries.shape[0] != Y_new.shape[0]:
        raise ConfigError(f"queries has shape {tuple(queries.shape)} but Y_new has "
                          f"{Y_new.shape[0]} rows; encode every data row once")
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction={direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"calibration={calibration!r} is unknown; use one of "
                          f"{', '.join(CALIBRATIONS)}")
    device = queries.device
    q = queries.detach().double().cpu()  # [N, d]
    W = old_weight.detach().double().cpu()  # [L, d]
    b_old = None if old_bias is None else old_bias.detach().double().cpu().view(-1)  # [L]
    N, d = q.shape
    Yn = sp.csr_matrix(Y_new, dtype=np.float64)
    n = Yn.shape[1]
    counts = np.asarray(Yn.sum(0)).ravel()  # [n]
    cnt = torch.from_numpy(np.maximum(counts, 1.0))  # [n]
    unit, has = pifa_label_rows(queries.detach().float().cpu(), Yn, scale=1.0)  # [n, d], [n]
    unit = unit.double()
    has = has.cpu()
    sums = torch.from_numpy(np.asarray(Yn.T @ q.numpy(), dtype=np.float64))  # [n, d]
    qbar = q.mean(0) if N else torch.zeros(d, dtype=torch.float64)  # [d]
    cov = (q.T @ q) / max(N, 1) - torch.outer(qbar, qbar)  # [d, d] covariance of the queries
    if direction != "mean":
        cen = sums / cnt.unsqueeze(1) - qbar  # [n, d] mean query of the positives - mean query
        if direction == "lda":  # (cov + shrink I)^-1 (mean_pos - qbar)
            shrink = float(torch.diagonal(cov).mean()) * lda_shrinkage + 1e-12
            cen = torch.linalg.solve(cov + shrink * torch.eye(d, dtype=cov.dtype), cen.T).T
        unit = cen / cen.norm(dim=1, keepdim=True).clamp_min(1e-30)
    m = (sums * unit).sum(1) / cnt  # [n] mean of u . q over the positives
    ma = unit @ qbar  # [n] mean of u . q over all rows
    sd = ((unit @ cov) * unit).sum(1).clamp_min(0).sqrt()  # [n] std of u . q over all rows
    norms = W.norm(dim=1)
    med = float(norms.median()) if norms.numel() else 1.0
    med = med if med > 0 else 1.0
    stats: dict[str, Any] = {"rows": int(N), "direction": direction, "median_old_norm": med}

    usable = 0
    if Y_old is not None and calibration != "norm":
        Yo = sp.csc_matrix(Y_old, dtype=np.float64)
        c_old = np.asarray(Yo.sum(0)).ravel()  # [L]
        sel = np.flatnonzero(c_old > 0)
        usable = int(sel.size)
    lcn = torch.from_numpy(np.log(np.maximum(counts, 1.0)))  # [n]
    if usable >= 2:
        tsel = torch.from_numpy(sel)
        Ws = W[tsel]  # [U, d]
        bs = b_old[tsel] if b_old is not None else torch.zeros(len(sel), dtype=W.dtype)
        lc = np.log(c_old[sel])
        t_all = Ws @ qbar + bs  # [U] mean score over all rows
        a2, b2 = _line_fit(lc, t_all.numpy())
        ta = a2 + b2 * lcn  # [n]
        if calibration == "moments":
            S_old = torch.from_numpy(np.asarray(Yo[:, sel].T @ q.numpy(), dtype=np.float64))
            t_pos = ((S_old / torch.from_numpy(c_old[sel]).unsqueeze(1)) * Ws).sum(1) + bs
            a1, b1 = _line_fit(lc, t_pos.numpy())
            gap, denom = (a1 + b1 * lcn) - ta, m - ma
            line = [a1, b1]
        else:  # spread: the std of the scores over all rows
            sd_old = ((Ws @ cov) * Ws).sum(1).clamp_min(0).sqrt()  # [U]
            a1, b1 = _line_fit(lc, np.log(sd_old.clamp_min(1e-30).numpy()))
            gap, denom = torch.exp(a1 + b1 * lcn), sd
            line = [a1, b1]
        s = gap / denom
        ok = (denom > 1e-12) & (gap > 0) & torch.isfinite(s)
        s = torch.where(ok, s, torch.full_like(s, med))
        s = s.clamp(med / max_scale_ratio, med * max_scale_ratio)
        bias_new = ta - s * ma  # the mean score over all rows of a trained label of this count
        stats.update(calibration=calibration, old_labels_used=usable, t_all_line=[a2, b2],
                     scale_line=line, scale_fallbacks=int((~ok & has).sum()))
    else:
        s = torch.full((n,), med, dtype=torch.float64)
        if b_old is not None and b_old.numel():
            if old_counts is not None and len(old_counts) == b_old.numel():
                oc = np.asarray(old_counts, dtype=np.float64)
                pos = oc > 0
                a0, b0 = _line_fit(np.log(oc[pos]), b_old.numpy()[pos])
                bias_new = a0 + b0 * lcn
            else:
                bias_new = torch.full((n,), float(b_old.median()), dtype=torch.float64)
        else:
            bias_new = torch.zeros(n, dtype=torch.float64)
        stats.update(calibration="norm", old_labels_used=usable)
    weight = unit * s.unsqueeze(1)  # [n, d]
    weight[~has] = 0.0
    low = float(b_old.min()) if b_old is not None and b_old.numel() else 0.0
    bias_new = torch.where(has, bias_new, torch.full_like(bias_new, low))
    stats.update(without_positives=int((~has).sum()),
                 median_new_norm=float(s[has].median()) if bool(has.any()) else 0.0)
    return NewRows(weight.float().to(device),
                   None if old_bias is None else bias_new.float().to(device),
                   counts.astype(np.int64), stats)


def new_label_rows_members(queries: torch.Tensor, Y_new: sp.spmatrix, old_weight: torch.Tensor,
                           old_bias: torch.Tensor | None, Y_old: sp.spmatrix | None = None, *,
                           members: int = 1, **options: Any) -> NewRows:
    """:func:`new_label_rows` for each of an ensemble's ``members`` on its own.

    An ensemble's query ``[N, n * d]`` is its members' queries side by side, divided by ``n``,
    and its score the mean of the members' scores ``q_i . w_i + b`` (``q_i`` member ``i``'s
    query, ``w_i`` block ``i`` of the row, one bias); the trainer gives every member its own
    loss on its own score. Each member's block of a new row (and a bias ``b_i``) is calibrated
    on that member's queries and old blocks; the new bias is the mean of the ``b_i``, so the
    ensemble's score is the mean of the calibrated member scores. ``members=1`` is
    :func:`new_label_rows`.

    Args:
        queries: ``[N, n * d]`` ensemble queries (eval mode).
        members: ``n``; ``queries.shape[1]`` must be a multiple of it.
        options: passed to :func:`new_label_rows`.

    Returns:
        :class:`NewRows` (``weight [n_new, n * d]``); ``stats`` are member 0's plus
        ``members``.

    Raises:
        ConfigError: ``queries``' width is not a multiple of ``members``.
    """
    if members <= 1:
        return new_label_rows(queries, Y_new, old_weight, old_bias, Y_old, **options)
    width = queries.shape[1]
    if width % members:
        raise ConfigError(f"queries have width {width}, not a multiple of members={members}")
    d = width // members
    parts = [new_label_rows(queries[:, i * d:(i + 1) * d] * members, Y_new,
                            old_weight[:, i * d:(i + 1) * d], old_bias, Y_old, **options)
             for i in range(members)]
    bias = None if parts[0].bias is None else torch.stack([p.bias for p in parts]).mean(0)
    return NewRows(torch.cat([p.weight for p in parts], 1), bias, parts[0].counts,
                   {**parts[0].stats, "members": members})


# ------------------------------------------------------------------------------------------------
# the grown network, optimizer state and MIDX state
# ------------------------------------------------------------------------------------------------


def _label_keys(state: dict[str, torch.Tensor], num_old: int) -> list[str]:
    return [k for k, v in state.items() if k.startswith("labels.") and v.dim() >= 1
            and v.shape[0] == num_old]


def grow_network(network: "XMCNetwork", config: "TrainConfig", rows: NewRows) -> "XMCNetwork":
    """A new :class:`~xmc_toolkit.train.XMCNetwork` with ``L + n`` labels: the encoder and the
    old rows of ``network`` (copied, never shared), then ``rows``."""
    from .train import XMCNetwork

    old = network.state_dict()
    L = network.num_labels
    n = rows.weight.shape[0]
    dev = next(network.parameters()).device
    with torch.random.fork_rng(devices=[]):
        child = XMCNetwork(network.num_features, L + n, config).to(dev)
    state = {k: v.detach().clone() for k, v in old.items()}
    for k in _label_keys(state, L):
        if k == "labels.weight.weight":
            extra = rows.weight.to(state[k])
        elif k == "labels.bias.weight":
            extra = (torch.zeros(n, 1) if rows.bias is None else rows.bias.view(n, 1)).to(state[k])
        else:  # pragma: no cover - no other per-label tensors today
            extra = state[k].new_zeros((n,) + tuple(state[k].shape[1:]))
        state[k] = torch.cat([state[k], extra], 0)
    try:
        child.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover
        raise CheckpointError(f"cannot grow the network: {exc}") from exc
    child.eval()
    return child


def grow_optimizer_state(state: dict[str, Any], num_old: int, num_new: int) -> dict[str, Any]:
    """The parent's optimizer state (:meth:`OptimizerBundle.state_dict`) for ``L + n`` labels.

    The label optimizer's per-row state gets ``n`` new rows: first moments (``exp_avg``) zero,
    second moments (``exp_avg_sq``, Adagrad's ``sum``) the mean of the old rows' (per column).
    The step count is shared by all rows of a parameter and is the parent's, so Adam's bias
    correction is ~1: zero second moments would make a new row's first steps ``lr / sqrt(1 -
    beta2)``, about 30x larger than a trained row's, and undo its initialisation within a few
    dozen steps. Every other optimizer is kept as it is. The LR schedulers are dropped (a
    fine-tune runs its own schedule). The input is not modified.
    """
    out: dict[str, Any] = {}
    for key, sd in state.items():
        if not key.startswith("opt."):
            continue
        sd = copy.copy(sd)
        if key == "opt.labels":
            grown = {}
            for pid, st in sd.get("state", {}).items():
                st2 = {}
                for name, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == num_old:
                        if name in ("exp_avg_sq", "sum") and num_old > 0:
                            extra = v.mean(0, keepdim=True).expand(
                                (num_new,) + tuple(v.shape[1:])).clone()
                        else:
                            extra = v.new_zeros((num_new,) + tuple(v.shape[1:]))
                        v = torch.cat([v, extra], 0)
                    st2[name] = v
                grown[pid] = st2
            sd["state"] = grown
        out[key] = sd
    return out


def _assign_codes(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, quantizer: str
                  ) -> torch.Tensor:
    from .codebook import assign_nearest

    x = x.float()
    if quantizer == "pq":
        d1 = c1.shape[1]
        k1, _ = assign_nearest(x[:, :d1].contiguous(), c1.float())
        k2, _ = assign_nearest(x[:, d1:].contiguous(), c2.float())
    else:
        k1, _ = assign_nearest(x, c1.float())
        k2, _ = assign_nearest((x - c1.float()[k1]).contiguous(), c2.float())
    return torch.stack([k1, k2], 1)  # [n, 2]


def make_sampler_for(config: "TrainConfig", num_labels: int, label_counts: np.ndarray,
                     num_codewords: int) -> Any:
    """The MIDX sampler the trainer builds for ``config``, with the parent's codeword count
    (through the one config-to-sampler mapping, :func:`xmc_toolkit.objective.sampler_from_config`)."""
    import dataclasses

    from .objective import sampler_from_config

    name = config.sampler if config.sampler.startswith("midx") else "midx"
    cfg = dataclasses.replace(config, sampler=name, codewords=int(num_codewords))
    return sampler_from_config(cfg, num_labels, label_counts)


@torch.no_grad()
def grow_sampler_state(state: dict[str, torch.Tensor], config: "TrainConfig",
                       weight: torch.Tensor, bias: torch.Tensor | None,
                       label_counts: np.ndarray, *, refresh: bool = True
                       ) -> dict[str, torch.Tensor]:
    """A MIDX state for the grown table ``weight [L + n, d]`` from the parent's ``state``.

    The old labels keep their codes; each new row is assigned to its nearest codewords of the
    parent's codebooks (pq: per half; rq: first codebook, then the residual). With ``refresh``
    the index is then rebuilt by k-means warm-started from those codebooks (what the trainer
    does every ``refresh_every`` steps). Returns the new sampler's ``state_dict()``.
    """
    codes_old = state["codes"].long()
    L_old = codes_old.shape[0]
    L_new = weight.shape[0]
    K = int(state["num_codewords"].item())
    sampler = make_sampler_for(config, L_new, label_counts, K)
    c1, c2 = state["codebook1"].float(), state["codebook2"].float()
    x = weight.detach().float().cpu()
    codes_new = _assign_codes(x[L_old:], c1, c2, sampler.quantizer)
    codes = torch.cat([codes_old.cpu(), codes_new], 0)  # [L_new, 2]
    # the row fingerprints of incremental refreshes describe the old table: dropped, so the
    # grown index's next update re-clusters (warm) over all rows
    full = {k: v.clone() for k, v in state.items()
            if k not in ("fingerprint", "updates_since_full")}
    full["num_labels"] = torch.tensor(L_new, dtype=torch.int64)
    full["codes"] = codes
    lw = torch.zeros(L_new, dtype=torch.float64)
    weighted = bool(int(state.get("weighted", torch.tensor(0)).item()))
    if sampler.within_cell == "popularity" and sampler._log_prior is not None:
        lw = lw + sampler._log_prior.double()
    if bias is not None and (weighted or sampler.within_cell == "exact"):
        lw = lw + bias.detach().double().cpu().view(-1)
    full["item_log_weight"] = lw.float()
    if "residual" in state:
        from .codebook import reconstruct

        full["residual"] = (x - reconstruct((c1, c2), codes, sampler.quantizer)).float()
    sampler.load_state_dict(full)
    if refresh:
        sampler.update(x, None if bias is None else bias.detach().float().cpu().view(-1))
    return {k: v.detach().cpu() for k, v in sampler.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# configs, warm starts, growth of a loaded model
# ------------------------------------------------------------------------------------------------


def child_config(parent: "TrainConfig", overrides: dict[str, Any] | None = None, *,
                 sampler_state: dict[str, torch.Tensor] | None = None,
                 num_points: int | None = None) -> "TrainConfig":
    """The config of a model grown from ``parent``: the parent's (resolved) values, then
    ``overrides`` (``None`` values ignored).

    Fine-tune defaults where ``overrides`` has no value: :data:`FINE_TUNE_EPOCHS` epochs; the
    parent's learning rates (``lr``, and ``label_lr`` / ``bag_lr`` when set) times
    :data:`FINE_TUNE_LR_SCALE` (the parent ended its schedule near zero; its full rate undoes
    part of what it learnt); a warm-up of :data:`FINE_TUNE_WARMUP` of the fine-tune's steps
    (``num_points`` rows; at most the parent's ``warmup_steps``). With a MIDX parent the codeword
    count is pinned to the parent's, so its codebooks carry over.

    Raises:
        ConfigError: an override changes a field that shapes the network (:data:`FROZEN_FIELDS`).
    """
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    frozen = []
    for k in FROZEN_FIELDS:
        if k in over:
            new = tuple(over[k]) if isinstance(over[k], list) else over[k]
            if new != getattr(parent, k):
                frozen.append(f"{k}={over[k]!r} (the parent has {getattr(parent, k)!r})")
    problems = [f"{p}: a grown model keeps its parent's network; drop --"
                f"{p.split('=')[0].replace('_', '-')}" for p in frozen]
    if "dropout" in over and isinstance(over["dropout"], (int, float)) and \
            (float(over["dropout"]) == 0) != (float(parent.dropout) == 0):
        problems.append(f"dropout={over['dropout']!r} (the parent has {parent.dropout!r}): "
                        "dropout 0 and > 0 build different layers; a grown model keeps its "
                        "parent's, so use a small value like 0.01 instead of 0 (--dropout)")
    if problems:
        raise ConfigError(problems)
    over.setdefault("epochs", FINE_TUNE_EPOCHS)
    if "lr" not in over:
        over["lr"] = parent.lr * FINE_TUNE_LR_SCALE
        for k in ("label_lr", "bag_lr"):
            if k not in over and getattr(parent, k) > 0:
                over[k] = getattr(parent, k) * FINE_TUNE_LR_SCALE
    if "warmup_steps" not in over and num_points:
        steps = math.ceil(num_points / int(over.get("batch_size", parent.batch_size))) * int(
            over["epochs"])
        over["warmup_steps"] = int(min(parent.warmup_steps,
                                       max(1, round(FINE_TUNE_WARMUP * steps))))
    if sampler_state is not None and "num_codewords" in sampler_state and \
            not over.get("codewords"):
        over["codewords"] = int(sampler_state["num_codewords"].item())  # keep the codebooks
    return parent.merged(over)


def config_file_overrides(path: str | os.PathLike[str], parent: "TrainConfig") -> dict[str, Any]:
    """The fields a ``--config`` JSON file sets, as overrides of a grown model's config.

    With ``--init-from`` the file holds only what changes from the parent (a file written by
    ``xmc train --init-from DIR --print-config`` works too: its network fields are the
    parent's). Fields absent from the file keep the fine-tune defaults of
    :func:`child_config`.

    Raises:
        ConfigError: the file is unreadable, not a JSON object, has unknown keys or wrong
            types, or sets a field that shapes the network (:data:`FROZEN_FIELDS`) to another
            value than the parent's.
    """
    from .config import read_config_json
    from .train import TrainConfig

    keys = read_config_json(path)
    if "featurizer" in keys:
        raise ConfigError(f"config file {str(path)!r} has a 'featurizer' block: a grown model "
                          "keeps its parent's featurizer; remove the block")
    cfg = TrainConfig.from_dict(keys, validate=False)  # unknown keys, types: all at once
    over = {k: v for k, v in cfg.to_dict().items() if k in keys}
    bad = []
    for k in FROZEN_FIELDS:
        if k in over:
            new = tuple(over[k]) if isinstance(over[k], list) else over[k]
            if new != getattr(parent, k):
                bad.append(f"{k}={over[k]!r} (the parent has {getattr(parent, k)!r})")
    if bad:
        raise ConfigError(f"config file {str(path)!r} sets {', '.join(bad)}: a grown model "
                          "keeps its parent's network; remove these keys from the file")
    return over


@dataclass
class WarmStart:
    """What :meth:`xmc_toolkit.train.Trainer.fit` takes from a parent model (``init=``).

    Attributes:
        network_state: the grown network's ``state_dict``.
        preprocessor: the parent's input transform (its TF-IDF weights are kept).
        optimizer_state: grown :class:`~xmc_toolkit.optim.OptimizerBundle` state (``opt.*``
            entries only), or ``None``.
        sampler_state: grown MIDX state, or ``None``.
        kept: filled by the trainer: the optimizers whose state was kept.
    """

    network_state: dict[str, torch.Tensor]
    preprocessor: "Preprocessor"
    optimizer_state: dict[str, Any] | None = None
    sampler_state: dict[str, torch.Tensor] | None = None
    kept: list[str] = field(default_factory=list)

    def apply_network(self, network: "XMCNetwork") -> None:
        """Load the grown weights into the trainer's freshly built network."""
        dev = next(network.parameters()).device
        try:
            network.load_state_dict({k: v.to(dev) for k, v in self.network_state.items()},
                                    strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the parent model does not fit this network: {exc}") from exc

    def apply_optimizers(self, bundle: Any) -> list[str]:
        """Load the kept optimizer state into ``bundle`` where its structure matches (same
        parameters, same state shapes); the bundle's own hyper-parameters (learning rates of
        the new schedule) stay. Returns the names of the optimizers whose state was kept."""
        self.kept = []
        if not self.optimizer_state:
            return self.kept
        for name, opt in bundle.optimizers.items():
            saved = self.optimizer_state.get(f"opt.{name}")
            if saved is None:
                continue
            cur = opt.state_dict()
            groups = saved.get("param_groups", [])
            if len(groups) != len(cur["param_groups"]) or any(
                    len(g["params"]) != len(c["params"]) for g, c in zip(groups, cur["param_groups"])):
                logger.info("optimizer %s: parent state has another structure; starting fresh",
                            name)
                continue
            params = [p for g in opt.param_groups for p in g["params"]]
            pid_to_param = {pid: params[i] for i, pid in
                            enumerate(p for g in groups for p in g["params"])}
            ok = True
            for pid, st in saved.get("state", {}).items():
                p = pid_to_param.get(pid)
                if p is None:
                    ok = False
                    break
                for v in st.values():
                    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape != p.shape:
                        ok = False
            if not ok:
                logger.info("optimizer %s: parent state has other shapes; starting fresh", name)
                continue
            load = {"state": saved["state"],
                    "param_groups": [dict(c, params=g["params"])
                                     for g, c in zip(groups, cur["param_groups"])]}
            opt.load_state_dict(load)
            self.kept.append(name)
        return self.kept

    def apply_sampler(self, sampler: Any) -> None:
        """Load the grown MIDX state (the trainer refreshes it at the first epoch start)."""
        if self.sampler_state and sampler is not None and getattr(sampler, "needs_update", False):
            try:
                sampler.load_state_dict(self.sampler_state)
            except (CheckpointError, ConfigError, KeyError) as exc:
                logger.info("parent MIDX state not used (%s); a fresh index is built", exc)


@dataclass
class Growth:
    """A model grown by :func:`prepare_growth` (no training yet).

    Attributes:
        model: the grown :class:`~xmc_toolkit.train.LoadedModel` (eval mode).
        match: the label mapping.
        data: the data in the grown label space (features aligned).
        rows: the new rows and their calibration.
        parent_num_labels: ``L`` of the parent.
    """

    model: "LoadedModel"
    match: LabelMatch
    data: XMCDataset
    rows: NewRows
    parent_num_labels: int


def prepare_growth(parent: "LoadedModel", ds: XMCDataset, *, ignore_extra: bool = False,
                   path: str | None = None, refresh_index: bool = True,
                   config: "TrainConfig | None" = None, per_member: bool = False,
                   **init_options: Any) -> Growth:
    """Grow ``parent`` by the labels of ``ds`` it does not know (``parent`` is not modified).

    The rows of ``ds`` are encoded by the parent; new labels get :func:`new_label_rows` calibrated
    on the old labels present in ``ds``: on the ensemble's query (the score served), or with
    ``per_member`` for each member of an ensemble parent on its own
    (:func:`new_label_rows_members`: what a fine-tune, one loss per member, trains; the rows
    fitted on the ensemble query have uncalibrated member blocks, which fine-tuning first
    undoes, docs/growing-labels.md; :func:`train_from` uses it); the grown model's training
    label counts are the parent's for old labels and ``ds``'s for new ones; a MIDX state is grown
    (:func:`grow_sampler_state`, refreshed when ``refresh_index``). ``init_options`` go to
    :func:`new_label_rows` (``direction=``, ``calibration=``, ``lda_shrinkage=``).

    Raises:
        DataFormatError: feature spaces differ (without ``ignore_extra``).
        LabelSetError: colliding names, or new labels without names for a named model.
    """
    from .encoder import encode_csr
    from .train import LoadedModel

    X = align_features(ds.X, parent.num_features, ignore_extra=ignore_extra, path=path)
    match = match_labels(parent.label_names, parent.num_labels, ds.label_names, ds.num_labels)
    Y = remap_labels(ds.Y, match.column_ids, match.num_labels)
    L = parent.num_labels
    cfg = config or parent.config
    net = parent.network
    Xp = parent.preprocessor.transform(X)
    queries = encode_csr(net.encoder, Xp, batch_size=cfg.eval_batch_size)  # [N, n*d]
    Yc = sp.csc_matrix(Y)
    rows = new_label_rows_members(queries, Yc[:, L:], net.label_weight, net.label_bias,
                                  Yc[:, :L], members=int(net.members) if per_member else 1,
                                  old_counts=np.asarray(parent.label_counts)[:L],
                                  **init_options)
    child = grow_network(net, cfg, rows)
    counts = np.concatenate([np.asarray(parent.label_counts, dtype=np.int64)[:L],
                             rows.counts]).astype(np.int64)
    sampler_state = None
    if parent.sampler_state:
        sampler_state = grow_sampler_state(parent.sampler_state, cfg,
                                           child.labels.label_embeddings(),
                                           child.labels.bias_vector(), counts,
                                           refresh=refresh_index)
    model = LoadedModel(network=child, preprocessor=parent.preprocessor, config=cfg,
                        label_names=match.names, label_counts=counts,
                        num_train=int(parent.num_train), sampler_state=sampler_state,
                        summary={})
    return Growth(model, match, XMCDataset(X, Y, match.names, ds.feature_names), rows, L)


def read_optimizer_state(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str]:
    """The optimizer state of the newest intact checkpoint in ``model_dir/checkpoint``.

    Returns ``(state, where)``; ``(None, reason)`` when there is none (``xmc labels add`` output,
    ``XMCModel.save`` directories) or it cannot be read.
    """
    from .checkpoint import load_checkpoint, unflatten_state
    from .train import CKPT_DIR

    ck = Path(model_dir) / CKPT_DIR
    if not ck.is_dir():
        return None, "none (the parent has no checkpoint/)"
    try:
        groups, meta = load_checkpoint(ck, verify=True, device="cpu", groups=["optimizer"],
                                       fallback=True)
        state = unflatten_state(groups["optimizer"], meta["optimizer_structure"])
    except (CheckpointError, KeyError) as exc:
        logger.warning("parent optimizer state not used: %s", exc)
        return None, f"none (unreadable: {exc})"
    return state, f"checkpoint step {meta.get('step')}"


# ------------------------------------------------------------------------------------------------
# model directories: xmc labels add, xmc train --init-from, lineage
# ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lineage(model_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lineage entries of a model directory (oldest first; ``[]`` when it has none)."""
    p = Path(model_dir) / LINEAGE_FILE
    if not p.is_file():
        return []
    try:
        return list(json.loads(p.read_text()).get("lineage", []))
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{str(p)!r} is corrupt ({exc}); restore the directory") from exc


def lineage_entry(parent_dir: str | os.PathLike[str] | None, growth: Growth, *, mode: str,
                  epochs: int = 0, optimizer_state: str = "none",
                  seconds: float | None = None) -> dict[str, Any]:
    """One lineage record: parent, labels added, how, when."""
    m = growth.match
    entry: dict[str, Any] = {
        "mode": mode,
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parent": None if parent_dir is None else str(Path(parent_dir).resolve()),
        "parent_num_labels": growth.parent_num_labels,
        "num_labels": m.num_labels,
        "labels_added": m.num_new,
        "added": (m.new_names if m.new_names is not None
                  else list(range(m.num_old, m.num_labels))),
        "matched_by": m.by,
        "rows": growth.data.num_points,
        "fine_tune_epochs": int(epochs),
        "optimizer_state": optimizer_state,
        "midx_index": ("parent codebooks, new rows assigned, refreshed"
                       if growth.model.sampler_state else None),
        "init": growth.rows.stats,
    }
    if parent_dir is not None:
        from .train import MODEL_FILE

        f = Path(parent_dir) / MODEL_FILE
        if f.is_file():
            entry["parent_model_sha256"] = _sha256(f)
    if seconds is not None:
        entry["seconds"] = round(float(seconds), 3)
    return entry


def write_lineage(out_dir: str | os.PathLike[str], parent_dir: str | os.PathLike[str] | None,
                  entry: dict[str, Any], history: list[dict[str, Any]] | None = None) -> Path:
    """``out_dir/lineage.json``: the parent's lineage (or ``history``) plus ``entry``."""
    chain = list(history) if history is not None else (
        read_lineage(parent_dir) if parent_dir is not None else [])
    from ._fileio import atomic_write_text

    return atomic_write_text(Path(out_dir) / LINEAGE_FILE,
                             json.dumps({"lineage": chain + [entry]}, indent=2))


def check_out_dir(parent_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Refuse to write a grown model into (or above) its parent's directory."""
    a, b = Path(parent_dir).resolve(), Path(out_dir).resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"--out {str(out_dir)!r} is the parent model directory or nested with "
                          "it; the parent is never modified: write the grown model elsewhere")


def add_labels_dir(model_dir: str | os.PathLike[str], ds: XMCDataset,
                   out_dir: str | os.PathLike[str], *, ignore_extra: bool = False,
                   path: str | None = None, device: str = "auto") -> Growth:
    """``xmc labels add``: grow the model in ``model_dir`` by ``ds``'s new labels, no training,
    and write the grown model directory (with ``lineage.json``) to ``out_dir``.

    Raises:
        CheckpointError: ``model_dir`` is not a model directory.
        DataFormatError / LabelSetError / ConfigError: bad data, colliding names, no new labels,
            ``out_dir`` inside the parent. Nothing is written then.
    """
    import time

    from .train import load_model_dir, save_model_dir

    check_out_dir(model_dir, out_dir)
    t0 = time.perf_counter()
    parent = load_model_dir(model_dir, device=device)
    growth = prepare_growth(parent, ds, ignore_extra=ignore_extra, path=path)
    if growth.match.num_new == 0:
        raise LabelSetError(f"{path or 'the data'} has no label the model does not know "
                            f"(matched by {growth.match.by}); nothing to add")
    m = growth.model
    seconds = time.perf_counter() - t0
    save_model_dir(out_dir, m.network, m.preprocessor, m.config, label_names=m.label_names,
                   label_counts=m.label_counts, num_train=m.num_train,
                   sampler_state=m.sampler_state, summary={"labels_added": growth.match.num_new})
    write_lineage(out_dir, model_dir, lineage_entry(model_dir, growth, mode="labels add",
                                                    seconds=seconds))
    return growth


def remap_validation(val: XMCDataset, match: LabelMatch, num_features: int, *,
                     ignore_extra: bool = False, path: str | None = None) -> XMCDataset:
    """A validation set in the grown label space (same matching rule as the training data)."""
    X = align_features(val.X, num_features, ignore_extra=ignore_extra, path=path)
    if match.by == "name" and val.label_names is not None:
        index = {n: i for i, n in enumerate(match.names or [])}
        unknown = [n for n in val.label_names if n not in index]
        if unknown:
            raise LabelSetError(f"{path or 'the validation data'} has labels neither the model "
                                f"nor the training data know: {_show(unknown)}")
        ids = np.array([index[n] for n in val.label_names], dtype=np.int64)
    else:  # column j is the training data's column j
        if val.num_labels > len(match.column_ids):
            raise LabelSetError(f"{path or 'the validation data'} has {val.num_labels} label "
                                f"columns, more than the training data's "
                                f"{len(match.column_ids)}; use the same label space (--val)")
        ids = np.asarray(match.column_ids[:val.num_labels], dtype=np.int64)
    return XMCDataset(X, remap_labels(val.Y, ids, match.num_labels), match.names)


def train_from(model_dir: str | os.PathLike[str], train: XMCDataset,
               out_dir: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None,
               *, val: XMCDataset | None = None, ignore_extra: bool = False,
               data_path: str | None = None, val_path: str | None = None,
               show_progress: bool = False, resume: bool = False,
               callbacks: Sequence[Callable[[str, dict[str, Any]], None]] = (),
               before_training: Callable[["TrainConfig"], None] | None = None,
               init_options: dict[str, Any] | None = None,
               on_trainer: Callable[[Any], None] | None = None
               ) -> tuple["TrainResult", Growth, Any]:
    """``xmc train --init-from``: grow the model in ``model_dir`` by ``train``'s new labels and
    fine-tune on ``train`` (every label) into ``out_dir``.

    Everything is checked (parent, features, label names, config, and by the trainer the
    output directory and its lock) before ``before_training`` is called (at the trainer's
    ``train_begin`` event) and anything is written. ``init_options`` go to
    :func:`prepare_growth` (``direction=``, ...; ``per_member`` defaults to
    :data:`FINE_TUNE_PER_MEMBER`); ``on_trainer`` is called with the
    :class:`~xmc_toolkit.train.Trainer` before it trains (its callbacks can then read
    ``trainer.network``). Returns ``(TrainResult, Growth, Trainer)``.
    """
    from .train import Trainer, load_model_dir

    if out_dir is not None:
        check_out_dir(model_dir, out_dir)
    over = dict(overrides or {})
    parent = load_model_dir(model_dir, device=over.get("device") or "auto")
    cfg = child_config(parent.config, over, sampler_state=parent.sampler_state,
                       num_points=train.num_points)
    growth = prepare_growth(parent, train, ignore_extra=ignore_extra, path=data_path,
                            refresh_index=False, config=cfg,
                            **{"per_member": FINE_TUNE_PER_MEMBER, **(init_options or {})})
    val_ds = None if val is None else remap_validation(
        val, growth.match, parent.num_features, ignore_extra=ignore_extra, path=val_path)
    cfg.validate_for_data(growth.data.num_points, growth.data.num_features,
                          growth.data.num_labels)
    opt_state, opt_where = read_optimizer_state(model_dir)
    if opt_state is not None:
        opt_state = grow_optimizer_state(opt_state, growth.parent_num_labels,
                                         growth.match.num_new)
    ws = WarmStart(network_state=growth.model.network.state_dict(),
                   preprocessor=parent.preprocessor, optimizer_state=opt_state,
                   sampler_state=growth.model.sampler_state)
    hooks = list(callbacks)
    if before_training is not None:
        def begin(event: str, payload: dict[str, Any]) -> None:
            if event == "train_begin":
                before_training(cfg)

        hooks.insert(0, begin)
    trainer = Trainer(cfg, out_dir=out_dir, callbacks=hooks, featurizer=parent.featurizer)
    if on_trainer is not None:  # e.g. a benchmark's per-epoch evaluation of trainer.network
        on_trainer(trainer)
    result = trainer.fit(growth.data, val_ds, show_progress=show_progress, resume=resume,
                         init=ws)
    kept = ", ".join(ws.kept) if ws.kept else "none"
    where = f"{opt_where}; kept for: {kept}" if opt_state is not None else opt_where
    if out_dir is not None:
        write_lineage(out_dir, model_dir, lineage_entry(
            model_dir, growth, mode="train --init-from", epochs=cfg.epochs,
            optimizer_state=where, seconds=result.seconds))
    return result, growth, trainer
