"""Sampling cost of uniform / popularity / MIDX against scoring the sampled labels.

Everything is measured in ONE run on one machine and reported as ratios, so the numbers stay
meaningful on a loaded machine. The reference cost is scoring the ``[B, M]`` samples, i.e.
``einsum("bd,bmd->bm", queries, W[ids])`` -- the work any sampled softmax step does anyway.

    python benchmarks/bench_sampling.py                      # L=1M, d=128, B=256, M=1024, K=64
    python benchmarks/bench_sampling.py --labels 100000 --device cuda

Writes ``benchmarks/results/sampling.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from xmc_toolkit.device import resolve_device
from xmc_toolkit.sampling import MIDXSampler, PopularitySampler, UniformSampler


def _timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    L, d, B, M, K = args.labels, args.dim, args.batch, args.samples, args.K
    g = torch.Generator(device=device).manual_seed(args.seed)

    # clustered label table: 4K centres, unit noise; queries near random labels
    centres = 3.0 * torch.randn(4 * K, d, device=device, generator=g)
    w = centres[torch.randint(4 * K, (L,), device=device, generator=g)]
    w += torch.randn(L, d, device=device, generator=g)
    w /= w.norm(dim=1, keepdim=True) / 3.0  # [L, d], norm 3
    queries = w[torch.randint(L, (B,), device=device, generator=g)] + 0.1 * torch.randn(B, d, device=device, generator=g)
    counts = torch.randint(0, 1000, (L,), generator=torch.Generator().manual_seed(args.seed)).float()

    results: dict[str, float] = {}
    midx = MIDXSampler(L, K, quantizer="pq", seed=args.seed, kmeans_iters=args.kmeans_iters)
    t0 = time.perf_counter()
    midx.update(w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results["midx_update_first_s"] = time.perf_counter() - t0
    results["midx_update_warm_s"] = _timeit(lambda: midx.update(w), device, 1, warmup=0)
    midx_rq = MIDXSampler(L, K, quantizer="rq", seed=args.seed, kmeans_iters=args.kmeans_iters)
    t0 = time.perf_counter()
    midx_rq.update(w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results["midx_rq_update_first_s"] = time.perf_counter() - t0
    # popularity within cells: warm-started from the pq codebooks (one k-means iteration)
    midx_pop = MIDXSampler(
        L, K, within_cell="popularity", label_counts=counts, seed=args.seed, warm_start_iters=1
    )
    midx_pop.codebooks = midx.codebooks
    midx_pop.update(w)

    uni = UniformSampler(L)
    pop = PopularitySampler(counts)
    ids = uni.sample(queries, M, generator=g).ids  # [B, M]

    def score() -> torch.Tensor:
        return torch.einsum("bd,bmd->bm", queries, w[ids])  # [B, M]

    def score_shared() -> torch.Tensor:
        return queries @ w[ids[0]].t()  # [B, M]

    r = args.repeats
    results["score_sampled_s"] = _timeit(score, device, r)
    results["score_shared_s"] = _timeit(score_shared, device, r)
    results["uniform_sample_s"] = _timeit(lambda: uni.sample(queries, M, generator=g), device, r)
    results["popularity_sample_s"] = _timeit(lambda: pop.sample(queries, M, generator=g), device, r)
    results["midx_sample_s"] = _timeit(lambda: midx.sample(queries, M, generator=g), device, r)
    results["midx_sample_shared_s"] = _timeit(lambda: midx.sample(queries, M, shared=True, generator=g), device, r)
    results["midx_rq_sample_s"] = _timeit(lambda: midx_rq.sample(queries, M, generator=g), device, r)
    results["midx_popularity_sample_s"] = _timeit(lambda: midx_pop.sample(queries, M, generator=g), device, r)
    results["midx_log_prob_s"] = _timeit(lambda: midx.log_prob(queries, ids), device, r)

    base = results["score_sampled_s"]
    ratios = {
        "midx_sample / score": results["midx_sample_s"] / base,
        "midx_sample_shared / score": results["midx_sample_shared_s"] / base,
        "midx_rq_sample / score": results["midx_rq_sample_s"] / base,
        "midx_popularity_sample / score": results["midx_popularity_sample_s"] / base,
        "uniform_sample / score": results["uniform_sample_s"] / base,
        "popularity_sample / score": results["popularity_sample_s"] / base,
        "midx_sample / uniform_sample": results["midx_sample_s"] / results["uniform_sample_s"],
    }
    meta = {
        "labels": L, "dim": d, "batch": B, "samples": M, "K": K, "kmeans_iters": args.kmeans_iters,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "repeats": r,
    }
    print(f"MIDX sampling benchmark on {meta['device']} ({meta['device_name']}), "
          f"L={L} d={d} B={B} M={M} K={K}, load average {meta['load_average_1min']}")
    for k, v in results.items():
        print(f"  {k:28s} {v * 1e3:10.2f} ms")
    print("ratios (same run):")
    for k, v in ratios.items():
        print(f"  {k:34s} {v:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "seconds": results, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
