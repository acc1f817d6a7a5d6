"""From raw text to label names: `xmc train/eval/predict` on JSONL/TSV, and `XMCModel` on texts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import xmc
from xmc_toolkit.model import XMCModel

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--epochs", "10", "--batch-size", "16", "--hidden", "32", "--dim", "16", "--lr", "0.02",
         "--warmup-steps", "5", "--dropout", "0", "--ks", "1,3", "--device", "cpu",
         "--ensemble", "1", "--no-progress", "--min-df", "1"]
TOPICS = {
    "sea": "ship wave sailor harbour",
    "war": "sword battle army shield",
    "farm": "wheat field plough harvest",
    "city": "gate wall street market",
    "music": "harp song psalm trumpet",
    "home": "house door table bread",
}
FILLER = "and the of to in that he it was for on".split()


def make_texts(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """``n`` texts, each about one or two topics (its labels), with filler words."""
    g = np.random.default_rng(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        labs = sorted(g.choice(names, size=int(g.integers(1, 3)), replace=False).tolist())
        words = [w for lab in labs for w in g.choice(TOPICS[lab].split(), 3).tolist()]
        words += g.choice(FILLER, 4).tolist()
        g.shuffle(words)
        texts.append(" ".join(words))
        labels.append(labs)
    return texts, labels


def write_jsonl(path: Path, texts: list[str], labels: list[list[str]] | None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            rec = {"id": f"doc{i}", "text": t}
            if labels is not None:
                rec["labels"] = labels[i]
            fh.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    tr, trl = make_texts(160, 0)
    te, tel = make_texts(40, 1)
    write_jsonl(root / "train.jsonl", tr, trl)
    write_jsonl(root / "test.jsonl", te, tel)
    write_jsonl(root / "test_nolabels.jsonl", te, None)
    write_jsonl(root / "test_unknown.jsonl", te, [labs + ["dragons"] for labs in tel])
    with open(root / "train.tsv", "w") as fh:
        fh.write("text\ttags\n")
        fh.writelines(f"{t}\t{'|'.join(labs)}\n" for t, labs in zip(tr, trl))
    return root


@pytest.fixture(scope="module")
def trained(files):
    out = files / "run"
    r = CliRunner().invoke(xmc, ["train", "--data", str(files / "train.jsonl"), "--val",
                                 str(files / "test.jsonl"), "--out", str(out), *FLAGS])
    assert r.exit_code == 0, r.output
    assert "featurized 160 texts" in r.output and "6 labels" in r.output
    return out


def test_text_train_eval_predict(files, trained, tmp_path):
    runner = CliRunner()
    assert (trained / "featurizer.json").is_file()
    assert json.loads((trained / "labels.json").read_text())["label_names"] == sorted(TOPICS)
    r = runner.invoke(xmc, ["eval", "--model", str(trained), "--data",
                            str(files / "test.jsonl"), "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["P@1"] > 0.8
    # predictions from a JSONL file without labels, to a file and to standard output
    pred = tmp_path / "pred.jsonl"
    r = runner.invoke(xmc, ["predict", "--model", str(trained), "--data",
                            str(files / "test_nolabels.jsonl"), "--topk", "2", "--out",
                            str(pred)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(rows) == 40 and all(set(x["labels"]) <= set(TOPICS) for x in rows)
    r = runner.invoke(xmc, ["predict", "--model", str(trained), "--data",
                            str(files / "test_nolabels.jsonl"), "--topk", "2"])
    assert r.exit_code == 0 and [json.loads(x) for x in r.output.splitlines()] == rows
    # --text, repeatable
    r = runner.invoke(xmc, ["predict", "--model", str(trained), "--text", "ship wave sailor",
                            "--text", "harp song psalm", "--topk", "1"])
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.output.splitlines()]
    assert [x["labels"] for x in out] == [["sea"], ["music"]]
    assert isinstance(out[0]["scores"][0], float) and isinstance(out[0]["ids"][0], int)


def test_text_from_stdin_streams_one_line_per_text(trained):
    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", "-", "--topk",
                                 "2"], input="sword battle army\nwheat field harvest\n")
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.output.splitlines()]
    assert len(out) == 2 and out[0]["labels"][0] == "war" and out[1]["labels"][0] == "farm"
    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", "-"],
                           input="ship\n\n")
    assert r.exit_code == 2 and "<stdin>:2: empty line" in r.output


@pytest.mark.slow
def test_stdin_pipeline_in_a_real_process(trained):
    """A real pipe: the first answer arrives before standard input is closed."""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "predict", "--model", str(trained),
                          "--text", "-", "--topk", "1"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
                         text=True)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("harp song psalm\n")
    p.stdin.flush()
    first = json.loads(p.stdout.readline())  # would hang if the output waited for EOF
    p.stdin.write("gate wall street\n")
    p.stdin.close()
    rest = p.stdout.read()
    assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    assert first["labels"] == ["music"] and json.loads(rest)["labels"] == ["city"]


def test_unknown_test_labels_error_or_drop(files, trained):
    runner = CliRunner()
    r = runner.invoke(xmc, ["eval", "--model", str(trained), "--data",
                            str(files / "test_unknown.jsonl")])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0
    assert "test_unknown.jsonl:1: label 'dragons' is not one of the model's 6 labels" in r.output
    r = runner.invoke(xmc, ["eval", "--model", str(trained), "--data",
                            str(files / "test_unknown.jsonl"), "--ignore-extra", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["P@1"] > 0.8
    assert "dropped 40 label assignments unknown to the model" in " ".join(r.stderr.split())


def test_bad_text_input_is_one_line_exit_2(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ship", "labels": ["sea"]}\n{"text": "x", "labels": [1]}\n')
    r = CliRunner().invoke(xmc, ["train", "--data", str(bad), "--out", str(tmp_path / "m"),
                                 *FLAGS])
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: {bad}:2: label 1 in field 'labels' is int; labels must "
                                'be strings (write "1" instead of 1)')


def test_tsv_training_with_other_field_names(files, tmp_path):
    out = tmp_path / "tsv"
    r = CliRunner().invoke(xmc, ["train", "--data", str(files / "train.tsv"), "--label-field",
                                 "tags", "--out", str(out), "--analyzer", "char_wb",
                                 "--ngram-range", "2,3", *FLAGS, "--epochs", "3"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "featurizer.json").read_text())["config"]
    assert cfg["analyzer"] == "char_wb" and cfg["ngram_range"] == [2, 3]
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data",
                                 str(files / "test.jsonl"), "--json", "--k", "1"])
    assert r.exit_code == 0, r.output


def test_featurizer_flags_need_text_and_text_needs_a_text_model(files, trained, tmp_path):
    from xmc_toolkit.data import XMCDataset, save
    from conftest import make_tiny_problem

    X, Y = make_tiny_problem(40)
    save(XMCDataset(X, Y), tmp_path / "vec.txt")
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "vec.txt"), "--out",
                                 str(tmp_path / "m"), "--ngram-range", "1,2"])
    assert r.exit_code == 2 and "--ngram-range apply only to raw-text training data" in r.output
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "vec.txt"), "--out",
                                 str(tmp_path / "vm"), *FLAGS[:-2], "--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(xmc, ["eval", "--model", str(tmp_path / "vm"), "--data",
                                 str(files / "test.jsonl")])
    assert r.exit_code == 2 and "has no featurizer" in r.output
    r = CliRunner().invoke(xmc, ["predict", "--model", str(tmp_path / "vm"), "--text", "ship"])
    assert r.exit_code == 2 and "has no featurizer" in r.output


def test_resume_a_text_run(files, tmp_path):
    out = tmp_path / "res"
    args = ["train", "--data", str(files / "train.jsonl"), "--out", str(out), *FLAGS,
            "--epochs", "2", "--ngram-range", "1,2"]
    r = CliRunner().invoke(xmc, [*args, "--max-steps", "5"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(xmc, ["train", "--resume", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    feat = json.loads((out / "featurizer.json").read_text())
    assert feat["config"]["ngram_range"] == [1, 2]


def test_xmcmodel_on_texts(tmp_path):
    tr, trl = make_texts(160, 0)
    te, tel = make_texts(40, 1)
    model = XMCModel(epochs=10, batch_size=16, hidden=(32,), dim=16, lr=0.02, warmup_steps=5,
                     dropout=0.0, ks=(1, 3), device="cpu", ensemble=1,
                     featurizer={"min_df": 1})
    model.fit(tr, trl, X_val=te, Y_val=tel)
    pred = model.predict(te, k=2)
    assert len(pred) == 40 and all(len(p) == 2 and set(p) <= set(TOPICS) for p in pred)
    hits = np.mean([p[0] in labs for p, labs in zip(pred, tel)])
    assert hits > 0.8
    assert model.evaluate(te, tel, ks=(1,))["P@1"] == pytest.approx(hits)
    assert model.encode(te[:3]).shape == (3, 16)
    model.save(tmp_path / "m")
    back = XMCModel.load(tmp_path / "m", device="cpu")
    assert back.predict(te, k=2) == pred
    assert back.featurizer_config.min_df == 1
    with pytest.raises(Exception, match="label-name lists"):
        XMCModel(epochs=1).fit(tr, np.zeros((160, 6)))


def test_cli_reference_lists_every_featurizer_flag():
    import dataclasses

    from xmc_toolkit.featurizer import FeaturizerConfig

    doc = (REPO / "docs" / "cli.md").read_text()
    missing = [f.name for f in dataclasses.fields(FeaturizerConfig)
               if f"`--{f.name.replace('_', '-')}" not in doc]
    assert not missing, f"docs/cli.md lacks {missing}; run python scripts/gen_cli_table.py"


def test_featurizer_and_train_flags_do_not_collide():
    import dataclasses

    from xmc_toolkit.featurizer import FeaturizerConfig
    from xmc_toolkit.train import TrainConfig

    a = {f.name for f in dataclasses.fields(FeaturizerConfig)}
    b = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not a & b


def test_export_instances_of_texts(files, trained, tmp_path):
    out = tmp_path / "q.npy"
    r = CliRunner().invoke(xmc, ["export", "--model", str(trained), "--what", "instances",
                                 "--data", str(files / "test_nolabels.jsonl"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (40, 16)


def test_label_names_for_feature_data(tmp_path):
    from conftest import make_tiny_problem

    from xmc_toolkit.data import XMCDataset, save

    X, Y = make_tiny_problem(60)
    save(XMCDataset(X, Y), tmp_path / "train.txt")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"tag {j}\n" for j in range(Y.shape[1])))
    out = tmp_path / "m"
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "train.txt"), "--out",
                                 str(out), "--label-names", str(names), *FLAGS[:-2],
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "labels.json").read_text())["label_names"][2] == "tag 2"
    r = CliRunner().invoke(xmc, ["predict", "--model", str(out), "--data",
                                 str(tmp_path / "train.txt"), "--topk", "2"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout.splitlines()[0])
    assert all(name.startswith("tag ") for name in first["labels"])
    names.write_text("only one\n")
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "train.txt"), "--out",
                                 str(out), "--label-names", str(names), *FLAGS[:-2]])
    assert r.exit_code == 2 and "1 label names but the data set has 6 labels" in r.output


def test_threads_flag(trained):
    import torch

    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", "ship",
                                     "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_info(trained):
    r = CliRunner().invoke(xmc, ["info", str(trained), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["architecture"]["hidden"] == [32] and d["architecture"]["members"] == 1
    assert d["architecture"]["num_labels"] == 6 and d["labels"]["named"]
    assert d["training"]["num_points"] == 160 and d["featurizer"]["kind"] == "vocabulary"
    assert d["disk"]["files"]["featurizer.json"] > 0 and d["memory"]["parameters"] > 0
    assert "P@1" in d["metrics"]["validation"]
    r = CliRunner().invoke(xmc, ["info", str(trained)])
    assert r.exit_code == 0 and "hidden [32]" in r.output and "validation   epoch" in r.output
    r = CliRunner().invoke(xmc, ["info", str(trained / "nope")])
    assert r.exit_code == 2 and "is not a model directory" in r.output


def test_probabilities_and_threshold(files, trained, tmp_path):
    import torch

    from xmc_toolkit.evaluate import log_partition
    from xmc_toolkit.inputs import featurize_texts
    from xmc_toolkit.train import load_model_dir

    texts = ["ship wave sailor", "harp song and sword battle"]
    m = load_model_dir(trained, device="cpu")
    X = featurize_texts(m, texts)
    # log_partition equals the log-sum-exp of the full score matrix, also across chunks
    from xmc_toolkit.batching import csr_to_bag

    q = m.network(*csr_to_bag(m.preprocessor.transform(X), device=torch.device("cpu"))).float()
    full = q @ m.network.labels.label_embeddings().T + m.network.labels.bias_vector()
    np.testing.assert_allclose(log_partition(m, X, chunk_size=4),
                               torch.logsumexp(full.double(), 1).detach().numpy(), rtol=1e-5)
    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", texts[0],
                                 "--text", texts[1], "--topk", "6", "--probability", "softmax"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    for row in rows:  # all 6 labels: the shares sum to 1 and follow the scores
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", texts[0],
                                 "--text", texts[1], "--topk", "6", "--threshold", "0.3"])
    kept = [json.loads(x) for x in r.stdout.splitlines()]
    for full_row, row in zip(rows, kept):
        assert row["labels"] == [n for n, p in zip(full_row["labels"],
                                                    full_row["probabilities"]) if p >= 0.3]
    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--text", texts[0],
                                 "--probability", "sigmoid", "--topk", "2"])
    row = json.loads(r.stdout)
    assert row["probabilities"] == pytest.approx(1 / (1 + np.exp(-np.array(row["scores"]))),
                                                 rel=1e-5)
    model = XMCModel.load(trained, device="cpu")
    ids, probs = model.predict_proba(texts, k=6)
    assert probs.shape == (2, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert model.predict(texts, k=6, threshold=0.3) == [r_["labels"] for r_ in kept]


def test_predict_to_a_csr_npz(files, trained, tmp_path):
    import scipy.sparse as sp

    from xmc_toolkit.data.predictions import read_predictions

    r = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--data",
                                 str(files / "test.jsonl"), "--topk", "3", "--out",
                                 str(tmp_path / "p.npz")])
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(xmc, ["predict", "--model", str(trained), "--data",
                                  str(files / "test.jsonl"), "--topk", "3"])
    rows = [json.loads(x) for x in r2.stdout.splitlines()]
    M = sp.load_npz(tmp_path / "p.npz")
    assert M.shape == (40, 6) and M.nnz == 120
    ids, _ = read_predictions(tmp_path / "p.npz")
    assert ids.tolist() == [row["ids"] for row in rows]


def test_npz_pairs_under_any_names(tmp_path):
    import scipy.sparse as sp
    from conftest import make_tiny_problem

    from xmc_toolkit.data import load

    X, Y = make_tiny_problem(60)
    sp.save_npz(tmp_path / "features.npz", X)  # PECOS / scipy: one matrix a file
    sp.save_npz(tmp_path / "targets.npz", Y)
    ds = load(tmp_path / "features.npz", labels_from=tmp_path / "targets.npz")
    assert (ds.X != X).nnz == 0 and (ds.Y != Y).nnz == 0
    with pytest.raises(Exception, match="holds one scipy sparse matrix"):
        load(tmp_path / "features.npz")
    out = tmp_path / "m"
    r = CliRunner().invoke(xmc, ["train", "--data", str(tmp_path / "features.npz"), "--labels",
                                 str(tmp_path / "targets.npz"), "--out", str(out), *FLAGS[:-2],
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data",
                                 str(tmp_path / "features.npz"), "--labels",
                                 str(tmp_path / "targets.npz"), "--json", "--k", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_rows_evaluated"] == 60
    r = CliRunner().invoke(xmc, ["predict", "--model", str(out), "--data",
                                 str(tmp_path / "features.npz"), "--topk", "2", "--out",
                                 str(tmp_path / "p.npz")])  # features only: no labels needed
    assert r.exit_code == 0, r.output
    assert sp.load_npz(tmp_path / "p.npz").shape == (60, 6)


def _renamed(src: Path, dst: Path, text: str, labels: str) -> Path:
    with open(src) as fi, open(dst, "w") as fo:
        for line in fi:
            rec = json.loads(line)
            out = {"id": rec["id"], text: rec["text"]}
            if "labels" in rec:
                out[labels] = rec["labels"]
            fo.write(json.dumps(out) + "\n")
    return dst


def test_field_names_are_kept_by_the_model(files, tmp_path):
    """Trained with --text-field/--label-field, eval and predict read the same layout without
    the flags; a flag still overrides; a file of another kind (TSV vs JSON) gets the defaults."""
    train = _renamed(files / "train.jsonl", tmp_path / "tr.jsonl", "body", "tags")
    test = _renamed(files / "test.jsonl", tmp_path / "te.jsonl", "body", "tags")
    out = tmp_path / "m"
    r = CliRunner().invoke(xmc, ["train", "--data", str(train), "--text-field", "body",
                                 "--label-field", "tags", "--out", str(out), *FLAGS,
                                 "--epochs", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "featurizer.json").read_text())["fields"] == {
        "format": "json", "text_field": "body", "label_field": "tags", "label_sep": "|"}
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data", str(test), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["P@1"] > 0.5
    r = CliRunner().invoke(xmc, ["predict", "--model", str(out), "--data", str(test), "--topk",
                                 "2"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 40
    # an override of one name keeps the other stored one
    other = _renamed(files / "test.jsonl", tmp_path / "te2.jsonl", "words", "tags")
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data", str(other),
                                 "--text-field", "words", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data", str(other), "--json"])
    assert r.exit_code == 2 and "no text field 'body'" in r.output
    # a TSV of the default layout is read with the defaults, not the JSON field names
    tsv = tmp_path / "te.tsv"
    with open(files / "test.jsonl") as fi, open(tsv, "w") as fo:
        fo.write("text\tlabels\n")
        for line in fi:
            rec = json.loads(line)
            fo.write(f"{rec['text']}\t{'|'.join(rec['labels'])}\n")
    r = CliRunner().invoke(xmc, ["eval", "--model", str(out), "--data", str(tsv), "--json"])
    assert r.exit_code == 0, r.output


def test_resolve_fields_rules():
    from types import SimpleNamespace

    from xmc_toolkit.errors import XMCError
    from xmc_toolkit.inputs import TextFields, resolve_fields

    feat = SimpleNamespace(fields={"format": "table", "text_field": "t", "label_field": "l",
                                   "label_sep": ";"})
    model = SimpleNamespace(featurizer=feat)
    assert resolve_fields(model, None, "a.tsv") == TextFields("t", "l", ";")
    assert resolve_fields(model, None, "a.csv.gz") == TextFields("t", "l", ";")
    assert resolve_fields(model, None, "a.jsonl") == TextFields()
    assert resolve_fields(model, {"label_sep": ","}, "a.tsv") == TextFields("t", "l", ",")
    assert resolve_fields(model, TextFields("x"), "a.tsv") == TextFields("x")
    assert resolve_fields(SimpleNamespace(featurizer=None), None, "a.tsv") == TextFields()
    with pytest.raises(XMCError, match="unknown text field"):
        resolve_fields(model, {"txt": "a"}, "a.tsv")


def test_print_config_and_config_carry_the_featurizer(files, tmp_path):
    runner = CliRunner()
    r = runner.invoke(xmc, ["train", "--print-config"])
    assert r.exit_code == 0 and "featurizer" not in json.loads(r.stdout)  # vector data: as before
    r = runner.invoke(xmc, ["train", "--data", str(files / "train.jsonl"), "--ngram-range",
                            "1,2", "--print-config", *FLAGS])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert printed["featurizer"]["ngram_range"] == [1, 2] and printed["epochs"] == 10
    cfg = tmp_path / "cfg.json"
    cfg.write_text(r.stdout)
    out = tmp_path / "m"
    r = runner.invoke(xmc, ["train", "--config", str(cfg), "--data", str(files / "train.jsonl"),
                            "--out", str(out), "--no-progress", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "featurizer.json").read_text())["config"]["ngram_range"] == [1, 2]
    # the file's featurizer block on feature-vector data is refused, not ignored
    from conftest import make_tiny_problem

    from xmc_toolkit.data import XMCDataset, save

    X, Y = make_tiny_problem(40)
    save(XMCDataset(X, Y), tmp_path / "vec.txt")
    r = runner.invoke(xmc, ["train", "--config", str(cfg), "--data", str(tmp_path / "vec.txt"),
                            "--out", str(tmp_path / "v")])
    assert r.exit_code == 2 and "featurizer" in r.output and "raw-text" in r.output
    assert not (tmp_path / "v").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"featurizer": {"ngram_rang": [1, 2]}}))
    r = runner.invoke(xmc, ["train", "--config", str(bad), "--data", str(files / "train.jsonl"),
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "ngram_rang" in r.output and "ngram_range" in r.output


def test_val_fraction_fits_the_featurizer_on_the_training_part_only(tmp_path):
    """--val-fraction on text: the validation texts shape neither vocabulary nor IDF."""
    from xmc_toolkit.data.dataset import split_rows

    texts, labels = make_texts(60, 3)
    _, val_rows = split_rows(60, 0.25, 0)  # the split --val-fraction 0.25 --seed 0 carves
    for i in val_rows:
        texts[i] += " zebraword"  # a word that occurs in validation rows only
    data = write_jsonl(tmp_path / "t.jsonl", texts, labels)
    out = tmp_path / "m"
    r = CliRunner().invoke(xmc, ["train", "--data", str(data), "--out", str(out), *FLAGS,
                                 "--epochs", "1", "--val-fraction", "0.25", "--seed", "0"])
    assert r.exit_code == 0, r.output
    vocab = json.loads((out / "featurizer.json").read_text())
    words = json.dumps(vocab)
    assert "zebraword" not in words and "harbour" in words


def test_data_info_describes_a_text_file(files):
    """`xmc data info` on raw text: the label statistics and the default featurizer's D."""
    r = CliRunner().invoke(xmc, ["data", "info", str(files / "train.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)
    assert stats["num_points"] == 160 and stats["num_labels"] == 6
    assert 0 < stats["num_features"] <= len(set(" ".join(TOPICS.values()).split()) | set(FILLER))
    r = CliRunner().invoke(xmc, ["data", "info", str(files / "train.tsv"), "--label-field",
                                 "tags"])
    assert r.exit_code == 0 and "labels (L)" in r.output, r.output
