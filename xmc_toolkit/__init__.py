"""xmc-toolkit: extreme multi-label classification with sampled softmax and the MIDX sampler.

The curated public API is imported lazily so that ``import xmc_toolkit`` (and the data-only CLI
commands) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # errors
    "XMCError": "xmc_toolkit.errors",
    "DataFormatError": "xmc_toolkit.errors",
    "ConfigError": "xmc_toolkit.errors",
    "CheckpointError": "xmc_toolkit.errors",
    "SamplerError": "xmc_toolkit.errors",
    "OutputError": "xmc_toolkit.errors",
    # data
    "XMCDataset": "xmc_toolkit.data",
    "load": "xmc_toolkit.data",
    "save": "xmc_toolkit.data",
    # model
    "XMCModel": "xmc_toolkit.model",
    # samplers
    "UniformSampler": "xmc_toolkit.sampling",
    "PopularitySampler": "xmc_toolkit.sampling",
    "LogUniformSampler": "xmc_toolkit.sampling",
    "MIDXSampler": "xmc_toolkit.sampling",
    # losses
    "full_softmax_loss": "xmc_toolkit.losses",
    "sampled_softmax_loss": "xmc_toolkit.losses",
    "negative_sampling_loss": "xmc_toolkit.losses",
    # metrics
    "precision_at_k": "xmc_toolkit.metrics",
    "ndcg_at_k": "xmc_toolkit.metrics",
    "psp_at_k": "xmc_toolkit.metrics",
    "recall_at_k": "xmc_toolkit.metrics",
    "evaluate": "xmc_toolkit.metrics",
    "inverse_propensity": "xmc_toolkit.metrics",
    "make_synthetic": "xmc_toolkit.data",
    "make_sampler": "xmc_toolkit.sampling",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xmc_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
