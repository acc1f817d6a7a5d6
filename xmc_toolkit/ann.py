"""Serving-side approximate top-k over the label table with an established ANN library.

The model scores ``s(q, j) = q . w_j + b_j``. The bias is folded into the vectors exactly as
``xmc export --fold-bias`` does (:func:`xmc_toolkit.export.fold_bias`: ``v_j = [w_j, b_j]``,
``q' = [q, 1]``), and maximum inner product search is reduced to Euclidean nearest neighbours
by one more coordinate (Bachrach et al., 2014): ``v'_j = [v_j, sqrt(R^2 - |v_j|^2)]`` with
``R = max_j |v_j|`` and ``q'' = [q', 0]``, so ``|q'' - v'_j|^2 = |q'|^2 + R^2 - 2 s(q, j)``:
the nearest ``v'_j`` are exactly the best-scoring labels. The candidates the library returns
(``max(k, ef)`` per query, at least ``k``) are re-scored exactly and the best ``k`` returned.

Backends (both optional: ``pip install xmc-toolkit[ann]``), in the order ``auto`` prefers:

* ``faiss-ivf``: faiss ``IndexIVFFlat`` (inverted lists on a k-means coarse quantizer;
  ``nlist``; search ``nprobe``).
* ``hnsw``: hnswlib ``Index(space="l2")`` (graph; ``M``, ``ef_construction``; search ``ef``).

Public API::

    available_backends() -> list[str]                  installed backends, best first
    build_ann_index(weight [L, d], bias [L] | None, backend="auto", threads=1, **params) -> AnnIndex
    AnnIndex.search(queries [B, d], k, effort=None) -> (scores [B, k] float32, ids [B, k] int64)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .export import augment_queries, fold_bias

__all__ = ["ANN_BACKENDS", "AnnIndex", "available_backends", "build_ann_index", "mips_to_l2"]

logger = logging.getLogger(__name__)

# order of preference for "auto": measured at 10^6 labels (docs/benchmarks.md, section 6b),
# faiss IVF-Flat reached recall@5 0.96-0.98 at about 0.75 ms per query, HNSW over the
# MIPS->L2 vectors (M=16, ef_construction=64) 0.85 at ef=128
ANN_BACKENDS = ("faiss-ivf", "hnsw")
_MODULES = {"hnsw": "hnswlib", "faiss-ivf": "faiss"}


def available_backends() -> list[str]:
    """The ANN backends whose library imports here, in order of preference."""
    import importlib.util

    return [b for b in ANN_BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def mips_to_l2(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """``[L, D]`` float32 -> ``([L, D + 1], R)``: the extra coordinate ``sqrt(R^2 - |v|^2)``
    makes every row's norm ``R``, so Euclidean order equals inner-product order."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    sq = np.einsum("ij,ij->i", v, v, dtype=np.float64)  # [L]
    r2 = float(sq.max()) if sq.size else 0.0
    extra = np.sqrt(np.maximum(r2 - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([v, extra[:, None]], axis=1)), float(np.sqrt(r2))


class AnnIndex:
    """A built ANN index over bias-folded label vectors (see :func:`build_ann_index`).

    Attributes:
        backend: ``"hnsw"`` or ``"faiss-ivf"``.
        params: the build parameters used.
        effort: default search effort (hnsw ``ef``, faiss ``nprobe``).
        build_s: seconds the build took.
        num_labels, dim: ``L`` and ``d`` of the model's table.
    """

    def __init__(self, backend: str, index: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                 params: dict[str, Any], effort: int, build_s: float) -> None:
        self.backend = backend
        self.params = params
        self.effort = int(effort)
        self.build_s = build_s
        self._index = index
        self._weight = weight.detach().float().cpu().contiguous()  # [L, d] for the re-ranking
        self._bias = None if bias is None else bias.detach().float().cpu().reshape(-1)
        self.num_labels, self.dim = self._weight.shape

    def describe(self) -> str:
        """One line: backend, build parameters and search effort."""
        name = "ef" if self.backend == "hnsw" else "nprobe"
        ps = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.backend} ({ps}; {name}={self.effort})"

    @torch.no_grad()
    def search(self, queries: torch.Tensor | np.ndarray, k: int, effort: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-``k`` by the model's scores, re-ranked exactly.

        Args:
            queries: ``[B, d]`` float query embeddings.
            k: results per query (``1 <= k <= L``).
            effort: hnsw ``ef`` / faiss ``nprobe`` (``None``: :attr:`effort`); more is slower
                and finds more of the exact top-k.

        Returns:
            ``(scores [B, k] float32, ids [B, k] int64)`` on the CPU, best first (ties by
            increasing id); a slot the index could not fill holds ``-inf`` and ``-1``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_labels:
            raise ConfigError(f"k={k!r} must be an integer in [1, {self.num_labels}] (--topk)")
        q = queries.detach().float().cpu() if isinstance(queries, torch.Tensor) else \
            torch.as_tensor(np.asarray(queries, dtype=np.float32))
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"queries must be [B, {self.dim}], got {tuple(q.shape)}")
        eff = self.effort if effort is None else int(effort)
        qa = augment_queries(q)  # [B, d + 1]
        qa = np.ascontiguousarray(np.concatenate([qa, np.zeros((qa.shape[0], 1), np.float32)], 1))
        if self.backend == "hnsw":
            self._index.set_ef(max(eff, k))
            n = min(max(k, eff), self.num_labels)
            labels, _ = self._index.knn_query(qa, k=n, num_threads=1)
            cand = torch.from_numpy(labels.astype(np.int64))  # [B, n]
        else:
            import faiss

            faiss.omp_set_num_threads(1)  # one query thread, like hnsw (requests parallelise)
            self._index.nprobe = eff
            n = k
            _, labels = self._index.search(qa, n)
            cand = torch.from_numpy(labels.astype(np.int64))  # [B, n], -1 where unfilled
        return _rerank(q, self._weight, self._bias, cand, k)


def _rerank(q: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cand: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of ``cand [B, n]`` (``-1`` = none), best ``k`` (ties by id)."""
    valid = cand >= 0
    c = cand.clamp(min=0)
    sc = torch.einsum("bnd,bd->bn", w[c], q)  # [B, n]
    if b is not None:
        sc = sc + b[c]
    sc = sc.masked_fill(~valid, float("-inf"))
    c = torch.where(valid, cand, torch.full_like(cand, torch.iinfo(torch.int64).max))
    c_sorted, perm = torch.sort(c, dim=1)  # ids ascending: stable sort below breaks ties by id
    s_sorted = sc.gather(1, perm)
    o = torch.sort(s_sorted, dim=1, descending=True, stable=True).indices[:, :k]
    ids = c_sorted.gather(1, o)
    scores = s_sorted.gather(1, o)
    ids = torch.where(torch.isfinite(scores), ids, torch.full_like(ids, -1))
    if ids.shape[1] < k:  # fewer candidates than k
        pad = k - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1)
    return scores, ids


def build_ann_index(weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                    backend: str = "auto", *, threads: int = 1, seed: int = 0,
                    **params: Any) -> AnnIndex:
    """Build an ANN index over the model's label table (bias folded in, MIPS -> L2).

    Args:
        weight: ``[L, d]`` label embeddings.
        bias: ``[L]`` or ``None``.
        backend: ``"auto"`` (the first of :func:`available_backends`), ``"hnsw"`` or
            ``"faiss-ivf"``.
        threads: build threads.
        seed: random seed of the build.
        **params: hnsw: ``M`` (16), ``ef_construction`` (80), ``ef`` (64, search);
            faiss-ivf: ``nlist`` (about ``4 sqrt(L)``), ``nprobe`` (16, search), k-means on
            ``train_per_list * nlist`` sampled vectors (32) for ``niter`` iterations (10).

    Returns:
        :class:`AnnIndex`.

    Raises:
        ConfigError: unknown backend, or its library is not installed (with the install line).
    """
    avail = available_backends()
    if backend == "auto":
        if not avail:
            raise ConfigError("no ANN library installed: pip install 'xmc-toolkit[ann]' "
                              "(hnswlib, faiss-cpu), or use the MIDX index (--approx-backend midx)")
        backend = avail[0]
    if backend not in ANN_BACKENDS:
        raise ConfigError(f"unknown ANN backend {backend!r}; use one of {list(ANN_BACKENDS)} "
                          "or 'auto'")
    if backend not in avail:
        raise ConfigError(f"ANN backend {backend!r} needs the {_MODULES[backend]} package: pip "
                          f"install 'xmc-toolkit[ann]' (or pip install {_MODULES[backend]})")
    w_t = torch.as_tensor(np.asarray(weight, np.float32)) if not isinstance(weight, torch.Tensor) \
        else weight.detach().float().cpu()
    b_t = None
    if bias is not None:
        b_t = torch.as_tensor(np.asarray(bias, np.float32)) if not isinstance(bias, torch.Tensor) \
            else bias.detach().float().cpu()
    data, _ = mips_to_l2(fold_bias(w_t, b_t))  # [L, d + 2]
    L, dim = data.shape
    t = time.perf_counter()
    if backend == "hnsw":
        import hnswlib

        m = int(params.get("M", 16))
        efc = int(params.get("ef_construction", 80))
        effort = int(params.get("ef", 64))
        index = hnswlib.Index(space="l2", dim=dim)
        index.init_index(max_elements=L, M=m, ef_construction=efc, random_seed=seed)
        index.add_items(data, np.arange(L), num_threads=threads)
        used = {"M": m, "ef_construction": efc}
    else:
        import faiss

        faiss.omp_set_num_threads(threads)
        nlist = int(params.get("nlist", max(1, min(L // 39, int(4 * np.sqrt(L))))))
        effort = int(params.get("nprobe", 16))
        quant = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_L2)
        rng = np.random.default_rng(seed)
        train = data[rng.choice(L, size=min(L, int(params.get("train_per_list", 32)) * nlist),
                                replace=False)]
        index.cp.seed = seed
        index.cp.niter = int(params.get("niter", 10))
        index.train(train)
        index.add(data)
        used = {"nlist": nlist}
    build_s = time.perf_counter() - t
    logger.info("built %s ANN index over %d labels in %.1f s", backend, L, build_s)
    return AnnIndex(backend, index, w_t, b_t, used, effort, build_s)
