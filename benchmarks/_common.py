"""Shared helpers of the benchmark scripts: machine description, timing, JSON results, tables.

Only the standard library, torch, numpy and rich are needed here, so every script runs with
``PYTHONPATH=.`` from the repository root and no install (the lead's GPU machine).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "machine_info",
    "write_results",
    "print_table",
    "median_time",
    "vm_hwm_mb",
    "vm_rss_mb",
    "reset_hwm",
    "sync",
    "fmt",
    "shared_data_dir",
    "auto_codewords",
    "apply_threads",
    "add_model_split_args",
    "model_and_split",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# make ``import xmc_toolkit`` work when a script is run as ``python benchmarks/x.py`` from a
# checkout without ``pip install -e .``
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: Any = None) -> dict[str, Any]:
    """CPU model, cores, RAM, load average, torch version and (if CUDA) the GPU name."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device is not None:
        info["device"] = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``benchmarks/results/<name>.json`` (or ``out``)."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def fmt(v: Any, digits: int = 4) -> str:
    """Compact cell text for tables."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # nan
            return "nan"
        if abs(v) >= 1000 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3g}"
        return f"{v:.{digits}g}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(str(c), justify="right" if c not in ("method", "data set") else "left")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    Console(width=max(120, sum(len(str(c)) + 4 for c in columns))).print(table)


def sync(device: Any) -> None:
    """Wait for queued CUDA work so that wall-clock times are honest."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def median_time(fn: Callable[[], Any], device: Any, reps: int) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``reps`` calls of ``fn`` (synchronised on CUDA)."""
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _status_field(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def vm_hwm_mb() -> float | None:
    """Peak resident set size of this process in MiB (``VmHWM``; ``None`` off Linux)."""
    return _status_field("VmHWM")


def vm_rss_mb() -> float | None:
    """Current resident set size of this process in MiB (``VmRSS``)."""
    return _status_field("VmRSS")


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); ``False`` if not
    permitted, in which case peaks include everything since the process started."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or ``$XMC_SHARED_DATA``), if it exists."""
    env = os.environ.get("XMC_SHARED_DATA")
    root = Path(_ROOT)
    candidates = [Path(env)] if env else []
    candidates += [root.parent / "shared" / "data", root / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def auto_codewords(num_labels: int) -> int:
    """The trainer's default K = clip(round(sqrt(L / 4)), 4, 64), never above L."""
    import math

    return int(min(num_labels, max(4, min(64, round(math.sqrt(num_labels / 4))))))


def apply_threads(n: int) -> None:
    """Use ``n`` torch threads here and in child processes (``0``: leave torch's default).

    On an oversubscribed machine (load above the core count) OpenMP worker threads spin and
    wait: a 2-thread ``logsumexp`` of ``[256, 1024]`` measured 60x slower than 1 thread here,
    so the numbers in docs/benchmarks.md were taken with ``--threads 1``.
    """
    if n and n > 0:
        import torch

        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ["MKL_NUM_THREADS"] = str(n)


def add_model_split_args(ap: Any) -> None:
    """The arguments of a study of a model trained on the ``1 - fraction`` part of TRAIN
    (``tune_split.py --model-out``): ``--data``, ``--model``, ``--fraction``, ``--split-seed``."""
    ap.add_argument("--data", type=Path, required=True, help="training data set (any format)")
    ap.add_argument("--model", type=Path, required=True, help="model trained on the 85 % split")
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--split-seed", type=int, default=12345)


def model_and_split(args: Any) -> tuple[Any, Any, Any]:
    """``(model, train, val)``: the saved model of :func:`add_model_split_args`' ``--model`` and
    the split of ``--data`` it was trained on (the trainer's own ``_split``)."""
    import xmc_toolkit as xt
    from xmc_toolkit.train import _split

    train, val = _split(xt.load(args.data), args.fraction, args.split_seed)
    return xt.XMCModel.load(args.model), train, val


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional (e.g. on the GPU box)
        return None
    return plt


def speedup_panel(ax: Any, names: list[str], values: list[float], target: float, title: str,
                  colors: list[str]) -> None:
    """Bars of speed-ups over the full-softmax step, the target as a dashed line."""
    ax.bar(names, values, color=colors)
    ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set_ylabel("x faster than the full-softmax step")
    ax.set_title(title)


def write_results_and_plot(name: str, payload: dict[str, Any], out_path: Path,
                           plot: str | Path | None,
                           plot_fn: Callable[[dict[str, Any], Path], None]) -> None:
    """Write the JSON results, then the plot (``plot=None``: beside the JSON; ``""``: none)."""
    write_results(name, payload, out_path)
    target = plot if plot is not None else Path(out_path).with_suffix(".png")
    if str(target):
        plot_fn(payload, Path(target))
