"""Export label / instance embeddings for nearest-neighbour libraries (faiss, hnswlib, ...).

Files (see ``docs/export.md``)::

    <name>.safetensors   tensor "embeddings" float32 [N, d] C-contiguous, header metadata
                         {"format": "xmc-toolkit-embeddings", "count", "dim", "normalized",
                          ... user metadata}
    <name>.npy           float32 [N, d] C-contiguous (numpy format, no metadata)
    <name>.names.json    optional sidecar: JSON list of the N row names (label / instance ids)

Public API::

    export_embeddings(embeddings [N, d], path, normalize=False, names=None, metadata=None) -> Path
    load_embeddings(path) -> LoadedEmbeddings(embeddings np.float32 [N, d], names | None, metadata)
    fold_bias(weight [L, d], bias [L] | None) -> [L, d + 1]   # pair with augment_queries
    augment_queries(queries [B, d]) -> [B, d + 1]             # appends a column of ones

Inner-product search over ``fold_bias(W, b)`` with ``augment_queries(q)`` returns exactly the
model's scores ``q . w + b``. Files are written atomically (temporary file + fsync + rename).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._fileio import atomic_write, save_safetensors
from .errors import DataFormatError, XMCError

__all__ = [
    "check_export_path",
    "EXPORT_FORMAT",
    "LoadedEmbeddings",
    "export_embeddings",
    "load_embeddings",
    "names_path",
    "fold_bias",
    "augment_queries",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "xmc-toolkit-embeddings"
_SUFFIXES = (".safetensors", ".npy")


class LoadedEmbeddings(NamedTuple):
    """What :func:`load_embeddings` returns."""

    embeddings: np.ndarray  # float32 [N, d], C-contiguous
    names: list[str] | None
    metadata: dict[str, str]


def names_path(path: str | os.PathLike[str]) -> Path:
    """The names sidecar of an embeddings file: ``labels.safetensors`` -> ``labels.names.json``."""
    p = Path(path)
    return p.with_name(p.stem + ".names.json")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def check_export_path(path: str | os.PathLike[str]) -> None:
    """Raise :class:`XMCError` now if ``path`` cannot take an export (suffix, a directory)."""
    p = Path(path)
    _check_suffix(p)
    if p.is_dir():
        raise XMCError(f"embeddings file {str(p)!r} is a directory; pass a file name (--out)")


def _check_suffix(path: Path) -> None:
    if path.suffix not in _SUFFIXES:
        raise XMCError(
            f"embeddings file {str(path)!r} has suffix {path.suffix!r}; use .safetensors or .npy"
        )


def export_embeddings(
    embeddings: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    normalize: bool = False,
    names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write embeddings as float32 C-contiguous ``[N, d]`` to ``.safetensors`` or ``.npy``.

    Args:
        embeddings: ``[N, d]`` tensor or array (any float dtype / device; copied to CPU float32).
        path: output file; the suffix picks the format.
        normalize: L2-normalise rows (zero rows stay zero), e.g. for cosine search.
        names: optional ``N`` row names, written to the ``<stem>.names.json`` sidecar.
        metadata: extra string-able entries for the safetensors header (ignored for ``.npy``).

    Returns:
        The written path.

    Raises:
        XMCError: bad suffix, not 2-D, NaN/inf values, wrong number of names.
    """
    path = Path(path)
    _check_suffix(path)
    E = _to_numpy(embeddings)
    if E.ndim != 2:
        raise XMCError(f"embeddings must be 2-D [N, d], got shape {E.shape}")
    if not np.isfinite(E).all():
        bad = int((~np.isfinite(E)).any(axis=1).sum())
        raise XMCError(f"embeddings have {bad} rows with NaN or inf values; the model diverged")
    if normalize:
        norms = np.linalg.norm(E, axis=1, keepdims=True)  # [N, 1]
        E = E / np.where(norms > 0, norms, 1.0)
    E = np.ascontiguousarray(E, dtype=np.float32)
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != E.shape[0]:
            raise XMCError(f"got {len(names)} names for {E.shape[0]} embeddings; pass one per row")
    if path.suffix == ".npy":
        atomic_write(path, lambda p: np.save(p, E, allow_pickle=False), make_parents=True)
    else:
        header = {str(k): str(v) for k, v in (metadata or {}).items()}
        header.update(
            format=EXPORT_FORMAT,
            count=str(E.shape[0]),
            dim=str(E.shape[1]),
            normalized=str(bool(normalize)).lower(),
            has_names=str(names is not None).lower(),
        )
        atomic_write(path, lambda p: save_safetensors({"embeddings": E}, p, header, numpy=True),
                     make_parents=True)
    side = names_path(path)
    if names is not None:
        data = json.dumps(names, ensure_ascii=False).encode("utf-8")
        atomic_write(side, lambda p: p.write_bytes(data))
    elif side.is_file():  # names of an earlier export to this path would be read with these rows
        side.unlink()
    logger.info("exported %d x %d embeddings to %s", E.shape[0], E.shape[1], path)
    return path


def load_embeddings(path: str | os.PathLike[str]) -> LoadedEmbeddings:
    """Read a file written by :func:`export_embeddings` (plus its names sidecar if present).

    Raises:
        DataFormatError: missing file, unreadable contents, names count mismatch.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise DataFormatError(path, None, "embeddings file does not exist")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".npy":
            E = np.load(path, allow_pickle=False)
        else:
            with safe_open(str(path), framework="numpy") as fh:
                metadata = dict(fh.metadata() or {})
                if "embeddings" not in fh.keys():
                    raise DataFormatError(
                        path, None, f"no tensor 'embeddings' (has {sorted(fh.keys())})"
                    )
                E = fh.get_tensor("embeddings")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataFormatError(path, None, f"cannot read embeddings: {exc}") from exc
    if E.ndim != 2:
        raise DataFormatError(path, None, f"embeddings must be 2-D, got shape {E.shape}")
    E = np.ascontiguousarray(E, dtype=np.float32)
    names = None
    side = names_path(path)
    if side.is_file() and metadata.get("has_names") == "false":
        logger.warning("%s: ignoring %s, which the file says it has no names for (left by an "
                       "earlier export?)", path, side.name)
    elif side.is_file():
        try:
            names = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataFormatError(side, None, f"names sidecar is not valid JSON: {exc}") from exc
        if not isinstance(names, list) or len(names) != E.shape[0]:
            raise DataFormatError(
                side, None, f"names sidecar must be a JSON list of {E.shape[0]} names"
            )
    return LoadedEmbeddings(E, names, metadata)


def fold_bias(weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """Label vectors ``[L, d + 1]`` = ``[w_j, b_j]`` so that ``[q, 1] . [w_j, b_j] = q . w_j + b_j``.

    Without a bias the last column is 0. Returns float32 C-contiguous.
    """
    W = _to_numpy(weight)
    b = np.zeros(W.shape[0], np.float32) if bias is None else _to_numpy(bias).reshape(-1)
    if b.shape[0] != W.shape[0]:
        raise XMCError(f"bias has {b.shape[0]} entries for {W.shape[0]} label vectors")
    return np.ascontiguousarray(np.concatenate([W, b[:, None]], axis=1))  # [L, d + 1]


def augment_queries(queries: torch.Tensor | np.ndarray) -> np.ndarray:
    """Queries ``[B, d + 1]`` = ``[q, 1]`` to search a :func:`fold_bias` index. float32."""
    Q = _to_numpy(queries)
    return np.ascontiguousarray(np.concatenate([Q, np.ones((Q.shape[0], 1), np.float32)], axis=1))
