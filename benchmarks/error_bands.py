"""Where a peer's top-5 beats the model's on a validation split: by rank, label frequency, row size.

Takes a model trained on the ``1 - fraction`` part of TRAIN (``tune_split.py --model-out DIR``,
same ``--fraction`` / ``--split-seed``), trains omikuji (defaults) on the same rows in the model's
own input space (its preprocessor, L2-normalised, as ``bench_peers.py --peer-features xmc``) and
compares the two top-10 lists of every validation row (the kjv-strongs P@5 analysis of
``docs/training.md``):

* the hit rate at each rank 1..10 (P@k is the running mean);
* correct top-5 predictions by the label's training frequency band;
* P@5 by the number of labels of the row;
* the labels where the peer's top-5 hits most exceed the model's (with names when a labels file
  is given) and how many of the peer's top-5 hits are absent from the model's top 10.

    python benchmarks/tune_split.py --data ../shared/data/real/kjv-strongs_train.txt \\
        --threads 1 --model-out /tmp/kjv85
    python benchmarks/error_bands.py --data ../shared/data/real/kjv-strongs_train.txt \\
        --model /tmp/kjv85 --label-names ../shared/data/real/kjv-strongs_labels.txt --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, add_model_split_args, apply_threads,  # noqa: E402
                     machine_info, model_and_split, write_results)

BANDS = ((1, 2), (2, 5), (5, 30), (30, 1000), (1000, 10**12))
ROW_SIZES = ((1, 3), (3, 6), (6, 11), (11, 21), (21, 10**9))


def hit_matrix(ids: Any, Y: Any) -> Any:
    """``[N, k]`` bool: ``ids[i, j]`` is a label of row ``i`` of the CSR ``Y`` (-1: no label)."""
    import numpy as np

    n, k = ids.shape
    rows = np.repeat(np.arange(n), k)
    safe = np.maximum(ids, 0).ravel()
    return (np.asarray(Y[rows, safe]).ravel() > 0).reshape(n, k) & (ids >= 0)


def compare(model_ids: Any, peer_ids: Any, Y: Any, freq: Any, names: list[str] | None = None,
            top_labels: int = 15) -> dict[str, Any]:
    """The comparison of two ``[N, 10]`` top-10 id lists against the CSR truth ``Y [N, L]``.

    ``freq [L]``: training rows per label. Pure: arrays in, a dict of numbers out.
    """
    import numpy as np

    hm, hp = hit_matrix(model_ids, Y), hit_matrix(peer_ids, Y)  # [N, 10]
    k = hm.shape[1]
    ranks = np.arange(1, k + 1)
    out: dict[str, Any] = {
        "hit_rate_by_rank": {"model": (100 * hm.mean(0)).round(2).tolist(),
                             "peer": (100 * hp.mean(0)).round(2).tolist()},
        "P@k": {"model": (100 * hm.mean(0).cumsum() / ranks).round(2).tolist(),
                "peer": (100 * hp.mean(0).cumsum() / ranks).round(2).tolist()},
        "top5_correct_by_train_frequency": {}, "P@5_by_row_size": {}}
    fm, fp = freq[np.maximum(model_ids[:, :5], 0)], freq[np.maximum(peer_ids[:, :5], 0)]
    for lo, hi in BANDS:
        in_m = (fm >= lo) & (fm < hi) & (model_ids[:, :5] >= 0)  # [N, 5]; -1: no prediction
        in_p = (fp >= lo) & (fp < hi) & (peer_ids[:, :5] >= 0)
        out["top5_correct_by_train_frequency"][f"[{lo},{hi})"] = {
            "model_predicted": int(in_m.sum()), "model_correct": int((hm[:, :5] & in_m).sum()),
            "peer_predicted": int(in_p.sum()), "peer_correct": int((hp[:, :5] & in_p).sum())}
    size = np.diff(Y.indptr)
    for lo, hi in ROW_SIZES:
        r = (size >= lo) & (size < hi)
        if r.any():
            out["P@5_by_row_size"][f"{lo}-{hi - 1}"] = {
                "rows": int(r.sum()), "model": round(100 * float(hm[r, :5].mean()), 2),
                "peer": round(100 * float(hp[r, :5].mean()), 2)}
    L = Y.shape[1]
    cm = np.bincount(model_ids[:, :5][hm[:, :5]], minlength=L)  # [L] correct top-5 per label
    cp = np.bincount(peer_ids[:, :5][hp[:, :5]], minlength=L)
    diff = cp - cm
    order = np.argsort(-diff, kind="stable")[:top_labels]
    out["labels_peer_ahead"] = [
        {"label": int(j), "name": names[j] if names and j < len(names) else None,
         "train_rows": int(freq[j]), "peer_correct": int(cp[j]), "model_correct": int(cm[j])}
        for j in order if diff[j] > 0]
    out["top5_hits_total"] = {"model": int(hm[:, :5].sum()), "peer": int(hp[:, :5].sum())}
    in_model_top = (peer_ids[:, :5, None] == model_ids[:, None, :]).any(2)  # [N, 5]
    out["peer_top5_hits_not_in_model_top10"] = int((hp[:, :5] & ~in_model_top).sum())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_split_args(ap)
    ap.add_argument("--label-names", type=Path, default=None, help="one label name a line")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    import numpy as np
    import omikuji
    import scipy.sparse as sp
    from sklearn.preprocessing import normalize

    from xmc_toolkit.data import XMCDataset, save

    model, train, val = model_and_split(args)
    pre = model.fitted.preprocessor
    Xt = sp.csr_matrix(normalize(pre.transform(train.X)), dtype=np.float32)
    Xv = sp.csr_matrix(normalize(pre.transform(val.X)), dtype=np.float32)
    Yt, Yv = sp.csr_matrix(train.Y), sp.csr_matrix(val.Y)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        save(XMCDataset(Xt, sp.csr_matrix(Yt, dtype=np.float32)), path, fmt="xc")
        # omikuji's reader rejects rows without features: an explicit zero feature changes nothing
        lines = path.read_text(encoding="ascii").split("\n")
        path.write_text("\n".join(ln if i == 0 or not ln.strip() or ":" in ln else
                                  ln.rstrip() + " 0:0" for i, ln in enumerate(lines)),
                        encoding="ascii")
        t = time.perf_counter()
        peer = omikuji.Model.train_on_data(str(path), omikuji.Model.default_hyper_param(),
                                           n_threads=args.threads or None)
        peer_s = time.perf_counter() - t
    peer_ids = np.full((Xv.shape[0], 10), -1, dtype=np.int64)
    for i in range(Xv.shape[0]):
        a, b = Xv.indptr[i], Xv.indptr[i + 1]
        pred = peer.predict(list(zip(Xv.indices[a:b].tolist(), Xv.data[a:b].tolist())), top_k=10)
        peer_ids[i, : len(pred)] = [lab for lab, _ in pred]
    model_ids, _ = model.predict_topk(val.X, k=10)
    names = (args.label_names.read_text(encoding="utf-8").split("\n")
             if args.label_names else None)
    res = compare(np.asarray(model_ids), peer_ids, Yv, np.asarray(Yt.sum(0)).ravel(), names)
    payload = {"benchmark": "error_bands", "peer": "omikuji 0.5.2 defaults",
               "config": {k: str(v) for k, v in vars(args).items()},
               "peer_train_s": peer_s, "machine": machine_info("cpu"), "results": res}
    write_results("error_bands", payload, args.out or RESULTS_DIR / "error_bands.json")
    print(json.dumps(res, indent=1))
    return payload


if __name__ == "__main__":
    main()
