"""``XMCModel``: the scikit-learn-like Python API over the trainer.

Example::

    from xmc_toolkit import XMCModel
    model = XMCModel(epochs=10, loss="sampled", sampler="midx", negatives=32)
    model.fit(X_train, Y_train, X_val=X_val, Y_val=Y_val)     # scipy CSR [N, D], [N, L]
    ids, scores = model.predict_topk(X_test, k=5)               # numpy [N, 5] int64 / float32
    print(model.evaluate(X_test, Y_test, ks=(1, 3, 5)))         # {"P@1": 0.65, ...}
    model.save("model_dir"); model = XMCModel.load("model_dir")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .data.dataset import XMCDataset
from .errors import ConfigError, XMCError
from .train import LoadedModel, TrainConfig, Trainer, TrainResult, load_model_dir, save_model_dir

__all__ = ["XMCModel"]


class XMCModel:
    """Sparse-input extreme multi-label classifier (EmbeddingBag + MLP encoder, label table).

    Args:
        **config: any :class:`~xmc_toolkit.train.TrainConfig` field (``epochs=10``,
            ``loss="sampled"``, ``sampler="midx"``, ``negatives=32``, ``device="auto"``, ...).
            Every invalid value is reported at once (:class:`~xmc_toolkit.errors.ConfigError`).
    """

    def __init__(self, **config: Any) -> None:
        self.config = TrainConfig().merged(config)
        self._model: LoadedModel | None = None
        self.result: TrainResult | None = None
        self._source_dir: Path | None = None  # the directory load() read (its checkpoint)
        self.lineage: list[dict[str, Any]] = []  # label-set growth history (lineage.json)

    # -- training ---------------------------------------------------------------------------
    def fit(self, X: sp.spmatrix, Y: sp.spmatrix, X_val: sp.spmatrix | None = None,
            Y_val: sp.spmatrix | None = None, show_progress: bool = False,
            callbacks: tuple[Any, ...] = (), out_dir: str | os.PathLike[str] | None = None,
            label_names: list[str] | None = None) -> "XMCModel":
        """Train on ``X`` ``[N, D]`` and ``Y`` ``[N, L]`` (scipy sparse).

        Args:
            X: raw features (TF-IDF / L2 preprocessing is part of the model).
            Y: binary labels.
            X_val: validation features (same ``D``), or ``None``.
            Y_val: validation labels (same ``L``), or ``None``.
            show_progress: rich progress bar.
            callbacks: ``callback(event, state)`` hooks (see :class:`Trainer`).
            out_dir: also write the model directory / checkpoints there.
            label_names: optional ``L`` label names (kept with the model).

        Returns:
            ``self``.
        """
        X, Y = _csr(X, "X"), _csr(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ConfigError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must match")
        if (X_val is None) != (Y_val is None):
            raise ConfigError("give both X_val and Y_val, or neither")
        val = None
        if X_val is not None and Y_val is not None:
            val = XMCDataset(_csr(X_val, "X_val"), _csr(Y_val, "Y_val"))
        trainer = Trainer(self.config, out_dir=out_dir, callbacks=callbacks)
        self.result = trainer.fit(XMCDataset(X, Y, label_names), val,
                                  show_progress=show_progress)
        self._model = _loaded_from(trainer, self.result, label_names)
        self._source_dir = Path(out_dir) if out_dir is not None else None
        self.lineage = []
        return self

    def add_labels(self, X: sp.spmatrix, Y_new: sp.spmatrix, names: list[str] | None = None,
                   fine_tune_epochs: int = 0, *, show_progress: bool = False,
                   **config: Any) -> "XMCModel":
        """Grow the label set by ``n`` new labels (``xmc labels add`` / ``train --init-from``).

        Args:
            X: ``[N, D]`` raw feature rows (the model's feature space).
            Y_new: ``[N, L + n]`` their labels in the *grown* label space: columns ``< L`` are
                the model's labels (they calibrate the new rows; zeros are fine), columns
                ``>= L`` the new ones.
            names: the ``n`` new labels' names; required when the model's labels have names,
                refused when they have none. A name the model already has is an error.
            fine_tune_epochs: ``0``: only initialise the new rows (no training step);
                ``E > 0``: then train ``E`` epochs on ``(X, Y_new)``, every label, starting from
                this model (its optimizer state when it was loaded from a directory with a
                checkpoint).
            show_progress: progress bar of the fine-tune.
            **config: other :class:`~xmc_toolkit.train.TrainConfig` values of the fine-tune
                (``lr=...``); fields that shape the network cannot change.

        Returns:
            ``self`` (the grown model; ``self.lineage`` records the step, :meth:`save` writes
            it to ``lineage.json``).

        Raises:
            LabelSetError: no new columns, missing or colliding names.
            XMCError: ``X`` in another feature space.
        """
        from . import grow
        from .errors import LabelSetError

        parent = self.fitted
        X = self._check_X(X)
        Y = _csr(Y_new, "Y_new")
        L = parent.num_labels
        n = Y.shape[1] - L
        if Y.shape[0] != X.shape[0]:
            raise ConfigError(f"X has {X.shape[0]} rows but Y_new has {Y.shape[0]}")
        if n <= 0:
            raise LabelSetError(f"Y_new has {Y.shape[1]} columns and the model {L} labels: no "
                                "new labels; pass Y_new in the grown label space [N, L + n] "
                                "with the new labels in columns >= L")
        data_names = None
        if parent.label_names is not None:
            if names is None or len(names) != n:
                raise LabelSetError(f"the model's labels have names: pass names= with the {n} "
                                    f"new labels' names (got {0 if names is None else len(names)})")
            known = set(parent.label_names)
            clash = [x for x in names if x in known]
            if clash:
                raise LabelSetError(f"label names collide: {', '.join(map(repr, clash[:3]))} "
                                    "already name labels of the model; give new labels new names")
            data_names = list(parent.label_names) + [str(x) for x in names]
        elif names is not None:
            raise LabelSetError("the model's labels have no names, so new labels cannot have "
                                "them either; drop names=")
        growth = grow.prepare_growth(parent, XMCDataset(X, Y, data_names),
                                     refresh_index=fine_tune_epochs <= 0)
        where = "none"
        if fine_tune_epochs > 0:
            cfg = grow.child_config(parent.config, {"epochs": int(fine_tune_epochs), **config},
                                    sampler_state=parent.sampler_state, num_points=X.shape[0])
            opt_state = None
            if self._source_dir is not None:
                opt_state, where = grow.read_optimizer_state(self._source_dir)
                if opt_state is not None:
                    opt_state = grow.grow_optimizer_state(opt_state, L, n)
            ws = grow.WarmStart(growth.model.network.state_dict(), parent.preprocessor,
                                opt_state, growth.model.sampler_state)
            trainer = Trainer(cfg)
            self.result = trainer.fit(growth.data, show_progress=show_progress, init=ws)
            self._model = _loaded_from(trainer, self.result, growth.match.names)
            self.config = trainer.config
            if opt_state is not None:
                where += "; kept for: " + (", ".join(ws.kept) or "none")
        else:
            self._model = growth.model
        self.lineage = self.lineage + [grow.lineage_entry(
            self._source_dir, growth, mode="XMCModel.add_labels", epochs=fine_tune_epochs,
            optimizer_state=where)]
        self._source_dir = None  # the grown model lives in memory now
        return self

    # -- inference --------------------------------------------------------------------------
    @property
    def fitted(self) -> LoadedModel:
        if self._model is None:
            raise XMCError("this XMCModel is not fitted; call fit(X, Y) or XMCModel.load(dir)")
        return self._model

    def _check_X(self, X: sp.spmatrix) -> sp.csr_matrix:
        X = _csr(X, "X")
        D = self.fitted.num_features
        if X.shape[1] != D:
            raise XMCError(f"X has {X.shape[1]} feature columns but the model was trained on {D};"
                           " use the same feature space")
        return X

    def predict_topk(self, X: sp.spmatrix, k: int = 5, *, approx: bool = False,
                     chunk_size: int = 65536, num_cells: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` labels of each row: ``ids`` int64 ``[N, k]``, ``scores`` float32 ``[N, k]``.

        ``approx=True`` uses the MIDX inverted multi-index (faster for very large ``L``),
        probing ``num_cells`` codeword-pair cells per query (``None``: the default of
        :func:`xmc_toolkit.evaluate.predict_topk`; more cells, higher recall).
        """
        from .evaluate import predict_topk

        X = self._check_X(X)
        extra = {} if num_cells is None else {"num_cells": num_cells}
        return predict_topk(self.fitted, X, k, chunk_size=chunk_size, approx=approx,
                            batch_size=self.config.eval_batch_size, **extra)

    def encode(self, X: sp.spmatrix) -> np.ndarray:
        """Query embeddings ``[N, d]`` float32 of raw feature rows."""
        from .encoder import encode_csr

        X = self.fitted.preprocessor.transform(self._check_X(X))
        q = encode_csr(self.fitted.network.encoder, X, batch_size=self.config.eval_batch_size)
        return q.float().cpu().numpy()

    def label_embeddings(self) -> np.ndarray:
        """Label embeddings ``[L, d]`` float32 (the rows scored against queries)."""
        return self.fitted.network.labels.label_embeddings().float().cpu().numpy()

    def label_bias(self) -> np.ndarray | None:
        """Label biases ``[L]`` float32, or ``None``."""
        b = self.fitted.network.labels.bias_vector()
        return None if b is None else b.float().cpu().numpy()

    def evaluate(self, X: sp.spmatrix, Y: sp.spmatrix, ks: tuple[int, ...] = (1, 3, 5)
                 ) -> dict[str, float]:
        """P@k, nDCG@k, PSP@k, PSnDCG@k, R@k (fractions) on ``X`` / ``Y``."""
        from .evaluate import evaluate_model

        X = self._check_X(X)
        Y = _csr(Y, "Y")
        if Y.shape[1] != self.fitted.num_labels:
            raise XMCError(f"Y has {Y.shape[1]} label columns but the model has "
                           f"{self.fitted.num_labels}; use the same label space")
        return evaluate_model(self.fitted, X, Y, ks=tuple(ks),
                              chunk_size=self.config.eval_chunk_size)

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a model directory (usable by ``xmc eval/predict/export --model``)."""
        m = self.fitted
        out = save_model_dir(path, m.network, m.preprocessor, m.config,
                             label_names=m.label_names, label_counts=m.label_counts,
                             num_train=m.num_train, sampler_state=m.sampler_state,
                             summary=m.summary)
        if self.lineage:
            from .grow import write_lineage

            write_lineage(out, None, self.lineage[-1], history=self.lineage[:-1])
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> "XMCModel":
        """Load a model directory written by :meth:`save` or ``xmc train``."""
        loaded = load_model_dir(path, device=device)
        obj = cls.__new__(cls)
        obj.config = loaded.config
        obj._model = loaded
        obj.result = None
        from .grow import read_lineage

        obj._source_dir = Path(path)
        obj.lineage = read_lineage(path)
        return obj

    @property
    def label_names(self) -> list[str] | None:
        return self.fitted.label_names

    def __repr__(self) -> str:
        state = "fitted" if self._model is not None else "not fitted"
        return (f"XMCModel({state}, loss={self.config.loss!r}, sampler={self.config.sampler!r}, "
                f"dim={self.config.dim}, hidden={list(self.config.hidden)})")


def _loaded_from(trainer: Trainer, result: TrainResult,
                 label_names: list[str] | None) -> LoadedModel:
    """The fitted model of a finished :class:`Trainer` (eval mode)."""
    if trainer.network is None or trainer.preprocessor is None:  # pragma: no cover
        raise XMCError("training produced no network")
    trainer.network.eval()
    sampler_state = None
    if trainer.sampler is not None and trainer.sampler.needs_update:
        sampler_state = trainer.sampler.state_dict()
    return LoadedModel(
        network=trainer.network, preprocessor=trainer.preprocessor, config=trainer.config,
        label_names=label_names, label_counts=trainer.label_counts,  # type: ignore[arg-type]
        num_train=trainer.num_train, sampler_state=sampler_state, summary=result.to_dict())


def _csr(M: Any, name: str) -> sp.csr_matrix:
    if not sp.issparse(M):
        if isinstance(M, np.ndarray) and M.ndim == 2:
            return sp.csr_matrix(M, dtype=np.float32)
        raise XMCError(f"{name} must be a scipy.sparse matrix or a 2-D numpy array, got "
                       f"{type(M).__name__}")
    return sp.csr_matrix(M, dtype=np.float32)

