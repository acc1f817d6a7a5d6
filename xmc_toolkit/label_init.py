"""Label rows initialised from what the encoder already says about their training rows.

PECOS starts its label representations from PIFA (the normalised mean of the positives'
features); here the same idea runs in the query space: the label row of ``l`` points along the
normalised mean of the queries of ``l``'s training rows, so that before the first step a row
already scores higher with queries that resemble its positives. Labels without training rows
keep their rows. The same rows serve new labels added to a trained model.

Public API::

    pifa_label_rows(queries, Y, scale) -> float32 [L, d], bool [L]   # pure, no I/O
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .errors import ConfigError

__all__ = ["pifa_label_rows"]


def pifa_label_rows(queries: torch.Tensor, Y: sp.spmatrix,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Label rows along the normalised mean query of each label's positives.

    Args:
        queries: ``[N, d] float32`` encodings of the training rows (eval mode).
        Y: ``[N, L]`` binary label matrix (scipy sparse).
        scale: norm of every produced row; ``None``: ``4 / median ||q||``, which gives a row's
            positives scores of about 4 times their cosine with the label's mean query.

    Returns:
        ``rows [L, d] float32`` (on ``queries``' device; rows of labels without positives are
        zero) and ``has_rows [L] bool`` (the label has at least one positive).

    Raises:
        ConfigError: when the shapes of ``queries`` and ``Y`` disagree.
    """
    if queries.dim() != 2 or queries.shape[0] != Y.shape[0]:
        raise ConfigError(f"queries has shape {tuple(queries.shape)} but Y has {Y.shape[0]} rows;"
                          " encode every training row once")
    Yt = sp.csr_matrix(Y.T, dtype=np.float32)  # [L, N]
    q_host = queries.detach().float().cpu().numpy()  # [N, d]
    sums = torch.from_numpy(np.asarray(Yt @ q_host, dtype=np.float32)).to(queries.device)  # [L, d]
    norms = sums.norm(dim=1, keepdim=True)  # [L, 1]
    has_rows = norms.view(-1) > 0
    if scale is None:
        qn = queries.float().norm(dim=1)
        med = float(qn.median()) if qn.numel() else 1.0
        scale = 4.0 / max(med, 1e-12)
    rows = torch.where(norms > 0, sums / norms.clamp_min(1e-30), torch.zeros_like(sums)) * scale
    return rows, has_rows
