"""Render the JSON results in ``benchmarks/results/`` as Markdown tables (for docs/benchmarks.md).

    python benchmarks/report.py                 # every known result file, to stdout
    python benchmarks/report.py output_layer    # one of them
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, fmt  # noqa: E402


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in r) + " |"
            for r in rows]
    return "\n".join(out)


def machine_line(d: dict[str, Any]) -> str:
    m = d.get("machine", {})
    la = m.get("load_average_at_start")
    extra = f", load average at start {la[0]}" if la else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('ram_gib')} GiB RAM{gpu}), "
            f"torch {m.get('torch')}, device {m.get('device')}, torch threads "
            f"{m.get('torch_threads')}{extra}; {m.get('date')}.")


def output_layer(d: dict[str, Any]) -> str:
    idx = {(i["labels"], i["sampler"]): i for i in d.get("index", [])}
    rows = []
    for r in d["results"]:
        mem = r.get("memory", {})
        peak = mem.get("cuda_peak_mb", mem.get("peak_rss_mb"))
        i = idx.get((r["labels"], r["method"].removesuffix("-shared")))
        amort = (r["step_s"] + i["refresh_s"] / d["config"]["refresh_every"]) if i else r["step_s"]
        ratio_amort = (r["step_s"] / amort * r["speedup_vs_full"]) if "speedup_vs_full" in r \
            else None
        rows.append([f"{r['labels']:,}", r["method"], 1e3 * r["step_s"], 1e3 * amort,
                     r.get("speedup_vs_full"), ratio_amort, r["reps"], peak,
                     mem.get("error", "")])
    t1 = _table(["L", "method", "step ms", "step + refresh/N ms", "x vs full",
                 "x vs full (amortised)", "reps", "peak MB", "note"], rows)
    t2 = _table(["L", "MIDX", "first build s", "warm refresh s"],
                [[f"{i['labels']:,}", i["sampler"], i["build_s"], i["refresh_s"]]
                 for i in d.get("index", [])])
    return t1 + "\n\n" + t2


def sampler_quality(d: dict[str, Any]) -> str:
    t1 = _table(["data", "sampler", "K", "KL mean", "KL median", "ESS/M mean", "ESS/M median"],
                [[r["data"], r["sampler"], r["codewords"], r["kl_mean"], r["kl_median"],
                  r["ess_mean"], r["ess_median"]] for r in d["divergence"]])
    t2 = _table(["data", "sampler", "M", "rel. error of mean gradient", "MC floor",
                 "single-draw rel. error"],
                [[r["data"], r["sampler"], r["M"], r["rel_err_of_mean"], r["mc_floor"],
                  r["single_draw_rel_err"]] for r in d["gradient"]])
    return t1 + "\n\n" + t2


def peers(d: dict[str, Any]) -> str:
    keys = ["P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5"]
    rows = []
    errors = []
    for r in d["results"]:
        met = r.get("metrics", {})
        rows.append([r["dataset"], r["method"], *[100 * met[k] if k in met else None
                                                   for k in keys],
                     r.get("train_s"), r.get("predict_ms_per_point"),
                     None if r.get("model_bytes") is None else r["model_bytes"] / 2**20,
                     "error" if "error" in r else ""])
        if "error" in r:
            errors.append(f"- {r['dataset']} / {r['method']}: `{r['error']}`")
    out = _table(["data set", "method", *keys, "train s", "predict ms/point", "size MB", "note"],
                 rows)
    if errors:
        out += "\n\nErrors:\n" + "\n".join(errors)
    return out


def convergence(d: dict[str, Any]) -> str:
    return convergence_levels(d) + "\n\n" + _table(["data", "method", "target P@1", "s to target", "steps to target",
                   "final P@1", "best P@1", "steps in budget"],
                  [[r["data"], r["method"], r["target_P@1"], r["seconds_to_target"]
                    if r["seconds_to_target"] is not None else "not reached",
                    r["steps_to_target"], r["final_P@1"], r["best_P@1"], r["steps_in_budget"]]
                   for r in d["time_to_target"]])


def _time_to(points: list[dict[str, float]], target: float) -> float | None:
    hit = next((p for p in points if p["P@1"] >= target), None)
    return None if hit is None else hit["seconds"]


def convergence_levels(d: dict[str, Any], fracs: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.98)
                       ) -> str:
    """Seconds to reach several fractions of the best P@1 (from the stored curves)."""
    rows = []
    for dname in dict.fromkeys(c["data"] for c in d["curves"]):
        curves = [c for c in d["curves"] if c["data"] == dname]
        best = max((p["P@1"] for c in curves for p in c["points"]), default=0.0)
        for c in curves:
            rows.append([dname, c["method"], *[
                _time_to(c["points"], f * best) if _time_to(c["points"], f * best) is not None
                else "-" for f in fracs]])
    cols = ["data", "method", *[f"s to {f:.0%} of best" for f in fracs]]
    return _table(cols, rows)


def scale(d: dict[str, Any]) -> str:
    r = d["results"]
    keys = ["train_file_mb", "train_wall_s", "epoch_s", "train_peak_rss_mb", "index_build_s",
            "exact_ms_per_query_single", "approx_ms_per_query_single",
            "exact_ms_per_query_batched", "approx_ms_per_query_batched", "approx_recall@5",
            "peak_rss_target_met", "error"]
    syn = r.get("synthetic", {})
    rows = [["write_synthetic_s", syn.get("seconds", "reused")]]
    rows += [[k, r[k]] for k in keys if k in r]
    return _table(["quantity", "value"], [[k, str(v) if isinstance(v, bool) else v]
                                          for k, v in rows])


RENDER = {"output_layer": output_layer, "sampler_quality": sampler_quality, "peers": peers,
          "convergence": convergence, "scale": scale}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="result files (stem) to render")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    names = args.names or sorted(p.stem for p in args.results.glob("*.json"))
    for name in names:
        path = args.results / f"{name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        kind = d.get("benchmark", name)
        if kind not in RENDER:
            continue
        print(f"### {name}\n\n{machine_line(d)}\n\n{RENDER[kind](d)}\n")


if __name__ == "__main__":
    main()
