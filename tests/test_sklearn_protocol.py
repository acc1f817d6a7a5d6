"""XMCModel under the scikit-learn estimator protocol: get/set_params, clone, Pipeline, score."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MultiLabelBinarizer
from test_cli_text import make_texts

from xmc_toolkit.errors import ConfigError
from xmc_toolkit.model import XMCModel

SMALL = dict(epochs=6, batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=5,
             dropout=0.0, ks=(1, 3), device="cpu", ensemble=1)


def test_get_set_params_and_clone():
    m = XMCModel(featurizer={"min_df": 1}, epochs=3, hidden=(64,))
    p = m.get_params()
    assert p["epochs"] == 3 and p["hidden"] == (64,) and p["featurizer"] == {"min_df": 1}
    assert p["loss"] == "auto" and "lr" in p  # every TrainConfig field
    c = clone(m)
    assert c is not m and c.get_params() == p and c.config == m.config
    assert m.set_params(epochs=5, lr=0.01) is m and m.config.epochs == 5 and m.config.lr == 0.01
    with pytest.raises(ConfigError, match="unknown parameter 'epoch'"):
        m.set_params(epoch=1)
    with pytest.raises(ConfigError, match="loss="):
        m.set_params(loss="nope")
    assert m.config.loss == "auto"  # a refused change leaves the model as it was


def test_last_step_of_a_pipeline_behind_a_vectorizer():
    texts, labels = make_texts(160, 0)
    test_texts, test_labels = make_texts(40, 1)
    mlb = MultiLabelBinarizer().fit(labels)
    Y, Y_test = mlb.transform(labels), mlb.transform(test_labels)
    pipe = make_pipeline(TfidfVectorizer(), XMCModel(**SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no protocol warning from scikit-learn
        pipe.fit(texts, Y)
        pred = pipe.predict(test_texts)
        score = pipe.score(test_texts, Y_test)
    assert len(pred) == 40 and all(len(p) == 5 for p in pred)
    hits = np.mean([Y_test[i, p[0]] for i, p in enumerate(pred)])
    assert score == pytest.approx(hits) and score > 0.8
    pipe.set_params(xmcmodel__epochs=1)
    assert clone(pipe).get_params()["xmcmodel__epochs"] == 1
