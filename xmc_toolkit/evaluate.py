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
from .train import LoadedModel, load_model_dir, predict_topk_network

__all__ = [
    "align_dataset",
    "predict_topk",
    "evaluate_model",
    "evaluate_model_dir",
    "predict_model_dir",
    "build_index",
]

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


def predict_topk(model: LoadedModel, X: sp.spmatrix, k: int, *, chunk_size: int = 65536,
                 batch_size: int = 2048, approx: bool = False, num_cells: int = 16,
                 show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of raw feature rows (the model's TF-IDF / L2 preprocessing is applied).

    Args:
        model: a loaded model directory.
        X: ``[N, D]`` raw features.
        k: labels per row.
        chunk_size: labels scored per block (exact path).
        batch_size: rows per block.
        approx: approximate top-k through the MIDX index.
        num_cells: cells probed per query with ``approx``.
        show_progress: rich progress bar.

    Returns:
        ``ids`` int64 ``[N, k]`` and ``scores`` float32 ``[N, k]``, best first.
    """
    Xp = model.preprocessor.transform(X)
    sampler = build_index(model) if approx else None
    return predict_topk_network(model.network, Xp, k, batch_size=batch_size,
                                chunk_size=chunk_size, show_progress=show_progress,
                                approx=approx, sampler=sampler, num_cells=num_cells)


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


def _load_data(data_path: str | os.PathLike[str], zero_based: bool | str = "auto"
               ) -> XMCDataset:
    from .data import load

    return load(data_path, zero_based=zero_based)


def evaluate_model_dir(model_dir: str | os.PathLike[str], data_path: str | os.PathLike[str], *,
                       ks: tuple[int, ...] = (1, 3, 5), device: str = "auto",
                       chunk_size: int = 65536, ignore_extra: bool = False,
                       show_progress: bool = False, verify: bool = True,
                       zero_based: bool | str = "auto") -> dict[str, float]:
    """Evaluate the model in ``model_dir`` on the data file ``data_path`` (exact top-k).

    Returns:
        ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., ..., "num_rows_evaluated": ...}``; metric
        values are fractions in ``[0, 1]``.

    ``verify=False`` skips the checksum pass over the model files (``--no-verify``);
    ``zero_based`` is the svmlight id base of ``data_path`` (:func:`xmc_toolkit.data.load`).

    Raises:
        CheckpointError: ``model_dir`` is not a model directory (or a file is corrupt).
        DataFormatError: the data does not match the model (see ``ignore_extra``).
    """
    model = load_model_dir(model_dir, device=device, verify=verify)
    ds = align_dataset(_load_data(data_path, zero_based), model.num_features, model.num_labels,
                       ignore_extra=ignore_extra, path=str(data_path))
    with _naming(data_path):
        return evaluate_model(model, ds.X, ds.Y, ks=tuple(ks), chunk_size=chunk_size,
                              show_progress=show_progress)


def predict_model_dir(model_dir: str | os.PathLike[str], data_path: str | os.PathLike[str], k: int,
                      *, approx: bool = False, num_cells: int = 16, device: str = "auto",
                      chunk_size: int = 65536, ignore_extra: bool = False,
                      show_progress: bool = False, verify: bool = True,
                      zero_based: bool | str = "auto") -> dict[str, Any]:
    """Top-k predictions of the model in ``model_dir`` for the rows of ``data_path``.

    Returns:
        ``{"ids": int64 [N, k], "scores": float32 [N, k], "label_names": list | None,
        "recall_vs_exact": float | None}``; the last is the overlap of the approximate top-k
        with the exact top-k (only with ``approx``). ``verify`` / ``zero_based`` as in
        :func:`evaluate_model_dir`.
    """
    from .output_layer import recall_at_k_vs_exact

    model = load_model_dir(model_dir, device=device, verify=verify)
    ds = align_dataset(_load_data(data_path, zero_based), model.num_features, model.num_labels,
                       ignore_extra=ignore_extra, path=str(data_path))
    with _naming(data_path):
        ids, scores = predict_topk(model, ds.X, k, chunk_size=chunk_size, approx=approx,
                                   num_cells=num_cells, show_progress=show_progress)
    recall = None
    note = None
    if approx:
        exact_ids, _ = predict_topk(model, ds.X, k, chunk_size=chunk_size)
        recall = recall_at_k_vs_exact(torch.from_numpy(ids), torch.from_numpy(exact_ids))
        logger.info("approximate top-%d recall vs exact: %.4f", k, recall)
        state = model.sampler_state
        saved = state is not None and "codebook1" in state
        K = (int(state["num_codewords"]) if saved else  # type: ignore[index]
             model.config.resolved_codewords(model.num_labels))
        parts = [] if saved else ["the model has no MIDX index (trained without MIDX): one "
                                  f"was built now from its label embeddings ({K}x{K} cells)"]
        if num_cells >= K * K:
            parts.append(f"--num-cells {num_cells} probes all {K * K} cells, so the search is "
                         "exhaustive (recall 1 by construction); lower --num-cells")
        note = "; ".join(parts) or None
    return {"ids": ids, "scores": scores, "label_names": model.label_names,
            "recall_vs_exact": recall, "approx_note": note, "path": str(Path(data_path))}
