"""Approximate top-k for serving at 10^6 labels: hnswlib / faiss (optional) vs the MIDX index.

On a trained model (``--model``, e.g. the one ``bench_scale.py`` leaves in its ``--work``
folder) and its test rows (``--data``): the query embeddings of ``--queries`` rows, the exact
top-``k`` (``chunked_topk`` over all labels), and for each backend a sweep of its search effort
(hnsw ``ef``, faiss-ivf ``nprobe``, MIDX probed cells): milliseconds per query one query at a
time (median of ``--single-queries``), in batches of ``--batch``, and recall@k against the
exact top-k over all queries. The bias is folded into the vectors as ``xmc export --fold-bias``
does (``xmc_toolkit.ann``). Index build times are reported apart (one thread).

    python benchmarks/bench_ann.py --threads 1 --model /tmp/xmc_bench_scale/<tag>_model \\
        --data /tmp/xmc_bench_scale/<tag>_test.txt
    python benchmarks/bench_ann.py --synthetic 100000       # a random clustered table instead
    python benchmarks/bench_ann.py --quick
"""

from __future__ import annotations

import argparse
import statistics
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
    write_results,
    write_results_and_plot,
)

NAME = "ann"
SWEEPS = {"hnsw": [8, 12, 16, 24, 32, 48, 64, 128], "faiss-ivf": [1, 2, 4, 8, 16, 32, 64],
          "midx": [16, 64, 256, 1024], "midx-adaptive": [1000, 3000, 10000, 30000]}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _synthetic(L: int, d: int, n: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """A clustered label table with a popularity-like bias and queries near labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = max(2, int(L ** 0.5))
    centers = torch.randn(c, d, generator=g)
    w = centers[torch.randint(c, (L,), generator=g)] + 0.5 * torch.randn(L, d, generator=g)
    b = -0.5 * torch.log1p(torch.arange(L, dtype=torch.float32))[torch.randperm(L, generator=g)]
    q = w[torch.randint(L, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return w.contiguous(), b, q.contiguous()


def _from_model(model_dir: Path, data: Path, n: int) -> tuple[Any, Any, Any, Any]:
    import torch

    from xmc_toolkit.data import load
    from xmc_toolkit.model import XMCModel

    model = XMCModel.load(model_dir, device="cpu")
    te = load(data)
    n = min(n, te.X.shape[0])
    q = torch.as_tensor(model.encode(te.X[:n])).float().contiguous()  # [n, d]
    labels = model.fitted.network.labels
    return labels.label_embeddings().float(), labels.bias_vector(), q, model.fitted


def _time(fn: Callable[[Any], Any], q: Any, singles: int, batch: int) -> tuple[float, float, Any]:
    import torch

    fn(q[:2])  # warm-up
    ts = []
    for i in range(min(singles, q.shape[0])):
        t = time.perf_counter()
        fn(q[i: i + 1])
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    ids = torch.cat([fn(q[i: i + batch]) for i in range(0, q.shape[0], batch)])
    batched = (time.perf_counter() - t) / q.shape[0]
    return 1e3 * statistics.median(ts), 1e3 * batched, ids


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="trained model folder")
    ap.add_argument("--data", type=Path, default=None, help="test rows for the queries")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="use a random clustered table of this many labels instead of a model")
    ap.add_argument("--dim", type=int, default=128, help="dimension of --synthetic")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--single-queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backends", default="faiss-ivf,midx,midx-adaptive,hnsw",
                    help="midx: the index's best cells by codeword score; midx-adaptive: cells "
                         "by codeword score + the cell's largest bias until a candidate budget "
                         "is filled (the sweep's effort)")
    ap.add_argument("--hnsw-M", type=int, default=16)
    ap.add_argument("--hnsw-ef-construction", type=int, default=80)
    ap.add_argument("--build-threads", type=int, default=1,
                    help="threads of the index builds (queries always run on one)")
    ap.add_argument("--faiss-nlist", type=int, default=0, help="0: about 4 sqrt(L)")
    ap.add_argument("--hnsw-ef", type=_ints, default=SWEEPS["hnsw"])
    ap.add_argument("--faiss-nprobe", type=_ints, default=SWEEPS["faiss-ivf"])
    ap.add_argument("--midx-cells", type=_ints, default=SWEEPS["midx"])
    ap.add_argument("--midx-budgets", type=_ints, default=SWEEPS["midx-adaptive"])
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--target-ms", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the ANN libraries run on the CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine the results of earlier runs on the same model (JSON files) "
                         "into --out and its plot instead of measuring")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if args.merge:
        return _merge(args.merge, args.out or RESULTS_DIR / f"{NAME}.json", args.plot)

    import torch

    from xmc_toolkit.ann import available_backends, build_ann_index
    from xmc_toolkit.output_layer import approx_topk, chunked_topk, recall_at_k_vs_exact
    from xmc_toolkit.sampling import MIDXSampler

    if args.quick:
        args.synthetic, args.dim, args.queries, args.single_queries = 3000, 16, 100, 10
        args.hnsw_ef, args.faiss_nprobe, args.midx_cells = [8, 32], [1, 4], [4, 16]
        args.midx_budgets = [100, 300]
    out_path = args.out or (RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info("cpu"), "results": []}
    fitted = None
    if args.synthetic:
        w, b, q = _synthetic(args.synthetic, args.dim, args.queries)
        payload["source"] = f"synthetic clustered table, L={args.synthetic}, d={args.dim}"
    else:
        if args.model is None or args.data is None:
            ap.error("give --model and --data, or --synthetic L")
        w, b, q, fitted = _from_model(args.model, args.data, args.queries)
        payload["source"] = f"model {args.model}"
    L = w.shape[0]
    k = args.k
    payload["labels"], payload["dim"], payload["queries"] = L, w.shape[1], q.shape[0]
    with torch.no_grad():
        ms1, msb, exact_ids = _time(lambda x: chunked_topk(x, w, b, k)[1], q,
                                    args.single_queries, args.batch)
    payload["exact"] = {"ms_single": ms1, "ms_batched": msb}
    res = payload["results"]
    avail = available_backends()
    payload["available_backends"] = avail
    midx_index: Any = None
    midx_build = 0.0
    for backend in [s.strip() for s in args.backends.split(",") if s.strip()]:
        if not backend.startswith("midx") and backend not in avail:
            payload.setdefault("skipped", []).append(f"{backend}: not installed")
            continue
        t = time.perf_counter()
        if backend.startswith("midx"):
            if midx_index is None:
                if fitted is not None and fitted.sampler_state is not None:
                    from xmc_toolkit.evaluate import build_index

                    midx_index = build_index(fitted)
                else:
                    midx_index = MIDXSampler(L, min(64, L), seed=0)
                    midx_index.update(w, b)
                midx_build = time.perf_counter() - t
            index = midx_index
            build = {"seconds": midx_build, "K": index.num_codewords}
            C = index.num_codewords ** 2
            if backend == "midx":
                efforts = [c for c in args.midx_cells if c <= C]

                def run(x: Any, e: int = 0) -> Any:
                    return approx_topk(x, w, b, index, k, num_cells=e)[1]
            else:
                efforts = [m for m in args.midx_budgets if m <= L]

                def run(x: Any, e: int = 0) -> Any:
                    return approx_topk(x, w, b, index, k, num_cells=C, max_candidates=e,
                                       bias_bound=True)[1]
        else:
            params: dict[str, Any] = {}
            if backend == "hnsw":
                params = {"M": args.hnsw_M, "ef_construction": args.hnsw_ef_construction}
                efforts = args.hnsw_ef
            else:
                if args.faiss_nlist:
                    params = {"nlist": args.faiss_nlist}
                efforts = args.faiss_nprobe
            ann = build_ann_index(w, b, backend, threads=args.build_threads, **params)
            build = {"seconds": ann.build_s, **ann.params}

            def run(x: Any, e: int = 0) -> Any:
                return ann.search(x, k, effort=e)[1]
        payload.setdefault("build", {})[backend] = build
        for e in efforts:
            with torch.no_grad():
                s1, sb, ids = _time(lambda x: run(x, e), q, args.single_queries, args.batch)
            rec = {"backend": backend, "effort": e, "ms_single": s1, "ms_batched": sb,
                   "recall": recall_at_k_vs_exact(ids, exact_ids)}
            res.append(rec)
            write_results(NAME, payload, out_path)
    payload["summary"] = _summary(payload)
    print_table(f"approximate top-{k}: {payload['source']} ({q.shape[0]} queries)",
                ["backend", "effort", "ms/query single", "ms/query batched", f"recall@{k}"],
                [["exact", "-", ms1, msb, 1.0]]
                + [[r["backend"], r["effort"], r["ms_single"], r["ms_batched"], r["recall"]]
                   for r in res])
    print_table("index builds", ["backend", "seconds", "params"],
                [[bk, v["seconds"], {a: c for a, c in v.items() if a != "seconds"}]
                 for bk, v in payload.get("build", {}).items()])
    write_results_and_plot(NAME, payload, out_path, args.plot, _plot)
    return payload


def _summary(payload: dict[str, Any]) -> dict[str, Any]:
    c = payload["config"]
    ok = [r for r in payload["results"] if r["recall"] >= c["target_recall"]]
    best = min(ok, key=lambda r: r["ms_single"]) if ok else None
    return {"best_meeting_recall": best,
            "target_met": bool(best and best["ms_single"] <= c["target_ms"]),
            "target": f"recall@{c['k']} >= {c['target_recall']} at <= {c['target_ms']} ms per "
                      "query"}


def _merge(paths: list[Path], out: Path, plot: Path | None) -> dict[str, Any]:
    """One payload from several runs: the first run's exact timings and configuration, every
    run's sweep rows (each tagged with its run), builds and machines."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    payload = dict(runs[0])
    payload["results"] = [dict(r, run=i) for i, d in enumerate(runs) for r in d["results"]]
    payload["build"] = {k: v for d in runs for k, v in d.get("build", {}).items()}
    payload["runs"] = [{"file": str(p), "machine": d["machine"], "config": d["config"],
                        "exact": d.get("exact")} for p, d in zip(paths, runs)]
    payload["summary"] = _summary(payload)
    write_results_and_plot(NAME, payload, out, plot, _plot)
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    backends = list(dict.fromkeys(r["backend"] for r in payload["results"]))
    for i, bk in enumerate(backends):
        rs = [r for r in payload["results"] if r["backend"] == bk]
        for ax, key in zip(axes, ("ms_single", "ms_batched")):
            ax.plot([r[key] for r in rs], [r["recall"] for r in rs], "o-", color=f"C{i}",
                    label=bk)
    for ax, key, title in zip(axes, ("ms_single", "ms_batched"),
                              ("one query at a time", "batched")):
        ax.axvline(payload["exact"][key], color="k", ls=":", lw=0.8, label="exact scan")
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (one thread)")
        ax.set_ylabel(f"recall@{payload['config']['k']} vs exact")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(payload["config"]["target_recall"], color="C3", ls="--", lw=0.8)
    axes[0].axvline(payload["config"]["target_ms"], color="C3", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"approximate top-k, L = {payload['labels']:,}: {payload['source']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
