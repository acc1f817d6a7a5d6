"""``XMCModel``: the scikit-learn-like Python API over the trainer.

Example::

    from xmc_toolkit import XMCModel
    model = XMCModel().fit(texts, labels)                       # list[str], list[list[str]]
    model.predict(["In the beginning God created"], k=3)      # [["H0430", "H7225", "H1254"]]

    model = XMCModel(epochs=10, loss="sampled", sampler="midx", negatives=32)
    model.fit(X_train, Y_train, X_val=X_val, Y_val=Y_val)     # scipy CSR [N, D], [N, L]
    ids, scores = model.predict_topk(X_test, k=5)               # numpy [N, 5] int64 / float32
    print(model.evaluate(X_test, Y_test, ks=(1, 3, 5)))         # {"P@1": 0.65, ...}
    model.save("model_dir"); model = XMCModel.load("model_dir")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from .data.dataset import XMCDataset
from .errors import ConfigError, XMCError
from .model_dir import LoadedModel, load_model_dir, save_model_dir
from .train_config import TrainConfig

if TYPE_CHECKING:  # the trainer is imported by fit / add_labels only: loading never needs it
    from .train import Trainer, TrainResult

__all__ = ["XMCModel"]


class XMCModel:
    """Sparse-input extreme multi-label classifier (EmbeddingBag + MLP encoder, label table).

    Inputs are either feature rows (scipy sparse ``[N, D]`` with a binary ``Y`` ``[N, L]``) or
    raw texts (``list[str]`` with ``list[list[str]]`` labels): then a featurizer is fitted on
    the training texts and kept in the model, and label ids are the sorted label names.

    Args:
        featurizer: text featurizer settings, a :class:`~xmc_toolkit.featurizer.FeaturizerConfig`
            or a dict of its fields (``{"ngram_range": (1, 2)}``); used when fitting on texts.
        **config: any :class:`~xmc_toolkit.train.TrainConfig` field (``epochs=10``,
            ``loss="sampled"``, ``sampler="midx"``, ``negatives=32``, ``device="auto"``, ...).
            Every invalid value is reported at once (:class:`~xmc_toolkit.errors.ConfigError`).
    """

    def __init__(self, featurizer: Any = None, **config: Any) -> None:
        self._params: dict[str, Any] = {"featurizer": featurizer, **config}
        self._configure()
        self._model: LoadedModel | None = None
        self.result: TrainResult | None = None
        self._source_dir: Path | None = None  # the directory load() read (its checkpoint)
        self.lineage: list[dict[str, Any]] = []  # label-set growth history (lineage.json)

    def _configure(self) -> None:
        """Build and validate ``config`` / ``featurizer_config`` from the parameters."""
        from .featurizer import FeaturizerConfig

        params = dict(self._params)
        featurizer = params.pop("featurizer", None)
        self.config = TrainConfig().merged(params)
        if featurizer is None or isinstance(featurizer, FeaturizerConfig):
            self.featurizer_config = (featurizer or FeaturizerConfig()).validate()
        elif isinstance(featurizer, dict):
            self.featurizer_config = FeaturizerConfig().merged(featurizer)
        else:
            raise ConfigError(f"featurizer must be a FeaturizerConfig or a dict of its fields, "
                              f"got {type(featurizer).__name__}")

    # -- scikit-learn estimator protocol ----------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every constructor parameter: ``featurizer`` and each TrainConfig field (scikit-learn
        ``get_params``; the values are the objects given, so ``sklearn.base.clone`` works)."""
        import dataclasses

        out: dict[str, Any] = {"featurizer": self._params.get("featurizer")}
        for f in dataclasses.fields(TrainConfig):
            out[f.name] = self._params.get(f.name, f.default)
        return out

    def set_params(self, **params: Any) -> "XMCModel":
        """Change constructor parameters (validated at once, every problem listed); a fitted
        model keeps its weights until the next :meth:`fit`."""
        known = self.get_params()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError([f"unknown parameter {k!r} of XMCModel" for k in unknown])
        old = dict(self._params)
        self._params.update(params)
        try:
            self._configure()
        except ConfigError:
            self._params = old
            raise
        return self

    def score(self, X: Any, Y: Any) -> float:
        """P@1 (a fraction) on ``X`` / ``Y``: the ``score`` of the scikit-learn protocol."""
        return float(self.evaluate(X, Y, ks=(1,))["P@1"])

    def __sklearn_is_fitted__(self) -> bool:
        return self._model is not None

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True,
                    multi_output=True), classifier_tags=ClassifierTags(multi_label=True))

    # -- training ---------------------------------------------------------------------------
    def fit(self, X: Any, Y: Any, X_val: Any = None, Y_val: Any = None,
            show_progress: bool = False,
            callbacks: tuple[Any, ...] = (), out_dir: str | os.PathLike[str] | None = None,
            label_names: list[str] | None = None) -> "XMCModel":
        """Train on ``X`` ``[N, D]`` and ``Y`` ``[N, L]`` (scipy sparse), or on texts.

        Args:
            X: raw features (TF-IDF / L2 preprocessing is part of the model), or ``N`` texts
                (``list[str]``: the featurizer is fitted on them and kept in the model).
            Y: binary labels, or with texts ``N`` lists of label names (``list[list[str]]``).
            X_val: validation features (same ``D``) or texts, or ``None``.
            Y_val: validation labels (same ``L``) or label-name lists (names unseen in
                ``Y`` are dropped), or ``None``.
            show_progress: rich progress bar.
            callbacks: ``callback(event, state)`` hooks (see :class:`Trainer`).
            out_dir: also write the model directory / checkpoints there.
            label_names: optional ``L`` label names (kept with the model).

        Returns:
            ``self``.
        """
        featurizer = None
        if _is_texts(X):
            from .data.text import label_matrix, label_vocabulary
            from .featurizer import Featurizer

            if label_names is not None:
                raise ConfigError("texts name their labels themselves; drop label_names")
            labels = _label_lists(Y, "Y", len(X))
            featurizer = Featurizer.fit(list(X), self.featurizer_config)
            label_names = label_vocabulary(labels)
            X, Y = featurizer.transform(list(X)), label_matrix(labels, label_names)[0]
            if X_val is not None and Y_val is not None:
                if not _is_texts(X_val):
                    raise ConfigError("X_val must be texts like X")
                Y_val = label_matrix(_label_lists(Y_val, "Y_val", len(X_val)), label_names,
                                     ignore_extra=True)[0]
                X_val = featurizer.transform(list(X_val))
        X, Y = _csr(X, "X"), _csr(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ConfigError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must match")
        if (X_val is None) != (Y_val is None):
            raise ConfigError("give both X_val and Y_val, or neither")
        val = None
        if X_val is not None and Y_val is not None:
            val = XMCDataset(_csr(X_val, "X_val"), _csr(Y_val, "Y_val"))
        from .train import Trainer

        trainer = Trainer(self.config, out_dir=out_dir, callbacks=callbacks,
                          featurizer=featurizer)
        self.result = trainer.fit(XMCDataset(X, Y, label_names), val,
                                  show_progress=show_progress)
        self._model = _loaded_from(trainer, self.result, label_names, featurizer)
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
                                     refresh_index=fine_tune_epochs <= 0,
                                     per_member=fine_tune_epochs > 0 and
                                     grow.FINE_TUNE_PER_MEMBER)
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
            from .train import Trainer

            trainer = Trainer(cfg)
            self.result = trainer.fit(growth.data, show_progress=show_progress, init=ws)
            self._model = _loaded_from(trainer, self.result, growth.match.names,
                                       parent.featurizer)
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

    def _check_X(self, X: Any) -> sp.csr_matrix:
        """Feature rows ``[N, D]`` of sparse ``X`` (checked) or of texts (featurized)."""
        if _is_texts(X):
            from .inputs import featurize_texts

            return featurize_texts(self.fitted, list(X))
        X = _csr(X, "X")
        D = self.fitted.num_features
        if X.shape[1] != D:
            raise XMCError(f"X has {X.shape[1]} feature columns but the model was trained on {D};"
                           " use the same feature space")
        return X

    def predict(self, X: Any, k: int = 5, *, threshold: float | None = None,
                probability: str = "softmax") -> list[list[str]] | list[list[int]]:
        """The ``k`` best labels of each row or text, best first: label names when the model
        has them (always after fitting on texts), else label ids. With ``threshold``, only
        the labels whose ``probability`` (see :meth:`predict_proba`) is at least that value."""
        k = min(k, self.fitted.num_labels)
        if threshold is None:
            ids, _ = self.predict_topk(X, k=k)
        else:
            from .evaluate import apply_threshold

            ids, probs = self.predict_proba(X, k=k, kind=probability)
            ids = apply_threshold(ids, probs, threshold)
        names = self.fitted.label_names
        rows = [[j for j in row if j >= 0] for row in ids.tolist()]
        if names is None:
            return rows
        return [[names[j] for j in row] for row in rows]

    def predict_proba(self, X: Any, k: int = 5, kind: str = "softmax"
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids int64 ``[N, k]`` and their probabilities float32 ``[N, k]``.

        ``kind="softmax"``: each label's share of the softmax over all ``L`` labels (what the
        softmax losses train; a row's shares sum to 1 over all labels); ``"sigmoid"``:
        ``1 / (1 + exp(-score))``, one-vs-all, calibrated only when trained with a binary loss
        (``bce_weight > 0`` or ``loss="negative-sampling"``).
        """
        from .evaluate import predict_topk, probabilities

        Xf = self._check_X(X)
        ids, scores = predict_topk(self.fitted, Xf, k, chunk_size=self.config.eval_chunk_size,
                                   batch_size=self.config.eval_batch_size)
        return ids, probabilities(self.fitted, Xf, scores, kind,
                                  batch_size=self.config.eval_batch_size,
                                  chunk_size=self.config.eval_chunk_size)

    def predict_topk(self, X: Any, k: int = 5, *, approx: bool = False,
                     chunk_size: int = 65536, num_cells: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` labels of each row (or text): ``ids`` int64 ``[N, k]``, ``scores`` float32
        ``[N, k]``.

        ``approx=True`` uses the MIDX inverted multi-index (faster for very large ``L``),
        probing ``num_cells`` codeword-pair cells per query (``None``: the default of
        :func:`xmc_toolkit.evaluate.predict_topk`; more cells, higher recall).
        """
        from .evaluate import predict_topk

        X = self._check_X(X)
        extra = {} if num_cells is None else {"num_cells": num_cells}
        return predict_topk(self.fitted, X, k, chunk_size=chunk_size, approx=approx,
                            batch_size=self.config.eval_batch_size, **extra)

    def encode(self, X: Any) -> np.ndarray:
        """Query embeddings ``[N, d]`` float32 of raw feature rows or texts."""
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

    def evaluate(self, X: Any, Y: Any, ks: tuple[int, ...] = (1, 3, 5),
                 ignore_extra: bool = False) -> dict[str, float]:
        """P@k, nDCG@k, PSP@k, PSnDCG@k, R@k (fractions) on ``X`` / ``Y``, or on texts and
        their label-name lists (unknown names: an error, or dropped with ``ignore_extra``)."""
        from .evaluate import evaluate_model

        if _is_texts(X):
            from .data.text import label_matrix

            if self.fitted.label_names is None:
                raise XMCError("this model has no label names; evaluate with a label matrix Y")
            Y = label_matrix(_label_lists(Y, "Y", len(X)), self.fitted.label_names,
                             ignore_extra=ignore_extra)[0]
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
                             summary=m.summary, featurizer=m.featurizer)
        if self.lineage:
            from .grow import write_lineage

            write_lineage(out, None, self.lineage[-1], history=self.lineage[:-1])
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto", *,
             verify: bool = True) -> "XMCModel":
        """Load a model directory written by :meth:`save` or ``xmc train``.

        ``verify=False`` skips checking the files against ``checksums.json``.
        """
        loaded = load_model_dir(path, device=device, verify=verify)
        from .featurizer import FeaturizerConfig

        obj = cls.__new__(cls)
        obj.config = loaded.config
        obj.featurizer_config = (loaded.featurizer.config if loaded.featurizer is not None
                                 else FeaturizerConfig())
        obj._params = {"featurizer": obj.featurizer_config, **loaded.config.to_dict()}
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


def _is_texts(X: Any) -> bool:
    """Whether ``X`` is a sequence of texts (not a matrix)."""
    if sp.issparse(X) or isinstance(X, np.ndarray) or isinstance(X, str):
        return False
    return isinstance(X, Sequence) and len(X) > 0 and all(isinstance(t, str) for t in X)


def _label_lists(Y: Any, name: str, n: int) -> list[list[str]]:
    """Check ``Y`` is ``n`` lists of label names (strings)."""
    if sp.issparse(Y) or isinstance(Y, np.ndarray) or not isinstance(Y, Sequence):
        raise XMCError(f"with texts, {name} must be a list of label-name lists "
                       f"(list[list[str]]), got {type(Y).__name__}")
    if len(Y) != n:
        raise ConfigError(f"{n} texts but {len(Y)} label lists in {name}; they must match")
    out: list[list[str]] = []
    for i, labs in enumerate(Y):
        if isinstance(labs, str) or not isinstance(labs, Sequence) or not all(
                isinstance(lab, str) for lab in labs):
            raise XMCError(f"{name}[{i}] = {labs!r:.60} must be a list of label names (strings)")
        out.append(list(labs))
    return out


def _loaded_from(trainer: Trainer, result: TrainResult,
                 label_names: list[str] | None, featurizer: Any = None) -> LoadedModel:
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
        num_train=trainer.num_train, sampler_state=sampler_state, summary=result.to_dict(),
        featurizer=featurizer)


def _csr(M: Any, name: str) -> sp.csr_matrix:
    if not sp.issparse(M):
        if isinstance(M, np.ndarray) and M.ndim == 2:
            return sp.csr_matrix(M, dtype=np.float32)
        raise XMCError(f"{name} must be a scipy.sparse matrix or a 2-D numpy array, got "
                       f"{type(M).__name__}")
    return sp.csr_matrix(M, dtype=np.float32)

