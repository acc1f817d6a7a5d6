"""Sampler quality: proposal divergence and bias of the sampled-softmax gradient.

For each data set and sampler (uniform, popularity, log-uniform, MIDX pq / rq):

* ``KL(softmax || proposal)`` and the normalized effective sample size ``ESS/M`` per query
  (``xmc_toolkit.sampling.proposal_divergence``), averaged over ``--queries`` test queries.
* Gradient bias: the gradient of ``sampled_softmax_loss`` w.r.t. the queries ``[B, d]``,
  averaged over ``--draws`` independent draws, against the exact gradient of
  ``full_softmax_loss``: ``rel_err = ||mean_r g_r - g|| / ||g||``. Its Monte-Carlo floor
  ``se = ||std. error of the mean|| / ||g||`` is reported beside it (``rel_err >> se`` means
  real bias), and ``single = mean_r ||g_r - g|| / ||g||`` (bias + variance of one step).

Data sets:

* ``bibtex``: a model trained here with ``XMCModel`` (full softmax, a few epochs) on the
  Bibtex training split (``../shared/data``; skipped when absent); queries are encoded test rows,
  positives their test labels, the softmax is over the trained label table (with bias).
* ``synthetic``: clustered label embeddings (``--syn-labels`` labels in ``sqrt(L)`` clusters,
  Zipf popularity) and queries near one positive label each -- the geometry a trained XMC model
  has, at a size where Bibtex has too few labels to matter.

    python benchmarks/bench_sampler_quality.py
    python benchmarks/bench_sampler_quality.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    apply_threads,
    auto_codewords,
    machine_info,
    print_table,
    pyplot,
    shared_data_dir,
    write_results,
    write_results_and_plot,
)

NAME = "sampler_quality"
SAMPLERS = ("uniform", "popularity", "log-uniform", "midx-pq", "midx-rq")


def bibtex_problem(args: argparse.Namespace, device: Any) -> dict[str, Any] | None:
    """Train a quick model on Bibtex; return queries, table, positives and label counts."""
    import numpy as np
    import torch

    from xmc_toolkit.batching import csr_to_padded
    from xmc_toolkit.data import load
    from xmc_toolkit.model import XMCModel

    root = shared_data_dir()
    if root is None or not (root / "xc" / "bibtex_train.txt").exists():
        return None
    tr = load(root / "xc" / "bibtex_train.txt")
    te = load(root / "xc" / "bibtex_test.txt")
    t = time.perf_counter()
    model = XMCModel(loss="full", epochs=args.bibtex_epochs, dim=args.dim, hidden=(512,),
                     device=str(device), seed=0, warmup_steps=10)
    model.fit(tr.X, tr.Y)
    train_s = time.perf_counter() - t
    metrics = model.evaluate(te.X, te.Y)
    Yte = te.Y.tocsr()
    keep = np.flatnonzero(np.diff(Yte.indptr) > 0)[: args.queries]  # rows with labels
    q = torch.as_tensor(model.encode(te.X[keep]), device=device)  # [B, d]
    pos_ids, pos_mask = csr_to_padded(Yte[keep], device=device)  # [B, P]
    b = model.label_bias()
    return {
        "name": "bibtex",
        "queries": q,
        "weight": torch.as_tensor(model.label_embeddings(), device=device),  # [L, d]
        "bias": None if b is None else torch.as_tensor(b, device=device),  # [L]
        "pos_ids": pos_ids,
        "pos_mask": pos_mask,
        "counts": np.asarray(tr.Y.sum(axis=0)).ravel(),
        "info": {"train_seconds": train_s, "epochs": args.bibtex_epochs,
                 "test_P@1": metrics.get("P@1"), "test_P@5": metrics.get("P@5"),
                 "labels": int(tr.Y.shape[1])},
    }


def synthetic_problem(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Clustered label embeddings with Zipf popularity and queries near a positive label."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(1)
    L, d, B = args.syn_labels, args.dim, args.queries
    C = max(2, int(round(L ** 0.5)))
    centers = torch.randn(C, d, generator=g)  # [C, d]
    cluster = torch.randint(0, C, (L,), generator=g)  # [L]
    w = centers[cluster] + 0.6 * torch.randn(L, d, generator=g)  # [L, d]
    w = w / w.norm(dim=1, keepdim=True)
    rank = torch.randperm(L, generator=g).double()
    pop = 1.0 / (rank + 1.0) ** 1.1  # [L] Zipf popularity
    counts = np.floor(1e6 * (pop / pop.sum()).numpy())
    pos = torch.multinomial(pop, B, replacement=True, generator=g)  # [B] one positive each
    q = w[pos] + 0.3 * torch.randn(B, d, generator=g) / d**0.5  # [B, d]
    q = args.syn_scale * q / q.norm(dim=1, keepdim=True)  # scale = inverse temperature
    bias = 0.5 * torch.log(pop / pop.max()).float()  # [L] popular labels score higher
    return {
        "name": f"synthetic-{L}",
        "queries": q.to(device),
        "weight": w.to(device),
        "bias": bias.to(device),
        "pos_ids": pos.view(B, 1).to(device),
        "pos_mask": torch.ones(B, 1, dtype=torch.bool, device=device),
        "counts": counts,
        "info": {"labels": L, "clusters": C, "scale": args.syn_scale},
    }


def evaluate_problem(prob: dict[str, Any], args: argparse.Namespace, device: Any
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torch

    from xmc_toolkit.losses import full_softmax_loss, sampled_softmax_loss
    from xmc_toolkit.sampling import make_sampler, proposal_divergence

    q0, W, bias = prob["queries"], prob["weight"], prob["bias"]
    pos_ids, pos_mask = prob["pos_ids"], prob["pos_mask"]
    L = W.shape[0]
    K = args.codewords or auto_codewords(L)
    q = q0.clone().requires_grad_(True)
    full = full_softmax_loss(q, W, pos_ids, pos_mask, bias)
    (g_full,) = torch.autograd.grad(full, q)  # [B, d]
    g_norm = float(g_full.norm())
    gen = torch.Generator(device=device).manual_seed(0)
    div_rows: list[dict[str, Any]] = []
    grad_rows: list[dict[str, Any]] = []
    for name in args.samplers:
        kw: dict[str, Any] = {}
        if name.startswith("midx"):
            kw = {"num_codewords": K, "seed": 0}
        s = make_sampler(name, L, label_counts=prob["counts"], **kw)
        s.update(W, bias)
        kl, ess = proposal_divergence(s, q0, W, bias)  # [B], [B]
        div_rows.append({"data": prob["name"], "sampler": name, "codewords": K if kw else None,
                         "kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                         "ess_mean": float(ess.mean()), "ess_median": float(ess.median())})
        pos_lq = s.log_prob(q0, pos_ids)  # [B, P]
        w_pos = W[pos_ids]  # [B, P, d]
        b_pos = bias[pos_ids] if bias is not None else 0.0
        for M in args.num_samples:
            acc = torch.zeros_like(g_full)
            sq = 0.0
            grads_norm_err = 0.0
            gs = []
            for _ in range(args.draws):
                smp = s.sample(q0, M, generator=gen)  # ids [B, M]
                pos_s = torch.einsum("bpd,bd->bp", w_pos, q) + b_pos  # [B, P]
                neg_s = torch.einsum("bmd,bd->bm", W[smp.ids], q)  # [B, M]
                if bias is not None:
                    neg_s = neg_s + bias[smp.ids]
                loss = sampled_softmax_loss(pos_s, pos_ids, pos_mask, pos_lq, neg_s, smp.ids,
                                            smp.log_q)
                (gr,) = torch.autograd.grad(loss, q)  # [B, d]
                acc += gr
                grads_norm_err += float((gr - g_full).norm()) / g_norm
                gs.append(gr)
            mean = acc / args.draws
            for gr in gs:
                sq += float((gr - mean).pow(2).sum())
            se = (sq / (args.draws * max(1, args.draws - 1))) ** 0.5 / g_norm
            grad_rows.append({"data": prob["name"], "sampler": name, "M": M,
                              "rel_err_of_mean": float((mean - g_full).norm()) / g_norm,
                              "mc_floor": se, "single_draw_rel_err": grads_norm_err / args.draws,
                              "draws": args.draws})
    return div_rows, grad_rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bibtex,synthetic", help="bibtex,synthetic")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--num-samples", default="16,64,256,1024", help="M values")
    ap.add_argument("--draws", type=int, default=100, help="draws averaged per (sampler, M)")
    ap.add_argument("--queries", type=int, default=256, help="B queries evaluated")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--codewords", type=int, default=0, help="MIDX K (0: clip(sqrt(L/4),4,64))")
    ap.add_argument("--bibtex-epochs", type=int, default=15)
    ap.add_argument("--syn-labels", type=int, default=100_000)
    ap.add_argument("--syn-scale", type=float, default=8.0, help="query norm (1/temperature)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in children (0: torch default; 1 on a loaded "
                         "machine)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path ('' to skip)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from xmc_toolkit.device import resolve_device

    if args.quick:
        args.data, args.draws, args.queries, args.dim = "synthetic", 4, 16, 16
        args.syn_labels, args.num_samples = 500, "8,32"
    args.samplers = [s for s in args.samplers.split(",") if s]
    args.num_samples = [int(m) for m in str(args.num_samples).split(",") if m]
    device = resolve_device(args.device)
    out_path = args.out or (RESULTS_DIR / f"{NAME}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    config["device"] = str(device)
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device), "data": {}, "divergence": [],
                               "gradient": []}
    for name in args.data.split(","):
        prob = bibtex_problem(args, device) if name == "bibtex" else synthetic_problem(args,
                                                                                     device)
        if prob is None:
            payload["data"][name] = {"skipped": "../shared/data/xc/bibtex_*.txt not found"}
            continue
        payload["data"][prob["name"]] = prob["info"]
        div, grad = evaluate_problem(prob, args, device)
        payload["divergence"] += div
        payload["gradient"] += grad
        write_results(NAME, payload, out_path)
    print_table("KL(softmax || proposal) and normalized ESS (mean over queries)",
                ["data", "sampler", "K", "KL mean", "KL median", "ESS/M mean", "ESS/M median"],
                [[r["data"], r["sampler"], r["codewords"], r["kl_mean"], r["kl_median"],
                  r["ess_mean"], r["ess_median"]] for r in payload["divergence"]])
    print_table(f"sampled-gradient error vs full softmax ({args.draws} draws)",
                ["data", "sampler", "M", "rel err of mean", "MC floor", "single draw"],
                [[r["data"], r["sampler"], r["M"], r["rel_err_of_mean"], r["mc_floor"],
                  r["single_draw_rel_err"]] for r in payload["gradient"]])
    write_results_and_plot(NAME, payload, out_path, args.plot, _plot)
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    datas = list(dict.fromkeys(r["data"] for r in payload["gradient"]))
    if not datas:
        return
    fig, axes = plt.subplots(1, len(datas) + 1, figsize=(5 * (len(datas) + 1), 4))
    samplers = list(dict.fromkeys(r["sampler"] for r in payload["divergence"]))
    width = 0.8 / max(1, len(datas))
    for j, dname in enumerate(datas):
        kls = [next((r["kl_mean"] for r in payload["divergence"]
                     if r["data"] == dname and r["sampler"] == s), 0.0) for s in samplers]
        axes[0].bar([i + j * width for i in range(len(samplers))], kls, width, label=dname)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(samplers))])
    axes[0].set_xticklabels(samplers, rotation=30)
    axes[0].set_ylabel("KL(softmax || proposal), nats")
    axes[0].legend(fontsize=7)
    for ax, dname in zip(axes[1:], datas):
        for s in samplers:
            rs = [r for r in payload["gradient"] if r["data"] == dname and r["sampler"] == s]
            ax.plot([r["M"] for r in rs], [r["rel_err_of_mean"] for r in rs], marker="o",
                    label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("negatives M")
        ax.set_ylabel("relative error of mean sampled gradient")
        ax.set_title(dname)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
