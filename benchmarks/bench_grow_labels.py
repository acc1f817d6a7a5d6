"""Growing a trained model's label set: add-only vs add + fine-tune vs training from scratch.

Train on a random 80 % of the labels (rows keep only those labels; rows left without any are
dropped), then add the other 20 % with the full training data, three ways:

  (a) ``labels add``: the new rows initialised from the parent's encodings, no training
      (:func:`xmc_toolkit.grow.add_labels_dir`, what ``xmc labels add`` runs);
  (b) add + E epochs of fine-tuning on the full training data for each E in ``--epochs``
      (:func:`xmc_toolkit.grow.train_from`, what ``xmc train --init-from`` runs);
  (c) training from scratch on every label (``Trainer(TrainConfig(**set))``, the defaults).

P@1/3/5 on the test split, for old labels (test rows with an old label, ranking the old labels
only), new labels (rows with a new label, ranking the new labels only) and all (every row, every
label), with the time of each (training wall seconds; for (a) and (b) the whole grow call):

    python benchmarks/bench_grow_labels.py --data bibtex --threads 1
    python benchmarks/bench_grow_labels.py --data kjv-strongs --threads 1

Writes ``results/grow_labels_<data>.json`` (config, machine, rows of the table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (apply_threads, machine_info, print_table,  # noqa: E402
                     shared_data_dir, write_results)

DATA = {
    "bibtex": ("xc/bibtex_train.txt", "xc/bibtex_test.txt", "xc/bibtex_labels.xml"),
    "kjv-strongs": ("real/kjv-strongs_train.txt", "real/kjv-strongs_test.txt",
                    "real/kjv-strongs_labels.txt"),
}


def _data(args: argparse.Namespace) -> tuple[Any, Any]:
    from xmc_toolkit.data import XMCDataset, load, make_synthetic

    if args.quick:
        tr = make_synthetic(40, 400, 300, seed=0)
        te = make_synthetic(40, 200, 300, seed=0, split="test")
        names = [f"l{i}" for i in range(40)]
        return XMCDataset(tr.X, tr.Y, names), XMCDataset(te.X, te.Y, names)
    root = shared_data_dir()
    if root is None:
        raise SystemExit("../shared/data is absent; nothing to measure (use --quick)")
    a, b, c = DATA[args.data]
    return (load(root / a, label_names_from=root / c), load(root / b, label_names_from=root / c))


def group_metrics(model: Any, test: Any, num_old_names: set[str], ks=(1, 3, 5),
                  block: int = 1024) -> dict[str, dict[str, float]]:
    """P@k of ``model`` (a LoadedModel) on ``test`` for old / new / all labels (see above)."""
    import torch

    from xmc_toolkit.encoder import encode_csr
    from xmc_toolkit.grow import remap_labels
    from xmc_toolkit.metrics import precision_at_k

    names = model.label_names
    index = {n: i for i, n in enumerate(names)}
    L = len(names)
    known = np.array([n in index for n in test.label_names])
    ids = np.array([index.get(n, L) for n in test.label_names], dtype=np.int64)
    # test labels the model does not know (the parent's new labels) go to a dummy column L
    Yt = remap_labels(test.Y, ids, L + 1)
    is_old = np.array([n in num_old_names for n in names] + [False])
    is_new = ~is_old
    is_new[L] = not known.all()
    X = model.preprocessor.transform(test.X)
    q = encode_csr(model.network.encoder, X, batch_size=2048)
    W = model.network.label_weight.detach()
    b = model.network.label_bias
    k = max(ks)
    out: dict[str, dict[str, float]] = {}
    for group, mask in (("old", is_old), ("new", is_new), ("all", np.ones(L + 1, bool))):
        cols = np.flatnonzero(mask[:L])
        Yg = Yt[:, np.flatnonzero(mask)]
        rows = np.flatnonzero(np.asarray(Yg.sum(1)).ravel() > 0)
        if cols.size < k or rows.size == 0:
            out[group] = {f"P@{j}": float("nan") for j in ks}
            continue
        tc = torch.from_numpy(cols)
        tops = []
        for s in range(0, rows.size, block):
            r = torch.from_numpy(rows[s:s + block])
            sc = q[r] @ W[tc].T + (0 if b is None else b.detach()[tc])
            tops.append(tc[sc.topk(k, dim=1).indices].numpy())
        top = np.concatenate(tops)
        # ids are model ids; compare against the remapped test labels restricted to the rows
        p = precision_at_k(Yt[rows][:, :L], top, k)
        out[group] = {f"P@{j}": float(p[j - 1]) for j in ks}
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The results (and init variants) as Markdown tables, P@k in %."""
    def pct(v: Any) -> str:
        return "-" if v is None or v != v else f"{100 * v:.2f}"

    groups = ("old", "new", "all")
    head = ["method", "time s (train s)"] + [f"{g} P@{k}" for g in groups for k in (1, 3, 5)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in payload["results"]:
        t = f"{r['seconds']:.1f}" + (f" ({r['train_seconds']:.1f})" if "train_seconds" in r
                                     else "")
        out.append("| " + " | ".join([r["method"], t] + [pct(r.get(f"{g}/P@{k}")) for g in
                                                         groups for k in (1, 3, 5)]) + " |")
    for r in payload["results"]:
        if r.get("per_epoch"):
            head = ["after epoch"] + [f"{g} P@{k}" for g in groups for k in (1, 3, 5)]
            out += ["", f"{r['method']}, after each epoch:", "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for p in r["per_epoch"]:
                out.append("| " + " | ".join([str(p["epoch"])] + [
                    pct(p.get(f"{g}/P@{k}")) for g in groups for k in (1, 3, 5)]) + " |")
    if payload.get("init_variants"):
        head = ["direction", "calibration"] + [f"{g} P@{k}" for g in ("new", "all")
                                               for k in (1, 3, 5)]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in payload["init_variants"]:
            out.append("| " + " | ".join([r["direction"], r["calibration"]] + [
                pct(r.get(f"{g}/P@{k}")) for g in ("new", "all") for k in (1, 3, 5)]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bibtex", choices=sorted(DATA))
    ap.add_argument("--fraction", type=float, default=0.8, help="share of labels in the parent")
    ap.add_argument("--seed", type=int, default=0, help="seed of the label split")
    ap.add_argument("--epochs", default="1,2,3", help="fine-tune epochs of (b), comma-separated")
    ap.add_argument("--set", default="{}", help="TrainConfig overrides (parent and scratch), JSON")
    ap.add_argument("--ft-set", default="{}", help="extra overrides of the fine-tunes, JSON")
    ap.add_argument("--ft-init", default="",
                    help="new-row init options of the fine-tunes (prepare_growth), JSON; "
                         "default: what `train --init-from` uses (per_member=true)")
    ap.add_argument("--no-scratch", action="store_true", help="skip (c)")
    ap.add_argument("--scratch-model", type=Path, default=None,
                    help="(c) is this existing model directory of `xmc train --data TRAIN` with "
                         "the same defaults (labels in TRAIN's id order), its time the training "
                         "seconds in its summary.json, instead of training it again")
    ap.add_argument("--init-variants", action="store_true",
                    help="also (a) for every direction x calibration of new_label_rows")
    ap.add_argument("--work", type=Path, default=None, help="keep the model directories here")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: reuse the parent and scratch models of an earlier run "
                         "there (and their recorded times) instead of training them again")
    ap.add_argument("--val-split", type=float, default=0.0,
                    help="tune instead of test: carve this share of TRAIN (seed --split-seed) "
                         "as the evaluation set and use the rest as TRAIN (0: the test split)")
    ap.add_argument("--split-seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny synthetic smoke configuration")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from xmc_toolkit import grow
    from xmc_toolkit.data import XMCDataset
    from xmc_toolkit.train import TrainConfig, Trainer, _split, load_model_dir

    overrides = {"device": args.device, **json.loads(args.set)}
    ft_over = {"device": args.device, **json.loads(args.ft_set)}
    epochs = [int(e) for e in args.epochs.split(",") if e]
    if args.quick:
        overrides = {"epochs": 2, "hidden": [32], "dim": 16, "ensemble": 1, **overrides}
        epochs = epochs[:1]
    train, test = _data(args)
    if args.val_split > 0:  # choose settings on a slice of TRAIN, never on the test split
        train, test = _split(train, args.val_split, args.split_seed)
    L = train.num_labels
    perm = np.random.default_rng(args.seed).permutation(L)
    old = np.sort(perm[: int(round(args.fraction * L))])
    old_names = {train.label_names[i] for i in old}
    Yo = train.Y[:, old]
    keep = np.flatnonzero(np.asarray(Yo.sum(1)).ravel() > 0)
    parent_ds = XMCDataset(train.X[keep], Yo[keep], [train.label_names[i] for i in old])
    work = args.work or Path(tempfile.mkdtemp(prefix="grow_labels_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def record(method: str, model_dir: Path, seconds: float, **extra: Any) -> None:
        m = load_model_dir(model_dir, device="cpu")
        if m.label_names is None and m.num_labels == L:  # trained without names: by id
            m.label_names = list(train.label_names)
        res = group_metrics(m, test, old_names)
        rows.append({"method": method, "seconds": round(seconds, 2), **extra,
                     **{f"{g}/{k}": v for g, d in res.items() for k, v in d.items()}})
        print(f"{method}: {seconds:.1f} s {json.dumps(res)}", flush=True)

    def fresh(name: str) -> Path:
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    cfg = TrainConfig().merged(overrides)
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def train_once(name: str, ds: Any) -> tuple[float, float, int]:
        """(wall s, training s, epochs) of training ``cfg`` on ``ds`` into work/name."""
        if args.reuse and name in times and (work / name / "model.safetensors").is_file():
            return tuple(times[name])  # type: ignore[return-value]
        t = time.perf_counter()
        res = Trainer(cfg, out_dir=fresh(name)).fit(ds)
        times[name] = (time.perf_counter() - t, res.seconds, len(res.history))
        times_file.write_text(json.dumps(times))
        return tuple(times[name])  # type: ignore[return-value]

    wall, secs, ep = train_once("parent", parent_ds)
    record("parent (old labels only)", work / "parent", wall, train_seconds=round(secs, 2),
           epochs=ep)
    t = time.perf_counter()
    g = grow.add_labels_dir(work / "parent", train, fresh("add"))
    record("(a) labels add", work / "add", time.perf_counter() - t,
           labels_added=g.match.num_new)
    parent_m = load_model_dir(work / "parent", device="cpu")
    if parent_m.network.members > 1:  # the fine-tune's init: rows calibrated per member
        t = time.perf_counter()
        ge = grow.prepare_growth(parent_m, train, per_member=True)
        ge.model.label_names = ge.match.names
        res_e = group_metrics(ge.model, test, old_names)
        rows.append({"method": "(a) labels add, rows per member (per_member=True)",
                     "seconds": round(time.perf_counter() - t, 2),
                     **{f"{g_}/{k}": v for g_, d in res_e.items() for k, v in d.items()}})
        print(f"(a) per_member=True: {json.dumps(res_e)}", flush=True)
    variants: list[dict[str, Any]] = []
    if args.init_variants:
        parent = load_model_dir(work / "parent", device="cpu")
        for direction in grow.DIRECTIONS:
            for calibration in grow.CALIBRATIONS:
                gv = grow.prepare_growth(parent, train, direction=direction,
                                         calibration=calibration)
                gv.model.label_names = gv.match.names
                res_v = group_metrics(gv.model, test, old_names)
                variants.append({"direction": direction, "calibration": calibration,
                                 **{f"{g_}/{k}": v for g_, d in res_v.items()
                                    for k, v in d.items()}})
                print(f"(a) {direction} / {calibration}: {json.dumps(res_v)}", flush=True)
    init_opts = json.loads(args.ft_init) if args.ft_init else None
    for e in epochs:
        per_epoch: list[dict[str, Any]] = []
        holder: list[Any] = []
        eval_s = [0.0]

        def on_epoch(event: str, payload: dict[str, Any]) -> None:
            """old / new / all P@k after every epoch of the longest fine-tune (the why)."""
            if event != "epoch_end" or e != max(epochs) or not holder:
                return
            t_ev = time.perf_counter()
            tr = holder[0]
            net = tr.network
            net.eval()
            view = argparse.Namespace(label_names=tr.label_names,
                                      preprocessor=tr.preprocessor, network=net)
            with torch.no_grad():
                r = group_metrics(view, test, old_names)
            net.train()
            per_epoch.append({"epoch": payload["epoch"], **{f"{g_}/{k}": v for g_, d in
                                                            r.items() for k, v in d.items()}})
            eval_s[0] += time.perf_counter() - t_ev

        t = time.perf_counter()
        res, _, trainer = grow.train_from(work / "parent", train, fresh(f"ft{e}"),
                                          {**ft_over, "epochs": e}, callbacks=(on_epoch,),
                                          init_options=init_opts, on_trainer=holder.append)
        # the per-epoch evaluations are not part of the fine-tune's time
        record(f"(b) add + {e} epoch(s)", work / f"ft{e}",
               time.perf_counter() - t - eval_s[0],
               train_seconds=round(res.seconds - eval_s[0], 2), epochs=e,
               lr=trainer.config.lr, schedule=trainer.config.schedule,
               warmup_steps=trainer.config.warmup_steps,
               optimizer_state=grow.read_lineage(work / f"ft{e}")[-1]["optimizer_state"],
               **({"per_epoch": per_epoch} if per_epoch else {}))
    if args.scratch_model is not None:
        summ = json.loads((args.scratch_model / "summary.json").read_text())
        record("(c) from scratch", args.scratch_model, summ["seconds"],
               train_seconds=round(summ["seconds"], 2), epochs=len(summ["history"]),
               external=str(args.scratch_model))
    elif not args.no_scratch:
        wall, secs, ep = train_once("scratch", train)
        record("(c) from scratch", work / "scratch", wall, train_seconds=round(secs, 2),
               epochs=ep)
    cols = ["method", "seconds", "old/P@1", "old/P@5", "new/P@1", "new/P@5", "all/P@1",
            "all/P@3", "all/P@5"]
    print_table(f"growing labels: {'synthetic' if args.quick else args.data}, {len(old)} + {L - len(old)} labels",
                cols, [[r.get(c) if c in ("method", "seconds") else 100 * r[c] for c in cols]
                       for r in rows])
    payload = {"config": {"data": args.data, "fraction": args.fraction, "seed": args.seed,
                          "epochs": epochs, "set": overrides, "ft_set": ft_over,
                          "ft_init": init_opts,
                          "old_labels": int(len(old)), "new_labels": int(L - len(old)),
                          "parent_rows": int(len(keep)), "train_rows": train.num_points,
                          "test_rows": test.num_points, "quick": args.quick,
                          "evaluated_on": (f"validation: {args.val_split} of TRAIN, seed "
                                           f"{args.split_seed}" if args.val_split > 0
                                           else "test")},
               "machine": machine_info(args.device), "results": rows,
               "init_variants": variants}
    print(markdown(payload))
    name = f"grow_labels_{args.data}" + ("_val" if args.val_split > 0 else "") + (
        "_quick" if args.quick else "")
    write_results(name, payload, args.out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return payload


if __name__ == "__main__":
    main()
