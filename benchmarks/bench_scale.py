"""End to end at scale: synthetic data -> one epoch of ``xmc train`` (MIDX) -> top-5 latency.

Steps (each timed):

1. ``write_synthetic``: ``--points`` training rows and ``--test-points`` test rows with
   ``--labels`` labels and ``--features`` features, streamed to XC text files in ``--work``
   (reused when present with the same sizes).
2. One epoch of ``xmc train --loss sampled --sampler midx`` in a subprocess: wall time, the
   trainer's own epoch seconds, and the peak RSS of that process (``os.wait4`` rusage; on CUDA
   also the trainer's device memory is not visible here -- see the training log).
3. Query latency on ``--queries`` test rows with the trained model: exact top-5
   (``LabelTable.topk``, chunked over all labels) and index-approximate top-5
   (``output_layer.approx_topk`` through the MIDX index, ``--num-cells`` probed cells), both as
   milliseconds per query one query at a time (median) and in batches of ``--batch``; and the
   approximate recall@5 against the exact top-5.

    python benchmarks/bench_scale.py --labels 1000000 --points 1000000     # the full size
    python benchmarks/bench_scale.py --labels 100000 --points 100000       # scaled down
    python benchmarks/bench_scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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
    sync,
    write_results,
)

NAME = "scale"


def _train_subprocess(args: argparse.Namespace, train_path: Path, model_dir: Path
                      ) -> dict[str, Any]:
    """Run ``xmc train`` for one epoch; wall time, summary and the child's peak RSS."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    cmd = [sys.executable, "-c", "from cli.main import main; main()", "train",
           "--data", str(train_path), "--out", str(model_dir), "--epochs", "1",
           "--loss", "sampled", "--sampler", "midx", "--quantizer", args.quantizer,
           "--negatives", str(args.negatives), "--dim", str(args.dim),
           "--hidden", ",".join(map(str, args.hidden)), "--batch-size", str(args.batch_size),
           "--device", args.device, "--json", "--no-progress"]
    log = model_dir.parent / f"{model_dir.name}.train.log"
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env,
                                cwd=str(root))
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t
    # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN (max over children)
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out: dict[str, Any] = {"train_wall_s": wall, "train_peak_rss_mb": peak_mb,
                           "returncode": proc.returncode, "log": str(log)}
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        out["error"] = " | ".join(tail)[:400]
        return out
    try:
        summary = json.loads(stdout.strip().splitlines()[-1])
        out["summary"] = summary
    except (json.JSONDecodeError, IndexError):
        out["stdout_tail"] = stdout[-400:]
    return out


def _epoch_seconds(summary: dict[str, Any], model_dir: Path) -> float | None:
    """Seconds of the (single) epoch: the trainer's epoch log in the model folder, else the
    summary's training seconds."""
    for log in sorted(model_dir.glob("*.jsonl")):
        try:
            rec = json.loads(log.read_text().strip().splitlines()[0])
            if "seconds" in rec:
                return float(rec["seconds"])
        except (OSError, ValueError, IndexError):
            continue
    if "seconds" in summary:
        return float(summary["seconds"])
    stack = [summary]
    while stack:
        s = stack.pop()
        if isinstance(s, dict):
            if "history" in s and s["history"] and "seconds" in s["history"][0]:
                return float(s["history"][0]["seconds"])
            stack.extend(s.values())
    return None


def _latency(args: argparse.Namespace, model_dir: Path, test_path: Path) -> dict[str, Any]:
    import torch

    from xmc_toolkit.data import load
    from xmc_toolkit.evaluate import build_index
    from xmc_toolkit.model import XMCModel
    from xmc_toolkit.output_layer import approx_topk, chunked_topk, recall_at_k_vs_exact

    model = XMCModel.load(model_dir, device=args.device)
    fitted = model.fitted
    device = next(fitted.network.parameters()).device
    te = load(test_path)
    n = min(args.queries, te.X.shape[0])
    q = torch.as_tensor(model.encode(te.X[:n]), device=device)  # [n, d]
    W = fitted.network.labels.label_embeddings()  # [L, d]
    b = fitted.network.labels.bias_vector()  # [L] or None
    t = time.perf_counter()
    index = build_index(fitted)
    sync(device)
    index_s = time.perf_counter() - t

    def exact(x: torch.Tensor) -> torch.Tensor:
        return chunked_topk(x, W, b, 5, chunk_size=args.chunk_size)[1]

    def approx(x: torch.Tensor) -> torch.Tensor:
        return approx_topk(x, W, b, index, 5, num_cells=args.num_cells)[1]

    res: dict[str, Any] = {"queries": n, "index_build_s": index_s, "num_cells": args.num_cells}
    with torch.no_grad():
        exact(q[:2]), approx(q[:2])  # warm-up
        singles = min(n, args.single_queries)
        for name, fn in (("exact", exact), ("approx", approx)):
            ts = []
            for i in range(singles):  # one query at a time
                sync(device)
                t = time.perf_counter()
                fn(q[i: i + 1])
                sync(device)
                ts.append(time.perf_counter() - t)
            res[f"{name}_ms_per_query_single"] = 1e3 * statistics.median(ts)
            sync(device)
            t = time.perf_counter()
            ids = [fn(q[i: i + args.batch]) for i in range(0, n, args.batch)]
            sync(device)
            res[f"{name}_ms_per_query_batched"] = 1e3 * (time.perf_counter() - t) / n
            res[f"_{name}_ids"] = torch.cat(ids)
        res["approx_recall@5"] = recall_at_k_vs_exact(res.pop("_approx_ids"),
                                                     res.pop("_exact_ids"))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--test-points", type=int, default=10_000)
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    ap.add_argument("--batch-size", type=int, default=256, help="training batch")
    ap.add_argument("--negatives", type=int, default=64)
    ap.add_argument("--quantizer", choices=("pq", "rq"), default="pq")
    ap.add_argument("--queries", type=int, default=2000, help="test queries timed")
    ap.add_argument("--single-queries", type=int, default=100,
                    help="queries timed one at a time")
    ap.add_argument("--batch", type=int, default=256, help="query batch for batched latency")
    ap.add_argument("--num-cells", type=int, default=16, help="MIDX cells probed (approx)")
    ap.add_argument("--chunk-size", type=int, default=65536, help="exact top-k label chunk")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmc_bench_scale"),
                    help="folder for the data files and the model")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in children (0: torch default; 1 on a loaded "
                         "machine)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from xmc_toolkit.data import write_synthetic
    from xmc_toolkit.device import resolve_device

    if args.quick:
        args.labels, args.points, args.test_points, args.features = 500, 2000, 200, 500
        args.dim, args.hidden, args.queries, args.single_queries = 16, [32], 100, 10
        args.batch_size, args.num_cells = 128, 4
    device = resolve_device(args.device)
    args.device = str(device)
    out_path = args.out or (RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.json")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device), "results": {}}
    res = payload["results"]
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"L{args.labels}_N{args.points}_D{args.features}_T{args.test_points}"
    train_path, test_path = args.work / f"{tag}_train.txt", args.work / f"{tag}_test.txt"
    if train_path.exists() and test_path.exists():
        res["synthetic"] = {"reused": True}
    else:
        t = time.perf_counter()
        info = write_synthetic(train_path, args.labels, args.points, args.features, seed=0,
                               test_path=test_path, num_test_points=args.test_points)
        res["synthetic"] = {"seconds": time.perf_counter() - t, "files": info}
    res["train_file_mb"] = train_path.stat().st_size / 2**20
    write_results(NAME, payload, out_path)
    model_dir = args.work / f"{tag}_model"
    tr = _train_subprocess(args, train_path, model_dir)
    res.update({k: v for k, v in tr.items() if k != "summary"})
    if "summary" in tr:
        res["epoch_s"] = _epoch_seconds(tr["summary"], model_dir)
        res["train_summary"] = tr["summary"]
    write_results(NAME, payload, out_path)
    if "error" not in tr:
        res.update(_latency(args, model_dir, test_path))
    res["peak_rss_target_met"] = res.get("train_peak_rss_mb", 1e18) < 8 * 1024
    write_results(NAME, payload, out_path)
    rows = [[k, res.get(k)] for k in ("train_file_mb", "train_wall_s", "epoch_s",
                                      "train_peak_rss_mb", "index_build_s",
                                      "exact_ms_per_query_single", "approx_ms_per_query_single",
                                      "exact_ms_per_query_batched", "approx_ms_per_query_batched",
                                      "approx_recall@5", "error")]
    print_table(f"scale: L={args.labels}, N={args.points}, D={args.features}, {device}",
                ["quantity", "value"], rows)
    return payload


if __name__ == "__main__":
    main()
