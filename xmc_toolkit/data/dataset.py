"""The in-memory data set type shared by every loader, writer and the trainer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["XMCDataset", "split_rows"]


@dataclass
class XMCDataset:
    """A multi-label data set.

    Attributes:
        X: features, ``scipy.sparse.csr_matrix`` float32 ``[N, D]`` (sorted indices, no duplicates).
        Y: labels, ``scipy.sparse.csr_matrix`` float32 ``[N, L]`` with 1.0 for each relevant label.
        label_names: ``L`` label names, or ``None`` when the format carries none.
        feature_names: ``D`` feature names, or ``None``.
    """

    X: sp.csr_matrix
    Y: sp.csr_matrix
    label_names: list[str] | None = None
    feature_names: list[str] | None = None

    @property
    def num_points(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def num_labels(self) -> int:
        return int(self.Y.shape[1])

    def __len__(self) -> int:
        return self.num_points

    def fingerprint(self) -> str:
        """Hex digest of the content (shape, rows, feature ids and values, label ids).

        Equal for equal matrices whatever file or format they came from (indices are hashed
        as int64, values as float32, in blocks: no full-size copy); names are not included.
        About 1 GB/s; the trainer records it in every checkpoint and compares it on resume.
        """
        h = hashlib.blake2b(digest_size=16)
        X = sp.csr_matrix(self.X)
        Y = sp.csr_matrix(self.Y)
        h.update(np.asarray([*X.shape, *Y.shape], dtype=np.int64).tobytes())
        block = 1 << 22
        for arr, dtype in ((X.indptr, np.int64), (X.indices, np.int64), (X.data, np.float32),
                           (Y.indptr, np.int64), (Y.indices, np.int64)):
            h.update(np.int64(len(arr)).tobytes())
            for a in range(0, len(arr), block):
                h.update(np.ascontiguousarray(arr[a:a + block], dtype=dtype).tobytes())
        return h.hexdigest()

    def subset(self, rows: np.ndarray) -> "XMCDataset":
        """The data set restricted to ``rows`` (an index array or boolean mask)."""
        return XMCDataset(self.X[rows], self.Y[rows], self.label_names, self.feature_names)


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``: sorted row indices of the validation split that
    ``--val-fraction`` carves from ``n`` training rows (``max(1, round(n * fraction))`` rows, a
    permutation seeded by ``seed``). The trainer's split and the text featurizer's fit (on the
    training part only) use this one function, so both see the same rows."""
    n_val = max(1, int(round(n * fraction)))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
