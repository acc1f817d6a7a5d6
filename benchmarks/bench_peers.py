"""Accuracy, speed, size and memory against peers on every data set in ``../shared/data``.

Data sets (each skipped, and recorded as such, when its files are absent): ``bibtex``
(``xc/``), ``medical``, ``enron``, ``emotions`` (``arff/``), and the two 10^4-label sets of
``real/``: ``kjv-strongs`` (XC text) and ``nextword-tdavid`` (gzip XC text, read transparently by
``xmc_toolkit.data.load``; 941,684 training rows -- the long one).

Methods (each trained and timed in its own subprocess, default settings everywhere):

* ``xmc-default``: ``XMCModel()`` -- the toolkit's defaults and nothing else (only ``device``
  and ``seed=0`` set): what a user gets with no flags (``loss="auto"``: full softmax up to
  ``full_max_labels`` labels, sampled MIDX above; the resolved loss is recorded).
* ``xmc-midx``: ``XMCModel(loss="sampled", sampler="midx")`` (``negatives`` = min(64, L // 2)).
* ``omikuji``: ``omikuji.Model.train_on_data`` with ``default_hyper_param()`` (Parabel-like).
* ``napkinxc-plt``: ``napkinxc.models.PLT`` with its defaults.
* ``pecos-xrlinear``: PECOS XR-Linear as its README trains it: PIFA label embeddings
  (``LabelEmbeddingFactory.create(Y, X, method="pifa")``), hierarchical k-means
  (``Indexer.gen``), ``XLinearModel.train(X, Y, C=chain)``, all with their defaults.

``--threads N`` reaches every method: torch / OpenMP threads for ``xmc-*``, ``n_threads`` of
omikuji's training, ``threads`` of napkinXC's PLT and PECOS's indexer, training and prediction
(``0``: each library's own default, usually all cores). ``--threads 1`` gives a one-thread
comparison.

Inputs: the toolkit preprocesses raw features itself (square roots of a weighted multi-label
file's values, ``TrainConfig.feature_power = -1`` auto; row L2; and TF-IDF unless the file is
already weighted: ``TrainConfig.tfidf = "auto"``; part of its model); the peers get the same rows
(``--peer-features xmc``, fitted on the training split) so that the comparison is about the
models (``tfidf-l2`` always applies an IDF, as the toolkit did before 2026-12-01; ``raw`` gives
them the file's rows). Every method's top-5
predictions are scored by ``xmc_toolkit.metrics.evaluate`` (propensities from the training
labels, A=0.55, B=1.5): P@1/3/5, nDCG@1/3/5, PSP@1/3/5. Also per method: training seconds,
prediction milliseconds per test point (whole test set in one call, divided), model size on
disk, and the child process's peak resident memory in MiB (``VmHWM``: loading its inputs,
training and predicting, that method alone; the load average before and after each method is in
``load_average``, since a shared machine inflates times; ``ru_maxrss`` is recorded too but on Linux it
carries the parent's RSS over ``execve``, see ``_peak_rss_mib``).

Peers are installed with ``pip install omikuji napkinxc libpecos`` (the ``bench`` extra). libpecos
1.2.8 needs ``numpy<2`` and ``scipy<1.14``; so as not to downgrade the shared environment it can
live in its own target directory, ``pip install --no-deps --target .venv/pecos-site libpecos
numpy==1.26.4 scipy==1.13.1``, which ``--pecos-path`` (default: that folder when it exists) puts
first on the PECOS subprocess's ``PYTHONPATH``. A peer that fails to import, train or predict (or
runs past ``--timeout``) is recorded with its error and the table moves on.

    python benchmarks/bench_peers.py --threads 1                  # everything (hours on 2 cores)
    python benchmarks/bench_peers.py --threads 1 --resume         # after a crash: only what is missing
    python benchmarks/bench_peers.py --datasets bibtex --methods xmc-midx,omikuji
    python benchmarks/bench_peers.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    apply_threads,
    fmt,
    machine_info,
    shared_data_dir,
    vm_hwm_mb,
    write_results,
)

NAME = "peers"
METHODS = ("xmc-default", "xmc-midx", "omikuji", "napkinxc-plt", "pecos-xrlinear")
DATASETS = ("bibtex", "medical", "enron", "emotions", "kjv-strongs", "nextword-tdavid")
# data sets in ``real/``: (train file, test file) names
_REAL = {"kjv-strongs": ("kjv-strongs_train.txt", "kjv-strongs_test.txt"),
         "nextword-tdavid": ("nextword-tdavid_train.txt.gz", "nextword-tdavid_test.txt.gz")}
KEYS = ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5")
TOPK = 5
_DEFAULT_PECOS = Path(__file__).resolve().parent.parent / ".venv" / "pecos-site"


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def markdown_table(payload: dict[str, Any]) -> str:
    """The results of a ``bench_peers`` JSON as the Markdown table of ``docs/benchmarks.md``."""
    head = ("| data set | method | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 | train s | pred ms/pt | "
            "size MiB | peak RSS MiB | load before-after |")
    lines = [head, "|" + "---|" * 12]
    for r in payload.get("results", []):
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['method']} | error: {r['error']} |")
            continue
        m = r["metrics"]
        size = r.get("model_bytes")
        load = r.get("load_average") or []
        cells = [r["dataset"], r["method"], *(f"{100 * m[k]:.2f}" for k in
                                              ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")),
                 f"{r['train_s']:.1f}", f"{r.get('predict_ms_per_point', float('nan')):.3f}",
                 "" if size is None else f"{size / 2**20:.1f}",
                 f"{r.get('peak_rss_mib', float('nan')):.0f}",
                 "-".join(f"{v:.2f}" for v in load)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """``_common.print_table`` with the console as wide as the cells (no truncated names)."""
    from rich.console import Console
    from rich.table import Table

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("data set", "method") else "right",
                         no_wrap=True)
    for r in cells:
        table.add_row(*r)
    Console(width=max(120, sum(w + 3 for w in widths) + 1)).print(table)


# -- child: one method on one prepared data set ------------------------------------------------
def _ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (KiB on Linux, bytes on macOS)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this (child) process, MiB.

    ``VmHWM`` of ``/proc/self/status`` where there is one: Linux keeps ``ru_maxrss`` across
    ``execve``, so in a child started by ``subprocess`` (vfork + exec) it is at least the
    *parent's* RSS at spawn time (measured: 231 MiB reported for a child whose own peak was
    11 MiB, with a 230 MiB parent). ``VmHWM`` belongs to the new address space only.
    ``ru_maxrss`` is the fallback off Linux.
    """
    hwm = vm_hwm_mb()
    return hwm if hwm is not None else _ru_maxrss_mib()


def _child(method: str, work: Path, device: str, xmc_epochs: int | None, threads: int) -> None:
    import numpy as np
    import scipy.sparse as sp

    model_dir = work / f"model_{method}"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    out: dict[str, Any] = {"method": method}
    if method.startswith("xmc"):
        from xmc_toolkit.model import XMCModel

        Xtr, Ytr = sp.load_npz(work / "Xtr_raw.npz"), sp.load_npz(work / "Ytr.npz")
        Xte = sp.load_npz(work / "Xte_raw.npz")
        cfg: dict[str, Any] = {"device": device, "seed": 0}
        if method == "xmc-default":
            pass  # the toolkit's defaults, nothing else set
        else:
            cfg.update(loss="sampled", sampler="midx")
            # the trainer refuses negatives >= L (default 64): tiny label sets get L // 2
            cfg["negatives"] = min(64, max(1, Ytr.shape[1] // 2))
            out["negatives"] = cfg["negatives"]
        if xmc_epochs:
            cfg["epochs"] = xmc_epochs
        t = time.perf_counter()
        m = XMCModel(**cfg).fit(Xtr, Ytr)
        out["train_s"] = time.perf_counter() - t
        if m.result is not None:  # what "auto" resolved to, and the epochs run
            out.update(loss=m.result.loss, sampler=m.result.sampler,
                       epochs=m.config.epochs, best_epoch=m.result.best_epoch)
        t = time.perf_counter()
        ids, _ = m.predict_topk(Xte, TOPK)
        out["predict_s"] = time.perf_counter() - t
        m.save(model_dir)
    else:
        Xtr, Ytr = sp.load_npz(work / "Xtr.npz"), sp.load_npz(work / "Ytr.npz")
        Xte = sp.load_npz(work / "Xte.npz")
        n = Xte.shape[0]
        if method == "omikuji":
            import omikuji

            hp = omikuji.Model.default_hyper_param()
            t = time.perf_counter()
            m = omikuji.Model.train_on_data(str(work / "train_omikuji.txt"), hp,
                                            n_threads=threads or None)
            out["train_s"] = time.perf_counter() - t
            Xte = Xte.tocsr()
            t = time.perf_counter()
            ids = np.full((n, TOPK), -1, dtype=np.int64)
            for i in range(n):
                a, b = Xte.indptr[i], Xte.indptr[i + 1]
                pairs = list(zip(Xte.indices[a:b].tolist(), Xte.data[a:b].tolist()))
                pred = m.predict(pairs, top_k=TOPK)
                ids[i, : len(pred)] = [lab for lab, _ in pred]
            out["predict_s"] = time.perf_counter() - t
            m.save(str(model_dir))
        elif method == "napkinxc-plt":
            from napkinxc.models import PLT

            Y_lists = [Ytr.indices[Ytr.indptr[i]: Ytr.indptr[i + 1]].tolist()
                       for i in range(Ytr.shape[0])]
            m = PLT(str(model_dir), threads=threads)  # 0: all CPUs (its default)
            t = time.perf_counter()
            m.fit(Xtr, Y_lists)
            out["train_s"] = time.perf_counter() - t
            t = time.perf_counter()
            pred = m.predict(Xte, top_k=TOPK)
            out["predict_s"] = time.perf_counter() - t
            ids = np.full((n, TOPK), -1, dtype=np.int64)
            for i, row in enumerate(pred):
                row = [int(x[0]) if isinstance(x, (tuple, list)) else int(x) for x in row][:TOPK]
                ids[i, : len(row)] = row
        elif method == "pecos-xrlinear":
            from pecos.xmc import Indexer, LabelEmbeddingFactory
            from pecos.xmc.xlinear.model import XLinearModel

            nt = threads or -1  # PECOS: -1 = all CPUs (its default)
            Xtr = Xtr.astype(np.float32).tocsr()
            Ytr, Xte = Ytr.astype(np.float32).tocsc(), Xte.astype(np.float32).tocsr()
            t = time.perf_counter()
            # XR-Linear as in PECOS's README: PIFA label features -> hierarchical k-means tree
            # -> linear rankers along the tree (without C, train() is a flat one-vs-all model)
            label_feat = LabelEmbeddingFactory.create(Ytr, Xtr, method="pifa", threads=nt)
            chain = Indexer.gen(label_feat, threads=nt)
            m = XLinearModel.train(Xtr, Ytr, C=chain, threads=nt)
            out["train_s"] = time.perf_counter() - t
            t = time.perf_counter()
            P = m.predict(Xte, only_topk=TOPK, threads=nt).tocsr()  # [n, L] sparse scores
            out["predict_s"] = time.perf_counter() - t
            ids = np.full((n, TOPK), -1, dtype=np.int64)
            for i in range(n):
                a, b = P.indptr[i], P.indptr[i + 1]
                order = np.argsort(-P.data[a:b], kind="stable")[:TOPK]
                ids[i, : len(order)] = P.indices[a:b][order]
            m.save(str(model_dir))
        else:
            raise SystemExit(f"unknown method {method}")
    out["model_bytes"] = _dir_bytes(model_dir) if model_dir.exists() else None
    out["peak_rss_mib"] = _peak_rss_mib()
    out["ru_maxrss_mib"] = _ru_maxrss_mib()  # includes the parent's RSS at spawn (see above)
    np.save(work / f"topk_{method}.npy", np.asarray(ids, dtype=np.int64))
    print(json.dumps(out))


# -- parent ------------------------------------------------------------------------------------
def _dataset_paths(root: Path, name: str) -> tuple[Path, Path] | None:
    if name == "bibtex":
        tr, te = root / "xc" / "bibtex_train.txt", root / "xc" / "bibtex_test.txt"
    elif name in _REAL:
        tr, te = (root / "real" / f for f in _REAL[name])
    else:
        tr, te = (root / "arff" / name / f"{name}-train.arff",
                  root / "arff" / name / f"{name}-test.arff")
    return (tr, te) if tr.exists() and te.exists() else None


def _prepare(name: str, tr_path: Path, te_path: Path, work: Path, peer_features: str,
             max_train: int | None) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp

    from xmc_toolkit.batching import fit_idf, l2_normalize_rows, tfidf_transform
    from xmc_toolkit.data import XMCDataset, load, save

    tr, te = load(tr_path), load(te_path)
    Xtr, Ytr, Xte, Yte = tr.X, tr.Y, te.X, te.Y
    if max_train:
        Xtr, Ytr = Xtr[:max_train], Ytr[:max_train]
        Xte, Yte = Xte[:max_train], Yte[:max_train]
    if peer_features == "xmc":
        from xmc_toolkit.train import Preprocessor, TrainConfig

        # the rows the toolkit's defaults train on: the trainer's own auto resolution
        X32 = sp.csr_matrix(Xtr, dtype=np.float32)
        cfg = TrainConfig().resolved_for_rows(X32, sp.csr_matrix(Ytr))
        pre = Preprocessor.fit(X32, cfg.tfidf == "on", cfg.l2_normalize, cfg.feature_power)
        Ptr, Pte = pre.transform(Xtr), pre.transform(Xte)
    elif peer_features == "tfidf-l2":
        idf = fit_idf(Xtr)
        Ptr, Pte = (l2_normalize_rows(tfidf_transform(Xtr, idf)),
                    l2_normalize_rows(tfidf_transform(Xte, idf)))
    else:
        Ptr, Pte = Xtr, Xte
    work.mkdir(parents=True, exist_ok=True)
    for fname, M in (("Xtr_raw", Xtr), ("Xte_raw", Xte), ("Xtr", Ptr), ("Xte", Pte),
                     ("Ytr", Ytr), ("Yte", Yte)):
        sp.save_npz(work / f"{fname}.npz", sp.csr_matrix(M, dtype=np.float32))
    om = work / "train_omikuji.txt"
    save(XMCDataset(sp.csr_matrix(Ptr, dtype=np.float32), sp.csr_matrix(Ytr, dtype=np.float32)),
         om, fmt="xc")
    # omikuji's reader rejects rows without any feature (Enron has 6); give them an explicit
    # zero-valued feature 0, which changes no score
    lines = om.read_text(encoding="ascii").split("\n")
    fixed = [ln if i == 0 or not ln.strip() or ":" in ln else ln.rstrip() + " 0:0"
             for i, ln in enumerate(lines)]
    om.write_text("\n".join(fixed), encoding="ascii")
    return {"train_points": int(Xtr.shape[0]), "test_points": int(Xte.shape[0]),
            "features": int(Xtr.shape[1]), "labels": int(Ytr.shape[1]),
            "avg_labels_per_point": float(Ytr.nnz / max(1, Ytr.shape[0]))}


def _run_child(args: argparse.Namespace, method: str, work: Path) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if method == "pecos-xrlinear" and args.pecos_path:
        env["PYTHONPATH"] = str(args.pecos_path) + os.pathsep + env["PYTHONPATH"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--work",
           str(work), "--device", args.device, "--threads", str(args.threads)]
    if args.xmc_epochs:
        cmd += ["--xmc-epochs", str(args.xmc_epochs)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timeout after {args.timeout:.0f} s (--timeout)"}
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        return {"method": method, "error": (lines[-1] if lines else f"exit {res.returncode}")[:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help="comma-separated (default: all; absent ones are skipped)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    ap.add_argument("--peer-features", choices=("xmc", "tfidf-l2", "raw"), default="xmc")
    ap.add_argument("--pecos-path", type=Path,
                    default=_DEFAULT_PECOS if _DEFAULT_PECOS.is_dir() else None,
                    help="folder prepended to PYTHONPATH for PECOS (numpy<2 / scipy<1.14)")
    ap.add_argument("--xmc-epochs", type=int, default=0,
                    help="override XMCModel epochs (0: its default)")
    ap.add_argument("--max-points", type=int, default=0, help="cut train/test (0: all)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per method")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of every method: torch/OpenMP for xmc, n_threads / threads of "
                         "omikuji, napkinXC, PECOS (0: each library's default; 1 on a loaded "
                         "machine)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (xmc methods)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the (data set, method) rows already in --out that ran with the same "
                         "settings and run only the missing ones (a long run survives a crash); "
                         "rows of data sets / methods not asked for this time stay in the file")
    ap.add_argument("--markdown", action="store_true",
                    help="print the rows of --out as a Markdown table and exit (runs nothing)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.markdown:
        if args.out is None or not args.out.is_file():
            ap.error("--markdown needs --out FILE of an earlier run")
        print(markdown_table(json.loads(args.out.read_text())))
        return {}
    if args.child:
        if args.child.startswith("xmc"):
            apply_threads(args.threads)  # torch; the peers' children never import it
        elif args.threads > 0:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        _child(args.child, args.work, args.device, args.xmc_epochs or None, args.threads)
        return {}

    from xmc_toolkit.device import resolve_device
    from xmc_toolkit.metrics import inverse_propensity

    apply_threads(args.threads)
    if args.quick:
        args.xmc_epochs, args.max_points = 1, 200
        if args.datasets == ",".join(DATASETS):  # quick defaults; a --datasets / --methods given wins
            args.datasets = "emotions"
        if args.methods == ",".join(METHODS):
            args.methods = "xmc-default,xmc-midx,napkinxc-plt"
    methods = [m for m in args.methods.split(",") if m]
    datasets = [d for d in args.datasets.split(",") if d]
    for kind, given, known in (("method", methods, METHODS), ("data set", datasets, DATASETS)):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {kind} {', '.join(bad)} (known: {', '.join(known)})")
    device = resolve_device(args.device)
    root = shared_data_dir()
    out_path = args.out or (RESULTS_DIR / f"{NAME}.json")
    config = {k: v for k, v in vars(args).items()
              if k not in ("out", "child", "work", "markdown")}  # not settings of the results
    config["device"] = str(device)
    payload: dict[str, Any] = {"benchmark": NAME, "config": config,
                               "machine": machine_info(device), "datasets": {}, "results": []}
    done, done_datasets = _resumable(out_path, config) if args.resume else ({}, {})
    # rows of data sets / methods this call does not ask for stay in the file (a --resume over
    # a subset never drops finished rows); they follow this call's rows in every write
    others = [r for (d, m), r in done.items() if d not in datasets or m not in methods]
    other_sets = {d: v for d, v in done_datasets.items() if d not in datasets}

    def save() -> None:
        write_results(NAME, {**payload, "datasets": {**other_sets, **payload["datasets"]},
                             "results": payload["results"] + others}, out_path)
    scratch = Path(tempfile.mkdtemp(prefix="xmc_peers_")) if args.work is None else args.work
    rows: list[list[Any]] = []
    try:
        for name in datasets:
            paths = None if root is None else _dataset_paths(root, name)
            if paths is None:
                payload["datasets"][name] = {"skipped": "not found under ../shared/data"}
                continue
            import scipy.sparse as sp

            work = scratch / name
            if all((name, m) in done for m in methods) and name in done_datasets:
                payload["datasets"][name] = done_datasets[name]  # nothing to run: no preparing
            else:
                payload["datasets"][name] = _prepare(name, *paths, work, args.peer_features,
                                                     args.max_points or None)
                Ytr, Yte = sp.load_npz(work / "Ytr.npz"), sp.load_npz(work / "Yte.npz")
                inv = inverse_propensity(Ytr)
            for method in methods:
                if (name, method) in done:
                    rec = {**done[(name, method)], "resumed": True}
                else:
                    rec = _run_and_score(args, name, method, work, Yte, inv)
                payload["results"].append(rec)
                met = rec.get("metrics", {})
                note = ("resumed" if rec.get("resumed") else
                        "error (below)" if "error" in rec else "")
                rows.append([name, method, *[100 * met[k] if k in met else None for k in KEYS],
                             rec.get("train_s"), rec.get("predict_ms_per_point"),
                             None if rec.get("model_bytes") is None
                             else rec["model_bytes"] / 2**20, rec.get("peak_rss_mib"), note])
                save()
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    _print_table("accuracy (%, xmc_toolkit.metrics) and cost against peers",
                ["data set", "method", *KEYS, "train s", "pred ms/pt", "size MiB",
                 "peak RSS MiB", "note"], rows)
    skipped = [n for n, d in payload["datasets"].items() if "skipped" in d]
    if skipped:
        print(f"skipped (not found under ../shared/data): {', '.join(skipped)}")
    for rec in payload["results"]:
        if "error" in rec:
            print(f"{rec['dataset']} / {rec['method']}: {rec['error']}")
    save()
    return payload


_RESUME_IGNORED = ("datasets", "methods", "resume", "timeout", "pecos_path")  # not results


def _resumable(out_path: Path, config: dict[str, Any]
               ) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    """The error-free rows of an earlier run in ``out_path`` whose settings match ``config``
    (the data sets / methods asked for, ``--resume``, ``--timeout`` and ``--pecos-path`` may
    differ), and its prepared data sets' descriptions."""
    if not out_path.exists():
        return {}, {}
    try:
        old = json.loads(out_path.read_text())
    except (OSError, ValueError):
        return {}, {}
    now = json.loads(json.dumps(config, default=str))  # as it is stored (paths as strings)
    was = old.get("config", {})
    diff = [f"{k}: {was.get(k, '(absent)')!r} there, {v!r} now" for k, v in now.items()
            if k not in _RESUME_IGNORED and was.get(k) != v]
    if diff:
        raise SystemExit(f"--resume: {out_path} was written with other settings "
                         f"({'; '.join(diff)}); drop --resume or pass another --out")
    rows = {(r["dataset"], r["method"]): r for r in old.get("results", [])
            if "error" not in r and "metrics" in r}
    datasets = {k: v for k, v in old.get("datasets", {}).items() if "skipped" not in v}
    return rows, datasets


def _run_and_score(args: argparse.Namespace, name: str, method: str, work: Path, Yte: Any,
                   inv: Any) -> dict[str, Any]:
    """Train and predict ``method`` in its own subprocess, then score its top-5 on ``Yte``."""
    from xmc_toolkit.metrics import evaluate

    load_before = os.getloadavg()[0]
    rec = {"dataset": name, **_run_child(args, method, work)}
    rec["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    topk = work / f"topk_{method}.npy"
    if "error" not in rec and topk.exists():
        import numpy as np

        ids = np.load(topk)
        m = evaluate(Yte, ids, ks=(1, 3, 5), inv_prop=inv)
        rec["metrics"] = {k: float(m[k]) for k in KEYS if k in m}
        rec["predict_ms_per_point"] = 1e3 * rec["predict_s"] / Yte.shape[0]
        topk.unlink()
    return rec


if __name__ == "__main__":
    main()
