"""Data formats, synthetic data and standard data sets (numpy/scipy only, no torch)."""

from __future__ import annotations

from .dataset import XMCDataset

__all__ = ["XMCDataset"]

# formats.py exports (owned by the data-formats work):
from .formats import (  # noqa: E402
    FORMATS,
    append_xc_rows,
    dataset_stats,
    infer_format,
    load,
    read_label_names,
    save,
    write_xc_header,
)

__all__ += [
    "FORMATS",
    "append_xc_rows",
    "dataset_stats",
    "infer_format",
    "load",
    "read_label_names",
    "save",
    "write_xc_header",
]

# synthetic.py / registry.py exports (owned by the synthetic-data work):
from .registry import download, get_card, list_cards  # noqa: E402
from .synthetic import SyntheticConfig, make_synthetic, write_synthetic  # noqa: E402

__all__ += [
    "SyntheticConfig",
    "download",
    "get_card",
    "list_cards",
    "make_synthetic",
    "write_synthetic",
]
