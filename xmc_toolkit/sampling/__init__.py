"""Negative samplers for sampled softmax: static baselines and the adaptive MIDX sampler.

Every sampler follows :class:`Sampler`: ``update(label_embeddings, bias)`` rebuilds the proposal,
``sample(queries, M, shared=False)`` returns ids with exact normalized ``log q``,
``log_prob(queries, ids)`` scores any ids. See ``docs/samplers.md`` for the math.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError
from .base import Sampler, Samples
from .diagnostics import proposal_divergence
from .midx import MIDXSampler
from .static import LogUniformSampler, PopularitySampler, UniformSampler

__all__ = [
    "Sampler",
    "Samples",
    "UniformSampler",
    "PopularitySampler",
    "LogUniformSampler",
    "MIDXSampler",
    "SAMPLER_NAMES",
    "make_sampler",
    "proposal_divergence",
]

SAMPLER_NAMES = ("uniform", "popularity", "log-uniform", "midx", "midx-pq", "midx-rq")


def make_sampler(
    name: str,
    num_labels: int,
    label_counts: Tensor | np.ndarray | Sequence[float] | None = None,
    **kwargs: Any,
) -> Sampler:
    """Build a sampler by name.

    Args:
        name: ``uniform | popularity | log-uniform | midx | midx-pq | midx-rq``.
        num_labels: number of labels ``L``.
        label_counts: ``[L]`` label frequencies (needed by ``popularity`` and by MIDX with
            ``within_cell="popularity"``; ignored by ``uniform`` and ``log-uniform``).
        **kwargs: sampler options (``alpha``, ``smoothing`` for popularity; ``num_codewords``,
            ``quantizer``, ``within_cell``, ``alpha``, ``seed``, ... for MIDX).

    Raises:
        ConfigError: unknown name, missing label counts, unknown or bad options.
    """
    key = str(name).lower().replace("_", "-")
    if key == "loguniform":
        key = "log-uniform"
    if key not in SAMPLER_NAMES:
        raise ConfigError(
            f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} (--sampler)"
        )
    try:
        if key == "uniform":
            return UniformSampler(num_labels, **kwargs)
        if key == "log-uniform":
            return LogUniformSampler(num_labels, **kwargs)
        if key == "popularity":
            if label_counts is None:
                raise ConfigError(
                    "sampler 'popularity' needs label_counts (training label frequencies)"
                )
            sampler = PopularitySampler(label_counts, **kwargs)
            if sampler.num_labels != num_labels:
                raise ConfigError(
                    f"label_counts has {sampler.num_labels} entries, expected num_labels="
                    f"{num_labels}"
                )
            return sampler
        if key in ("midx-pq", "midx-rq"):
            quantizer = key.split("-")[1]
            if kwargs.get("quantizer", quantizer) != quantizer:
                raise ConfigError(
                    f"sampler {name!r} fixes quantizer={quantizer!r} but quantizer="
                    f"{kwargs['quantizer']!r} was given; use sampler 'midx' with --quantizer"
                )
            kwargs["quantizer"] = quantizer
        if kwargs.get("within_cell", "uniform") == "popularity":
            kwargs["label_counts"] = label_counts
        return MIDXSampler(num_labels, **kwargs)
    except TypeError as exc:  # unknown keyword argument
        raise ConfigError(f"bad option for sampler {name!r}: {exc}") from exc
