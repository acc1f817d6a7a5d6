"""Optional native (C++) CPU kernels, built once per machine on first use, with eager fallbacks.

:func:`kernels` gives the module built from ``csrc/`` (``bindings.cpp`` and one file a kernel):

* ``row_adam_`` -- the fused row-wise Adam of :class:`~xmc_toolkit.sparse_optim.RowAdam` (one
  pass per touched row instead of the eager update's five gathers and scatters a chunk);
* ``bag_rows_`` -- the label-row gradient of per-query scores
  (``output_layer._PerQueryScores``), written into a reused workspace;
* ``cdf_draw`` -- the MIDX sampler's per-query cell draws by inverse CDF
  (``sampling.midx._inverse_cdf_rows``);
* ``project_rows`` -- the table pass of an incremental MIDX refresh: every row's change
  fingerprint, the list of changed rows and the per-cell row sums in one read of the table
  (``sampling.midx.MIDXSampler._table_pass``);
* ``merge_cells`` -- the CSR of the labels by cell after some moved, one sequential merge
  (``sampling.midx.merge_cells``);
* ``row_argmin`` -- the nearest codeword of each row of a k-means distance block
  (``codebook.assign_nearest``; torch's ``min(dim=1)`` indices, twice as fast).

It is JIT-built by ``torch.utils.cpp_extension.load`` the first time a CPU step needs it (about a
minute on 2 cores, logged) and cached under torch's extension directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) for every later process.
Nothing here is required: without a C++ compiler and ``ninja``, or with ``XMC_NATIVE=0`` in the
environment, or when the build fails, :func:`kernels` is ``None`` (one warning says why) and
callers use their eager paths, which compute the same numbers (tested: bit for bit for the
draws and the moments, to float rounding for the rest).

Compiler flags are chosen from the CPU (``-mavx2 -mfma`` where ``/proc/cpuinfo`` lists both on
x86-64) and are part of the module name, so a cache shared by machines of different CPUs never
loads a build for the wrong instruction set.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["kernels", "kernels_for", "native_status", "NATIVE_ENV"]

logger = logging.getLogger(__name__)

NATIVE_ENV = "XMC_NATIVE"  # "0" / "false" / "off": never build or load native kernels
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("bindings.cpp", "row_adam.cpp", "bag_rows.cpp", "cdf_draw.cpp", "project_rows.cpp",
            "merge_cells.cpp", "row_argmin.cpp")
_VERSION = 10  # bump with any change of the source or the flags

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "module": None, "reason": "not tried yet"}


def _disabled() -> bool:
    return os.environ.get(NATIVE_ENV, "").strip().lower() in ("0", "false", "off", "no")


def _cpu_flags() -> tuple[list[str], str]:
    """Compiler flags for this CPU and a short tag of them for the module name."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
        flags = set(info.split())
        if {"avx2", "fma"} <= flags:
            return ["-mavx2", "-mfma"], "avx2"
    return [], "generic"


def _build() -> Any:
    """Build (or load the cached build of) the extension; raises on any failure."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # torch's builder runs `ninja`: it must be on PATH
        raise RuntimeError("ninja is not on PATH (pip install ninja, or your system's package)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH)")
    flags, tag = _cpu_flags()
    name = f"xmc_native_v{_VERSION}_{tag}"
    t = time.perf_counter()
    if _is_built(cpp_extension, name):
        logger.info("loading the native CPU kernels %s", name)
    else:  # said at the default log level: the first step pauses for the compiler
        logger.warning("compiling the native CPU kernels %s, once per machine (about a minute; "
                       "%s=0 skips them)", name, NATIVE_ENV)
    mod = cpp_extension.load(
        name=name, sources=[str(_CSRC / f) for f in _SOURCES],
        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp-simd", *flags], verbose=False)
    logger.info("native kernels %s ready in %.1f s", name, time.perf_counter() - t)
    return mod


def _is_built(cpp_extension: Any, name: str) -> bool:
    """Whether torch's extension cache holds a build of ``name`` (then loading is quick)."""
    try:
        root = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001  a private helper: when it changes, just say "compiling"
        return False
    return any(root.glob(f"{name}*.so"))  # torch may add a version suffix on a rebuild


def kernels() -> Any | None:
    """The native kernel module, or ``None`` when native kernels are off or cannot be built.

    Its functions (all float32 / int64 contiguous CPU tensors; inputs are range-checked before
    anything is written):

    * ``row_adam_(param, m, v, rows, values, step_size, beta1, beta2, eps, floor)``: ``param,
      m, v`` ``[R, d]`` updated in place on ``rows [U]`` (*distinct*), ``values [U, d]``;
    * ``bag_rows_(out, queries, perm, gs, starts, per_query)``: ``out [U, d]`` (written),
      ``queries [B, d]``, ``perm [N]`` flat ``b * per_query + m`` entry of each sorted entry,
      ``gs [N]`` weights, ``starts [U]`` first sorted entry of each row;
    * ``cdf_draw(weights [B, C] float32, uniforms [B, M] float64) -> [B, M] int64``;
    * ``project_rows(x [L, d], r [d], cell [L] int64, C, since [L] or [0]) -> (fp [L],
      sums [C, d], changed [R] int64)``: ``x . r``, the sums of the rows by cell (``C = 0``:
      none, ``cell`` ignored) and the rows whose ``x . r`` differs from ``since`` (ascending);
    * ``merge_cells(items [L], cell [L], moved [R], C) -> (indptr [C + 1], items [L])``;
    * ``row_argmin(dist [N, K] float32) -> [N] int64``: ``dist.min(dim=1).indices``.

    Built at most once per process (thread-safe); a failure is remembered and warned about once.
    """
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        if _disabled():
            _state.update(module=None, reason=f"disabled by {NATIVE_ENV}="
                                              f"{os.environ.get(NATIVE_ENV)!r}")
        else:
            try:
                _state.update(module=_build(), reason="built")
            except Exception as exc:  # noqa: BLE001  any failure means: use the eager path
                _state.update(module=None, reason=f"{type(exc).__name__}: {exc}".strip())
                logger.warning("native CPU kernels unavailable, using the eager paths "
                               "(same numbers, slower): %s", _state["reason"][:500])
        _state["loaded"] = True
    return _state["module"]


def kernels_for(t: torch.Tensor, float32: bool = True) -> Any | None:
    """:func:`kernels` when they apply to tensor ``t``: on the CPU (and float32 unless
    ``float32=False``); ``None`` elsewhere, so device paths never build or call them."""
    if t.device.type != "cpu" or (float32 and t.dtype != torch.float32):
        return None
    return kernels()


def native_status() -> dict[str, Any]:
    """``{"available": bool | None, "reason": str}`` (``None``: not tried in this process)."""
    if not _state["loaded"]:
        return {"available": None, "reason": _state["reason"]}
    return {"available": _state["module"] is not None, "reason": _state["reason"]}


def _reset_for_tests() -> None:
    """Forget the loaded module (tests of the fallback)."""
    with _lock:
        _state.update(loaded=False, module=None, reason="not tried yet")
