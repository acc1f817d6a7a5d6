"""Per-query MIDX training step at 10^6 labels, part by part, against memory-traffic bounds.

One per-query sampled-softmax step of the label table (L = 1e6, d = 128, B = 256, M = 1024,
P = 4, K = 64, RowAdam -- the trainer's default), split into its parts, each timed on its own
(median of ``--reps``, interleaved), next to the time the part's unavoidable memory traffic takes
at the streaming bandwidth measured in the same run (a ``[L, d]`` copy):

* ``sample``: ``sampler.sample`` ([B, M] ids and log q) + ``log_prob`` of the positives;
* ``gather+score``: ``LabelTable.score_ids`` of negatives and positives (reads B*M*d floats);
* ``loss``: ``sampled_softmax_loss`` forward;
* ``backward``: autograd to the sparse row gradients (writes B*M*d floats);
* ``optimizer``: ``RowAdam.step`` (reads and writes each distinct row and its two moments);
* ``full step``: all of it, and the full-softmax step once, for the ratio;
* ``step, one score call``: the same step with positives and negatives scored by one
  ``score_ids`` call (ids concatenated, scores split): one row gradient, so autograd does not
  add two sparse gradients of the table (a fresh ``[U, d]`` merge) -- what the objective would
  gain from scoring them together;
* ``optimizer, row-wise`` and ``step, one call, row-wise``: the opt-in ``RowAdam(row_wise=True)``
  (one second moment a row: *not* Adam's semantics) on the same gradients, and the one-call
  step with it -- measured apart, never part of the headline ratio.

Two bounds: the streaming one (a ``[L, d]`` copy) and a row-gather one: the bandwidth of one
``index_select`` of the step's ``U`` distinct rows (sorted, as the optimizer reads them) from a
``[L, d]`` table, the rate one thread reaches on scattered 512-byte rows.

    python benchmarks/bench_step_profile.py --threads 1
    python benchmarks/bench_step_profile.py --quick
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
    write_results_and_plot,
)

NAME = "step_profile"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--positives", type=int, default=4)
    ap.add_argument("--codewords", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--full-reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    import torch
    from bench_output_layer import Bench  # noqa: E402

    from xmc_toolkit.losses import sampled_softmax_loss
    from xmc_toolkit.sparse_optim import RowAdam

    if args.quick:
        args.labels, args.dim, args.batch, args.negatives, args.codewords = 3000, 16, 32, 64, 8
        args.reps = 2
    device = torch.device(args.device)
    L, d, B, M, P = args.labels, args.dim, args.batch, args.negatives, args.positives
    bench = Bench(L, d, B, M, P, device, args.codewords, 65536, ["full", "midx-pq"], "adam",
                  sparse_optimizer="rowadam")
    sampler, table, q = bench.samplers["midx-pq"], bench.table, bench.queries
    step = bench.step_fn("midx-pq")
    full = bench.step_fn("full")
    step()
    step()  # optimizer state
    # streaming bandwidth of this machine now: one [L, d] float32 copy (read + write)
    src = table.weight.weight.detach()
    dst = torch.empty_like(src)
    bw = []
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        bw.append(2 * src.numel() * 4 / (time.perf_counter() - t))
    bandwidth = statistics.median(bw)  # bytes / s
    del dst
    # row-gather bandwidth: the sorted distinct rows of one step's ids, read from the table
    probe = torch.unique(torch.cat([sampler.sample(q.detach(), M).ids.flatten(),
                                    bench.pos_ids.flatten()]))
    gw = []
    for _ in range(3):
        t = time.perf_counter()
        got = src.index_select(0, probe)
        gw.append(2 * got.numel() * 4 / (time.perf_counter() - t))
        del got
    row_bandwidth = statistics.median(gw)  # bytes / s
    f4 = 4
    parts: dict[str, list[float]] = {k: [] for k in ("sample", "gather+score", "loss",
                                                      "backward", "optimizer", "step",
                                                      "step, one score call",
                                                      "optimizer, row-wise",
                                                      "step, one call, row-wise")}
    opt_rw = RowAdam(list(table.parameters()), lr=1e-3, row_wise=True)  # opt-in, measured apart

    def step_one_call(opt: Any = None) -> float:
        """``step()`` with positives and negatives scored by one ``score_ids`` call."""
        opt = opt or bench.sparse_opt
        assert opt is not None
        opt.zero_grad(set_to_none=True)
        q.grad = None
        qd = q.detach()
        s = sampler.sample(qd, M)
        pos_lq = sampler.log_prob(qd, bench.pos_ids)
        both = table.score_ids(q, torch.cat([bench.pos_ids, s.ids], dim=1))  # [B, P + M]
        pos_s, neg_s = both.split([P, M], dim=1)
        loss = sampled_softmax_loss(pos_s, bench.pos_ids, bench.pos_mask, pos_lq, neg_s, s.ids,
                                    s.log_q)
        loss.backward()
        opt.step()
        return float(loss.detach())

    distinct: list[int] = []
    for _ in range(args.reps):
        opt = bench.sparse_opt
        assert opt is not None
        opt.zero_grad(set_to_none=True)
        qd = q.detach()
        t0 = time.perf_counter()
        s = sampler.sample(qd, M)
        pos_lq = sampler.log_prob(qd, bench.pos_ids)
        t1 = time.perf_counter()
        pos_s = table.score_ids(q, bench.pos_ids)
        neg_s = table.score_ids(q, s.ids)
        t2 = time.perf_counter()
        loss = sampled_softmax_loss(pos_s, bench.pos_ids, bench.pos_mask, pos_lq, neg_s, s.ids,
                                    s.log_q)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        opt_rw.step()  # the same gradients (the first rep allocates its state: median of 5)
        parts["optimizer, row-wise"].append(time.perf_counter() - t5)
        for k, a, b in (("sample", t0, t1), ("gather+score", t1, t2), ("loss", t2, t3),
                        ("backward", t3, t4), ("optimizer", t4, t5)):
            parts[k].append(b - a)
        distinct.append(int(torch.unique(torch.cat([s.ids.flatten(), bench.pos_ids.flatten()])).numel()))
        t = time.perf_counter()
        step()
        parts["step"].append(time.perf_counter() - t)
        t = time.perf_counter()
        step_one_call()
        parts["step, one score call"].append(time.perf_counter() - t)
        t = time.perf_counter()
        step_one_call(opt_rw)
        parts["step, one call, row-wise"].append(time.perf_counter() - t)
    full_t = []
    for _ in range(args.full_reps):
        t = time.perf_counter()
        full()
        full_t.append(time.perf_counter() - t)
    u = statistics.median(distinct)
    # bytes each part must move at least (float32): gather reads B*(M+P)*d, the backward writes
    # as many gradient rows, the optimizer reads+writes U rows of weight, m and v and reads U
    # gradient rows; the sampler reads the [B, K^2] cell weights a few times
    bound_bytes = {
        "sample": 3 * B * args.codewords ** 2 * f4,
        "gather+score": B * (M + P) * d * f4,
        "loss": 4 * B * M * f4,
        "backward": B * (M + P) * d * f4,
        "optimizer": 7 * u * d * f4,
    }
    bound_bytes["step"] = sum(bound_bytes.values())
    bound_bytes["step, one score call"] = bound_bytes["step"]
    # row-wise: the second moments' [U, d] read and write become [U] ones
    bound_bytes["optimizer, row-wise"] = 5 * u * d * f4
    bound_bytes["step, one call, row-wise"] = bound_bytes["step"] - 2 * u * d * f4
    rows = []
    res: dict[str, Any] = {}
    for k, v in parts.items():
        med = statistics.median(v)
        bound = bound_bytes[k] / bandwidth
        row_bound = bound_bytes[k] / row_bandwidth
        res[k] = {"seconds": med, "bound_s": bound, "row_bound_s": row_bound,
                  "bytes": bound_bytes[k], "times": v}
        rows.append([k, 1e3 * med, 1e3 * bound, med / bound, 1e3 * row_bound])
    full_s = statistics.median(full_t)
    res["full_softmax_step_s"] = full_s
    res["speedup_per_query_vs_full"] = full_s / res["step"]["seconds"]
    res["speedup_one_score_call_vs_full"] = full_s / res["step, one score call"]["seconds"]
    res["speedup_one_call_row_wise_vs_full"] = (
        full_s / res["step, one call, row-wise"]["seconds"])
    res["distinct_rows"] = u
    res["bandwidth_gb_s"] = bandwidth / 1e9
    res["row_gather_gb_s"] = row_bandwidth / 1e9
    payload = {"benchmark": NAME,
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
               "machine": machine_info(device), "results": res}
    out = args.out or (RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.json")
    write_results_and_plot(NAME, payload, out, args.plot, _plot)
    print_table(f"per-query step, L={L}, B={B}, M={M}, d={d}: full softmax {full_s:.2f} s, "
                f"{res['speedup_per_query_vs_full']:.1f}x "
                f"({res['speedup_one_score_call_vs_full']:.1f}x with one score call, "
                f"{res['speedup_one_call_row_wise_vs_full']:.1f}x with it and row-wise); stream "
                f"{bandwidth / 1e9:.2f} GB/s, row gather {row_bandwidth / 1e9:.2f} GB/s",
                ["part", "ms", "memory bound ms", "x bound", "row-gather bound ms"], rows)
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    """Each part's median time against its two memory bounds, and the step's speed-up."""
    plt = pyplot()
    if plt is None:
        return
    res = payload["results"]
    names = [k for k in ("sample", "gather+score", "loss", "backward", "optimizer",
                         "step, one score call") if k in res]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    xs = range(len(names))
    w = 0.27
    ax.bar([x - w for x in xs], [1e3 * res[k]["seconds"] for k in names], w, label="measured")
    ax.bar(list(xs), [1e3 * res[k]["bound_s"] for k in names], w, label="streaming bound")
    ax.bar([x + w for x in xs], [1e3 * res[k]["row_bound_s"] for k in names], w,
           label="row-gather bound")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n.replace(", one score call", "\n(trainer's)") for n in names], fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    cfg = payload["config"]
    ax.set_title(f"per-query MIDX step, L = {cfg['labels']:,}, B = {cfg['batch']}, "
                 f"M = {cfg['negatives']}")
    ax = axes[1]
    speedup_panel(ax, ["two score calls", "one call\n(trainer's)"],
                  [res["speedup_per_query_vs_full"], res["speedup_one_score_call_vs_full"]], 30,
                  f"full step {res['full_softmax_step_s']:.1f} s", ["C7", "C2"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
