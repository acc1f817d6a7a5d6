"""Static (query-independent) samplers: uniform, popularity and log-uniform (Zipf).

Each holds one distribution ``p [L]`` over the labels; per-query mode draws ``[B, M]`` i.i.d. ids
from it, and shared mode draws ``[M]`` ids from it (the batch mixture of a static proposal is the
proposal itself). ``update`` only checks its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .base import Sampler, Samples

__all__ = ["UniformSampler", "PopularitySampler", "LogUniformSampler"]


def _check_num_labels(num_labels: int) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
    return num_labels


def _load_strict(state: dict[str, Tensor], expected: dict[str, tuple[int, ...] | None]) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected keys and shape mismatches."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, shape in expected.items():
        if key in state and shape is not None and tuple(state[key].shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, got {list(state[key].shape)}")
    if problems:
        raise CheckpointError(
            "sampler state does not match this sampler: " + "; ".join(problems)
            + " (was it saved by a sampler with the same type and num_labels?)"
        )


def _check_saved_num_labels(state: dict[str, Tensor], num_labels: int) -> None:
    saved = int(state["num_labels"].item())
    if saved != num_labels:
        raise CheckpointError(
            f"sampler state was saved for num_labels={saved}, this sampler has {num_labels}"
        )


class UniformSampler(Sampler):
    """``q(i) = 1 / L`` for every label.

    Args:
        num_labels: number of labels ``L``.
    """

    needs_update = False

    def __init__(self, num_labels: int) -> None:
        self.num_labels = _check_num_labels(num_labels)

    def _sample(
        self, queries: Tensor, num_samples: int, shared: bool, generator: torch.Generator | None
    ) -> Samples:
        shape = (num_samples,) if shared else (queries.shape[0], num_samples)
        ids = torch.randint(
            self.num_labels, shape, generator=generator, device=queries.device
        )  # [B, M] | [M]
        log_q = torch.full(shape, -math.log(self.num_labels), device=queries.device)
        return Samples(ids, log_q)

    def _log_prob(self, queries: Tensor, ids: Tensor, shared: bool) -> Tensor:
        if not shared and ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(queries.shape[0], -1)
        return torch.full(ids.shape, -math.log(self.num_labels), device=queries.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"num_labels": torch.tensor(self.num_labels, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        _load_strict(state, {"num_labels": ()})
        _check_saved_num_labels(state, self.num_labels)


class _TableSampler(Sampler):
    """A fixed distribution over labels, sampled by inverse CDF (``searchsorted``)."""

    needs_update = False

    def _set_log_p(self, log_p: Tensor) -> None:
        # log_p [L] float64 on the CPU, normalized; device copies are made lazily
        self._log_p64 = log_p
        self._cache: dict[torch.device, tuple[Tensor, Tensor, int]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, int]:
        if device not in self._cache:
            p = self._log_p64.exp()
            cdf = torch.cumsum(p, 0)  # [L] float64
            last = int((p > 0).nonzero().max().item())  # never return a zero-probability label
            self._cache[device] = (
                self._log_p64.to(device=device, dtype=torch.float32),
                cdf.to(device),
                last,
            )
        return self._cache[device]

    def _sample(
        self, queries: Tensor, num_samples: int, shared: bool, generator: torch.Generator | None
    ) -> Samples:
        log_p, cdf, last = self._tables(queries.device)
        shape = (num_samples,) if shared else (queries.shape[0], num_samples)
        u = torch.rand(shape, generator=generator, device=queries.device, dtype=torch.float64)
        ids = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max_(last)  # [B, M] | [M]
        return Samples(ids, log_p[ids])

    def _log_prob(self, queries: Tensor, ids: Tensor, shared: bool) -> Tensor:
        log_p, _, _ = self._tables(queries.device)
        if not shared and ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(queries.shape[0], -1)
        return log_p[ids]

    @property
    def probs(self) -> Tensor:
        """``[L]`` float64 probabilities of the labels (CPU)."""
        return self._log_p64.exp()


class PopularitySampler(_TableSampler):
    """``q(i) proportional to (count_i + smoothing) ** alpha`` (word2vec-style unigram^0.75).

    Args:
        label_counts: ``[L]`` non-negative label frequencies (tensor, array or sequence).
        alpha: exponent (0 gives uniform, 1 plain popularity).
        smoothing: added to every count before the power, so that labels never seen in training
            keep a non-zero probability (``+1`` smoothing by default; 0 disables it and gives
            unseen labels probability 0).
    """

    def __init__(
        self,
        label_counts: Tensor | np.ndarray | Sequence[float],
        alpha: float = 0.75,
        smoothing: float = 1.0,
    ) -> None:
        counts = torch.as_tensor(np.asarray(label_counts, dtype=np.float64)).flatten()
        problems = []
        if counts.numel() < 1:
            problems.append("label_counts is empty; pass one count per label")
        elif not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            problems.append("label_counts must be finite and non-negative")
        if not (math.isfinite(alpha) and alpha >= 0):
            problems.append(f"alpha must be >= 0, got {alpha!r} (--alpha)")
        if not (math.isfinite(smoothing) and smoothing >= 0):
            problems.append(f"smoothing must be >= 0, got {smoothing!r}")
        if problems:
            raise ConfigError(problems)
        w = counts + smoothing
        if not bool((w > 0).any()):
            raise ConfigError("every label count is 0 and smoothing=0; use smoothing > 0")
        self.num_labels = int(counts.numel())
        self.alpha = float(alpha)
        self.smoothing = float(smoothing)
        log_w = self.alpha * torch.log(w)  # [L], -inf for zero weight (0 ** alpha, alpha > 0)
        if self.alpha == 0:
            log_w = torch.zeros_like(w)
        self._set_log_p(log_w - torch.logsumexp(log_w, 0))

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "num_labels": torch.tensor(self.num_labels, dtype=torch.int64),
            "log_p": self._log_p64.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        _load_strict(state, {"num_labels": (), "log_p": (self.num_labels,)})
        _check_saved_num_labels(state, self.num_labels)
        self._set_log_p(state["log_p"].detach().to("cpu", torch.float64).clone())

    def __repr__(self) -> str:
        return f"PopularitySampler(num_labels={self.num_labels}, alpha={self.alpha})"


class LogUniformSampler(_TableSampler):
    """Zipfian ``q(k) = log((k + 2) / (k + 1)) / log(L + 1)`` (TF ``log_uniform_candidate_sampler``).

    Label ids are assumed sorted by decreasing frequency (id 0 the most frequent). Sampling uses
    the closed-form inverse CDF ``k = floor(exp(u * log(L + 1))) - 1``.

    Args:
        num_labels: number of labels ``L``.
    """

    def __init__(self, num_labels: int) -> None:
        self.num_labels = _check_num_labels(num_labels)
        k = torch.arange(self.num_labels, dtype=torch.float64)
        self._set_log_p(torch.log(torch.log1p(1.0 / (k + 1))) - math.log(math.log(self.num_labels + 1)))

    def _sample(
        self, queries: Tensor, num_samples: int, shared: bool, generator: torch.Generator | None
    ) -> Samples:
        log_p, _, _ = self._tables(queries.device)
        shape = (num_samples,) if shared else (queries.shape[0], num_samples)
        u = torch.rand(shape, generator=generator, device=queries.device, dtype=torch.float64)
        ids = (torch.exp(u * math.log(self.num_labels + 1)).floor_() - 1).long()  # [B, M] | [M]
        ids = ids.clamp_(0, self.num_labels - 1)
        return Samples(ids, log_p[ids])

    def state_dict(self) -> dict[str, Tensor]:
        return {"num_labels": torch.tensor(self.num_labels, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        _load_strict(state, {"num_labels": ()})
        _check_saved_num_labels(state, self.num_labels)

