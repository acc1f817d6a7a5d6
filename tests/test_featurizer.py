"""The text featurizer: equal to scikit-learn's vectorizers, saved without pickle, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer, TfidfVectorizer

from xmc_toolkit.errors import CheckpointError, ConfigError
from xmc_toolkit.featurizer import (
    FEATURIZER_FILE,
    FEATURIZER_TENSORS,
    Featurizer,
    FeaturizerConfig,
)

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "I am the LORD; a God of Israel.",
]


@pytest.mark.parametrize("settings", [
    {},
    {"sublinear_tf": True},
    {"ngram_range": (1, 2), "min_df": 1},
    {"analyzer": "char_wb", "ngram_range": (2, 4)},
    {"analyzer": "char", "ngram_range": (3, 3), "max_df": 0.5},
    {"use_idf": False, "row_norm": "l1", "lowercase": False},
    {"max_features": 5, "min_df": 1},
    {"token_pattern": r"(?u)\b\w\w+\b", "strip_accents": "unicode"},
])
def test_equals_sklearn_tfidf_vectorizer(settings):
    cfg = FeaturizerConfig(**settings)
    feat = Featurizer.fit(TEXTS, cfg)
    ref = TfidfVectorizer(
        min_df=cfg.min_df, max_df=cfg.max_df, max_features=cfg.max_features or None,
        sublinear_tf=cfg.sublinear_tf, use_idf=cfg.use_idf,
        norm=None if cfg.row_norm == "none" else cfg.row_norm, **cfg.vectorizer_params())
    R = ref.fit_transform(TEXTS)
    X = feat.transform(TEXTS)
    assert X.shape == R.shape and X.dtype == np.float32 and X.has_sorted_indices
    assert feat.vocabulary == ref.get_feature_names_out().tolist()
    np.testing.assert_allclose(X.toarray(), R.toarray(), rtol=1e-6, atol=1e-7)


def test_hashing_equals_sklearn_hashing_plus_tfidf():
    cfg = FeaturizerConfig(hashing=64, min_df=1, sublinear_tf=True)
    feat = Featurizer.fit(TEXTS, cfg)
    hv = HashingVectorizer(n_features=64, alternate_sign=False, norm=None,
                           **cfg.vectorizer_params())
    R = TfidfTransformer(sublinear_tf=True).fit_transform(hv.transform(TEXTS))
    X = feat.transform(TEXTS)
    assert feat.vocabulary is None and X.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(X.toarray(), R.toarray(), rtol=1e-6, atol=1e-7)
    # min_df with hashing: columns of rarer n-grams are dropped
    kept = Featurizer.fit(TEXTS, FeaturizerConfig(hashing=64, min_df=3)).transform(TEXTS)
    assert kept.nnz < X.nnz and set(kept.indices) <= set(X.indices)


@pytest.mark.parametrize("settings", [{}, {"hashing": 128}, {"use_idf": False}])
def test_save_load_round_trip_without_pickle(tmp_path, settings):
    feat = Featurizer.fit(TEXTS, FeaturizerConfig(min_df=1, **settings))
    feat.save(tmp_path)
    meta = json.loads((tmp_path / FEATURIZER_FILE).read_text())  # plain JSON
    assert meta["num_features"] == feat.num_features
    assert (tmp_path / FEATURIZER_TENSORS).exists() == (feat.idf is not None)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))
    back = Featurizer.load(tmp_path)
    new = ["God saw the earth", "nothing known here", "LIGHT light"]
    np.testing.assert_array_equal(back.transform(new).toarray(), feat.transform(new).toarray())
    assert back.config == feat.config


def test_unknown_words_give_an_empty_row():
    feat = Featurizer.fit(TEXTS)
    X = feat.transform(["zebra xylophone", "God"])
    assert X[0].nnz == 0 and X[1].nnz == 1 and X[1].data[0] == pytest.approx(1.0)


def test_config_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        FeaturizerConfig(analyzer="words", ngram_range=(2, 1), min_df=0, max_df=2.0,
                         row_norm="l3").validate()
    assert len(info.value.problems) == 5
    with pytest.raises(ConfigError, match="max_features applies only with a vocabulary"):
        FeaturizerConfig(hashing=16, max_features=3).validate()
    with pytest.raises(ConfigError, match="lower --min-df"):
        Featurizer.fit(TEXTS, FeaturizerConfig(min_df=100))
    with pytest.raises(TypeError, match="list of texts"):
        Featurizer.fit(TEXTS).transform("one string")


def test_corrupt_files_raise_checkpoint_error(tmp_path):
    Featurizer.fit(TEXTS).save(tmp_path)
    (tmp_path / FEATURIZER_TENSORS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="retrain or restore"):
        Featurizer.load(tmp_path)
    (tmp_path / FEATURIZER_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        Featurizer.load(tmp_path)
