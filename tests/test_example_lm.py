"""Smoke test of examples/lm_midx.py: a few steps with tiny sizes, every mode."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_midx.py"


def _load():
    spec = importlib.util.spec_from_file_location("lm_midx_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_corpus_is_clustered_and_in_range():
    ex = _load()
    cfg = ex.LMConfig(vocab=300, clusters=10, num_seqs=50, seq_len=8)
    data = ex.make_corpus(cfg)
    assert data.shape == (50, 9)
    assert int(data.min()) >= 0 and int(data.max()) < 300
    # Zipf: the most frequent token is much more frequent than the median one
    counts = data.flatten().bincount(minlength=300).float()
    assert counts.max() > 5 * counts.median().clamp(min=1)


def test_oracle_law_is_a_distribution_and_matches_the_sampler():
    ex = _load()
    cfg = ex.LMConfig(vocab=50, clusters=5, num_seqs=4000, seq_len=4, seed=3)
    tokens, states, law = ex._generate(cfg)
    assert np.allclose(law.sum(1), 1.0)
    # empirical next-token law after topic 0 vs the closed form
    s, y = states[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
    emp = np.bincount(y[s == 0], minlength=50) / (s == 0).sum()
    assert np.abs(emp - law[0]).max() < 0.03


def test_example_runs_every_mode(tmp_path, capsys):
    ex = _load()
    pytest.importorskip("xmc_toolkit.sampling.midx")
    out = tmp_path / "res.json"
    argv = ["--vocab", "400", "--clusters", "10", "--num-seqs", "80", "--seq-len", "6",
            "--dim", "8", "--batch", "4", "--steps", "4", "--samples", "16", "--refresh", "2",
            "--codewords", "4", "--eval-rows", "50", "--chunk-size", "128", "--json", str(out)]
    results = ex.main(argv)
    assert set(results) == {"full", "midx", "uniform", "oracle"}
    for name, m in results.items():
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1
        assert 0.0 <= m["R@10"] <= 1.0
        if name != "oracle":
            assert math.isfinite(m["final_train_loss"])
    saved = json.loads(out.read_text())
    assert saved["results"]["midx"]["ppl"] == results["midx"]["ppl"]
    assert "test ppl" in capsys.readouterr().out


def test_example_sparse_output_table():
    ex = _load()
    pytest.importorskip("xmc_toolkit.sampling.midx")
    argv = ["--vocab", "300", "--clusters", "6", "--num-seqs", "40", "--seq-len", "5",
            "--dim", "8", "--batch", "4", "--steps", "3", "--samples", "8", "--refresh", "2",
            "--codewords", "4", "--eval-rows", "30", "--chunk-size", "64", "--sparse-out",
            "--modes", "midx"]
    results = ex.main(argv)
    assert set(results) == {"midx", "oracle"}
    assert math.isfinite(results["midx"]["ppl"])
