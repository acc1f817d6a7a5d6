"""Throughput of distributed training with 1 and 2 processes (torchrun, gloo on CPU / NCCL on GPU).

Runs ``torchrun --nproc-per-node N -m xmc_toolkit.train --placement sharded`` (``xmc train``
with the label table sharded) on the same data and flags for each ``N`` and reports training examples per second (epochs after the first, validation
excluded) and the ratio to one process, measured in this one run. Writes JSON to
``benchmarks/results/distributed.json`` (or ``--out``).

    python benchmarks/bench_distributed.py                       # synthetic, L = 50,000
    python benchmarks/bench_distributed.py --data ../shared/data/xc/bibtex_train.txt
    python benchmarks/bench_distributed.py --procs 1,2,4 --device cuda

Notes: on a CPU machine every process gets ``--threads`` intra-op threads (default
``cores // N``) so that 1 and N processes use the same cores; the sharded label table splits
the ``[B, L]`` scoring work across processes while each process still encodes only its slice of
the global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(nproc: int, data: str, flags: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "xmc_toolkit.train", "--data", data,
               "--out", tmp, "--placement", "sharded", "--no-consolidate", *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = recs[1:] or recs  # the first epoch warms up
    ex = sum(r["examples_per_s"] * r["seconds"] for r in timed)
    secs = sum(r["seconds"] for r in timed)
    return {"procs": nproc, "threads_per_proc": threads, "examples_per_s": ex / secs,
            "epoch_seconds": secs / len(timed), "final_loss": recs[-1]["loss"],
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="training file (default: synthetic)")
    ap.add_argument("--labels", type=int, default=50_000, help="synthetic: number of labels")
    ap.add_argument("--points", type=int, default=4_000, help="synthetic: training points")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--loss", default="full")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="threads per process (0: cores/N)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distributed.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            sys.path.insert(0, str(REPO))
            from xmc_toolkit.data.synthetic import write_synthetic

            data = str(Path(tmp) / "synth_train.txt")
            write_synthetic(data, args.labels, args.points, 5_000, seed=0)
        flags = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--loss", args.loss, "--device", args.device, "--dropout", "0",
                 "--full-max-labels", str(10**9), "--val-fraction", "0", "--hidden", "256",
                 "--dim", "128"]
        cores = os.cpu_count() or 1
        rows = []
        for n in [int(x) for x in args.procs.split(",")]:
            threads = args.threads or max(1, cores // n)
            rows.append(run(n, data, flags, threads))
            print(f"procs={n} threads/proc={threads}: {rows[-1]['examples_per_s']:.0f} ex/s, "
                  f"{rows[-1]['epoch_seconds']:.2f} s/epoch, final loss "
                  f"{rows[-1]['final_loss']:.4f}", flush=True)
    base = rows[0]["examples_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["examples_per_s"] / base
        print(f"procs={r['procs']}: speed-up x{r['speedup_vs_first']:.2f}")
    result = {"data": args.data or f"synthetic L={args.labels} N={args.points} D=5000",
              "loss": args.loss, "device": args.device, "batch_size": args.batch_size,
              "epochs": args.epochs, "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
