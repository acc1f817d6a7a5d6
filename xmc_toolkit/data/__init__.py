"""Data formats, synthetic data and standard data sets (numpy/scipy only, no torch)."""

from __future__ import annotations

from .dataset import XMCDataset

__all__ = ["XMCDataset"]

# formats.py exports (owned by the data-formats work):
# FORMATS-EXPORTS

# synthetic.py / registry.py exports (owned by the synthetic-data work):
# SYNTH-EXPORTS
