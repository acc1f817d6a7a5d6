"""MIDX index refresh in proportion to what changed, and the amortised shared-MIDX step.

At ``L`` labels (default 1e6), d = 128, B = 256, M = 1024 shared negatives, P = 4 positives per
row, K = 64 codewords (the output-layer benchmark's configuration, ``bench_output_layer.Bench``),
in one process and one run:

1. **Training rounds.** ``--rounds`` times: ``--refresh-every`` shared-MIDX training steps
   (sample, score, sampled softmax, backward, RowAdam -- the trainer's default -- on the
   touched rows), then the
   trainer's refresh ``sampler.update(W)`` -- incremental: the rows the steps changed are found
   by their fingerprints, reassigned, merged into the index, and the codewords take one Lloyd
   step -- and, in ``--full-rounds`` of the rounds, one full-softmax step (chunked exact softmax,
   dense gradient, Adam) interleaved, so the ratio is taken under the same load. Recorded per
   round: the median step, the refresh seconds, the rows changed / moved, and the quantization
   distortion ``mean ||w - w^||^2`` of the index.
2. **Full re-cluster.** ``update(W, full=True)`` (warm k-means over all labels) after the
   rounds, with its distortion: the drift of the incremental index against a fresh one.
3. **Curve.** Refresh seconds against the number of changed rows: ``R`` random rows of a copy of
   the table moved (``--curve``), each refreshed incrementally, next to the full re-cluster.

Amortised step = median step + incremental refresh / refresh_every + full re-cluster /
(refresh_every * recluster_every), with the sampler's default ``recluster_every``; the speed-up
is the median full-softmax step over it.

    python benchmarks/bench_refresh.py --threads 1                # L = 1e6 (minutes)
    python benchmarks/bench_refresh.py --quick
"""

from __future__ import annotations

import argparse
import statistics
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
    speedup_panel,
    sync,
    write_results,
    write_results_and_plot,
)

NAME = "refresh"


def _distortion(sampler: Any, w: Any) -> float:
    from xmc_toolkit.codebook import reconstruct

    rec = reconstruct(sampler.codebooks, sampler.codes, sampler.quantizer)
    return float((w - rec).pow(2).sum(1).mean())


def _timed(fn: Any, device: Any) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--positives", type=int, default=4)
    ap.add_argument("--codewords", type=int, default=64)
    ap.add_argument("--quantizer", choices=("pq", "rq"), default="pq")
    ap.add_argument("--chunk-size", type=int, default=65536, help="full-softmax label chunk")
    ap.add_argument("--refresh-every", type=int, default=100,
                    help="steps between refreshes (the trainer's default)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--full-rounds", type=int, default=2,
                    help="rounds with one interleaved full-softmax step (after a warm-up one)")
    ap.add_argument("--curve", default="1000,10000,30000,100000,250000",
                    help="changed-row counts of the refresh curve")
    ap.add_argument("--sparse-optimizer", choices=("rowadam", "sparseadam"), default="rowadam",
                    help="label-table optimizer of the sampled step (rowadam: the trainer's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    import torch
    from bench_output_layer import Bench  # noqa: E402

    from xmc_toolkit.device import resolve_device

    if args.quick:
        args.labels, args.dim, args.batch, args.negatives = 3000, 16, 32, 64
        args.codewords, args.refresh_every, args.rounds, args.full_rounds = 8, 5, 2, 1
        args.curve, args.chunk_size = "10,100,600", 1024
    device = resolve_device(args.device)
    curve = [int(float(v)) for v in args.curve.split(",") if v.strip()]
    method = f"midx-{args.quantizer}-shared"
    out_path = args.out or (RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    config["device"] = str(device)
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device)}
    bench = Bench(args.labels, args.dim, args.batch, args.negatives, args.positives, device,
                  args.codewords, args.chunk_size, ["full", method], "adam",
                  sparse_optimizer=args.sparse_optimizer)
    sampler = bench.samplers[method.removesuffix("-shared")]
    payload["index"] = {"build_s": bench.build_s[sampler_name(method)],
                        "recluster_s_at_setup": bench.refresh_s[sampler_name(method)],
                        "recluster_every": sampler.recluster_every,
                        "max_incremental_fraction": sampler.max_incremental_fraction}
    step, full_step = bench.step_fn(method), bench.step_fn("full")
    w = bench.table.label_embeddings

    def full() -> None:
        """One full-softmax step on the shared table, which is then put back (untimed) so that
        the dense update does not count as rows changed for the MIDX refresh."""
        keep = bench.table.weight.weight.detach().clone()
        t = time.perf_counter()
        full_step()
        sync(device)
        full.seconds = time.perf_counter() - t  # type: ignore[attr-defined]
        with torch.no_grad():
            bench.table.weight.weight.copy_(keep)
        del keep

    full_times: list[float] = []
    full()  # allocates Adam's state
    t_warm = full.seconds  # type: ignore[attr-defined]
    payload["full_warmup_s"] = t_warm
    rounds: list[dict[str, Any]] = []
    step(), step()  # warm-up (SparseAdam state)
    sampler.update(w().detach())
    for r in range(args.rounds):
        ts = [_timed(step, device) for _ in range(args.refresh_every)]
        t_ref = _timed(lambda: sampler.update(w().detach()), device)
        rec = {"round": r, "step_s": statistics.median(ts), "refresh_s": t_ref,
               **{f"refresh_{k}": v for k, v in sampler.last_refresh.items()},
               "distortion": _distortion(sampler, w().detach())}
        if r < args.full_rounds:
            full()
            full_times.append(full.seconds)  # type: ignore[attr-defined]
            rec["full_step_s"] = full_times[-1]
        rounds.append(rec)
        write_results(NAME, payload | {"rounds": rounds}, out_path)
    payload["rounds"] = rounds
    t_full = _timed(lambda: sampler.update(w().detach(), full=True), device)
    payload["recluster"] = {"seconds": t_full, "distortion": _distortion(sampler, w().detach())}

    # curve: R random rows of a copy moved by about their own norm, refreshed incrementally
    g = torch.Generator().manual_seed(1)
    table = w().detach().clone()
    sampler.update(table, full=True)
    pts = []
    for n in curve:
        n = min(n, int(sampler.max_incremental_fraction * args.labels))
        rows = torch.randperm(args.labels, generator=g)[:n].to(device)
        table[rows] += 0.1 * torch.randn(n, args.dim, generator=g).to(device)
        t = _timed(lambda: sampler.update(table), device)
        pts.append({"changed_rows": n, "seconds": t, **{f"refresh_{k}": v for k, v in
                                                        sampler.last_refresh.items()}})
        if sampler.last_refresh["kind"] != "incremental":  # the schedule re-clustered: redo
            sampler.update(table, full=True)
    payload["curve"] = pts
    t_full2 = _timed(lambda: sampler.update(table, full=True), device)
    payload["curve_recluster_s"] = t_full2

    step_s = statistics.median(r["step_s"] for r in rounds)
    inc_s = statistics.median(r["refresh_s"] for r in rounds)
    rec_s = statistics.median([t_full, t_full2])
    amort = step_s + inc_s / args.refresh_every + rec_s / (args.refresh_every *
                                                           sampler.recluster_every)
    amort_old = step_s + rec_s / args.refresh_every  # every refresh a warm re-cluster
    full_s = statistics.median(full_times) if full_times else t_warm
    payload["summary"] = {
        "full_step_s": full_s, "full_step_reps": len(full_times) or 1,
        "midx_shared_step_s": step_s, "incremental_refresh_s": inc_s,
        "recluster_s": rec_s, "amortised_step_s": amort,
        "speedup_step": full_s / step_s, "speedup_amortised": full_s / amort,
        "speedup_amortised_recluster_every_refresh": full_s / amort_old,
        "target_800x_met": full_s / amort >= 800,
    }
    s = payload["summary"]
    print_table(f"refresh: L={args.labels}, d={args.dim}, B={args.batch}, M={args.negatives}, "
                f"{method}, {device}", ["quantity", "value"], [[k, v] for k, v in s.items()])
    print_table("rounds", ["round", "step ms", "refresh s", "changed", "moved", "distortion"],
                [[r["round"], 1e3 * r["step_s"], r["refresh_s"], r.get("refresh_changed"),
                  r.get("refresh_moved"), r["distortion"]] for r in rounds]
                + [["re-cluster", None, t_full, None, None, payload["recluster"]["distortion"]]])
    print_table("refresh vs changed rows", ["changed rows", "seconds", "kind"],
                [[p["changed_rows"], p["seconds"], p.get("refresh_kind")] for p in pts]
                + [["all (re-cluster)", t_full2, "full"]])
    write_results_and_plot(NAME, payload, out_path, args.plot, _plot)
    return payload


def sampler_name(method: str) -> str:
    return method.removesuffix("-shared")


def _plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = payload["curve"]
    ax = axes[0]
    ax.plot([p["changed_rows"] for p in pts], [p["seconds"] for p in pts], "o-",
            label="incremental refresh")
    ax.axhline(payload["curve_recluster_s"], color="C3", ls="--", label="full re-cluster (warm)")
    ax.set_xscale("log")
    ax.set_xlabel("changed rows")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"refresh time, L = {payload['config']['labels']:,}")
    s = payload["summary"]
    ax = axes[1]
    names = ["step only", "amortised\n(incremental)", "amortised\n(re-cluster each)"]
    vals = [s["speedup_step"], s["speedup_amortised"],
            s["speedup_amortised_recluster_every_refresh"]]
    speedup_panel(ax, names, vals, 800,
                  f"shared MIDX, refresh every {payload['config']['refresh_every']} steps",
                  ["C0", "C2", "C7"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
