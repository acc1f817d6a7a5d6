"""Text -> sparse feature rows: TF-IDF over word or character n-grams, fitted on training texts.

The settings are scikit-learn's ``TfidfVectorizer`` ones (``analyzer``, ``ngram_range``,
``min_df``, ``max_df``, ``max_features``, ``sublinear_tf``, ``use_idf``, ``lowercase``,
``token_pattern``, ``strip_accents``, the norm as ``row_norm``), and tokens are counted by
scikit-learn's ``CountVectorizer`` (or ``HashingVectorizer`` with ``hashing=N`` columns, for
vocabularies too large to keep). Weights: ``tf`` (or ``1 + ln tf`` with ``sublinear_tf``) times
the smooth idf ``ln((1 + N) / (1 + df)) + 1`` of the training texts, rows normalized.

A fitted :class:`Featurizer` is saved without pickle: ``featurizer.json`` (settings and the
vocabulary in column order) and ``featurizer.safetensors`` (the idf, float32 ``[D]``), so a
model directory is readable by any safetensors/JSON reader. Pure: no printing, no global state.

Example::

    feat = Featurizer.fit(train_texts, FeaturizerConfig(ngram_range=(1, 2)))
    X = feat.transform(["some document"])          # csr float32 [1, D]
    feat.save("model_dir"); feat = Featurizer.load("model_dir")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .config import ConfigBase
from .errors import CheckpointError, ConfigError

__all__ = ["FeaturizerConfig", "Featurizer", "FEATURIZER_FILE", "FEATURIZER_TENSORS"]

FEATURIZER_FILE = "featurizer.json"
FEATURIZER_TENSORS = "featurizer.safetensors"
ANALYZERS = ("word", "char", "char_wb")
ROW_NORMS = ("l2", "l1", "none")
STRIP_ACCENTS = ("none", "unicode", "ascii")
_FORMAT = "xmc-toolkit-featurizer"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class FeaturizerConfig(ConfigBase):
    """Settings of the text featurizer (``xmc train --data train.jsonl`` flags).

    The defaults were chosen on a validation split of the kjv-strongs training file
    (docs/data-formats.md, "Text data").
    """

    analyzer: str = field(default="word", metadata=_h(
        "n-grams of words (word), of characters (char) or of characters inside word"
        " boundaries (char_wb) (--analyzer)"))
    ngram_range: tuple[int, ...] = field(default=(1, 1), metadata=_h(
        "smallest and largest n-gram length, e.g. 1,2 for words and word pairs, 2,5 for"
        " characters (--ngram-range)"))
    min_df: int = field(default=2, metadata=_h(
        "keep n-grams found in at least this many training texts (--min-df)"))
    max_df: float = field(default=1.0, metadata=_h(
        "drop n-grams found in more than this fraction of the training texts (--max-df)"))
    max_features: int = field(default=0, metadata=_h(
        "keep only the most frequent N n-grams; 0: no limit (--max-features)"))
    sublinear_tf: bool = field(default=True, metadata=_h(
        "weight a term by 1 + ln(count) instead of its count (--sublinear-tf/--no-sublinear-tf)"))
    use_idf: bool = field(default=True, metadata=_h(
        "multiply by the training texts' smooth idf ln((1+N)/(1+df))+1 (--use-idf/--no-use-idf)"))
    row_norm: str = field(default="l2", metadata=_h(
        "normalize each row: l2 | l1 | none (--row-norm)"))
    lowercase: bool = field(default=True, metadata=_h(
        "lower-case texts before tokenizing (--lowercase/--no-lowercase)"))
    token_pattern: str = field(default=r"(?u)\b\w+\b", metadata=_h(
        "regular expression of a word token (analyzer word); the default keeps one-letter words,"
        " unlike scikit-learn's (?u)\\b\\w\\w+\\b (--token-pattern)"))
    strip_accents: str = field(default="none", metadata=_h(
        "remove accents: none | unicode | ascii (--strip-accents)"))
    hashing: int = field(default=0, metadata=_h(
        "hash n-grams into this many columns instead of keeping a vocabulary (scikit-learn's"
        " HashingVectorizer; min_df/max_df still apply, max_features does not); 0: keep a"
        " vocabulary (--hashing)"))

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.analyzer not in ANALYZERS:
            p.append(f"analyzer={self.analyzer!r} is unknown; use one of {', '.join(ANALYZERS)}"
                     " (--analyzer)")
        ng = tuple(self.ngram_range)
        if len(ng) != 2 or not all(isinstance(v, int) for v in ng) or ng[0] < 1 or ng[1] < ng[0]:
            p.append(f"ngram_range={list(ng)} must be two integers 1 <= min <= max, e.g. 1,2"
                     " (--ngram-range)")
        if self.min_df < 1:
            p.append(f"min_df={self.min_df} must be >= 1 (--min-df)")
        if not 0.0 < self.max_df <= 1.0:
            p.append(f"max_df={self.max_df} must be a fraction in (0, 1] (--max-df)")
        if self.max_features < 0:
            p.append(f"max_features={self.max_features} must be >= 0 (--max-features)")
        if self.row_norm not in ROW_NORMS:
            p.append(f"row_norm={self.row_norm!r} is unknown; use one of {', '.join(ROW_NORMS)}"
                     " (--row-norm)")
        if self.strip_accents not in STRIP_ACCENTS:
            p.append(f"strip_accents={self.strip_accents!r} is unknown; use one of "
                     f"{', '.join(STRIP_ACCENTS)} (--strip-accents)")
        if self.hashing < 0:
            p.append(f"hashing={self.hashing} must be >= 0 (--hashing)")
        if self.hashing and self.max_features:
            p.append("max_features applies only with a vocabulary; drop --max-features or "
                     "--hashing")
        if self.analyzer == "word":
            import re

            try:
                re.compile(self.token_pattern)
            except re.error as exc:
                p.append(f"token_pattern={self.token_pattern!r} is not a regular expression "
                         f"({exc}) (--token-pattern)")
        return p

    def vectorizer_params(self) -> dict[str, Any]:
        """The keyword arguments shared by ``CountVectorizer`` and ``HashingVectorizer``."""
        return {"analyzer": self.analyzer, "ngram_range": tuple(self.ngram_range),
                "lowercase": self.lowercase,
                "token_pattern": self.token_pattern if self.analyzer == "word" else None,
                "strip_accents": None if self.strip_accents == "none" else self.strip_accents,
                "dtype": np.float64}


class Featurizer:
    """A fitted text featurizer: ``transform(texts) -> csr float32 [N, D]``.

    Build one with :meth:`fit` (training texts) or :meth:`load` (a model directory).

    Attributes:
        config: the :class:`FeaturizerConfig`.
        vocabulary: the ``D`` n-grams in column order, or ``None`` with hashing.
        idf: float32 ``[D]`` (0 for hashed columns below ``min_df`` / above ``max_df``), or
            ``None`` without idf and without a hashed-column filter.
    """

    def __init__(self, config: FeaturizerConfig, vocabulary: list[str] | None,
                 idf: np.ndarray | None, num_features: int) -> None:
        self.config = config.validate()
        self.vocabulary = vocabulary
        self.idf = None if idf is None else np.asarray(idf, dtype=np.float32).reshape(-1)
        self.num_features = int(num_features)
        if vocabulary is not None and len(vocabulary) != self.num_features:
            raise ConfigError(f"{len(vocabulary)} vocabulary entries for {num_features} features")
        if self.idf is not None and self.idf.shape[0] != self.num_features:
            raise ConfigError(f"idf has {self.idf.shape[0]} entries for {num_features} features")
        self._counter: Any = None
        # where the training file kept its parts ({"text_field", "label_field", "label_sep"}):
        # eval/predict read files of the same layout without the flags again; None = defaults
        self.fields: dict[str, str] | None = None

    # -- fitting ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, texts: Sequence[str], config: FeaturizerConfig | None = None) -> "Featurizer":
        """Fit the vocabulary and idf on training texts.

        Raises:
            ConfigError: invalid settings, or no n-gram survives ``min_df`` / ``max_df``.
        """
        cfg = (config or FeaturizerConfig()).validate()
        n = len(texts)
        if n == 0:
            raise ConfigError("no training texts to fit the featurizer on")
        if cfg.hashing:
            from sklearn.feature_extraction.text import HashingVectorizer

            hv = HashingVectorizer(n_features=cfg.hashing, alternate_sign=False, norm=None,
                                   **cfg.vectorizer_params())
            counts = sp.csr_matrix(hv.transform(texts))
            df = np.bincount(counts.indices, minlength=cfg.hashing)[: cfg.hashing]
            keep = (df >= cfg.min_df) & (df <= cfg.max_df * n)
            if not keep.any():
                raise ConfigError(_nothing_left(cfg, n))
            idf = _smooth_idf(df, n) if cfg.use_idf else np.ones(cfg.hashing)
            idf = np.where(keep, idf, 0.0)
            return cls(cfg, None, None if keep.all() and not cfg.use_idf else idf, cfg.hashing)
        from sklearn.feature_extraction.text import CountVectorizer

        cv = CountVectorizer(min_df=cfg.min_df, max_df=float(cfg.max_df),
                             max_features=cfg.max_features or None, **cfg.vectorizer_params())
        try:
            counts = sp.csr_matrix(cv.fit_transform(texts))
        except ValueError as exc:  # "After pruning, no terms remain" / "empty vocabulary"
            raise ConfigError(f"{_nothing_left(cfg, n)} ({exc})") from None
        vocab = [""] * len(cv.vocabulary_)
        for term, j in cv.vocabulary_.items():
            vocab[j] = term
        df = np.bincount(counts.indices, minlength=len(vocab))
        idf = _smooth_idf(df, n) if cfg.use_idf else None
        return cls(cfg, vocab, idf, len(vocab))

    # -- transforming -----------------------------------------------------------------------
    def _counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        if self._counter is None:
            if self.vocabulary is None:
                from sklearn.feature_extraction.text import HashingVectorizer

                self._counter = HashingVectorizer(
                    n_features=self.num_features, alternate_sign=False, norm=None,
                    **self.config.vectorizer_params())
            else:
                from sklearn.feature_extraction.text import CountVectorizer

                self._counter = CountVectorizer(
                    vocabulary={t: j for j, t in enumerate(self.vocabulary)},
                    **self.config.vectorizer_params())
        return sp.csr_matrix(self._counter.transform(list(texts)), dtype=np.float64)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Feature rows of ``texts``: float32 CSR ``[len(texts), D]``, sorted indices.

        A text with no known n-gram gives an empty row.
        """
        if isinstance(texts, str):
            raise TypeError("transform takes a list of texts, not one string: wrap it in [ ]")
        X = self._counts(texts)
        if self.config.sublinear_tf:
            np.log(X.data, out=X.data)
            X.data += 1.0
        if self.idf is not None:
            X.data *= self.idf[X.indices]
            X.eliminate_zeros()  # hashed columns filtered out by min_df / max_df
        if self.config.row_norm != "none":
            rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
            if self.config.row_norm == "l2":
                norms = np.sqrt(np.bincount(rows, weights=X.data ** 2, minlength=X.shape[0]))
            else:
                norms = np.bincount(rows, weights=np.abs(X.data), minlength=X.shape[0])
            norms[norms == 0] = 1.0
            X.data /= norms[rows]
        out = sp.csr_matrix(X, dtype=np.float32)
        out.sort_indices()
        return out

    @property
    def feature_names(self) -> list[str] | None:
        """The ``D`` n-grams in column order (``None`` with hashing)."""
        return self.vocabulary

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write ``featurizer.json`` (+ ``featurizer.safetensors`` with the idf) into a folder,
        each file atomically; returns the names written."""
        from ._fileio import atomic_write, atomic_write_text, save_safetensors

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "version": 1, "config": self.config.to_dict(),
                "num_features": self.num_features, "has_idf": self.idf is not None,
                "vocabulary": self.vocabulary}
        if self.fields is not None:
            meta["fields"] = dict(self.fields)
        written = []
        if self.idf is not None:
            idf = np.ascontiguousarray(self.idf)
            atomic_write(d / FEATURIZER_TENSORS,
                         lambda p: save_safetensors({"idf": idf}, p, numpy=True))
            written.append(FEATURIZER_TENSORS)
        else:  # no stale idf of an earlier featurizer
            (d / FEATURIZER_TENSORS).unlink(missing_ok=True)
        atomic_write_text(d / FEATURIZER_FILE, json.dumps(meta, ensure_ascii=False))
        return [FEATURIZER_FILE, *written]

    @classmethod
    def exists(cls, directory: str | os.PathLike[str]) -> bool:
        """Whether ``directory`` holds a saved featurizer."""
        return (Path(directory) / FEATURIZER_FILE).is_file()

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Featurizer":
        """Read a featurizer written by :meth:`save`.

        Raises:
            CheckpointError: the files are missing or corrupt.
        """
        d = Path(directory)
        try:
            meta = json.loads((d / FEATURIZER_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {_FORMAT!r}")
            config = FeaturizerConfig.from_dict(meta["config"])
            idf = None
            if meta.get("has_idf"):
                from safetensors.numpy import load_file

                idf = load_file(str(d / FEATURIZER_TENSORS))["idf"]
            feat = cls(config, meta.get("vocabulary"), idf, int(meta["num_features"]))
            fields = meta.get("fields")
            if fields is not None:
                if not (isinstance(fields, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in fields.items())):
                    raise ValueError(f"fields is {fields!r}, expected an object of strings")
                feat.fields = fields
            return feat
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"{str(d)!r}: the featurizer ({FEATURIZER_FILE}, "
                                  f"{FEATURIZER_TENSORS}) is missing or corrupt ({exc}); retrain "
                                  "or restore the model directory") from None
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{str(d / FEATURIZER_TENSORS)!r} is not readable ({exc}); "
                                  "retrain or restore the model directory") from None

    def __repr__(self) -> str:
        kind = f"hashing={self.num_features}" if self.vocabulary is None else (
            f"vocabulary={self.num_features}")
        return (f"Featurizer({kind}, analyzer={self.config.analyzer!r}, "
                f"ngram_range={tuple(self.config.ngram_range)}, "
                f"sublinear_tf={self.config.sublinear_tf})")


def _smooth_idf(df: np.ndarray, n: int) -> np.ndarray:
    """``ln((1 + n) / (1 + df)) + 1`` (scikit-learn's ``smooth_idf=True``), float64 ``[D]``."""
    return np.log((1.0 + n) / (1.0 + df.astype(np.float64))) + 1.0


def _nothing_left(cfg: FeaturizerConfig, n: int) -> str:
    return (f"no n-gram of the {n} training texts is kept (min_df={cfg.min_df}, "
            f"max_df={cfg.max_df}); lower --min-df or raise --max-df")
