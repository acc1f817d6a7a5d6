"""Choose settings on a validation split carved from the training data (never the test split).

Trains ``Trainer(TrainConfig(**overrides))`` on ``1 - fraction`` of TRAIN and reports the
validation P@k of every epoch (the tables of docs/training.md "Real data with 10^4+ labels"
come from this script):

    python benchmarks/tune_split.py --data ../shared/data/real/kjv-strongs_train.txt \\
        --set '{"hidden": [8192], "label_init": "pifa"}' --threads 1

Writes ``results/tune_split_<tag>.json`` (config, machine, per-epoch history, best epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, apply_threads, machine_info, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="training data set (any format)")
    ap.add_argument("--fraction", type=float, default=0.15, help="validation share of TRAIN")
    ap.add_argument("--split-seed", type=int, default=12345)
    ap.add_argument("--set", default="{}", help="TrainConfig overrides as a JSON object")
    ap.add_argument("--max-points", type=int, default=0, help="use the first N rows (0: all)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model-out", type=Path, default=None,
                    help="also write the model directory there (for benchmarks/rerank_study.py)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from xmc_toolkit.data import XMCDataset, load
    from xmc_toolkit.train import TrainConfig, Trainer, _split

    overrides = json.loads(args.set)
    if args.quick:
        overrides = {"epochs": 1, "hidden": [32], "dim": 16, "ensemble": 1, **overrides}
        args.max_points = args.max_points or 300
    ds = load(args.data)
    if args.max_points:
        ds = XMCDataset(ds.X[: args.max_points], ds.Y[: args.max_points])
    train, val = _split(ds, args.fraction, args.split_seed)
    cfg = TrainConfig().merged({"device": args.device, **overrides})
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "epoch_end":
            rec = {k: v for k, v in payload.items()
                   if k in ("epoch", "loss", "seconds") or k.startswith("val/P@")}
            rec["wall_s"] = time.perf_counter() - t0
            history.append(rec)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in rec.items()}), flush=True)

    trainer = Trainer(cfg, callbacks=(on_event,), out_dir=args.model_out)
    res = trainer.fit(train, val)
    payload = {"benchmark": "tune_split", "data": str(args.data), "fraction": args.fraction,
               "split_seed": args.split_seed, "overrides": overrides,
               "config": trainer.config.to_dict(), "machine": machine_info(cfg.device),
               "history": history, "best_epoch": res.best_epoch,
               "best": {k: res.best[k] for k in ("P@1", "P@3", "P@5") if k in res.best}}
    out = args.out or (RESULTS_DIR / f"tune_split_{args.tag}.json")
    write_results("tune_split", payload, out)
    print("best", res.best_epoch, json.dumps(payload["best"]))
    return payload


if __name__ == "__main__":
    main()
