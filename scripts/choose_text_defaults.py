"""Choose the text featurizer defaults on a validation split carved from a training file.

    python scripts/choose_text_defaults.py ../shared/data/real/kjv-strongs_train.jsonl \
        --epochs 3 --out /tmp/text_defaults.jsonl

The test split is never read. 20 % of the training records (seed 0) are held out; each
candidate featurizer is fitted on the other 80 %, the model is trained with the `xmc train`
defaults (``--epochs`` overrides the epoch count to keep the sweep short) and scored on the
held-out records (labels unseen in the 80 % are dropped, as `--ignore-extra` does).
One JSON line per candidate: settings, D, P@1/3/5 on the held-out records, seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from xmc_toolkit.data.text import TextData, label_vocabulary, read_text, text_dataset
from xmc_toolkit.featurizer import Featurizer, FeaturizerConfig
from xmc_toolkit.model import XMCModel

CANDIDATES: list[tuple[dict, dict]] = [  # (featurizer settings, extra TrainConfig settings)
    ({"sublinear_tf": False}, {}),                          # raw counts, like the XC files
    ({"sublinear_tf": True}, {}),                           # the chosen default
    ({"sublinear_tf": False}, {"tfidf": False}),            # no second idf in the model
    ({"sublinear_tf": True, "ngram_range": (1, 2)}, {}),    # word pairs too
    ({"sublinear_tf": False, "token_pattern": r"(?u)\b\w\w+\b"}, {}),  # scikit-learn's tokens
    ({"analyzer": "char_wb", "ngram_range": (2, 4), "sublinear_tf": True}, {}),
]


def _subset(d: TextData, rows: np.ndarray) -> TextData:
    return TextData([d.texts[i] for i in rows], [d.labels[i] for i in rows], None, d.path,
                    d.lines[rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--only", type=str, default="", help="comma-separated candidate numbers")
    ap.add_argument("--out", default="/tmp/text_defaults.jsonl")
    args = ap.parse_args()
    data = read_text(args.train)
    perm = np.random.default_rng(0).permutation(len(data))
    n_val = int(round(args.fraction * len(data)))
    fit, val = _subset(data, np.sort(perm[n_val:])), _subset(data, np.sort(perm[:n_val]))
    names = label_vocabulary(fit.labels)
    only = {int(s) for s in args.only.split(",") if s}
    for i, (fcfg, tcfg) in enumerate(CANDIDATES):
        if only and i not in only:
            continue
        t0 = time.perf_counter()
        feat = Featurizer.fit(fit.texts, FeaturizerConfig(**fcfg))
        tr = text_dataset(fit, feat, names)
        va = text_dataset(val, feat, names, ignore_extra=True)
        model = XMCModel(epochs=args.epochs, device="cpu", **tcfg).fit(tr.X, tr.Y)
        m = model.evaluate(va.X, va.Y, ks=(1, 3, 5))
        rec = {"candidate": i, "featurizer": fcfg, "train": tcfg, "D": feat.num_features,
               "epochs": args.epochs, "rows_fit": len(fit), "rows_val": len(val),
               **{k: round(100 * m[k], 2) for k in ("P@1", "P@3", "P@5")},
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
