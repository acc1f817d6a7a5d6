"""What a model directory holds (``xmc info MODEL``): sizes, the resolved architecture, labels,
training statistics and the final metrics, as one JSON-ready dict. Pure: no printing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["model_info"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_info(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe the model directory ``model_dir`` (loaded on the CPU).

    Returns:
        ``{"path", "disk": {"files": {name: bytes}, "model_bytes", "checkpoint_bytes"},
        "memory": {"parameters", "parameter_bytes", "featurizer_bytes"}, "architecture": {...},
        "labels": {...}, "training": {...}, "featurizer": {...} | None, "metrics": {...}}``.

    Raises:
        CheckpointError: ``model_dir`` is not a model directory.
    """
    from .model_dir import load_model_dir

    d = Path(model_dir)
    m = load_model_dir(d, device="cpu")
    cfg = m.config
    D, L = m.num_features, m.num_labels
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    ckpt = d / "checkpoint"
    state = m.network.state_dict()
    n_params = sum(int(v.numel()) for v in state.values())
    param_bytes = sum(int(v.numel()) * v.element_size() for v in state.values())
    feat = m.featurizer
    feat_info = None
    feat_bytes = 0
    if feat is not None:
        feat_bytes = (0 if feat.idf is None else int(feat.idf.nbytes)) + (
            0 if feat.vocabulary is None else sum(len(t.encode("utf-8")) + 8
                                                  for t in feat.vocabulary))
        feat_info = {"num_features": feat.num_features,
                     "kind": "hashing" if feat.vocabulary is None else "vocabulary",
                     **feat.config.to_dict()}
    counts = np.asarray(m.label_counts, dtype=np.int64)
    summary = m.summary or {}
    history = summary.get("history") or []
    last = history[-1] if history else {}
    return {
        "path": str(d),
        "disk": {"files": files, "model_bytes": sum(files.values()),
                 "checkpoint_bytes": _dir_bytes(ckpt) if ckpt.is_dir() else 0},
        "memory": {"parameters": n_params, "parameter_bytes": param_bytes,
                   "featurizer_bytes": feat_bytes},
        "architecture": {
            "num_features": D, "num_labels": L, "dim": cfg.dim,
            "hidden": list(cfg.resolved_hidden(D)) if not cfg.linear_only else [],
            "linear_only": cfg.linear_only, "members": cfg.resolved_ensemble(m.num_train),
            "loss": cfg.resolved_loss(L), "sampler": cfg.sampler if cfg.resolved_loss(L) !=
            "full" else None, "label_bias": cfg.label_bias, "tfidf": m.preprocessor.idf is not None,
            "l2_normalize": m.preprocessor.l2_normalize,
            "feature_power": m.preprocessor.power, "dropout": cfg.dropout,
            "bag_optimizer": cfg.resolved_bag_optimizer(D)},
        "labels": {"num_labels": L, "named": m.label_names is not None,
                   "first_names": (m.label_names or [])[:5]},
        "training": {"num_points": int(m.num_train), "label_assignments": int(counts.sum()),
                     "avg_labels_per_point": float(counts.sum() / max(1, m.num_train)),
                     "labels_without_points": int((counts == 0).sum()),
                     "max_points_per_label": int(counts.max()) if len(counts) else 0,
                     "epochs": cfg.epochs, "steps": summary.get("steps"),
                     "seconds": summary.get("seconds")},
        "featurizer": feat_info,
        "metrics": {"final_train_loss": last.get("loss"),
                    "best_epoch": summary.get("best_epoch"),
                    "validation": summary.get("best") or {}},
    }
