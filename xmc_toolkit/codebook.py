"""Torch k-means and the two quantizers behind the MIDX sampler.

* :func:`kmeans` -- Lloyd's algorithm with greedy k-means++ initialisation (on a subsample),
  warm start from given centroids, empty-cluster re-seeding from the farthest points, chunked
  distance computation (memory bounded by ``chunk_size`` rows x ``k``), optional subsample
  training (train on ``sample_size`` points, then assign every point once, in chunks) and an
  optional mini-batch mode (Sculley, 2010) for very large inputs. Runs on whatever device the
  input lives on; deterministic given ``seed`` or a CPU ``torch.Generator``.
* :func:`product_quantize` -- k-means on each half of the vectors (``d1 = floor(d / 2)``).
* :func:`residual_quantize` -- k-means on the vectors, then on the residuals.
* :func:`reconstruct` -- the quantized vectors ``[C1[k1]; C2[k2]]`` (pq) or ``C1[k1] + C2[k2]`` (rq).

All functions are pure: they never modify their inputs, never print, and do no I/O.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from .errors import ConfigError
from .native import kernels_for

__all__ = [
    "KMeansResult",
    "Quantization",
    "kmeans",
    "assign_nearest",
    "product_quantize",
    "residual_quantize",
    "reconstruct",
    "nearest_codes",
    "codewords_from_cells",
]

logger = logging.getLogger(__name__)

_MAX_CHUNK_ELEMS = 1 << 24  # at most 16M distances per chunk (64 MB in float32)


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``[k, d]`` float, on the input's device.
        assign: ``[N] int64``, index of the nearest centroid of every input point.
        inertia: sum of squared distances of every point to its centroid (float).
        iterations: number of Lloyd (or mini-batch) iterations run.
    """

    centroids: Tensor
    assign: Tensor
    inertia: float
    iterations: int


class Quantization(NamedTuple):
    """Two-codebook quantization of ``N`` vectors.

    Attributes:
        codebooks: ``(C1, C2)``; pq: ``[K, d1]`` and ``[K, d - d1]`` with ``d1 = d // 2``;
            rq: both ``[K, d]``.
        codes: ``[N, 2] int64``, ``(k1, k2)`` of every vector.
        quantizer: ``"pq"`` or ``"rq"``.
    """

    codebooks: tuple[Tensor, Tensor]
    codes: Tensor
    quantizer: str


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if generator.device.type != "cpu":
            raise ConfigError(
                f"kmeans needs a CPU torch.Generator, got one on {generator.device}; "
                "pass torch.Generator().manual_seed(seed) or use seed="
            )
        return generator
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _chunk_rows(chunk_size: int, k: int) -> int:
    return max(1, min(int(chunk_size), _MAX_CHUNK_ELEMS // max(k, 1)))


@overload
def assign_nearest(x: Tensor, centroids: Tensor, chunk_size: int = ...,
                   distances: Literal[True] = ...) -> tuple[Tensor, Tensor]: ...
@overload
def assign_nearest(x: Tensor, centroids: Tensor, chunk_size: int,
                   distances: Literal[False]) -> tuple[Tensor, None]: ...
def assign_nearest(
    x: Tensor, centroids: Tensor, chunk_size: int = 262144, distances: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Nearest centroid of every point, computed in row chunks.

    Args:
        x: ``[N, d]`` float points.
        centroids: ``[k, d]`` float centroids (same device and dtype as ``x``).
        chunk_size: at most this many rows of ``x`` are scored at once (further capped so that a
            chunk holds at most 16M distances).
        distances: also return the squared distances (one more pass over ``x``).

    Returns:
        ``(assign [N] int64, dist2 [N] float)``: index of the nearest centroid and the squared
        distance to it (clamped at 0); ``dist2`` is ``None`` when ``distances=False``.
    """
    n = x.shape[0]
    k = centroids.shape[0]
    rows = _chunk_rows(chunk_size, k)
    c2 = (centroids * centroids).sum(1)  # [k]
    assign = torch.empty(n, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(n, dtype=x.dtype, device=x.device) if distances else None
    # the native row_argmin: torch.min(dim=1)'s indices (ties and NaN alike), 2x faster
    mod = kernels_for(x)
    for start in range(0, n, rows):
        xc = x[start : start + rows]  # [r, d]
        # ||x||^2 is constant per row: argmin over c2 - 2 x.c, then add it back for the distance.
        d = torch.addmm(c2.unsqueeze(0), xc, centroids.t(), alpha=-2.0)  # [r, k]
        if mod is not None:
            a = mod.row_argmin(d)  # [r]
            m = d.gather(1, a.unsqueeze(1)).squeeze(1) if dist2 is not None else None
        else:
            m, a = d.min(dim=1)
        assign[start : start + rows] = a
        if dist2 is not None:
            assert m is not None
            dist2[start : start + rows] = (m + (xc * xc).sum(1)).clamp_min_(0.0)
    return assign, dist2


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator, chunk_size: int) -> Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per step) on ``x [n, d]`` -> ``[k, d]``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x2 = (x * x).sum(1)  # [n]
    first = int(torch.randint(n, (1,), generator=g).item())
    centroids = x.new_empty((k, x.shape[1]))
    centroids[0] = x[first]
    closest = ((x - x[first]) ** 2).sum(1)  # [n] squared distance to the nearest chosen centroid
    rows = _chunk_rows(chunk_size, trials)
    for j in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) <= 0.0:  # every point coincides with a centroid: pick at random
            cand = torch.randint(n, (trials,), generator=g)
        else:
            cand = torch.multinomial(weights, trials, replacement=True, generator=g)
        xc = x[cand.to(x.device)]  # [t, d]
        cc = x2[cand.to(x.device)]  # [t]
        if n <= rows:
            d = torch.addmm(cc.unsqueeze(1) + x2.unsqueeze(0), xc, x.t(), alpha=-2.0)  # [t, n]
            new_closest = torch.minimum(d.clamp_min_(0.0), closest.unsqueeze(0))
        else:
            new_closest = x.new_empty((trials, n))
            for start in range(0, n, rows):
                xs = x[start : start + rows]
                d = torch.addmm(cc.unsqueeze(1) + x2[start : start + rows].unsqueeze(0), xc, xs.t(), alpha=-2.0)
                new_closest[:, start : start + rows] = torch.minimum(
                    d.clamp_min_(0.0), closest[start : start + rows].unsqueeze(0)
                )
        best = int(new_closest.sum(1).argmin().item())  # candidate with the lowest potential
        centroids[j] = xc[best]
        closest = new_closest[best]
    return centroids


def _reseed_empty(
    centroids: Tensor, counts: Tensor, x: Tensor, dist2: Tensor
) -> tuple[Tensor, int]:
    """Move the centroids of empty clusters onto the points farthest from their centroid."""
    empty = (counts == 0).nonzero().flatten()
    n_empty = int(empty.numel())
    if n_empty == 0:
        return centroids, 0
    n_take = min(n_empty, x.shape[0])
    far = dist2.topk(n_take).indices  # [n_take] farthest points
    centroids = centroids.clone()
    centroids[empty[:n_take]] = x[far]
    return centroids, n_empty


def _check_inputs(x: Tensor, k: int, init: Tensor | None) -> None:
    problems: list[str] = []
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"kmeans input must be a 2-D tensor [N, d], got {shape}")
    if not x.is_floating_point():
        problems.append(f"kmeans input must be floating point, got {x.dtype}")
    n = x.shape[0]
    if not isinstance(k, int) or k < 1:
        problems.append(f"k must be a positive integer, got {k!r}")
    elif k > n:
        problems.append(
            f"k={k} is larger than the number of points N={n}; use at most {n} codewords "
            "(--num-codewords)"
        )
    if init is not None and (init.dim() != 2 or tuple(init.shape) != (k, x.shape[1])):
        problems.append(
            f"init centroids must have shape [{k}, {x.shape[1]}], got {tuple(init.shape)}"
        )
    if problems:
        raise ConfigError(problems)
    if x.numel() and not (
        bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
    ):  # a finite sum proves every entry finite (see sampling.base._all_finite)
        raise ConfigError("kmeans input contains NaN or inf; clean the embeddings first")


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 20,
    init: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 262144,
    sample_size: int | None = None,
    batch_size: int | None = None,
    tol: float = 1e-4,
) -> KMeansResult:
    """k-means clustering of ``x`` into ``k`` clusters.

    Args:
        x: ``[N, d]`` float points (any device; never modified).
        k: number of clusters, ``1 <= k <= N``.
        iters: maximum number of Lloyd iterations (mini-batch mode: number of mini-batches).
        init: ``[k, d]`` warm-start centroids; ``None`` runs greedy k-means++ on a subsample.
        seed: seed of the CPU generator used for every random choice (``None``: random).
        generator: a CPU ``torch.Generator`` (takes precedence over ``seed``).
        chunk_size: maximum rows per distance chunk (bounded memory ``chunk_size x k``).
        sample_size: train on this many randomly chosen points (tens per centroid are plenty),
            then assign all ``N`` points once, in chunks. ``None``: train on all points.
        batch_size: mini-batch k-means with batches of this many points (for very large N);
            ``None``: full-batch Lloyd.
        tol: stop when the relative decrease of the training inertia falls below ``tol``.

    Returns:
        :class:`KMeansResult` with centroids ``[k, d]``, assignment ``[N] int64`` of all
        points, the inertia over all points, and the iteration count.

    Raises:
        ConfigError: bad shapes, ``k > N``, non-finite input.
    """
    _check_inputs(x, k, init)
    g = _make_generator(seed, generator)
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.shape[0]

    train = x
    if sample_size is not None and sample_size < n and batch_size is None:
        sample_size = max(int(sample_size), k)
        idx = torch.randperm(n, generator=g)[:sample_size].to(x.device)
        train = x[idx]  # [S, d]

    if init is not None:
        centroids = init.detach().to(device=x.device, dtype=x.dtype).clone()
    else:
        n_init = min(train.shape[0], max(50 * k, 10000))
        if n_init < train.shape[0]:
            idx = torch.randperm(train.shape[0], generator=g)[:n_init].to(x.device)
            centroids = _kmeans_pp(train[idx], k, g, chunk_size)
        else:
            centroids = _kmeans_pp(train, k, g, chunk_size)

    it = 0
    if batch_size is not None:
        centroids, it = _minibatch(train, centroids, iters, int(batch_size), g, chunk_size)
    else:
        prev = math.inf
        for it in range(1, iters + 1):
            assign, dist2 = assign_nearest(train, centroids, chunk_size)
            inertia = float(dist2.sum().item())
            counts = torch.bincount(assign, minlength=k)  # [k]
            sums = torch.zeros_like(centroids).index_add_(0, assign, train)  # [k, d]
            new = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
            new = torch.where(counts.unsqueeze(1) > 0, new, centroids)
            centroids, n_empty = _reseed_empty(new, counts, train, dist2)
            if n_empty:
                logger.debug("kmeans iteration %d: re-seeded %d empty clusters", it, n_empty)
            elif prev - inertia <= tol * max(prev, 1e-30) and it > 1:
                break
            prev = inertia

    assign, dist2 = assign_nearest(x, centroids, chunk_size)
    return KMeansResult(centroids, assign, float(dist2.sum().item()), it)


def _minibatch(
    x: Tensor, centroids: Tensor, iters: int, batch_size: int, g: torch.Generator, chunk_size: int
) -> tuple[Tensor, int]:
    """Mini-batch k-means: per-centroid learning rate 1 / (points seen)."""
    k = centroids.shape[0]
    n = x.shape[0]
    seen = torch.zeros(k, dtype=x.dtype, device=x.device)  # [k]
    centroids = centroids.clone()
    for it in range(1, iters + 1):
        idx = torch.randint(n, (min(batch_size, n),), generator=g).to(x.device)
        xb = x[idx]  # [b, d]
        assign, dist2 = assign_nearest(xb, centroids, chunk_size)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, assign, xb)  # [k, d]
        seen += counts
        # c <- c + (sum - cnt * c) / seen  ==  running mean of every point ever assigned
        centroids += (sums - counts.unsqueeze(1) * centroids) / seen.clamp_min(1).unsqueeze(1)
        if it == 1 or it % 10 == 0:
            centroids, _ = _reseed_empty(centroids, seen, xb, dist2)
    return centroids, iters


def _split(d: int) -> int:
    return d // 2


def product_quantize(
    x: Tensor,
    k: int,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    **kmeans_kwargs: object,
) -> Quantization:
    """Product quantization: k-means on each half of ``x`` (first half ``floor(d / 2)`` dims).

    Args:
        x: ``[N, d]`` float, ``d >= 2``.
        k: codewords per codebook.
        init: warm-start codebooks ``([k, d1], [k, d - d1])``.
        **kmeans_kwargs: forwarded to :func:`kmeans` (``iters``, ``seed``/``generator``,
            ``sample_size``, ``chunk_size``, ``batch_size``, ``tol``). One generator is shared
            by both halves, so a seed makes the whole quantization deterministic.

    Returns:
        :class:`Quantization` with codes ``[N, 2]``.
    """
    if x.dim() != 2 or x.shape[1] < 2:
        raise ConfigError(
            f"product quantization needs vectors of dimension >= 2, got shape {tuple(x.shape)}; "
            "use quantizer='rq'"
        )
    kw = dict(kmeans_kwargs)
    kw["generator"] = _make_generator(kw.pop("seed", None), kw.pop("generator", None))  # type: ignore[arg-type]
    d1 = _split(x.shape[1])
    i1, i2 = (None, None) if init is None else init
    # contiguous halves: strided row chunks make the distance matmuls several times slower
    r1 = kmeans(x[:, :d1].contiguous(), k, init=i1, **kw)  # type: ignore[arg-type]
    r2 = kmeans(x[:, d1:].contiguous(), k, init=i2, **kw)  # type: ignore[arg-type]
    codes = torch.stack([r1.assign, r2.assign], dim=1)  # [N, 2]
    return Quantization((r1.centroids, r2.centroids), codes, "pq")


def residual_quantize(
    x: Tensor,
    k: int,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    **kmeans_kwargs: object,
) -> Quantization:
    """Residual quantization: k-means on ``x``, then k-means on ``x - C1[k1]``.

    Args:
        x: ``[N, d]`` float.
        k: codewords per codebook.
        init: warm-start codebooks ``([k, d], [k, d])``.
        **kmeans_kwargs: forwarded to :func:`kmeans` (see :func:`product_quantize`).

    Returns:
        :class:`Quantization` with codes ``[N, 2]``; ``x ~= C1[k1] + C2[k2]``.
    """
    kw = dict(kmeans_kwargs)
    kw["generator"] = _make_generator(kw.pop("seed", None), kw.pop("generator", None))  # type: ignore[arg-type]
    i1, i2 = (None, None) if init is None else init
    r1 = kmeans(x, k, init=i1, **kw)  # type: ignore[arg-type]
    residual = x.detach().to(r1.centroids.dtype) - r1.centroids[r1.assign]  # [N, d]
    r2 = kmeans(residual, k, init=i2, **kw)  # type: ignore[arg-type]
    codes = torch.stack([r1.assign, r2.assign], dim=1)  # [N, 2]
    return Quantization((r1.centroids, r2.centroids), codes, "rq")


def reconstruct(codebooks: tuple[Tensor, Tensor], codes: Tensor, quantizer: str) -> Tensor:
    """Quantized vectors ``[N, d]``: ``[C1[k1]; C2[k2]]`` (pq) or ``C1[k1] + C2[k2]`` (rq)."""
    c1, c2 = codebooks
    if quantizer == "pq":
        return torch.cat([c1[codes[:, 0]], c2[codes[:, 1]]], dim=1)
    if quantizer == "rq":
        return c1[codes[:, 0]] + c2[codes[:, 1]]
    raise ConfigError(f"unknown quantizer {quantizer!r}; use 'pq' or 'rq'")


def nearest_codes(
    x: Tensor, codebooks: tuple[Tensor, Tensor], quantizer: str, chunk_size: int = 262144
) -> Tensor:
    """Codes of ``x`` against fixed codebooks: the nearest codeword of each half (pq), or of
    the vector and then of its residual (rq).

    Args:
        x: ``[N, d]`` float points.
        codebooks: ``(C1, C2)`` as in :class:`Quantization`.
        quantizer: ``"pq"`` or ``"rq"``.
        chunk_size: rows per distance chunk (see :func:`assign_nearest`).

    Returns:
        ``[N, 2] int64`` codes ``(k1, k2)``.
    """
    c1, c2 = codebooks
    x = x.detach().to(c1.dtype)
    if quantizer == "pq":
        d1 = c1.shape[1]
        k1, _ = assign_nearest(x[:, :d1], c1, chunk_size, False)  # strided halves: no copies
        k2, _ = assign_nearest(x[:, d1:], c2, chunk_size, False)
    elif quantizer == "rq":
        k1, _ = assign_nearest(x, c1, chunk_size, False)
        k2, _ = assign_nearest(x - c1[k1], c2, chunk_size, False)
    else:
        raise ConfigError(f"unknown quantizer {quantizer!r}; use 'pq' or 'rq'")
    return torch.stack([k1, k2], dim=1)


def codewords_from_cells(
    cell_sums: Tensor, cell_counts: Tensor, codebooks: tuple[Tensor, Tensor], quantizer: str
) -> tuple[Tensor, Tensor]:
    """The Lloyd M-step of both codebooks from per-cell sums and counts.

    ``cell_sums[k1 * K + k2]`` is the sum of the vectors in cell ``(k1, k2)``. pq: ``C1[k1]`` is
    the mean first half of the vectors with code ``k1``, ``C2[k2]`` the mean second half of
    those with code ``k2``. rq: ``C1[k1]`` is the mean vector of code ``k1``; ``C2[k2]`` the mean
    residual ``x - C1[k1(x)]`` of code ``k2`` under the *new* ``C1``, which is
    ``(sum_{k1} S[k1, k2] - sum_{k1} n[k1, k2] C1[k1]) / n2[k2]``. Codewords with no vector keep
    their previous value.

    Args:
        cell_sums: ``[K * K, d]`` float per-cell vector sums.
        cell_counts: ``[K * K]`` per-cell counts.
        codebooks: the previous ``(C1, C2)`` (kept for empty codewords).
        quantizer: ``"pq"`` or ``"rq"``.

    Returns:
        the new ``(C1, C2)``, same shapes and dtype as ``codebooks``.
    """
    c1, c2 = codebooks
    k = c1.shape[0]
    d = cell_sums.shape[1]
    s = cell_sums.to(torch.float64).view(k, k, d)  # [K, K, d]
    n = cell_counts.to(torch.float64).view(k, k)  # [K, K]
    n1, n2 = n.sum(1), n.sum(0)  # [K], [K]
    s1, s2 = s.sum(1), s.sum(0)  # [K, d] sums by k1, by k2
    new1 = s1 / n1.clamp_min(1).unsqueeze(1)
    if quantizer == "pq":
        d1 = c1.shape[1]
        new1 = new1[:, :d1]
        new2 = (s2 / n2.clamp_min(1).unsqueeze(1))[:, d1:]
    elif quantizer == "rq":
        new1 = torch.where(n1.unsqueeze(1) > 0, new1, c1.double())
        new2 = (s2 - n.t() @ new1) / n2.clamp_min(1).unsqueeze(1)
    else:
        raise ConfigError(f"unknown quantizer {quantizer!r}; use 'pq' or 'rq'")
    new1 = torch.where(n1.unsqueeze(1) > 0, new1, c1.double()).to(c1.dtype)
    new2 = torch.where(n2.unsqueeze(1) > 0, new2, c2.double()).to(c2.dtype)
    return new1, new2
