"""Convergence: test P@1 against training wall-clock time, full softmax vs each sampler.

Every method trains the same ``XMCModel`` network (``xmc_toolkit.train.Trainer``, same config,
seed and ``--negatives``) for a budget of ``--budget`` training seconds. After the first step
and then ``--evals`` times per run (evenly spaced in training seconds) the clock is paused and
P@1 on the test split is computed (exact top-k, ``xmc_toolkit.metrics``). The clock covers
everything the trainer does (preprocessing, MIDX index builds and refreshes, steps) except those
evaluations. Methods run one after another in one
process; with ``--rounds 2`` they run twice in alternating order and each curve is the
point-wise median (load drifts on a shared machine).

Time-to-target: the first evaluation whose P@1 reaches ``--target-frac`` x the best P@1 any
method reached on that data set.

Data sets: ``bibtex`` (``../shared/data``, skipped when absent), ``synthetic``
(``make_synthetic`` with ``--syn-labels`` labels, default 1e5) and ``nextword``
(``../shared/data/real/nextword-tdavid``: 941,684 rows, 16,509 labels, one label per row -- the
language-modelling setting; skipped when absent). Beside P@1 every evaluation records the
full-softmax log-likelihood of the test rows' labels (``nll`` = mean over (row, positive) pairs
of ``-log softmax(scores)[label]`` over all L labels; ``perplexity = exp(nll)``), so a sampled
loss is judged by the model it leaves, not by its own estimate. ``--test-points N`` evaluates a
fixed random subset of N test rows (seed 0) to keep evaluations cheap on large test splits.

Methods: ``full``, ``uniform``, ``popularity``, ``log-uniform``, ``midx-pq``, ``midx-rq``; a
``-shared`` suffix (``midx-pq-shared``) draws one set of negatives for the whole batch.
``--network defaults`` trains the network that ``xmc train`` would choose for the data (width,
dim, dropout, batch, label init) and only sets the loss and sampler; ``--network small`` (the
default) uses ``--dim`` / ``--hidden`` / ``--batch-size``.

    python benchmarks/bench_convergence.py
    python benchmarks/bench_convergence.py --data synthetic --budget 120
    python benchmarks/bench_convergence.py --quick
    python benchmarks/bench_convergence.py --data nextword --network defaults --budget 300 \
        --evals 6 --test-points 20000 --threads 1 \
        --methods full,midx-pq,midx-rq,midx-pq-shared,midx-rq-shared,uniform,popularity,log-uniform
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    apply_threads,
    machine_info,
    print_table,
    pyplot,
    shared_data_dir,
    write_results,
    write_results_and_plot,
)

NAME = "convergence"
METHODS = ("full", "uniform", "popularity", "log-uniform", "midx-pq", "midx-rq")


class _BudgetSpent(Exception):
    """Raised from the callback to end a run when its time budget is spent."""


def _load_data(name: str, args: argparse.Namespace) -> tuple[Any, Any] | None:
    from xmc_toolkit.data import load, make_synthetic

    if name == "nextword":
        root = shared_data_dir()
        base = None if root is None else root / "real" / "nextword-tdavid"
        if base is None or not Path(f"{base}_train.txt.gz").exists():
            return None
        return load(f"{base}_train.txt.gz"), load(f"{base}_test.txt.gz")
    if name == "bibtex":
        root = shared_data_dir()
        if root is None or not (root / "xc" / "bibtex_train.txt").exists():
            return None
        return load(root / "xc" / "bibtex_train.txt"), load(root / "xc" / "bibtex_test.txt")
    kw = {"num_labels": args.syn_labels, "num_features": args.syn_features, "seed": 0}
    return (make_synthetic(num_points=args.syn_points, split="train", **kw),
            make_synthetic(num_points=args.syn_test_points, split="test", **kw))


def run_method(method: str, train: Any, test: Any, args: argparse.Namespace, device: str,
               budget: float) -> dict[str, Any]:
    """Train one method for ``budget`` seconds; return its P@1-vs-seconds curve."""
    from xmc_toolkit.metrics import precision_at_k
    from xmc_toolkit.train import Trainer, TrainConfig, predict_topk_network

    cfg: dict[str, Any] = {"epochs": 10_000, "device": device, "seed": 0,
                           "negatives": args.negatives, "refresh_every": args.refresh_every}
    if args.network == "small":
        cfg.update(dim=args.dim, hidden=tuple(args.hidden), batch_size=args.batch_size,
                   warmup_steps=20)
    shared = method.endswith("-shared")
    base = method[: -len("-shared")] if shared else method
    if base == "full":
        cfg["loss"] = "full"
    else:
        cfg.update(loss="sampled", shared_negatives=shared,
                   sampler="midx" if base.startswith("midx") else base)
        if base.startswith("midx"):
            cfg["quantizer"] = base.split("-")[1]
    config = TrainConfig().merged(cfg)
    trainer: Trainer | None = None
    clock = {"start": 0.0, "paused": 0.0, "next": 0.0}
    interval = budget / max(1, args.evals)
    points: list[dict[str, float]] = []
    Xte_pre: list[Any] = []
    Yte = test.Y

    def evaluate_now(step: int) -> tuple[float, float]:
        assert trainer is not None and trainer.network is not None
        if not Xte_pre:
            Xte_pre.append(trainer.preprocessor.transform(test.X))  # type: ignore[union-attr]
        ids, _ = predict_topk_network(trainer.network, Xte_pre[0], 1,
                                      batch_size=config.eval_batch_size)
        keep = Yte.getnnz(axis=1) > 0
        p1 = float(precision_at_k(Yte[keep], ids[keep], 1).mean())
        return p1, test_nll(trainer.network, Xte_pre[0], Yte, config.eval_batch_size)

    def callback(event: str, payload: dict[str, Any]) -> None:
        now = time.perf_counter()
        if event == "train_begin":
            clock["start"] = now
            return
        if event != "step":
            return
        seconds = now - clock["start"] - clock["paused"]
        if args.eval_every:
            if payload["step"] % args.eval_every:
                return
        elif seconds < clock["next"] and payload["step"] > 1:
            return
        clock["next"] = seconds + interval
        p1, nll = evaluate_now(payload["step"])
        points.append({"seconds": seconds, "step": payload["step"], "P@1": p1, "nll": nll,
                       "perplexity": math.exp(min(nll, 700.0)),
                       "loss": float(payload["loss_tensor"])})  # this step's loss (a sync)
        clock["paused"] += time.perf_counter() - now
        if seconds >= budget:
            raise _BudgetSpent

    from xmc_toolkit.data import XMCDataset

    trainer = Trainer(config, callbacks=[callback])
    error = None
    try:
        trainer.fit(XMCDataset(train.X, train.Y))
    except _BudgetSpent:
        pass
    except Exception as exc:  # noqa: BLE001 - record, keep benchmarking the other methods
        error = f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {"method": method, "points": points}
    if error:
        out["error"] = error[:300]
    return out


def test_nll(network: Any, X: Any, Y: Any, batch_size: int) -> float:
    """Mean full-softmax negative log-likelihood of the positives of preprocessed rows ``X``.

    ``X`` ``[N, D]`` csr, ``Y`` ``[N, L]`` csr; every (row, positive) pair is one term
    ``logsumexp_l s[b, l] - s[b, y]`` over all ``L`` labels (the exact softmax, whatever loss
    trained the network). Rows without positives are skipped.
    """
    import torch

    from xmc_toolkit.batching import csr_to_bag

    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    total, count = 0.0, 0
    Y = Y.tocsr()
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            stop = min(start + batch_size, X.shape[0])
            Yb = Y[start:stop].tocoo()
            if Yb.nnz == 0:
                continue
            ids, offs, w = csr_to_bag(X[start:stop], device)
            scores = network.labels.full_scores(network(ids, offs, w).float())  # [b, L]
            lse = torch.logsumexp(scores.float(), dim=1)  # [b]
            r = torch.as_tensor(Yb.row, dtype=torch.long, device=device)
            c = torch.as_tensor(Yb.col, dtype=torch.long, device=device)
            total += float((lse[r] - scores[r, c].float()).sum())
            count += int(r.numel())
    network.train(was_training)
    return total / max(count, 1)


def _median_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Point-wise median over rounds (same eval steps; truncated to the shortest run)."""
    import statistics

    n = min(len(c) for c in curves)
    return [{"step": curves[0][i]["step"],
             "seconds": statistics.median(c[i]["seconds"] for c in curves),
             "P@1": statistics.median(c[i]["P@1"] for c in curves),
             "nll": statistics.median(c[i]["nll"] for c in curves),
             "perplexity": statistics.median(c[i]["perplexity"] for c in curves),
             "loss": statistics.median(c[i]["loss"] for c in curves)} for i in range(n)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bibtex,synthetic")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budget", type=float, default=90.0, help="training seconds per method")
    ap.add_argument("--budget-bibtex", type=float, default=None,
                    help="budget for bibtex (default --budget)")
    ap.add_argument("--evals", type=int, default=15,
                    help="evaluations per run, evenly spaced in training seconds")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="evaluate every N steps instead (0: use --evals)")
    ap.add_argument("--negatives", type=int, default=64, help="M, the same for every sampler")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    ap.add_argument("--refresh-every", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="repeat all methods (median curve)")
    ap.add_argument("--target-frac", type=float, default=0.9)
    ap.add_argument("--network", choices=("small", "defaults"), default="small",
                    help="small: --dim/--hidden/--batch-size; defaults: what `xmc train` picks")
    ap.add_argument("--test-points", type=int, default=0,
                    help="evaluate a fixed random subset of N test rows (0: all)")
    ap.add_argument("--syn-labels", type=int, default=100_000)
    ap.add_argument("--syn-points", type=int, default=30_000)
    ap.add_argument("--syn-test-points", type=int, default=1_000)
    ap.add_argument("--syn-features", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in children (0: torch default; 1 on a loaded "
                         "machine)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from xmc_toolkit.device import resolve_device

    if args.quick:
        args.data, args.budget, args.eval_every = "synthetic", 1.0, 3
        args.dim, args.hidden = 16, [32]
        args.syn_labels, args.syn_points, args.syn_test_points = 300, 600, 100
        args.syn_features, args.negatives, args.batch_size = 200, 16, 64
        args.methods = "full,uniform,midx-pq"
    device = resolve_device(args.device)
    out_path = args.out or (RESULTS_DIR / f"{NAME}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    config["device"] = str(device)
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device), "data": {}, "curves": [],
                               "time_to_target": []}
    methods = [m for m in args.methods.split(",") if m]
    for dname in [d for d in args.data.split(",") if d]:
        data = _load_data(dname, args)
        if data is None:
            payload["data"][dname] = {"skipped": "../shared/data/xc/bibtex_*.txt not found"}
            continue
        train, test = data
        if args.test_points and test.X.shape[0] > args.test_points:
            import numpy as np

            from xmc_toolkit.data import XMCDataset

            keep = np.sort(np.random.default_rng(0).choice(test.X.shape[0], args.test_points,
                                                           replace=False))
            test = XMCDataset(test.X[keep], test.Y[keep])
        payload["data"][dname] = {"train_points": train.X.shape[0], "test_points": test.X.shape[0],
                                  "labels": train.Y.shape[1], "features": train.X.shape[1]}
        budget = args.budget_bibtex if (dname == "bibtex" and args.budget_bibtex) else args.budget
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for r in range(args.rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for m in order:
                runs[m].append(run_method(m, train, test, args, str(device), budget))
        curves = []
        for m in methods:
            ok = [x["points"] for x in runs[m] if x["points"]]
            curve = {"data": dname, "method": m,
                     "points": _median_curve(ok) if ok else [],
                     "rounds": len(runs[m])}
            errs = [x["error"] for x in runs[m] if "error" in x]
            if errs:
                curve["error"] = errs[0]
            curves.append(curve)
        best = max((p["P@1"] for c in curves for p in c["points"]), default=0.0)
        target = args.target_frac * best
        for c in curves:
            hit = next((p for p in c["points"] if p["P@1"] >= target), None)
            final = c["points"][-1]["P@1"] if c["points"] else None
            payload["time_to_target"].append({
                "data": dname, "method": c["method"], "target_P@1": target,
                "seconds_to_target": None if hit is None else hit["seconds"],
                "steps_to_target": None if hit is None else hit["step"],
                "final_P@1": final,
                "best_P@1": max((p["P@1"] for p in c["points"]), default=None),
                "steps_in_budget": c["points"][-1]["step"] if c["points"] else 0})
        payload["curves"] += curves
        write_results(NAME, payload, out_path)
    print_table(f"time to {args.target_frac:.0%} of the best P@1 (budget {args.budget:g} s/method)",
                ["data", "method", "target P@1", "s to target", "steps to target",
                 "final P@1", "best P@1", "steps"],
                [[r["data"], r["method"], r["target_P@1"], r["seconds_to_target"],
                  r["steps_to_target"], r["final_P@1"], r["best_P@1"], r["steps_in_budget"]]
                 for r in payload["time_to_target"]])
    for c in payload["curves"]:
        if "error" in c:
            print(f"{c['data']} / {c['method']}: {c['error']}")
    write_results_and_plot(NAME, payload, out_path, args.plot, _plot)
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    datas = list(dict.fromkeys(c["data"] for c in payload["curves"]))
    if not datas:
        return
    has_ppl = any("perplexity" in p for c in payload["curves"] for p in c["points"])
    rows = 2 if has_ppl else 1
    fig, axes = plt.subplots(rows, len(datas), figsize=(6 * len(datas), 4.2 * rows),
                             squeeze=False)
    for j, dname in enumerate(datas):
        ax = axes[0][j]
        for c in payload["curves"]:
            if c["data"] == dname and c["points"]:
                ax.plot([p["seconds"] for p in c["points"]], [p["P@1"] for p in c["points"]],
                        label=c["method"], marker=".")
        tt = [r for r in payload["time_to_target"] if r["data"] == dname]
        if tt:
            ax.axhline(tt[0]["target_P@1"], color="k", ls="--", lw=0.8, label="target")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("test P@1")
        ax.set_title(dname)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if has_ppl:
            ax = axes[1][j]
            for c in payload["curves"]:
                pts = [p for p in c["points"] if "perplexity" in p]
                if c["data"] == dname and pts:
                    ax.plot([p["seconds"] for p in pts], [p["perplexity"] for p in pts],
                            label=c["method"], marker=".")
            ax.set_yscale("log")
            ax.set_xlabel("training wall-clock (s)")
            ax.set_ylabel("test perplexity (full softmax)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
