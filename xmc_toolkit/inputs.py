"""Data files as a model sees them: raw text (JSONL/TSV/CSV) or feature vectors (XC, svmlight, ...).

* :func:`load_training_data`: a training file -> ``XMCDataset`` (+ the featurizer fitted on its
  texts when it is a text file; label ids are the sorted label names).
* :func:`load_for_model`: a file to evaluate or predict -> ``XMCDataset`` in the model's
  feature and label space (texts through the model's featurizer, labels by name; feature
  files checked, or fixed with ``ignore_extra``, by :func:`~xmc_toolkit.evaluate.align_dataset`).
* :func:`featurize_texts`: texts -> the model's feature rows.

Text files are recognised by their name (``.jsonl``, ``.ndjson``, ``.tsv``, ``.csv``, each
optionally ``.gz``/``.bz2``/``.xz``); everything else goes to :func:`xmc_toolkit.data.load`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.sparse as sp

from .data.dataset import XMCDataset, split_rows
from .data.text import label_vocabulary, read_text, text_dataset, text_format
from .errors import XMCError
from .featurizer import Featurizer, FeaturizerConfig

__all__ = ["TextFields", "resolve_fields", "stored_fields", "is_text_file", "load_training_data", "load_validation_data",
           "load_for_model", "featurize_texts"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class TextFields:
    """Where a text file keeps its parts (``--text-field``, ``--label-field``, ``--label-sep``).

    Attributes:
        text_field: JSON field / column of the text.
        label_field: JSON field (list of strings) / column of the labels.
        label_sep: TSV/CSV: separator of the labels inside their column.
    """

    text_field: str = "text"
    label_field: str = "labels"
    label_sep: str = "|"


def _family(fmt: str | None) -> str | None:
    """JSON lines or a table (TSV and CSV share column names)."""
    return None if fmt is None else ("json" if fmt == "jsonl" else "table")


def stored_fields(fields: TextFields, path: PathLike) -> dict[str, str] | None:
    """What a featurizer keeps of the training file's layout (``None``: all defaults)."""
    if fields == TextFields():
        return None
    return {"format": _family(text_format(path)) or "", **dataclasses.asdict(fields)}


def resolve_fields(model: Any, fields: TextFields | Mapping[str, str] | None,
                   path: PathLike | None = None) -> TextFields:
    """The field names to read the text file ``path`` with for ``model``.

    ``fields`` may be a :class:`TextFields` (used as it is), ``None`` (the names the model's
    training file used, kept by its featurizer, when ``path`` is of the same kind -- JSON lines,
    or a TSV/CSV table -- else the defaults) or a mapping of some of the names
    (``{"text_field": "body"}``) that override those.

    Raises:
        XMCError: a mapping names an unknown field.
    """
    if isinstance(fields, TextFields):
        return fields
    known = {f.name for f in dataclasses.fields(TextFields)}
    overrides = dict(fields or {})
    bad = sorted(set(overrides) - known)
    if bad:
        raise XMCError(f"unknown text field setting(s) {', '.join(bad)}; known: "
                       f"{', '.join(sorted(known))}")
    stored = dict(getattr(getattr(model, "featurizer", None), "fields", None) or {})
    same_kind = path is None or stored.get("format") in (None, _family(text_format(path)))
    merged = {k: v for k, v in stored.items() if k in known} if same_kind else {}
    merged.update(overrides)
    return TextFields(**merged)


def is_text_file(path: PathLike) -> bool:
    """Whether ``path`` is read as raw text (by its name)."""
    return text_format(path) is not None


def load_training_data(path: PathLike, featurizer: FeaturizerConfig | None = None, *,
                       fields: TextFields = TextFields(),
                       label_names_from: PathLike | None = None,
                       labels_from: PathLike | None = None,
                       zero_based: bool | str = "auto",
                       holdout: tuple[float, int] | None = None
                       ) -> tuple[XMCDataset, Featurizer | None]:
    """Read a training file; fit the featurizer on it when it is a text file.

    Args:
        path: the training data (text or any feature-vector format).
        featurizer: featurizer settings (text files only; default :class:`FeaturizerConfig`).
        fields: field names of a text file.
        label_names_from: feature-vector formats only: a file of label names, one a line in
            label-id order (stored with the model).
        labels_from: ``.npz`` features only: the label matrix in its own ``.npz`` file.
        zero_based: svmlight only: the id base (:func:`xmc_toolkit.data.load`).
        holdout: ``(fraction, seed)`` of the validation split the trainer will carve from these
            rows (``--val-fraction``, ``--seed``): a text featurizer is fitted on the other rows
            only (:func:`xmc_toolkit.data.dataset.split_rows`), so the validation texts do not
            shape its vocabulary or IDF.

    Returns:
        ``(dataset, featurizer)``; ``featurizer`` is ``None`` for feature-vector data.
    """
    if is_text_file(path):
        if label_names_from is not None or labels_from is not None:
            raise XMCError(f"{path}: a text data set holds and names its labels itself; drop "
                           "--label-names / --labels")
        data = read_text(path, text_field=fields.text_field, label_field=fields.label_field,
                         label_sep=fields.label_sep)
        fit_texts = data.texts
        if holdout is not None and holdout[0] > 0:
            tr_rows, _ = split_rows(len(data.texts), holdout[0], holdout[1])
            fit_texts = [data.texts[i] for i in tr_rows]
        feat = Featurizer.fit(fit_texts, featurizer)
        feat.fields = stored_fields(fields, path)
        ds = text_dataset(data, feat, label_vocabulary(data.labels or []))
        ds.feature_names = feat.feature_names
        return ds, feat
    if featurizer is not None:
        raise XMCError(f"{path} holds feature vectors, not text: the featurizer settings apply "
                       "only to .jsonl/.tsv/.csv data")
    from .data import load

    return load(path, label_names_from=label_names_from, labels_from=labels_from,
                zero_based=zero_based), None


def load_validation_data(path: PathLike, train: XMCDataset, featurizer: Featurizer | None, *,
                         fields: TextFields = TextFields(),
                         zero_based: bool | str = "auto") -> XMCDataset:
    """Read validation data in the space of the training data ``train``.

    Text goes through the training featurizer and the training label names; validation labels
    that no training record has are dropped (their count is logged): the model cannot predict
    them. Feature-vector files are read as they are (the trainer checks their dimensions).
    """
    if featurizer is None:
        if is_text_file(path):
            raise XMCError(f"{path} is raw text but the training data holds feature vectors; "
                           "pass validation data in the training data's format")
        from .data import load

        return load(path, zero_based=zero_based)
    space = SimpleNamespace(featurizer=featurizer, label_names=train.label_names or [],
                            num_features=train.num_features, num_labels=train.num_labels)
    return load_for_model(path, space, ignore_extra=True, fields=fields)


def load_for_model(path: PathLike, model: Any, *, ignore_extra: bool = False,
                   labels_required: bool = True,
                   fields: TextFields | Mapping[str, str] | None = None,
                   labels_from: PathLike | None = None,
                   zero_based: bool | str = "auto") -> XMCDataset:
    """Read ``path`` in the feature and label space of ``model`` (a ``LoadedModel``).

    Text files go through the model's featurizer and their labels are matched by name
    (unknown ones are an error, or dropped and counted with ``ignore_extra``); feature files
    must have the model's dimensions (or are cut/padded with ``ignore_extra``). ``fields``:
    :func:`resolve_fields` (``None``: the field names of the model's training file). With
    ``labels_required=False`` (prediction) the labels of the file play no part, and an
    ``.npz`` holding only a feature matrix is accepted. ``labels_from``: the label ``.npz`` of
    an ``.npz`` feature matrix; ``zero_based``: the id base of an svmlight file
    (:func:`xmc_toolkit.data.load`).

    Raises:
        XMCError: a text file for a model trained on feature vectors.
        DataFormatError: bad records, unknown labels, other dimensions.
    """
    from .evaluate import align_dataset

    if is_text_file(path):
        if model.featurizer is None:
            raise XMCError(f"{path} is raw text but this model was trained on feature vectors "
                           "(it has no featurizer); pass data in its feature format, or train "
                           "on text (xmc train --data train.jsonl)")
        fields = resolve_fields(model, fields, path)
        data = read_text(path, text_field=fields.text_field, label_field=fields.label_field,
                         label_sep=fields.label_sep, labels_required=labels_required)
        if not labels_required:  # prediction: the file's labels play no part
            data.labels = None
        return text_dataset(data, model.featurizer, model.label_names or [],
                            ignore_extra=ignore_extra)
    from .data import load
    from .data.formats import is_single_matrix_npz, load_scipy_npz

    if not labels_required and labels_from is None and is_single_matrix_npz(path):
        X = sp.csr_matrix(load_scipy_npz(Path(path), "X"), dtype=np.float32)
        ds = XMCDataset(X, sp.csr_matrix((X.shape[0], model.num_labels), dtype=np.float32))
    else:
        ds = load(path, labels_from=labels_from, zero_based=zero_based)
    if not labels_required:  # prediction: the file's labels play no part
        ds.Y = sp.csr_matrix((ds.num_points, model.num_labels), dtype=np.float32)
    return align_dataset(ds, model.num_features, model.num_labels, ignore_extra=ignore_extra,
                         path=str(path))


def featurize_texts(model: Any, texts: Sequence[str]) -> sp.csr_matrix:
    """The feature rows ``[len(texts), D]`` of raw texts under ``model``'s featurizer.

    Raises:
        XMCError: the model was trained on feature vectors (it has no featurizer).
    """
    if model.featurizer is None:
        raise XMCError("this model was trained on feature vectors and has no featurizer; "
                       "predict from feature rows, or train on text (xmc train --data "
                       "train.jsonl)")
    if isinstance(texts, str):
        raise XMCError("expected a list of texts, got one string: wrap it in [ ]")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise XMCError(f"text {bad[0]} is {type(texts[bad[0]]).__name__}, not a string")
    return model.featurizer.transform(list(texts))
