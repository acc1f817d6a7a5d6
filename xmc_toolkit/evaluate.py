"""Prediction and evaluation with a trained model directory (``xmc train --out DIR``).

Exact top-k scores every label by chunks (never more than ``[B, chunk_size]`` scores at once);
approximate top-k probes the best cells of the model's MIDX inverted multi-index and re-ranks
their members exactly (:func:`xmc_toolkit.output_layer.approx_topk`).

Data whose feature or label space differs from the model's is an error by default;
``ignore_extra=True`` drops the extra feature columns / label columns (their count is logged)
and pads missing ones with empty columns.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .data.dataset import XMCDataset
from .errors import DataFormatError
from .model_dir import LoadedModel, load_model_dir
from .network import predict_topk_network

__all__ = [
    "align_dataset",
    "predict_topk",
    "evaluate_model",
    "evaluate_model_dir",
    "predict_model_dir",
    "build_index",
    "PROBABILITIES",
    "log_partition",
    "probabilities",
    "apply_threshold",
]

#: Kinds of probability derived from a score ``s`` of label ``j`` for row ``x``.
PROBABILITIES = ("softmax", "sigmoid")

logger = logging.getLogger(__name__)


def _fit_columns(M: sp.csr_matrix, n: int) -> tuple[sp.csr_matrix, int]:
    """Keep the first ``n`` columns (pad with empty ones); returns the matrix and the number of
    dropped stored entries."""
    M = sp.csr_matrix(M)
    if M.shape[1] == n:
        return M, 0
    if M.shape[1] > n:
        dropped = int((M.indices >= n).sum())
        return sp.csr_matrix(M[:, :n]), dropped
    return sp.csr_matrix((M.data, M.indices, M.indptr), shape=(M.shape[0], n)), 0


def align_dataset(ds: XMCDataset, num_features: int, num_labels: int, *,
                  ignore_extra: bool = False, path: str | None = None) -> XMCDataset:
    """Check (or with ``ignore_extra`` fix) that ``ds`` lives in the model's feature/label space.

    Args:
        ds: the data set to predict / evaluate.
        num_features: the model's ``D``.
        num_labels: the model's ``L``.
        ignore_extra: drop extra feature / label columns and pad missing ones instead of failing.
        path: file name for error messages.

    Raises:
        DataFormatError: the spaces differ and ``ignore_extra`` is false.
    """
    D, L = ds.num_features, ds.num_labels
    if D == num_features and L == num_labels:
        return ds
    if not ignore_extra:
        what = []
        if D != num_features:
            what.append(f"{D} features (model: {num_features})")
        if L != num_labels:
            what.append(f"{L} labels (model: {num_labels})")
        raise DataFormatError(path, None, f"has {' and '.join(what)}; use data with the model's "
                              "feature and label space, or --ignore-extra to drop extra columns")
    X, fdrop = _fit_columns(ds.X, num_features)
    Y, ldrop = _fit_columns(ds.Y, num_labels)
    if D != num_features:
        logger.warning("feature space %d != model %d: dropped %d stored feature values of "
                       "columns >= %d (--ignore-extra)", D, num_features, fdrop, num_features)
    if L != num_labels:
        logger.warning("label space %d != model %d: dropped %d label assignments of labels >= %d"
                       " (--ignore-extra)", L, num_labels, ldrop, num_labels)
    names = ds.label_names[:num_labels] if ds.label_names and L >= num_labels else None
    return XMCDataset(X, Y, names, None)


def build_index(model: LoadedModel, device: torch.device | None = None) -> Any:
    """A built :class:`~xmc_toolkit.sampling.MIDXSampler` over the model's label embeddings.

    Uses the saved MIDX state when the model was trained with MIDX, else builds one with the
    auto codeword count (``TrainConfig.auto_codewords``).
    """
    from .sampling import MIDXSampler

    cfg = model.config
    L = model.num_labels
    weight = model.network.labels.label_embeddings()
    bias = model.network.labels.bias_vector()
    state = model.sampler_state
    if state is not None and "codebook1" in state:
        quant = ("pq", "rq")[int(state["quantizer"])]
        within = ("uniform", "popularity", "exact")[int(state["within_cell"])]
        sampler = MIDXSampler(L, num_codewords=int(state["num_codewords"]), quantizer=quant,
                              within_cell=within, label_counts=model.label_counts.astype(
                                  np.float64), alpha=cfg.popularity_alpha, seed=cfg.seed)
        sampler.load_state_dict({k: v.to(weight.device) for k, v in state.items()})
        # the index was built from the embeddings at the last refresh; rebuild on the final ones
        sampler.update(weight, bias)
        return sampler
    sampler = MIDXSampler(L, num_codewords=cfg.resolved_codewords(L), quantizer=cfg.quantizer,
                          seed=cfg.seed)
    sampler.update(weight, bias)
    return sampler


APPROX_BACKENDS = ("auto", "hnsw", "faiss-ivf", "midx")


def resolve_approx_backend(backend: str = "auto") -> str:
    """The approximate top-k backend to use: ``auto`` = the first installed ANN library
    (faiss, then hnswlib; :func:`xmc_toolkit.ann.available_backends`), else the MIDX index."""
    from .ann import available_backends
    from .errors import ConfigError

    if backend not in APPROX_BACKENDS:
        raise ConfigError(f"unknown approximate backend {backend!r}; use one of "
                          f"{list(APPROX_BACKENDS)} (--approx-backend)")
    if backend == "auto":
        avail = available_backends()
        return avail[0] if avail else "midx"
    return backend


def _encode(model: LoadedModel, Xp: sp.csr_matrix, batch_size: int) -> torch.Tensor:
    """``[N, d]`` float32 query embeddings of preprocessed rows (the network in eval mode)."""
    from .batching import csr_to_bag

    network = model.network
    device = next(network.parameters()).device
    was = network.training
    network.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, Xp.shape[0], batch_size):
                idx, off, w = csr_to_bag(Xp[s: s + batch_size], device=device)
                out.append(network(idx, off, w).float().cpu())
    finally:
        network.train(was)
    d = network.labels.label_embeddings().shape[1]
    return torch.cat(out) if out else torch.zeros(0, d)


def predict_topk(model: LoadedModel, X: sp.spmatrix, k: int, *, chunk_size: int = 65536,
                 batch_size: int = 2048, approx: bool = False, num_cells: int = 16,
                 show_progress: bool = False, approx_backend: str = "midx",
                 approx_effort: int | None = None, ann_index: Any = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of raw feature rows (the model's TF-IDF / L2 preprocessing is applied).

    Args:
        model: a loaded model directory.
        X: ``[N, D]`` raw features.
        k: labels per row.
        chunk_size: labels scored per block (exact path).
        batch_size: rows per block.
        approx: approximate top-k (``approx_backend``).
        num_cells: cells probed per query with ``approx`` and the MIDX backend.
        show_progress: rich progress bar.
        approx_backend: ``midx`` (the model's inverted multi-index; the default here),
            ``hnsw`` / ``faiss-ivf`` (an ANN index over the bias-folded label vectors, built
            now unless ``ann_index`` is given; :mod:`xmc_toolkit.ann`) or ``auto``
            (:func:`resolve_approx_backend`).
        approx_effort: hnsw ``ef`` / faiss ``nprobe`` (``None``: the index default).
        ann_index: a prebuilt :class:`xmc_toolkit.ann.AnnIndex` to search.

    Returns:
        ``ids`` int64 ``[N, k]`` and ``scores`` float32 ``[N, k]``, best first.
    """
    Xp = model.preprocessor.transform(X)
    backend = resolve_approx_backend(approx_backend) if approx else "midx"
    if approx and (backend != "midx" or ann_index is not None):
        if ann_index is None:
            from .ann import build_ann_index

            ann_index = build_ann_index(model.network.labels.label_embeddings(),
                                        model.network.labels.bias_vector(), backend)
        q = _encode(model, Xp, batch_size)  # [N, d]
        parts = [ann_index.search(q[s: s + batch_size], k, effort=approx_effort)
                 for s in range(0, q.shape[0], batch_size)]
        if not parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return (torch.cat([p[1] for p in parts]).numpy().astype(np.int64),
                torch.cat([p[0] for p in parts]).numpy().astype(np.float32))
    sampler = build_index(model) if approx else None
    return predict_topk_network(model.network, Xp, k, batch_size=batch_size,
                                chunk_size=chunk_size, show_progress=show_progress,
                                approx=approx, sampler=sampler, num_cells=num_cells)


@torch.no_grad()
def log_partition(model: LoadedModel, X: sp.spmatrix, *, batch_size: int = 2048,
                  chunk_size: int = 65536) -> np.ndarray:
    """``log sum_j exp(s_j(x))`` over all ``L`` labels of each raw row: float64 ``[N]``.

    Scores are computed by label chunks (at most ``[batch_size, chunk_size]`` at once), with a
    running log-sum-exp; the model's preprocessing is applied to ``X`` first.
    """
    from .batching import csr_to_bag

    network = model.network
    Xp = model.preprocessor.transform(X)
    device = next(network.parameters()).device
    W = network.labels.label_embeddings()
    b = network.labels.bias_vector()
    out = np.zeros(Xp.shape[0], dtype=np.float64)
    was_training = network.training
    network.eval()
    try:
        for s in range(0, Xp.shape[0], batch_size):
            idx, off, w = csr_to_bag(Xp[s: s + batch_size], device=device)
            q = network(idx, off, w).float()  # [B, d]
            run = torch.full((q.shape[0],), -torch.inf, dtype=torch.float64, device=device)
            for c in range(0, W.shape[0], chunk_size):
                sc = q @ W[c: c + chunk_size].float().T  # [B, c]
                if b is not None:
                    sc = sc + b[c: c + chunk_size].float()
                run = torch.logaddexp(run, torch.logsumexp(sc.double(), dim=1))
            out[s: s + q.shape[0]] = run.cpu().numpy()
    finally:
        network.train(was_training)
    return out


def probabilities(model: LoadedModel, X: sp.spmatrix, scores: np.ndarray, kind: str = "softmax",
                  *, batch_size: int = 2048, chunk_size: int = 65536) -> np.ndarray:
    """Probabilities float32 ``[N, k]`` of the top-k ``scores`` of raw rows ``X``.

    ``softmax``: the label's share of the softmax over all ``L`` labels,
    ``exp(s_j - log sum_l exp(s_l))``, the distribution the softmax losses train (a row's
    shares sum to 1 over all labels, so a row with several true labels splits the mass among
    them). ``sigmoid``: ``1 / (1 + exp(-s_j))``, one-vs-all; calibrated only for a model
    trained with a binary loss (``--bce-weight`` > 0 or ``--loss negative-sampling``).

    Raises:
        ConfigError: unknown ``kind``.
    """
    from .errors import ConfigError

    sc = np.asarray(scores, dtype=np.float64)
    if kind == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * sc))).astype(np.float32)  # overflow-free sigmoid
    if kind != "softmax":
        raise ConfigError(f"probability={kind!r} is unknown; use one of "
                          f"{', '.join(PROBABILITIES)} (--probability)")
    lse = log_partition(model, X, batch_size=batch_size, chunk_size=chunk_size)  # [N]
    return np.exp(sc - lse[:, None]).astype(np.float32)


def apply_threshold(ids: np.ndarray, probs: np.ndarray, threshold: float) -> np.ndarray:
    """``ids`` ``[N, k]`` with every entry whose probability is below ``threshold`` set to
    ``-1`` (padding, left out of prediction files); a new array."""
    out = np.array(ids, dtype=np.int64, copy=True)
    out[np.asarray(probs) < threshold] = -1
    return out


def evaluate_model(model: LoadedModel, X: sp.spmatrix, Y: sp.spmatrix, *,
                   ks: tuple[int, ...] = (1, 3, 5), chunk_size: int = 65536,
                   show_progress: bool = False) -> dict[str, float]:
    """P@k, nDCG@k, PSP@k, PSnDCG@k, R@k (fractions) of a loaded model on raw ``X`` / ``Y``.

    Propensities come from the model's stored training label counts.
    """
    from .metrics import evaluate as evaluate_metrics

    k = max(ks)
    ids, _ = predict_topk(model, X, k, chunk_size=chunk_size, show_progress=show_progress)
    res = evaluate_metrics(sp.csr_matrix(Y), ids, ks, model.inv_prop())
    return {key: float(v) for key, v in res.items()}


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Put ``path`` into a :class:`DataFormatError` raised without one (bad input rows)."""
    try:
        yield
    except DataFormatError as exc:
        if exc.path is not None:
            raise
        raise DataFormatError(path, exc.line, exc.message) from exc


def evaluate_model_dir(model_dir: str | os.PathLike[str], data_path: str | os.PathLike[str], *,
                       ks: tuple[int, ...] = (1, 3, 5), device: str = "auto",
                       chunk_size: int = 65536, ignore_extra: bool = False,
                       show_progress: bool = False, fields: Any = None,
                       labels_path: str | os.PathLike[str] | None = None, verify: bool = True,
                       zero_based: bool | str = "auto") -> dict[str, float]:
    """Evaluate the model in ``model_dir`` on the data file ``data_path`` (exact top-k).

    ``data_path`` may be raw text (``.jsonl``/``.tsv``/``.csv``) for a model trained on text;
    ``fields`` (:func:`~xmc_toolkit.inputs.resolve_fields`): ``None`` reads it with the field
    names of the model's training file, a mapping overrides some of them. ``labels_path``: the
    label matrix of an ``.npz`` feature matrix ``data_path`` (PECOS / scipy pairs).

    Returns:
        ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., ..., "num_rows_evaluated": ...}``; metric
        values are fractions in ``[0, 1]``.

    ``verify=False`` skips the checksum pass over the model files (``--no-verify``);
    ``zero_based`` is the svmlight id base of ``data_path`` (:func:`xmc_toolkit.data.load`).

    Raises:
        CheckpointError: ``model_dir`` is not a model directory (or a file is corrupt).
        DataFormatError: the data does not match the model (see ``ignore_extra``).
    """
    from .inputs import load_for_model

    model = load_model_dir(model_dir, device=device, verify=verify)
    ds = load_for_model(data_path, model, ignore_extra=ignore_extra,
                        fields=fields, labels_from=labels_path,
                        zero_based=zero_based)
    with _naming(data_path):
        return evaluate_model(model, ds.X, ds.Y, ks=tuple(ks), chunk_size=chunk_size,
                              show_progress=show_progress)


def predict_model_dir(model_dir: str | os.PathLike[str], data_path: str | os.PathLike[str], k: int,
                      *, approx: bool = False, num_cells: int = 16,
                      approx_backend: str = "auto", approx_effort: int | None = None,
                      device: str = "auto",
                      chunk_size: int = 65536, ignore_extra: bool = False,
                      show_progress: bool = False, fields: Any = None,
                      probability: str | None = None, threshold: float | None = None,
                      verify: bool = True, zero_based: bool | str = "auto") -> dict[str, Any]:
    """Top-k predictions of the model in ``model_dir`` for the rows of ``data_path``.

    ``data_path`` may be raw text for a model trained on text (labels optional there).
    ``probability`` (``"softmax"`` | ``"sigmoid"``, see :func:`probabilities`) adds the
    probability of each predicted label; ``threshold`` (with a probability, ``softmax`` when
    none is given) keeps only the labels of probability ``>= threshold`` (the others become
    ``-1``, padding).

    Returns:
        ``{"ids": int64 [N, k], "scores": float32 [N, k], "probabilities": float32 [N, k] |
        None, "label_names": list | None, "recall_vs_exact": float | None, "approx_note": str
        | None}``; ``recall_vs_exact`` is the overlap of the approximate top-k with the exact
        top-k (only with ``approx``). ``verify`` / ``zero_based`` as in
        :func:`evaluate_model_dir`.
    """
    from .inputs import load_for_model
    from .output_layer import recall_at_k_vs_exact

    model = load_model_dir(model_dir, device=device, verify=verify)
    ds = load_for_model(data_path, model, ignore_extra=ignore_extra, labels_required=False,
                        fields=fields, zero_based=zero_based)
    backend = resolve_approx_backend(approx_backend) if approx else None
    ann_index = None
    if backend is not None and backend != "midx":
        from .ann import build_ann_index

        ann_index = build_ann_index(model.network.labels.label_embeddings(),
                                    model.network.labels.bias_vector(), backend)
    with _naming(data_path):
        ids, scores = predict_topk(model, ds.X, k, chunk_size=chunk_size, approx=approx,
                                   num_cells=num_cells, show_progress=show_progress,
                                   approx_backend=backend or "midx", approx_effort=approx_effort,
                                   ann_index=ann_index)
    recall = None
    note = None
    if approx:
        # measured, never assumed: the exact top-k of the same rows
        exact_ids, _ = predict_topk(model, ds.X, k, chunk_size=chunk_size)
        recall = recall_at_k_vs_exact(torch.from_numpy(ids), torch.from_numpy(exact_ids))
        logger.info("approximate top-%d recall vs exact: %.4f", k, recall)
        n = ids.shape[0]
        if ann_index is not None:
            eff = ann_index.describe() if approx_effort is None else \
                f"{ann_index.describe()} searched with effort {approx_effort}"
            parts = [f"{eff}, built in {ann_index.build_s:.1f} s; measured on {n} rows"]
        else:
            state = model.sampler_state
            saved = state is not None and "codebook1" in state
            K = (int(state["num_codewords"]) if saved else  # type: ignore[index]
                 model.config.resolved_codewords(model.num_labels))
            parts = [f"MIDX index, {min(num_cells, K * K)} of {K * K} cells probed; measured "
                     f"on {n} rows"]
            if not saved:
                parts.append("the model has no MIDX index (trained without MIDX): one was "
                             "built now from its label embeddings")
            if num_cells >= K * K:
                parts.append(f"--num-cells {num_cells} probes all {K * K} cells: this was an "
                             "exhaustive, exact search, not an approximate one (recall 1 by construction); "
                             "lower --num-cells, or install an ANN library (pip install "
                             "'xmc-toolkit[ann]')")
        note = "; ".join(parts)
    probs = None
    if probability is not None or threshold is not None:
        probs = probabilities(model, ds.X, scores, probability or "softmax",
                              chunk_size=chunk_size)
        if threshold is not None:
            ids = apply_threshold(ids, probs, threshold)
    return {"ids": ids, "scores": scores, "probabilities": probs,
            "label_names": model.label_names, "num_labels": model.num_labels,
            "recall_vs_exact": recall, "approx_note": note, "approx_backend": backend,
            "path": str(Path(data_path))}
