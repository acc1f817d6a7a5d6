"""Loading speed and peak memory: ``xmc_toolkit.data.load`` vs scikit-learn's svmlight reader.

Generates (once, cached) a random XC text file of about ``--size-mb`` MB, writes a header-less
copy for ``sklearn.datasets.load_svmlight_file(multilabel=True)``, then loads each file in its own
subprocess and reports seconds, MB/s and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``
of that subprocess, and its RSS right after imports, i.e. before loading), plus the ratio.
Results go to ``benchmarks/results/loading.json``.

    python benchmarks/bench_loading.py --size-mb 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# numpy / scipy / xmc_toolkit are imported only in subprocesses: on Linux a child's ru_maxrss
# starts from its parent's RSS at fork time, so this parent process must stay small.

RESULTS = Path(__file__).resolve().parent / "results" / "loading.json"

_CHILD = r"""
import json, resource, sys, time
kind, path, nf = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "xmc":
    from xmc_toolkit.data import load
else:
    from sklearn.datasets import load_svmlight_file
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if kind == "xmc":
    ds = load(path, fmt="xc")
    X, nnz_y = ds.X, ds.Y.nnz
    csr_bytes = sum(a.nbytes for m in (ds.X, ds.Y) for a in (m.data, m.indices, m.indptr))
else:
    X, y = load_svmlight_file(path, multilabel=True, zero_based=True, n_features=nf)
    nnz_y = sum(len(r) for r in y)
    csr_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm = None
try:
    hwm = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
except OSError:
    pass
print(json.dumps({"seconds": dt, "peak_rss_mb": peak / 1024, "rss_after_imports_mb": base / 1024, "vm_hwm_mb": hwm,
                  "rows": X.shape[0], "nnz_x": int(X.nnz), "nnz_y": int(nnz_y),
                  "result_arrays_mb": csr_bytes / 2**20}))
"""


def generate(path: Path, size_mb: float, seed: int = 0) -> tuple[int, int, int]:
    """Write a random XC file of about ``size_mb`` MB (tf-idf-like values with 4 decimals)."""
    import numpy as np
    import scipy.sparse as sp

    from xmc_toolkit.data import append_xc_rows, write_xc_header

    g = np.random.default_rng(seed)
    d, l, per_row, lab_per_row = 100_000, 20_000, 80, 5
    approx_row_bytes = per_row * 13 + lab_per_row * 6
    n = int(size_mb * 1e6 / approx_row_bytes)
    chunk = 20_000
    with open(path, "w", encoding="ascii") as fh:
        write_xc_header(fh, n, d, l)
        for a in range(0, n, chunk):
            m = min(chunk, n - a)
            nnz = g.poisson(per_row, size=m)
            cols = g.integers(0, d, size=int(nnz.sum()))
            rows = np.repeat(np.arange(m), nnz)
            vals = np.round(g.random(len(cols)), 4).astype(np.float32) + np.float32(1e-4)
            X = sp.csr_matrix((vals, (rows, cols)), shape=(m, d))
            X.sum_duplicates()
            X.data = np.minimum(X.data, np.float32(1.0))
            lk = g.poisson(lab_per_row, size=m)
            lcols = np.minimum(g.zipf(1.3, size=int(lk.sum())) - 1, l - 1)
            Y = sp.csr_matrix(
                (np.ones(len(lcols), np.float32), (np.repeat(np.arange(m), lk), lcols)), shape=(m, l)
            )
            Y.data[:] = 1
            Y.sum_duplicates()
            Y.data[:] = 1
            append_xc_rows(fh, X, Y)
    return n, d, l


def run_child(kind: str, path: Path, num_features: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(path), str(num_features)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=200.0)
    ap.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "xmc_bench_loading")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only is not None:
        t = time.perf_counter()
        n, d, l = generate(args.generate_only, args.size_mb)
        print(json.dumps({"n": n, "d": d, "l": l, "generate_seconds": time.perf_counter() - t}))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    xc = args.work_dir / f"random_{int(args.size_mb)}mb.txt"
    svm = args.work_dir / f"random_{int(args.size_mb)}mb.svm"
    meta = args.work_dir / f"random_{int(args.size_mb)}mb.json"
    if not (xc.exists() and svm.exists() and meta.exists()):
        gen = subprocess.run(
            [sys.executable, __file__, "--size-mb", str(args.size_mb), "--generate-only", str(xc)],
            check=True, capture_output=True, text=True,
        )
        with open(xc, "rb") as src, open(svm, "wb") as dst:
            src.readline()  # sklearn reads no header
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        meta.write_text(gen.stdout.strip().splitlines()[-1])
    info = json.loads(meta.read_text())
    size_xc = xc.stat().st_size / 1e6
    size_svm = svm.stat().st_size / 1e6
    ours = run_child("xmc", xc, info["d"])
    theirs = run_child("sklearn", svm, info["d"])
    assert ours["nnz_x"] == theirs["nnz_x"] and ours["nnz_y"] == theirs["nnz_y"], (ours, theirs)
    ours["mb_per_s"] = size_xc / ours["seconds"]
    theirs["mb_per_s"] = size_svm / theirs["seconds"]
    result = {
        "file_mb": size_xc,
        "rows": info["n"],
        "num_features": info["d"],
        "num_labels": info["l"],
        "generate_seconds_writer": info["generate_seconds"],
        "writer_mb_per_s": size_xc / info["generate_seconds"],
        "xmc_load": ours,
        "sklearn_load_svmlight_file": theirs,
        "speed_ratio_xmc_over_sklearn": ours["mb_per_s"] / theirs["mb_per_s"],
        "peak_rss_ratio_xmc_over_sklearn": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        "xmc_extra_rss_over_result_arrays": (ours["peak_rss_mb"] - ours["rss_after_imports_mb"])
        / ours["result_arrays_mb"],
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"file: {size_xc:.1f} MB, {info['n']} rows, nnz(X) {ours['nnz_x']}, nnz(Y) {ours['nnz_y']}")
    print(f"xmc load:     {ours['seconds']:.2f} s  {ours['mb_per_s']:.1f} MB/s  peak RSS {ours['peak_rss_mb']:.0f} MB"
          f" (after imports {ours['rss_after_imports_mb']:.0f} MB; result arrays {ours['result_arrays_mb']:.0f} MB)")
    print(f"sklearn load: {theirs['seconds']:.2f} s  {theirs['mb_per_s']:.1f} MB/s  peak RSS {theirs['peak_rss_mb']:.0f} MB"
          f" (after imports {theirs['rss_after_imports_mb']:.0f} MB)")
    print(f"speed ratio xmc/sklearn: {result['speed_ratio_xmc_over_sklearn']:.2f}x; "
          f"peak RSS ratio: {result['peak_rss_ratio_xmc_over_sklearn']:.2f}x")
    print(f"writer (generate): {result['writer_mb_per_s']:.1f} MB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
