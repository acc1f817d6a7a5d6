"""Output-layer training-step time and peak memory vs the number of labels.

One training step of the output layer (a ``LabelTable`` = sparse ``nn.Embedding(L, d)``) for a
batch of ``B`` query embeddings with ``P`` positives each:

* ``full``: exact chunked full softmax (``losses.full_softmax_loss``), forward + backward (dense
  ``[L, d]`` gradient) + ``torch.optim.Adam`` step.
* ``<sampler>`` / ``<sampler>-shared``: sample ``M`` negatives per query (or ``M`` shared by the
  batch), score positives and negatives with ``LabelTable.score_ids``, ``sampled_softmax_loss``
  (log-q corrected), backward (sparse gradient) + ``torch.optim.SparseAdam`` step. MIDX index
  (re)builds are timed apart (``build`` = first ``update``, ``refresh`` = a warm-started one) and
  also reported amortised over ``--refresh-every`` steps.

Timing: for each ``L`` every method runs in the same process, in interleaved rounds, and the
median over rounds is reported with its ratio to ``full`` (full softmax at the largest sizes may
get fewer rounds: ``--full-reps-large``). Peak memory: one subprocess per configuration
(``VmHWM`` of that process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/bench_output_layer.py                    # L = 1e4 .. 4e6 (long on CPU)
    python benchmarks/bench_output_layer.py --labels 10000,1000000 --no-memory
    python benchmarks/bench_output_layer.py --quick            # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    apply_threads,
    machine_info,
    print_table,
    pyplot,
    sync,
    vm_hwm_mb,
    vm_rss_mb,
    write_results,
    write_results_and_plot,
)

NAME = "output_layer"
ALL_METHODS = (
    "full",
    "uniform",
    "uniform-shared",
    "popularity",
    "midx-pq",
    "midx-rq",
    "midx-pq-shared",
    "midx-rq-shared",
)


def _parse_labels(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


class Bench:
    """State of one label count: table, positives, queries, samplers, optimizers.

    Args:
        L: labels. d: dimension. B: batch. M: negatives. P: positives per row.
        device: torch device. codewords: MIDX K. chunk: full-softmax chunk size.
        methods: which methods to prepare. seed: RNG seed.
    """

    def __init__(self, L: int, d: int, B: int, M: int, P: int, device: Any, codewords: int,
                 chunk: int, methods: list[str], full_optimizer: str, seed: int = 0,
                 sparse_optimizer: str = "sparseadam") -> None:
        import numpy as np
        import torch

        from xmc_toolkit.output_layer import LabelTable
        from xmc_toolkit.sampling import make_sampler

        torch.manual_seed(seed)
        g = np.random.default_rng(seed)
        self.device, self.M, self.chunk = device, M, chunk
        self.table = LabelTable(L, d, bias=False, init_std=0.1).to(device)
        # Zipf label frequencies (random label order), positives drawn from them
        ranks = g.permutation(L)
        counts = np.floor(1e5 / (ranks + 1.0) ** 1.1)
        p = (counts + 1) / (counts + 1).sum()
        pos = g.choice(L, size=(B, P), p=p)
        self.pos_ids = torch.as_tensor(pos, dtype=torch.int64, device=device)  # [B, P]
        self.pos_mask = torch.ones(B, P, dtype=torch.bool, device=device)  # [B, P]
        self.queries = torch.randn(B, d, device=device).requires_grad_(True)  # encoder output
        self.samplers: dict[str, Any] = {}
        self.build_s: dict[str, float] = {}
        self.refresh_s: dict[str, float] = {}
        self.sparse_opt: torch.optim.Optimizer | None = None
        self.full_opt: torch.optim.Optimizer | None = None
        self.full_optimizer = full_optimizer
        self.sparse_optimizer = sparse_optimizer
        emb = self.table.label_embeddings()
        for m in methods:
            if m == "full":
                continue
            base = m.removesuffix("-shared")
            if base in self.samplers:
                continue
            kw: dict[str, Any] = {}
            if base.startswith("midx"):
                kw = {"num_codewords": min(codewords, L), "seed": seed}
            s = make_sampler(base, L, label_counts=counts, **kw)
            if s.needs_update:
                sync(device)
                t = time.perf_counter()
                s.update(emb)
                sync(device)
                self.build_s[base] = time.perf_counter() - t
                t = time.perf_counter()
                s.update(emb, full=True)  # a warm re-cluster (incremental: bench_refresh.py)
                sync(device)
                self.refresh_s[base] = time.perf_counter() - t
            self.samplers[base] = s

    def step_fn(self, method: str) -> Callable[[], float]:
        """A closure running one training step of ``method``; returns the loss value."""
        import torch

        from xmc_toolkit.losses import full_softmax_loss, sampled_softmax_loss

        table, q = self.table, self.queries
        if method == "full":

            def full_step() -> float:
                if self.full_opt is None:
                    if self.full_optimizer == "sgd":
                        self.full_opt = torch.optim.SGD(table.parameters(), lr=0.1)
                    else:
                        self.full_opt = torch.optim.Adam(table.parameters(), lr=1e-3)
                self.full_opt.zero_grad(set_to_none=True)
                q.grad = None
                loss = full_softmax_loss(q, table.weight.weight, self.pos_ids, self.pos_mask,
                                         chunk_size=self.chunk)
                loss.backward()
                self.full_opt.step()
                return float(loss.detach())

            return full_step
        shared = method.endswith("-shared")
        sampler = self.samplers[method.removesuffix("-shared")]

        def sampled_step() -> float:
            if self.sparse_opt is None:
                if self.sparse_optimizer == "rowadam":  # the trainer's default
                    from xmc_toolkit.sparse_optim import RowAdam

                    self.sparse_opt = RowAdam(list(table.parameters()), lr=1e-3)
                else:
                    self.sparse_opt = torch.optim.SparseAdam(list(table.parameters()), lr=1e-3)
            self.sparse_opt.zero_grad(set_to_none=True)
            q.grad = None
            qd = q.detach()
            s = sampler.sample(qd, self.M, shared=shared)  # ids [B, M] or [M]
            pos_lq = sampler.log_prob(qd, self.pos_ids, shared=shared)  # [B, P] (mixture if shared)
            pos_s = table.score_ids(q, self.pos_ids)  # [B, P]
            neg_s = table.score_ids(q, s.ids)  # [B, M]
            loss = sampled_softmax_loss(pos_s, self.pos_ids, self.pos_mask, pos_lq, neg_s,
                                        s.ids, s.log_q)
            loss.backward()
            self.sparse_opt.step()
            return float(loss.detach())

        return sampled_step


def _child_memory(args: argparse.Namespace) -> None:
    """Subprocess: build one configuration, run two steps, print peak memory as JSON."""
    import torch

    from xmc_toolkit.device import resolve_device

    device = resolve_device(args.device)
    method, L = args.child_memory[0], int(args.child_memory[1])
    base_rss = vm_rss_mb()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bench = Bench(L, args.dim, args.batch, args.negatives, args.positives, device,
                  args.codewords, args.chunk_size, [method], args.full_optimizer)
    sync(device)
    setup_rss = vm_rss_mb()
    setup_cuda = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    fn = bench.step_fn(method)
    for _ in range(2):
        fn()
    sync(device)
    out = {
        "method": method,
        "labels": L,
        "rss_after_imports_mb": base_rss,
        "rss_after_setup_mb": setup_rss,
        "peak_rss_mb": vm_hwm_mb(),
    }
    if cuda:
        out["cuda_after_setup_mb"] = setup_cuda
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def _run_memory(args: argparse.Namespace, method: str, L: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", method, str(L),
           "--dim", str(args.dim), "--batch", str(args.batch), "--negatives",
           str(args.negatives), "--positives", str(args.positives), "--codewords",
           str(args.codewords), "--chunk-size", str(args.chunk_size), "--device", args.device,
           "--full-optimizer", args.full_optimizer, "--threads", str(args.threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             timeout=args.memory_timeout)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {"method": method, "labels": L, "error": f"exit {exc.returncode}: {tail[0]}"}
    except subprocess.TimeoutExpired:
        return {"method": method, "labels": L, "error": f"timeout {args.memory_timeout}s"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=_parse_labels, default=[10_000, 100_000, 1_000_000,
                                                              4_000_000],
                    help="comma-separated label counts (default 1e4,1e5,1e6,4e6)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=1024, help="M")
    ap.add_argument("--positives", type=int, default=4, help="positives per row P")
    ap.add_argument("--codewords", type=int, default=64, help="MIDX codewords per codebook K")
    ap.add_argument("--chunk-size", type=int, default=65536, help="full-softmax label chunk")
    ap.add_argument("--methods", default=",".join(ALL_METHODS),
                    help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--full-reps-large", type=int, default=2,
                    help="rounds of full softmax for L >= --large")
    ap.add_argument("--large", type=int, default=2_000_000)
    ap.add_argument("--refresh-every", type=int, default=100,
                    help="steps between MIDX index refreshes (for the amortised column)")
    ap.add_argument("--full-optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-config subprocesses")
    ap.add_argument("--memory-methods", default=None,
                    help="methods measured for peak memory (default: all of --methods)")
    ap.add_argument("--memory-timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in children (0: torch default; 1 on a loaded "
                         "machine)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    ap.add_argument("--child-memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    from xmc_toolkit.device import resolve_device

    apply_threads(args.threads)
    if args.child_memory:
        _child_memory(args)
        return {}
    if args.quick:
        args.dim, args.batch, args.negatives = 16, 32, 64
        args.codewords, args.reps, args.chunk_size = 8, 2, 4096
        args.labels = [2000]
        if args.memory_methods is None:
            args.memory_methods = "midx-pq"
    device = resolve_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {','.join(ALL_METHODS)}")
    out_path = args.out or (RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("child_memory", "out", "plot")}
    config["device"] = str(device)
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device), "results": []}
    rows: list[list[Any]] = []
    for L in args.labels:
        bench = Bench(L, args.dim, args.batch, args.negatives, args.positives, device,
                      args.codewords, args.chunk_size, methods, args.full_optimizer)
        fns = {m: bench.step_fn(m) for m in methods}
        for m in methods:  # warm-up (allocates optimizer state)
            fns[m]()
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.reps):
            for m in methods:
                if m == "full" and L >= args.large and r >= args.full_reps_large:
                    continue
                sync(device)
                t = time.perf_counter()
                fns[m]()
                sync(device)
                times[m].append(time.perf_counter() - t)
        med = {m: statistics.median(v) for m, v in times.items()}
        ref = med.get("full")
        payload.setdefault("index", []).extend(
            {"labels": L, "sampler": s, "build_s": bench.build_s[s],
             "refresh_s": bench.refresh_s[s]} for s in bench.build_s)
        del fns, bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for m in methods:
            rec: dict[str, Any] = {"labels": L, "method": m, "step_s": med[m],
                                   "step_times_s": times[m], "reps": len(times[m])}
            if ref is not None:
                rec["speedup_vs_full"] = ref / med[m]
            payload["results"].append(rec)
        mem_methods = methods if args.memory_methods is None else [
            m for m in methods if m in args.memory_methods.split(",")]
        if not args.no_memory:
            for m in mem_methods:
                mem = _run_memory(args, m, L)
                for rec in payload["results"]:
                    if rec["labels"] == L and rec["method"] == m:
                        rec["memory"] = mem
        write_results(NAME, payload, out_path)  # partial results survive an interruption
    _finish(payload, args, out_path, rows)
    return payload


def _finish(payload: dict[str, Any], args: argparse.Namespace, out_path: Path,
            rows: list[list[Any]]) -> None:
    idx = {(i["labels"], i["sampler"]): i for i in payload.get("index", [])}
    for rec in payload["results"]:
        base = rec["method"].removesuffix("-shared")
        i = idx.get((rec["labels"], base))
        if i is not None:
            rec["step_plus_refresh_s"] = rec["step_s"] + i["refresh_s"] / args.refresh_every
        mem = rec.get("memory", {})
        peak = mem.get("cuda_peak_mb", mem.get("peak_rss_mb"))
        rows.append([rec["labels"], rec["method"], rec["step_s"] * 1e3,
                     rec.get("step_plus_refresh_s", rec["step_s"]) * 1e3,
                     rec.get("speedup_vs_full"), peak, mem.get("error", "")])
    print_table(f"output-layer step (d={args.dim}, B={args.batch}, M={args.negatives}, "
                f"device={payload['config']['device']})",
                ["labels", "method", "step ms", "step+refresh/N ms", "x vs full", "peak MB",
                 "note"], rows)
    if payload.get("index"):
        print_table("MIDX index", ["labels", "sampler", "build s", "refresh s"],
                    [[i["labels"], i["sampler"], i["build_s"], i["refresh_s"]]
                     for i in payload["index"]])
    write_results_and_plot(NAME, payload, out_path, args.plot, _plot)


def _plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in payload["results"]))
    for i, m in enumerate(methods):
        rs = [r for r in payload["results"] if r["method"] == m]
        xs = [r["labels"] for r in rs]
        style = {"marker": "o", "label": m, "color": f"C{i}",
                 "ls": "--" if m.endswith("-shared") else "-"}
        axes[0].plot(xs, [r["step_s"] * 1e3 for r in rs], **style)
        if m != "full" and all("speedup_vs_full" in r for r in rs):
            axes[1].plot(xs, [r["speedup_vs_full"] for r in rs], **style)
    for ax, yl in zip(axes, ("step time (ms)", "speed-up vs full softmax")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("labels L")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(200, color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    c = payload["config"]
    fig.suptitle(f"output-layer training step: d={c['dim']}, B={c['batch']}, M={c['negatives']},"
                 f" {c['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
