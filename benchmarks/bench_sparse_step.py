"""Per-query sampled step of the label table: torch SparseAdam vs RowAdam (and de-duplicated lookups).

One run, interleaved repetitions, median; prints the ratios. The step = look up ``[B, M]`` sampled
rows + score + logsumexp loss + backward (sparse gradient) + optimizer step.

    python benchmarks/bench_sparse_step.py [--labels 1000000] [--dim 128] [--batch 256]
        [--samples 1024] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import apply_threads, machine_info, sync, write_results  # noqa: E402

from xmc_toolkit.output_layer import LabelTable  # noqa: E402
from xmc_toolkit.sparse_optim import RowAdam  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    a = ap.parse_args(argv)
    if a.quick:
        a.labels, a.dim, a.batch, a.samples, a.reps = 2000, 16, 8, 32, 2
    apply_threads(a.threads)
    from xmc_toolkit.device import resolve_device

    dev = resolve_device(a.device)
    a.device = str(dev)
    torch.manual_seed(0)
    q = torch.randn(a.batch, a.dim, device=dev)
    variants = {}
    for name, dedup, opt_cls in (
        ("SparseAdam (before)", False, torch.optim.SparseAdam),
        ("RowAdam (now)", False, RowAdam),
        ("RowAdam + unique lookups", True, RowAdam),
    ):
        table = LabelTable(a.labels, a.dim, bias=True).to(dev)
        variants[name] = (table, opt_cls(list(table.parameters()), lr=1e-3), dedup)

    def step(table: LabelTable, opt: torch.optim.Optimizer, dedup: bool, ids: torch.Tensor) -> None:
        if dedup:  # look each distinct id up once, then repeat (smaller sparse gradient)
            uniq, inv = torch.unique(ids, return_inverse=True)  # [U], [B, M]
            w = table.weight(uniq)[inv]  # [B, M, d]
            b = table.bias(uniq).squeeze(-1)[inv]  # [B, M]
            s = torch.bmm(w, q.unsqueeze(-1)).squeeze(-1) + b
        else:
            s = table.score_ids(q, ids)  # [B, M]
        loss = s.logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.reps):
        ids = torch.randint(0, a.labels, (a.batch, a.samples), device=dev)
        for name, (table, opt, dedup) in variants.items():
            sync(dev)
            t0 = time.perf_counter()
            step(table, opt, dedup, ids)
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["SparseAdam (before)"])
    rows = {k: {"median_s": statistics.median(v), "speedup_vs_before": base / statistics.median(v)}
            for k, v in times.items()}
    for k, r in rows.items():
        print(f"{k:34s} {r['median_s']:.3f} s   x{r['speedup_vs_before']:.2f}")
    payload = {"config": vars(a), "machine": machine_info(a.device), "results": rows}
    write_results("sparse_step", payload, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
