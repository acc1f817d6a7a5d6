"""Post-hoc re-ranking of a model's top-100 on a validation split (the kjv-strongs P@5 study).

Takes a model trained on the ``1 - fraction`` part of TRAIN (``tune_split.py --model-out DIR``,
same ``--fraction`` / ``--split-seed``) and re-ranks each validation row's top 100 three ways,
printing P@1 / P@3 / P@5 for each setting (``docs/training.md``, "Real data with 10^4+ labels"):

* logit adjustment ``s - tau * log(freq)`` (training label frequency);
* kNN label votes mixed into the model's softmax (neighbours by cosine in the model's TF-IDF
  space or in its query embeddings; K neighbours, weights sim^p);
* a full-rank nearest-centroid score ``s + beta * x . c_l`` (``c_l``: the normalised mean of the
  preprocessed rows of label ``l``, PIFA).

    python benchmarks/tune_split.py --data ../shared/data/real/kjv-strongs_train.txt \\
        --threads 1 --model-out /tmp/kjv85
    python benchmarks/rerank_study.py --data ../shared/data/real/kjv-strongs_train.txt \\
        --model /tmp/kjv85 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, add_model_split_args, apply_threads,  # noqa: E402
                     machine_info, model_and_split, write_results)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_split_args(ap)
    ap.add_argument("--top", type=int, default=100, help="candidates re-ranked per row")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    import numpy as np
    import scipy.sparse as sp
    import torch
    from sklearn.preprocessing import normalize

    from xmc_toolkit.metrics import evaluate

    model, train, val = model_and_split(args)
    top = min(args.top, model.fitted.num_labels)
    ids, scores = model.predict_topk(val.X, k=top)  # [Nv, top] each
    Yv = sp.csr_matrix(val.Y)
    Yt = sp.csr_matrix(train.Y).astype(np.float32)
    L = Yt.shape[1]
    ones = np.ones(L)

    def p_at(top5: np.ndarray) -> dict[str, float]:
        r = evaluate(Yv, top5, (1, 3, 5), ones)
        return {k: round(float(r[k]) * 100, 2) for k in ("P@1", "P@3", "P@5")}

    def rerank(s: np.ndarray) -> np.ndarray:
        return np.take_along_axis(ids, np.argsort(-s, 1)[:, :5], 1)

    out: dict[str, Any] = {"model": p_at(ids[:, :5]), "logit_adjustment": {}, "knn": {},
                           "centroid": {}}
    log_freq = np.log((np.asarray(Yt.sum(0)).ravel() + 1.0) / (Yt.sum() + L))
    for tau in (-0.3, -0.1, 0.05, 0.1, 0.2, 0.3, 0.5):
        out["logit_adjustment"][tau] = p_at(rerank(scores - tau * log_freq[ids]))

    n = ids.shape[0]
    p_model = torch.softmax(torch.from_numpy(scores).double(), 1).numpy()
    P_model = sp.csr_matrix((p_model.ravel(), (np.repeat(np.arange(n), ids.shape[1]),
                                               ids.ravel())), shape=(n, L))
    pre = model.fitted.preprocessor
    Xt, Xv = normalize(pre.transform(train.X)), normalize(pre.transform(val.X))
    spaces = {"tfidf": (Xt, Xv), "embedding": (normalize(model.encode(train.X)),
                                               normalize(model.encode(val.X)))}
    for name, (At, Av) in spaces.items():
        S = Av @ At.T
        sims = torch.from_numpy(np.asarray(S.toarray() if sp.issparse(S) else S, np.float32))
        for K in (10, 30, 100):
            if K > sims.shape[1]:
                continue
            v, nb = torch.topk(sims, K)  # [Nv, K]
            for power in (1, 3):
                w = v.clamp_min(0).pow(power).numpy()
                W = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), K), nb.numpy().ravel())),
                                  shape=(n, At.shape[0]))
                votes = sp.diags(1.0 / np.maximum(w.sum(1), 1e-12)) @ (W @ Yt)  # [Nv, L]
                for a in (0.1, 0.3, 1.0):
                    mixed = (P_model * (1 - a) + votes * a).toarray()
                    top5 = torch.topk(torch.from_numpy(mixed), 5).indices.numpy()
                    out["knn"][f"{name} K={K} p={power} a={a}"] = p_at(top5)
    C = normalize(sp.csr_matrix(Yt.T @ Xt))  # [L, D] label centroids
    S = np.asarray((Xv @ C.T).todense(), np.float32)  # [Nv, L]
    out["centroid_alone"] = p_at(np.argsort(-S, 1)[:, :5])
    S_top = np.take_along_axis(S, ids, 1)
    for beta in (0.5, 1, 2, 4, 8, 16):
        out["centroid"][beta] = p_at(rerank(scores + beta * S_top))
    payload = {"benchmark": "rerank_study", "config": {k: str(v) for k, v in vars(args).items()},
               "data": str(args.data), "model": str(args.model),
               "machine": machine_info("cpu"), "results": out}
    write_results("rerank_study", payload, args.out or RESULTS_DIR / "rerank_study.json")
    print(json.dumps(out, indent=1))
    return payload


if __name__ == "__main__":
    main()
